"""Caching without a schedule: the cache calibrates itself, remembers, and finds shared schedules.

``stepcache.cache(pipe, compute_fraction=0.5)`` and ``apply_smoothcache(pipe.transformer,
SmoothCacheConfig(compute_fraction=0.5))`` open a :class:`~stepcache.runtime.handle.CacheHandle` with
an :class:`AutoPlanner`. When a generation starts (the first denoiser call after the pipeline set up
its scheduler, before any component runs) the planner reads the generation's **key**:

* the model: its fingerprint, weights digest, adapters and dtype, and the components cached;
* the scheduler's class and config, and the step count it is set up for;
* the guidance scale, bucketed to 0.5 (what the pipeline's ``__call__`` was given);
* the latent shape (channels, frames, height, width: the denoiser's input without its batch).

Then, in this order: a ``stepcache_schedule.json`` for this step count, or a
``stepcache_calibration.json`` recorded for this key, in the pipeline's own folder or Hub repository;
a calibration stored for this key in ``$STEPCACHE_HOME`` (:mod:`stepcache.store`). With one, the
generation is cached from its first step with :func:`stepcache.policies.open_loop_schedule`. With none,
the generation runs **exactly uncached** while it is recorded (``calibration_runs`` of them); the
calibration is stored when the last one ends, and caching starts with the next generation. A key
never matches a calibration recorded for another one: a changed step count, guidance scale, latent
shape, scheduler or set of weights is calibrated anew (a neighbour is never resampled, since the
error curves move with each of them). One ``INFO`` line of the ``stepcache.auto`` logger says what
happened whenever it changes (``stepcache.set_verbosity("info")`` shows it).

A plain denoising loop (a module with no pipeline calling it) tells no step count before its first
step: the first generation for a latent shape is run uncached and recorded, and later ones are
expected to make as many steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._io import CALIBRATION_FILE, SCHEDULE_FILE
from .calibration import DEFAULT_LOOKAHEAD, Calibration
from .calibration.recorder import Recorder, recorded_calibration
from .discovery import Component, unwrap
from .errors import StepCacheError, StepCacheWarning, StoreError
from .policies import open_loop_schedule
from .runtime.config import DEFAULT_COMPUTE_FRACTION, CacheConfig
from .runtime.generation import GenerationPlanner, GenerationStart, compute_all
from .runtime.handle import CacheHandle
from .runtime.introspect import fingerprint, model_class, weights_state
from .runtime.steps import calling_frame, drives, pipeline_steps
from .schedule import Schedule
from .store import Store, describe, key_id

__all__ = ["AutoPlanner", "generation_key"]

logger = logging.getLogger(__name__)

# Keyword names under which a denoiser receives its latents, first match wins (else the first tensor).
_LATENT_NAMES = ("hidden_states", "sample", "x", "latents", "latent_model_input", "img")
_GUIDANCE_BUCKET = 0.5
_FRAME_DEPTH = 64  # how far up the stack the pipeline call that drives a generation is looked for


def bucket_guidance(value: Any) -> float | None:
    """The guidance scale as the key holds it: rounded to the nearest 0.5 (None: none given)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        value = float(value.detach().float().max())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return round(float(value) / _GUIDANCE_BUCKET) * _GUIDANCE_BUCKET


