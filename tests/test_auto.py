"""Caching without a schedule (stepcache.auto): the first generation of a key runs exactly uncached
while it is recorded, the calibration is stored in $STEPCACHE_HOME, later generations and new
processes cache from it, and a changed key never reuses the wrong calibration. On a tiny diffusers
pipeline and on the reference pipeline, through both doors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import stepcache
from stepcache import CacheConfig, Calibration, Schedule, SmoothCacheConfig, StepCacheError, StepCacheWarning
from stepcache.store import Store, key_id
from tests._helpers.pipelines import CASES as PIPELINES

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    monkeypatch.setenv("STEPCACHE_HOME", str(folder))
    return folder


@dataclass
class Case:
    name: str
    make: Any
    call: Any  # (pipe, steps, guidance) -> images

    def run(self, pipe, steps=STEPS, guidance=None, **kw):
        return self.call(pipe, steps, guidance, **kw)


def _tiny():
    from stepcache.integrations.models import tiny_dit_pipeline

    return tiny_dit_pipeline(num_layers=3)


def _tiny_call(pipe, steps, guidance, fail_at=None):
    kw = {} if guidance is None else {"guidance_scale": guidance}
    return pipe(
        class_labels=[1, 2],
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kw,
    ).images


def _reference():
    from stepcache.reference import ReferencePipeline

    return ReferencePipeline()


def _reference_call(pipe, steps, guidance):
    return pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=guidance, seed=3)


CASES = [Case("tiny-dit", _tiny, _tiny_call), Case("reference", _reference, _reference_call)]


def _fraction_since(handle, before) -> float:
    """The compute fraction of the generations run since the stats ``before``."""
    now = handle.stats
    computed = now.computed - before.computed
    calls = computed + now.reused - before.reused
    return computed / calls


def _open(door: str, pipe, **options):
    if door == "cache":
        return stepcache.cache(pipe, **options)
    return stepcache.apply_smoothcache(pipe.transformer, SmoothCacheConfig(**options))


@pytest.mark.parametrize("door", ["cache", "apply_smoothcache"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_calibrates_on_the_first_generation_then_caches(case, door, home, caplog):
    pipe = case.make()
    uncached = case.run(pipe)
    handle = _open(door, pipe, compute_fraction=0.5)  # (it adopts diffusers' verbosity: INFO after it)
    with caplog.at_level(logging.INFO, logger="stepcache"):
        try:
            first = case.run(pipe)
            assert handle.planner.last["action"] == "calibrate"
            assert torch.equal(first, uncached)  # exactly uncached while it is recorded
            files = list((home / "calibrations").glob("*.json"))
            assert len(files) == 1  # stored when the generation ended, not at the next one
            before = handle.stats
            second = case.run(pipe)
            assert handle.planner.last["action"] == "cache"
            assert _fraction_since(handle, before) == pytest.approx(0.5, abs=0.05)
            assert handle.running_schedule.meta["rule"] == "optimal"
            assert not torch.equal(second, uncached)
        finally:
            handle.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "stepcache.auto"]
    assert any("calibrating on this generation; caching from the next" in m for m in lines), lines
    assert any("caching" in m and "compute fraction 0.5" in m for m in lines), lines
    stored = Calibration.load(files[0])
    assert stored.num_steps == STEPS and stored.meta["store"]["key"]["steps"] == STEPS
    # The model is exactly as before.
    assert torch.equal(case.run(pipe), uncached)


@pytest.mark.parametrize("case", PIPELINES, ids=lambda c: c.name)
def test_text_and_video_pipelines(case, home):
    """Batched and split guidance, images and video: the same two generations."""
    pipe = case.build()

    def generate(**kw):
        return pipe(**{**case.inputs("a red cat", 0), "num_inference_steps": 4, **kw})[0]

    uncached = generate()
    with stepcache.cache(pipe, compute_fraction=0.5) as handle:
        assert torch.equal(generate(), uncached)
        key = handle.planner.last["key"]
        assert handle.planner.last["action"] == "calibrate"
        before = handle.stats
        generate()
        assert handle.planner.last["action"] == "cache"
        assert _fraction_since(handle, before) == pytest.approx(0.5, abs=0.1)
        generate(guidance_scale=case.call["guidance_scale"] + 1)
        assert handle.planner.last["action"] == "calibrate"
    assert key["steps"] == 4 and key["guidance"] == case.call["guidance_scale"]
    assert key["scheduler"] == type(pipe.scheduler).__name__
    if case.name == "wan":
        assert len(key["latent_shape"]) == 4 and key["latent_shape"][1] == 2  # channels, frames, h, w


def test_both_doors_share_one_key(home, tiny_pipe):
    """On the transformer alone, the key still holds the pipeline's scheduler, steps and guidance
    (read from the pipeline call that drives it), so the two doors find each other's calibrations."""
    with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
        _tiny_call(tiny_pipe, STEPS, None)
        key = handle.planner.last["key"]
    assert key["scheduler"] == "DDIMScheduler" and key["steps"] == STEPS and key["guidance"] == 4.0
    handle = stepcache.apply_smoothcache(tiny_pipe.transformer, SmoothCacheConfig(compute_fraction=0.5))
    try:
        _tiny_call(tiny_pipe, STEPS, None)
        assert handle.planner.last["action"] == "cache" and handle.planner.last["key"] == key
    finally:
        stepcache.remove_smoothcache(tiny_pipe.transformer)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_changed_step_count_or_guidance_scale_calibrates_anew(case, home):
    pipe = case.make()
    with stepcache.cache(pipe, compute_fraction=0.5) as handle:
        case.run(pipe)
        assert handle.planner.last["action"] == "calibrate"
        first_id = handle.planner.last["id"]
        for steps, guidance in ((STEPS + 1, None), (STEPS, 2.0)):
            uncached_here = _uncached(case, pipe, handle, steps, guidance)
            got = case.run(pipe, steps, guidance)
            last = handle.planner.last
            assert last["action"] == "calibrate" and last["id"] != first_id, (steps, guidance)
            assert torch.equal(got, uncached_here)  # the new key's first generation: exactly uncached
            case.run(pipe, steps, guidance)
            assert handle.planner.last["action"] == "cache"
            assert handle.running_schedule.num_steps == steps
        case.run(pipe)  # back to the first key: its own calibration
        assert handle.planner.last == {**handle.planner.last, "action": "cache", "id": first_id}
    keys = [Calibration.load(p).meta["store"]["key"] for p in (home / "calibrations").glob("*.json")]
    assert sorted((k["steps"], k["guidance"]) for k in keys)[0][0] == STEPS
    assert len(keys) == 3 and len({key_id(k) for k in keys}) == 3


