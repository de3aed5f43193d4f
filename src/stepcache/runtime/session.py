"""Installing and removing stepcache's interception on a model, exactly.

:class:`Session` puts a pre- and a post-call hook on each denoiser (they drive a
:class:`~stepcache.runtime.steps.StepTracker`) and an interceptor around each component's forward.
How they are attached is an :class:`Installer`:

* :class:`TorchInstaller` (the default, any ``nn.Module``): torch forward hooks on the denoiser and a
  replaced ``forward`` on each component *instance* (the class is never touched);
* ``stepcache.integrations.diffusers_hooks.DiffusersInstaller``: named hooks in diffusers'
  ``HookRegistry``, so they list, order and remove like diffusers' own.

Either way ``remove()`` puts back exactly what was there: the model leaves with no hooks and no
attributes of ours.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..discovery import Component, unwrap
from ..errors import StepCacheError, StepCacheWarning
from .steps import StepTracker, on_device, read_timestep, timestep_slot

__all__ = ["Installer", "Interceptor", "Session", "TorchInstaller", "active_session", "track_steps"]

_MISSING = object()

# Denoisers that currently have a stepcache session, and the components a session intercepts:
# enabling twice, or two sessions on one shared block, is an error, never a leak. Weak both ways:
# the model's own hooks keep its session alive, and nothing here keeps a model alive.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Session]] = weakref.WeakKeyDictionary()
_INTERCEPTED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Session]] = weakref.WeakKeyDictionary()


def _live(
    table: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Session]], key: nn.Module
) -> Session | None:
    ref = table.get(key)
    session = ref() if ref is not None else None
    return session if session is not None and session.open else None


Interceptor = Callable[[Component, Callable[..., Any]], Callable[..., Any]]
PreCall = Callable[[nn.Module, tuple, dict], None]
PostCall = Callable[[nn.Module, tuple, Any], None]  # (module, args, output); output None: it raised
Undo = Callable[[], None]


def other_caches(models: Sequence[nn.Module]) -> list[str]:
    """Caches of other libraries active on ``models``: diffusers' cache hooks (by their registry
    names) and cache-dit (its ``_is_cached`` mark). Two caches on one model skip calls on each
    other's behalf: outputs change and neither's stats are right."""
    found = []
    for model in models:
        root = unwrap(model)
        if root.__dict__.get("_is_cached"):
            found.append(f"cache-dit on {type(root).__name__}")
        if getattr(root, "is_cache_enabled", False) is True:
            found.append(f"diffusers' enable_cache() on {type(root).__name__}")
        for name, module in root.named_modules():
            registry = module.__dict__.get("_diffusers_hook")
            for hook in getattr(registry, "hooks", {}):
                if hook.startswith("stepcache_"):
                    continue
                if "cache" in hook or hook.startswith(("fbc_", "pyramid_attention_broadcast")):
                    found.append(f"diffusers hook {hook!r} on {name or type(root).__name__}")
    return sorted(set(found))


def active_session(model: nn.Module) -> Session | None:
    """The session currently installed on ``model`` (or the model it compiles), if any."""
    return _live(_ACTIVE, unwrap(model))


class Installer(Protocol):
    """Attaches a session's hooks; each method returns the callable that detaches exactly that."""

    def hook_denoiser(self, model: nn.Module, pre: PreCall, post: PostCall, *, first: bool) -> Undo: ...

    def hook_component(self, comp: Component, make_forward: Interceptor) -> Undo: ...


class TorchInstaller:
    """Torch forward hooks on the denoiser; an instance ``forward`` on each component."""

    def hook_denoiser(self, model: nn.Module, pre: PreCall, post: PostCall, *, first: bool) -> Undo:
        if model.__dict__.get("_compiled_call_impl") is not None:
            return _shim_compiled_call(model, pre, post)
        # The post hook runs even when the call raises (torch then passes output None), so the tracker
        # knows at once that the generation is dead. A tracking-only session runs first.
        h1 = model.register_forward_pre_hook(pre, with_kwargs=True, prepend=first)
        h2 = model.register_forward_hook(post, always_call=True)

        def undo() -> None:
            h1.remove()
            h2.remove()

        return undo

    def hook_component(self, comp: Component, make_forward: Interceptor) -> Undo:
        mod = comp.module
        saved = mod.__dict__.get("forward", _MISSING)
        mod.forward = make_forward(comp, mod.forward)

        def undo() -> None:
            if saved is _MISSING:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = saved

        return undo


