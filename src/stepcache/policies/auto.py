"""The open-loop policy: :func:`open_loop_schedule`, the schedule made from a calibration alone.

:mod:`stepcache.auto` (``stepcache.cache(pipe, compute_fraction=0.5)``) turns each stored calibration
into a schedule through this one function, so the policy it uses is chosen in one place.

**With an output response** (:func:`stepcache.response`, recorded on the calibration): every placement
of ``tune``'s structured family (warm-ups, intervals with phases, TaylorSeer's placement, the last
steps computed or not; :mod:`._family`) at exactly the budget, each with copies and with first-order
forecasts, and the optimal policy's schedule, are scored by their predicted final-sample error
(:mod:`._response`), and the best is taken. No replay. Over 24 development cells of the reference
models the response's first-order pick was 2.75 dB (mean) below the best candidate measured on images,
against 6.5 dB for the calibrated errors' pick (benchmarks/results/open-loop-rank.md). Second-order
forecasts are left out: the first-order prediction is optimistic for them over long gaps (ranking them
too cost 0.9 dB more on average and up to 15 dB in one cell).

**Without one**: the optimal policy (:func:`~stepcache.policies.optimal_schedule`, its defaults), whose
calibrated per-step errors do not see what an error does to the image.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..calibration import Calibration
from ..errors import ScheduleError
from ..schedule import COMPUTE, Schedule
from ._family import candidate_schedules, computes_per_type, forecast_variants, type_layers
from ._plan import check_fraction
from ._response import ranked_by_response
from .optimal import optimal_schedule

__all__ = ["OPEN_LOOP_FORECASTS", "open_loop_schedule"]

#: the forecasts the open loop ranks placements with (module doc: why not second order)
OPEN_LOOP_FORECASTS = ("copy", "first-order")


def open_loop_schedule(calibration: Calibration, fraction: float) -> Schedule:
    """The best open-loop schedule for ``calibration`` at compute ``fraction`` (module doc): ranked by
    the output response when the calibration has one, else the optimal policy's.

    Raises:
        ScheduleError: the fraction is out of (0, 1], or out of the calibration's reach.
    """
    if not calibration.response:
        return optimal_schedule(calibration, fraction)
    check_fraction(fraction)
    n = calibration.num_steps
    layers = type_layers(None, calibration)
    per_type = computes_per_type(fraction, n, layers)
    if min(per_type.values()) >= n:
        return Schedule(
            n, {"*": (COMPUTE,) * n}, meta={"rule": "open-loop", "target_compute_fraction": fraction}
        )
    family = candidate_schedules(n, per_type, layers, max(2, n // 2))
    candidates = forecast_variants(family, OPEN_LOOP_FORECASTS)
    with contextlib.suppress(ScheduleError):
        candidates["optimal (type)"] = optimal_schedule(calibration, fraction)
    if not candidates:
        raise ScheduleError(f"no placement fits {fraction:g} of {n} steps.")
    ranked = ranked_by_response(calibration, candidates)
    label, score = ranked[0]
    chosen = candidates[label]
    info: dict[str, Any] = {
        "rule": "output response",
        "chosen": label,
        "predicted_error_db": round(score, 3),
        "candidates": len(candidates),
        "runner_up": [[k, round(v, 3)] for k, v in ranked[1:4]],
    }
    meta = {
        **chosen.meta,
        "rule": "open-loop",
        "target_compute_fraction": float(fraction),
        "open_loop": info,
        **calibration.provenance(),
    }
    return Schedule(n, chosen.plans, chosen.counts, meta)
