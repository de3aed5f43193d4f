"""Hook machinery shared by calibration and the runtime cache.

* :class:`StepTracker` turns the stream of denoiser calls into (generation, step, branch)
  coordinates, read from the timestep the denoiser receives. A *step* is one denoiser evaluation at
  one timestep; further calls at the same timestep are further *branches* (split classifier-free
  guidance: cond and uncond as two calls); a timestep that goes up starts a new generation. So the
  schedule is indexed by denoising step, never by forward call, and every generation starts afresh.
* :class:`Session` installs one forward pre-hook and one forward hook on the denoiser and replaces
  the ``forward`` of each component *instance* (the class is never touched). ``close()`` puts back
  exactly what was there, so the model leaves with no hooks and no attributes of ours.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .discovery import Component, denoisers_of
from .errors import ScheduleLengthError, StepCacheError

logger = logging.getLogger("stepcache")

_MISSING = object()
_TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time", "noise_level")

# Denoisers that currently have a stepcache session: enabling twice is an error, never a leak.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()


def fingerprint(target: object) -> str:
    """A short hash of the architecture of every denoiser of ``target`` (module or pipeline)."""
    models = denoisers_of(target)
    if len(models) == 1:
        return _fingerprint_one(models[0][1])
    joined = "|".join(prefix + _fingerprint_one(m) for prefix, m in models)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def model_class(target: object) -> str:
    """Class name(s) of the denoiser(s), for metadata and messages."""
    return "+".join(type(m).__name__ for _, m in denoisers_of(target))


def _fingerprint_one(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "items"):
        public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        text = type(model).__name__ + json.dumps(public, sort_keys=True, default=str)
    else:
        text = type(model).__name__ + repr([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _timestep_slot(module: nn.Module, timestep_arg: str | None) -> tuple[str, int | None] | None:
    """Where the timestep arrives in ``module.forward``: (keyword name, positional index or None)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = (timestep_arg,) if timestep_arg else _TIMESTEP_NAMES
    for name in names:
        for i, p in enumerate(params):
            if p.name == name:
                positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                return name, (i if positional else None)
    if timestep_arg:
        raise StepCacheError(
            f"timestep_arg={timestep_arg!r}: {type(module).__name__}.forward has no such parameter "
            f"(it takes {[p.name for p in params]})."
        )
    return None


def _to_float(value: Any) -> float | None:
    """The step's noise level. The maximum, not the first element: Wan 2.2 TI2V passes per-token
    timesteps that are 0 on the conditioning frame's tokens and t elsewhere."""
    if isinstance(value, torch.Tensor):
        return None if value.numel() == 0 else float(value.max())
    if isinstance(value, (int, float)):
        return float(value)
    return None


class StepTracker:
    """Which denoising step and guidance branch the current denoiser call belongs to.

    ``num_steps`` (when known) lets the tracker tell a longer run from a new generation and raise a
    clear error. ``manual`` mode ignores timesteps: the caller sets steps through :meth:`set_step`
    (for models that receive no timestep, or are called through a path the hooks cannot see).
    """

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps
        self.step = -1
        self.branch = 0
        self.generation = -1
        self.manual = False
        self._t: float | None = None
        self._in_call = False
        # Listeners: a step began; a generation is about to begin; state was dropped after a failure.
        self.on_step: list[Callable[[int], None]] = []
        self.on_generation: list[Callable[[], None]] = []
        self.on_reset: list[Callable[[], None]] = []
        self.on_call_end: list[Callable[[], None]] = []

    # -- automatic mode -------------------------------------------------------------------------
    def begin_call(self, t: float | None) -> None:
        if self._in_call:
            logger.debug("previous denoiser call raised; starting the next generation afresh")
            self.reset()
        if self.manual:
            self._in_call = True
            return
        if t is None:
            raise StepCacheError(
                "stepcache could not read a timestep from this denoiser call. Pass timestep_arg='<name>' "
                "to cache()/calibrate(), or drive steps yourself with handle.set_step(i)."
            )
        if self.step >= 0 and t == self._t:
            self.branch += 1
        elif self.step < 0 or self._t is None or t > self._t:
            self._new_generation()
        elif self.num_steps is not None and self.step + 1 >= self.num_steps:
            raise ScheduleLengthError(
                f"the schedule has {self.num_steps} steps but this generation made more denoising steps "
                f"(timestep {t:g} after step {self.step + 1}). Use a schedule for this step count, or "
                "schedule.resample(n) for the run's step count."
            )
        else:
            self._advance(self.step + 1)
        self._t = t
        self._in_call = True

    def end_call(self) -> None:
        self._in_call = False
        for fn in self.on_call_end:
            fn()

    # -- manual mode ----------------------------------------------------------------------------
    def set_step(self, step: int, branch: int = 0) -> None:
        self.manual = True
        if self.num_steps is not None and not 0 <= step < self.num_steps:
            raise ScheduleLengthError(
                f"set_step({step}): the schedule has {self.num_steps} steps (0..{self.num_steps - 1})."
            )
        if step == 0 and branch == 0 and (self.step != 0 or self.branch != 0):
            self._new_generation()
        elif step != self.step:
            self._advance(step)
        self.branch = branch

    # -- shared ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation: the next call starts a new one."""
        self.step, self.branch, self._t, self._in_call = -1, 0, None, False
        for fn in self.on_reset:
            fn()

    def _new_generation(self) -> None:
        if self.step >= 0 and self.num_steps is not None and self.step + 1 < self.num_steps:
            logger.warning(
                "a generation ended after %d of the schedule's %d steps (interrupted, or a run with "
                "fewer steps than the schedule?)",
                self.step + 1,
                self.num_steps,
            )
        self.generation += 1
        for fn in self.on_generation:
            fn()
        self.branch = 0
        self._advance(0)

    def _advance(self, step: int) -> None:
        self.step, self.branch = step, 0
        for fn in self.on_step:
            fn(step)


