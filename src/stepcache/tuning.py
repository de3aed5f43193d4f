"""Closed-loop tuning: pick the schedule whose *final samples* stay closest to the uncached ones.

Open-loop costs (the calibrated relative L1 change, even with sensitivity weights) rank schedules
poorly on real models: where computations fall in the first few steps, and whether a forecast has
two recent outputs to extrapolate from, moves the final sample far more than the per-step error
suggests (measured on the reference model: the same budget spans 39-49 dB PSNR depending on the
warm-up alone). So this policy evaluates a small family of candidate schedules on a few calibration
generations and keeps the best:

* warm-up ``w`` full computations, then the remaining computations evenly spaced and ending on the
  last step, every reused step forecast from the last two computed outputs (first order), for a
  range of ``w``;
* warm-up ``w``, then a computation every ``i`` steps until the budget is spent, the last steps
  forecast (what TaylorSeer does; at small budgets it beats spending a computation on the last step);
* the same with copying instead of forecasting, for the best ``w``;
* the :meth:`Schedule.optimal` schedule when a calibration is given.

Every candidate computes exactly ``round(fraction * num_steps)`` steps for every component, so the
budget is met exactly (to one step). The cost is ``1 + evaluations`` calls of ``run``, reported in
``meta["tuning"]``. The result is a plain, serialisable :class:`Schedule`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .cache import cache
from .calibration import Calibration
from .errors import ScheduleError
from .schedule import COMPUTE, FORECAST, REUSE, Schedule
from .sensitivity import _final

__all__ = ["interval_plan", "tune", "warmup_plan"]


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


def interval_plan(num_steps: int, computes: int, warmup: int) -> tuple[int, ...]:
    """``warmup`` computed steps, then one every ``i`` steps (the smallest ``i`` within budget), the
    rest forecast; the last step is not forced."""
    if not 1 <= warmup < computes:
        raise ScheduleError(f"warm-up {warmup} does not fit {computes} computations.")
    i = 1
    while warmup + (num_steps - warmup) // i > computes:
        i += 1
    picks = set(range(warmup)) | set(range(warmup - 1 + i, num_steps, i))
    return tuple(COMPUTE if s in picks else FORECAST for s in range(num_steps))


def _warmups(computes: int, top: int) -> list[int]:
    grid = [*range(1, 9), 10, 12, 15, 20, 25, 30, 40]
    return [w for w in grid if w <= min(top, computes - 2)]


def tune(
    target: Any,
    run: Callable[[], Any],
    fraction: float,
    *,
    num_steps: int | None = None,
    calibration: Calibration | None = None,
    max_warmup: int | None = None,
    progress: bool = True,
) -> Schedule:
    """The candidate schedule whose final samples are closest (MSE) to the uncached ones on ``run``.

    Args:
        target: the pipeline or denoiser ``run`` uses.
        run: a callable with no arguments that generates with fixed seeds and returns the final samples
            as a tensor (the same contract as :func:`stepcache.sensitivity`); a few images suffice.
        fraction: share of component calls to execute.
        num_steps: denoising steps of ``run`` (taken from ``calibration`` when given).
        calibration: adds the optimal policy's schedule to the candidates.
        max_warmup: longest warm-up tried (default: half of the steps).
        progress: show a progress bar over the evaluations.
    """
    n = calibration.num_steps if calibration is not None else num_steps
    if not isinstance(n, int) or n < 3:
        raise ScheduleError("tune needs num_steps >= 3 (or a calibration).")
    if not isinstance(fraction, (int, float)) or math.isnan(fraction) or not 0 < fraction <= 1:
        raise ScheduleError(f"compute fraction must be in (0, 1], got {fraction!r}.")
    computes = max(2, round(fraction * n))
    if computes >= n:
        return Schedule(n, {"*": (COMPUTE,) * n}, meta={"rule": "tuned", "target_compute_fraction": fraction})
    top = max_warmup if max_warmup is not None else max(2, n // 2)
    candidates: list[tuple[str, Schedule]] = []
    seen: set[tuple[int, ...]] = set()
    for w in _warmups(computes, top):
        for label, make in (("even to the end", warmup_plan), ("every i-th", interval_plan)):
            with contextlib.suppress(ScheduleError):  # this warm-up does not fit the budget
                plan = make(n, computes, w)
                if plan not in seen:
                    seen.add(plan)
                    candidates.append((f"warm-up {w}, {label}, forecast", Schedule(n, {"*": plan})))
    if calibration is not None:
        with contextlib.suppress(ScheduleError):
            candidates.append(("optimal (type)", Schedule.optimal(calibration, computes / n)))
    if not candidates:
        raise ScheduleError(f"no candidate schedule fits {computes} computations in {n} steps.")
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with torch.no_grad():
        reference = _final(run())
    scores: dict[str, float] = {}

    def score(schedule: Schedule) -> float:
        with cache(target, schedule, count_macs=False), torch.no_grad():
            out = _final(run())
        if out.shape != reference.shape:
            raise ScheduleError("`run` returned differently shaped samples on a second call.")
        return float((out - reference).pow(2).mean())

    bar = tqdm(total=len(candidates) + 1, desc="tuning", disable=not progress, leave=False)
    try:
        for label, sched in candidates:
            scores[label] = score(sched)
            bar.update(1)
        best_label = min(scores, key=scores.__getitem__)
        best = dict(candidates)[best_label]
        copy = Schedule(
            n, {k: tuple(REUSE if v == FORECAST else v for v in p) for k, p in best.plans.items()}
        )
        if copy != best:
            scores[best_label.replace("forecast", "copy")] = score(copy)
            bar.update(1)
    finally:
        bar.close()
    best_label = min(scores, key=scores.__getitem__)
    chosen = dict(candidates).get(best_label) or copy
    meta = {
        **chosen.meta,
        "rule": "tuned",
        "candidate": best_label,
        "target_compute_fraction": float(fraction),
        "tuning": {
            "evaluations": len(scores),
            "runs": len(scores) + 1,
            "seconds": round(time.perf_counter() - start, 2),
            "mse": {k: float(f"{v:.4g}") for k, v in scores.items()},
        },
    }
    if calibration is not None:
        meta.update(calibration.provenance())
    return Schedule(n, chosen.plans, chosen.counts, meta)
