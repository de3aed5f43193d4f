"""Guidance-aware caching: per-branch calibration and the two stand-ins for the unconditional branch
(its last output, or the conditional output plus the kept guidance difference), on the reference DiT
under batched classifier-free guidance and with the branches as two calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stepcache
from stepcache import Schedule, reference
from stepcache.calibration import GuidanceCalibration, calibrate_guidance
from stepcache.errors import CalibrationError, ScheduleError, StepCacheError
from stepcache.guidance import KINDS, GuidanceReuse
from stepcache.policies import guidance_for_compute_fraction, guidance_from_calibration, tune_guidance
from tests._helpers.model_state import model_state as snapshot

STEPS, GUIDANCE, N = 6, 3.0, 4
SKIP = (False, False, True, False, True, True)  # steps 4 and 5: the second stands in at gap 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return reference.load_model()


def batched(model, n=N, seed=0):
    return reference.sample(
        model,
        torch.arange(n) % 10,
        scheduler="dpm",
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=seed,
    )


def split(model, n=N, seed=0):
    """The same sampler with the two branches as two calls per step (conditional first)."""
    sched = reference.make_scheduler("dpm", STEPS, train_config=model.stepcache_train_scheduler)
    labels = torch.arange(n) % 10
    null = torch.full_like(labels, reference.NULL_CLASS)
    x = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((n,), int(t), dtype=torch.long)
            cond = model(hidden_states=x, timestep=tt, class_labels=labels).sample
            uncond = model(hidden_states=x, timestep=tt, class_labels=null).sample
            eps = uncond + GUIDANCE * (cond - uncond)
            x = sched.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def all_compute():
    return Schedule(STEPS, {"attn": (1,) * STEPS, "ff": (1,) * STEPS})


def record_ff(model):
    """Per call of block 0's feed-forward: its output (through the cache) and the batch it ran on."""
    ff = model.transformer_blocks[0].ff
    outs, rows = [], []
    hooks = [
        ff.register_forward_hook(lambda _m, _a, out: outs.append(out.detach().clone())),
        ff.net[0].proj.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0])),
    ]
    return outs, rows, hooks


@pytest.mark.parametrize("mode", ["difference", "reuse"])
def test_stand_in_is_what_the_mode_says(model, mode):
    plan = GuidanceReuse(STEPS, {"ff": SKIP}, mode=mode, layout="cond-first")
    before = snapshot(model)
    outs, rows, hooks = record_ff(model)
    try:
        with stepcache.cache(model, all_compute(), guidance=plan) as handle:
            batched(model)
    finally:
        for h in hooks:
            h.remove()
    assert snapshot(model) == before
    assert rows == [2 * N if not s else N for s in SKIP]  # the conditional half only, where planned
    for s in (2, 4, 5):
        last = 1 if s == 2 else 3  # the last full computation before s
        cond, uncond = outs[s][:N], outs[s][N:]
        want = outs[last][N:] if mode == "reuse" else cond + (outs[last][N:] - outs[last][:N])
        torch.testing.assert_close(uncond, want, rtol=0, atol=1e-6)
    layers = len(model.transformer_blocks)
    assert handle.stats.halved == 3 * layers and handle.stats.by_type["attn"].halved == 0
    # an all-compute schedule keeps nothing; the stand-ins keep one half-batch output per layer
    assert handle.stats.by_type["ff"].peak_stored_bytes == layers * outs[0][:N].nbytes
    assert handle.stats.by_type["attn"].peak_stored_bytes == 0 and handle.stats.stored_bytes == 0
    comps = stepcache.discover(model)
    assert handle.stats.compute_fraction == pytest.approx(plan.compute_fraction(all_compute(), comps))
    assert handle.stats.compute_fraction == pytest.approx(1 - 3 / (2 * STEPS * 2))


def test_difference_beats_plain_branch_reuse_and_split_equals_batched(model):
    base = batched(model)
    images = {}
    for mode in ("difference", "reuse"):
        plan = GuidanceReuse(STEPS, {"attn": SKIP, "ff": SKIP}, mode=mode)
        with stepcache.cache(model, all_compute(), guidance=plan):
            images[mode] = batched(model)
        split_plan = GuidanceReuse(STEPS, {"attn": SKIP, "ff": SKIP}, mode=mode, layout="split")
        with stepcache.cache(model, all_compute(), guidance=split_plan) as handle:
            two_calls = split(model)
        torch.testing.assert_close(two_calls, images[mode], rtol=0, atol=2e-4)
        # two calls: a stand-in is a whole call not computed, counted as reuse
        assert handle.stats.halved == 0 and handle.stats.reused == 3 * 2 * len(model.transformer_blocks)
    err = {m: float((x - base).abs().mean()) for m, x in images.items()}
    assert 0 < err["difference"] < err["reuse"]


