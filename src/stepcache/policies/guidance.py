"""Guidance policies: where to stand in for the unconditional branch (:class:`~stepcache.guidance.GuidanceReuse`),
by a threshold or a compute fraction on a guidance calibration, or in closed loop (:func:`tune_guidance`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..calibration.guidance import GuidanceCalibration
from ..errors import ScheduleError
from ..guidance import KIND_OF_MODE, GuidanceReuse, check_mode
from ..runtime import cache
from ..runtime.introspect import final_samples
from ..schedule import COMPUTE, Schedule
from ._budget import calibration_components
from ._plan import check_fraction
from ._replay import db, rows, split
from .optimal import optimal_schedule
from .tuned import objective_function

__all__ = ["guidance_for_compute_fraction", "guidance_from_calibration", "tune_guidance"]


def guidance_from_calibration(
    gcal: GuidanceCalibration, schedule: Schedule, threshold: float, *, mode: str = "difference"
) -> GuidanceReuse:
    """Stand in wherever the calibrated error of ``mode`` is at most ``threshold``: walking each
    component's compute steps, a step stands in when its distance ``j`` to the last full
    computation is within the calibration's lookahead and ``errors[s, j - 1]`` is small enough."""
    mode = check_mode(mode)
    if gcal.num_steps != schedule.num_steps:
        raise ScheduleError(
            f"the guidance calibration has {gcal.num_steps} steps, the schedule {schedule.num_steps}."
        )
    q = KIND_OF_MODE[mode]
    resolved = schedule.resolve(calibration_components(gcal))
    plans = {}
    for name, plan in resolved.items():
        err = gcal.errors[name]
        skip = [False] * len(plan)
        last = None
        for s, v in enumerate(plan):
            if v != COMPUTE:
                continue
            j = None if last is None else s - last
            if (
                j is not None
                and j <= gcal.lookahead
                and float(np.nan_to_num(err[s, j - 1, q], nan=np.inf)) <= threshold
            ):
                skip[s] = True
            else:
                last = s
        plans[name] = tuple(skip)
    return GuidanceReuse(
        schedule.num_steps,
        plans,
        mode=mode,
        layout=gcal.layout,
        uncond_branch=int(gcal.meta.get("uncond_branch", 1)),
        meta={"threshold": float(threshold), "model_class": gcal.meta.get("model_class")},
    )


def guidance_for_compute_fraction(
    gcal: GuidanceCalibration, schedule: Schedule, fraction: float, *, mode: str = "difference"
) -> GuidanceReuse:
    """The smallest threshold whose plan brings ``schedule`` to at most ``fraction`` (every halved
    call counts half); raises if even standing in wherever possible does not get there."""
    comps = calibration_components(gcal)
    q = KIND_OF_MODE[check_mode(mode)]
    values = sorted({float(v) for n in gcal.components for v in gcal.errors[n][:, :, q].ravel() if v == v})
    lowest = guidance_from_calibration(gcal, schedule, np.inf, mode=mode).compute_fraction(schedule, comps)
    if lowest > fraction + 1e-9:
        raise ScheduleError(
            f"standing in for the unconditional branch at every compute step of this schedule still "
            f"leaves a compute fraction of {lowest:.3f} > {fraction}: "
            "start from a schedule with a lower fraction."
        )
    lo, hi = 0, len(values) - 1  # the first threshold whose plan is within the fraction
    while lo < hi:
        mid = (lo + hi) // 2
        if (
            guidance_from_calibration(gcal, schedule, values[mid], mode=mode).compute_fraction(
                schedule, comps
            )
            <= fraction + 1e-9
        ):
            hi = mid
        else:
            lo = mid + 1
    return guidance_from_calibration(gcal, schedule, values[lo] if values else np.inf, mode=mode)


