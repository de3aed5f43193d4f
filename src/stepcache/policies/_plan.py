"""What every policy shares: budget and threshold checks, the calibration's error tables, and the
plan builders (which steps compute, as a tuple of plan values).

One place builds plans, so FORA, the uniform baselines of the benchmarks, the tuned policy's
candidates and the runtime all agree on where "evenly spaced" puts its computations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ScheduleError
from ..schedule import COMPUTE, FORECAST, REUSE

if TYPE_CHECKING:
    from ..calibration import Calibration

__all__ = [
    "budget_calls",
    "check_alpha",
    "check_fraction",
    "error_tables",
    "fora_plan",
    "interval_plan",
    "offset_plan",
    "spaced_plan",
    "split_computes",
    "uniform_plan",
    "warmup_plan",
]


def check_alpha(alpha: float) -> float:
    """A SmoothCache threshold: a relative L1 error, a number >= 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or math.isnan(alpha) or alpha < 0:
        raise ScheduleError(f"alpha must be a number >= 0 (a relative L1 error threshold), got {alpha!r}.")
    return float(alpha)


def check_fraction(fraction: float) -> float:
    """A compute budget: the share of component calls to execute, in (0, 1]."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or math.isnan(fraction)
        or not 0 < fraction <= 1
    ):
        raise ScheduleError(f"compute fraction must be in (0, 1], got {fraction!r}.")
    return float(fraction)


def budget_calls(fraction: float, total: int) -> int:
    """The component calls a compute fraction buys, the one rounding rule of every policy: the whole
    number nearest to ``fraction * total``, a tie going to the lower one (``ceil(f * total - 1/2)``).

    ``total`` is the calls of an uncached run (steps x components). So 0.53 of 15 steps buys 8
    computations of each component (7.95 rounds to 8: no need to write 8/15), 0.35 of 50 steps of two
    component types buys 35 of 100 (18 + 17), and 0.25 of 25 steps of two types buys 12 of 50 (12.5
    ties to 12): a policy never spends more than half a call above the fraction asked. A policy spends
    exactly this many calls whenever its plans can (a type's plan costs its number of layers per
    computation), else the most it can below; ``schedule.compute_fraction`` is what it spends.
    """
    return max(0, math.ceil(fraction * total - 0.5 - 1e-9))


def split_computes(budget: int, num_steps: int, units: dict[str, int], *, first: int = 1) -> dict[str, int]:
    """Computations per key (each at least ``first``, at most ``num_steps``) spending the most of
    ``budget`` calls, where one computation of ``key`` costs ``units[key]`` calls; as even as the budget
    allows: every key gets ``c`` or ``c + 1``, the remainder going to the keys in the order given.

    This is how a budget that is not a whole number of computations per component (0.25 of 25 steps:
    6.25 each) is met: some component types compute once more than others.
    """
    per_step = sum(units.values())
    base = min(num_steps, max(first, budget // per_step if per_step else num_steps))
    counts = dict.fromkeys(units, base)
    left = budget - base * per_step
    for key in units:  # the remainder: one more computation where it still fits
        if counts[key] < num_steps and units[key] <= left:
            counts[key] += 1
            left -= units[key]
    return counts


def error_tables(calibration: Calibration, granularity: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(selector -> calibrated error table, selector -> components it stands for).

    ``"type"`` averages the layers of each component type (one plan per type, as the paper does);
    ``"layer"`` keeps every component's own table.
    """
    if granularity == "type":
        tables = calibration.type_errors()
        counts = {t: sum(1 for v in calibration.components.values() if v == t) for t in tables}
        return tables, counts
    if granularity == "layer":
        return dict(calibration.errors), dict.fromkeys(calibration.errors, 1)
    raise ScheduleError(f"granularity must be 'type' or 'layer', got {granularity!r}.")


