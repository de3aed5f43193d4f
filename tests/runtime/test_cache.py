"""Runtime cache: exactness, step/branch bookkeeping, restoring the model, errors."""

from __future__ import annotations

import pytest
import torch

import stepcache
from stepcache import Schedule, ScheduleError, ScheduleLengthError, StepCacheError
from stepcache.policies import fora, from_calibration
from tests._helpers.dit_runs import generate as gen_pipe
from tests._helpers.model_state import model_state
from tests._helpers.plain_models import reference_forward, sample

N = 10
PLAN = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)  # reuse runs of 2 and 2, and 1


def fixed(plan=PLAN, types=("attn", "ff")):
    return Schedule(len(plan), dict.fromkeys(types, plan))


def test_alpha_zero_is_bit_identical_on_dit_pipeline(tiny_pipe):
    ref = gen_pipe(tiny_pipe)
    before = model_state(tiny_pipe.transformer)
    cal = stepcache.calibrate(
        tiny_pipe, inputs=[{"class_labels": [3]}], num_inference_steps=N, progress=False
    )
    schedule = from_calibration(cal, alpha=0.0)
    assert schedule.compute_fraction == 1.0
    with stepcache.cache(tiny_pipe, schedule) as handle:
        out = gen_pipe(tiny_pipe)
    assert torch.equal(out, ref)
    assert handle.stats.reused == 0 and handle.stats.computed == 3 * 2 * N
    assert model_state(tiny_pipe.transformer) == before
    assert torch.equal(gen_pipe(tiny_pipe), ref)


def test_alpha_zero_is_bit_identical_on_plain_dit(plain_dit):
    y = torch.tensor([0, 3])
    ref = sample(plain_dit, y, N, guidance=2.0)
    cal = stepcache.calibrate(plain_dit, lambda: sample(plain_dit, y, N, guidance=2.0), progress=False)
    with stepcache.cache(plain_dit, from_calibration(cal, 0.0)):
        out = sample(plain_dit, y, N, guidance=2.0)
    assert torch.equal(out, ref)


def test_reuse_schedule_matches_hand_written_reference(plain_dit):
    y = torch.tensor([1, 4])
    store: dict = {}
    plans = {"attn": PLAN, "ff": PLAN}
    ref = sample(
        plain_dit,
        y,
        N,
        forward=lambda x, t, yy, s, b: reference_forward(plain_dit, x, t, yy, s, plans, store),
    )
    with stepcache.cache(plain_dit, fixed()) as handle:
        out = sample(plain_dit, y, N)
    assert torch.equal(out, ref)
    # Exactly the scheduled calls ran: 3 layers x 2 types x sum(PLAN).
    assert handle.stats.computed == 3 * 2 * sum(PLAN)
    assert handle.stats.reused == 3 * 2 * (N - sum(PLAN))
    assert handle.stats.compute_fraction == pytest.approx(fixed().compute_fraction)
    assert not torch.equal(out, sample(plain_dit, y, N))  # caching did change something


def test_component_calls_are_really_skipped(plain_dit):
    calls = []
    hook = plain_dit.blocks[1].mlp.fc1.register_forward_hook(lambda *a: calls.append(1))
    with stepcache.cache(plain_dit, fixed()):
        sample(plain_dit, torch.tensor([0]), N)
    hook.remove()
    assert len(calls) == sum(PLAN)


def test_batched_guidance_follows_the_schedule(plain_dit):
    y = torch.tensor([2])
    store: dict = {}
    plans = {"attn": PLAN, "ff": PLAN}
    ref = sample(
        plain_dit,
        y,
        N,
        guidance=3.0,
        forward=lambda x, t, yy, s, b: reference_forward(plain_dit, x, t, yy, s, plans, store),
    )
    with stepcache.cache(plain_dit, fixed()) as handle:
        out = sample(plain_dit, y, N, guidance=3.0)
    assert torch.equal(out, ref)
    assert handle.stats.computed == 3 * 2 * sum(PLAN)


def test_split_guidance_branches_keep_separate_outputs(plain_dit):
    y = torch.tensor([2, 3])
    plans = {"attn": PLAN, "ff": PLAN}
    stores: dict = {0: {}, 1: {}}
    ref = sample(
        plain_dit,
        y,
        N,
        guidance=3.0,
        split=True,
        forward=lambda x, t, yy, s, b: reference_forward(plain_dit, x, t, yy, s, plans, stores[b]),
    )
    shared: dict = {}
    mixed = sample(
        plain_dit,
        y,
        N,
        guidance=3.0,
        split=True,
        forward=lambda x, t, yy, s, b: reference_forward(plain_dit, x, t, yy, s, plans, shared),
    )
    assert not torch.equal(ref, mixed)  # the check below can tell the two apart
    with stepcache.cache(plain_dit, fixed()) as handle:
        out = sample(plain_dit, y, N, guidance=3.0, split=True)
    assert torch.equal(out, ref)
    # Both branches follow the schedule: two calls per step.
    assert handle.stats.computed == 2 * 3 * 2 * sum(PLAN)


