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
``tune`` tried before the TaylorSeer placements were added. Every candidate spends the calls
``fraction`` buys under the one rounding rule of every policy (:func:`~stepcache.policies._plan.budget_calls`:
the nearest whole number, ties down), split over the component types so that some compute once more
than others when the calls do not divide evenly (0.25 of 25 steps with two types: 6 and 7 computations).

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
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .._logging import get_logger
from ..calibration import Calibration
from ..errors import ScheduleError
from ..runtime import cache
from ..runtime.introspect import final_samples
from ..schedule import COMPUTE, FORECAST, REUSE, Schedule
from ._budget import fit_memory
from ._cost import plan_cost
from ._family import FAMILIES, candidate_schedules, computes_per_type, forecast_variants, type_layers
from ._plan import check_fraction
from ._replay import DEFAULT_OBJECTIVE, db, objective_function, rows, split
from ._replay import held_out as held_out_count
from ._response import ranked_by_response
from .fitted import AUTO_ORDERS
from .optimal import optimal_schedule

__all__ = ["DEFAULT_MAX_REPLAYS", "DEFAULT_OBJECTIVE", "objective_function", "tune"]

_log = get_logger(__name__)
#: Calls of ``run`` ``tune`` makes at most unless told otherwise (the uncached one included).
DEFAULT_MAX_REPLAYS = 24


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
    max_replays: int | None = DEFAULT_MAX_REPLAYS,
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
        max_replays: the most calls of ``run`` tuning makes, the uncached one included (default 24;
            None: every candidate and every refinement move, 40-150 calls). Within the budget, about
            two thirds go to candidates and the rest to refinement; when the family has more
            candidates than that, the calibration's predicted error (when given) keeps half of them
            and an even spread over the family the other half (the prediction alone misranks
            placements: docs/policies.md). The cost is logged before the first replay.
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
    layers = type_layers(target, calibration)
    per_type = computes_per_type(fraction, n, layers)
    computes = min(per_type.values())
    if computes >= n:
        return fit(
            Schedule(n, {"*": (COMPUTE,) * n}, meta={"rule": "tuned", "target_compute_fraction": fraction})
        )
    top = max_warmup if max_warmup is not None else max(2, n // 2)
    candidates = candidate_schedules(n, per_type, layers, top, family)
    if calibration is not None and calibration.response:
        # the output response ranks them (the shortlist): the forecasts the fit tries (first order and
        # the damped second order, fitted.AUTO_ORDERS) and copies join the race, the replays judge what
        # the first-order prediction gets wrong
        candidates = forecast_variants(candidates, (*AUTO_ORDERS, "copy"))
    if calibration is not None:
        with contextlib.suppress(ScheduleError):
            candidates["optimal (type)"] = optimal_schedule(calibration, fraction)
    if not candidates:
        raise ScheduleError(f"no candidate schedule fits {computes} computations in {n} steps.")
    if max_replays is not None and (
        isinstance(max_replays, bool) or not isinstance(max_replays, int) or max_replays < 3
    ):
        raise ScheduleError(
            f"max_replays must be a whole number of calls of run >= 3 (or None: no budget), got {max_replays!r}."
        )
    # The budget: one call for the uncached samples, one for the copy variant, about two thirds of
    # the rest for candidates and what is left for refinement moves.
    left = None if max_replays is None else max_replays - 2
    if left is not None:
        slots = max(1, (2 * left) // 3) if refine else left
        candidates = _shortlist(candidates, slots, calibration)
        left -= len(candidates)
    calls = max_replays if max_replays is not None else len(candidates) + 2 + (2 * n * len(per_type) * refine)
    moves = (
        "no refinement" if not refine else f"{left} refinement moves" if left is not None else "refinement"
    )
    _log.info(
        "tune: %s %d calls of run, each one generation of its samples (1 uncached, %d candidates, "
        "the copy variant, %s)",
        "at most" if max_replays is not None else "about",
        calls,
        len(candidates),
        moves,
    )
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
    bar = tqdm(
        total=calls - 1,
        desc=f"tuning ({calls} replays at most)",
        unit="replay",
        disable=not progress,
        leave=False,
    )
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
                if left is not None and left <= 0:
                    break  # the budget is spent: the best move so far decides
                labels.append(f"{chosen_label}; refined {r + 1}.{i}")
                score(labels[-1], Schedule(n, plans, base.counts))
                if left is not None:
                    left -= 1
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
            "max_replays": max_replays,
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


def _shortlist(
    candidates: dict[str, Schedule], slots: int, calibration: Calibration | None
) -> dict[str, Schedule]:
    """At most ``slots`` of ``candidates``, in their order: the optimal policy's schedule, then half
    by the calibration's predicted error (when there is one) and the rest an even spread over the
    family (placements the prediction misranks stay in the race)."""
    if len(candidates) <= slots:
        return candidates
    labels = list(candidates)
    keep: list[str] = [k for k in labels if k.startswith("optimal")][:slots]
    if calibration is not None and calibration.response:  # the output response's best, in its order
        ranked = [k for k, _ in ranked_by_response(calibration, candidates) if k not in keep]
        keep += ranked[: slots - len(keep)]
        return {k: candidates[k] for k in labels if k in keep}
    if calibration is not None:
        predicted = {k: _predicted(candidates[k], calibration) for k in labels}
        by_prediction = sorted((k for k in labels if k not in keep), key=lambda k: predicted[k])
        keep += by_prediction[: max(0, (slots - len(keep)) // 2)]
    rest = [k for k in labels if k not in keep]
    want = slots - len(keep)
    if want > 0 and rest:
        picks = np.unique(np.round(np.linspace(0, len(rest) - 1, want)).astype(int))
        keep += [rest[i] for i in picks]
    return {k: candidates[k] for k in labels if k in keep}


def _predicted(schedule: Schedule, calibration: Calibration) -> float:
    """The calibrated cost of a schedule (the optimal policy's cost model), summed over types."""
    errors, forecasts = calibration.type_errors(), calibration.type_forecast_errors()
    total = 0.0
    for kind, table in errors.items():
        plan = schedule.plans.get(kind, schedule.plans.get("*"))
        if plan is None:
            continue
        total += plan_cost(plan, table, forecasts.get(kind))
    return total