def _latents(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for name in _LATENT_NAMES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def generation_key(
    identity: Mapping[str, Any],
    pipeline: Any,
    call: Mapping[str, Any],
    start: GenerationStart,
    steps: int | None,
) -> dict[str, Any]:
    """The key of a generation (see the module's docstring): ``identity`` (the model's part),
    ``pipeline`` (its scheduler), ``call`` (the locals of the pipeline's ``__call__``), ``start`` (the
    first denoiser call) and ``steps``."""
    scheduler = getattr(pipeline, "scheduler", None) if pipeline is not None else None
    config = getattr(scheduler, "config", None)
    scheduler_config = None
    if config is not None and hasattr(config, "items"):
        public = {str(k): v for k, v in dict(config).items() if not str(k).startswith("_")}
        text = json.dumps(public, sort_keys=True, default=str)
        scheduler_config = hashlib.sha256(text.encode()).hexdigest()[:16]
    guidance = call.get("guidance_scale")
    if guidance is None and pipeline is not None:
        guidance = getattr(pipeline, "_guidance_scale", None)
        if guidance is None:
            guidance = getattr(pipeline, "guidance_scale", None)
    if guidance is None:
        guidance = start.kwargs.get("guidance")  # guidance-distilled denoisers (Flux) take it
    latents = _latents(start.args, start.kwargs)
    return {
        **identity,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "scheduler_config": scheduler_config,
        "steps": steps,
        "guidance": bucket_guidance(guidance),
        "latent_shape": list(latents.shape[1:]) if latents is not None else None,
    }


class _Recording:
    """The generations being recorded for one key."""

    def __init__(self, key: dict[str, Any], recorder: Recorder, forwards: dict[str, Callable[..., Any]]):
        self.key = key  # "steps" is None until a plain loop's first generation ends
        self.recorder = recorder
        self.forwards = forwards
        self.seconds = 0.0
        self.started: float | None = None

    @property
    def done(self) -> int:
        return len(self.recorder.generations)


class AutoPlanner(GenerationPlanner):
    """Chooses each generation's schedule from a calibration found or stored for its key, or records
    one (see the module's docstring).

    Args:
        compute_fraction: share of component calls to execute (default 0.5).
        calibration_runs: generations to record before caching (default 1).
        store: where calibrations are kept (default: ``$STEPCACHE_HOME``).
        sources: folders or Hub repository ids to look in first for ``stepcache_schedule.json`` or
            ``stepcache_calibration.json`` (default: the pipeline's and the transformer's own).
    """

    def __init__(
        self,
        compute_fraction: float | None = None,
        calibration_runs: int | None = None,
        *,
        store: Store | None = None,
        sources: list[str] | None = None,
    ) -> None:
        self.fraction = DEFAULT_COMPUTE_FRACTION if compute_fraction is None else float(compute_fraction)
        self.runs = 1 if calibration_runs is None else int(calibration_runs)
        self.store = store if store is not None else Store()
        self._sources = sources
        self._shipped: list[tuple[str, Schedule | Calibration]] = []
        self._schedules: dict[str, tuple[Schedule, str]] = {}  # key id -> (schedule, where from)
        self._computing: dict[int, Schedule] = {}  # step count -> every component computing
        self._expected: dict[str, int] = {}  # plain loops: key id without steps -> steps seen
        self._refused: dict[str, str] = {}  # key id -> why it cannot be calibrated here
        self._originals: dict[str, tuple[Component, Callable[..., Any]]] = {}
        self._recording: _Recording | None = None
        self._active: dict[str, Callable[..., Any]] | None = None  # recording forwards, this generation
        self._branches = 1
        self._said: tuple[str, str] | None = None
        self._identity: tuple[tuple, dict[str, Any]] | None = None
        self.handle: CacheHandle | None = None
        self.last: dict[str, Any] = {}  # the last generation: {"key", "id", "action", "source"}

    @classmethod
    def from_config(cls, config: CacheConfig) -> AutoPlanner:
        return cls(config.compute_fraction, config.calibration_runs)

    # ---------------------------------------------------------------- GenerationPlanner
    def bind(self, handle: CacheHandle) -> None:
        self.handle = handle
        handle.tracker.on_call_end.append(self._call_end)
        handle.tracker.on_reset.append(self._interrupted)
        self._shipped = self._find_shipped(handle)

    def wrap(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        name = comp.name
        self._originals[name] = (comp, original)

        def forward(*args: Any, **kwargs: Any) -> Any:
            active = self._active
            if active is not None and not torch.compiler.is_compiling():  # records eager calls only
                return active[name](*args, **kwargs)
            return original(*args, **kwargs)

        return forward

    def plan(self, start: GenerationStart) -> Schedule | None:
        if self._active is not None:  # the previous generation was recorded to its end
            self._finish_generation()
        self._branches = 1
        key, steps = self._key(start)
        kid = key_id(key)
        schedule, source = self._schedules.get(kid) or (None, "")
        if schedule is None and steps is not None:
            schedule, source = self._find(key, kid, steps)
            if schedule is not None:
                self._schedules[kid] = (schedule, source)
        if schedule is not None:
            self._say(
                kid,
                "cache",
                f"caching {describe(key)} ({kid}) at compute fraction {schedule.compute_fraction:.3f} "
                f"with {source}",
            )
            self.last = {"key": key, "id": kid, "action": "cache", "source": source}
            return schedule
        if kid in self._refused:
            self.last = {"key": key, "id": kid, "action": "uncached", "source": self._refused[kid]}
            return self._everything(steps)
        self._record(key, kid, steps)
        return self._everything(steps)

    def close(self) -> None:
        tracker = self.handle.tracker if self.handle is not None else None
        if self._active is not None and tracker is not None:
            whole = tracker.num_steps is None or tracker.step + 1 == tracker.num_steps
            if whole:
                self._finish_generation()
            else:
                self._recording.recorder.drop_generation()  # type: ignore[union-attr]
                self._active = None

    # ---------------------------------------------------------------- the key
    def _model_identity(self) -> dict[str, Any]:
        """The model's part of the key; the weights digest is recomputed only when a parameter changed
        (replaced, written in place, or moved)."""
        assert self.handle is not None
        handle = self.handle
        models = [unwrap(m) for m in handle.models]
        params = [p for m in models for p in m.parameters()]
        adapters = sorted({str(k) for m in models for k in (getattr(m, "peft_config", None) or {})})
        signature = (tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in params), tuple(adapters))
        if self._identity is None or self._identity[0] != signature:
            target = handle.models[0] if len(handle.models) == 1 else handle.pipeline
            names = json.dumps(sorted((c.name, c.type) for c in handle.components))
            self._identity = (
                signature,
                {
                    "model_class": model_class(target),
                    "fingerprint": fingerprint(target),
                    **weights_state(target),
                    "components": hashlib.sha256(names.encode()).hexdigest()[:16],
                },
            )
        return self._identity[1]

    def _key(self, start: GenerationStart) -> tuple[dict[str, Any], int | None]:
        pipeline, steps = start.pipeline, start.steps
        # The pipeline's __call__ holds what the generation was asked for (guidance_scale) and, for a
        # cache on its transformer alone, the pipeline itself (whose scheduler knows the step count).
        matches = (
            (lambda owner: owner is pipeline)
            if pipeline is not None
            else (lambda owner: drives(owner, [start.module]))
        )
        found = calling_frame(matches, method="__call__", depth=_FRAME_DEPTH)
        call: dict[str, Any] = found[1] if found is not None else {}
        if pipeline is None and found is not None:
            pipeline = found[0]
            steps = pipeline_steps(pipeline)
        key = generation_key(self._model_identity(), pipeline, call, start, steps)
        if steps is None:  # a plain loop: as many steps as its last generation of this kind made
            steps = self._expected.get(key_id(key))
            key["steps"] = steps
        return key, steps

    # ---------------------------------------------------------------- finding a schedule
    def _find(self, key: dict[str, Any], kid: str, steps: int) -> tuple[Schedule | None, str]:
        for where, value in self._shipped:
            schedule = self._shipped_schedule(where, value, key, kid, steps)
            if schedule is not None:
                return (
                    schedule,
                    f"the {'schedule' if isinstance(value, Schedule) else 'calibration'} in {where}",
                )
        calibration = self.store.get(key)
        if calibration is None:
            return None, ""
        where = f"the stored calibration {self.store.path(key)}"
        schedule = self._schedule_of(calibration, where)
        return (schedule, where) if schedule is not None else (None, "")

    def _schedule_of(self, calibration: Calibration, what: str) -> Schedule | None:
        """The open-loop schedule of ``calibration`` (None, with a warning, when it gives none)."""
        try:
            return open_loop_schedule(calibration, self.fraction)
        except StepCacheError as e:
            warnings.warn(
                f"{what} gives no schedule ({e}); calibrating anew.", StepCacheWarning, stacklevel=3
            )
            return None

    def _shipped_schedule(
        self, where: str, value: Schedule | Calibration, key: dict[str, Any], kid: str, steps: int
    ) -> Schedule | None:
        """A schedule or calibration shipped with the model, when it fits this generation: a schedule
        made for this step count (on this model, when it says), a calibration recorded for this key
        (or, when it records no key, on this model at this step count)."""
        if value.num_steps != steps:
            return None
        made_on = value.meta.get("fingerprint")
        if made_on is not None and made_on != key.get("fingerprint"):
            return None
        if isinstance(value, Schedule):
            try:
                assert self.handle is not None
                value.resolve(self.handle.components)
            except StepCacheError:
                return None
            return value
        store_info = value.meta.get("store")
        recorded = store_info.get("key") if isinstance(store_info, Mapping) else None
        if isinstance(recorded, Mapping) and key_id(recorded) != kid:
            return None
        return self._schedule_of(value, f"the calibration in {where}")

    def _find_shipped(self, handle: CacheHandle) -> list[tuple[str, Schedule | Calibration]]:
        """Schedules and calibrations in the model's own folder or repository."""
        places = self._sources
        if places is None:
            places = []
            for owner in (handle.pipeline, *handle.models):
                config = getattr(unwrap(owner), "config", None) if owner is not None else None
                name = getattr(owner, "name_or_path", None) or getattr(config, "_name_or_path", None)
                if isinstance(name, str) and name and name not in places:
                    places.append(name)
        found: list[tuple[str, Schedule | Calibration]] = []
        for place in places:
            for kind, filename in ((Schedule, SCHEDULE_FILE), (Calibration, CALIBRATION_FILE)):
                folder = Path(place).expanduser()
                if folder.is_dir() and not (folder / filename).is_file():
                    continue
                try:
                    found.append((place, kind.from_pretrained(place, filename)))
                except StepCacheError as e:
                    logger.debug("no %s in %s: %s", filename, place, e)
        return found

    # ---------------------------------------------------------------- recording
    def _everything(self, steps: int | None) -> Schedule | None:
        if steps is None:
            return None
        assert self.handle is not None
        if steps not in self._computing:
            self._computing[steps] = compute_all(self.handle.components, steps)
        return self._computing[steps]

    def _record(self, key: dict[str, Any], kid: str, steps: int | None) -> None:
        rec = self._recording
        if rec is not None and key_id(rec.key) != kid:
            logger.info(
                "the key changed (%s): dropping the %d generation(s) recorded for %s",
                describe(key),
                rec.done,
                describe(rec.key),
            )
            rec = None
        if rec is None:
            lookahead = max(DEFAULT_LOOKAHEAD, math.ceil(1 / self.fraction))
            if steps is not None:
                lookahead = max(1, min(lookahead, steps - 1))
            assert self.handle is not None
            comps = [comp for comp, _ in self._originals.values()]
            recorder = Recorder(comps, lookahead, self.handle.tracker, forecast=True)
            forwards = {
                name: recorder.intercept(comp, original) for name, (comp, original) in self._originals.items()
            }
            rec = self._recording = _Recording(key, recorder, forwards)
        self._active = rec.forwards
        rec.started = time.perf_counter()
        left = self.runs - rec.done
        self._say(
            kid,
            "calibrate",
            f"no calibration for {describe(key)} ({kid}): calibrating on this generation"
            + (f" ({left} more to go)" if left > 1 else "")
            + "; caching from the next",
        )
        self.last = {"key": key, "id": kid, "action": "calibrate", "source": None}

    def _call_end(self) -> None:
        if self._active is None or self.handle is None:
            return
        tracker = self.handle.tracker
        if tracker.step == 0:
            self._branches = max(self._branches, tracker.branch + 1)
        last = tracker.num_steps is not None and tracker.step + 1 == tracker.num_steps
        if last and tracker.branch + 1 >= self._branches:  # the last call of the last step
            self._finish_generation()

    def _interrupted(self) -> None:
        if self._active is not None and self._recording is not None:
            self._recording.recorder.drop_generation()
            self._active = None

    def _finish_generation(self) -> None:
        rec = self._recording
        self._active = None
        if rec is None:
            return
        if rec.started is not None:
            rec.seconds += time.perf_counter() - rec.started
            rec.started = None
        if self.handle is not None and self.handle.tracker.compiled:
            self._recording = None
            self._refuse(
                rec.key,
                "the transformer is compiled, and a calibration is recorded on eager calls only: run the "
                "first generation of each kind before compiling (its stored calibration then serves the "
                "compiled model too), or record one with stepcache.calibrate.",
            )
            return
        rec.recorder.finish_generation()
        if rec.done >= self.runs:
            self._recording = None
            self._complete(rec)

    def _complete(self, rec: _Recording) -> None:
        assert self.handle is not None
        handle = self.handle
        key = dict(rec.key)
        comps = [comp for comp, _ in self._originals.values()]
        target = handle.pipeline if handle.pipeline is not None else handle.model
        try:
            calibration = recorded_calibration(
                rec.recorder,
                target,
                comps,
                rec.seconds,
                scheduler=key.get("scheduler"),
                meta={"compute_fraction": self.fraction, "auto": True},
            )
        except StepCacheError as e:
            self._refuse(key, str(e))
            return
        if key.get("steps") is None:  # a plain loop: now its step count is known
            self._expected[key_id(key)] = calibration.num_steps
            key["steps"] = calibration.num_steps
        kid = key_id(key)
        where = "this process only"
        try:
            calibration = self.store.put(key, calibration)
            where = str(self.store.path(key))
        except StoreError as e:
            warnings.warn(
                f"{e} The calibration serves this process only; the next one calibrates again.",
                StepCacheWarning,
                stacklevel=2,
            )
        try:
            schedule = open_loop_schedule(calibration, self.fraction)
        except StepCacheError as e:
            self._refuse(key, f"its calibration gives no schedule ({e})")
            return
        self._schedules[kid] = (schedule, f"the calibration recorded in this process ({where})")
        logger.info("calibrated %s (%s) in %.1f s, stored in %s", describe(key), kid, rec.seconds, where)

    def _refuse(self, key: dict[str, Any], why: str) -> None:
        """Generations of this key run uncached from now on in this process, and a warning says why."""
        self._refused[key_id(key)] = why
        warnings.warn(
            f"stepcache cannot calibrate {describe(key)}: {why} Generations of this kind run uncached.",
            StepCacheWarning,
            stacklevel=3,
        )

    def _say(self, kid: str, action: str, message: str) -> None:
        """One INFO line whenever what happens to generations changes (debug otherwise)."""
        if self._said != (kid, action):
            self._said = (kid, action)
            logger.info(message)
        else:
            logger.debug(message)


def auto_handle(target: Any, config: CacheConfig, installer: Any = None) -> CacheHandle:
    """A :class:`~stepcache.runtime.handle.CacheHandle` on ``target`` whose schedules an
    :class:`AutoPlanner` chooses (not yet open)."""
    return CacheHandle(target, AutoPlanner.from_config(config), config, installer=installer)
