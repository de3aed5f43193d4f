"""A schedule's final-sample error predicted from the calibration's output response.

:func:`stepcache.response` records, per component type and per sample, the inner products
``M[r, s, j, i] = <g_s, h_j>`` of the gradient of a random projection ``r`` of sample ``i``'s final
sample with respect to step ``s``'s outputs and step ``j``'s outputs. A plan replaces step ``s``'s
output by ``h_a + alpha (h_a - h_b) + beta (h_b - h_c)`` (a copy: ``alpha = beta = 0``) of its computed
steps ``a > b > c``, exactly as the runtime does (:func:`stepcache.schedule.forecast_coefficients`), so
the first-order change of the projection is ``sum_s M[s, a] - M[s, s] + alpha (M[s, a] - M[s, b]) +
beta (M[s, b] - M[s, c])`` summed over types; the mean of its square over projections estimates each
sample's squared error. The score is the mean over samples of ``10 log10(MSE)``, the unit of ``tune``'s
scores (lower is better; PSNR for samples of range 2 is ``10 log10(4) - score``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..calibration import Calibration
from ..errors import ScheduleError
from ..schedule import Schedule, forecast_coefficients, forecast_sources

__all__ = ["predicted_error_db", "ranked_by_response"]


def predicted_error_db(schedule: Schedule, response: Mapping[str, np.ndarray], sample_size: int) -> float:
    """The schedule's predicted mean per-sample error in dB (module doc); ``inf`` when a type's plan
    is not one plan for all its layers (layer-granularity schedules are not predicted), or its gains
    are per component (the response is per type)."""
    if schedule.gains_per_selector:
        return float("inf")
    delta: np.ndarray | None = None
    for kind, m in response.items():
        plan = schedule.plans.get(kind, schedule.plans.get("*"))
        if plan is None:
            return float("inf")
        d = _change(plan, np.asarray(m), schedule.gains)  # type: ignore[arg-type]  # per step here
        delta = d if delta is None else delta + d
    if delta is None:
        return float("inf")
    mse = np.maximum((delta**2).mean(axis=0) / max(1, sample_size), 1e-30)
    return float(np.mean(10 * np.log10(mse)))


def _change(plan: tuple[int, ...], m: np.ndarray, gains: Sequence[Sequence[float]] | None) -> np.ndarray:
    """``(projections, samples)``: the first-order change of each projection from this type's plan."""
    out = np.zeros((m.shape[0], m.shape[3]))
    for s, v, a, b, c in forecast_sources(plan):
        alpha, beta = forecast_coefficients(v, s, a, b, c)
        if gains is not None:
            alpha, beta = alpha * gains[s][0], beta * gains[s][1]
        out += m[:, s, a] - m[:, s, s]
        if alpha and b is not None:
            out += alpha * (m[:, s, a] - m[:, s, b])
        if beta and b is not None and c is not None:
            out += beta * (m[:, s, b] - m[:, s, c])
    return out


def ranked_by_response(calibration: Calibration, candidates: dict[str, Schedule]) -> list[tuple[str, float]]:
    """``(label, predicted error dB)`` of ``candidates``, best first (needs ``calibration.response``)."""
    if not calibration.response:
        raise ScheduleError(
            "this calibration has no output response: run stepcache.response(model, calibration, run) first."
        )
    size = int(calibration.meta.get("response", {}).get("sample_size", 1))
    scored = [(k, predicted_error_db(s, calibration.response, size)) for k, s in candidates.items()]
    return sorted(scored, key=lambda kv: kv[1])