def test_calibrate_guidance_measures_each_branch(model, tmp_path):
    gcal = calibrate_guidance(model, lambda: [batched(model, seed=100 + i) for i in range(2)], progress=False)
    assert gcal.num_steps == STEPS and gcal.num_samples == 2 and gcal.layout == "cond-first"
    name = "transformer_blocks.0.ff"
    e = gcal.errors[name]
    assert e.shape == (STEPS, 2, len(KINDS))
    assert np.isnan(e[0]).all() and np.isnan(e[1, 1]).all() and np.isfinite(e[2:]).all()
    assert (e[2:] > 0).all()
    summary = gcal.summary()
    assert set(summary) == {"attn", "ff"} and set(summary["ff"]) == set(KINDS)
    again = GuidanceCalibration.load(gcal.save(tmp_path / "g.json"))
    np.testing.assert_array_equal(again.errors[name], e)
    # the same generations as two calls per step measure the same errors
    gsplit = calibrate_guidance(
        model, lambda: [split(model, seed=100 + i) for i in range(2)], layout="split", progress=False
    )
    np.testing.assert_allclose(gsplit.errors[name], e, rtol=1e-3, atol=1e-6)


def test_plan_from_calibration_and_for_compute_fraction(model):
    gcal = calibrate_guidance(model, lambda: batched(model, seed=7), progress=False)
    sched = Schedule(STEPS, {"attn": (1, 1, 0, 1, 1, 1), "ff": (1, 1, 1, 1, 0, 1)})
    everywhere = guidance_from_calibration(gcal, sched, np.inf)
    ff = everywhere.plans["transformer_blocks.0.ff"]
    # stand in while the last full computation is within the lookahead (2 steps): s 1 and 2 (from 0), 5 (from 3)
    assert ff == (False, True, True, False, False, True)
    assert not any(
        s
        for s, v in zip(everywhere.plans["transformer_blocks.0.attn1"], (1, 1, 0, 1, 1, 1), strict=True)
        if not v
    )
    assert not any(any(p) for p in guidance_from_calibration(gcal, sched, 0.0).plans.values())
    comps = stepcache.discover(model)
    target = 0.8
    plan = guidance_for_compute_fraction(gcal, sched, target)
    assert plan.compute_fraction(sched, comps) <= target
    with stepcache.cache(model, sched, guidance=plan) as handle:
        batched(model)
    assert handle.stats.compute_fraction == pytest.approx(plan.compute_fraction(sched, comps))
    with pytest.raises(ScheduleError, match="lower fraction"):
        guidance_for_compute_fraction(gcal, sched, 0.3)


def test_bad_input_gets_clear_errors_and_leaves_the_model_alone(model, tmp_path):
    before = snapshot(model)
    ok = GuidanceReuse(STEPS, {"ff": SKIP})
    with pytest.raises(ScheduleError, match="layout"):
        GuidanceReuse(STEPS, {"ff": SKIP}, layout="interleaved")
    with pytest.raises(ScheduleError, match="has 2 steps"):
        GuidanceReuse(STEPS, {"ff": (True, False)})
    with pytest.raises(ScheduleError, match="steps"):
        stepcache.cache(model, Schedule(4, {"ff": (1, 1, 1, 1)}), guidance=ok)
    with pytest.raises(StepCacheError, match="storage_dtype"):
        stepcache.cache(model, all_compute(), guidance=ok, storage_dtype="bf16")
    with pytest.raises(StepCacheError, match="resample"):
        stepcache.cache(model, all_compute(), guidance=ok, on_length_mismatch="resample")
    with pytest.raises(ScheduleError, match="match none"):
        stepcache.cache(model, all_compute(), guidance=GuidanceReuse(STEPS, {"norm9": SKIP}))
    with pytest.raises(StepCacheError, match="GuidanceReuse"):
        stepcache.cache(model, all_compute(), guidance={"ff": SKIP})
    with pytest.raises(CalibrationError, match="even batch"):
        calibrate_guidance(
            model,
            lambda: reference.sample(model, torch.arange(3), scheduler="dpm", num_inference_steps=STEPS),
            progress=False,
        )
    assert snapshot(model) == before
    # a plan file works where the plan does
    path = ok.save(tmp_path / "guidance.json")
    with stepcache.cache(model, all_compute(), guidance=path) as handle:
        batched(model)
    assert handle.stats.halved == 3 * len(model.transformer_blocks)
    assert GuidanceReuse.load(path) == ok


