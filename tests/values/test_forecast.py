"""Second-order forecasts (plan values 3 = taylor2, 4 = bdf2): their weights, the runtime against a
hand-written reference, what they keep in memory, files, calibration and the optimal policy's choice."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import stepcache
from stepcache import Calibration, Schedule, StepCacheError
from stepcache.memory import holdings, output_bytes, predict_peak
from stepcache.policies import fora, optimal_schedule
from stepcache.policies._budget import fit_memory
from stepcache.policies.optimal import cost_curve, plan_cost
from stepcache.schedule import (
    BDF2,
    COMPUTE,
    FORECAST,
    FORECAST2,
    REUSE,
    TAYLORSEER2,
    forecast_coefficients,
    liveness,
)
from tests._helpers.plain_models import PlainDiT, modulate, sample, timesteps

N = 12
PLAN = (1, 1, 0, 1, 3, 1, 4, 3, 1, 2, 3, 1)  # copies, first order, taylor2 and bdf2 in one plan


# ---------------------------------------------------------------------------------- the weights
@pytest.mark.parametrize("seed", range(5))
def test_second_order_is_exact_for_quadratics_with_uneven_gaps(seed):
    rng = random.Random(seed)
    c = rng.randint(0, 5)
    b = c + rng.randint(1, 4)
    a = b + rng.randint(1, 4)
    s = a + rng.randint(1, 4)
    p0, p1, p2 = (rng.uniform(-2, 2) for _ in range(3))

    def q(x: float) -> float:
        return p0 + p1 * x + p2 * x * x

    def dq(x: float) -> float:
        return p1 + 2 * p2 * x

    def forecast(value: int) -> float:
        alpha, beta = forecast_coefficients(value, s, a, b, c)
        return q(a) + alpha * (q(a) - q(b)) + beta * (q(b) - q(c))

    assert forecast(FORECAST2) == pytest.approx(q(s), rel=1e-9, abs=1e-9)
    # BDF2: one step along the exact derivative at a (three-point differences are exact on quadratics)
    assert forecast(BDF2) == pytest.approx(q(a) + (s - a) * dq(a), rel=1e-9, abs=1e-9)
    # first order: the line through a and b; its alpha is the second-order one without curvature
    alpha, beta = forecast_coefficients(FORECAST, s, a, b, c)
    assert beta == 0 and alpha == (s - a) / (a - b)


def test_weights_on_lines_and_with_missing_history():
    for value in (FORECAST, FORECAST2, BDF2):
        alpha, beta = forecast_coefficients(value, 9, 6, 4, 1)
        line = [3.0 - 0.5 * x for x in (6, 4, 1)]
        assert line[0] + alpha * (line[0] - line[1]) + beta * (line[1] - line[2]) == pytest.approx(3 - 4.5)
    assert forecast_coefficients(FORECAST2, 5, 3, 1) == forecast_coefficients(FORECAST, 5, 3, 1)
    assert forecast_coefficients(BDF2, 5, 3) == (0.0, 0.0)
    # uniform gaps: BDF2's derivative is (3 o_a - 4 o_b + o_c) / 2h
    alpha, beta = forecast_coefficients(BDF2, 3, 2, 1, 0)
    assert (1 + alpha, -alpha + beta, -beta) == pytest.approx((2.5, -2.0, 0.5))


# ---------------------------------------------------------------------------------- the runtime
def hand_sample(
    model: PlainDiT, plan: tuple[int, ...], y: torch.Tensor, n: int, seed: int = 0
) -> torch.Tensor:
    """The cache written out by hand: every (layer, type) keeps all its computed outputs, and a
    reused step extrapolates from the last three computed before it with the documented weights."""
    history: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}

    def part(key, step, computed):
        past = history.setdefault(key, [])
        v = plan[step]
        if v == COMPUTE:
            past.append((step, computed))
            return computed
        (a, last), *rest = reversed(past)
        if v == REUSE or not rest:
            return last
        b, prev = rest[0]
        if len(rest) == 1 or v == FORECAST:
            return last + forecast_coefficients(FORECAST, step, a, b)[0] * (last - prev)
        c, prev2 = rest[1]
        alpha, beta = forecast_coefficients(v, step, a, b, c)
        return last + alpha * (last - prev) + beta * (prev - prev2)

    def forward(x, t, yy, step, branch):
        c = model.t_embedder(t) + model.y_embedder(yy)
        h = model.x_embed(x)
        for i, blk in enumerate(model.blocks):
            sm, cm, gm, sf, cf, gf = blk.adaLN_modulation(c).chunk(6, dim=1)
            attn = blk.attn(modulate(blk.norm1(h), sm, cm)) if plan[step] == COMPUTE else None
            h = h + gm.unsqueeze(1) * part((i, "attn"), step, attn)
            ff = blk.mlp(modulate(blk.norm2(h), sf, cf)) if plan[step] == COMPUTE else None
            h = h + gf.unsqueeze(1) * part((i, "ff"), step, ff)
        return model.final(h)

    return sample(model, y, n, seed=seed, forward=forward)


def test_runtime_equals_the_hand_written_reference(plain_dit):
    y = torch.tensor([1, 3])
    schedule = Schedule(N, {"attn": PLAN, "ff": PLAN})
    with torch.no_grad():
        want = hand_sample(plain_dit, PLAN, y, N)
        with stepcache.cache(plain_dit, schedule) as handle:
            got = sample(plain_dit, y, N)
        uncached = sample(plain_dit, y, N)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, uncached)
    assert handle.stats.computed == 2 * 3 * PLAN.count(COMPUTE)


def test_packed_storage_runs_second_order(plain_dit):
    y = torch.tensor([1, 3])
    schedule = Schedule(N, {"attn": PLAN, "ff": PLAN})
    with torch.no_grad():
        with stepcache.cache(plain_dit, schedule):
            exact = sample(plain_dit, y, N)
        with stepcache.cache(plain_dit, schedule, storage_dtype="bf16"):
            packed = sample(plain_dit, y, N)
    torch.testing.assert_close(packed, exact, rtol=0.05, atol=0.05)


def test_offload_refuses_second_order(plain_dit):
    with pytest.raises(StepCacheError, match="second-order"):
        stepcache.cache(plain_dit, Schedule(N, {"attn": PLAN}), offload=True)
    stepcache.cache(
        plain_dit, Schedule(N, {"attn": (1, 1, 2, 1, 0, 1, 1, 2, 2, 1, 0, 1)}), offload=True
    ).close()


# ---------------------------------------------------------------------------------- memory
def test_liveness_counts_the_outputs_later_steps_read():
    held, history = liveness(PLAN)
    assert history == 2
    computes = [s for s, v in enumerate(PLAN) if v == COMPUTE]
    assert [held[s] for s in computes] == [1, 2, 3, 3, 3, 0]
    # a reusing step says what a computation there (nothing stored to reuse) would keep
    assert liveness((1, 3, 1, 3, 3, 1)) == ([1, 0, 2, 1, 0, 0], 2)
    # a copy run between two forecasts still keeps the output the later forecast reads
    assert liveness((1, 1, 0, 2, 1))[0][:2] == [1, 2]
    assert liveness((1, 0, 1, 1)) == ([1, 0, 0, 0], 0)
    assert holdings(fora(10, 3).with_forecast("taylor2").plans["*"]) == [
        1,
        1,
        1,
        2,
        2,
        2,
        3,
        3,
        3,
        0,
    ]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("per_layer", [False, True])
def test_predicted_peak_equals_measured(plain_dit, split, per_layer):
    y = torch.tensor([1, 3])
    comps = stepcache.discover(plain_dit)
    if per_layer:
        rng = random.Random(1)
        plans = {c.name: (1, *(rng.choice((0, 1, 1, 2, 3, 4)) for _ in range(N - 2)), 1) for c in comps}
        schedule = Schedule(N, plans)
    else:
        schedule = Schedule(N, {"attn": PLAN, "ff": fora(N, 3).with_forecast("bdf2").plans["*"]})
    batch = 2 if split else 4  # one call's batch: batched guidance doubles it
    with torch.no_grad():
        sizes = output_bytes(
            plain_dit,
            lambda: plain_dit(
                torch.zeros(batch, 16, 4), torch.zeros(batch), torch.zeros(batch, dtype=torch.long)
            ),
        )
        with stepcache.cache(plain_dit, schedule) as handle:
            sample(plain_dit, y, N, guidance=2.0, split=split)
    peak = predict_peak(schedule, sizes, components=plain_dit, branches=2 if split else 1)
    stats = handle.stats
    assert peak.peak_bytes == stats.peak_stored_bytes > 0
    assert peak.by_type == {k: v.peak_stored_bytes for k, v in stats.by_type.items()}


def test_fora_with_second_order_keeps_three_outputs(plain_dit):
    comps = stepcache.discover(plain_dit)
    sizes = dict.fromkeys((c.name for c in comps), 100)
    uniform = fora(N, 3)
    peaks = [
        predict_peak(s, sizes, components=comps).peak_bytes
        for s in (uniform, uniform.with_forecast(), uniform.with_forecast("taylor2"))
    ]
    assert peaks == [600, 1200, 1800]


# ---------------------------------------------------------------------------------- files
def test_schedule_files_text_and_resampling(tmp_path):
    schedule = Schedule(N, {"attn": PLAN, "ff": fora(N, 3).plans["*"]})
    path = schedule.save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["format_version"] == 2 and data["plans"]["attn"] == list(PLAN)
    assert Schedule.load(path) == schedule
    assert json.loads(fora(N, 3).with_forecast().save(tmp_path / "f.json").read_text())["format_version"] == 1
    assert "##.#^#b^#~^#" in schedule.render()
    with pytest.warns(UserWarning, match="no forecasting"):
        assert schedule.to_smoothcache()["attn1"] == [int(v == COMPUTE) for v in PLAN]
    taylor = fora(20, 4).with_forecast("taylor2")
    assert taylor.meta["forecast"] == "taylor2" and set(taylor.plans["*"]) == {COMPUTE, FORECAST2}
    assert set(taylor.resample(31).plans["*"]) == {COMPUTE, FORECAST2}
    with pytest.raises(stepcache.ScheduleError, match="method"):
        fora(20, 4).with_forecast("third")


def test_with_forecast_converts_a_forecasting_schedule():
    """A schedule that already forecasts (a tuned one, mixed copies and forecasts) is converted, not
    left as it was: every step that does not compute takes the method asked for."""
    mixed = Schedule(8, {"attn": (1, 2, 0, 1, 3, 2, 0, 1), "ff": (1, 0, 0, 1, 0, 1, 2, 1)})
    second = mixed.with_forecast("taylor2")
    assert second.plans == {"attn": (1, 3, 3, 1, 3, 3, 3, 1), "ff": (1, 3, 3, 1, 3, 1, 3, 1)}
    assert second.with_forecast("first-order").plans["attn"] == (1, 2, 2, 1, 2, 2, 2, 1)
    assert second.with_forecast("copy").plans["ff"] == (1, 0, 0, 1, 0, 1, 0, 1)
    assert second.compute_fraction == mixed.compute_fraction


# ---------------------------------------------------------------------------------- calibration
def test_calibration_records_second_order_errors(plain_dit, tmp_path):
    def run():
        return [sample(plain_dit, torch.tensor([1, 2]), 8, seed=s) for s in (0, 1)]

    cal = stepcache.calibrate(plain_dit, run, lookahead=2, second_order=True, progress=False)
    first = stepcache.calibrate(plain_dit, run, lookahead=2, progress=False)
    assert sorted(cal.forecast2_errors) == ["bdf2", "taylor2"] and not first.forecast2_errors
    name = "blocks.1.attn"
    table = cal.forecast2_errors["taylor2"][name]
    assert table.shape == (8, 2, 3, 3)
    # measured exactly where three earlier outputs exist: s - j - m - p >= 0
    for s, j, m, p in np.ndindex(*table.shape):
        assert np.isfinite(table[s, j, m, p]) == (s - (j + 1) - (m + 1) - (p + 1) >= 0)
    np.testing.assert_allclose(cal.errors[name], first.errors[name])
    np.testing.assert_allclose(cal.forecast_errors[name], first.forecast_errors[name])
    # the recorded error is the runtime's forecast: recompute one cell by hand
    outs: dict[int, torch.Tensor] = {}
    module = plain_dit.get_submodule(name)
    tracker = {"step": 0}
    hook = module.register_forward_hook(
        lambda mod, a, o: outs.setdefault(tracker["step"], o.detach().clone())
    )

    def forward(x, t, yy, step, branch):
        tracker["step"] = step
        return plain_dit(x, t, yy)

    with torch.no_grad():
        sample(plain_dit, torch.tensor([1, 2]), 8, seed=0, forward=forward)
    hook.remove()
    s, a, b, c = 7, 5, 3, 2
    alpha, beta = forecast_coefficients(BDF2, s, a, b, c)
    pred = outs[a] + alpha * (outs[a] - outs[b]) + beta * (outs[b] - outs[c])
    one = ((outs[s] - pred).abs().flatten(1).sum(1) / outs[s].abs().flatten(1).sum(1)).mean().item()
    single = stepcache.calibrate(
        plain_dit,
        lambda: sample(plain_dit, torch.tensor([1, 2]), 8, seed=0),
        lookahead=2,
        second_order=True,
        progress=False,
    )
    assert single.forecast2_errors["bdf2"][name][s, s - a - 1, a - b - 1, b - c - 1] == pytest.approx(
        one, rel=1e-5
    )
    # files: format 2 with the tables, round trip; files without them stay format 1; merge pools them
    loaded = Calibration.load(cal.save(tmp_path / "cal.json"))
    np.testing.assert_allclose(loaded.forecast2_errors["bdf2"][name], cal.forecast2_errors["bdf2"][name])
    assert json.loads((tmp_path / "cal.json").read_text())["format_version"] == 2
    assert (
        first.to_dict()["format_version"] == 1
        and "forecast2_errors" not in first.to_dict()["components"][name]
    )
    merged = Calibration.merge([cal, cal.replace(num_samples=cal.num_samples + 1)])  # not cal twice
    np.testing.assert_allclose(merged.forecast2_errors["taylor2"][name], table)
    with pytest.raises(stepcache.CalibrationError, match="second-order"):
        Calibration.merge([cal, first])


def test_shipped_calibrations_still_load():
    from stepcache.reference import shipped_calibration

    cal = shipped_calibration("ddim", 50)
    assert cal is not None and cal.forecast2_errors == {}
    assert FORECAST2 not in optimal_schedule(cal, 0.35).plans["attn"]


# ---------------------------------------------------------------------------------- the policy
def synthetic(n: int = 16, k: int = 3, better: str = "taylor2", seed: int = 0) -> Calibration:
    """A calibration whose ``better`` method beats copying and first order at every cell."""
    rng = np.random.default_rng(seed)
    comps = {"blocks.0.attn": "attn", "blocks.1.attn": "attn"}
    errors, forecast, second = {}, {}, {"taylor2": {}, "bdf2": {}}
    for name in comps:
        copy = rng.uniform(0.1, 0.2, (n, k)) * np.arange(1, k + 1)
        errors[name] = copy
        forecast[name] = np.repeat(copy[:, :, None] * 0.5, k + 1, axis=2)
        for method in second:
            factor = 0.1 if method == better else 0.9
            second[method][name] = np.repeat(forecast[name][..., None] * factor, k + 1, axis=3)
    for table in [*errors.values(), *forecast.values(), *(t for m in second.values() for t in m.values())]:
        for s in range(n):
            table[s, s:] = np.nan  # nothing measured before step 0
    return Calibration(n, k, 4, comps, errors, forecast_errors=forecast, forecast2_errors=second)


@pytest.mark.parametrize(("better", "value"), [("taylor2", FORECAST2), ("bdf2", BDF2)])
def test_optimal_picks_the_method_that_calibrated_best(better, value):
    cal = synthetic(better=better)
    plan = optimal_schedule(cal, 0.4).plans["attn"]
    assert value in plan and FORECAST2 + BDF2 - value not in plan
    # where there is no history for second order yet it falls back to first order
    first = [s for s, v in enumerate(plan) if v != COMPUTE]
    assert plan[first[0]] in (REUSE, FORECAST)
    off = optimal_schedule(cal, 0.4, second_order=False).plans["attn"]
    assert FORECAST2 not in off and BDF2 not in off and FORECAST in off
    with pytest.raises(stepcache.ScheduleError, match="second_order"):
        optimal_schedule(synthetic().replace(forecast2_errors={}), 0.4, second_order=True)


def test_second_order_dp_is_exact_against_brute_force():
    import itertools

    cal = synthetic(n=9, k=2, seed=3)
    rng = np.random.default_rng(5)
    name = "blocks.0.attn"
    copy = cal.errors[name] * rng.uniform(0.5, 2, cal.errors[name].shape)
    fc = cal.forecast_errors[name] * rng.uniform(0.2, 3, cal.forecast_errors[name].shape)
    fc2 = {m: t[name] * rng.uniform(0.1, 12, t[name].shape) for m, t in cal.forecast2_errors.items()}
    curve = cost_curve(copy, fc, None, fc2)
    best: dict[int, float] = {}
    for mid in itertools.product((0, 1), repeat=7):
        comp = (1, *mid, 1)
        holes = [i for i, v in enumerate(comp) if v == 0]
        for fill in itertools.product((REUSE, FORECAST, FORECAST2, BDF2), repeat=len(holes)):
            plan = list(comp)
            for h, v in zip(holes, fill, strict=True):
                plan[h] = v
            cost = plan_cost(tuple(plan), copy, fc, None, fc2)
            best[sum(comp)] = min(best.get(sum(comp), np.inf), cost)
    for count, cost in best.items():
        assert curve.cost[count] == pytest.approx(cost)
        if np.isfinite(cost):
            assert plan_cost(curve.plans[count], copy, fc, None, fc2) == pytest.approx(cost)


def test_memory_budget_counts_three_outputs():
    cal = synthetic()
    sizes = dict.fromkeys(cal.components, 1000)
    schedule = optimal_schedule(cal, 0.4, granularity="layer")
    assert max(max(liveness(p)[0]) for p in schedule.plans.values()) == 3
    comps = [
        stepcache.discovery.Component(n, "attn", n.rpartition(".")[0], "blocks", i, torch.nn.Identity())
        for i, n in enumerate(cal.components)
    ]
    full = predict_peak(schedule, sizes, components=comps).peak_bytes
    assert full == 6000
    fitted = fit_memory(schedule, cal, 4000, sizes)
    assert predict_peak(fitted, sizes, components=comps).peak_bytes <= 4000
    assert fitted.meta["memory"]["unplanned_peak"] == 6000
    # lowering the forecast order (or copying) frees memory without computing more
    assert fitted.compute_fraction == pytest.approx(schedule.compute_fraction)
    assert max(max(liveness(p)[0]) for p in fitted.plans.values()) == 3  # one component still holds three
    tight = fit_memory(schedule, cal, 2000, sizes)
    assert predict_peak(tight, sizes, components=comps).peak_bytes <= 2000


def test_samples_are_what_the_reference_loop_gives(plain_dit):
    """The same check as the hand reference, with classifier-free guidance split in two calls."""
    y = torch.tensor([2, 4])
    schedule = Schedule(N, {"attn": PLAN, "ff": PLAN})
    with torch.no_grad(), stepcache.cache(plain_dit, schedule):
        split = sample(plain_dit, y, N, guidance=2.0, split=True)
    assert torch.isfinite(split).all()
    assert len(timesteps(N)) == N


# ---------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("per_layer", [False, True])
def test_compiled_second_order_equals_eager_bit_for_bit(plain_dit, per_layer):
    from torch._dynamo.utils import counters

    y = torch.tensor([1, 2])
    if per_layer:
        rng = random.Random(2)
        comps = stepcache.discover(plain_dit)
        schedule = Schedule(
            N, {c.name: (1, *(rng.choice((0, 1, 2, 3, 4)) for _ in range(N - 2)), 1) for c in comps}
        )
    else:
        schedule = Schedule(N, {"attn": PLAN, "ff": fora(N, 3).with_forecast("bdf2").plans["*"]})
    with torch.no_grad():
        with stepcache.cache(plain_dit, schedule):
            eager = sample(plain_dit, y, N, guidance=2.0)
        torch._dynamo.reset()
        counters.clear()
        for block in plain_dit.blocks:
            block.compile(backend="aot_eager")
        with (
            torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
            stepcache.cache(plain_dit, schedule) as handle,
        ):
            first = sample(plain_dit, y, N, guidance=2.0)
            second = sample(plain_dit, y, N, guidance=2.0)
    breaks = sum(counters["graph_break"].values())
    unique = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert (
        breaks == 0 and unique <= 8
    )  # first call of a generation, then one graph: not per step or plan value
    assert handle.stats.generations == 2


def test_taylorseer2_is_the_taylor_series_with_backward_difference_derivatives():
    """Plan value 5: ``o_a + k D1 + k^2 D2 / 2`` with ``D1 = (o_a - o_b) / h1`` and ``D2 = (D1 - (o_b -
    o_c) / h2) / h1``, as TaylorSeer updates its factors; exact on lines, damped on parabolas (between
    first order and the Lagrange parabola at equal gaps)."""
    o = {7: 0.3, 4: -1.2, 2: 2.5}
    for s, (a, b, c) in ((8, (7, 4, 2)), (10, (7, 4, 2))):
        k, h1, h2 = s - a, a - b, b - c
        d1, d1b = (o[a] - o[b]) / h1, (o[b] - o[c]) / h2
        want = o[a] + k * d1 + k * k * ((d1 - d1b) / h1) / 2
        alpha, beta = forecast_coefficients(TAYLORSEER2, s, a, b, c)
        assert o[a] + alpha * (o[a] - o[b]) + beta * (o[b] - o[c]) == pytest.approx(want)
    line = [3.0 - 0.5 * x for x in (6, 4, 1)]
    alpha, beta = forecast_coefficients(TAYLORSEER2, 9, 6, 4, 1)
    assert line[0] + alpha * (line[0] - line[1]) + beta * (line[1] - line[2]) == pytest.approx(3 - 4.5)
    first, lagrange = (
        forecast_coefficients(FORECAST, 5, 4, 2, 0),
        forecast_coefficients(FORECAST2, 5, 4, 2, 0),
    )
    alpha, beta = forecast_coefficients(TAYLORSEER2, 5, 4, 2, 0)
    assert first[0] < alpha < lagrange[0] and lagrange[1] < beta < 0
    assert forecast_coefficients(TAYLORSEER2, 5, 3, 1) == forecast_coefficients(FORECAST, 5, 3, 1)
    assert Schedule(6, {"*": (1, 1, 0, 1, 0, 0)}).with_forecast("taylorseer2").plans["*"] == (
        1,
        1,
        5,
        1,
        5,
        5,
    )
