"""Cache memory planning: how many bytes a schedule's stored outputs will hold, before running it.

A cache keeps, per component and guidance branch, the last computed output (and, for forecasting
plans, the one before) while a later step reads it. Two functions predict the peak of that memory:

* :func:`output_bytes` measures the bytes of each component's output in one run, under forward
  hooks; on a model built on ``torch.device("meta")`` with meta inputs it costs no memory and no
  compute, so a 14B model's outputs are measured from its config alone;
* :func:`predict_peak` replays a schedule's steps with the runtime's own liveness rule
  (:func:`stepcache.runtime.cache.liveness`) and returns the peak bytes held, total and per type, and
  the step where it is reached. For an eager run it equals ``handle.stats.peak_stored_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .discovery import DEFAULT_TYPES, Component, discover
from .errors import StepCacheError
from .runtime.cache import liveness, nbytes
from .schedule import COMPUTE, Schedule

__all__ = ["MemoryPeak", "output_bytes", "predict_peak"]


def output_bytes(
    target: Any,
    run: Callable[[], Any],
    *,
    blocks: Any = None,
    components: Any = None,
    types: Iterable[str] | None = None,
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
    """
    found = discover(target, blocks=blocks, components=components, types=types)
    sizes: dict[str, int] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            size = nbytes(output)
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
) -> MemoryPeak:
    """The peak memory of ``schedule``'s stored outputs over one generation, without running it.

    Replays the runtime exactly: at each step, each guidance branch, each component in call order,
    a compute step keeps the output only if a later step reads it (dropping what it held
    otherwise), a forecasting plan keeps the previous output too, and a reuse step changes nothing.

    Args:
        schedule: the schedule the cache will run.
        bytes_per_component: component name -> bytes per call, in call order (as
            :func:`output_bytes` returns it).
        components: the discovered components (their names and types resolve the schedule), or the
            pipeline or module itself (discovered as :func:`stepcache.cache` does).
        branches: stores per component: 1 for batched or no guidance, 2 for split classifier-free
            guidance (one denoiser call per branch), and so on.

    Raises:
        StepCacheError: a scheduled component has no measured size, or ``branches`` < 1.
    """
    if not isinstance(branches, int) or branches < 1:
        raise StepCacheError(f"branches must be a positive integer, got {branches!r}.")
    comps = _components(components, schedule)
    plans = schedule.resolve(comps)
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
                keep, keep_two = rules[comp.name]
                after = (2 if keep_two and stored is not None else 1) if keep[step] else 0
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
