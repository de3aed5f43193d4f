"""Closed-loop tuning: pick the schedule whose *final samples* stay closest to the uncached ones.

Open-loop costs (the calibrated relative L1 change, even with sensitivity weights) rank schedules
poorly on real models: where computations fall in the first few steps, and whether a forecast has
two recent outputs to extrapolate from, moves the final sample far more than the per-step error
suggests (on the reference model the warm-up length alone moves the PSNR of one budget by several
dB; docs/policies.md has the measurements). So this policy evaluates a small family of candidate
schedules on a few calibration generations and keeps the best:

* warm-up ``w`` full computations, then the remaining computations evenly spaced and ending on the
  last step, every reused step forecast from the last two computed outputs (first order), for a
  range of ``w``;
* warm-up ``w``, then a computation every ``i`` steps until the budget is spent (three phases), the
  last steps forecast (what TaylorSeer does; at small budgets it beats computing the last step);
* the same with copying instead of forecasting, for the best ``w``;
* the optimal policy's schedule (:func:`~stepcache.policies.optimal.optimal_schedule`) when a calibration is given;
* then a local search from the best: move one computation one step earlier or later, keep the best
  move, repeat for ``refine`` rounds.

Every candidate computes at most ``floor(fraction * num_steps)`` steps for every component (the
even-spacing family and the local moves exactly that many), so the budget is never exceeded. The
cost is ``1 + evaluations`` calls of ``run``, reported in ``meta["tuning"]``. The result is a plain,
serialisable :class:`Schedule`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ..calibration import Calibration
from ..errors import ScheduleError
from ..runtime import cache
from ..runtime.introspect import final_samples
from ..schedule import COMPUTE, FORECAST, REUSE, Schedule
from ._budget import fit_memory
from ._plan import check_fraction, interval_plan, warmup_plan
from .optimal import optimal_schedule

__all__ = ["tune"]


def _moves(plans: Mapping[str, tuple[int, ...]]) -> Iterator[dict[str, tuple[int, ...]]]:
    """Every plan set with one computation (not step 0) moved one step, onto a step that reuses."""
    for key, plan in plans.items():
        fill = FORECAST if FORECAST in plan else REUSE
        for s, v in enumerate(plan):
            if v != COMPUTE or s == 0:
                continue
            for t in (s - 1, s + 1):
                if 0 < t < len(plan) and plan[t] != COMPUTE:
                    moved = list(plan)
                    moved[s], moved[t] = fill, COMPUTE
                    yield {**plans, key: tuple(moved)}


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
    refine: int = 1,
    progress: bool = True,
    memory_budget: int | str | None = None,
    sizes: Mapping[str, int] | None = None,
    branches: int = 1,
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
        refine: rounds of local search from the best candidate (each tries moving every computation
            of every plan one step earlier or later, ~2 x computations replays; stops early when no
            move helps).
        progress: show a progress bar over the evaluations.
        memory_budget, sizes, branches: fit every candidate (and every local move) to this many
            bytes of stored outputs before it is replayed (:func:`~stepcache.policies._budget.fit_memory`;
            needs ``calibration``, whose errors price the fitting).
    """
    if memory_budget is not None and calibration is None:
        raise ScheduleError(
            "tune with a memory_budget needs calibration=: its errors decide what to give up."
        )

    def fit(schedule: Schedule) -> Schedule:
        if memory_budget is None:
            return schedule
        assert calibration is not None
        return fit_memory(schedule, calibration, memory_budget, sizes, branches=branches)

    n = calibration.num_steps if calibration is not None else num_steps
    if not isinstance(n, int) or n < 3:
        raise ScheduleError("tune needs num_steps >= 3 (or a calibration).")
    check_fraction(fraction)
    computes = max(2, math.floor(fraction * n + 1e-9))  # never above the asked fraction
    if computes >= n:
        return fit(
            Schedule(n, {"*": (COMPUTE,) * n}, meta={"rule": "tuned", "target_compute_fraction": fraction})
        )
    top = max_warmup if max_warmup is not None else max(2, n // 2)
    candidates: dict[str, Schedule] = {}
    seen: set[tuple[int, ...]] = set()

    def offer(label: str, plan: tuple[int, ...]) -> None:
        if plan not in seen:
            seen.add(plan)
            candidates[label] = Schedule(n, {"*": plan})

    for w in _warmups(computes, top):
        with contextlib.suppress(ScheduleError):  # this warm-up does not fit the budget
            offer(f"warm-up {w}, even to the end, forecast", warmup_plan(n, computes, w))
        for phase in range(3):
            with contextlib.suppress(ScheduleError):
                offer(
                    f"warm-up {w}, every i-th (phase {phase}), forecast", interval_plan(n, computes, w, phase)
                )
    if calibration is not None:
        with contextlib.suppress(ScheduleError):
            candidates["optimal (type)"] = optimal_schedule(calibration, computes / n)
    if not candidates:
        raise ScheduleError(f"no candidate schedule fits {computes} computations in {n} steps.")
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with torch.no_grad():
        reference = final_samples(run(), ScheduleError)
    scores: dict[str, float] = {}

    def score(label: str, schedule: Schedule) -> float:
        schedule = fit(schedule)
        with cache(target, schedule, count_macs=False), torch.no_grad():
            out = final_samples(run(), ScheduleError)
        if out.shape != reference.shape:
            raise ScheduleError("`run` returned differently shaped samples on a second call.")
        candidates[label] = schedule
        scores[label] = float((out - reference).pow(2).mean())
        bar.update(1)
        return scores[label]

    bar = tqdm(desc="tuning", unit="replay", disable=not progress, leave=False)
    try:
        for label, sched in list(candidates.items()):
            score(label, sched)
        best_label = min(scores, key=scores.__getitem__)
        best = candidates[best_label]
        copy = {k: tuple(REUSE if v == FORECAST else v for v in p) for k, p in best.plans.items()}
        if copy != dict(best.plans):
            score(best_label.replace("forecast", "copy"), Schedule(n, copy, best.counts))
        for r in range(refine):  # local search: move one computation of one plan by one step
            best_label = min(scores, key=scores.__getitem__)
            best = candidates[best_label]
            moves = list(_moves(best.plans))
            for i, plans in enumerate(moves):
                score(f"{best_label}; refined {r + 1}.{i}", Schedule(n, plans, best.counts))
            if min(scores, key=scores.__getitem__) == best_label:
                break
    finally:
        bar.close()
    best_label = min(scores, key=scores.__getitem__)
    chosen = candidates[best_label]
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
