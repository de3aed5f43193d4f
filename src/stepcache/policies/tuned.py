"""Closed-loop tuning: pick the schedule whose *final samples* stay closest to the uncached ones.

Open-loop costs (the calibrated relative L1 change, even with sensitivity weights) rank schedules
poorly on real models: where computations fall in the first few steps, and whether a forecast has
two recent outputs to extrapolate from, moves the final sample far more than the per-step error
suggests (on the reference model the warm-up length alone moves the PSNR of one budget by several
dB; docs/policies.md has the measurements). So this policy evaluates a family of candidate
schedules on the samples of a few calibration generations and keeps the best.

**Candidates** (``family="full"``, the default), for a grid of warm-up lengths ``w``, every reused
step forecast from the last two computed outputs (first order):

* warm-up ``w``, the last step (or the last two steps) computed, the rest evenly spaced in between;
* warm-up ``w``, then a computation every ``i`` steps from ``w - 1 + i + phase`` (three phases), the
  last steps forecast;
* TaylorSeer's placement: warm-up ``w``, the first computation right after it (at step ``w``, or
  ``w + 1`` as diffusers' TaylorSeer does), then every ``i``-th step, with none, the last or the last
  two steps forced to compute (later first computations are the phases above);
* the optimal policy's schedule (:func:`~stepcache.policies.optimal.optimal_schedule`) when a
  calibration is given; the best candidate with copying instead of forecasting.

``family="classic"`` keeps only the first two warm-up families (with the last step computed): what
``tune`` tried before the TaylorSeer placements were added. Every candidate computes at most
``floor(fraction * num_steps)`` steps for every component, so the budget is never exceeded.

**Objective.** Each candidate's samples are compared with the uncached samples of the same seeds,
*per sample* (index 0 of what ``run`` returns): ``e = 10 log10(MSE)`` in dB, which is the sample's
PSNR up to a constant (``PSNR = 10 log10(range^2) - e``). ``objective`` reduces the per-sample ``e``:

* ``"worst-25%"`` (default): the mean of the worst quarter of the samples (at least one);
* ``"mean"``: the mean, i.e. the mean per-sample PSNR;
* ``"worst"``: the single worst sample;
* ``"worst-K"`` (``"worst-3"``): the mean of the ``K`` worst samples; ``"worst-P%"`` the worst ``P`` %;
* ``"quantile-Q"`` (``"quantile-0.1"``): the ``Q`` quantile of the per-sample PSNR (0.1: the tenth
  percentile, low tail);
* ``"mse"``: the mean squared error over all samples, what ``tune`` scored before (pooled, so the
  many good samples average a bad one away).

Why the worst quarter by default: a schedule that is good on average can ruin a few samples (an
independent harness found a tuned schedule's worst sample 9 dB below a peer's at an equal mean), and
a mean does not see it. The single worst sample, or a 5th percentile, of the ten or twenty samples
tuning can afford is one sample: its score is mostly noise and selects by it. The mean of the worst
quarter (the conditional value at risk of the per-sample error) looks at the tail and still averages
several samples.

**Validation.** Choosing the best of a hundred candidates on the same few samples selects noise as
well as quality, so the samples are split (a fixed shuffle; ``validation``: the held-out share, or a
count). Candidates are ranked on the *fit* part; the choice among the ``top_k`` best is made on the
held-out *validation* part, and so is the local search: from the chosen schedule, every move of one
computation one step earlier or later is scored on the fit part, and the best move is kept only when
it also improves the validation score (for ``refine`` rounds, stopping early). Both splits come from
the same replays, so validation costs nothing extra. ``validation=0`` scores and refines on all
samples (the previous behaviour).

The cost is ``1 + evaluations`` calls of ``run``; ``meta["tuning"]`` records the objective, the
split, every candidate's score on both parts, the top-k, whether refinement was accepted and why.
The result is a plain, serialisable :class:`Schedule`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch

from ..calibration import Calibration
from ..errors import ScheduleError
from ..runtime import cache
from ..runtime.introspect import final_samples
from ..schedule import COMPUTE, FORECAST, REUSE, Schedule
from ._budget import fit_memory
from ._plan import check_fraction, interval_plan, offset_plan, spaced_plan, warmup_plan
from ._replay import DEFAULT_OBJECTIVE, db, objective_function, rows, split
from ._replay import held_out as held_out_count
from .optimal import optimal_schedule

__all__ = ["DEFAULT_OBJECTIVE", "objective_function", "tune"]

FAMILIES = ("full", "classic")


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


def candidate_plans(n: int, computes: int, top: int, family: str = "full") -> dict[str, tuple[int, ...]]:
    """The family's plans (label -> plan of one component type), distinct, each computing at most
    ``computes`` of ``n`` steps, with warm-ups up to ``top`` (see the module doc)."""
    if family not in FAMILIES:
        raise ScheduleError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {family!r}.")
    out: dict[str, tuple[int, ...]] = {}
    seen: set[tuple[int, ...]] = set()

    def offer(label: str, build: Callable[[], tuple[int, ...]]) -> None:
        with contextlib.suppress(ScheduleError):  # this variant does not fit the budget
            plan = build()
            if plan not in seen and plan.count(COMPUTE) <= computes:
                seen.add(plan)
                out[label] = plan

    warmups = _warmups(computes, top)
    for w in warmups:
        offer(f"warm-up {w}, even to the end, forecast", partial(warmup_plan, n, computes, w))
        for phase in range(3):
            offer(
                f"warm-up {w}, every i-th (phase {phase}), forecast",
                partial(interval_plan, n, computes, w, phase),
            )
    if family == "classic":
        return out
    for w in warmups:
        offer(f"warm-up {w}, even, last 2 computed, forecast", partial(spaced_plan, n, computes, w, 2))
        for offset in range(2):
            for tail in range(3):
                last = {0: "", 1: ", last computed", 2: ", last 2 computed"}[tail]
                offer(
                    f"warm-up {w}, first at +{offset} then every i-th{last}, forecast",
                    partial(offset_plan, n, computes, w, offset, tail),
                )
    return out


def tune(
    target: Any,
    run: Callable[[], Any],
    fraction: float,
    *,
    num_steps: int | None = None,
    calibration: Calibration | None = None,
    max_warmup: int | None = None,
    refine: int = 1,
    objective: str = DEFAULT_OBJECTIVE,
    validation: float | int | None = None,
    top_k: int = 3,
    family: str = "full",
    progress: bool = True,
    memory_budget: int | str | None = None,
    sizes: Mapping[str, int] | None = None,
    branches: int = 1,
) -> Schedule:
    """The candidate schedule whose final samples stay closest to the uncached ones on ``run``, by
    ``objective`` over the samples, chosen and refined on held-out samples (see the module doc).

    Args:
        target: the pipeline or denoiser ``run`` uses.
        run: a callable with no arguments that generates with fixed seeds and returns the final samples
            as a tensor, samples along dimension 0 (the same contract as :func:`stepcache.sensitivity`);
            a dozen or two samples suffice.
        fraction: share of component calls to execute.
        num_steps: denoising steps of ``run`` (taken from ``calibration`` when given).
        calibration: adds the optimal policy's schedule to the candidates.
        max_warmup: longest warm-up tried (default: half of the steps).
        refine: rounds of local search from the chosen candidate (each tries moving every computation
            of every plan one step earlier or later, ~2 x computations replays; stops at the first
            round whose best move does not improve both the fit and the validation score).
        objective: how per-sample errors make one score: ``"worst-25%"`` (default), ``"mean"``,
            ``"worst"``, ``"worst-K"``, ``"worst-P%"``, ``"quantile-Q"`` or ``"mse"`` (module doc).
        validation: samples held out for the final choice and for accepting refinement: a share in
            ``[0, 1)`` or a count; default half of them (none when ``run`` returns a single sample);
            0 chooses and refines on all samples.
        top_k: the best candidates on the fit samples among which validation chooses.
        family: ``"full"`` (default) or ``"classic"`` (no TaylorSeer placements, no forced last steps).
        progress: show a progress bar over the evaluations.
        memory_budget, sizes, branches: fit every candidate (and every local move) to this many
            bytes of stored outputs before it is replayed (:func:`~stepcache.policies._budget.fit_memory`;
            needs ``calibration``, whose errors price the fitting).

    Raises:
        ScheduleError: a bad objective, validation, top_k, family or budget, or ``run`` returning
            something other than the same shape of samples each call.
    """
    reduce = objective_function(objective)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ScheduleError(f"top_k must be a positive integer, got {top_k!r}.")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ScheduleError(f"refine must be a whole number of rounds >= 0, got {refine!r}.")
    if family not in FAMILIES:
        raise ScheduleError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {family!r}.")
    if validation is not None:
        held_out_count(2 if validation == 0 else 10**9, validation)  # the value itself, before any replay
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
    candidates = {
        label: Schedule(n, {"*": plan}) for label, plan in candidate_plans(n, computes, top, family).items()
    }
    if calibration is not None:
        with contextlib.suppress(ScheduleError):
            candidates["optimal (type)"] = optimal_schedule(calibration, computes / n)
    if not candidates:
        raise ScheduleError(f"no candidate schedule fits {computes} computations in {n} steps.")
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with torch.no_grad():
        reference = rows(final_samples(run(), ScheduleError))
    fit_rows, val_rows = split(reference.shape[0], validation)
    held_out = bool(val_rows)
    if not held_out:
        fit_rows = list(range(reference.shape[0]))
    scores: dict[str, tuple[float, float | None]] = {}  # label -> (fit, validation)
    mses: dict[str, float] = {}

    def score(label: str, schedule: Schedule) -> tuple[float, float | None]:
        schedule = fit(schedule)
        with cache(target, schedule, count_macs=False), torch.no_grad():
            out = rows(final_samples(run(), ScheduleError))
        if out.shape != reference.shape:
            raise ScheduleError("`run` returned differently shaped samples on a second call.")
        mse = (out - reference).pow(2).mean(dim=1)
        e = db(mse)
        candidates[label] = schedule
        mses[label] = float(mse.mean())
        scores[label] = (
            reduce(e[fit_rows], mse[fit_rows]),
            reduce(e[val_rows], mse[val_rows]) if held_out else None,
        )
        bar.update(1)
        return scores[label]

    def by_fit(labels: Any) -> list[str]:
        return sorted(labels, key=lambda k: scores[k][0])

    def held(label: str) -> float:  # the validation score (the fit score when nothing is held out)
        fit_score, val_score = scores[label]
        return fit_score if val_score is None else val_score

    refinement: list[dict[str, Any]] = []
    bar = tqdm(desc="tuning", unit="replay", disable=not progress, leave=False)
    try:
        for label, sched in list(candidates.items()):
            score(label, sched)
        best_label = by_fit(scores)[0]
        best = candidates[best_label]
        copy = {k: tuple(REUSE if v == FORECAST else v for v in p) for k, p in best.plans.items()}
        if copy != dict(best.plans):
            score(best_label.replace("forecast", "copy"), Schedule(n, copy, best.counts))
        leaders = by_fit(scores)[:top_k]
        # The final choice among the top-k: on the held-out samples (on the fit samples without them).
        chosen_label = min(leaders, key=held)
        for r in range(refine):  # local search: move one computation of one plan by one step
            base = candidates[chosen_label]
            labels = []
            for i, plans in enumerate(_moves(base.plans)):
                labels.append(f"{chosen_label}; refined {r + 1}.{i}")
                score(labels[-1], Schedule(n, plans, base.counts))
            if not labels:
                break
            move = by_fit(labels)[0]
            accepted = scores[move][0] < scores[chosen_label][0] and held(move) < held(chosen_label)
            refinement.append(
                {
                    "round": r + 1,
                    "best_move": move,
                    "fit": _r(scores[move][0]),
                    "validation": _r(scores[move][1]),
                    "accepted": accepted,
                }
            )
            if not accepted:
                break
            chosen_label = move
    finally:
        bar.close()
    chosen = candidates[chosen_label]
    meta = {
        **chosen.meta,
        "rule": "tuned",
        "candidate": chosen_label,
        "target_compute_fraction": float(fraction),
        "tuning": {
            "objective": objective,
            "family": family,
            "samples": int(reference.shape[0]),
            "fit_samples": len(fit_rows),
            "validation_samples": len(val_rows),
            "validation_rows": val_rows,
            "top_k": leaders,
            "chosen_by": "validation among the top-k" if held_out else "fit score",
            "refinement": refinement,
            "evaluations": len(scores),
            "runs": len(scores) + 1,
            "seconds": round(time.perf_counter() - start, 2),
            "score_unit": "dB of per-sample MSE (PSNR = 10 log10(range^2) - score), lower is better",
            "scores": {k: {"fit": _r(f), "validation": _r(v)} for k, (f, v) in scores.items()},
            "mse": {k: float(f"{v:.4g}") for k, v in mses.items()},
        },
    }
    if calibration is not None:
        meta.update(calibration.provenance())
    return Schedule(n, chosen.plans, chosen.counts, meta)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
