"""`stepcache bench`: the quick run end to end, its report schema, the peers' adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from model_state import model_state
from typer.testing import CliRunner

import stepcache
from stepcache import Schedule, StepCacheError
from stepcache.bench import peers, validate
from stepcache.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = runner.invoke(app, ["bench", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "bench.json").read_text())


def test_quick_bench_runs_end_to_end_and_validates(quick_report):
    out, report = quick_report
    validate(report)  # the documented schema (src/stepcache/bench/schema.json)
    assert (out / "bench.md").exists() and (out / "frontier-ddim-6.png").exists()
    sampler = report["quality"]["samplers"][0]
    families = {(p["library"], p["method"]) for p in sampler["points"]}
    assert {
        ("stepcache", "optimal (type)"),
        ("stepcache", "tuned"),
        ("baseline", "FORA+forecast"),
    } <= families
    for p in sampler["points"]:
        assert "error" in p or 0 < p["compute_fraction"] <= 1
    ours = [p for p in sampler["points"] if p["method"] == "optimal (type)"]
    assert all(p["compute_fraction"] == pytest.approx(p["schedule_compute_fraction"]) for p in ours)
    assert any(m["method"] == "uncached" and m["fd_samples"] == 20 for m in sampler["matched"])
    rows = report["speed"]["shapes"][0]["rows"]
    assert rows[0]["method"] == "uncached" and all(r["speedup_vs_ideal"] > 0 for r in rows)
    assert report["versions"]["torch"] == torch.__version__


def test_quick_bench_runs_the_installed_peers(quick_report):
    _, report = quick_report
    have = peers.available_peers()
    libraries = {p["library"] for p in report["quality"]["samplers"][0]["points"]}
    for lib in peers.LIBRARIES:
        assert (lib in libraries) == bool(have[lib])
        assert report["versions"][lib] == have[lib]
    if have[peers.SMOOTHCACHE]:
        same = [
            p["bit_identical_to_stepcache"]
            for p in report["quality"]["samplers"][0]["points"]
            if "bit_identical_to_stepcache" in p
        ]
        assert same and all(same)
    if not all(have.values()):
        assert any("pip install -e .[bench]" in s for s in report["skipped"])


def test_bench_without_peers_says_so(tmp_path):
    result = runner.invoke(
        app, ["bench", "--quick", "--no-peers", "--suite", "speed", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["skipped"] == ["all peers: --no-peers"] and "quality" not in report
    assert [r["method"] for r in report["speed"]["shapes"][0]["rows"]] == [
        "uncached",
        "stepcache",
        "stepcache+forecast",
    ]


def test_schema_rejects_a_malformed_report(quick_report):
    _, report = quick_report
    broken = copy.deepcopy(report)
    del broken["quality"]["samplers"][0]["points"][0]["library"]
    with pytest.raises(StepCacheError, match="does not follow its schema"):
        validate(broken)
    broken = copy.deepcopy(report)
    broken["quality"]["samplers"][0]["points"][0]["compute_fraction"] = 1.5
    with pytest.raises(StepCacheError, match="compute_fraction"):
        validate(broken)


def test_bad_bench_arguments_are_clean_errors(tmp_path):
    result = runner.invoke(app, ["bench", "--shape", "DiT-Z", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--shape must be among" in result.output
    result = runner.invoke(app, ["bench", "--sampler", "ddim", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "scheduler-steps" in result.output


def test_counted_fraction_matches_our_stats(tiny_pipe):
    model = tiny_pipe.transformer
    n = 6
    sched = Schedule(n, {"attn": (1, 0, 1, 0, 0, 1), "ff": (1, 1, 1, 0, 1, 1)})
    with peers.count_component_calls(model) as counts, stepcache.cache(tiny_pipe, sched) as handle:
        tiny_pipe([1], num_inference_steps=n, guidance_scale=1.0, output_type="pt")
    assert counts()["fraction"] == pytest.approx(handle.stats.compute_fraction)
    assert counts()["fraction"] == pytest.approx(sched.compute_fraction)


@pytest.mark.parametrize("name", ["FirstBlockCache", "TaylorSeer"])
def test_peer_adapters_restore_the_model_exactly(tiny_pipe, name):
    pytest.importorskip("diffusers")
    model = tiny_pipe.transformer
    before, params = model_state(model), {k: v.clone() for k, v in model.state_dict().items()}
    method = next(m for m in peers.peer_sweeps(6, len(model.transformer_blocks)) if m.name == name)
    with pytest.raises(RuntimeError, match="boom"), peers.apply_peer(method, model, num_inference_steps=6):
        tiny_pipe([1], num_inference_steps=6, guidance_scale=1.0, output_type="pt")
        raise RuntimeError("boom")
    assert model_state(model) == before
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
