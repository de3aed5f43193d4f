"""budget="macs": the optimal policy with MAC costs returns fast, within budget, on real calibrations
(it used to build a knapsack table with one cell per MAC: ~141 GiB for the shipped calibration)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stepcache import ScheduleError
from stepcache.policies import optimal_schedule
from stepcache.policies.optimal import allocate, cost_curve
from stepcache.reference.pipeline import shipped_calibration


def mac_share(cal, sched) -> float:
    """Executed MACs / all MACs of the cached components over one run."""
    total = sum(cal.macs[n] for n in cal.components) * cal.num_steps
    spent = 0.0
    for name, kind in cal.components.items():
        plan = sched.plans.get(name, sched.plans.get(kind))
        spent += plan.count(1) * cal.macs[name]
    return spent / total


@pytest.mark.parametrize("sampler", [("ddim", 50), ("dpm", 20)])
@pytest.mark.parametrize("granularity", ["type", "layer"])
def test_the_shipped_calibration_with_a_mac_budget(sampler, granularity):
    cal = shipped_calibration(*sampler)
    for fraction in (0.3, 0.5, 0.8):
        start = time.perf_counter()
        sched = optimal_schedule(cal, fraction, budget="macs", granularity=granularity)
        assert time.perf_counter() - start < 1.0
        share = mac_share(cal, sched)
        assert fraction - 0.05 <= share <= fraction + 1e-9  # within budget, and spending most of it
        assert sched.meta["budget"] == "macs"


def test_mac_costs_that_are_not_whole_numbers_use_the_lagrangian():
    cal = shipped_calibration("ddim", 50)
    odd = cal.replace(macs={n: m * 1.000013 + 0.37 for n, m in cal.macs.items()})
    sched = optimal_schedule(odd, 0.5, budget="macs", granularity="layer")
    assert 0.45 <= mac_share(odd, sched) <= 0.5 + 1e-9


def test_a_huge_whole_number_budget_never_builds_a_huge_table():
    """Coprime unit costs of ~1e9 and a budget of ~1e11 units: no common divisor shrinks the table."""
    rng = np.random.default_rng(0)
    curves = {}
    for key in ("a", "b", "c"):
        table = np.cumsum(rng.uniform(0.01, 0.1, (20, 3)), axis=1)
        table[np.triu_indices(3)] = np.nan  # reusing further back than the step itself: not measured
        curves[key] = cost_curve(table)
    units = {"a": 1_000_000_007.0, "b": 1_000_000_009.0, "c": 2_000_000_011.0}
    budget = 0.5 * sum(units.values()) * 20
    start = time.perf_counter()
    counts = allocate(curves, units, budget)
    assert time.perf_counter() - start < 1.0
    assert sum(units[k] * counts[k] for k in units) <= budget
    assert sum(units[k] * counts[k] for k in units) >= 0.9 * budget


def test_whole_units_with_a_common_divisor_stay_exact():
    """MACs that are multiples of one another reduce to a small exact knapsack (here units 1 and 2)."""
    rng = np.random.default_rng(1)
    curves = {k: cost_curve(np.cumsum(rng.uniform(0.01, 0.1, (12, 2)), axis=1)) for k in ("attn", "ff")}
    small = allocate(curves, {"attn": 1, "ff": 2}, 18)
    scaled = allocate(curves, {"attn": 41_943_040.0, "ff": 83_886_080.0}, 18 * 41_943_040.0)
    assert small == scaled


def test_a_calibration_without_macs_says_so():
    cal = shipped_calibration("dpm", 20)
    with pytest.raises(ScheduleError, match="needs MACs per component"):
        optimal_schedule(cal.replace(macs={}), 0.5, budget="macs")
    with pytest.raises(ScheduleError, match="0 MACs"):
        optimal_schedule(cal.replace(macs=dict.fromkeys(cal.macs, 0.0)), 0.5, budget="macs")
    with pytest.raises(ScheduleError, match="budget must be"):
        optimal_schedule(cal, 0.5, budget="flops")
