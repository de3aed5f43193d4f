"""Budgeted optimal schedules: exact per-component dynamic programming plus a global allocation.

SmoothCache's rule is greedy and local: from a computed step it jumps as far as the error of the
*last* reused step allows. Here the same calibration is used as a cost model instead:

* Reusing at step ``s`` the output computed at ``a = s - j`` costs ``w[s] * e(s, j)``, where ``e`` is
  the calibrated error of the best predictor: copying (``errors[s, j-1]``) or, when the previous
  computation ``b = a - m`` exists, the first-order forecast ``o_a + (j/m)(o_a - o_b)``
  (``forecast_errors[s, j-1, m-1]``) or, when the one before, ``c = b - p``, exists too and the
  calibration recorded them, a second-order forecast (``forecast2_errors[method][s, j-1, m-1, p-1]``,
  methods ``taylor2`` and ``bdf2``). Ties go to the lower order (it keeps fewer outputs). ``w`` are
  optional sensitivity weights (how much one unit of error at that step moves the final sample;
  see :func:`stepcache.sensitivity`).
* For one component (or one type), choosing which steps compute is a shortest path over steps whose
  state is (last compute, gap to the compute before it, and, with second-order errors, the gap
  before that): the gaps decide the forecasts. Solving it for every number of computations at once
  gives that component's exact cost curve.
* One global budget is then shared across components. A computation of a component costs the
  layers it stands for (times its MACs per call when the budget is in MACs). With whole-number costs
  (calls) the split is solved exactly by a min-plus knapsack over the cost curves and the budget is
  met exactly (up to the granularity: a type plan stands for all its layers); with MAC costs, by a
  Lagrangian (minimise ``cost(c) + lambda * unit * c``, bisection on ``lambda``) plus a greedy fill.

Everything is deterministic: ties break towards fewer computations and earlier components.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ScheduleError
from ..schedule import COMPUTE, FORECAST, REUSE, Schedule
from ._budget import fit_memory
from ._cost import INF as _INF
from ._cost import finite as _finite
from ._cost import plan_cost
from ._cost import second_order_tables as _second
from ._plan import check_fraction, error_tables

if TYPE_CHECKING:
    from ..calibration import Calibration

__all__ = ["CostCurve", "allocate", "cost_curve", "optimal_schedule", "plan_cost"]

# Cells of the knapsack table (budget units x components): 4e6 cells are ~100 MB with their back-pointers.
_MAX_KNAPSACK_CELLS = 4_000_000


def _step_cost(
    copy: np.ndarray,
    fc: np.ndarray | None,
    s: int,
    j: int,
    m: int,
    fc2: Mapping[int, np.ndarray] | None = None,
    p: int = 0,
) -> tuple[float, int]:
    """(cost, plan value) of the best predictor at step ``s``, ``j`` after the last compute, whose
    previous compute lies ``m`` before it (``m = 0``: none) and the one before that ``p`` before the
    previous (``p = 0``: none); ``fc2``: plan value -> second-order table. Ties: the lower order."""
    best, value = copy[s, j - 1], REUSE
    if fc is not None and m >= 1:
        f = fc[s, j - 1, m - 1]
        if f < best:
            best, value = f, FORECAST
    if fc2 and m >= 1 and p >= 1:
        for v, table in fc2.items():
            f = table[s, j - 1, m - 1, p - 1]
            if f < best:
                best, value = f, v
    return best, value


@dataclass(frozen=True)
class CostCurve:
    """Exact optimum for one component at every number of computations.

    Attributes:
        cost: ``cost[c]`` = least total weighted error with exactly ``c`` computations (inf where
            impossible: ``c < 2`` or runs longer than the lookahead would be needed).
        plans: ``plans[c]`` = the plan achieving it (``None`` where impossible).
    """

    cost: np.ndarray
    plans: tuple[tuple[int, ...] | None, ...]

    @property
    def feasible(self) -> np.ndarray:
        return np.flatnonzero(np.isfinite(self.cost))


def cost_curve(
    errors: np.ndarray,
    forecast_errors: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    forecast2_errors: Mapping[str, np.ndarray] | None = None,
) -> CostCurve:
    """Solve the per-component schedule exactly for every compute count (dynamic programming).

    Args:
        errors: ``(n, k)`` calibrated copy errors, ``errors[s, j-1]`` for reusing step ``s-j`` at ``s``.
        forecast_errors: ``(n, k, k+1)`` first-order forecast errors, or ``None`` to copy only.
        weights: ``(n,)`` per-step multipliers of the error (default: ones).
        forecast2_errors: method (``"taylor2"``, ``"bdf2"``) -> ``(n, k, k+1, k+1)`` second-order
            forecast errors (needs ``forecast_errors``), or ``None``.

    The first and the last step always compute; no reuse run is longer than ``k``.
    """
    copy = _finite(errors)
    n, k = copy.shape
    fc = None if forecast_errors is None else _finite(forecast_errors)
    if fc is not None and fc.shape != (n, k, k + 1):
        raise ScheduleError(f"forecast errors have shape {fc.shape}, expected {(n, k, k + 1)}.")
    fc2 = _second(forecast2_errors, n, k) if fc is not None else None
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ScheduleError(f"weights must be {n} finite numbers >= 0, got shape {w.shape}.")
    gaps = k + 2  # gap index 0 = no previous compute, 1..k+1 = distance to it
    gaps2 = gaps if fc2 else 1  # the gap before that: only second-order forecasts depend on it
    # best[t, g, p] = cost vector over compute counts for paths whose last compute is t, with gap g
    # to the compute before it and gap p before that one.
    best = np.full((n, gaps, gaps2, n + 1), _INF)
    # The previous state's p (second order: its g is this state's p), else its g.
    back = np.full((n, gaps, gaps2, n + 1), -1, dtype=np.int64)
    best[0, 0, 0, 1] = 0.0
    for t in range(n - 1):
        for g in range(gaps):
            for p in range(gaps2):
                row = best[t, g, p]
                if not np.isfinite(row).any():
                    continue
                run = 0.0  # cost of reusing steps t+1..t+d-1 after a compute at t with gaps g, p
                for d in range(1, k + 2):
                    u = t + d
                    if u >= n:
                        break
                    if d > 1:
                        run += w[u - 1] * _step_cost(copy, fc, u - 1, d - 1, g, fc2, p)[0]
                        if not math.isfinite(run):
                            break
                    cand = np.full(n + 1, _INF)
                    cand[1:] = row[:-1] + run
                    q = g if fc2 else 0
                    better = cand < best[u, d, q]
                    if better.any():
                        best[u, d, q] = np.where(better, cand, best[u, d, q])
                        back[u, d, q] = np.where(better, p if fc2 else g, back[u, d, q])
    final = best[n - 1].reshape(gaps * gaps2, n + 1)
    cost = final.min(axis=0)
    plans: list[tuple[int, ...] | None] = []
    for c in range(n + 1):
        if not math.isfinite(cost[c]):
            plans.append(None)
            continue
        g, p = divmod(int(np.argmin(final[:, c])), gaps2)
        computes, t = [], n - 1
        while True:
            computes.append(t)
            if t == 0:
                break
            prev = int(back[t, g, p, c])
            t, c = t - g, c - 1
            g, p = (p, prev) if fc2 else (prev, 0)
        computes.reverse()
        plans.append(_plan_from_computes(copy, fc, n, computes, fc2))
    return CostCurve(cost=cost, plans=tuple(plans))


def _plan_from_computes(
    copy: np.ndarray,
    fc: np.ndarray | None,
    n: int,
    computes: list[int],
    fc2: Mapping[int, np.ndarray] | None = None,
) -> tuple[int, ...]:
    plan = [REUSE] * n
    for i, a in enumerate(computes):
        plan[a] = COMPUTE
        nxt = computes[i + 1] if i + 1 < len(computes) else n
        m = 0 if i < 1 else a - computes[i - 1]
        p = 0 if i < 2 else computes[i - 1] - computes[i - 2]
        for s in range(a + 1, nxt):
            plan[s] = _step_cost(copy, fc, s, s - a, m, fc2, p)[1]
    return tuple(plan)


def allocate(curves: Mapping[str, CostCurve], units: Mapping[str, float], budget: float) -> dict[str, int]:
    """Compute counts per component minimising the summed cost, spending as much of ``budget`` as fits.

    ``units[key]`` is what one computation of ``key`` costs. When every unit is a whole number (a call
    budget: a type plan costs its number of layers), the allocation is solved exactly by a min-plus
    knapsack over components, and the budget is met exactly whenever some allocation hits it (else
    the largest that fits). Otherwise (a MAC budget) a Lagrangian relaxation (bisection on the price
    of one unit of compute) picks the largest allocation on the lower convex hull within budget, and
    the remainder goes one computation at a time where it lowers the cost most per unit.

    Raises:
        ScheduleError: the budget is below the cheapest feasible allocation.
    """
    keys = list(curves)
    if any(not math.isfinite(units[key]) or units[key] < 0 for key in keys) or not math.isfinite(budget):
        raise ScheduleError("units and budget must be finite numbers >= 0.")
    floor = sum(units[key] * int(curves[key].feasible[0]) for key in keys)
    if budget + 1e-9 < floor:
        raise ScheduleError(f"budget {budget:g} is below the least possible {floor:g}.")
    if all(float(units[key]).is_integer() for key in keys):
        # Whole units (calls, or MACs that happen to be whole numbers): in multiples of their common
        # divisor the knapsack is exact, but its table has one cell per unit of budget and component,
        # so it is used only while that stays small; MAC counts (~1e8 each) fall back to the Lagrangian.
        ints = {key: int(units[key]) for key in keys}
        step = math.gcd(*ints.values()) or 1
        cells = math.floor(budget / step + 1e-9)
        if (cells + 1) * len(keys) <= _MAX_KNAPSACK_CELLS:
            return _knapsack(curves, {key: ints[key] // step for key in keys}, cells)
    return _lagrangian(curves, units, budget)


def _knapsack(curves: Mapping[str, CostCurve], units: Mapping[str, int], budget: int) -> dict[str, int]:
    keys = list(curves)
    table = np.full(budget + 1, _INF)  # table[b] = least cost of the components so far spending b
    table[0] = 0.0
    choices = []
    for key in keys:
        u, curve = units[key], curves[key]
        new = np.full(budget + 1, _INF)
        pick = np.full(budget + 1, -1, dtype=np.int64)
        for c in curve.feasible:  # ascending: ties keep the fewest computations
            spend = int(c) * u
            if spend > budget:
                break
            cand = np.full(budget + 1, _INF)
            cand[spend:] = table[: budget + 1 - spend] + curve.cost[c]
            better = cand < new
            new[better], pick[better] = cand[better], c
        table = new
        choices.append(pick)
    reachable = np.flatnonzero(np.isfinite(table))
    b = int(reachable[-1])  # spend the whole budget when possible: more computations, never fewer
    counts: dict[str, int] = {}
    for key, pick in zip(reversed(keys), reversed(choices), strict=True):
        c = int(pick[b])
        counts[key] = c
        b -= c * units[key]
    return {key: counts[key] for key in keys}


def _lagrangian(curves: Mapping[str, CostCurve], units: Mapping[str, float], budget: float) -> dict[str, int]:
    keys = list(curves)

    def pick(lam: float) -> dict[str, int]:
        out = {}
        for key in keys:
            feas = curves[key].feasible
            vals = curves[key].cost[feas] + lam * units[key] * feas
            out[key] = int(feas[int(np.argmin(vals))])  # argmin takes the first: fewest computes
        return out

    def spend(counts: dict[str, int]) -> float:
        return sum(units[key] * counts[key] for key in keys)

    scale = max(float(np.max(c.cost[c.feasible])) for c in curves.values()) + 1.0
    lo, hi = 0.0, scale / max(min(units.values()), 1e-12) + 1.0  # at hi everyone takes its minimum
    counts = pick(hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        trial = pick(mid)
        if spend(trial) <= budget + 1e-9:
            hi, counts = mid, trial
        else:
            lo = mid
    while True:  # greedy fill: the best single extra computation per unit, until nothing fits
        best_key, best_gain = None, -_INF
        left = budget - spend(counts)
        for key in keys:
            c, cost = counts[key], curves[key].cost
            if units[key] > left + 1e-9 or c + 1 >= len(cost) or not math.isfinite(cost[c + 1]):
                continue
            gain = (cost[c] - cost[c + 1]) / max(units[key], 1e-12)
            if gain > best_gain:
                best_key, best_gain = key, gain
        if best_key is None:
            return counts
        counts[best_key] += 1


def optimal_schedule(
    calibration: Calibration,
    fraction: float,
    *,
    granularity: str = "type",
    forecast: bool | None = None,
    weighted: bool | None = None,
    budget: str = "calls",
    second_order: bool | None = None,
    memory_budget: int | str | None = None,
    sizes: Mapping[str, int] | None = None,
    branches: int = 1,
) -> Schedule:
    """The schedule with the least total calibrated error for a compute budget (exact DP).

    Each component (``granularity="layer"``) or type (``"type"``) gets the plan that minimises the
    *sum* of the errors of its reused steps for its number of computations, each reused step
    copying or forecasting (first order, or with ``second_order`` the second-order methods too),
    whichever calibrated best; one global budget is shared among them
    exactly (a knapsack over call counts, a Lagrangian over MACs; see :func:`allocate`).

    Args:
        fraction: share of component calls (``budget="calls"``) or of cached MACs
            (``budget="macs"``: an expensive component's computation costs more) to execute.
        forecast: let reused steps use the first-order forecast where it calibrated better;
            ``None`` = whenever the calibration recorded forecast errors.
        weighted: multiply errors by the calibration's sensitivity weights
            (:func:`stepcache.sensitivity`); ``None`` = whenever it has them.
        budget: ``"calls"`` or ``"macs"``.
        second_order: let reused steps use the second-order forecasts (plan values 3 and 4) where
            they calibrated better; ``None`` = whenever the calibration recorded their errors
            (``calibrate(..., second_order=True)``). Such plans keep three outputs per component
            (docs/memory.md); with ``memory_budget`` the fitting counts them.
        memory_budget: bytes the stored outputs may hold at once (an int, or ``"16GB"``, ``"512MiB"``):
            the schedule is then fitted to it (:func:`stepcache.policies._budget.fit_memory`), which
            may compute more than asked when the budget is tight (``meta["memory"]`` says).
        sizes: component name -> bytes per stored output (:func:`stepcache.memory.output_bytes`),
            needed with ``memory_budget`` unless the calibration records ``meta["output_bytes"]``.
        branches: stores per component: 2 for split classifier-free guidance.

    With a memory budget the exact DP's schedule is then fitted greedily (not exactly) to it.
    """
    check_fraction(fraction)
    if budget not in ("calls", "macs"):
        raise ScheduleError(f"budget must be 'calls' or 'macs', got {budget!r}.")
    tables, counts = error_tables(calibration, granularity)
    has_fc, has_w = bool(calibration.forecast_errors), bool(calibration.weights)
    if forecast and not has_fc:
        raise ScheduleError(
            "this calibration has no forecast errors: recalibrate with forecast=True "
            "(the default), or pass forecast=False."
        )
    if weighted and not has_w:
        raise ScheduleError(
            "this calibration has no sensitivity weights: run stepcache.sensitivity() on it, or pass "
            "weighted=False."
        )
    has_fc2 = bool(calibration.forecast2_errors)
    if second_order and not (has_fc2 and (forecast or forecast is None)):
        raise ScheduleError(
            "second_order=True needs second-order forecast errors: recalibrate with "
            "calibrate(..., second_order=True) (and keep forecast on)."
        )
    forecast = has_fc if forecast is None else forecast
    weighted = has_w if weighted is None else weighted
    second_order = (has_fc2 and bool(forecast)) if second_order is None else second_order
    fc2s: dict[str, dict[str, np.ndarray]] = {}
    if granularity == "type":
        fcs = calibration.type_forecast_errors() if forecast else {}
        ws = calibration.type_weights() if weighted else {}
        if second_order:
            for method, by_type in calibration.type_forecast2_errors().items():
                for key, table in by_type.items():
                    fc2s.setdefault(key, {})[method] = table
    else:
        fcs = dict(calibration.forecast_errors) if forecast else {}
        ws = dict(calibration.weights) if weighted else {}
        if second_order:
            for method, by_name in calibration.forecast2_errors.items():
                for key, table in by_name.items():
                    fc2s.setdefault(key, {})[method] = table
    units = {}
    for key in tables:
        macs = 1.0
        if budget == "macs":
            names = [n for n, t in calibration.components.items() if key in (n, t)]
            values = [calibration.macs.get(n) for n in names]
            known = [float(v) for v in values if v is not None]
            if len(known) != len(values):
                raise ScheduleError("budget='macs' needs MACs per component; this calibration has none.")
            macs = float(np.mean(known))
        units[key] = counts[key] * macs
    if not sum(units.values()) > 0:
        raise ScheduleError(
            "budget='macs' needs components that cost something: this calibration records 0 MACs for "
            "all of them. Use budget='calls'."
        )
    curves = {key: cost_curve(tables[key], fcs.get(key), ws.get(key), fc2s.get(key)) for key in tables}
    total = sum(units.values()) * calibration.num_steps
    try:
        alloc = allocate(curves, units, fraction * total)
    except ScheduleError:
        least = sum(units[key] * int(curves[key].feasible[0]) for key in tables) / total
        raise ScheduleError(
            f"compute fraction {fraction:g} is out of reach: with lookahead {calibration.lookahead} the "
            f"smallest this calibration allows is {least:.3f}. Calibrate with a larger lookahead, or "
            "ask for more compute."
        ) from None
    plans: dict[str, tuple[int, ...]] = {}
    for key, c in alloc.items():
        plan = curves[key].plans[c]
        assert plan is not None  # allocate() picks feasible counts only
        plans[key] = plan
    meta = {
        "rule": "optimal",
        "granularity": granularity,
        "forecast": "calibrated" if forecast else None,
        "second_order": bool(second_order),
        "weighted": bool(weighted),
        "budget": budget,
        "target_compute_fraction": float(fraction),
        "expected_cost": float(sum(curves[key].cost[c] * counts[key] for key, c in alloc.items())),
        **calibration.provenance(),
    }
    schedule = Schedule(calibration.num_steps, plans, counts, meta)
    if memory_budget is None:
        return schedule
    return fit_memory(schedule, calibration, memory_budget, sizes, branches=branches, weighted=bool(weighted))