def _uncached(case, pipe, handle, steps, guidance):
    """An uncached run of the same inputs, with the cache lifted for it."""
    handle.close()
    try:
        return case.run(pipe, steps, guidance)
    finally:
        handle.open()


def test_changed_weights_calibrate_anew(home, tiny_pipe):
    with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
        _tiny_call(tiny_pipe, STEPS, None)
        before = handle.planner.last["key"]
        with torch.no_grad():
            tiny_pipe.transformer.proj_out_2.bias.add_(0.01)  # a fine-tune, a fused LoRA
        _tiny_call(tiny_pipe, STEPS, None)
        last = handle.planner.last
        assert last["action"] == "calibrate" and last["id"] != key_id(before)
        assert last["key"]["weights_digest"] != before["weights_digest"]
        assert last["key"]["fingerprint"] == before["fingerprint"]


def _loop(model, tokens: int, batch: int = 2, steps: int = 10):
    """A plain denoising loop over ``tokens`` latent tokens (no pipeline: the step count is unknown)."""
    from tests._helpers.plain_models import timesteps

    x = torch.randn(batch, tokens, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) % 5
    for t in timesteps(steps):
        x = x - 0.05 * model(x, t.expand(batch), y)
    return x


def test_a_plain_denoising_loop_and_a_changed_latent_shape(home, plain_dit):
    uncached = _loop(plain_dit, 16)
    with stepcache.cache(plain_dit, compute_fraction=0.5) as handle:
        assert torch.equal(_loop(plain_dit, 16), uncached)
        assert handle.planner.last["action"] == "calibrate"
        cached = _loop(plain_dit, 16)
        assert handle.planner.last["action"] == "cache" and handle.running_schedule.num_steps == 10
        assert not torch.equal(cached, uncached)
        assert torch.equal(_loop(plain_dit, 16, batch=3)[:2], _loop(plain_dit, 16, batch=3)[:2])
        assert handle.planner.last["action"] == "cache"  # the batch size is not part of the key
        wider = _loop(plain_dit, 24)  # another latent shape: its own calibration
        assert handle.planner.last["action"] == "calibrate"
        assert handle.planner.last["key"]["latent_shape"] == [24, 4]
    handle.close()
    assert torch.equal(wider, _loop(plain_dit, 24))
    assert len(list((home / "calibrations").glob("*.json"))) == 2
    with stepcache.cache(plain_dit, compute_fraction=0.5) as handle:  # a new handle: steps unknown again
        assert torch.equal(_loop(plain_dit, 16), uncached)
        assert handle.planner.last["action"] == "calibrate"
        assert torch.equal(_loop(plain_dit, 16), cached)  # the stored calibration, found again


