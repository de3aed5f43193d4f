"""Scoring replays against uncached samples: what closed-loop policies (:func:`~stepcache.tune`,
:func:`~stepcache.policies.tune_guidance`) share: the objective, the fit / held-out split, samples as rows."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ScheduleError

__all__ = ["DEFAULT_OBJECTIVE", "db", "held_out", "objective_function", "rows", "split"]

#: What ``tune`` minimises unless told otherwise: the mean error of the worst quarter of the samples.
DEFAULT_OBJECTIVE = "worst-25%"
_OBJECTIVE_HELP = (
    "objective must be 'mean', 'worst', 'worst-K' (K samples, e.g. 'worst-3'), 'worst-P%' (e.g. 'worst-25%'), "
    "'quantile-Q' (Q in (0, 1), e.g. 'quantile-0.1': the tenth percentile PSNR) or 'mse'"
)


def objective_function(objective: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``objective`` (see :func:`stepcache.tune`) as a function of (per-sample error in dB, per-sample MSE)
    to one score in dB, lower is better. Raises :class:`ScheduleError` for anything else."""
    if not isinstance(objective, str):
        raise ScheduleError(f"{_OBJECTIVE_HELP}; got {objective!r}.")
    name = objective.strip().lower()
    if name == "mean":
        return lambda e, _: float(e.mean())
    if name == "worst":
        return lambda e, _: float(e.max())
    if name == "mse":
        return lambda _, mse: float(db(mse.mean()))
    if m := re.fullmatch(r"worst-(\d+)", name):
        k = int(m.group(1))
        if k < 1:
            raise ScheduleError(f"{_OBJECTIVE_HELP}; 'worst-K' needs K >= 1, got {objective!r}.")
        return lambda e, _: float(e.topk(min(k, e.numel())).values.mean())
    if m := re.fullmatch(r"worst-(\d+(?:\.\d*)?)%", name):
        share = float(m.group(1)) / 100
        if not 0 < share <= 1:
            raise ScheduleError(f"{_OBJECTIVE_HELP}; 'worst-P%' needs 0 < P <= 100, got {objective!r}.")
        return lambda e, _: float(e.topk(max(1, math.ceil(share * e.numel() - 1e-9))).values.mean())
    if m := re.fullmatch(r"quantile-(\d*\.?\d+)", name):
        q = float(m.group(1))
        if not 0 < q < 1:
            raise ScheduleError(f"{_OBJECTIVE_HELP}; 'quantile-Q' needs 0 < Q < 1, got {objective!r}.")
        # The Q quantile of the PSNR is the 1 - Q quantile of the error.
        return lambda e, _: float(torch.quantile(e.double(), 1 - q))
    raise ScheduleError(f"{_OBJECTIVE_HELP}; got {objective!r}.")


def db(mse: torch.Tensor) -> Any:
    return 10 * torch.log10(mse.double().clamp_min(1e-30))


def split(samples: int, validation: float | int | None) -> tuple[list[int], list[int]]:
    """(fit indices, validation indices) of ``samples``: a fixed shuffle, the held-out part last."""
    count = held_out(samples, validation)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(0)).tolist()
    return sorted(order[: samples - count]), sorted(order[samples - count :])


def held_out(samples: int, validation: float | int | None) -> int:
    """How many of ``samples`` ``validation`` holds out; raises for a value that cannot be one."""
    if validation is None:  # the default: half, when there are two samples to split
        count = samples // 2
    elif isinstance(validation, bool) or not isinstance(validation, (int, float)) or not validation >= 0:
        raise ScheduleError(
            f"validation must be a share in [0, 1) or a whole number of samples >= 0, got {validation!r}."
        )
    elif isinstance(validation, int):
        count = validation
    elif validation < 1:
        count = max(1, round(validation * samples)) if validation > 0 else 0
    else:
        raise ScheduleError(f"validation as a share must be below 1, got {validation!r} (a count is an int).")
    if count and count >= samples:
        raise ScheduleError(
            f"validation holds out {count} of the {samples} sample(s) `run` returns, leaving none to fit: "
            "generate more samples per run, or pass a smaller validation (0: none)."
        )
    return count


def rows(samples: torch.Tensor) -> torch.Tensor:
    """Samples as rows (index 0), flattened."""
    return samples.reshape(1, -1) if samples.ndim == 0 else samples.reshape(samples.shape[0], -1)