def test_split_guidance_on_diffusers_transformer(tiny_pipe):
    """Cond and uncond as two calls of the diffusers DiT at the same timestep."""
    tr = tiny_pipe.transformer
    sched = tiny_pipe.scheduler

    def run():
        sched.set_timesteps(N)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in sched.timesteps:
            tt = t.expand(1)
            cond = tr(x, timestep=tt, class_labels=torch.tensor([5])).sample[:, :4]
            unc = tr(x, timestep=tt, class_labels=torch.tensor([1000])).sample[:, :4]
            x = sched.step(unc + 3.0 * (cond - unc), t, x).prev_sample
        return x

    ref = run()
    with stepcache.cache(tiny_pipe, Schedule(N, {"attn": (1,) * N, "ff": (1,) * N})) as h:
        assert torch.equal(run(), ref)
    assert h.stats.computed == 2 * 3 * 2 * N
    with stepcache.cache(tiny_pipe, fixed()) as h:
        out = run()
    assert h.stats.computed == 2 * 3 * 2 * sum(PLAN)
    assert not torch.equal(out, ref)


def test_two_generations_in_one_block_are_identical(tiny_pipe):
    with stepcache.cache(tiny_pipe, fixed()) as handle:
        a = gen_pipe(tiny_pipe)
        b = gen_pipe(tiny_pipe)
    assert torch.equal(a, b)
    assert handle.stats.generations == 2
    assert handle.stats.computed == 2 * 3 * 2 * sum(PLAN)


def test_exception_inside_the_model_leaves_no_stale_state(plain_dit):
    y = torch.tensor([1])
    with stepcache.cache(plain_dit, fixed()):
        fresh = sample(plain_dit, y, N, seed=1)
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")

    with stepcache.cache(plain_dit, fixed()):
        hook = plain_dit.blocks[2].attn.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            sample(plain_dit, y, N, seed=7)
        hook.remove()
        again = sample(plain_dit, y, N, seed=1)
    assert torch.equal(again, fresh)


def test_interruption_between_steps_leaves_no_stale_state(plain_dit):
    y = torch.tensor([1])
    with stepcache.cache(plain_dit, fixed()):
        fresh = sample(plain_dit, y, N, seed=1)
    with stepcache.cache(plain_dit, fixed()):
        with pytest.raises(RuntimeError, match="interrupted"):
            sample(plain_dit, y, N, seed=7, fail_at=4)
        again = sample(plain_dit, y, N, seed=1)
    assert torch.equal(again, fresh)


def test_model_is_restored_even_if_generation_raises(plain_dit):
    before = model_state(plain_dit)
    ref = sample(plain_dit, torch.tensor([0]), N)
    with pytest.raises(RuntimeError), stepcache.cache(plain_dit, fixed()):
        sample(plain_dit, torch.tensor([0]), N, fail_at=3)
    assert model_state(plain_dit) == before
    assert torch.equal(sample(plain_dit, torch.tensor([0]), N), ref)


def test_existing_instance_forward_is_preserved(plain_dit):
    mlp = plain_dit.blocks[0].mlp
    custom = mlp.forward  # a bound method stored on the instance, as other libraries do
    mlp.forward = custom
    with stepcache.cache(plain_dit, fixed()):
        assert mlp.forward is not custom
    assert mlp.__dict__["forward"] is custom


def test_enabling_twice_is_an_error_and_leaks_nothing(plain_dit):
    before = model_state(plain_dit)
    handle = stepcache.cache(plain_dit, fixed())
    with pytest.raises(StepCacheError, match="already has an active stepcache"):
        stepcache.cache(plain_dit, fixed())
    stepcache.disable(plain_dit)
    assert not handle.active
    assert model_state(plain_dit) == before
    stepcache.disable(plain_dit)  # no-op


def test_schedule_too_short_for_the_run(plain_dit):
    with stepcache.cache(plain_dit, fixed()), pytest.raises(ScheduleLengthError, match="10 steps"):
        sample(plain_dit, torch.tensor([0]), 12)


def test_pipeline_step_count_mismatch_names_both_numbers(tiny_pipe):
    with stepcache.cache(tiny_pipe, fixed()), pytest.raises(ScheduleLengthError, match=r"10 steps.*for 7"):
        gen_pipe(tiny_pipe, steps=7)


