"""The front door: :func:`cache`.

It reads what the user names into values (a schedule from a file, a folder or a hub repository id; a
guidance plan from its file), makes the options one :class:`~stepcache.CacheConfig`, and opens a
:class:`~stepcache.runtime.handle.CacheHandle`: the runtime itself never reads a file or the hub.
Given no schedule, the handle's schedules come from :mod:`stepcache.auto`: the cache calibrates
itself on the first generation of each kind and remembers (docs/store.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from ._logging import follow_diffusers
from .auto import auto_handle
from .integrations.hub import resolve_guidance, resolve_schedule
from .runtime.config import CacheConfig, configure
from .runtime.handle import CacheHandle
from .schedule import Schedule

__all__ = ["CacheConfig", "cache"]


class _Default:
    """An option not given as a keyword: the config's value, or CacheConfig's default."""

    def __repr__(self) -> str:
        return "<config or default>"


_DEFAULT: Any = _Default()
_OPTIONS = tuple(f.name for f in fields(CacheConfig))


def cache(
    target: Any,
    schedule: Schedule | str | os.PathLike[str] | None = None,
    config: CacheConfig | None = None,
    *,
    blocks: Any = _DEFAULT,
    components: Any = _DEFAULT,
    types: Iterable[str] | None = _DEFAULT,
    on_length_mismatch: str = _DEFAULT,
    timestep_arg: str | None = _DEFAULT,
    strict: bool = _DEFAULT,
    count_macs: bool = _DEFAULT,
    allow_other_caches: bool = _DEFAULT,
    storage_dtype: Any = _DEFAULT,
    offload: bool = _DEFAULT,
    offload_lead: int | None = _DEFAULT,
    guidance: Any = _DEFAULT,
    compute_fraction: float | None = _DEFAULT,
    calibration_runs: int | None = _DEFAULT,
) -> CacheHandle:
    """Start caching ``target`` (a pipeline or denoiser module) with ``schedule``; returns the handle.

    ``with stepcache.cache(pipe, schedule) as handle:`` caches inside the block; without ``with``,
    caching lasts until ``handle.close()`` or :func:`stepcache.disable`.

    With no schedule, ``stepcache.cache(pipe, compute_fraction=0.5)`` is the one line: each
    generation's key (model and weights, scheduler, step count, guidance scale, latent shape) is
    looked up in the model's own folder or repository and in the calibration store
    (``$STEPCACHE_HOME``, :mod:`stepcache.store`). Found, the generation is cached from its first
    step; not found, it runs exactly uncached while it is recorded, the calibration is stored and
    caching starts with the next generation (:mod:`stepcache.auto`; one INFO log line says which).

    The options are :class:`~stepcache.CacheConfig`'s, given as a ``config``, as keywords, or both:
    a keyword always wins over the config's field of the same name (``cache(pipe, s, base,
    offload=True)`` is ``base`` with offloading). Options given neither way take the defaults below.

    Args:
        target: a diffusers pipeline (its transformer(s) are cached) or an ``nn.Module`` denoiser.
        schedule: a :class:`Schedule`, a schedule file, a folder holding ``stepcache_schedule.json``
            (a model folder, say) or a hub repository id; None (default): the cache calibrates
            itself and remembers (above).
        config: a :class:`~stepcache.CacheConfig` (None: the defaults).
        blocks, components, types: discovery overrides (see :func:`stepcache.discover`).
        on_length_mismatch: ``"error"`` (default) or ``"resample"`` when a run makes a different
            number of steps than the schedule has.
        timestep_arg: the denoiser's timestep parameter, when it is not one of the usual names.
        strict: refuse a schedule calibrated on a different model (default True).
        count_macs: measure each component's MACs on its first eager call, under torch's FLOP counter
            (for ``stats.macs_saved``; off by default: it slows that first call down).
        allow_other_caches: stack on top of another library's cache (diffusers' cache hooks,
            cache-dit) instead of refusing; its skipped calls then count as this cache's reuse.
        storage_dtype: keep outputs as ``"bf16"``, ``"fp16"`` or ``"fp8"`` (e4m3 with a per-tensor scale)
            and convert them back on read; None (default) keeps them as computed. Eager calls only.
        offload: keep outputs in (pinned, on CUDA) host memory between their reads, moved on a transfer
            schedule computed from the plan (:func:`stepcache.runtime.offload.transfer_schedule`);
            ``handle.offload_stats`` reports what moved. Eager calls only.
        offload_lead: component calls between a fetch and its read (default: one step).
        guidance: a :class:`stepcache.guidance.GuidanceReuse` (or its file): at the compute steps it
            marks, a component computes the conditional guidance branch only and stands in for the
            unconditional one (its last output, or the kept guidance difference). Eager calls only.
        compute_fraction: with no schedule, the share of component calls to execute (default
            0.5, :data:`stepcache.runtime.config.DEFAULT_COMPUTE_FRACTION`).
        calibration_runs: with no schedule, the generations recorded uncached before caching starts
            when no calibration is found for them (default 1).
    """
    given = {name: value for name, value in locals().items() if name in _OPTIONS and value is not _DEFAULT}
    follow_diffusers()
    if schedule is None:
        return auto_handle(target, configure(config, given)).open()
    schedule = resolve_schedule(schedule)
    if given.get("guidance") is not None:
        given["guidance"] = resolve_guidance(given["guidance"])
    return CacheHandle(target, schedule, configure(config, given)).open()