def test_tune_guidance_chooses_in_closed_loop(model):
    cal = stepcache.calibrate(model, lambda: batched(model, seed=11), progress=False)
    gcal = calibrate_guidance(model, lambda: batched(model, seed=11), progress=False)
    replay = lambda: batched(model, n=6, seed=5)  # noqa: E731
    start = stepcache.optimal_schedule(cal, 0.5)
    sched, plan = tune_guidance(
        model,
        replay,
        0.5,
        calibration=cal,
        guidance=gcal,
        schedule=start,
        raise_by=(0.17, 0.34),
        progress=False,
    )
    info = sched.meta["guidance_tuning"]
    assert set(info["scores"]) >= {"plain"} and len(info["scores"]) >= 2
    assert (plan is None) == (info["chosen"] == "plain")
    comps = stepcache.discover(model)
    frac = sched.compute_fraction if plan is None else plan.compute_fraction(sched, comps)
    assert frac <= 0.5 + 1e-9
    with stepcache.cache(model, sched, guidance=plan) as handle:
        batched(model)
    assert handle.stats.compute_fraction == pytest.approx(frac)
    plain, none = tune_guidance(
        model, replay, 0.5, calibration=cal, guidance=gcal, schedule=start, raise_by=(), progress=False
    )
    assert none is None and plain.meta["guidance_tuning"]["chosen"] == "plain"


@pytest.mark.parametrize(
    "case, layout",
    [("pixart_alpha", "uncond-first"), ("sd3", "uncond-first"), ("wan", "split"), ("flux_true_cfg", "split")],
)
def test_diffusers_pipelines_batched_and_split(case, layout):
    """Real pipelines: PixArt and SD3 stack [uncond; cond] in one call (cross-attention and joint
    attention take batched text states, SD3's attention returns a pair), Wan and Flux true CFG make
    two calls per step (conditional first)."""
    from tests._helpers.pipelines import CASES

    spec = next(c for c in CASES if c.name == case)
    pipe = spec.build()
    steps = 5
    inputs = [spec.inputs("a red cat", seed=s) for s in (1, 2)]
    gcal = calibrate_guidance(pipe, inputs=inputs, num_inference_steps=steps, layout=layout, progress=False)
    assert gcal.layout == layout and np.isfinite(gcal.errors[next(iter(gcal.errors))][2:]).all()
    sched = Schedule(steps, {"*": (1,) * steps})
    plan = guidance_from_calibration(gcal, sched, np.inf)
    before = snapshot(pipe.transformer)
    base = pipe(**spec.inputs("a blue dog on grass", seed=3), num_inference_steps=steps)[0]
    with stepcache.cache(pipe, sched, guidance=plan) as handle:
        out = pipe(**spec.inputs("a blue dog on grass", seed=3), num_inference_steps=steps)[0]
    assert snapshot(pipe.transformer) == before
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    stats = handle.stats
    comps = stepcache.discover(pipe)
    assert stats.compute_fraction == pytest.approx(plan.compute_fraction(sched, comps))
    if layout == "split":
        assert stats.halved == 0 and stats.reused > 0
    else:
        assert stats.halved > 0 and stats.reused == 0
    # no stand-in anywhere: exactly the uncached run
    with stepcache.cache(pipe, sched, guidance=guidance_from_calibration(gcal, sched, 0.0)):
        again = pipe(**spec.inputs("a blue dog on grass", seed=3), num_inference_steps=steps)[0]
    torch.testing.assert_close(again, base, rtol=0, atol=0)


def test_compiled_blocks_get_a_clear_error(model):
    """Halving the batch inside a compiled graph would recompile it: refused after the first call."""
    torch._dynamo.reset()
    plan = GuidanceReuse(STEPS, {"ff": SKIP})
    before = snapshot(model)
    try:
        for block in model.transformer_blocks:
            block.compile(backend="aot_eager")
        with (
            pytest.raises(StepCacheError, match="eager calls only"),
            stepcache.cache(model, all_compute(), guidance=plan),
        ):
            batched(model)
    finally:
        for block in model.transformer_blocks:
            block.__dict__.pop("_compiled_call_impl", None)  # back to eager for the other tests
        torch._dynamo.reset()
    assert snapshot(model) == before


def test_guidance_calibration_refuses_generations_without_guidance(model):
    """Guidance scale 1 with an even batch: no half is an unconditional branch (issue 24)."""
    with pytest.raises(CalibrationError, match="no two equal halves"):
        calibrate_guidance(
            model,
            lambda: reference.sample(
                model, torch.arange(N) % 10, scheduler="dpm", num_inference_steps=STEPS, guidance_scale=1.0
            ),
            progress=False,
        )
