"""One meaning per compute fraction: every policy reads a fraction with the same rounding rule
(``budget_calls``: the nearest whole number of component calls, ties down) and spends exactly that many
calls when its plans can, never more; the schedule reports what it spends."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from stepcache import Calibration, Schedule
from stepcache.policies import for_compute_fraction, optimal_schedule, tuned
from stepcache.policies._plan import budget_calls, split_computes

FRACTIONS = (0.25, 0.35, 0.5, 8 / 15)
STEPS = (15, 20, 25, 50)
LAYERS = 2  # per type; two types, attn and ff


def calibration(n: int, seed: int = 0) -> Calibration:
    """Random but plausible error tables (growing with the gap), lookahead long enough for 0.25."""
    rng = np.random.default_rng(seed)
    k = 6
    comps = {f"blocks.{i}.{t}": t for t in ("attn", "ff") for i in range(LAYERS)}
    errors, forecast = {}, {}
    for name in comps:
        copy = rng.uniform(0.05, 0.3, (n, k)) * np.arange(1, k + 1)
        fc = np.repeat(copy[:, :, None] * rng.uniform(0.3, 0.9), k + 1, axis=2)
        for s in range(n):
            copy[s, s:] = np.nan
            fc[s, s:] = np.nan
        errors[name], forecast[name] = copy, fc
    return Calibration(n, k, 4, comps, errors, forecast_errors=forecast)


def test_the_rule():
    assert budget_calls(0.53, 15) == 8  # 7.95: the nearest, no need to write 8/15
    assert budget_calls(8 / 15, 15) == 8
    assert budget_calls(0.35, 100) == 35
    assert budget_calls(0.25, 50) == 12  # 12.5: a tie goes to the lower count
    assert budget_calls(1.0, 7) == 7
    assert split_computes(13, 25, {"attn": 1, "ff": 1}) == {"attn": 7, "ff": 6}
    assert split_computes(35, 50, {"attn": 2, "ff": 2}) == {"attn": 9, "ff": 8}  # 34 of 35 calls fit


class _Replays:
    """``tune``'s replays without a model: the cache records the schedule, the samples are zeros."""

    def __init__(self, monkeypatch):
        self.schedules: list[Schedule] = []
        monkeypatch.setattr(tuned, "cache", self.cache)

    @contextlib.contextmanager
    def cache(self, target, schedule, count_macs=False):
        self.schedules.append(schedule)
        yield

    def run(self):
        return torch.zeros(4, 3)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"{f:.3g}")
def test_every_policy_spends_what_the_rule_buys(n, fraction, monkeypatch):
    cal = calibration(n)
    total = 2 * LAYERS * n
    want = budget_calls(fraction, total)
    # The most a type-granularity plan can spend within the budget (a type's computation costs LAYERS).
    reachable = LAYERS * (want // LAYERS)

    def spent(schedule: Schedule) -> float:
        return schedule.compute_fraction * total

    # The exact policies hit the budget whenever their plans can.
    assert math.isclose(spent(optimal_schedule(cal, fraction)), reachable)
    assert math.isclose(spent(optimal_schedule(cal, fraction, granularity="layer")), want)
    # SmoothCache's single threshold cannot aim: it stays within the budget.
    assert spent(for_compute_fraction(cal, fraction)) <= want + 1e-9
    # tune: every candidate it replays spends the same calls, split over the types.
    replays = _Replays(monkeypatch)
    chosen = tuned.tune(object(), replays.run, fraction, calibration=cal, refine=0, progress=False)
    for schedule in [*replays.schedules, chosen]:
        counts = schedule.counts or dict.fromkeys(schedule.plans, 2 * LAYERS)
        calls = sum(counts.get(k, 1) * plan.count(1) for k, plan in schedule.plans.items())
        assert calls == reachable, (schedule.meta.get("candidate"), calls, reachable)
    assert f"target {fraction:g}" in chosen.render()


def test_huge_sizes_are_fitted_exactly_not_in_wrapping_int64():
    """With outputs near 2**62 bytes the peak overflowed int64, and the fitter reported a fit for a plan
    several times over its budget (issue 24). The arithmetic is exact now."""
    from stepcache.memory import predict_peak
    from stepcache.policies._budget import calibration_components, fit_memory

    cal = calibration(20)
    schedule = for_compute_fraction(cal, 0.35)
    comps = calibration_components(cal)
    for size, budget in ((2**40, 2**41), (2**60, 2**61), (2**61, 2**62), (2**63 - 1, 2**63 - 1)):
        sizes = dict.fromkeys(cal.components, size)
        fitted = fit_memory(schedule, cal, budget, sizes)
        exact = predict_peak(fitted, sizes, components=comps).peak_bytes  # Python ints: exact
        assert exact <= budget, (size, exact / budget)
        assert fitted.meta["memory"]["predicted_peak"] == exact
    with pytest.raises(Exception, match="bytes"):
        fit_memory(schedule, cal, 2**64, sizes)
    with pytest.raises(Exception, match="bytes"):
        fit_memory(schedule, cal, 2**40, dict.fromkeys(cal.components, 2**64))
