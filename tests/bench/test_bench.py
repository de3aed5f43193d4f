"""The benchmark harness (benchmarks/, not installed with the package): the quick run end to end
through `benchmarks/bench.py`, its report schema, the peers' adapters."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import stepcache
from benchmarks import bench
from benchmarks.harness import peers, validate
from stepcache import Schedule, StepCacheError
from tests._helpers.model_state import model_state

ROOT = Path(__file__).resolve().parents[2]
# One pytest-xdist worker runs the module, so the quick benchmark (quick_report) runs once.
pytestmark = pytest.mark.xdist_group("bench")


def run_bench(*argv: str) -> int:
    try:
        bench.main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert run_bench("--quick", "--threads", "1", "--out", str(out)) == 0
    return out, json.loads((out / "bench.json").read_text())


@pytest.mark.slow
def test_quick_bench_runs_end_to_end_and_validates(quick_report):
    out, report = quick_report
    validate(report)  # the documented schema (benchmarks/harness/schema.json)
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


@pytest.mark.slow
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
        assert any("pip install -r benchmarks/requirements.txt" in s for s in report["skipped"])


def test_bench_without_peers_says_so(tmp_path, capsys):
    assert (
        run_bench("--quick", "--no-peers", "--suite", "speed", "--threads", "1", "--out", str(tmp_path)) == 0
    )
    assert "# stepcache bench (quick smoke run)" in capsys.readouterr().out  # prints bench.md
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["skipped"] == ["all peers: --no-peers"] and "quality" not in report
    assert [r["method"] for r in report["speed"]["shapes"][0]["rows"]] == [
        "uncached",
        "stepcache",
        "stepcache+forecast",
    ]


@pytest.mark.slow
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


def test_bad_bench_arguments_are_clean_errors(tmp_path, capsys):
    assert run_bench("--shape", "DiT-Z", "--out", str(tmp_path)) == 2
    assert "--shape must be among" in capsys.readouterr().err
    assert run_bench("--sampler", "ddim", "--out", str(tmp_path)) == 2
    assert "scheduler-steps" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.slow
def test_bench_script_runs_from_the_repository_root():
    # `python benchmarks/bench.py` (what `make bench` runs) finds the harness without pytest's path.
    result = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--rerun" in result.stdout


def test_the_library_does_not_ship_the_harness():
    """No module of the package imports a peer library or the harness. diffusers' hook registry
    (HookRegistry, ModelHook) is the one piece of diffusers.hooks it uses: the front door that
    installs stepcache like diffusers' own hooks, not another cache."""
    import ast

    import stepcache.cli

    src = Path(stepcache.__file__).parent
    assert not (src / "bench").exists()
    assert "bench" not in {c.name for c in stepcache.cli.app.registered_commands}
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [(node.module, [a.name for a in node.names])]
            else:
                continue
            for module, names in modules:
                root = module.split(".")[0]
                where = f"{path.relative_to(src)} imports {module}"
                assert root not in ("cache_dit", "SmoothCache", "benchmarks"), where
                if module.startswith("diffusers.hooks"):
                    assert names is not None and set(names) <= {"HookRegistry", "ModelHook"}, where


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


def _first_block_cache(model, n):
    return next(m for m in peers.peer_sweeps(n, len(model.transformer_blocks)) if m.name == "FirstBlockCache")


def test_a_generation_longer_than_set_up_is_a_peer_error(tiny_pipe):
    # The peers follow steps with stepcache's own StepTracker; its ScheduleLengthError becomes a PeerError.
    model = tiny_pipe.transformer
    before = model_state(model)
    with (
        pytest.raises(peers.PeerError, match="num_inference_steps=4"),
        peers.apply_peer(_first_block_cache(model, 4), model, num_inference_steps=4),
    ):
        tiny_pipe([1], num_inference_steps=6, guidance_scale=1.0, output_type="pt")
    assert model_state(model) == before


def test_a_shorter_generation_warns_once_and_each_generation_starts_afresh(tiny_pipe, caplog):
    model = tiny_pipe.transformer
    method = _first_block_cache(model, 6)

    def run(steps):
        return tiny_pipe(
            [1],
            num_inference_steps=steps,
            guidance_scale=1.0,
            output_type="pt",
            generator=torch.manual_seed(0),
        ).images

    with (
        warnings.catch_warnings(record=True) as caught,
        peers.apply_peer(method, model, num_inference_steps=6),
    ):
        warnings.simplefilter("always")
        first = run(6)
        run(3)
        run(3)
        again = run(6)
    assert [str(w.message) for w in caught if "set up for" in str(w.message)] == [
        "a generation ran 3 steps but the peer was set up for num_inference_steps=6; step-indexed settings "
        "(warm-up, MagCache ratios, SmoothCache schedules) are then misaligned."
    ]
    assert torch.equal(first, again)  # the peer's state was reset at each new generation
    assert not [r for r in caplog.records if r.name.startswith("stepcache")]
