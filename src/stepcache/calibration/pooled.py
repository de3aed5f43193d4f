"""Calibration statistics of one process, or pooled exactly over a ``torch.distributed`` process
group (beside :mod:`stepcache.distributed`, which does the collectives)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import distributed
from ..errors import CalibrationError
from .moments import Moments as _Moments

if TYPE_CHECKING:
    from .recorder import Recorder as _Recorder

__all__ = ["check_lengths", "local_statistics", "pooled_statistics", "sum_over"]


def check_lengths(lengths: Sequence[int]) -> int:
    """The one step count of every generation (raises unless there is exactly one, of 2 or more)."""
    if not lengths:
        raise CalibrationError("no denoising step was observed: does `run` call the model?")
    if len(set(lengths)) != 1:
        raise CalibrationError(
            f"generations had different step counts {sorted(set(lengths))}; calibrate one step count at a time."
        )
    if lengths[0] < 2:
        raise CalibrationError("each generation made only one denoising step; nothing to compare.")
    return lengths[0]


def local_statistics(
    recorder: _Recorder, names: Sequence[str]
) -> tuple[int, int, dict[str, _Moments], dict[str, _Moments]]:
    """(generations, steps, error moments, forecast moments) of this process's generations."""
    gens, fgens = recorder.generations, recorder.forecast_generations
    n = check_lengths([next(iter(g.values())).shape[0] for g in gens])
    moments = {name: _Moments.of(np.stack([g[name] for g in gens])) for name in names}
    fmoments = {name: _Moments.of(np.stack([g[name] for g in fgens])) for name in names} if fgens else {}
    return len(gens), n, moments, fmoments


def sum_over(macs: Sequence[float | None], group: Any) -> list[float | None]:
    """Each component's MACs summed over the ranks of ``group`` (None where any rank has none): under
    context parallelism each rank counts its own slice of the sequence."""
    values = torch.tensor([[m or 0.0, m is None] for m in macs], dtype=torch.float64).reshape(-1, 2)
    summed = distributed.all_reduce(values, group)
    return [None if none else float(v) for v, none in summed.tolist()]


def pooled_statistics(
    recorder: _Recorder,
    names: Sequence[str],
    group: Any,
    failure: Exception | None,
    macs: Sequence[float | None],
    seconds: float,
) -> tuple[int, int, dict[str, _Moments], dict[str, _Moments], list[float | None], float]:
    """The statistics of every rank's generations, identical on every rank of ``group``.

    Two collectives: a MAX-reduce of what every rank must agree on (failures, step counts, MACs),
    then an all-gather of each rank's per-cell moments, combined exactly in rank order. Every
    decision to raise is taken on reduced values, so all ranks raise together, never one alone while
    the others wait in a collective.
    """
    me = distributed.group_rank(group)
    gens, fgens = recorder.generations, recorder.forecast_generations
    lengths = [next(iter(g.values())).shape[0] for g in gens] if failure is None else []
    big = float(2**52)
    status = [
        me + 1.0 if failure is not None else 0.0,
        float(max(lengths, default=-1)),
        -float(min(lengths, default=big)),
        float(len(names)),
        -float(len(names)),
        float(bool(fgens)),
        seconds,
        *[-1.0 if m is None else float(m) for m in macs],
    ]
    got = distributed.all_reduce(torch.tensor(status, dtype=torch.float64), group, op="max").tolist()
    if got[0] > 0:
        if failure is not None:
            raise failure
        raise CalibrationError(
            f"rank {int(got[0]) - 1} of the calibration's process group failed during its generations "
            "(see its log); no calibration was made."
        )
    if got[3] != -got[4]:
        raise CalibrationError(
            f"the ranks discovered different numbers of components ({int(-got[4])} to {int(got[3])}): "
            "every rank must calibrate the same model with the same discovery options."
        )
    n_max, n_min = int(got[1]), int(-got[2])
    if n_max < 0:
        check_lengths([])
    check_lengths([n_max, n_min])
    n, k = n_max, recorder.k
    f = recorder.width - 1  # forecast errors per (step, j): first order, then second order if recorded
    forecast = bool(got[5])
    pooled_macs = [None if m < 0 else m for m in got[7:]]
    local = (
        {name: _Moments.of(np.stack([g[name] for g in gens])) for name in names}
        if gens
        else {name: _Moments.empty((n, k)) for name in names}
    )
    flocal = (
        {name: _Moments.of(np.stack([g[name] for g in fgens])) for name in names}
        if fgens
        else {name: _Moments.empty((n, k, f)) for name in names}
    )
    parts = [np.array([float(len(gens))])]
    for name in names:
        parts += local[name].pack() + (flocal[name].pack() if forecast else [])
    gathered = distributed.all_gather(torch.from_numpy(np.concatenate(parts)), group)
    sizes = [1] + ([n * k] * 3 + ([n * k * f] * 3 if forecast else [])) * len(names)
    total = 0
    moments = {name: _Moments.empty((n, k)) for name in names}
    fmoments = {name: _Moments.empty((n, k, f)) for name in names} if forecast else {}
    for flat in gathered:
        chunks = np.split(flat.numpy(), np.cumsum(sizes)[:-1])
        total += int(chunks[0][0])
        at = 1
        for name in names:
            moments[name] = moments[name] + _Moments.unpack(chunks[at : at + 3], (n, k))
            at += 3
            if forecast:
                fmoments[name] = fmoments[name] + _Moments.unpack(chunks[at : at + 3], (n, k, f))
                at += 3
    return total, n, moments, fmoments, pooled_macs, got[6]
