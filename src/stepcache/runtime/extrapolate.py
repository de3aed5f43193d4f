"""Forecasting a reuse step's output from the last computed ones, through tuples of tensors.

One order of operations serves the eager slot (:mod:`.slot`, float weights) and the compiled path
(:mod:`.compiled`, tensor weights, differences computed beforehand), so both agree bit for bit. The
weights come from :func:`stepcache.schedule.forecast_coefficients`.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["extrapolate", "extrapolate2"]


def extrapolate(last: Any, previous: Any, coef: float | torch.Tensor, difference: bool = False) -> Any:
    """last + coef * (last - previous), through tuples of tensors (two-stream attention); with
    ``difference``, ``previous`` already is the difference (last - previous)."""
    if isinstance(last, tuple):
        return tuple(extrapolate(a, b, coef, difference) for a, b in zip(last, previous, strict=True))
    if isinstance(last, torch.Tensor):
        return last + coef * (previous if difference else last - previous)
    return last


def extrapolate2(
    last: Any,
    previous: Any,
    earlier: Any,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    difference: bool = False,
) -> Any:
    """(last + alpha * (last - previous)) + beta * (previous - earlier), through tuples of tensors;
    with ``difference``, ``previous`` and ``earlier`` already are those two differences. One order of
    operations for the eager and the compiled path, so they agree bit for bit."""
    if isinstance(last, tuple):
        return tuple(
            extrapolate2(a, b, c, alpha, beta, difference)
            for a, b, c in zip(last, previous, earlier, strict=True)
        )
    if isinstance(last, torch.Tensor):
        if difference:
            return last + alpha * previous + beta * earlier
        return last + alpha * (last - previous) + beta * (previous - earlier)
    return last