def _shim_compiled_call(model: nn.Module, pre: PreCall, post: PostCall) -> Undo:
    """A model compiled in place (``model.compile()``) runs ``_compiled_call_impl``, which compiles
    ``_call_impl`` and with it any hook: tracking there would be traced (a graph break reading the
    timestep). So the step is tracked around the compiled call instead, outside the graph."""
    compiled = model.__dict__["_compiled_call_impl"]

    def call(*args: Any, **kwargs: Any) -> Any:
        pre(model, args, kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception:
            post(model, args, None)
            raise
        post(model, args, out)
        return out

    call.__stepcache_shim__ = True  # type: ignore[attr-defined]
    model.__dict__["_compiled_call_impl"] = call

    def undo() -> None:
        if model.__dict__.get("_compiled_call_impl") is call:
            model.__dict__["_compiled_call_impl"] = compiled

    return undo


def hook_state(model: nn.Module) -> tuple[int, Any]:
    """What decides where a denoiser's hooks must go: the object called, and its compiled call."""
    return id(model), model.__dict__.get("_compiled_call_impl")


class Session:
    """Hooks on the denoiser(s): step tracking on each, an interceptor on each component.

    Several denoisers (Wan 2.2's two experts) share one tracker: the step count runs on across the
    switch from one to the other.

    ``make_forward(component, original_forward)`` returns the callable that replaces the
    component's forward. Everything is validated before anything is installed, and a failure
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
        installer: Installer | None = None,
        allow_other_caches: bool = False,
    ) -> None:
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        self.components = list(components)
        self.tracker = tracker
        self._make_forward = make_forward
        self._timestep_arg = timestep_arg
        self._slots = {id(m): timestep_slot(m, timestep_arg) for m in self.models}
        self.hooked: list[tuple[int, Any]] = []
        self.owner: Any = None  # the CacheHandle (or other object) that manages this session
        # Shown each denoiser call's arguments before its step is tracked (a cache that chooses its
        # schedule when a generation starts reads the latents there); None: nothing is shown them.
        self.probe: PreCall | None = None
        self.installer: Installer = installer if installer is not None else TorchInstaller()
        self._undo: list[Undo] = []
        self._undo_denoisers: list[Undo] = []
        self.open = False
        self.exclusive = exclusive  # registered as the model's one stepcache session
        self.warned_traced = False
        self.allow_other_caches = allow_other_caches
        # Called with each eager denoiser call's arguments once its step is known (or None).
        self.inspect: Callable[[tuple, dict], None] | None = None
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
            if _live(_ACTIVE, unwrap(model)) is not None:
                raise StepCacheError(
                    f"{type(model).__name__} already has an active stepcache session; "
                    "disable it (or leave its `with` block) before enabling another."
                )
        others = other_caches(self.models) if self.exclusive and not self.allow_other_caches else []
        if others:
            raise StepCacheError(
                f"another cache is active on this model: {', '.join(others[:3])}"
                f"{' ...' if len(others) > 3 else ''}. Remove it first (two caches skip calls on each "
                "other's behalf and neither's schedule holds), or pass allow_other_caches=True to cache() "
                "to stack them anyway."
            )
        for comp in self.components:
            if _live(_INTERCEPTED, comp.module) is not None:
                raise StepCacheError(
                    f"{comp.name} is already cached by another stepcache session (a block shared between "
                    "two models?); close that cache first."
                )
        try:
            self._hook_denoisers()
            for comp in self.components:
                self._undo.append(self.installer.hook_component(comp, self._make_forward))
        except BaseException:
            self.remove()
            raise
        me = weakref.ref(self)
        if self.exclusive:
            for model in self.models:
                _ACTIVE[unwrap(model)] = me
        for comp in self.components:
            _INTERCEPTED[comp.module] = me
        self.open = True

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        while self._undo_denoisers:
            self._undo_denoisers.pop()()
        models = [unwrap(m) for m in self.models]
        for table, keys in ((_ACTIVE, models), (_INTERCEPTED, [c.module for c in self.components])):
            for key in keys:
                ref = table.get(key)
                if ref is not None and ref() is self:
                    del table[key]
        self.open = False

    def _hook_denoisers(self) -> None:
        for model in self.models:
            self._undo_denoisers.append(
                self.installer.hook_denoiser(model, self._pre, self._post, first=not self.exclusive)
            )
        self.hooked = [hook_state(m) for m in self.models]

    def rehook(self, models: Sequence[nn.Module]) -> None:
        """Move the denoiser hooks to ``models`` (the same models, now called through a compiled
        wrapper or compiled in place), so that tracking stays outside the compiled graph."""
        while self._undo_denoisers:
            self._undo_denoisers.pop()()
        self.models = list(models)
        self._slots = {id(m): timestep_slot(m, self._timestep_arg) for m in self.models}
        self._hook_denoisers()

    # The two hooks run on every denoiser call: kept short.
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            _outside_graph(self, self._pre_eager, module, args, kwargs)
            return
        self._pre_eager(module, args, kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            _outside_graph(self, self._post_eager, module, args, output)
            return
        self._post_eager(module, args, output)

    def _pre_eager(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.probe is not None:
            self.probe(module, args, kwargs)
        self._begin(module, args, kwargs)
        if self.inspect is not None:
            self.inspect(args, kwargs)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.tracker.manual:
            self.tracker.begin_call(None)
            return
        value = None
        slot = self._slots.get(id(module))
        if slot is not None:
            name, index = slot
            if name in kwargs:
                value = kwargs[name]
            elif index is not None and index < len(args):
                value = args[index]
        if on_device(value):  # reading it would wait for the device: let the tracker count steps
            self.tracker.begin_call(None, value)
        else:
            self.tracker.begin_call(read_timestep(value))

    def _post_eager(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.tracker.end_call(failed=output is None)


@torch.compiler.disable
def _outside_graph(session: Session, fn: Callable[..., None], *args: Any) -> None:
    """Step tracking reached from inside a compiled call: the model was compiled as a whole after
    the cache was enabled, and no pipeline let stepcache move its hooks out first. It runs here,
    outside the graph (one graph break per call), and says how to avoid that."""
    if not session.warned_traced:
        session.warned_traced = True
        warnings.warn(
            "the model was compiled as a whole after stepcache's cache was enabled, so its step tracking "
            "runs inside the compiled call (a graph break per call). enable the cache after compiling "
            "(model.compile() or torch.compile(model) first, then stepcache.cache), or compile the blocks "
            "(regional compilation); pipelines are handled automatically.",
            StepCacheWarning,
            stacklevel=2,
        )
    fn(*args)


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
