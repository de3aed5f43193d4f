"""The optimal policy: exact DP, exact budgets, calibrated forecasting, sensitivity weights."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch

import stepcache
from stepcache import Calibration, Schedule, ScheduleError
from stepcache.policies import COMPUTE, FORECAST, REUSE, optimal_schedule
from stepcache.policies.optimal import allocate, cost_curve, plan_cost
from tests._helpers.plain_models import sample

N = 8


def run_for(model, seeds):
    return lambda: [sample(model, torch.tensor([1, 2]), N, seed=s) for s in seeds]


def brute_force(n, errors, forecast, weights):
    """Least plan_cost per compute count over every plan (each reuse may copy or forecast)."""
    best: dict[int, float] = {}
    for bits in itertools.product([REUSE, COMPUTE], repeat=n - 2):
        computes = [COMPUTE, *bits, COMPUTE]
        holes = [i for i, v in enumerate(computes) if v == REUSE]
        for choice in itertools.product(
            [REUSE, FORECAST] if forecast is not None else [REUSE], repeat=len(holes)
        ):
            plan = list(computes)
            for i, v in zip(holes, choice, strict=True):
                plan[i] = v
            c, cost = sum(computes), plan_cost(tuple(plan), errors, forecast, weights)
            best[c] = min(best.get(c, np.inf), cost)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(3, 9)), int(rng.integers(1, 4))
    errors = rng.random((n, k))
    forecast = rng.random((n, k, k + 1)) if seed % 2 else None
    weights = rng.random(n) * 3
    curve = cost_curve(errors, forecast, weights)
    want = brute_force(n, errors, forecast, weights)
    for c in range(n + 1):
        if c not in want or not np.isfinite(want[c]):
            assert not np.isfinite(curve.cost[c]) and curve.plans[c] is None
            continue
        assert curve.cost[c] == pytest.approx(want[c], abs=1e-12)
        plan = curve.plans[c]
        assert plan.count(COMPUTE) == c and plan[0] == plan[-1] == COMPUTE
        assert plan_cost(plan, errors, forecast, weights) == pytest.approx(curve.cost[c], abs=1e-12)


def test_allocation_is_optimal_and_exact_on_small_cases():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = 6
        curves = {f"c{i}": cost_curve(rng.random((n, 2)), rng.random((n, 2, 3))) for i in range(3)}
        units = dict.fromkeys(curves, 1.0)
        for budget in range(9, 19):  # 3 computes each at least (runs <= 2), 6 at most
            counts = allocate(curves, units, budget)
            assert sum(counts.values()) == budget  # met exactly
            got = sum(curves[key].cost[c] for key, c in counts.items())
            options = [curves[key].feasible for key in curves]
            best = min(
                sum(curves[key].cost[c] for key, c in zip(curves, combo, strict=True))
                for combo in itertools.product(*options)
                if sum(combo) <= budget
            )
            assert got == pytest.approx(best, abs=1e-12)  # the knapsack is exact
        lagrangian = allocate(curves, dict.fromkeys(curves, 1.5), 1.5 * 12)  # MAC-like units
        assert sum(lagrangian.values()) == 12


def test_budget_below_the_minimum_is_a_clear_error():
    curve = cost_curve(np.ones((10, 2)))
    with pytest.raises(ScheduleError, match="below the least possible"):
        allocate({"a": curve}, {"a": 1.0}, 2)


def test_forecast_never_chosen_when_it_calibrates_worse():
    rng = np.random.default_rng(0)
    errors = rng.random((12, 3))
    worse = np.repeat(errors[:, :, None], 4, axis=2) + 0.1
    for plan in cost_curve(errors, worse).plans:
        assert plan is None or FORECAST not in plan
    better = np.repeat(errors[:, :, None], 4, axis=2) * 0.5
    plan = cost_curve(errors, better).plans[5]
    # With a forecast available (after the second compute) it is used for every reused step.
    second = [s for s, v in enumerate(plan) if v == COMPUTE][1]
    assert all(v != REUSE for v in plan[second:])


@pytest.fixture
def calibration(plain_dit):
    return stepcache.calibrate(plain_dit, run_for(plain_dit, [0, 1]), lookahead=3, progress=False)


def test_calibration_records_forecast_errors_by_hand(plain_dit, calibration):
    outs = []
    hook = plain_dit.blocks[2].attn.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), lookahead=2, progress=False)
    hook.remove()
    fc = cal.forecast_errors["blocks.2.attn"]
    assert fc.shape == (N, 2, 3)
    for s, j, m in [(3, 1, 1), (5, 2, 1), (6, 1, 3), (7, 2, 3)]:
        a, b, cur = outs[s - j].flatten(1), outs[s - j - m].flatten(1), outs[s].flatten(1)
        pred = a + (j / m) * (a - b)
        want = ((cur - pred).abs().sum(1) / cur.abs().sum(1)).mean().item()
        assert fc[s, j - 1, m - 1] == pytest.approx(want, rel=1e-5)
    assert np.isnan(fc[1]).all() and np.isnan(fc[2, 1, :]).all()  # no second earlier output


def test_calibration_without_forecast_has_none_and_optimal_says_so(plain_dit):
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), forecast=False, progress=False)
    assert not cal.forecast_errors
    with pytest.raises(ScheduleError, match="no forecast errors"):
        optimal_schedule(cal, 0.5, forecast=True)
    assert FORECAST not in optimal_schedule(cal, 0.5).plans["attn"]


@pytest.mark.parametrize("granularity", ["type", "layer"])
def test_optimal_meets_the_budget_exactly_and_runs(plain_dit, calibration, granularity):
    for fraction in (0.5, 0.625, 0.75):
        sched = optimal_schedule(calibration, fraction, granularity=granularity)
        layers = len(calibration.components) // 2 if granularity == "type" else 1
        unit = layers / (len(calibration.components) * N)
        assert fraction - unit < sched.compute_fraction <= fraction + 1e-12
        with stepcache.cache(plain_dit, sched) as handle:
            sample(plain_dit, torch.tensor([1, 2]), N)
        assert handle.stats.compute_fraction == pytest.approx(sched.compute_fraction)
    with pytest.raises(ScheduleError, match="out of reach"):
        optimal_schedule(calibration, 0.1)


def test_optimal_is_deterministic_and_serialisable(calibration, tmp_path):
    a = optimal_schedule(calibration, 0.5, granularity="layer")
    b = optimal_schedule(calibration, 0.5, granularity="layer")
    assert a == b and a.meta["rule"] == "optimal"
    assert Schedule.load(a.save(tmp_path / "s.json")) == a


def test_forecast_with_an_unchanged_output_equals_copying(plain_dit):
    """Zero difference between the last two computed outputs: the forecast is the copy."""
    block = plain_dit.blocks[0]
    const = torch.randn(2, 16, 32)
    block.attn.forward = lambda x: const.clone()  # an output that never changes between steps
    plan = (1, 1, 0, 0, 1, 0, 0, 1)
    copy = Schedule(N, {"blocks.0.attn": plan})
    with stepcache.cache(plain_dit, copy):
        a = sample(plain_dit, torch.tensor([1, 2]), N)
    with stepcache.cache(plain_dit, copy.with_forecast()):
        b = sample(plain_dit, torch.tensor([1, 2]), N)
    del block.attn.forward
    assert torch.equal(a, b)


def test_sensitivity_weights_are_deterministic_and_saved(plain_dit, calibration, tmp_path):
    def run():
        return torch.cat(run_for(plain_dit, [0])())

    weighted = stepcache.sensitivity(
        plain_dit, calibration, run, step_groups=2, depth_groups=1, progress=False
    )
    again = stepcache.sensitivity(plain_dit, calibration, run, step_groups=2, depth_groups=1, progress=False)
    info = weighted.meta["sensitivity"]
    assert info["runs"] == 1 + 2 * 2  # the reference run + step groups x (attn, mlp)
    for name in calibration.components:
        w = weighted.weights[name]
        assert w.shape == (N,) and np.all(w >= 0) and np.array_equal(w, again.weights[name])
        assert len(set(np.round(w[1:], 12))) <= 2  # constant within each of the 2 step groups
    loaded = Calibration.load(weighted.save(tmp_path / "c.json"))
    np.testing.assert_allclose(loaded.weights["blocks.0.attn"], weighted.weights["blocks.0.attn"])
    np.testing.assert_allclose(
        loaded.forecast_errors["blocks.0.attn"], calibration.forecast_errors["blocks.0.attn"], equal_nan=True
    )
    unweighted = optimal_schedule(weighted, 0.5, weighted=False)
    assert unweighted.meta["weighted"] is False and optimal_schedule(weighted, 0.5).meta["weighted"] is True
    with pytest.raises(ScheduleError, match="no sensitivity weights"):
        optimal_schedule(calibration, 0.5, weighted=True)


def test_sensitivity_needs_tensor_samples(plain_dit, calibration):
    with pytest.raises(stepcache.CalibrationError, match="return the final samples"):
        stepcache.sensitivity(plain_dit, calibration, lambda: None, progress=False)


@pytest.mark.parametrize("n", [8, 20, 50])
def test_candidate_plans_spend_the_budget_exactly(n):
    from stepcache.policies import interval_plan, warmup_plan

    for computes in range(3, n):
        for w in range(1, computes - 1):
            with contextlib.suppress(ScheduleError):
                plan = warmup_plan(n, computes, w)
                assert plan.count(COMPUTE) == computes and plan[-1] == COMPUTE
                assert plan[:w] == (COMPUTE,) * w
            plan = interval_plan(n, computes, w)
            assert plan.count(COMPUTE) <= computes and plan[:w] == (COMPUTE,) * w


def test_tune_picks_the_closest_candidate_and_leaves_the_model_alone(plain_dit, calibration, tmp_path):
    from tests._helpers.model_state import model_state

    def run():
        return torch.cat(run_for(plain_dit, [5])())

    before = model_state(plain_dit)
    # The pre-issue-15 scoring (pooled MSE on all samples), whose choice is the least MSE.
    old = {"objective": "mse", "validation": 0, "family": "classic"}
    sched = stepcache.tune(plain_dit, run, 0.5, calibration=calibration, progress=False, **old)
    assert model_state(plain_dit) == before
    info = sched.meta["tuning"]
    assert sched.meta["rule"] == "tuned" and info["runs"] == info["evaluations"] + 1
    assert info["mse"][sched.meta["candidate"]] == min(info["mse"].values())
    assert sched.compute_fraction <= 0.5 + 1e-12
    again = stepcache.tune(plain_dit, run, 0.5, calibration=calibration, progress=False, **old)
    assert again.plans == sched.plans and again.meta["tuning"]["mse"] == info["mse"]
    assert Schedule.load(sched.save(tmp_path / "t.json")) == sched
    # The chosen schedule really gives that error when replayed.
    reference = run()
    with stepcache.cache(plain_dit, sched):
        out = run()
    assert float((out - reference).pow(2).mean()) == pytest.approx(
        info["mse"][sched.meta["candidate"]], rel=1e-3
    )
    with pytest.raises(ScheduleError, match="num_steps"):
        stepcache.tune(plain_dit, run, 0.5)
