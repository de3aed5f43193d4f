"""A diffusers-native front door: ``apply_smoothcache(transformer, SmoothCacheConfig(...))``.

Shaped like diffusers' own cache hooks (``apply_first_block_cache``, ``apply_taylorseer_cache``): a
config dataclass validated on construction, hooks with ``reset_state``, and one apply function.
On a diffusers model the hooks go into the model's ``HookRegistry`` under the names
``stepcache_steps`` (the denoiser: which step and guidance branch a call belongs to) and
``stepcache_cache`` (each cached component), so they list, order and reset like diffusers' hooks.
On any other ``nn.Module`` the plain-PyTorch path of :func:`stepcache.cache` is used.

The caching itself is the same runtime as :func:`stepcache.cache` (same slots, same step tracking)
with the same options (a :class:`SmoothCacheConfig` is a :class:`~stepcache.CacheConfig` plus the
schedule), so both give bit-identical outputs for the same schedule. :func:`remove_smoothcache` removes the
hooks and leaves the model exactly as before (no instance ``forward``, no ``_diffusers_hook``
attribute that was not there before).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..auto import auto_handle
from ..discovery import Component
from ..errors import StepCacheError
from ..runtime.config import CacheConfig
from ..runtime.handle import CacheHandle
from ..runtime.session import Interceptor, PostCall, PreCall, Undo, active_session
from ..schedule import Schedule
from .hub import resolve_guidance, resolve_schedule

__all__ = [
    "CACHE_HOOK",
    "STEPS_HOOK",
    "DiffusersInstaller",
    "SmoothCacheConfig",
    "apply_smoothcache",
    "remove_smoothcache",
]

STEPS_HOOK = "stepcache_steps"
CACHE_HOOK = "stepcache_cache"
_MISSING = object()


@dataclass(frozen=True)
class SmoothCacheConfig(CacheConfig):
    """What :func:`apply_smoothcache` caches, and how: a :class:`~stepcache.CacheConfig` (every option
    of :func:`stepcache.cache`, checked the same way) plus the schedule.

    ``SmoothCacheConfig(compute_fraction=0.5)``, with no schedule, caches the way
    ``stepcache.cache(pipe, compute_fraction=0.5)`` does: the first generation of each kind is
    recorded uncached unless a calibration for it is found, and caching starts with the next
    (:mod:`stepcache.auto`).

    Attributes:
        schedule: a :class:`~stepcache.Schedule`, a schedule file, a folder holding
            ``stepcache_schedule.json`` or a hub repository id (read when the config is made); None
            (default): the cache calibrates itself and remembers.
        guidance: as in :class:`~stepcache.CacheConfig`; a guidance plan file is read when the config
            is made.

    The other options are :class:`~stepcache.CacheConfig`'s, given as keywords.
    """

    schedule: Schedule | str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.schedule is not None:
            if self.auto:
                raise StepCacheError(
                    "compute_fraction and calibration_runs are for caching without a schedule (the cache "
                    "then calibrates itself); this config has a schedule: drop one or the other."
                )
            object.__setattr__(self, "schedule", resolve_schedule(self.schedule))
        if self.guidance is not None:
            object.__setattr__(self, "guidance", resolve_guidance(self.guidance))
        super().__post_init__()


def _hook_classes() -> tuple[type, type]:
    """The two ModelHook subclasses, defined on first use so diffusers is imported only then."""
    global _HOOKS
    if _HOOKS is None:
        from diffusers.hooks import ModelHook

        class StepHook(ModelHook):
            """On the denoiser: tells the tracker a call began (with its timestep) and ended."""

            _is_stateful = True

            def __init__(self, pre: PreCall, post: PostCall, reset: Callable[[], None]) -> None:
                super().__init__()
                self._pre, self._post, self._reset = pre, post, reset

            def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
                self._pre(module, args, kwargs)
                try:
                    output = self.fn_ref.original_forward(*args, **kwargs)
                except Exception:
                    self._post(module, args, None)  # the call raised: this generation is over
                    raise
                self._post(module, args, output)
                return output

            def reset_state(self, module: nn.Module) -> nn.Module:
                self._reset()  # diffusers' reset_stateful_hooks(): start the next generation afresh
                return module

        class ComponentHook(ModelHook):
            """On a cached component: compute and keep, or return what was kept (the runtime's slot)."""

            def __init__(self, comp: Component, make_forward: Interceptor) -> None:
                super().__init__()
                # The wrapped forward is read at call time: diffusers may re-link the chain when a
                # hook registered before this one is removed.
                self._forward = make_forward(comp, self._call_original)

            def _call_original(self, *args: Any, **kwargs: Any) -> Any:
                return self.fn_ref.original_forward(*args, **kwargs)

            def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
                return self._forward(*args, **kwargs)

        _HOOKS = (StepHook, ComponentHook)
    return _HOOKS


_HOOKS: tuple[type, type] | None = None


class DiffusersInstaller:
    """Installs a session's hooks as named hooks in diffusers' ``HookRegistry``."""

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset

    def _register(self, module: nn.Module, hook: Any, name: str) -> Undo:
        from diffusers.hooks import HookRegistry

        had_registry = "_diffusers_hook" in module.__dict__
        saved_forward = module.__dict__.get("forward", _MISSING)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)

        def undo() -> None:
            registry.remove_hook(name, recurse=False)
            if registry.hooks:
                return  # other hooks still wrap the forward: the registry owns the chain
            # Put back exactly what was there: diffusers leaves the bound forward and the registry.
            if saved_forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved_forward
            if not had_registry:
                module.__dict__.pop("_diffusers_hook", None)

        return undo

    def hook_denoiser(self, model: nn.Module, pre: PreCall, post: PostCall, *, first: bool) -> Undo:
        step_hook, _ = _hook_classes()
        return self._register(model, step_hook(pre, post, self._reset), STEPS_HOOK)

    def hook_component(self, comp: Component, make_forward: Interceptor) -> Undo:
        _, component_hook = _hook_classes()
        return self._register(comp.module, component_hook(comp, make_forward), CACHE_HOOK)


