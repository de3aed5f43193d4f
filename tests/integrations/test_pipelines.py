"""Calibration and caching through real diffusers pipelines (tests/_helpers/pipelines.py).

The family tests drive bare transformers with a hand-written loop; here the pipelines themselves
run: tokenizer, text encoders, guidance (batched in one call for PixArt and SD3, split into two
calls inside ``transformer.cache_context("cond" / "uncond")`` for Wan and for Flux's true CFG),
scheduler stepping. What is checked, per pipeline:

* ``stepcache.calibrate(pipe, inputs=[...])`` sees one sample per input and records the scheduler;
* an all-compute schedule is bit-identical to the uncached pipeline and leaves the transformer
  exactly as it found it (hooks and instance attributes of every submodule);
* a reuse schedule is bit-identical to a *reference cache* written here as plain forward hooks
  (the component still runs, its output is swapped for the one kept at its last compute step), its
  computed / reused counts are the plan's, per guidance branch, and every generation starts afresh;
* a schedule for another step count is a clear error naming both numbers, or is resampled.

Wan 2.2 layouts (per-token timesteps, two experts) are covered at the end.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import stepcache
from stepcache import Schedule, ScheduleLengthError
from stepcache.policies import from_calibration
from tests._helpers.model_state import model_state
from tests._helpers.pipelines import (
    CASES,
    PROMPTS,
    PipelineCase,
    wan22_ti2v_inputs,
    wan22_ti2v_pipeline,
    wan22_two_stage_pipeline,
)

torch.set_num_threads(1)
# One pytest-xdist worker runs the module, so each pipeline is set up once.
pytestmark = pytest.mark.xdist_group("pipelines")

STEPS = 5
PLAN = (1, 0, 1, 0, 1)  # compute, reuse, compute, reuse, compute
OTHER_STEPS = (3, 7)  # pipeline calls with a step count the schedule was not made for
SEED = 7


def generate(case: PipelineCase, pipe: Any, steps: int = STEPS, seed: int = SEED) -> torch.Tensor:
    """One generation; the latents (nothing is decoded)."""
    return pipe(**case.inputs(PROMPTS[0], seed), num_inference_steps=steps)[0]


class Setup:
    """One pipeline, its uncached reference output, its clean state and a calibration."""

    def __init__(self, case: PipelineCase) -> None:
        self.case = case
        self.pipe = case.build()
        self.model = self.pipe.transformer
        # One uncached call first: diffusers' own cache_context adds its HookRegistry on first use.
        self.reference = generate(case, self.pipe)
        self.state = model_state(self.model)
        self.components = stepcache.discover(self.pipe)
        self.cal = stepcache.calibrate(
            self.pipe,
            inputs=[case.inputs(p, i) for i, p in enumerate(PROMPTS[:2])],
            num_inference_steps=STEPS,
            progress=False,
        )
        self.state_after_calibration = model_state(self.model)

    def plans(self, plan: tuple[int, ...]) -> Schedule:
        return Schedule(len(plan), dict.fromkeys(sorted(self.case.types), plan))


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def setup(request: pytest.FixtureRequest) -> Setup:
    return Setup(request.param)


# ---------------------------------------------------------------- reference cache
class ReferenceCache:
    """A cache written as forward hooks: the step and branch come from counting transformer calls
    (``calls_per_step`` per step), and at a reuse step each component's output is replaced by what
    it returned at its last compute step in the same branch. No stepcache code involved."""

    def __init__(self, model: nn.Module, plans: dict[str, tuple[int, ...]], calls_per_step: int) -> None:
        self.plans, self.per_step = plans, calls_per_step
        self.calls = 0
        self.store: dict[tuple[str, int], Any] = {}
        named = dict(model.named_modules())
        self.handles = [model.register_forward_pre_hook(self._count)]
        self.handles += [named[name].register_forward_hook(self._hook(name)) for name in plans]

    def _count(self, module: nn.Module, args: Any) -> None:
        self.step, self.branch = divmod(self.calls, self.per_step)
        self.calls += 1

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            key = (name, self.branch)
            if self.plans[name][self.step]:
                self.store[key] = output
                return None
            return self.store[key]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- calibration
def test_components_found(setup: Setup) -> None:
    assert dict(Counter(c.type for c in setup.components)) == setup.case.types


def test_calibrate_pipeline(setup: Setup) -> None:
    cal, pipe = setup.cal, setup.pipe
    assert cal.num_samples == 2
    assert cal.num_steps == STEPS
    assert cal.meta["scheduler"] == type(pipe.scheduler).__name__
    assert cal.meta["model_class"] == type(pipe.transformer).__name__
    assert list(cal.components) == [c.name for c in setup.components]
    for name, table in cal.errors.items():
        # every step after the first has a finite, positive 1-step change (random weights move)
        assert torch.isfinite(torch.as_tensor(table[1:, 0])).all(), name
        assert (table[1:, 0] > 0).all(), name
    assert all(m is not None and m > 0 for m in cal.macs.values())
    # calibration leaves the transformer exactly as it found it, and its outputs unchanged
    assert setup.state_after_calibration == setup.state
    assert torch.equal(generate(setup.case, pipe), setup.reference)


# ---------------------------------------------------------------- exactness
def test_all_compute_schedule_is_exact(setup: Setup) -> None:
    case, pipe = setup.case, setup.pipe
    schedule = from_calibration(setup.cal, alpha=0.0)
    assert schedule.compute_fraction == 1.0
    with stepcache.cache(pipe, schedule) as handle:
        out = generate(case, pipe)
    assert torch.equal(out, setup.reference)
    calls = len(setup.components) * STEPS * case.calls_per_step
    assert (handle.stats.computed, handle.stats.reused) == (calls, 0)
    assert handle.stats.generations == 1
    assert model_state(setup.model) == setup.state
    assert torch.equal(generate(case, pipe), setup.reference)


def test_reuse_schedule_matches_reference_cache(setup: Setup) -> None:
    case, pipe, model = setup.case, setup.pipe, setup.model
    schedule = setup.plans(PLAN)
    ref = ReferenceCache(model, {c.name: PLAN for c in setup.components}, case.calls_per_step)
    try:
        expected = generate(case, pipe)
    finally:
        ref.remove()
    assert ref.calls == STEPS * case.calls_per_step
    assert model_state(model) == setup.state
    assert not torch.equal(expected, setup.reference)  # reuse changes something

    with stepcache.cache(pipe, schedule, count_macs=True) as handle:
        first = generate(case, pipe)
        second = generate(case, pipe)  # a new generation starts the schedule afresh
    assert torch.equal(first, expected)
    assert torch.equal(second, first)
    assert model_state(model) == setup.state

    stats = handle.stats
    assert stats.generations == 2
    assert stats.compute_fraction == schedule.compute_fraction
    per_layer = 2 * case.calls_per_step  # two generations, each branch once per step
    for kind, count in case.types.items():
        s = stats.by_type[kind]
        assert s.components == count
        assert s.computed == count * PLAN.count(1) * per_layer, kind
        assert s.reused == count * PLAN.count(0) * per_layer, kind
    assert stats.macs_saved is not None and stats.macs_saved > 0


# ---------------------------------------------------------------- step counts
@pytest.mark.parametrize("other", OTHER_STEPS)
def test_schedule_for_other_step_count_is_an_error(setup: Setup, other: int) -> None:
    case, pipe = setup.case, setup.pipe
    schedule = setup.plans(PLAN)
    with stepcache.cache(pipe, schedule) as handle:
        with pytest.raises(ScheduleLengthError) as err:
            generate(case, pipe, steps=other)
        numbers = set(re.findall(r"\d+", str(err.value)))
        assert {str(STEPS), str(other)} <= numbers, str(err.value)
        # the failed call leaves nothing stale: a right-length call is still exact
        after_error = generate(case, pipe)
    assert model_state(setup.model) == setup.state
    assert handle.stats.generations == 1
    with stepcache.cache(pipe, schedule):
        fresh = generate(case, pipe)
    assert torch.equal(after_error, fresh)


@pytest.mark.parametrize("other", OTHER_STEPS)
def test_resample_on_length_mismatch(setup: Setup, other: int) -> None:
    case, pipe = setup.case, setup.pipe
    schedule = setup.plans(PLAN)
    uncached = generate(case, pipe, steps=other)
    with stepcache.cache(pipe, schedule, on_length_mismatch="resample") as handle:
        out = generate(case, pipe, steps=other)
    assert out.shape == uncached.shape and torch.isfinite(out).all()
    assert handle.schedule is schedule  # the schedule given is never replaced
    assert handle.running_schedule.num_steps == other
    stats = handle.stats
    assert stats.generations == 1
    assert stats.computed + stats.reused == len(setup.components) * other * case.calls_per_step
    assert stats.compute_fraction == pytest.approx(handle.running_schedule.compute_fraction)
    assert model_state(setup.model) == setup.state


# ---------------------------------------------------------------- Wan 2.2 (known engine gaps)
WAN = next(c for c in CASES if c.name == "wan")


def test_wan22_ti2v_calibrates_every_step() -> None:
    """Wan 2.2 TI2V passes a (batch, tokens) timestep that is 0 on the first (image) frame's tokens
    and t on the others: the step is read from the maximum, not from element [0] (always 0)."""
    pipe = wan22_ti2v_pipeline()
    cal = stepcache.calibrate(
        pipe, inputs=[wan22_ti2v_inputs(pipe, PROMPTS[0], 0)], num_inference_steps=STEPS, progress=False
    )
    assert cal.num_steps == STEPS


def test_wan22_ti2v_reuse_schedule_is_followed() -> None:
    pipe = wan22_ti2v_pipeline()
    schedule = Schedule(STEPS, dict.fromkeys(sorted(WAN.types), PLAN))
    with stepcache.cache(pipe, schedule) as handle:
        pipe(**wan22_ti2v_inputs(pipe, PROMPTS[0], 0), num_inference_steps=STEPS)
    assert handle.stats.compute_fraction == schedule.compute_fraction


def test_wan22_two_stage_calibration_round_trip() -> None:
    """Wan 2.2 A14B: ``transformer`` runs the high-noise steps and ``transformer_2`` the rest.
    Both are calibrated and cached, and the step count runs on across the switch."""
    pipe = wan22_two_stage_pipeline()
    reference = generate(WAN, pipe)
    cal = stepcache.calibrate(
        pipe, inputs=[WAN.inputs(PROMPTS[0], 0)], num_inference_steps=STEPS, progress=False
    )
    with stepcache.cache(pipe, from_calibration(cal, alpha=0.0)):
        out = generate(WAN, pipe)
    assert torch.equal(out, reference)
    assert cal.num_steps == STEPS


def test_fit_forecasts_through_a_diffusers_pipeline():
    """The recipe docs/policies.md gives for pipelines: their __call__ without its no_grad wrapper,
    latents out, differentiates through the scheduler and the guidance arithmetic."""
    from stepcache.policies import fit_forecasts, fora
    from tests._helpers.pipelines import pixart_pipeline

    pipe = pixart_pipeline()
    call = type(pipe).__call__.__wrapped__

    def run():
        kw = {"height": 16, "width": 16, "use_resolution_binning": False, "output_type": "latent"}
        gen = torch.Generator().manual_seed(0)
        return call(
            pipe, prompt=["a cat"], num_inference_steps=6, generator=gen, guidance_scale=2.0, **kw
        ).images

    fitted = fit_forecasts(pipe, run, fora(6, 2), iterations=2, forecast="first-order", progress=False)
    assert len(fitted.meta["forecast_fit"]["scores"]) == 2 and fitted.gains is not None
    assert all(not p.requires_grad or p.grad is None for p in pipe.transformer.parameters())


def test_the_output_response_through_a_diffusers_pipeline():
    """stepcache.response on a pipeline (guided: [uncond; cond] rows map to their samples), then the
    open loop ranks by it."""
    import numpy as np

    import stepcache
    from stepcache.policies import open_loop_schedule
    from tests._helpers.pipelines import pixart_pipeline

    pipe = pixart_pipeline()
    call = type(pipe).__call__.__wrapped__
    kw = {"height": 16, "width": 16, "use_resolution_binning": False, "output_type": "latent"}

    def run():
        gen = torch.Generator().manual_seed(0)
        return call(
            pipe, prompt=["a cat", "a dog"], num_inference_steps=6, generator=gen, guidance_scale=2.0, **kw
        ).images

    with torch.no_grad():
        cal = stepcache.calibrate(pipe, run, num_inference_steps=6, progress=False)
    flags = [p.requires_grad for p in pipe.transformer.parameters()]
    measured = stepcache.response(pipe, cal, run)
    assert measured.meta["response"]["samples"] == 2
    assert all(a.shape == (2, 6, 6, 2) and np.isfinite(a).all() for a in measured.response.values())
    assert [p.requires_grad for p in pipe.transformer.parameters()] == flags
    chosen = open_loop_schedule(measured, 0.5)
    assert chosen.meta["open_loop"]["rule"] == "output response"
