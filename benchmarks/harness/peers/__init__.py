"""Other caching libraries ("peers") run on the reference DiT, for side-by-side benchmarks.

Three libraries are covered, each through its own public entry points:

* diffusers' built-in cache hooks (``diffusers.hooks.apply_*``): FirstBlockCache, TaylorSeer, Pyramid
  Attention Broadcast, FasterCache and MagCache;
* cache-dit's DBCache (Fn/Bn dual block cache), with and without its TaylorSeer calibrator;
* dit-smoothcache's ``SmoothCacheHelper`` (the original SmoothCache runtime) with a given schedule.

None of them fits the reference loop out of the box: ``DiTTransformer2DModel`` is not a diffusers
``CacheMixin`` (no ``enable_cache`` / ``cache_context``), and the reference ``sample()`` is a bare loop, not
a pipeline whose ``__call__`` the libraries could use to notice a new generation. So :func:`apply_peer`
puts a forward pre-hook on the model that

* notices the start of each generation (the timestep goes up: the first step has the largest one) and
  resets the peer's state there, so several ``sample()`` calls inside one context are independent;
* hands the peer what its hooks read per call (diffusers' cache context, the current timestep).

On exit the library's own removal runs first, then every attribute, child module, parameter or buffer
the peer added to any submodule is removed again (cache-dit, for one, leaves an instance ``forward`` and
a ``_norm1_emb`` child behind after ``disable_cache``), so the model is exactly as before.

:func:`count_component_calls` counts attention / feed-forward computations that really ran, by hooking a
leaf ``Linear`` inside each component, which gives every method a comparable compute fraction.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import io
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stepcache.errors import StepCacheError

__all__ = [
    "CACHE_DIT",
    "DIFFUSERS",
    "INSTALL_HINT",
    "LIBRARIES",
    "SMOOTHCACHE",
    "PeerError",
    "PeerMethod",
    "apply_peer",
    "available_peers",
    "calibrate_mag_ratios",
    "count_component_calls",
    "peer_sweeps",
    "uniform_schedule",
    "unsupported_peers",
]

logger = logging.getLogger(__name__)

DIFFUSERS = "diffusers"
CACHE_DIT = "cache-dit"
SMOOTHCACHE = "dit-smoothcache"
LIBRARIES = (DIFFUSERS, CACHE_DIT, SMOOTHCACHE)
INSTALL_HINT = "pip install -e .[bench]"

# library -> (import name, distribution name)
_PACKAGES = {
    DIFFUSERS: ("diffusers", "diffusers"),
    CACHE_DIT: ("cache_dit", "cache-dit"),
    SMOOTHCACHE: ("SmoothCache", "dit-smoothcache"),
}
_METHODS = {
    DIFFUSERS: ("FirstBlockCache", "TaylorSeer", "PAB", "FasterCache", "MagCache"),
    CACHE_DIT: ("DBCache", "DBCache+TaylorSeer"),
    SMOOTHCACHE: ("SmoothCacheHelper",),
}
# TaylorSeer caches these outputs. Its default patterns ("^transformer_blocks.*attn") must match the
# whole module name, so they never match diffusers' "transformer_blocks.<i>.attn1" and would hook nothing.
_TAYLORSEER_TARGETS = (r"transformer_blocks\.\d+\.(attn1|ff)",)
_CONTEXT_NAME = "denoise"  # one model call per step holds the whole (CFG-batched) batch


class PeerError(StepCacheError):
    """A peer method cannot be set up or run as asked (missing package, bad params, wrong loop)."""


@dataclass(frozen=True)
class PeerMethod:
    """One peer caching method at one setting of its main knob.

    Attributes:
        library: ``"diffusers"``, ``"cache-dit"`` or ``"dit-smoothcache"``.
        name: the method, e.g. ``"FirstBlockCache"``, ``"DBCache+TaylorSeer"``, ``"SmoothCacheHelper"``.
        knob: the setting in words, for tables and plot legends (``"threshold=0.05"``).
        params: keyword settings that :func:`apply_peer` passes on to the library (plain values, so a
            method can be written to JSON with the results it produced).
    """

    library: str
    name: str
    knob: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.library not in _METHODS:
            raise PeerError(f"unknown peer library {self.library!r}; expected one of {LIBRARIES}.")
        if self.name not in _METHODS[self.library]:
            raise PeerError(
                f"{self.library} has no peer method {self.name!r} here; expected one of "
                f"{_METHODS[self.library]} (see unsupported_peers() for the ones that cannot run)."
            )
        # A private copy, so that changing the caller's dict later cannot change a recorded method.
        object.__setattr__(self, "params", dict(self.params))

    @property
    def label(self) -> str:
        """``library/name (knob)``: a unique, readable key for result tables."""
        return f"{self.library}/{self.name} ({self.knob})"


# ---------------------------------------------------------------------------------------- availability
def _import_peer(library: str) -> Any:
    """Import a peer package, keeping what it prints at import time off the caller's stdout."""
    module_name = _PACKAGES[library][0]
    if library == SMOOTHCACHE:
        import diffusers  # noqa: F401  (its loggers must not bind to the redirected stdout below)

        # dit-smoothcache 0.1.1 prints "Warning: ... not imported" for optional helpers it lacks.
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module(module_name)
    # Not redirected: cache-dit binds its log handler to sys.stdout when first imported.
    return importlib.import_module(module_name)