def _is_diffusers_model(module: nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(module, ModelMixin)


def apply_smoothcache(module: nn.Module, config: SmoothCacheConfig) -> CacheHandle:
    """Cache ``module`` (a transformer) with ``config``; the handle reports stats and can close it.

    Through diffusers' ``HookRegistry`` when ``module`` is a diffusers model, through plain torch
    hooks otherwise. Call :func:`remove_smoothcache` (or ``handle.close()``) to remove it.
    """
    if not isinstance(module, nn.Module):
        raise StepCacheError(
            f"apply_smoothcache takes the transformer module (e.g. pipe.transformer), got {type(module).__name__}; "
            "for a whole pipeline use stepcache.cache(pipe, schedule)."
        )
    if not isinstance(config, SmoothCacheConfig):
        raise StepCacheError(f"config must be a SmoothCacheConfig, got {type(config).__name__}.")
    handle: CacheHandle | None = None

    def reset() -> None:
        if handle is not None:
            handle.reset()

    installer = DiffusersInstaller(reset) if _is_diffusers_model(module) else None
    schedule = config.schedule
    if schedule is None:
        handle = auto_handle(module, config, installer)
        return handle.open()
    assert isinstance(schedule, Schedule)  # read when the config was made
    handle = CacheHandle(module, schedule, config, installer=installer)
    return handle.open()


def remove_smoothcache(module: nn.Module) -> None:
    """Remove the cache :func:`apply_smoothcache` put on ``module``; a no-op if there is none."""
    session = active_session(module)
    if session is None:
        return
    if isinstance(session.owner, CacheHandle):
        session.owner.close()
    else:
        session.remove()
