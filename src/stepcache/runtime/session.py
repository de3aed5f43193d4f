"""Installing and removing stepcache's interception on a model, exactly.

:class:`Session` installs one forward pre-hook and one forward hook on each denoiser (they drive a
:class:`~stepcache.runtime.steps.StepTracker`) and replaces the ``forward`` of each component
*instance* (the class is never touched). ``remove()`` puts back exactly what was there, so the model
leaves with no hooks and no attributes of ours.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..discovery import Component
from ..errors import StepCacheError
from .steps import StepTracker, read_timestep, timestep_slot

__all__ = ["Interceptor", "Session", "active_session", "track_steps"]

_MISSING = object()

# Denoisers that currently have a stepcache session: enabling twice is an error, never a leak.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()


def active_session(model: nn.Module) -> Session | None:
    """The session currently installed on ``model``, if any."""
    return _ACTIVE.get(model)


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
        exclusive: bool = True,
    ) -> None:
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        self.components = list(components)
        self.tracker = tracker
        self._make_forward = make_forward
        self._slots = {id(m): timestep_slot(m, timestep_arg) for m in self.models}
        self.owner: Any = None  # the CacheHandle (or other object) that manages this session
        self._handles: list[Any] = []
        self._saved: list[tuple[nn.Module, Any]] = []
        self.open = False
        self.exclusive = exclusive  # registered as the model's one stepcache session
        modules = [c.module for c in self.components]
        if len({id(m) for m in modules}) != len(modules):
            raise StepCacheError("the same module appears twice among the components; pass each once.")

    def __enter__(self) -> Session:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        for model in self.models if self.exclusive else ():
            if model in _ACTIVE:
                raise StepCacheError(
                    f"{type(model).__name__} already has an active stepcache session; "
                    "disable it (or leave its `with` block) before enabling another."
                )
        try:
            # A tracking-only session runs first and always closes its call (what drives another
            # library per call must see every call end); a cache session leaves a call that raised
            # open, so the tracker starts the next generation afresh.
            first = not self.exclusive
            for model in self.models:
                self._handles.append(
                    model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=first)
                )
                self._handles.append(model.register_forward_hook(self._post, always_call=first))
            for comp in self.components:
                mod = comp.module
                self._saved.append((mod, mod.__dict__.get("forward", _MISSING)))
                mod.forward = self._make_forward(comp, mod.forward)
        except BaseException:
            self.remove()
            raise
        if self.exclusive:
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
                t = read_timestep(kwargs[name])
            elif index is not None and index < len(args):
                t = read_timestep(args[index])
        self.tracker.begin_call(t)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.tracker.end_call()


def track_steps(
    models: nn.Module | Sequence[nn.Module], tracker: StepTracker, *, timestep_arg: str | None = None
) -> Session:
    """A session that only tracks steps (no component is intercepted), as a context manager.

    For code that drives something else per step from the same reading of timesteps as stepcache
    (the benchmarks drive other caching libraries this way). It does not count as the model's cache
    session, so it never conflicts with one.
    """

    def unused(comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        return original

    return Session(models, [], unused, tracker, timestep_arg=timestep_arg, exclusive=False)
