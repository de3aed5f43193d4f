"""stepcache on ComfyUI's own sampler: the wrappers a StepCache node puts on a *clone* of the MODEL.

ComfyUI runs a sampling through chains of wrappers (``comfy.patcher_extension.WrappersMP``) that a
ModelPatcher carries; :func:`apply` adds three to a clone, so the MODEL it was given, and every
other clone of it, samples as before. Nothing is put on the diffusion model itself until a run
starts, and everything is taken off when it ends:

* ``OUTER_SAMPLE``, around one sampling run (a KSampler, SamplerCustom, ...): it reads the run's
  key (:mod:`.keys`: model, LoRA patches, sampler, sigmas, guidance, latent shape) and either records
  a calibration of this run (:func:`stepcache.calibrate`, the run itself uncached, saved to the
  ``stepcache`` model folder) or caches it with the schedule that calibration gives
  (:func:`stepcache.optimal_schedule` at the node's compute fraction), through a
  :class:`~stepcache.runtime.CacheHandle` opened for this run and closed when it ends, however it
  ends (ComfyUI's interrupt raises through here). The next run starts afresh.
* ``PREDICT_NOISE``, around one evaluation of the model by the sampler (every cond at one sigma): one
  step of the schedule. A sampler that evaluates twice per step (Heun, DPM2) makes two schedule
  steps per sampling step, in its calibration and its cached runs alike.
* ``APPLY_MODEL``, around one call of the diffusion model: which conds it carries (their uuids, as
  ComfyUI's sampler batched them: cond and uncond in one call, or each in calls of its own) is its
  guidance branch. Step and branch go to the step tracker before the call (its manual mode): no
  timestep is read, no host sync.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...calibration import DEFAULT_LOOKAHEAD, Calibration, calibrate
from ...discovery import Component, discover, unwrap
from ...errors import CalibrationError, DiscoveryError, StepCacheError
from ...memory import output_bytes, parse_bytes, stored_sizes
from ...policies import optimal_schedule
from ...runtime import CacheConfig, CacheHandle, CacheStats, StepTracker
from ...runtime.session import Interceptor, TorchInstaller, Undo
from ...runtime.storage import resolve_storage_dtype
from ...schedule import Schedule
from . import store
from .families import CACHE_MODES, discovery_args, family_of
from .keys import RunKey, run_key

__all__ = ["WRAPPER_KEY", "ComfyInstaller", "RunReport", "Settings", "StepCachePatch", "apply", "patch_of"]

logger = logging.getLogger(__name__)

WRAPPER_KEY = "stepcache"
MODES = ("auto", "calibrate", "schedule")
# Schedule metadata that describes the weights a calibration saw: a run's key already covers them,
# and ComfyUI patches weights (LoRA) only once the model is loaded, inside the run.
_WEIGHTS_META = ("dtype", "adapters", "weights_digest")


@dataclass(frozen=True)
class Settings:
    """What a StepCache node asked for.

    Attributes:
        mode: ``"auto"`` (calibrate the first run of each key, cache the later ones), ``"calibrate"``
            (record and save a calibration of every run, cache none) or ``"schedule"`` (cache every
            run with ``schedule``).
        compute_fraction: share of component calls to execute (``mode="auto"``).
        schedule: the schedule of ``mode="schedule"`` (resampled to a run of another step count).
        cache: ``"auto"`` (the model family's choice), ``"blocks"`` or ``"components"``.
        granularity: ``"type"`` (one plan per component type) or ``"layer"`` (one per component).
        memory_budget: bytes the kept outputs may hold at once (an int or ``"16GB"``), or None.
        storage_dtype: keep outputs as ``"bf16"``, ``"fp16"`` or ``"fp8"``; None: as computed.
        folder: where calibrations are read and written; None: ComfyUI's ``models/stepcache``.
        lookahead: the longest reuse run a calibration measures; None: stepcache's default
            (``DEFAULT_LOOKAHEAD``), or the run's sampling steps - 1 when fewer.
    """

    mode: str = "auto"
    compute_fraction: float = 0.5
    schedule: Schedule | None = None
    cache: str = "auto"
    granularity: str = "type"
    memory_budget: int | str | None = None
    storage_dtype: str | None = None
    folder: str | None = None
    lookahead: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise StepCacheError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.cache not in CACHE_MODES:
            raise StepCacheError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}.")
        if self.mode == "schedule" and not isinstance(self.schedule, Schedule):
            raise StepCacheError("mode='schedule' needs a stepcache.Schedule (schedule=...).")
        if not 0 < self.compute_fraction <= 1:
            raise StepCacheError(f"compute_fraction must be in (0, 1], got {self.compute_fraction!r}.")
        if self.granularity not in ("type", "layer"):
            raise StepCacheError(f"granularity must be 'type' or 'layer', got {self.granularity!r}.")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))
        resolve_storage_dtype(self.storage_dtype)
        if self.lookahead is not None and (isinstance(self.lookahead, bool) or self.lookahead < 1):
            raise StepCacheError(f"lookahead must be a positive integer (or None), got {self.lookahead!r}.")


@dataclass(frozen=True)
class RunReport:
    """What one sampling run of a patched model did.

    Attributes:
        action: ``"calibrated"`` (recorded, uncached), ``"cached"``, ``"uncalibrated"`` (a run too
            short to calibrate: it ran uncached and left no calibration) or ``"uncached"`` (a model
            in which discovery finds nothing to cache: it ran as without the node).
        key: the run's key (:class:`~.keys.RunKey`), None for a schedule-file node.
        evaluations: sampler evaluations of the model (schedule steps) the run made.
        branches: most diffusion-model calls in one evaluation (guidance branches).
        stats: the cache's stats (cached runs).
        schedule: the schedule the run followed (cached runs).
        calibration: the calibration recorded (calibrated runs) or used (cached runs).
        file: the calibration file written or read, if any.
        overflowed: the run made more evaluations than the schedule has; the rest ran uncached.
    """

    action: str
    key: RunKey | None
    evaluations: int
    branches: int
    stats: CacheStats | None = None
    schedule: Schedule | None = None
    calibration: Calibration | None = None
    file: str | None = None
    overflowed: bool = False


class ComfyInstaller(TorchInstaller):
    """stepcache's torch hooks, handing each kept output on as a copy when the blocks update their
    inputs in place (Flux's ``img += ...``): the next block would otherwise overwrite what is kept."""

    def __init__(self, copy_outputs: bool) -> None:
        self.copy_outputs = copy_outputs

    def hook_component(self, comp: Component, make_forward: Interceptor) -> Undo:
        if not self.copy_outputs:
            return super().hook_component(comp, make_forward)

        def copying(c: Component, original: Callable[..., Any]) -> Callable[..., Any]:
            inner = make_forward(c, original)

            def forward(*args: Any, **kwargs: Any) -> Any:
                return _copy(inner(*args, **kwargs))

            return forward

        return super().hook_component(comp, copying)


def _copy(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copy(o) for o in out)
    return out


class _Run:
    """One sampling run's steps and branches, from ComfyUI's wrappers, set on a step tracker."""

    def __init__(self, tracker: StepTracker, num_steps: int | None = None) -> None:
        self.tracker = tracker
        self.num_steps = num_steps
        self.step = -1
        self.branches: dict[tuple[Any, ...], int] = {}  # (conds, n-th call with them) -> branch
        self.calls: dict[tuple[Any, ...], int] = {}  # this evaluation: calls per set of conds
        self.most_branches = 0
        self.on_overflow: Callable[[], None] | None = None
        self.overflowed = False
        self.told = False  # PREDICT_NOISE marks the evaluations (else: a cond seen again starts one)

    def evaluation(self) -> None:
        """The sampler evaluates the model once more (PREDICT_NOISE): the next step."""
        self.told = True
        self._next()

    def _next(self) -> None:
        self.step += 1
        self.calls.clear()

    def place(self, options: Mapping[str, Any]) -> None:
        """A diffusion-model call (APPLY_MODEL) with ``transformer_options``: set its step and branch."""
        if self.overflowed:
            return
        uuids = options.get("uuids") or options.get("cond_or_uncond") or ()
        conds = tuple(str(u) for u in uuids)
        if self.step < 0 or (not self.told and conds in self.calls):
            # a guider that does not go through PREDICT_NOISE: the same conds again are the next step
            self._next()
        n = self.calls.get(conds, 0)
        self.calls[conds] = n + 1
        branch = self.branches.setdefault((conds, n), len(self.branches))
        self.most_branches = max(self.most_branches, sum(self.calls.values()))
        if self.num_steps is not None and self.step >= self.num_steps:
            self.overflowed = True
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self.tracker.set_step(self.step, branch)


class StepCachePatch:
    """The state of one StepCache node's patch: its settings, the calibrations and schedules it has
    made or read, and the run in progress. Every patched MODEL has its own: two models (or one model
    patched twice) share nothing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calibrations: dict[str, Calibration] = {}  # by key digest
        self.schedules: dict[str, Schedule] = {}
        self.last: RunReport | None = None
        self._run: _Run | None = None

    # ------------------------------------------------------------------ the wrappers
    def outer_sample(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        if self._run is not None:  # a sampling inside this one's: it runs as it would
            return executor(*args, **kwargs)
        guider = executor.class_obj
        patcher = guider.model_patcher
        if patcher.model_options.get("torch_compile_kwargs") is not None:
            raise StepCacheError(
                "StepCache does not run under ComfyUI's TorchCompileModel yet (the whole diffusion model "
                "compiled around the cache's per-step choice fails to trace): use one of the two nodes."
            )
        model = patcher.get_model_object("diffusion_model")
        family = family_of(unwrap(model))
        discovery = discovery_args(family, unwrap(model), self.settings.cache)
        try:
            discover(model, **discovery)
        except DiscoveryError as e:  # a model stepcache cannot read: it samples as it would without the node
            logger.warning("stepcache: %s; sampling without the cache", e)
            self.last = RunReport("uncached", None, 0, 0)
            return executor(*args, **kwargs)
        installer = ComfyInstaller(copy_outputs=family.in_place)
        sigmas = _arg(args, kwargs, 3, "sigmas")
        s = self.settings
        if s.mode == "schedule":
            assert s.schedule is not None
            schedule = _fit(s.schedule, len(sigmas) - 1)
            return self._cached(executor, args, kwargs, model, schedule, discovery, installer, None, None)
        key = run_key(
            patcher,
            unwrap(model),
            family=family.name,
            guider=guider,
            sampler=_arg(args, kwargs, 2, "sampler"),
            sigmas=sigmas,
            latent_shape=_arg(args, kwargs, 0, "noise").shape,
            discovery=discovery,
        )
        found = None if s.mode == "calibrate" else self._calibration(key)
        if found is None:
            return self._calibrate(executor, args, kwargs, model, patcher, key, discovery, installer)
        cal, file = found
        schedule = self._schedule(key, cal)
        return self._cached(executor, args, kwargs, model, schedule, discovery, installer, key, (cal, file))

    def predict_noise(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        run = self._run
        if run is not None:
            run.evaluation()
        return executor(*args, **kwargs)

    def apply_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        run = self._run
        if run is not None:
            options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None)
            run.place(options if isinstance(options, Mapping) else {})
        return executor(*args, **kwargs)

    # ------------------------------------------------------------------ one run
    def _calibrate(
        self,
        executor: Any,
        args: tuple,
        kwargs: dict,
        model: Any,
        patcher: Any,
        key: RunKey,
        discovery: dict[str, Any],
        installer: ComfyInstaller,
    ) -> Any:
        tracker = StepTracker()
        run = _Run(tracker)
        out: list[Any] = []
        sizes: dict[str, int] = {}

        def generation() -> None:
            out.append(executor(*args, **kwargs))

        def measured() -> None:  # the bytes of each output too, for memory budgets
            sizes.update(output_bytes(model, generation, **discovery))

        self._run = run
        try:
            cal = calibrate(
                model,
                run=measured,
                tracker=tracker,
                installer=installer,
                lookahead=self.settings.lookahead or min(DEFAULT_LOOKAHEAD, max(1, key.info["steps"] - 1)),
                progress=False,
                meta={"comfyui": key.info},
                **discovery,
            )
        except StepCacheError as e:
            if not out:
                raise
            logger.warning("stepcache: this run left no calibration (%s); it ran uncached", e)
            self.last = RunReport("uncalibrated", key, run.step + 1, run.most_branches)
            return out[0]
        finally:
            self._run = None
        meta = dict(cal.meta)
        meta.update(
            output_bytes=sizes,
            compute_dtype=str(_compute_dtype(patcher)).replace("torch.", ""),
            branches=max(run.most_branches, 1),
        )
        cal = cal.replace(meta=meta)
        earlier = self._calibration(key) if self.settings.mode == "calibrate" else None
        if earlier is not None:  # another run like an earlier one: one more sample of the same curves
            try:
                cal = Calibration.merge([earlier[0], cal])
            except CalibrationError as e:
                logger.info("stepcache: the earlier calibration of this key is replaced (%s)", e)
        self.calibrations[key.digest] = cal
        file = None
        try:
            path = store.target(key.filename, self.settings.folder)
            cal.save(path)
            file = str(path)
        except OSError as e:
            logger.warning("stepcache: cannot save the calibration (%s); it is kept for this session only", e)
        logger.info(
            "stepcache: calibrated %s (%d evaluations, %d components, %d sample(s))%s",
            key.info["model_class"],
            cal.num_steps,
            len(cal.components),
            cal.num_samples,
            f" -> {file}" if file else "",
        )
        self.last = RunReport("calibrated", key, run.step + 1, run.most_branches, calibration=cal, file=file)
        return out[0]

    def _cached(
        self,
        executor: Any,
        args: tuple,
        kwargs: dict,
        model: Any,
        schedule: Schedule,
        discovery: dict[str, Any],
        installer: ComfyInstaller,
        key: RunKey | None,
        used: tuple[Calibration, str | None] | None,
    ) -> Any:
        config = CacheConfig(
            blocks=discovery["blocks"], types=discovery["types"], storage_dtype=self.settings.storage_dtype
        )
        handle = CacheHandle(model, schedule, config, installer=installer)
        run = _Run(handle.tracker, num_steps=schedule.num_steps)

        def overflow() -> None:
            logger.warning(
                "stepcache: this run made more model evaluations than the schedule's %d steps; "
                "the rest ran uncached",
                schedule.num_steps,
            )
            handle.close()

        run.on_overflow = overflow
        self._run = run
        try:
            with handle:
                out = executor(*args, **kwargs)
        finally:
            self._run = None
        stats = handle.stats
        logger.info("stepcache: %s", stats)
        cal, file = used if used is not None else (None, None)
        self.last = RunReport(
            "cached",
            key,
            run.step + 1,
            run.most_branches,
            stats=stats,
            schedule=schedule,
            calibration=cal,
            file=file,
            overflowed=run.overflowed,
        )
        return out

    # ------------------------------------------------------------------ calibrations and schedules
    def _calibration(self, key: RunKey) -> tuple[Calibration, str | None] | None:
        if key.digest in self.calibrations:
            return self.calibrations[key.digest], None
        path = store.find(key.filename, self.settings.folder)
        if path is None:
            return None
        try:
            cal = Calibration.load(path)
        except (StepCacheError, OSError, ValueError) as e:
            logger.warning("stepcache: cannot read %s (%s): calibrating again", path, e)
            return None
        self.calibrations[key.digest] = cal
        return cal, str(path)

    def _schedule(self, key: RunKey, cal: Calibration) -> Schedule:
        if key.digest in self.schedules:
            return self.schedules[key.digest]
        s = self.settings
        sizes = None
        if s.memory_budget is not None:
            raw = {k: int(v) for k, v in (cal.meta.get("output_bytes") or {}).items()}
            dtype = getattr(torch, str(cal.meta.get("compute_dtype")), None)
            sizes = stored_sizes(raw, dtype, s.storage_dtype) if s.storage_dtype and dtype else raw
        schedule = optimal_schedule(
            cal,
            s.compute_fraction,
            granularity=s.granularity,
            memory_budget=s.memory_budget,
            sizes=sizes,
            branches=int(cal.meta.get("branches") or 1),
        )
        meta = {k: v for k, v in schedule.meta.items() if k not in _WEIGHTS_META}
        schedule = dataclasses.replace(schedule, meta=meta)
        self.schedules[key.digest] = schedule
        return schedule


def _fit(schedule: Schedule, steps: int) -> Schedule:
    """A schedule file for a run of ``steps`` sampling steps (resampled when it has another count)."""
    if steps < 1 or schedule.num_steps == steps:
        return schedule
    logger.info("stepcache: resampling the schedule from %d to %d steps", schedule.num_steps, steps)
    return schedule.resample(steps)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else args[index]


def _compute_dtype(patcher: Any) -> Any:
    cast = getattr(getattr(patcher, "model", None), "manual_cast_dtype", None)
    if cast is not None:
        return cast
    try:
        return patcher.model_dtype()
    except Exception:
        return None


def apply(model: Any, settings: Settings) -> Any:
    """A clone of ``model`` (a ComfyUI ``ModelPatcher``) that samples with stepcache as ``settings``
    say. ``model`` itself is left as it was. A model patched again is patched anew: the last patch
    replaces the earlier one (one cache per model)."""
    from comfy.patcher_extension import WrappersMP

    patched = model.clone()
    kinds = (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE, WrappersMP.APPLY_MODEL)
    for kind in kinds:
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
    patch = StepCachePatch(settings)
    wrappers = (patch.outer_sample, patch.predict_noise, patch.apply_model)
    for kind, wrapper in zip(kinds, wrappers, strict=True):
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return patched


def patch_of(model: Any) -> StepCachePatch | None:
    """The :class:`StepCachePatch` a patched model samples with (its ``.last`` run report), or None."""
    from comfy.patcher_extension import WrappersMP

    found = model.get_wrappers(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    owner = getattr(found[-1], "__self__", None) if found else None
    return owner if isinstance(owner, StepCachePatch) else None