def fora_plan(num_steps: int, interval: int) -> tuple[int, ...]:
    """Compute every ``interval``-th step and the last one; reuse in between (FORA)."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ScheduleError(f"interval must be a positive integer, got {interval!r}.")
    plan = [COMPUTE if s % interval == 0 else REUSE for s in range(num_steps)]
    plan[-1] = COMPUTE
    return tuple(plan)


def uniform_plan(num_steps: int, fraction: float) -> tuple[int, ...]:
    """About ``fraction * num_steps`` evenly spaced computations, the first and last step included.

    Unlike FORA's interval this reaches any fraction, which is what matched-compute comparisons need.
    """
    check_fraction(fraction)
    m = max(2, round(fraction * num_steps))
    picks = {round(i * (num_steps - 1) / (m - 1)) for i in range(m)}
    return tuple(COMPUTE if s in picks else REUSE for s in range(num_steps))


def warmup_plan(num_steps: int, computes: int, warmup: int, *, forecast: bool = True) -> tuple[int, ...]:
    """``warmup`` computed steps, then ``computes - warmup`` evenly spaced ones ending on the last step."""
    if not 1 <= warmup <= computes - 1 or computes > num_steps:
        raise ScheduleError(f"warm-up {warmup} does not fit {computes} computations in {num_steps} steps.")
    rest = computes - warmup
    grid = np.round(np.linspace(warmup - 1, num_steps - 1, rest + 1))[1:].astype(int)
    picks = set(range(warmup)) | {int(s) for s in grid}
    if len(picks) != computes:  # only when the grid is denser than one per step: then no gaps remain
        raise ScheduleError(f"warm-up {warmup} leaves no room for {computes} computations.")
    fill = FORECAST if forecast else REUSE
    return tuple(COMPUTE if s in picks else fill for s in range(num_steps))


def interval_plan(num_steps: int, computes: int, warmup: int, phase: int = 0) -> tuple[int, ...]:
    """``warmup`` computed steps, then one every ``i`` steps from ``warmup - 1 + i + phase`` (the
    smallest ``i`` within budget), the rest forecast; the last step is not forced."""
    if not 1 <= warmup < computes or phase < 0:
        raise ScheduleError(f"warm-up {warmup} (phase {phase}) does not fit {computes} computations.")
    i = 1
    while warmup + len(range(warmup - 1 + i + phase, num_steps, i)) > computes:
        i += 1
    if phase >= i:
        raise ScheduleError(f"phase {phase} is not below the interval {i}.")
    picks = set(range(warmup)) | set(range(warmup - 1 + i + phase, num_steps, i))
    return tuple(COMPUTE if s in picks else FORECAST for s in range(num_steps))


def spaced_plan(num_steps: int, computes: int, warmup: int, tail: int = 1) -> tuple[int, ...]:
    """``warmup`` computed steps, the last ``tail`` steps computed, and the remaining computations
    evenly spaced in between, every reused step forecast. ``tail=1`` is :func:`warmup_plan`."""
    if not 1 <= tail <= num_steps or warmup < 1 or warmup + tail > computes or computes > num_steps:
        raise ScheduleError(
            f"warm-up {warmup} and {tail} last step(s) do not fit {computes} computations in {num_steps} steps."
        )
    rest = computes - warmup - tail
    grid = np.round(np.linspace(warmup - 1, num_steps - tail, rest + 2))[1:-1].astype(int)
    picks = set(range(warmup)) | set(range(num_steps - tail, num_steps)) | {int(s) for s in grid}
    if len(picks) != computes:
        raise ScheduleError(
            f"warm-up {warmup} and {tail} last step(s) leave no room for {computes} computations."
        )
    return tuple(COMPUTE if s in picks else FORECAST for s in range(num_steps))


def offset_plan(
    num_steps: int, computes: int, warmup: int, offset: int = 1, tail: int = 0
) -> tuple[int, ...]:
    """``warmup`` computed steps, then one at step ``warmup + offset`` and every ``i``-th step after it
    (the smallest ``i`` within budget), and the last ``tail`` steps; the rest forecast.

    diffusers' TaylorSeer with ``disable_cache_before_step=w`` and ``cache_interval=i`` computes
    steps ``0..w-1``, then ``w + 1``, ``w + 1 + i``, ...: ``offset_plan(n, c, w, offset=1)``.
    """
    if not 1 <= warmup < computes or offset < 0 or not 0 <= tail < computes - warmup or computes > num_steps:
        raise ScheduleError(
            f"warm-up {warmup}, offset {offset}, {tail} last step(s) do not fit {computes} computations."
        )
    first = warmup + offset
    if first >= num_steps - tail:
        raise ScheduleError(
            f"offset {offset} after warm-up {warmup} leaves no interval in {num_steps} steps."
        )

    def picks(i: int) -> set[int]:
        return set(range(warmup)) | set(range(first, num_steps, i)) | set(range(num_steps - tail, num_steps))

    i = 1
    while len(picks(i)) > computes:
        i += 1
    chosen = picks(i)
    return tuple(COMPUTE if s in chosen else FORECAST for s in range(num_steps))
