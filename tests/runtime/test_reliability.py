"""Runtime reliability: generation boundaries that cannot leak, concurrency, all-or-nothing enable,
no model kept alive, closes in any order. Each test failed before the fix it guards."""

from __future__ import annotations

import gc
import threading
import warnings
import weakref

import pytest
import torch

import stepcache
from stepcache import Schedule, StepCacheError, StepCacheWarning
from stepcache.runtime import session as session_module
from tests._helpers.model_state import model_state
from tests._helpers.plain_models import PlainDiT, sample

N = 10
PLAN = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)


def sched(n=N, plan=PLAN):
    return Schedule(n, {"attn": plan, "ff": plan})


def gen_pipe(pipe, steps=N, seed=0, on_step=None):
    """A DiT pipeline run; ``on_step(i)`` runs in the scheduler's step, outside the model (where a
    user's callback, Ctrl-C or diffusers' interrupt flag would stop a generation)."""
    scheduler = pipe.scheduler
    original = scheduler.step
    count = {"i": 0}

    def step(*args, **kwargs):
        if on_step is not None:
            on_step(count["i"])
        count["i"] += 1
        return original(*args, **kwargs)

    scheduler.step = step
    try:
        return pipe(
            [1, 2],
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images
    finally:
        del scheduler.step


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("at", range(N))
def test_pipeline_interrupted_between_calls_at_any_step_leaks_nothing(tiny_pipe, at):
    with stepcache.cache(tiny_pipe, sched()) as handle:
        expected = gen_pipe(tiny_pipe)

        def stop(i):
            if i == at:
                raise Interrupt

        with pytest.raises(Interrupt):
            gen_pipe(tiny_pipe, on_step=stop)
        # the next generation starts at the same first timestep: before the fix, after an
        # interruption at step 0 it was read as a second guidance branch of step 0
        assert torch.equal(gen_pipe(tiny_pipe), expected)
    assert handle.stats.generations == 3


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("at", [2, 5, 9])
def test_plain_loop_interrupted_between_calls(plain_dit, split, at):
    y = torch.tensor([1, 3])
    with stepcache.cache(plain_dit, sched()):
        expected = sample(plain_dit, y, N, guidance=2.0, split=split)
        with pytest.raises(RuntimeError, match="interrupted"):
            sample(plain_dit, y, N, guidance=2.0, split=split, fail_at=at)
        with pytest.warns(StepCacheWarning, match=f"ended after {at} of the schedule's {N} steps"):
            got = sample(plain_dit, y, N, guidance=2.0, split=split)
    assert torch.equal(got, expected)


def test_plain_loop_interrupted_after_its_first_step_needs_reset(plain_dit):
    """A plain loop stopped right after step 0 and restarted at the same timestep looks exactly like a
    second guidance branch of step 0: nothing in the calls tells them apart (a pipeline's scheduler
    does, see above). handle.reset() says so explicitly."""
    y = torch.tensor([1, 3])
    with stepcache.cache(plain_dit, sched()) as handle:
        expected = sample(plain_dit, y, N, guidance=2.0)
        with pytest.raises(RuntimeError, match="interrupted"):
            sample(plain_dit, y, N, guidance=2.0, fail_at=1)
        handle.reset()
        assert torch.equal(sample(plain_dit, y, N, guidance=2.0), expected)


def test_a_plain_loop_shorter_than_the_schedule_warns(plain_dit):
    warns = pytest.warns(StepCacheWarning, match="ended after 6 of the schedule's 10 steps")
    with warns, stepcache.cache(plain_dit, sched()):
        sample(plain_dit, torch.tensor([1]), 6)


def test_resampling_never_replaces_the_schedule_given(tiny_pipe):
    schedule = sched()
    with stepcache.cache(tiny_pipe, schedule, on_length_mismatch="resample") as handle:
        gen_pipe(tiny_pipe, steps=N)
        first = handle.stats.computed
        gen_pipe(tiny_pipe, steps=4)
        gen_pipe(tiny_pipe, steps=N)
    assert handle.schedule is schedule
    computed_in_four = schedule.resample(4).plans["attn"].count(1) * 3 * 2
    assert handle.stats.computed == 2 * first + computed_in_four


def test_a_second_thread_during_a_generation_is_a_clear_error(plain_dit):
    y = torch.tensor([2])
    with stepcache.cache(plain_dit, sched()):
        expected = sample(plain_dit, y, N)
    at_step_3, resume = threading.Event(), threading.Event()
    results: dict = {}

    def forward(x, t, yy, step, branch):
        if step == 3 and not at_step_3.is_set():
            at_step_3.set()
            resume.wait(10)
        return plain_dit(x, t, yy)

    def first():
        results["first"] = sample(plain_dit, y, N, forward=forward)

    with stepcache.cache(plain_dit, sched()):
        worker = threading.Thread(target=first)
        worker.start()
        assert at_step_3.wait(10)
        with pytest.raises(StepCacheError, match="second thread"):
            sample(plain_dit, y, N)
        resume.set()
        worker.join(10)
        # once that generation is done, another thread may generate
        assert torch.equal(sample(plain_dit, y, N), expected)
    assert torch.equal(results["first"], expected)  # the running generation was not disturbed


def test_a_call_that_raises_ends_its_generation_for_every_thread(plain_dit):
    y = torch.tensor([2])
    with stepcache.cache(plain_dit, sched()):
        expected = sample(plain_dit, y, N)

        def failing():
            def forward(x, t, yy, step, branch):
                if step == 2:
                    return plain_dit(x, t, torch.tensor([99]))  # an index error inside the model
                return plain_dit(x, t, yy)

            with pytest.raises(IndexError):
                sample(plain_dit, y, N, forward=forward)

        worker = threading.Thread(target=failing)
        worker.start()
        worker.join(10)
        assert torch.equal(sample(plain_dit, y, N), expected)


def test_enable_is_all_or_nothing(plain_dit, monkeypatch):
    before = model_state(plain_dit)
    original = session_module.TorchInstaller.hook_component
    calls = {"n": 0}

    def flaky(self, comp, make_forward):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return original(self, comp, make_forward)

    monkeypatch.setattr(session_module.TorchInstaller, "hook_component", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        stepcache.cache(plain_dit, sched())
    assert model_state(plain_dit) == before
    monkeypatch.undo()
    stepcache.cache(plain_dit, sched()).close()  # nothing stale blocks a new cache
    assert model_state(plain_dit) == before


def test_an_enabled_model_that_is_dropped_is_freed():
    model = PlainDiT()
    stepcache.cache(model, sched())  # enabled, never closed
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_two_models_sharing_blocks_close_in_any_order():
    torch.manual_seed(0)
    a, b = PlainDiT(), PlainDiT()
    b.blocks = a.blocks  # shared blocks
    before_a, before_b = model_state(a), model_state(b)
    handle_a = stepcache.cache(a, sched())
    with pytest.raises(StepCacheError, match="already cached by another stepcache session"):
        stepcache.cache(b, sched())
    handle_a.close()
    handle_b = stepcache.cache(b, sched())
    handle_b.close()
    handle_a.close()  # closing twice, in any order, is harmless
    assert model_state(a) == before_a and model_state(b) == before_b


# ---------------------------------------------------------------- issue 24
def park_at(model, step: int):
    """A pre-hook on the denoiser (after stepcache's): the thread that makes its ``step``-th call
    waits there until released. Returns (reached, release, remove)."""
    reached, release = threading.Event(), threading.Event()
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == step + 1 and not reached.is_set():
            reached.set()
            release.wait(10)

    handle = model.register_forward_pre_hook(hook)
    return reached, release, handle.remove


def test_a_second_thread_on_a_pipeline_does_not_restart_the_running_generation(tiny_pipe):
    """The second thread's call is refused before its pipeline sets up the (shared) scheduler: set up
    for another step count, that would change the first thread's image."""
    with stepcache.cache(tiny_pipe, sched()):
        expected = gen_pipe(tiny_pipe)
    results: dict = {}
    with stepcache.cache(tiny_pipe, sched(), on_length_mismatch="resample"):
        reached, release, remove = park_at(tiny_pipe.transformer, 3)
        worker = threading.Thread(target=lambda: results.setdefault("first", gen_pipe(tiny_pipe)))
        worker.start()
        try:
            assert reached.wait(10)
            with pytest.raises(StepCacheError, match="second thread"):
                tiny_pipe([3], num_inference_steps=4, output_type="pt")
        finally:
            release.set()
            worker.join(10)
            remove()
    assert torch.equal(results["first"], expected)


def test_a_guidance_plan_on_a_generation_without_guidance_skips_it_with_a_warning(plain_dit):
    """Guidance scale 1 with an even batch: no half of the batch is an unconditional branch, so
    nothing may stand in for it. Before the fix, half of the batch was taken for it silently."""
    from stepcache.guidance import GuidanceReuse

    y = torch.tensor([1, 3])  # even: looks like a stacked guidance batch by its size alone
    plan = GuidanceReuse(N, {"attn": (False,) + (True,) * (N - 1), "ff": (False,) + (True,) * (N - 1)})
    everything = Schedule(N, {"attn": (1,) * N, "ff": (1,) * N})
    expected = sample(plain_dit, y, N)  # uncached, no guidance
    with stepcache.cache(plain_dit, everything, guidance=plan) as handle:
        with pytest.warns(StepCacheWarning, match="not a classifier-free guidance batch"):
            got = sample(plain_dit, y, N)
        assert torch.equal(got, expected) and handle.stats.halved == 0
        # with guidance, the same plan does halve calls
        sample(plain_dit, y, N, guidance=2.0)
        assert handle.stats.halved > 0


def test_resample_on_a_plain_loop_says_once_that_it_cannot(plain_dit):
    """A plain loop tells no step count when a generation starts: resampling is a limit there, said once
    with the fix, not a silent no-op."""
    y = torch.tensor([1])
    with stepcache.cache(plain_dit, sched(), on_length_mismatch="resample") as handle:
        with pytest.warns(StepCacheWarning, match=r"plain loop.*schedule.resample\(n\)"):
            sample(plain_dit, y, N)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sample(plain_dit, y, N)  # said once
    assert handle.running_schedule is handle.schedule


def test_a_cache_never_closed_puts_the_recompile_limit_back_when_collected():
    """torch._dynamo's recompile_limit is raised while a cache is open; a cache that is never closed
    gave it back never (issue 24). Once its model and handle are garbage, it does."""
    import torch._dynamo.config as dynamo_config

    from stepcache.runtime import headroom

    gc.collect()
    before = dynamo_config.recompile_limit
    holders = headroom._state["holders"]
    model = PlainDiT()
    stepcache.cache(model, sched())  # enabled, never closed
    assert headroom._state["holders"] == holders + 1
    if holders == 0:
        assert dynamo_config.recompile_limit == before * headroom.FACTOR
    del model
    gc.collect()
    assert headroom._state["holders"] == holders
    assert dynamo_config.recompile_limit == before
    # a closed cache gives it back once, not twice
    handle = stepcache.cache(PlainDiT(), sched())
    handle.close()
    del handle
    gc.collect()
    assert headroom._state["holders"] == holders and dynamo_config.recompile_limit == before


@pytest.mark.parametrize(
    "step, branch, match",
    [
        ("1", 0, "step"),
        (True, 0, "step"),
        (1.0, 0, "step"),
        (-1, 0, "step"),
        (1, -1, "branch"),
        (1, "0", "branch"),
    ],
)
def test_set_step_takes_integers_only(plain_dit, step, branch, match):
    """set_step("1") raised a raw TypeError; set_step(True) was step 1; branch=-1 read the last
    branch's store (issue 24)."""
    with stepcache.cache(plain_dit, sched()) as handle, pytest.raises(StepCacheError, match=match):
        handle.set_step(step, branch)


def test_replacing_the_transformer_while_a_cache_is_open_is_said(tiny_pipe):
    """pipe.transformer = another model while a cache is open ran uncached without a word (issue 24)."""
    from stepcache.integrations.models import tiny_dit_pipeline

    other = tiny_dit_pipeline(num_layers=3).transformer  # the same weights, not the cached module
    uncached = gen_pipe(tiny_pipe)
    with stepcache.cache(tiny_pipe, sched()) as handle:
        original = tiny_pipe.transformer
        tiny_pipe.transformer = other
        try:
            with pytest.warns(StepCacheWarning, match="pipe.transformer was replaced"):
                got = gen_pipe(tiny_pipe)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                gen_pipe(tiny_pipe)  # said once for this model
        finally:
            tiny_pipe.transformer = original
    assert torch.equal(got, uncached) and handle.stats.computed == 0


def loop(model, ts, y, seed=0):
    """A plain loop over the given timesteps (the sampler of ``sample``, any grid)."""
    x = torch.randn(len(y), 16, 4, generator=torch.Generator().manual_seed(seed))
    for t in ts:
        x = x - 0.05 * model(x, t.expand(len(y)), y)
    return x


@pytest.mark.parametrize(
    "at, second",
    [
        (4, "same grid, later start"),  # an img2img-like run starting further down the grid
        (3, "off the grid, lower"),  # another sampler's timesteps, all below where it stopped
        (1, "same grid, later start"),  # stopped after its first step: a later grid point
    ],
)
def test_a_plain_loop_interrupted_then_another_grid_starts_afresh(plain_dit, at, second):
    """A plain loop stopped between calls, then a generation whose timesteps do not continue it (lower
    than where it stopped, so the timestep never went up): before, it continued the stopped state
    (issue 24). The timesteps of the last whole generation tell a continuation from a new start."""
    from tests._helpers.plain_models import timesteps

    y = torch.tensor([1, 3])
    grid = timesteps(N)
    ts = grid[6:] if second.startswith("same") else torch.linspace(300, 0, 4).round()
    with stepcache.cache(plain_dit, sched()) as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", StepCacheWarning)  # the short runs warn; not what is tested
        handle.reset()
        expected = loop(plain_dit, ts, y)  # the second generation, started afresh
        sample(plain_dit, y, N)  # a whole generation: its grid is known
        with pytest.raises(RuntimeError, match="interrupted"):
            sample(plain_dit, y, N, fail_at=at)
        got = loop(plain_dit, ts, y)
    assert torch.equal(got, expected)


def test_a_plain_loop_on_another_grid_sharing_the_first_timestep_continues(plain_dit):
    """No false start: a legitimate generation on another grid that shares the known grid's first
    timestep runs as one generation."""
    y = torch.tensor([2])
    other = torch.tensor([999.0, 950, 900, 800, 700, 600, 500, 400, 200, 0])
    with stepcache.cache(plain_dit, sched()) as handle:
        sample(plain_dit, y, N)
        expected_generations = handle.stats.generations + 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loop(plain_dit, other, y)
        assert handle.stats.generations == expected_generations
