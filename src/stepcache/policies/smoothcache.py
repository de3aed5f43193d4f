"""SmoothCache's rule (Roblox, 2024): one error threshold alpha turns calibrated curves into a plan.

From a computed step, reuse for as many following steps as the calibrated error of the last reused
one stays under alpha (at most the calibration's lookahead k), then compute again. Open loop and
greedy, exactly as the original package does it; :func:`for_compute_fraction` finds the alpha for
a compute budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ScheduleError
from ..schedule import COMPUTE, REUSE, Schedule
from ._budget import fit_memory
from ._plan import budget_calls, check_alpha, check_fraction, error_tables

if TYPE_CHECKING:
    from ..calibration import Calibration

__all__ = ["for_compute_fraction", "from_calibration", "smoothcache_rule"]


def smoothcache_rule(errors: np.ndarray, alpha: float) -> tuple[int, ...]:
    """SmoothCache's greedy rule on one error table.

    ``errors[s, j-1]`` is the calibrated relative L1 change of the output at step ``s`` against step
    ``s-j``. From a computed step ``i`` take the largest ``j <= k`` with ``errors[i+j, j-1] <= alpha``,
    reuse the output of ``i`` for steps ``i+1..i+j`` and compute ``i+j+1``; if no ``j`` qualifies, compute
    ``i+1``. The first and last steps are always computed. Like the reference, it compares the single
    error of the last reused step, and it is open loop.

    The rule is greedy: when the error between two steps grows with their distance (what calibrations
    show), it computes as few steps as possible for ``alpha``, so a larger ``alpha`` never computes more.
    """
    n, k = errors.shape
    plan = [COMPUTE] * n
    i = 0
    while i < n:
        for j in range(k, 0, -1):
            if i + j < n and errors[i + j, j - 1] <= alpha:
                plan[i + 1 : i + j + 1] = [REUSE] * j
                i += j + 1
                break
        else:
            i += 1
    if n:
        plan[0] = plan[-1] = COMPUTE
    return tuple(plan)


def from_calibration(
    calibration: Calibration,
    alpha: float,
    *,
    granularity: str = "type",
    memory_budget: int | str | None = None,
    sizes: Mapping[str, int] | None = None,
    branches: int = 1,
) -> Schedule:
    """SmoothCache's schedule for threshold ``alpha`` (see :func:`smoothcache_rule`).

    ``granularity="type"`` averages the error curves of all layers of a type (as the paper does)
    and gives one plan per type; ``"layer"`` gives every component its own plan.

    Args:
        memory_budget: bytes the stored outputs may hold at once (an int, or ``"16GB"``, ``"512MiB"``):
            the schedule is then fitted to it (:func:`stepcache.policies._budget.fit_memory`), which
            may compute more than asked when the budget is tight (``meta["memory"]`` says).
        sizes: component name -> bytes per stored output (:func:`stepcache.memory.output_bytes`),
            needed with ``memory_budget`` unless the calibration records ``meta["output_bytes"]``.
        branches: stores per component: 2 for split classifier-free guidance.
    """
    alpha = check_alpha(alpha)
    tables, counts = error_tables(calibration, granularity)
    plans = {key: smoothcache_rule(table, alpha) for key, table in tables.items()}
    meta = {"rule": "smoothcache", "alpha": alpha, "granularity": granularity, **calibration.provenance()}
    schedule = Schedule(calibration.num_steps, plans, counts, meta)
    if memory_budget is None:
        return schedule
    return fit_memory(schedule, calibration, memory_budget, sizes, branches=branches)


def for_compute_fraction(
    calibration: Calibration,
    fraction: float,
    *,
    granularity: str = "type",
    memory_budget: int | str | None = None,
    sizes: Mapping[str, int] | None = None,
    branches: int = 1,
) -> Schedule:
    """The SmoothCache schedule with the smallest alpha within the calls ``fraction`` buys
    (:func:`~stepcache.policies._plan.budget_calls`: the nearest whole number of calls, ties down).

    The compute fraction only changes where alpha crosses a calibrated error value, so the search
    bisects over those values; the schedule returned records the alpha it used.

    Args:
        memory_budget: bytes the stored outputs may hold at once (an int, or ``"16GB"``, ``"512MiB"``):
            the schedule is then fitted to it (:func:`stepcache.policies._budget.fit_memory`), which
            may compute more than asked when the budget is tight (``meta["memory"]`` says).
        sizes: component name -> bytes per stored output (:func:`stepcache.memory.output_bytes`),
            needed with ``memory_budget`` unless the calibration records ``meta["output_bytes"]``.
        branches: stores per component: 2 for split classifier-free guidance.
    """
    check_fraction(fraction)
    tables, counts = error_tables(calibration, granularity)
    values = np.unique(np.concatenate([t[np.isfinite(t)].ravel() for t in tables.values()] + [np.zeros(1)]))
    values = values[values >= 0]

    def make(alpha: float) -> Schedule:
        plans = {key: smoothcache_rule(table, alpha) for key, table in tables.items()}
        meta = {
            "rule": "smoothcache",
            "alpha": float(alpha),
            "granularity": granularity,
            "target_compute_fraction": float(fraction),
            **calibration.provenance(),
        }
        return Schedule(calibration.num_steps, plans, counts, meta)

    # The one rounding rule of every policy (budget_calls): the calls the fraction buys.
    total = sum(counts.values()) * calibration.num_steps
    limit = budget_calls(fraction, total) / total
    best = make(float(values[-1]))
    if best.compute_fraction > limit + 1e-12:
        raise ScheduleError(
            f"compute fraction {fraction:g} is out of reach: with lookahead {calibration.lookahead} the "
            f"smallest this calibration allows is {best.compute_fraction:.3f} (first and last steps "
            "always compute). Calibrate with a larger lookahead, or ask for more compute."
        )
    lo, hi = 0, len(values) - 1  # invariant: values[hi] meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if make(float(values[mid])).compute_fraction <= limit + 1e-12:
            hi = mid
        else:
            lo = mid + 1
    schedule = make(float(values[hi]))
    if memory_budget is None:
        return schedule
    return fit_memory(schedule, calibration, memory_budget, sizes, branches=branches)
