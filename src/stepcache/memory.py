"""Cache memory planning: how many bytes a schedule's stored outputs will hold, before running it.

A cache keeps, per component and guidance branch, the last computed output (and, for forecasting
plans, the one before, or the two before for second-order forecasts) while a later step reads it. Two functions predict the peak of that memory:

* :func:`output_bytes` measures the bytes of each component's output in one run, under forward
  hooks; on a model built on ``torch.device("meta")`` with meta inputs it costs no memory and no
  compute, so a 14B model's outputs are measured from its config alone;
* :func:`predict_peak` replays a schedule's steps with the runtime's own liveness rule
  (:func:`stepcache.schedule.liveness`) and returns the peak bytes held, total and per type, and
  the step where it is reached. For an eager run it equals ``handle.stats.peak_stored_bytes``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import torch

from .discovery import DEFAULT_TYPES, Component, discover
from .errors import StepCacheError
from .runtime.storage import resolve_storage_dtype, stored_nbytes
from .schedule import COMPUTE, Schedule, liveness

__all__ = [
    "MAX_BYTES",
    "MemoryPeak",
    "exact_dtype",
    "holdings",
    "output_bytes",
    "parse_bytes",
    "peak_profile",
    "predict_peak",
    "stored_sizes",
    "unplanned_peak",
]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
#: The most bytes a budget or an output size may be: the largest signed 64-bit integer (no machine
#: addresses more). Larger values are refused rather than overflowing an array or a float.
MAX_BYTES = 2**63 - 1
_SIZE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)\s*$")


def parse_bytes(value: int | str, *, what: str = "memory budget") -> int:
    """A number of bytes: an int, or a string such as ``"16GB"`` (10^9), ``"512MiB"`` (2^20), ``"1.5 GiB"``.

    Raises:
        StepCacheError: anything else (negative, not a number, an unknown unit), naming the problem.
    """
    if isinstance(value, bool):
        raise StepCacheError(f"{what} must be a number of bytes or a string like '16GB', got {value!r}.")
    if isinstance(value, int):
        if value <= 0:
            raise StepCacheError(f"{what} must be a positive number of bytes, got {value}.")
        if value > MAX_BYTES:
            raise StepCacheError(f"{what} must be at most {MAX_BYTES} bytes (2**63 - 1), got {value}.")
        return value
    if isinstance(value, float):
        raise StepCacheError(
            f"{what} must be a whole number of bytes or a string like '16GB', got the float {value!r}."
        )
    if not isinstance(value, str):
        raise StepCacheError(
            f"{what} must be a number of bytes or a string like '16GB', got {type(value).__name__}."
        )
    match = _SIZE.match(value)
    if match is None:
        raise StepCacheError(
            f"{what} {value!r} is not a size: write a number and a unit, like '16GB', '512MiB' or '1.5GiB'."
        )
    unit = match["unit"].upper()
    if unit not in _UNITS:
        raise StepCacheError(
            f"{what} {value!r} has an unknown unit {match['unit']!r}; use B, KB, MB, GB, TB (powers of 10) "
            "or KiB, MiB, GiB, TiB (powers of 2)."
        )
    if len(match["num"]) > 40:  # exact below, but a size needs no more digits than that
        raise StepCacheError(f"{what} {value[:20]!r}... has {len(match['num'])} digits: not a size.")
    size = int(Decimal(match["num"]) * _UNITS[unit])  # exact: a float turns 400 digits into inf
    if size <= 0:
        raise StepCacheError(f"{what} must be a positive number of bytes, got {value!r}.")
    if size > MAX_BYTES:
        raise StepCacheError(
            f"{what} {value!r} is more than {MAX_BYTES} bytes (2**63 - 1), more than any machine holds."
        )
    return size


def output_bytes(
    target: Any,
    run: Callable[[], Any],
    *,
    blocks: Any = None,
    components: Any = None,
    types: Iterable[str] | None = None,
    storage_dtype: Any = None,
) -> dict[str, int]:
    """Bytes of one output of each component of ``target``: component name -> bytes per call.

    ``run()`` calls the model once or more (one denoiser call, or a short generation); every
    discovered component's outputs are measured under a forward hook (``Tensor.nbytes``, through
    tuples) and the largest is kept. One call is one guidance branch: a batched classifier-free
    guidance call's output holds both, split guidance calls each hold one. The names come in the
    order the components were first called, the order :func:`predict_peak` replays them in.

    Works on meta tensors: build the model under ``with torch.device("meta"):`` and pass meta
    inputs, and nothing is allocated or computed.

    Args:
        target: a pipeline or denoiser module.
        run: calls the model (no arguments).
        blocks, components, types: discovery overrides (see :func:`stepcache.discover`); use the
            ones the cache will use (``types=("block",)`` for a whole-block schedule).
        storage_dtype: the cache's ``storage_dtype`` (``"bf16"``, ``"fp16"``, ``"fp8"``): the bytes an
            output holds once stored that way (fp8: one byte per element plus a 4-byte scale per tensor; fp16: two, plus the same scale).
    """
    storage = resolve_storage_dtype(storage_dtype)
    found = discover(target, blocks=blocks, components=components, types=types)
    sizes: dict[str, int] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            size = stored_nbytes(output, storage)  # as computed when storage is None
            if size > sizes.get(name, -1):
                sizes[name] = size

        return hook

    try:
        for comp in found:
            handles.append(comp.module.register_forward_hook(hook_for(comp.name)))
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return sizes


@dataclass(frozen=True)
class MemoryPeak:
    """The most bytes a schedule's stored outputs hold at once.

    Attributes:
        peak_bytes: all types together.
        by_type: each type's own peak (types may peak at different steps).
        step: the step during which ``peak_bytes`` is first reached (None when nothing is stored).
    """

    peak_bytes: int
    by_type: dict[str, int]
    step: int | None


def predict_peak(
    schedule: Schedule,
    bytes_per_component: Mapping[str, int],
    *,
    components: Any,
    branches: int = 1,
    storage_dtype: Any = None,
    compute_dtype: torch.dtype | None = None,
) -> MemoryPeak:
    """The peak memory of ``schedule``'s stored outputs over one generation, without running it.

    Replays the runtime exactly: at each step, each guidance branch, each component in call order,
    a compute step keeps the output only if a later step reads it (dropping what it held
    otherwise), and the earlier outputs a later forecast reads (one for first order, two for second
    order), and a reuse step changes nothing.

    Args:
        schedule: the schedule the cache will run.
        bytes_per_component: component name -> bytes per call, in call order (as
            :func:`output_bytes` returns it).
        components: the discovered components (their names and types resolve the schedule), or the
            pipeline or module itself (discovered as :func:`stepcache.cache` does).
        branches: stores per component: 1 for batched or no guidance, 2 for split classifier-free
            guidance (one denoiser call per branch), and so on.
        storage_dtype, compute_dtype: predict for a cache with ``storage_dtype``: the sizes (measured
            in ``compute_dtype``) are scaled by the bytes per element, plus fp8's and fp16's 4-byte scale (one per
            output; a tuple output holds one per tensor: measure those with ``output_bytes(...,
            storage_dtype=...)`` instead).

    Raises:
        StepCacheError: a scheduled component has no measured size, or ``branches`` < 1.
    """
    if not isinstance(branches, int) or branches < 1:
        raise StepCacheError(f"branches must be a positive integer, got {branches!r}.")
    comps = _components(components, schedule)
    plans = schedule.resolve(comps)
    if storage_dtype is not None:
        bytes_per_component = stored_sizes(bytes_per_component, compute_dtype, storage_dtype)
    missing = [c.name for c in comps if c.name in plans and c.name not in bytes_per_component]
    if missing:
        raise StepCacheError(
            f"no output size for scheduled component(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
            "measure them with stepcache.memory.output_bytes(...) on the same model."
        )
    order = {name: i for i, name in enumerate(bytes_per_component)}
    scheduled = sorted((c for c in comps if c.name in plans), key=lambda c: order[c.name])
    rules = {c.name: liveness(plans[c.name]) for c in scheduled}
    held: dict[tuple[str, int], int] = {}  # (component, branch) -> outputs stored (1 or 2)
    now = dict.fromkeys((c.type for c in scheduled), 0)
    peaks = dict(now)
    total = peak = 0
    peak_step: int | None = None
    for step in range(schedule.num_steps):
        for branch in range(branches):
            for comp in scheduled:
                plan, key = plans[comp.name], (comp.name, branch)
                stored = held.get(key)
                if plan[step] != COMPUTE and stored is not None:
                    continue  # reuse: the store is untouched
                keep = rules[comp.name][0]
                after = min(keep[step], 1 + (stored or 0))
                if after:
                    held[key] = after
                else:
                    held.pop(key, None)
                delta = (after - (stored or 0)) * int(bytes_per_component[comp.name])
                if not delta:
                    continue
                now[comp.type] += delta
                peaks[comp.type] = max(peaks[comp.type], now[comp.type])
                total += delta
                if total > peak:
                    peak, peak_step = total, step
    return MemoryPeak(peak, peaks, peak_step)


def _components(components: Any, schedule: Schedule) -> list[Component]:
    if isinstance(components, (list, tuple)) and all(isinstance(c, Component) for c in components):
        return list(components)
    types = ("block",) if "block" in schedule.plans else DEFAULT_TYPES
    return discover(components, types=types)


def stored_sizes(
    sizes: Mapping[str, int], compute_dtype: torch.dtype | None, storage_dtype: Any
) -> dict[str, int]:
    """Output sizes measured in ``compute_dtype``, as a cache with ``storage_dtype`` stores them (one
    tensor per output: fp8 and fp16 add one 4-byte scale)."""
    storage = resolve_storage_dtype(storage_dtype)
    if storage is None:
        return dict(sizes)
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise StepCacheError(
            "storage_dtype needs the dtype the sizes were measured in (compute_dtype=torch.bfloat16, say), "
            f"got {compute_dtype!r}."
        )
    if storage == compute_dtype:
        return dict(sizes)
    extra = 4 if storage in (torch.float8_e4m3fn, torch.float16) else 0  # their per-tensor scale
    return {k: int(v) // compute_dtype.itemsize * storage.itemsize + extra for k, v in sizes.items()}


def holdings(plan: Sequence[int]) -> list[int]:
    """Outputs a component's store holds after its call at each step (0 to 3), by the runtime's rule."""
    keep = liveness(tuple(plan))[0]
    out, held = [], 0
    for s, v in enumerate(plan):
        if v == COMPUTE or not held:
            held = min(keep[s], 1 + held)
        out.append(held)
    return out


def unplanned_peak(
    schedule: Schedule, sizes: Mapping[str, int], *, components: Any, branches: int = 1
) -> int:
    """The bytes a cache without liveness holds at its peak: every scheduled component keeps its last
    output (and the one or two before, when its plan forecasts) on every branch, as under ``torch.compile``
    and in the original SmoothCache package. The reference point of a memory budget's percentage."""
    comps = _components(components, schedule)
    plans = schedule.resolve(comps)
    return branches * sum(
        int(sizes[c.name]) * (1 + liveness(plans[c.name])[1]) for c in comps if c.name in plans
    )


