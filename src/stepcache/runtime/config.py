"""A cache's options, in one value: :class:`CacheConfig`.

Both doors take it: :func:`stepcache.cache` (its keyword options are this dataclass's fields) and
:func:`~stepcache.integrations.diffusers_hooks.apply_smoothcache`, whose
:class:`~stepcache.integrations.diffusers_hooks.SmoothCacheConfig` is this class plus the schedule.
Every option is checked once, when the config is made; what depends on the model or the schedule
(the fingerprint, which components the schedule covers, the guidance plan's step count) is checked
when a :class:`~stepcache.runtime.handle.CacheHandle` binds the config to a target.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import StepCacheError
from ..guidance import GuidanceReuse
from .storage import resolve_storage_dtype

__all__ = ["DEFAULT_COMPUTE_FRACTION", "CacheConfig", "configure"]

# The compute fraction of a cache given no schedule (stepcache.cache(pipe)): half the component calls.
# On the reference model the optimal policy keeps 53.5 dB PSNR against uncached there (DDIM 50;
# docs/policies.md), and a calibration recorded at the default lookahead reaches it on any step count.
DEFAULT_COMPUTE_FRACTION = 0.5


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """How a cache runs: every option of :func:`stepcache.cache`, checked once when made.

    Attributes:
        blocks, components, types: discovery overrides (see :func:`stepcache.discover`); ``types`` is
            kept as a tuple.
        on_length_mismatch: ``"error"`` (default) or ``"resample"`` when a run makes a different
            number of steps than the schedule has.
        timestep_arg: the denoiser's timestep parameter, when it is not one of the usual names.
        strict: refuse a schedule calibrated on a different model.
        count_macs: measure each component's MACs on its first eager call, under torch's FLOP counter
            (for ``stats.macs_saved``; off by default: it slows that first call down).
        allow_other_caches: stack on top of another library's cache (diffusers' cache hooks,
            cache-dit) instead of refusing; its skipped calls then count as this cache's reuse.
        storage_dtype: keep outputs as ``"bf16"``, ``"fp16"`` or ``"fp8"`` (e4m3 with a per-tensor scale)
            and convert them back on read; None keeps them as computed. Eager calls only.
        offload: keep outputs in (pinned, on CUDA) host memory between their reads, moved on a transfer
            schedule computed from the plan (:func:`stepcache.runtime.offload.transfer_schedule`);
            ``handle.offload_stats`` reports what moved. Eager calls only.
        offload_lead: component calls between a fetch and its read (default: one step).
        guidance: a :class:`stepcache.guidance.GuidanceReuse` (a value: :func:`stepcache.cache` and
            ``SmoothCacheConfig`` also read it from its file): at the compute steps it marks, a
            component computes the conditional guidance branch only and stands in for the
            unconditional one (its last output, or the kept guidance difference). Eager calls only.
        compute_fraction: with no schedule, the share of component calls to execute (default
            :data:`DEFAULT_COMPUTE_FRACTION`, 0.5): the cache calibrates itself and remembers
            (:mod:`stepcache.auto`, docs/store.md). Not with a schedule, which fixes its own.
        calibration_runs: with no schedule, the generations recorded (each exactly uncached) before
            caching starts, when no calibration is stored for them (default 1).

    Raises:
        StepCacheError: an option out of its range, or two options that do not go together.
    """

    blocks: Any = None
    components: Any = None
    types: Sequence[str] | None = None
    on_length_mismatch: str = "error"
    timestep_arg: str | None = None
    strict: bool = True
    count_macs: bool = False
    allow_other_caches: bool = False
    storage_dtype: Any = None
    offload: bool = False
    offload_lead: int | None = None
    guidance: Any = None
    compute_fraction: float | None = None
    calibration_runs: int | None = None

    def __post_init__(self) -> None:
        self._check_auto()
        resolve_storage_dtype(self.storage_dtype)  # refuse a bad name here, not when applied
        if not isinstance(self.offload, bool):
            raise StepCacheError(f"offload must be True or False, got {self.offload!r}.")
        lead = self.offload_lead
        if lead is not None and (isinstance(lead, bool) or not isinstance(lead, int) or lead < 1):
            raise StepCacheError(
                f"offload_lead must be a positive number of component calls (or None), got {lead!r}."
            )
        if lead is not None and not self.offload:
            raise StepCacheError(
                "offload_lead is the prefetch distance of offload=True; pass offload=True too."
            )
        if self.on_length_mismatch not in ("error", "resample"):
            raise StepCacheError(
                f"on_length_mismatch must be 'error' or 'resample', got {self.on_length_mismatch!r}."
            )
        if self.types is not None:
            if isinstance(self.types, str):
                raise StepCacheError(
                    f"types must be a list of component types, got the string {self.types!r}."
                )
            object.__setattr__(self, "types", tuple(self.types))
        if self.guidance is not None:
            self._check_guidance()

    def _check_auto(self) -> None:
        fraction, runs = self.compute_fraction, self.calibration_runs
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or math.isnan(fraction)
            or not 0 < fraction <= 1
        ):
            raise StepCacheError(f"compute_fraction must be in (0, 1] (or None), got {fraction!r}.")
        if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 1):
            raise StepCacheError(
                f"calibration_runs must be a positive number of generations (or None), got {runs!r}."
            )
        if self.auto and self.guidance is not None:
            raise StepCacheError(
                "guidance= is a plan for one schedule's steps; caching without a schedule "
                "(compute_fraction=, calibration_runs=) makes its own: give a schedule with guidance=."
            )

    @property
    def auto(self) -> bool:
        """Options that only caching without a schedule takes were given."""
        return self.compute_fraction is not None or self.calibration_runs is not None

    def _check_guidance(self) -> None:
        if isinstance(self.guidance, (str, os.PathLike)):
            raise StepCacheError(
                f"CacheConfig takes the guidance plan itself, got the file {os.fspath(self.guidance)!r}: "
                "read it with GuidanceReuse.load, or give the file to stepcache.cache or SmoothCacheConfig."
            )
        if not isinstance(self.guidance, GuidanceReuse):
            raise StepCacheError(
                f"guidance must be a stepcache.guidance.GuidanceReuse (or its file), "
                f"got {type(self.guidance).__name__}."
            )
        if self.on_length_mismatch == "resample":
            raise StepCacheError(
                "guidance reuse does not resample: pass on_length_mismatch='error' with guidance=."
            )
        if self.storage_dtype is not None or self.offload:
            raise StepCacheError(
                "guidance reuse keeps its outputs as computed: drop storage_dtype/offload with it."
            )


def configure(config: CacheConfig | None, options: Mapping[str, Any]) -> CacheConfig:
    """``config`` with ``options`` (:class:`CacheConfig` fields given as keywords) in place of its
    own values; with no config, the defaults with ``options``. One rule for both doors: a keyword
    option always wins over the config's field of the same name."""
    if config is None:
        return CacheConfig(**options)
    if not isinstance(config, CacheConfig):
        raise StepCacheError(f"config must be a stepcache.CacheConfig, got {type(config).__name__}.")
    return replace(config, **options) if options else config