def test_pipeline_step_count_mismatch_can_resample(tiny_pipe):
    schedule = fixed()
    with stepcache.cache(tiny_pipe, schedule, on_length_mismatch="resample") as handle:
        gen_pipe(tiny_pipe, steps=7)
        assert handle.running_schedule.num_steps == 7
        seven = handle.stats.as_dict()
        # 50 -> 20 -> 50 style: back at the schedule's own length, its own plan runs again
        ref = gen_pipe(tiny_pipe, steps=N)
        assert handle.running_schedule is schedule and handle.schedule is schedule
    assert seven["compute_fraction"] == pytest.approx(schedule.resample(7).compute_fraction)
    with stepcache.cache(tiny_pipe, schedule):
        assert torch.equal(gen_pipe(tiny_pipe, steps=N), ref)


def test_unknown_schedule_key_is_an_error_and_changes_nothing(plain_dit):
    before = model_state(plain_dit)
    bad = Schedule(N, {"attn": PLAN, "blocks.9.mlp": PLAN})
    with pytest.raises(ScheduleError, match=r"blocks\.9\.mlp"):
        stepcache.cache(plain_dit, bad)
    assert model_state(plain_dit) == before


def test_schedule_from_another_model_is_refused(plain_dit, tiny_pipe):
    cal = stepcache.calibrate(
        tiny_pipe, inputs=[{"class_labels": [3]}], num_inference_steps=N, progress=False
    )
    sched = from_calibration(cal, 0.1)
    with pytest.raises(ScheduleError, match="calibrated on DiTTransformer2DModel"):
        stepcache.cache(plain_dit, sched)
    stepcache.cache(plain_dit, sched, strict=False).close()


def test_manual_step_api(plain_dit):
    """A model called through a path the hooks cannot time: the caller declares steps."""
    y = torch.tensor([1, 2])
    store: dict = {}
    plans = {"attn": PLAN, "ff": PLAN}
    ref = sample(
        plain_dit,
        y,
        N,
        forward=lambda x, t, yy, s, b: reference_forward(plain_dit, x, t, yy, s, plans, store),
    )
    with stepcache.cache(plain_dit, fixed()) as handle:

        def forward(x, t, yy, step, branch):
            handle.set_step(step, branch)
            return plain_dit(x, t, yy)

        out = sample(plain_dit, y, N, forward=forward)
        again = sample(plain_dit, y, N, forward=forward)  # step 0 starts a new generation
    assert torch.equal(out, ref)
    assert torch.equal(again, ref)


def test_stats_report_types_and_macs(plain_dit):
    with stepcache.cache(plain_dit, fixed(), count_macs=True) as handle:
        sample(plain_dit, torch.tensor([0]), N)
    stats = handle.stats
    assert set(stats.by_type) == {"attn", "ff"}
    assert stats.by_type["ff"].components == 3
    assert stats.macs_saved and stats.macs_saved > 0
    assert "ff" in str(stats) and stats.as_dict()["compute_fraction"] == stats.compute_fraction


def test_forecast_extrapolates_from_the_last_two_computes(plain_dit):
    plan = (1, 2, 1, 2, 2, 1, 2, 1)
    seen = []
    hook = plain_dit.blocks[1].mlp.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with stepcache.cache(plain_dit, Schedule(len(plan), {"attn": plan, "ff": plan})) as handle:
        sample(plain_dit, torch.tensor([0, 3]), len(plan))
    hook.remove()
    assert handle.stats.computed == 3 * 2 * plan.count(1)
    # Step 1: only one computed output yet, so a copy. Later: last + (s - a) / (a - b) * (last - prev).
    assert torch.equal(seen[1], seen[0])
    torch.testing.assert_close(seen[3], seen[2] + 0.5 * (seen[2] - seen[0]))
    torch.testing.assert_close(seen[4], seen[2] + 1.0 * (seen[2] - seen[0]))
    torch.testing.assert_close(seen[6], seen[5] + (1 / 3) * (seen[5] - seen[2]))
    # The forecast is not a copy: it moves the output.
    assert not torch.allclose(seen[4], seen[2])


def test_forecast_only_plan_with_one_compute_equals_copying(plain_dit):
    copy = Schedule(4, {"attn": (1, 0, 0, 1), "ff": (1, 0, 0, 1)})
    with stepcache.cache(plain_dit, copy):
        a = sample(plain_dit, torch.tensor([1]), 4)
    with stepcache.cache(plain_dit, copy.with_forecast()):
        b = sample(plain_dit, torch.tensor([1]), 4)
    assert torch.equal(a, b)


def test_fora_schedule_fits_any_model(plain_dit, tiny_pipe):
    for target, run in (
        (plain_dit, lambda: sample(plain_dit, torch.tensor([0]), N)),
        (tiny_pipe, lambda: gen_pipe(tiny_pipe)),
    ):
        with stepcache.cache(target, fora(N, 2)) as handle:
            run()
        assert handle.stats.compute_fraction == fora(N, 2).compute_fraction == 0.6
