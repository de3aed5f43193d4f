"""benchmarks/real_models.py, the real-model kit: end to end on tiny random pipelines (the same code
users run on released weights), its prompt list, its models and its offline-only metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import real_models
from benchmarks.harness import peers
from benchmarks.harness.images import per_sample_psnr, per_sample_ssim, perceptual_metrics

pytestmark = pytest.mark.xdist_group("real_models")
DIFFUSERS_FAMILIES = {
    f"diffusers/{m}" for m in ("FirstBlockCache", "TaylorSeer", "PAB", "FasterCache", "MagCache")
}
CACHE_DIT_FAMILIES = {f"cache-dit/{m}" for m in ("DBCache", "DBCache+TaylorSeer", "DBCache+FoCa")}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-models")
    argv = [
        "--tiny",
        "flux.1-dev",
        "wan2.1-1.3b",
        "--fractions",
        "0.5",
        "--peer-points",
        "1",
        "--out",
        str(out),
    ]
    report = real_models.main(argv)
    return report, json.loads((out / "real_models.json").read_text()), (out / "real_models.md").read_text()


@pytest.mark.slow
def test_tiny_run_measures_every_method_against_uncached(tiny_report):
    _, written, md = tiny_report
    assert written["format"] == real_models.FORMAT and written["tiny"] is True
    assert [m["model"] for m in written["models"]] == ["flux.1-dev", "wan2.1-1.3b"]
    assert {m["pipeline"] for m in written["models"]} == {"FluxPipeline", "WanPipeline"}  # split CFG too
    have = peers.available_peers()
    for m in written["models"]:
        points = {(p["family"], p["knob"]): p for p in m["points"]}
        assert not [p for p in m["points"] if "error" in p], [p["error"] for p in m["points"] if "error" in p]
        base = points[("uncached", "")]
        assert base["mean_db"] == 100.0 and base["compute_fraction"] == 1.0 and base["speedup"] == 1.0
        for family in ("stepcache/optimal (type)", "stepcache/tuned"):
            p = points[(family, "f=0.5")]
            assert p["schedule_compute_fraction"] == pytest.approx(0.5)
            assert p["compute_fraction"] <= 0.5 + 1e-9 and p["mean_db"] < 100
            assert {"p5_db", "worst_db", "ssim", "s_per_output", "peak_memory_mib"} <= p.keys()
        families = {p["family"] for p in m["points"]}
        assert (families >= DIFFUSERS_FAMILIES) == bool(have[peers.DIFFUSERS])
        assert (families >= CACHE_DIT_FAMILIES) == bool(have[peers.CACHE_DIT])
        assert [row["target"] for row in m["matched"]] == [0.5]
        assert m["lookahead"] == 2  # enough for the smallest fraction asked for
        mem = m["calibration_memory"]  # measured before calibrating; the CPU always records forecasts
        assert mem["with_forecast_bytes"] == 5 * mem["one_output_each_fp32_bytes"] > 0 and "note" not in mem
        missing = m["perceptual"].get("missing", {})
        assert all("never downloaded" in why or "not installed" in why for why in missing.values())
        assert f"## {m['title']}" in md
    assert "Tiny random-weight pipelines" in md


def test_prompts_are_many_varied_and_ours():
    prompts = real_models.read_prompts()
    assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)
    assert all(len(p.split()) >= 5 for p in prompts)
    assert "same licence as the code" in real_models.PROMPTS.read_text()


def test_every_model_reaches_a_quarter_of_the_compute_with_the_default_lookahead():
    k = math.ceil(1 / min(real_models.FRACTIONS))
    for key, spec in real_models.MODELS.items():
        n = spec.steps
        least = (math.ceil((n - 1) / (k + 1)) + 1) / n  # first and last computed, k reuses in a row
        assert least <= 0.25 + 1e-9, key
        assert spec.tiny or key == "hunyuanvideo"


def test_bad_arguments_are_clean_errors(capsys):
    with pytest.raises(SystemExit):
        real_models.parse_args([])
    assert "name at least one model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        real_models.parse_args(["flux-2"])
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        real_models.parse_args(["flux.1-dev", "--path", "nope"])
    args = real_models.parse_args(
        ["flux.1-dev", "--call", "num_frames=81", "--call", "negative_prompt=blurry", "--quick"]
    )
    assert args.call == {"num_frames": 81, "negative_prompt": "blurry"} and args.peer_points == 2
    with pytest.raises(SystemExit, match="no tiny pipeline"):
        real_models.tiny_pipeline("hunyuanvideo", real_models.MODELS["hunyuanvideo"])


def test_perceptual_metrics_are_skipped_not_downloaded_when_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    found = perceptual_metrics(torch.device("cpu"), clip_model="stepcache-tests/no-such-clip")
    assert found.lpips is None and found.clip is None
    assert set(found.missing) == {"lpips", "clip_score"}
    assert "never downloaded" in found.missing["clip_score"]
    assert not list(tmp_path.iterdir())  # nothing fetched into the hub cache


def test_scores_per_sample_for_images_and_videos():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    assert per_sample_psnr(images, images).tolist() == [100.0] * 3
    noisy = (images + 0.01 * torch.randn_like(images)).clamp(0, 1)
    assert (per_sample_psnr(noisy, images) > 30).all() and (per_sample_ssim(noisy, images) < 1).all()
    video = torch.rand(2, 4, 3, 16, 16)  # (N, frames, C, H, W)
    assert per_sample_psnr(video, video).shape == (2,) and per_sample_ssim(video, video).shape == (2,)