def tune_guidance(
    target: Any,
    run: Callable[[], Any],
    fraction: float,
    *,
    calibration: Any,
    guidance: GuidanceCalibration,
    schedule: Schedule,
    raise_by: Sequence[float] = (0.05, 0.1, 0.2),
    mode: str = "difference",
    objective: str = "worst-25%",
    validation: float | int | None = None,
    progress: bool = True,
) -> tuple[Schedule, GuidanceReuse | None]:
    """Closed loop: stand in for the unconditional branch only where it beats the plain schedule.

    Candidates at ``fraction``: ``schedule`` alone, and for each ``d`` in ``raise_by`` the optimal schedule at
    ``fraction + d`` brought back to ``fraction`` by :func:`guidance_for_compute_fraction`. Each is
    replayed on ``run`` (fixed seeds, final samples along dimension 0, as :func:`stepcache.tune`) and
    scored per sample by ``objective`` against the uncached samples; the best two on the fit samples are
    decided on the held-out ones. Whether stand-ins pay depends on the guidance scale: the stand-in's
    error enters the guided prediction ``u + w (c - u)`` multiplied by ``w - 1``, while copying both
    branches keeps most of ``c - u`` (docs/guidance.md has the measurements).

    ``schedule`` is required: it is the plain schedule to beat, so pass the best one you can afford at
    ``fraction`` (:func:`stepcache.tune`'s, typically). A weak start (the open-loop optimal schedule)
    makes stand-ins look better than they are and ends several dB below plain tuning.

    Returns:
        ``(schedule, plan)``: ``plan`` is None when the plain schedule won; pass both to
        ``stepcache.cache(target, schedule, guidance=plan)``. The scores are in ``schedule.meta``.
    """
    check_fraction(fraction)
    reduce = objective_function(objective)
    check_mode(mode)
    if not isinstance(schedule, Schedule):
        raise ScheduleError(
            f"schedule must be the plain Schedule to beat at this fraction (e.g. stepcache.tune's), "
            f"got {type(schedule).__name__}."
        )
    plain = schedule
    candidates: dict[str, tuple[Schedule, GuidanceReuse | None]] = {"plain": (plain, None)}
    for d in raise_by:
        base = optimal_schedule(calibration, min(1.0, fraction + d))
        try:
            plan = guidance_for_compute_fraction(guidance, base, fraction, mode=mode)
        except ScheduleError:
            continue  # stand-ins cannot bring this base down to the fraction
        candidates[f"optimal at {fraction + d:.3g} + {mode} stand-ins"] = (base, plan)
    with torch.no_grad():
        reference = rows(final_samples(run(), ScheduleError))
    fit_rows, val_rows = split(reference.shape[0], validation)
    fit_rows = fit_rows if val_rows else list(range(reference.shape[0]))
    scores: dict[str, tuple[float, float | None]] = {}
    for label, (sched, plan) in tqdm(candidates.items(), desc="guidance", disable=not progress, leave=False):
        with cache(target, sched, guidance=plan, count_macs=False), torch.no_grad():
            out = rows(final_samples(run(), ScheduleError))
        mse = (out - reference).pow(2).mean(dim=1)
        e = db(mse)
        scores[label] = (
            reduce(e[fit_rows], mse[fit_rows]),
            reduce(e[val_rows], mse[val_rows]) if val_rows else None,
        )
    leaders = sorted(scores, key=lambda k: scores[k][0])[:2]

    def held(label: str) -> float:  # the validation score (the fit score when nothing is held out)
        fit, val = scores[label]
        return fit if val is None else val

    chosen = min(leaders, key=held)
    sched, chosen_plan = candidates[chosen]
    meta = {
        **sched.meta,
        "guidance_tuning": {
            "chosen": chosen,
            "objective": objective,
            "mode": mode,
            "scores": {
                k: {"fit": round(f, 3), "validation": None if v is None else round(v, 3)}
                for k, (f, v) in scores.items()
            },
        },
    }
    return Schedule(sched.num_steps, sched.plans, sched.counts, meta), chosen_plan