Interceptor = Callable[[Component, Callable[..., Any]], Callable[..., Any]]


class Session:
    """Hooks on the denoiser(s): step tracking on each, an interceptor on each component.

    Several denoisers (Wan 2.2's two experts) share one tracker: the step count runs on across the
    switch from one to the other.

    ``make_forward(component, original_forward)`` returns the callable installed as the component
    instance's ``forward``. Everything is validated before anything is installed, and a failure
    half-way rolls back, so the model is never left half-changed.
    """

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        components: Sequence[Component],
        make_forward: Interceptor,
        tracker: StepTracker,
        *,
        timestep_arg: str | None = None,
    ) -> None:
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        self.components = list(components)
        self.tracker = tracker
        self._make_forward = make_forward
        self._slots = {id(m): _timestep_slot(m, timestep_arg) for m in self.models}
        self.owner: Any = None  # the CacheHandle (or other object) that manages this session
        self._handles: list[Any] = []
        self._saved: list[tuple[nn.Module, Any]] = []
        self.open = False
        modules = [c.module for c in self.components]
        if len({id(m) for m in modules}) != len(modules):
            raise StepCacheError("the same module appears twice among the components; pass each once.")

    def __enter__(self) -> Session:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        for model in self.models:
            if model in _ACTIVE:
                raise StepCacheError(
                    f"{type(model).__name__} already has an active stepcache session; "
                    "disable it (or leave its `with` block) before enabling another."
                )
        try:
            for model in self.models:
                self._handles.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._handles.append(model.register_forward_hook(self._post))
            for comp in self.components:
                mod = comp.module
                self._saved.append((mod, mod.__dict__.get("forward", _MISSING)))
                mod.forward = self._make_forward(comp, mod.forward)
        except BaseException:
            self.remove()
            raise
        for model in self.models:
            _ACTIVE[model] = self
        self.open = True

    def remove(self) -> None:
        for mod, saved in reversed(self._saved):
            if saved is _MISSING:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = saved
        self._saved.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for model in self.models:
            if _ACTIVE.get(model) is self:
                del _ACTIVE[model]
        self.open = False

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.tracker.manual:
            self.tracker.begin_call(None)
            return
        t = None
        slot = self._slots.get(id(module))
        if slot is not None:
            name, index = slot
            if name in kwargs:
                t = _to_float(kwargs[name])
            elif index is not None and index < len(args):
                t = _to_float(args[index])
        self.tracker.begin_call(t)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.tracker.end_call()


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float | None]:
    """Run ``fn`` once under torch's FLOP counter; return (output, multiply-accumulates)."""
    if torch.compiler.is_compiling():
        return fn(*args, **kwargs), None
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args, **kwargs)
    return out, counter.get_total_flops() / 2.0


def first_tensor_shape(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """Shape of the first tensor argument: a cheap check that a stored output still fits."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return tuple(a.shape)
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return tuple(a.shape)
    return None


def final_samples(out: Any, error: type[StepCacheError] = StepCacheError) -> torch.Tensor:
    """The final samples a replay callable returned (a tensor, or a pipeline output holding one)."""
    for attr in ("images", "sample", "frames", "audios"):
        out = getattr(out, attr, out)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise error(
            "`run` must return the final samples as a tensor (e.g. a pipeline called with "
            f"output_type='pt'), got {type(out).__name__}."
        )
    return out.detach().float()