def _require(library: str) -> Any:
    try:
        return _import_peer(library)
    except ImportError as exc:
        raise PeerError(
            f"{library} is not installed or fails to import ({exc}); install the bench extra: {INSTALL_HINT}"
        ) from exc


def available_peers() -> dict[str, str | None]:
    """Library -> installed version, or ``None`` where it cannot be imported.

    The bench reports a missing library as skipped (with :data:`INSTALL_HINT`) instead of failing, since
    the peers are an optional extra.
    """
    out: dict[str, str | None] = {}
    for library, (_import_name, dist_name) in _PACKAGES.items():
        try:
            module = _import_peer(library)
        except Exception:  # any import-time failure means "not usable here"
            out[library] = None
            continue
        try:
            out[library] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[library] = str(getattr(module, "__version__", "unknown"))
    return out


def unsupported_peers() -> dict[str, str]:
    """Peer methods (or modes) that cannot run on ``DiTTransformer2DModel`` with the reference loop -> why.

    Measured on diffusers 0.42.1, cache-dit 1.5.3 and dit-smoothcache 0.1.1.
    """
    return {
        "diffusers/FasterCache CFG-Cache (unconditional-branch skipping)": (
            "the denoiser-level hook assumes the batch is [unconditional; conditional] and splits only "
            "hidden_states/encoder_hidden_states/timestep/attention masks, not DiT's class_labels; without "
            "guidance (the reference default) it would treat two halves of one conditional batch as the two "
            "CFG branches. It runs here with is_guidance_distilled=True, i.e. only its attention reuse "
            "(t + w*(t - t_prev) extrapolation of attn1 outputs)."
        ),
        "diffusers/SeaCache": (
            "needs a cache context with a flow-matching sigma in [0, 1] per step plus raw video latents "
            "(raw_vision_callback returning (C, T, H, W) tensors, built in only for Cosmos-style models); "
            "the reference DDPM/DDIM loop has neither, so SeaCache runs in its fail-open mode (never caches)."
        ),
        "diffusers/TextKVCache": (
            "caches the text-conditioning key/values of cross-attention; DiT is class-conditional and its "
            "blocks have no cross-attention (attn2 is None)."
        ),
        "cache-dit/DBCache enable_separate_cfg": (
            "separate-CFG mode expects the conditional and unconditional branches in alternating model "
            "calls; the reference loop batches both into one call per step, so only the fused mode applies."
        ),
        "dit-smoothcache/DiTCacheHelper": (
            "wraps facebookresearch/DiT's models.DiTBlock (attn/mlp), which diffusers' DiT does not use; "
            "SmoothCacheHelper with BasicTransformerBlock and ['attn1', 'ff'] is the equivalent used here."
        ),
        "dit-smoothcache/CalibrationHelper": (
            "the 0.1.1 wheel does not ship SmoothCache.calibration (its __init__ prints 'CalibrationHelper "
            "not imported'), so the package cannot calibrate; SmoothCacheHelper runs schedules given to it."
        ),
    }