def test_calibration_runs_records_several_generations(home, tiny_pipe):
    uncached = _tiny_call(tiny_pipe, STEPS, None)
    with stepcache.cache(tiny_pipe, compute_fraction=0.5, calibration_runs=2) as handle:
        for _ in range(2):
            assert torch.equal(_tiny_call(tiny_pipe, STEPS, None), uncached)
            assert handle.planner.last["action"] == "calibrate"
        _tiny_call(tiny_pipe, STEPS, None)
        assert handle.planner.last["action"] == "cache"
    (path,) = (home / "calibrations").glob("*.json")
    assert Calibration.load(path).num_samples == 2


def test_an_interrupted_calibration_is_not_stored(home, tiny_pipe):
    with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
        with pytest.raises(RuntimeError, match="stop"):
            _raise_mid_generation(tiny_pipe)
        assert handle.planner.last["action"] == "calibrate"
        assert not list((home / "calibrations").glob("*.json"))
        uncached = _tiny_call(tiny_pipe, STEPS, None)
        assert handle.planner.last["action"] == "calibrate"
        _tiny_call(tiny_pipe, STEPS, None)
        assert handle.planner.last["action"] == "cache"
    handle.close()
    assert torch.equal(_tiny_call(tiny_pipe, STEPS, None), uncached)


def _raise_mid_generation(pipe):
    """Make the transformer raise at its fourth call of the generation."""
    calls = {"n": 0}
    original = pipe.transformer.forward

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("stop")
        return original(*args, **kwargs)

    pipe.transformer.forward = forward
    try:
        _tiny_call(pipe, STEPS, None)
    finally:
        del pipe.transformer.forward


