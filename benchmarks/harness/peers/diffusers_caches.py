"""diffusers' built-in cache hooks (``diffusers.hooks.apply_*``) on the reference DiT.

FirstBlockCache, TaylorSeer, Pyramid Attention Broadcast, FasterCache (attention reuse only) and
MagCache. ``DiTTransformer2DModel`` is no ``CacheMixin``, so the hooks are applied with the
``apply_*`` functions and driven here: their state managers get a cache context (step index,
timestep) around every model call, and every stateful hook is reset at each new generation.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stepcache.runtime import StepTracker

from . import (
    _TAYLORSEER_TARGETS,
    DIFFUSERS,
    INSTALL_HINT,
    PeerError,
    PeerMethod,
    _check_positive_int,
    _require,
    _version_of,
    unsupported_peers,
)
from ._common import peer_errors, quiet_loggers, restore_modules, step_tracker

_CONTEXT_NAME = "denoise"  # guidance branch 0 (a batched-CFG call holds both); "denoise-1" the next


class _DiffusersHooks:
    """Applies one diffusers cache hook set and drives it from the step tracker."""

    def __init__(self, model: nn.Module, tracker: StepTracker) -> None:
        self.model = model
        self.tracker = tracker
        self.added: list[tuple[Any, str]] = []  # (registry, hook name), in registration order
        self.managers: list[Any] = []
        self.registries: list[Any] = []
        tracker.on_generation.append(self.reset)
        tracker.on_call_begin.append(self.enter_step)
        tracker.on_call_end.append(self.exit_step)

    def _registries(self) -> list[Any]:
        return [m._diffusers_hook for m in self.model.modules() if hasattr(m, "_diffusers_hook")]

    def install(self, apply: Callable[[nn.Module, Any], None], config: Any) -> None:
        from diffusers.hooks.hooks import StateManager

        before = {id(r): set(r.hooks) for r in self._registries()}
        apply(self.model, config)
        self.registries = self._registries()
        self.added = [
            (r, name) for r in self.registries for name in r.hooks if name not in before.get(id(r), set())
        ]
        if not self.added:
            raise PeerError(f"{type(config).__name__} hooked no module of {type(self.model).__name__}.")
        self.managers = []
        for registry, name in self.added:
            for value in vars(registry.hooks[name]).values():
                if isinstance(value, StateManager) and all(value is not m for m in self.managers):
                    self.managers.append(value)

    def uninstall(self) -> None:
        for registry, name in reversed(self.added):
            if name in registry.hooks:
                registry.remove_hook(name, recurse=False)
        for registry in self.registries:
            if hasattr(registry, "invalidate_child_registries_cache"):
                registry.invalidate_child_registries_cache()
        self.added, self.managers, self.registries = [], [], []

    def reset(self) -> None:
        # reset_state of every stateful hook: step counters, stored outputs, Taylor factors, contexts.
        for registry in self.registries:
            registry.reset_stateful_hooks(recurse=False)

    def enter_step(self) -> None:
        from diffusers.hooks.hooks import CacheContext

        # One state per guidance branch: split-guidance pipelines (Wan, Flux with true CFG) call the
        # model twice a step, and each call must read its own branch's cached outputs.
        branch = self.tracker.branch
        context = CacheContext(
            _CONTEXT_NAME if branch == 0 else f"{_CONTEXT_NAME}-{branch}",
            step_index=self.tracker.step,
            num_inference_steps=self.tracker.num_steps,
            timestep=self.tracker.timestep,
        )
        for manager in self.managers:
            manager.set_context(context)

    def exit_step(self) -> None:
        for manager in self.managers:
            manager.set_context(None)

    def state(self) -> Any:
        """The shared state of the (single) state manager, e.g. MagCache's calibration record."""
        from diffusers.hooks.hooks import CacheContext

        if len(self.managers) != 1:
            raise PeerError(f"expected one state manager, found {len(self.managers)}.")
        manager = self.managers[0]
        manager.set_context(CacheContext(_CONTEXT_NAME))
        try:
            return manager.get_state()
        finally:
            manager.set_context(None)


