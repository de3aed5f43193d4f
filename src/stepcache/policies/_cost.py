"""The cost model the optimal policy minimises and the memory fitter prices plans with: the summed
calibrated error of a plan, each step priced as the runtime runs it."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..errors import ScheduleError
from ..schedule import BDF2, COMPUTE, FORECAST2, METHODS, REUSE

__all__ = ["INF", "finite", "plan_cost", "second_order_tables"]

INF = math.inf


def finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return np.where(np.isfinite(a), a, INF)


def second_order_tables(
    forecast2: Mapping[str, np.ndarray] | None, n: int, k: int
) -> dict[int, np.ndarray] | None:
    """Second-order tables by method name -> by plan value, checked (None: none)."""
    if not forecast2:
        return None
    out = {}
    for method, table in forecast2.items():
        if METHODS.get(method) not in (FORECAST2, BDF2):
            raise ScheduleError(
                f"second-order forecast errors are keyed 'taylor2' or 'bdf2', got {method!r}."
            )
        t = finite(table)
        if t.shape != (n, k, k + 1, k + 1):
            raise ScheduleError(
                f"{method} forecast errors have shape {t.shape}, expected {(n, k, k + 1, k + 1)}."
            )
        out[METHODS[method]] = t
    return out


def plan_cost(
    plan: tuple[int, ...],
    errors: np.ndarray,
    forecast_errors: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    forecast2_errors: Mapping[str, np.ndarray] | None = None,
) -> float:
    """The cost model's value of a given plan (what :func:`cost_curve` minimises); inf if a run is
    longer than the calibration's lookahead or a forecast has no calibrated error.

    Each step is priced as the runtime runs it: a forecast with too little history at the cost of
    the lower order it falls back to. A second-order forecast without ``forecast2_errors`` is priced
    at the first-order error (an approximation: the calibration did not measure it)."""
    copy = finite(errors)
    fc = None if forecast_errors is None else finite(forecast_errors)
    n, k = copy.shape
    fc2 = second_order_tables(forecast2_errors, n, k) or {}
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    total, a, b, c = 0.0, None, None, None
    for s, v in enumerate(plan):
        if v == COMPUTE:
            a, b, c = s, a, b
            continue
        if a is None or s - a > k:
            return INF
        if v in fc2 and c is not None and b is not None:
            total += w[s] * fc2[v][s, s - a - 1, a - b - 1, b - c - 1]
        elif v != REUSE and fc is not None and b is not None:
            total += w[s] * fc[s, s - a - 1, a - b - 1]
        else:
            total += w[s] * copy[s, s - a - 1]
    return float(total)