# ---------------------------------------------------------------------------------------- sweeps
def uniform_schedule(num_steps: int, fraction: float) -> list[int]:
    """A 0/1 plan computing about ``fraction`` of ``num_steps`` steps, evenly spread; first and last compute.

    A calibration-free schedule for ``SmoothCacheHelper`` (FORA-like, but any fraction, not only 1/k).
    """
    if not 0 < fraction <= 1:
        raise PeerError(f"fraction must be in (0, 1], got {fraction!r}.")
    plan = [
        1 if s == 0 or math.floor(s * fraction) != math.floor((s - 1) * fraction) else 0
        for s in range(num_steps)
    ]
    plan[-1] = 1
    return plan


def peer_sweeps(num_inference_steps: int, depth: int) -> list[PeerMethod]:
    """Every peer method with a sweep of its main knob.

    The settings were measured on the reference model (6 layers, DDIM 50 and DPM-Solver++ 20) to spread
    each method's compute fraction over roughly 0.25..0.8 where the method can reach it: PAB and
    FasterCache only reuse attention, so their fraction stays above ~0.5. Warm-up lengths scale with
    ``num_inference_steps``; cache-dit's Fn/Bn split needs ``depth`` (the number of transformer blocks).
    Thresholds of the adaptive methods (FirstBlockCache, MagCache, DBCache) are not rescaled: with fewer
    steps the features change more per step, so on DPM-Solver++ 20 their lowest thresholds compute
    (almost) every step and the whole sweep sits higher (about 0.3..1.0).
    """
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    depth = _check_positive_int(depth, "depth")
    out: list[PeerMethod] = []

    for threshold in (0.04, 0.05, 0.08, 0.12, 0.2, 0.35):
        out.append(
            PeerMethod(DIFFUSERS, "FirstBlockCache", f"threshold={threshold:g}", {"threshold": threshold})
        )

    # (interval, warm-up steps): TaylorSeer's step 3 is always predicted and intervals are integers, so
    # interval 2 tops out near 0.5; a longer full-compute warm-up gives the high-fraction end.
    for interval, warm in ((2, max(3, round(0.4 * n))), (2, 3), (3, 3), (4, 3), (5, 3)):
        knob = f"interval={interval}" + (f", warm-up={warm}" if warm != 3 else "")
        out.append(
            PeerMethod(
                DIFFUSERS,
                "TaylorSeer",
                knob,
                {
                    "cache_interval": interval,
                    "max_order": 1,
                    "disable_cache_before_step": warm,
                    "taylor_factors_dtype": "float32",
                    "cache_identifiers": list(_TAYLORSEER_TARGETS),
                },
            )
        )

    for skip in (2, 3, 4, 6):
        out.append(
            PeerMethod(
                DIFFUSERS,
                "PAB",
                f"attn skip range={skip}",
                {
                    "spatial_attention_block_skip_range": skip,
                    "spatial_attention_timestep_skip_range": (0, 1000),
                },
            )
        )

    for skip in (2, 4, 8):
        out.append(
            PeerMethod(
                DIFFUSERS,
                "FasterCache",
                f"attn skip range={skip}",
                {
                    "spatial_attention_block_skip_range": skip,
                    "spatial_attention_timestep_skip_range": (-1, 681),
                },
            )
        )

    for threshold, max_skip in ((0.01, 1), (0.02, 2), (0.05, 3), (0.1, 4), (0.2, 5), (0.4, 6)):
        out.append(
            PeerMethod(
                DIFFUSERS,
                "MagCache",
                f"threshold={threshold:g}, K={max_skip}",
                {
                    "threshold": threshold,
                    "max_skip_steps": max_skip,
                    "retention_ratio": 0.1,
                    "calibrate": True,
                },
            )
        )

    warmup = max(1, round(0.06 * n))
    splits = [(1, 0), (1, 1), (2, 0)]
    splits = [(f, b) for f, b in splits if f + b < depth] or [(1, 0)]
    for name in ("DBCache", "DBCache+TaylorSeer"):
        for fn, bn in splits:
            for threshold in (0.04, 0.06, 0.12, 0.25, 0.5):
                params: dict[str, Any] = {
                    "Fn_compute_blocks": fn,
                    "Bn_compute_blocks": bn,
                    "residual_diff_threshold": threshold,
                    "max_warmup_steps": warmup,
                    "max_continuous_cached_steps": -1,
                }
                if name.endswith("TaylorSeer"):
                    params["taylorseer_order"] = 1
                out.append(PeerMethod(CACHE_DIT, name, f"F{fn}B{bn}, threshold={threshold:g}", params))

    for fraction in (0.8, 0.6, 0.5, 0.4, 0.3, 0.25):
        plan = uniform_schedule(n, fraction)
        out.append(
            PeerMethod(
                SMOOTHCACHE,
                "SmoothCacheHelper",
                f"uniform {sum(plan)}/{n} steps",
                {"schedule": {"attn1": plan, "ff": list(plan)}},
            )
        )
    return out


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeerError(f"{name} must be a positive integer, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------- counting
def _first_linear(module: nn.Module) -> nn.Linear | None:
    return next((m for m in module.modules() if isinstance(m, nn.Linear)), None)


@contextmanager
def count_component_calls(model: nn.Module) -> Iterator[Callable[[], dict[str, Any]]]:
    """Count attention (``attn1``/``attn2``) and feed-forward (``ff``) computations that really ran.

    Wrapper-level counts would be wrong: diffusers' hook registry, cache-dit and SmoothCache replace
    module forwards, and a torch hook on the attention or feed-forward module itself also fires when a
    cache returns a stored output. A hook on a leaf inside the component (the attention's ``to_q``, the
    feed-forward's first ``Linear``) fires only when the component is computed. Model calls are counted
    with a pre-hook on the model, which runs whatever replaced its ``forward``.

    Yields:
        A function returning ``{"attn", "ff", "executed", "model_calls", "components",
        "total_possible", "fraction"}``; ``fraction = executed / (model_calls * components)``, i.e.
        executed / (layers * 2 * steps) on the reference DiT.
    """
    counts = {"attn": 0, "ff": 0, "model_calls": 0}
    leaves: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        child = name.rsplit(".", 1)[-1]
        if module is None or child not in ("attn1", "attn2", "ff"):
            continue
        leaf = getattr(module, "to_q", None) if child != "ff" else None
        leaf = leaf if isinstance(leaf, nn.Module) else _first_linear(module)
        if leaf is None:
            raise PeerError(f"{name} has no Linear layer to count its computations with.")
        leaves.append(("ff" if child == "ff" else "attn", leaf))
    if not leaves:
        raise PeerError(
            f"{type(model).__name__} has no attn1/attn2/ff components (diffusers BasicTransformerBlock "
            "children); count_component_calls cannot measure it."
        )

    def counter(kind: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            counts[kind] += 1

        return hook

    handles = [leaf.register_forward_hook(counter(kind)) for kind, leaf in leaves]
    handles.append(model.register_forward_pre_hook(counter("model_calls")))

    def read() -> dict[str, Any]:
        total = counts["model_calls"] * len(leaves)
        executed = counts["attn"] + counts["ff"]
        return {
            "attn": counts["attn"],
            "ff": counts["ff"],
            "executed": executed,
            "model_calls": counts["model_calls"],
            "components": len(leaves),
            "total_possible": total,
            "fraction": executed / total if total else float("nan"),
        }

    try:
        yield read
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------- shared runtime
class _Discard(io.TextIOBase):
    """A text sink (SmoothCacheHelper prints one line per wrapped call)."""

    def write(self, s: str) -> int:
        return len(s)


class _StdoutSilencer:
    """Discards stdout between :meth:`enter` and :meth:`exit` (a model call), and only then.

    Tolerates an ``exit`` without ``enter`` (a pre-hook that raised before entering).
    """

    def __init__(self) -> None:
        self._redirect: contextlib.redirect_stdout[Any] | None = None

    def enter(self) -> None:
        if self._redirect is None:
            self._redirect = contextlib.redirect_stdout(_Discard())
            self._redirect.__enter__()

    def exit(self) -> None:
        if self._redirect is not None:
            redirect, self._redirect = self._redirect, None
            redirect.__exit__(None, None, None)


class _StepTracker:
    """A pre-hook on the model that follows the reference loop: one call per step, timesteps descending.

    Each call either starts a generation (first call, or the timestep went up) or is the next step of
    the current one. Peers register what to do at a new generation (reset their state) and around
    each step (set diffusers' cache context, silence prints).
    """

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.timestep: float = float("nan")
        self.step_index = -1
        self.generations = 0
        self._previous: float | None = None
        self._warned = False
        self.on_generation: list[Callable[[], None]] = []
        self.before_step: list[Callable[[], None]] = []
        self.after_step: list[Callable[[], None]] = []

    def current_timestep(self) -> int:
        return int(self.timestep)

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise PeerError(
                "the model was called without a timestep; peer caches need the reference loop's "
                "model(hidden_states=..., timestep=..., class_labels=...) calls."
            )
        t = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        if self._previous is None or t > self._previous:
            if self._previous is not None and self.step_index + 1 != self.num_steps and not self._warned:
                self._warned = True
                warnings.warn(
                    f"a generation ran {self.step_index + 1} steps but the peer was set up for "
                    f"num_inference_steps={self.num_steps}; step-indexed settings (warm-up, MagCache ratios, "
                    "SmoothCache schedules) are then misaligned.",
                    stacklevel=2,
                )
            self.step_index = 0
            self.generations += 1
            for fn in self.on_generation:
                fn()
        else:
            self.step_index += 1
            if self.step_index >= self.num_steps:
                raise PeerError(
                    f"step {self.step_index + 1} of a generation set up for num_inference_steps="
                    f"{self.num_steps}: pass the number of steps sample() runs to apply_peer()."
                )
        self._previous = t
        self.timestep = t
        for fn in self.before_step:
            fn()

    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        for fn in self.after_step:
            fn()

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[_StepTracker]:
        pre = model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        post = model.register_forward_hook(self._post, with_kwargs=True, always_call=True)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()


_MODULE_DICTS = ("_modules", "_parameters", "_buffers")


@contextmanager
def _restore_modules(model: nn.Module) -> Iterator[None]:
    """On exit, undo every attribute, child, parameter or buffer set on any submodule meanwhile.

    Runs after the library's own removal; it catches what that leaves behind (an instance ``forward``,
    ``_diffusers_hook`` registries, cache-dit's ``_norm1_emb`` child and ``_is_patched`` flag).
    Hook dictionaries are left alone: the peers use none, and a caller's own hooks must survive.
    """
    saved = []
    for module in model.modules():
        attrs = dict(vars(module))
        inner = {key: dict(attrs[key]) for key in _MODULE_DICTS if key in attrs}
        saved.append((module, attrs, inner))
    try:
        yield
    finally:
        cleaned = []
        for module, attrs, inner in saved:
            current = vars(module)
            for key in [k for k in current if k not in attrs]:
                del current[key]
                cleaned.append(f"{type(module).__name__}.{key}")
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
                    cleaned.append(f"{type(module).__name__}.{key}")
            for key, before in inner.items():
                now = current[key]
                if list(now) != list(before) or any(now[k] is not before[k] for k in now):
                    now.clear()
                    now.update(before)
                    cleaned.append(f"{type(module).__name__}.{key}")
        if cleaned:
            logger.debug("restored after peer: %s", sorted(set(cleaned)))


_MISSING = object()


@contextmanager
def _quiet_loggers(prefixes: Sequence[str], level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the named loggers (and their existing children) for the duration."""
    manager = logging.Logger.manager
    names = [
        name
        for name in list(manager.loggerDict)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    ]
    names += [p for p in prefixes if p not in names]
    loggers = [logging.getLogger(name) for name in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, old in zip(loggers, before, strict=True):
            lg.setLevel(old)


# ---------------------------------------------------------------------------------------- diffusers
class _DiffusersHooks:
    """Applies one diffusers cache hook set and drives it from the step tracker."""

    def __init__(self, model: nn.Module, tracker: _StepTracker) -> None:
        self.model = model
        self.tracker = tracker
        self.added: list[tuple[Any, str]] = []  # (registry, hook name), in registration order
        self.managers: list[Any] = []
        self.registries: list[Any] = []
        tracker.on_generation.append(self.reset)
        tracker.before_step.append(self.enter_step)
        tracker.after_step.append(self.exit_step)

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

        context = CacheContext(
            _CONTEXT_NAME,
            step_index=self.tracker.step_index,
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


def _diffusers_config(method: PeerMethod, tracker: _StepTracker, n: int) -> tuple[Callable[..., None], Any]:
    _require(DIFFUSERS)
    hooks = importlib.import_module("diffusers.hooks")
    p = dict(method.params)

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
            config = get("PyramidAttentionBroadcastConfig")(
                **p, current_timestep_callback=tracker.current_timestep
            )
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
            config = get("FasterCacheConfig")(**p, current_timestep_callback=tracker.current_timestep)
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

    tracker = _StepTracker(n)
    with _restore_modules(model), _quiet_loggers(["diffusers.hooks"]), contextlib.ExitStack() as stack:
        hooks = _DiffusersHooks(model, tracker)
        # num_inference_steps far beyond the run: the hook would otherwise print its ratios and clear
        # them at the last step; the tracker resets the state at each new generation instead.
        hooks.install(apply_mag_cache, MagCacheConfig(calibrate=True, num_inference_steps=10**9))
        stack.callback(hooks.uninstall)
        stack.enter_context(tracker.attached(model))
        calibration_run()
        ratios = [float(r) for r in hooks.state().calibration_ratios]
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


def _version_of(library: str) -> str:
    try:
        return importlib.metadata.version(_PACKAGES[library][1])
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


# ---------------------------------------------------------------------------------------- cache-dit
def _cache_dit_enable(
    method: PeerMethod, model: nn.Module, tracker: _StepTracker, n: int, stack: contextlib.ExitStack
) -> None:
    cache_dit = _require(CACHE_DIT)
    from cache_dit.caching.patch_functors import DiTPatchFunctor
    from diffusers import DiTTransformer2DModel

    if not isinstance(model, DiTTransformer2DModel):
        raise PeerError(
            f"the cache-dit peer is wired for diffusers' DiTTransformer2DModel (its DiTPatchFunctor), "
            f"got {type(model).__name__}."
        )
    p = dict(method.params)
    order = p.pop("taylorseer_order", None)
    if method.name.endswith("TaylorSeer") and order is None:
        order = 1
    depth = len(model.transformer_blocks)
    fn, bn = int(p.get("Fn_compute_blocks", 1)), int(p.get("Bn_compute_blocks", 0))
    if fn < 1 or bn < 0 or fn + bn > depth:
        raise PeerError(f"Fn_compute_blocks={fn}, Bn_compute_blocks={bn} do not fit {depth} blocks.")
    try:
        # Fused CFG (one call per step) and a persistent context that refreshes after n steps.
        cache_config = cache_dit.DBCacheConfig(**p, enable_separate_cfg=False, num_inference_steps=n)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=int(order)) if order else None
    except TypeError as exc:
        raise PeerError(f"bad params for cache-dit {method.name}: {exc}") from exc
    pristine = (copy.deepcopy(cache_config), copy.deepcopy(calibrator))
    adapter = cache_dit.BlockAdapter(
        transformer=model,
        blocks=model.transformer_blocks,
        forward_pattern=cache_dit.ForwardPattern.Pattern_3,  # block(hidden_states, ...) -> hidden_states
        patch_functor=DiTPatchFunctor(),  # DiT's forward reads transformer_blocks[0] after the loop
        check_forward_pattern=True,
    )
    # enable_cache returns the normalized adapter, which is what disable_cache expects.
    adapter = cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)
    stack.callback(cache_dit.disable_cache, adapter)

    def refresh() -> None:
        # A fresh context per generation: the step count, cached residuals and Taylor factors restart
        # even when a previous generation stopped early.
        kwargs: dict[str, Any] = {"cache_config": copy.deepcopy(pristine[0])}
        if pristine[1] is not None:
            kwargs["calibrator_config"] = copy.deepcopy(pristine[1])
        cache_dit.refresh_context(model, **kwargs)

    tracker.on_generation.append(refresh)


# ---------------------------------------------------------------------------------------- SmoothCache
def _smoothcache_enable(
    method: PeerMethod, model: nn.Module, tracker: _StepTracker, n: int, stack: contextlib.ExitStack
) -> None:
    smoothcache = _require(SMOOTHCACHE)
    from diffusers.models.attention import BasicTransformerBlock

    schedule = method.params.get("schedule")
    if not isinstance(schedule, Mapping) or not schedule:
        raise PeerError('SmoothCacheHelper needs params["schedule"] = {"attn1": [1, 0, ...], "ff": [...]}.')
    schedule = {str(k): [int(v) for v in plan] for k, plan in schedule.items()}
    for key, plan in schedule.items():
        if len(plan) != n or any(v not in (0, 1) for v in plan) or plan[0] != 1:
            raise PeerError(
                f"SmoothCache plan {key!r} must be {n} values of 0/1 starting with 1 (num_inference_steps={n})."
            )
    components = sorted({k.split("-")[0] for k in schedule})
    block = next((m for m in model.modules() if isinstance(m, BasicTransformerBlock)), None)
    missing = [c for c in components if block is None or getattr(block, c, None) is None]
    if missing:
        raise PeerError(f"SmoothCache schedule names {missing}, which the model's blocks do not have.")
    helper = smoothcache.SmoothCacheHelper(model, BasicTransformerBlock, components, schedule)
    helper.enable()
    stack.callback(helper.disable)
    # The helper counts steps per wrapped call and never resets them itself.
    tracker.on_generation.append(helper.reset_state)
    silencer = _StdoutSilencer()
    tracker.before_step.append(silencer.enter)
    tracker.after_step.append(silencer.exit)


# ---------------------------------------------------------------------------------------- entry point
@contextmanager
def apply_peer(
    method: PeerMethod,
    model: nn.Module,
    *,
    num_inference_steps: int,
    calibration_run: Callable[[], Any] | None = None,
) -> Iterator[None]:
    """Make ``model`` (a ``DiTTransformer2DModel``) cached by a peer method while the block runs.

    Every ``sample(model, ...)`` call inside the block is one independent generation: the peer's state
    is reset when the timestep goes up. On exit (also on an exception) the library's removal runs and
    the model is restored exactly: same ``forward``, no leftover hooks, registries or attributes.

    Args:
        method: from :func:`peer_sweeps`, or built by hand.
        model: the reference DiT (``transformer_blocks`` of diffusers ``BasicTransformerBlock``).
        num_inference_steps: the steps each ``sample()`` call makes; the peers' warm-up, MagCache's
            ratios and SmoothCache's schedule are indexed by step. A generation running longer raises.
        calibration_run: samples once without caching; MagCache with ``calibrate=True`` runs it (once per
            callable, model and step count) to measure its ratios before caching.

    Raises:
        PeerError: the library is missing, the params are wrong, or the loop does not match.
    """
    if not isinstance(method, PeerMethod):
        raise PeerError(f"method must be a PeerMethod, got {type(method).__name__}.")
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    if not isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList):
        raise PeerError(
            f"{type(model).__name__} has no transformer_blocks ModuleList; peers need a diffusers DiT."
        )
    _require(method.library)  # first: loggers created at import time must exist to be quieted
    if method.library == CACHE_DIT:
        importlib.import_module("cache_dit.caching.patch_functors")
    tracker = _StepTracker(n)
    quiet = ["diffusers.hooks", "cache_dit", "CACHE_DIT"]
    with _restore_modules(model), _quiet_loggers(quiet), contextlib.ExitStack() as stack:
        if method.library == DIFFUSERS:
            params = dict(method.params)
            if method.name == "MagCache" and params.get("mag_ratios") is None:
                if not params.get("calibrate", False):
                    raise PeerError("MagCache needs params['mag_ratios'] or params['calibrate']=True.")
                params["mag_ratios"] = _mag_ratios(model, calibration_run, n)
                method = PeerMethod(method.library, method.name, method.knob, params)
            hooks = _DiffusersHooks(model, tracker)
            apply, config = _diffusers_config(method, tracker, n)
            hooks.install(apply, config)
            stack.callback(hooks.uninstall)
        elif method.library == CACHE_DIT:
            _cache_dit_enable(method, model, tracker, n, stack)
        else:
            _smoothcache_enable(method, model, tracker, n, stack)
        stack.enter_context(tracker.attached(model))
        yield