def test_a_corrupt_or_mismatched_entry_is_refused_and_recalibrated(home, tiny_pipe):
    with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
        _tiny_call(tiny_pipe, STEPS, None)
        key = handle.planner.last["key"]
    path = Store().path(key)
    good = path.read_text()
    for bad in (good[: len(good) // 2], good.replace(f'"steps": {STEPS}', f'"steps": {STEPS + 1}')):
        path.write_text(bad)
        with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
            with pytest.warns(StepCacheWarning, match="refusing the stored calibration"):
                uncached = _tiny_call(tiny_pipe, STEPS, None)
            assert handle.planner.last["action"] == "calibrate"
        assert Calibration.load(path).meta["store"]["key"] == key  # replaced by a valid entry
        handle.close()
        assert torch.equal(_tiny_call(tiny_pipe, STEPS, None), uncached)


def test_an_unwritable_store_warns_and_caches_in_this_process(tmp_path, monkeypatch, tiny_pipe):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the store's folder should be")
    monkeypatch.setenv("STEPCACHE_HOME", str(blocker))
    with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
        with pytest.warns(StepCacheWarning, match="serves this process only"):
            _tiny_call(tiny_pipe, STEPS, None)
        _tiny_call(tiny_pipe, STEPS, None)
        assert handle.planner.last["action"] == "cache"


def test_the_models_own_folder_comes_first(home, tmp_path, tiny_pipe):
    """A stepcache_schedule.json (for this step count) or a calibration recorded for this key in the
    pipeline's folder is used from the first generation, before the store."""
    with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
        _tiny_call(tiny_pipe, STEPS, None)
        entry = handle.planner.last["id"]
    exported = Store().export(entry, tmp_path / "model")
    Store().remove(entry)
    tiny_pipe.register_to_config(_name_or_path=str(exported))
    with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
        _tiny_call(tiny_pipe, STEPS, None)
        assert handle.planner.last["action"] == "cache"
        assert "the calibration in" in handle.planner.last["source"]
    assert not list((home / "calibrations").glob("*.json"))  # nothing recorded
    plan = (1, 0, 1, 0, 1, 1)
    Schedule(STEPS, {"attn": plan, "ff": plan}).save_pretrained(exported)
    with stepcache.cache(tiny_pipe, compute_fraction=0.5) as handle:
        _tiny_call(tiny_pipe, STEPS, None)
        assert handle.running_schedule.plans == {"attn": plan, "ff": plan}
        _tiny_call(tiny_pipe, STEPS + 2, None)  # no shipped schedule for 8 steps: the store
        assert handle.planner.last["action"] == "calibrate"


def test_options_of_caching_without_a_schedule(plain_dit):
    schedule = Schedule(10, {"attn": (1,) * 10})
    for make in (
        lambda **kw: stepcache.cache(plain_dit, schedule, **kw),
        lambda **kw: SmoothCacheConfig(schedule, **kw),
    ):
        with pytest.raises(StepCacheError, match="for caching without a schedule"):
            make(compute_fraction=0.5)
        with pytest.raises(StepCacheError, match="for caching without a schedule"):
            make(calibration_runs=2)
    for bad, match in (
        ({"compute_fraction": 0}, "compute_fraction must be in"),
        ({"compute_fraction": 1.5}, "compute_fraction must be in"),
        ({"compute_fraction": True}, "compute_fraction must be in"),
        ({"calibration_runs": 0}, "calibration_runs must be a positive"),
        ({"calibration_runs": 1.5}, "calibration_runs must be a positive"),
    ):
        for make in (CacheConfig, SmoothCacheConfig, lambda **kw: stepcache.cache(plain_dit, **kw)):
            with pytest.raises(StepCacheError, match=match):
                make(**bad)
    plan = stepcache.GuidanceReuse(10, {"attn": (False,) * 10})
    with pytest.raises(StepCacheError, match="guidance= is a plan for one schedule"):
        stepcache.cache(plain_dit, guidance=plan)
    assert SmoothCacheConfig().schedule is None and SmoothCacheConfig().compute_fraction is None


# ---------------------------------------------------------------- processes
_SCRIPT = textwrap.dedent(
    """
    import json, pathlib, sys, time, torch
    import stepcache
    torch.set_num_threads(1)
    from tests.test_auto import CASES
    case = {c.name: c for c in CASES}[sys.argv[1]]
    pipe = case.make()
    if len(sys.argv) > 3:  # start together: say ready, wait for the go
        go = pathlib.Path(sys.argv[3])
        pathlib.Path(sys.argv[2] + ".ready").touch()
        while not go.exists():
            time.sleep(0.002)
    with stepcache.cache(pipe, compute_fraction=0.5) as handle:
        images = case.run(pipe)
    torch.save(images, sys.argv[2])
    print(json.dumps({"action": handle.planner.last["action"], "fraction": handle.stats.compute_fraction}))
    """
)


def _process(case: str, home: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "STEPCACHE_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, case, str(out), *extra],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_new_process_caches_from_its_first_generation(case, home, tmp_path):
    pipe = case.make()
    with stepcache.cache(pipe, compute_fraction=0.5) as handle:
        case.run(pipe)
        cached = case.run(pipe)
    assert handle.planner.last["action"] == "cache"
    got = _result(_process(case.name, home, tmp_path / "images.pt"))
    assert got["action"] == "cache" and got["fraction"] == pytest.approx(0.5, abs=0.05)
    assert torch.equal(torch.load(tmp_path / "images.pt"), cached)


@pytest.mark.slow
def test_two_processes_calibrating_one_key_leave_one_valid_entry(home, tmp_path):
    go = tmp_path / "go"
    outs = [tmp_path / f"images{i}.pt" for i in range(2)]
    procs = [_process("tiny-dit", home, out, str(go)) for out in outs]
    deadline = time.monotonic() + 300
    while not all(Path(f"{out}.ready").exists() for out in outs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not start"
        time.sleep(0.01)
    go.touch()
    results = [_result(p) for p in procs]
    # Both look the key up when their generation starts, before either has stored anything (unless
    # the machine is so loaded that one finished first: then it cached, which is right too).
    assert "calibrate" in [r["action"] for r in results]
    images = [torch.load(out) for out in outs]
    for r, got in zip(results, images, strict=True):
        if r["action"] == "calibrate":
            assert torch.equal(got, _tiny_call(_tiny(), STEPS, None))
    entries = Store().entries()
    assert len(entries) == 1 and entries[0].problem is None
    assert len(list((home / "calibrations").iterdir())) == 1  # no temporary file left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Calibration.load(entries[0].path).num_steps == STEPS


@pytest.mark.slow
def test_a_compiled_transformer_caches_from_a_stored_calibration(home):
    """A calibration is recorded on eager calls only: on a compiled transformer the generation runs
    uncached with a warning, and a calibration stored by an eager run serves it."""
    from stepcache.integrations.models import tiny_dit_pipeline

    compiled = tiny_dit_pipeline(num_layers=2)
    for block in compiled.transformer.transformer_blocks:
        block.compile(backend="aot_eager")
    uncached = _tiny_call(compiled, 4, None)
    with stepcache.cache(compiled, compute_fraction=0.5) as handle:
        with pytest.warns(StepCacheWarning, match="the transformer is compiled"):
            assert torch.equal(_tiny_call(compiled, 4, None), uncached)
        assert torch.equal(_tiny_call(compiled, 4, None), uncached)
        assert handle.planner.last["action"] == "uncached" and handle.stats.compute_fraction == 1
    assert not list((home / "calibrations").glob("*.json"))
    eager = tiny_dit_pipeline(num_layers=2)
    with stepcache.cache(eager, compute_fraction=0.5):
        _tiny_call(eager, 4, None)
        expected = _tiny_call(eager, 4, None)
    with stepcache.cache(compiled, compute_fraction=0.5) as handle:
        got = _tiny_call(compiled, 4, None)
        assert handle.planner.last["action"] == "cache"
    assert torch.allclose(got, expected, atol=1e-5)