def exact_dtype(sizes: Any, branches: int = 1) -> Any:
    """The array dtype that holds sums of stored bytes exactly: int64 while every total stays far
    below 2**63 (three outputs per component and branch, summed), else Python integers (``object``),
    so huge sizes are never wrapped into a small or negative peak."""
    bound = 3 * max(branches, 1) * sum(int(v) for v in np.asarray(sizes, dtype=object).ravel())
    return np.int64 if bound < 2**62 else object


def peak_profile(rows: np.ndarray, sizes: np.ndarray, branches: int = 1) -> tuple[int, int, int, int]:
    """The exact peak of stored bytes for per-component holdings ``rows`` (components in call order x
    steps, from :func:`holdings`) and ``sizes`` (bytes per output): ``(peak, step, branch, position)``
    of its first moment (the running total right after that component's call; step -1 when nothing
    is stored). Equals :func:`predict_peak`'s ``peak_bytes`` and ``step``, vectorised for planners."""
    dtype = exact_dtype(sizes, branches)
    held = np.asarray(rows, dtype=np.int64).astype(dtype) * np.asarray(sizes, dtype=dtype)[:, None]
    before = np.concatenate([np.zeros((held.shape[0], 1), dtype=dtype), held[:, :-1]], axis=1)
    total_before, total_after = before.sum(axis=0), held.sum(axis=0)
    # After component i of branch b at step s: branches < b are done, > b not yet.
    run = np.cumsum(held, axis=0) + (total_before - np.cumsum(before, axis=0))
    best = (0, -1, 0, 0)
    for s in range(held.shape[1]):
        for b in range(branches):
            col = run[:, s] + b * total_after[s] + (branches - 1 - b) * total_before[s]
            i = int(np.argmax(col))
            if int(col[i]) > best[0]:
                best = (int(col[i]), s, b, i)
    return best