def _diffusers_config(
    method: PeerMethod, tracker: StepTracker, n: int, timestep: Callable[[], float] | None = None
) -> tuple[Callable[..., None], Any]:
    _require(DIFFUSERS)
    hooks = importlib.import_module("diffusers.hooks")
    p = dict(method.params)

    def current_timestep() -> int:  # what PAB and FasterCache compare with their timestep ranges
        return int(tracker.timestep if timestep is None else timestep())

    def get(name: str) -> Any:
        if not hasattr(hooks, name):
            raise PeerError(
                f"this diffusers ({_version_of(DIFFUSERS)}) has no diffusers.hooks.{name}; {method.name} needs "
                f"a newer diffusers ({INSTALL_HINT})."
            )
        return getattr(hooks, name)

    try:
        if method.name == "FirstBlockCache":
            return get("apply_first_block_cache"), get("FirstBlockCacheConfig")(**p)
        if method.name == "TaylorSeer":
            dtype = p.get("taylor_factors_dtype", "bfloat16")
            if isinstance(dtype, str):
                p["taylor_factors_dtype"] = getattr(torch, dtype)
            p.setdefault("cache_identifiers", list(_TAYLORSEER_TARGETS))
            return get("apply_taylorseer_cache"), get("TaylorSeerCacheConfig")(**p)
        if method.name == "PAB":
            for key in ("spatial_attention_timestep_skip_range",):
                if key in p:
                    p[key] = tuple(p[key])
            config = get("PyramidAttentionBroadcastConfig")(**p, current_timestep_callback=current_timestep)
            return get("apply_pyramid_attention_broadcast"), config
        if method.name == "FasterCache":
            if not p.get("is_guidance_distilled", True):
                raise PeerError(
                    "FasterCache's CFG-Cache (is_guidance_distilled=False) cannot run on the reference loop: "
                    + unsupported_peers()["diffusers/FasterCache CFG-Cache (unconditional-branch skipping)"]
                )
            for key in ("spatial_attention_timestep_skip_range",):
                if key in p:
                    p[key] = tuple(p[key])
            p["is_guidance_distilled"] = True
            p.setdefault("tensor_format", "BCHW")
            config = get("FasterCacheConfig")(**p, current_timestep_callback=current_timestep)
            return get("apply_faster_cache"), config
        if method.name == "MagCache":
            p.pop("calibrate", None)
            p["num_inference_steps"] = n
            if p.get("mag_ratios") is None:
                raise PeerError("MagCache needs mag_ratios (or calibrate=True with a calibration_run).")
            return get("apply_mag_cache"), get("MagCacheConfig")(**p)
    except TypeError as exc:
        raise PeerError(f"bad params for diffusers {method.name}: {exc}") from exc
    raise PeerError(f"diffusers has no peer method {method.name!r} here.")


# Ratios measured by MagCache's calibration mode, per calibration_run callable and (model, steps), so a
# sweep of MagCache settings runs the calibration once.
_MAG_RATIOS: weakref.WeakKeyDictionary[Callable[[], Any], dict[tuple[int, int], list[float]]] = (
    weakref.WeakKeyDictionary()
)


def calibrate_mag_ratios(
    model: nn.Module, calibration_run: Callable[[], Any], num_inference_steps: int
) -> list[float]:
    """MagCache's per-step magnitude ratios for ``model``, from its own calibration mode.

    ``calibration_run`` runs one (or more) ordinary sampling(s) of ``num_inference_steps`` steps; the
    ratios of the last generation are returned. The model is left as it was.
    """
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    _require(DIFFUSERS)
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    tracker, tracking = step_tracker(model, n)
    quiet = ["diffusers.hooks", "stepcache.runtime"]
    with restore_modules(model), quiet_loggers(quiet), contextlib.ExitStack() as stack:
        hooks = _DiffusersHooks(model, tracker)
        # num_inference_steps far beyond the run: the hook would otherwise print its ratios and clear
        # them at the last step; the tracker resets the state at each new generation instead.
        hooks.install(apply_mag_cache, MagCacheConfig(calibrate=True, num_inference_steps=10**9))
        stack.callback(hooks.uninstall)
        # Read after every call: a diffusers pipeline resets its transformer's cache state when its
        # generation ends (maybe_free_model_hooks), before the run returns.
        seen: list[list[float]] = [[]]
        tracker.on_call_end.append(lambda: seen.__setitem__(0, list(hooks.state().calibration_ratios)))
        stack.enter_context(tracking)
        with peer_errors(n):
            calibration_run()
        ratios = [float(r) for r in seen[0]]
    if len(ratios) != n:
        raise PeerError(
            f"the MagCache calibration run made {len(ratios)} steps in its last generation, expected "
            f"num_inference_steps={n}: calibration_run must sample with the same scheduler and steps."
        )
    return ratios


def _mag_ratios(model: nn.Module, calibration_run: Callable[[], Any] | None, n: int) -> list[float]:
    if calibration_run is None:
        raise PeerError(
            "MagCache with calibrate=True needs calibration_run (a callable that samples once without "
            "caching) to measure its magnitude ratios; or pass params['mag_ratios']."
        )
    key = (id(model), n)
    try:
        memo = _MAG_RATIOS.setdefault(calibration_run, {})
    except TypeError:  # not weak-referenceable: calibrate every time
        memo = {}
    if key not in memo:
        memo[key] = calibrate_mag_ratios(model, calibration_run, n)
    return list(memo[key])


def enable(
    method: PeerMethod,
    model: nn.Module,
    tracker: StepTracker,
    n: int,
    stack: contextlib.ExitStack,
    *,
    calibration_run: Callable[[], Any] | None = None,
    timestep: Callable[[], float] | None = None,
) -> None:
    """Apply one diffusers cache hook set to ``model``, driven by ``tracker``; removed by ``stack``.

    ``timestep``: the current timestep on the scheduler's scale, for PAB and FasterCache's ranges
    (default: the one the model received, which the tracker read)."""
    params = dict(method.params)
    if method.name == "MagCache" and params.get("mag_ratios") is None:
        if not params.get("calibrate", False):
            raise PeerError("MagCache needs params['mag_ratios'] or params['calibrate']=True.")
        params["mag_ratios"] = _mag_ratios(model, calibration_run, n)
        method = PeerMethod(method.library, method.name, method.knob, params)
    hooks = _DiffusersHooks(model, tracker)
    apply, config = _diffusers_config(method, tracker, n, timestep)
    hooks.install(apply, config)
    stack.callback(hooks.uninstall)
