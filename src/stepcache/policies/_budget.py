"""Memory budgets: make any policy's schedule fit a byte budget for its stored outputs.

A reuse needs the output it reuses to be stored, so a memory budget bounds how many components can
reuse at once. :func:`fit_memory` takes a schedule (any policy's), the calibration it came from and
the components' output sizes, and returns per-component plans whose predicted peak (the runtime's
liveness rule, :func:`stepcache.memory.predict_peak`) is within the budget:

1. **Repair.** While the peak is over budget, look at the components holding an output at the
   peak's moment. For each, up to three moves free memory there: *compute* (the step it holds at,
   and the next one, compute instead of reusing: it then holds nothing at that moment), for a
   forecasting plan holding two or three outputs *copy* (its forecasts become copies: one output
   held) and, for a second-order plan holding three, *first order* (its second-order forecasts
   become first-order ones: two held).
   Each move is priced by its change of calibrated error plus ``lam`` per extra computation (``lam``:
   the median calibrated error one computation buys, measured on the given plans), per byte it
   frees at the peak; the cheapest is made. Every move adds computations or drops forecasts, so
   this ends (an all-compute plan holds nothing).
2. **Give back.** The repair may add more computations than the budget needs (each move computes
   two steps). While the plans compute more than the schedule asked for, turn back into a reuse
   one of the *added* computations, the one whose removal raises the calibrated error least among
   those that keep the peak within budget (and no reuse run longer than the calibration's
   lookahead). Every computation the policy placed stays: the fitted schedule computes a superset
   of the policy's steps, so a budget costs speed, not the policy's choices (moving computations
   to other steps by the calibrated error alone made final samples worse on the reference model:
   the calibrated error is a poor guide to where computations matter; docs/policies.md).

Limits, stated plainly: both phases are greedy on the *calibrated* (open-loop) error, not exact;
when the budget is below what the compute fraction needs (a reuse at a step needs its output
stored, so about ``1 - budget / unplanned peak`` of the components must compute at every step),
the result computes more than asked and ``meta["memory"]`` records the fraction reached. Cheaper
storage (``storage_dtype``), whole-block components (one output per block instead of one per
attention/feed-forward) and offloading are the ways to keep the compute fraction at small budgets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from torch import nn

from ..discovery import Component
from ..errors import ScheduleError
from ..memory import MAX_BYTES, exact_dtype, holdings, parse_bytes, peak_profile
from ..schedule import COMPUTE, FORECAST, FORECASTS, REUSE, Schedule, liveness, reads
from ._cost import plan_cost

if TYPE_CHECKING:
    from ..calibration import Calibration

__all__ = ["calibration_components", "fit_memory", "resolve_sizes"]

logger = logging.getLogger(__name__)


class _Calibrated(Protocol):
    """Anything that records its components by name and type (a calibration, a guidance calibration)."""

    @property
    def components(self) -> Mapping[str, str]: ...


def calibration_components(calibration: _Calibrated, order: Any = None) -> list[Component]:
    """The calibration's components as :class:`Component` values (names and types; no modules), in
    ``order`` (names, e.g. an ``output_bytes`` result: call order) when given."""
    names = [n for n in (order or calibration.components) if n in calibration.components]
    out = []
    for name in names:
        kind = calibration.components[name]
        block = name if kind == "block" else name.rpartition(".")[0]
        stack, _, index = block.rpartition(".")
        out.append(Component(name, kind, block, stack, int(index) if index.isdigit() else 0, nn.Identity()))
    return out


def resolve_sizes(calibration: Calibration, sizes: Mapping[str, int] | None) -> dict[str, int]:
    """Bytes per output of every calibrated component: ``sizes`` or the calibration's
    ``meta["output_bytes"]``; refused with what to do when neither covers them all."""
    if sizes is None:
        sizes = calibration.meta.get("output_bytes")
        if sizes is None:
            raise ScheduleError(
                "a memory budget needs each component's output size: pass sizes=stepcache.memory.output_bytes("
                "model, run) (a meta-device model costs nothing), or record them in the calibration's "
                'meta["output_bytes"].'
            )
    if not isinstance(sizes, Mapping):
        raise ScheduleError(
            f"sizes must map component names to bytes per output, got {type(sizes).__name__}."
        )
    missing = [n for n in calibration.components if n not in sizes]
    if missing:
        raise ScheduleError(
            f"sizes has no output size for {len(missing)} calibrated component(s), e.g. {missing[:3]}; "
            "measure them with output_bytes(...) on the model the calibration was recorded on."
        )
    bad = [
        n
        for n in calibration.components
        if isinstance(sizes[n], bool) or not isinstance(sizes[n], int) or not 0 <= sizes[n] <= MAX_BYTES
    ]
    if bad:
        raise ScheduleError(
            f"sizes must be whole numbers of bytes from 0 to {MAX_BYTES}; {bad[0]!r} has {sizes[bad[0]]!r}."
        )
    return {n: int(sizes[n]) for n in sizes if n in calibration.components}


def fit_memory(
    schedule: Schedule,
    calibration: Calibration,
    memory_budget: int | str,
    sizes: Mapping[str, int] | None = None,
    *,
    branches: int = 1,
    weighted: bool = False,
) -> Schedule:
    """``schedule`` made to fit ``memory_budget`` bytes of stored outputs (see the module doc).

    Args:
        schedule: a policy's schedule for the model ``calibration`` was recorded on.
        calibration: error tables that price each change.
        memory_budget: bytes (an int, or a string such as ``"16GB"`` or ``"512MiB"``).
        sizes: component name -> bytes per stored output (:func:`stepcache.memory.output_bytes`, with
            the cache's ``storage_dtype``); default: the calibration's ``meta["output_bytes"]``.
        branches: 2 for split classifier-free guidance (one store per branch).
        weighted: price errors with the calibration's sensitivity weights.

    Returns the schedule itself (with ``meta["memory"]``) when it already fits, else per-component
    plans that do. Raises :class:`ScheduleError` for a bad budget or missing sizes.
    """
    try:
        budget = parse_bytes(memory_budget)
    except Exception as e:
        raise ScheduleError(str(e)) from None
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ScheduleError(f"branches must be a positive integer, got {branches!r}.")
    sizes = resolve_sizes(calibration, sizes)
    comps = calibration_components(calibration, sizes)
    resolved = schedule.resolve(comps)
    comps = [c for c in comps if c.name in resolved]
    names = [c.name for c in comps]
    size = np.array([sizes[n] for n in names], dtype=exact_dtype([sizes[n] for n in names], branches))
    plans = [list(resolved[n]) for n in names]
    rows = np.array([holdings(p) for p in plans], dtype=np.int64)
    unplanned = branches * int(sum(size[j] * (1 + liveness(tuple(plans[j]))[1]) for j in range(len(names))))
    peak = peak_profile(rows, size, branches)
    asked = sum(p.count(COMPUTE) for p in plans)
    info: dict[str, Any] = {"budget": budget, "branches": branches, "unplanned_peak": unplanned}
    if peak[0] <= budget:
        return _with_memory(schedule, {**info, "predicted_peak": peak[0], "changed": False})
    weights = dict(calibration.weights) if weighted else {}
    fcs = dict(calibration.forecast_errors)
    fc2s = {n: {m: t[n] for m, t in calibration.forecast2_errors.items()} for n in names}

    def cost(j: int, plan: list[int]) -> float:
        n = names[j]
        return plan_cost(tuple(plan), calibration.errors[n], fcs.get(n), weights.get(n), fc2s.get(n))

    costs = [cost(j, p) for j, p in enumerate(plans)]
    fills = [max((v for v in FORECASTS if v in p), key=p.count, default=REUSE) for p in plans]
    lam = _price_of_a_computation(plans, costs, fills, cost)
    n_steps = schedule.num_steps
    while peak[0] > budget:  # 1. repair
        _, s, b, i = peak
        best: tuple[float, int, list[int]] | None = None
        for j in range(len(names)):
            t = s if j <= i else s - 1  # the step whose holding counts at the peak (this branch)
            counted = rows[j, t] if t >= 0 else 0
            moves = []
            if counted:
                moved = list(plans[j])
                for u in (t, t + 1):
                    if u < n_steps:
                        moved[u] = COMPUTE
                moves.append(moved)
                if counted >= 2 and any(v in FORECASTS for v in plans[j]):
                    moves.append([REUSE if v in FORECASTS else v for v in plans[j]])
                if counted == 3:
                    moves.append([FORECAST if reads(v) == 2 else v for v in plans[j]])
            for moved in moves:
                row = np.array(holdings(moved), dtype=np.int64)
                freed = _at_moment(rows[j], s, b, j <= i, branches) - _at_moment(row, s, b, j <= i, branches)
                if freed <= 0:
                    continue
                extra = moved.count(COMPUTE) - plans[j].count(COMPUTE)
                price = (cost(j, moved) - costs[j] + lam * extra) / (freed * size[j])
                if best is None or price < best[0]:
                    best = (price, j, moved)
        if best is None:  # nothing frees memory at this moment: compute everything of its biggest holder
            j = int(np.argmax(rows[:, s] * size))
            best = (0.0, j, [COMPUTE] * n_steps)
        _, j, moved = best
        plans[j], costs[j] = moved, cost(j, moved)
        rows[j] = holdings(moved)
        peak = peak_profile(rows, size, branches)
    computes = sum(p.count(COMPUTE) for p in plans)
    original = [resolved[n] for n in names]
    while computes > asked:  # 2. give back added computations
        options = []
        for j, plan in enumerate(plans):
            for t, v in enumerate(plan):
                if v != COMPUTE or original[j][t] == COMPUTE:
                    continue
                moved = list(plan)
                # The policy's own value, unless the repair lowered this plan's forecast order (copies
                # instead of forecasts, or first order instead of second).
                depth = liveness(tuple(plan))[1]
                value = original[j][t]
                moved[t] = value if reads(value) <= depth else (FORECAST if depth == 1 else REUSE)
                c = cost(j, moved)
                if math.isfinite(c):
                    options.append((c - costs[j], j, t, moved, c))
        options.sort(key=lambda o: (o[0], o[1], o[2]))
        for _, j, _, moved, c in options:
            old = rows[j].copy()
            rows[j] = holdings(moved)
            trial = peak_profile(rows, size, branches)
            if trial[0] <= budget:
                plans[j], costs[j], peak = moved, c, trial
                computes -= 1
                break
            rows[j] = old
        else:
            break
    fitted = Schedule(
        n_steps, {n: tuple(p) for n, p in zip(names, plans, strict=True)}, meta=dict(schedule.meta)
    )
    info |= {
        "predicted_peak": peak[0],
        "changed": True,
        "asked_compute_fraction": round(schedule.compute_fraction, 6),
        "compute_fraction": round(fitted.compute_fraction, 6),
    }
    if computes > asked:
        logger.warning(
            "memory budget %d bytes: the schedule computes %.3f of calls instead of %.3f to fit (stored outputs "
            "need memory at every reused step). Cheaper storage (storage_dtype='fp8'), whole-block components "
            "or offload=True keep the compute fraction.",
            budget,
            fitted.compute_fraction,
            schedule.compute_fraction,
        )
    return _with_memory(fitted, info)


def _at_moment(row: np.ndarray, s: int, b: int, done: bool, branches: int) -> int:
    """Outputs a component with holdings ``row`` contributes at the moment (step s, branch b, after
    component i; ``done``: this component came at or before i)."""
    now = int(row[s])
    before = int(row[s - 1]) if s > 0 else 0
    return b * now + (branches - 1 - b) * before + (now if done else before)


def _price_of_a_computation(plans: list[list[int]], costs: list[float], fills: list[int], cost: Any) -> float:
    """The median, over components, of the least calibrated error one computation removes (what
    the re-spend phase pays to give a computation back)."""
    gains = []
    for j, plan in enumerate(plans):
        best = math.inf
        for t, v in enumerate(plan):
            if v == COMPUTE and 0 < t < len(plan) - 1:
                moved = list(plan)
                moved[t] = fills[j]
                best = min(best, cost(j, moved) - costs[j])
        if math.isfinite(best):
            gains.append(max(best, 0.0))
    return float(np.median(gains)) if gains else 0.0


def _with_memory(schedule: Schedule, info: dict[str, Any]) -> Schedule:
    return Schedule(schedule.num_steps, schedule.plans, schedule.counts, {**schedule.meta, "memory": info})
