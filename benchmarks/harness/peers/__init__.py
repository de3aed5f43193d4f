"""Other caching libraries ("peers") run on the reference DiT, for side-by-side benchmarks.

Three libraries are covered, each through its own public entry points, one module each:

* :mod:`.diffusers_caches`: diffusers' built-in cache hooks (``diffusers.hooks.apply_*``):
  FirstBlockCache, TaylorSeer, Pyramid Attention Broadcast, FasterCache and MagCache;
* :mod:`.cache_dit`: cache-dit's DBCache (Fn/Bn dual block cache), with and without its TaylorSeer
  calibrator;
* :mod:`.smoothcache`: dit-smoothcache's ``SmoothCacheHelper`` (the original SmoothCache runtime)
  with a given schedule.

This module holds what is common to them: :class:`PeerMethod`, :class:`PeerError`, which peers are
installed, their sweeps (:func:`peer_sweeps`), the entry point :func:`apply_peer` and the compute
counter :func:`count_component_calls`.

None of them fits the reference loop out of the box: ``DiTTransformer2DModel`` is not a diffusers
``CacheMixin`` (no ``enable_cache`` / ``cache_context``), and the reference ``sample()`` is a bare loop, not
a pipeline whose ``__call__`` the libraries could use to notice a new generation. So :func:`apply_peer`
drives the peer from stepcache's own step tracker (:class:`stepcache.runtime.StepTracker`, attached with
:func:`stepcache.runtime.track_steps`: the same reading of timesteps as stepcache's cache), which

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
import importlib
import importlib.metadata
import io
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    "unsupported_peers",
]

DIFFUSERS = "diffusers"
CACHE_DIT = "cache-dit"
SMOOTHCACHE = "dit-smoothcache"
LIBRARIES = (DIFFUSERS, CACHE_DIT, SMOOTHCACHE)
INSTALL_HINT = "pip install -r benchmarks/requirements.txt"

# library -> (import name, distribution name)
_PACKAGES = {
    DIFFUSERS: ("diffusers", "diffusers"),
    CACHE_DIT: ("cache_dit", "cache-dit"),
    SMOOTHCACHE: ("SmoothCache", "dit-smoothcache"),
}
_METHODS = {
    DIFFUSERS: ("FirstBlockCache", "TaylorSeer", "PAB", "FasterCache", "MagCache"),
    CACHE_DIT: ("DBCache", "DBCache+TaylorSeer", "DBCache+FoCa"),
    SMOOTHCACHE: ("SmoothCacheHelper",),
}
# TaylorSeer caches these outputs. Its default patterns ("^transformer_blocks.*attn") must match the
# whole module name, so they never match diffusers' "transformer_blocks.<i>.attn1" and would hook nothing.
_TAYLORSEER_TARGETS = (r"transformer_blocks\.\d+\.(attn1|ff)",)


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
            f"{library} is not installed or fails to import ({exc}); install the benchmark peers: {INSTALL_HINT}"
        ) from exc


def available_peers() -> dict[str, str | None]:
    """Library -> installed version, or ``None`` where it cannot be imported.

    The bench reports a missing library as skipped (with :data:`INSTALL_HINT`) instead of failing, since
    the peers are not dependencies of stepcache.
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
def peer_sweeps(num_inference_steps: int, depth: int) -> list[PeerMethod]:
    """Every peer method with a sweep of its main knob.

    The settings were measured on the reference model (6 layers, DDIM 50 and DPM-Solver++ 20) to spread
    each method's compute fraction over roughly 0.25..0.8 where the method can reach it: PAB and
    FasterCache only reuse attention, so their fraction stays above ~0.5. Warm-up lengths scale with
    ``num_inference_steps``; cache-dit's Fn/Bn split needs ``depth`` (the number of transformer blocks).
    Thresholds of the adaptive methods (FirstBlockCache, MagCache, DBCache) are not rescaled: with fewer
    steps the features change more per step, so on DPM-Solver++ 20 their lowest thresholds compute
    (almost) every step and the whole sweep sits higher (about 0.3..1.0).

    dit-smoothcache has no sweep here: it runs stepcache's SmoothCache schedules (built by the suite,
    see ``quality.peer_methods``), so the two runtimes can be compared on the same plans.
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
    tsr = [(i, w, 1) for i, w in ((2, max(3, round(0.4 * n))), (2, 3), (3, 3), (4, 3), (5, 3))]
    tsr += [(i, 3, 2) for i in (3, 4)]  # second order (two finite differences), as TaylorSeer allows
    for interval, warm, order in tsr:
        knob = (
            f"interval={interval}"
            + (f", warm-up={warm}" if warm != 3 else "")
            + (", order 2" if order == 2 else "")
        )
        out.append(taylorseer(interval, warm, order, knob=knob))

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
    fn, bn = splits[0]
    for threshold in (0.06, 0.12, 0.25, 0.5):  # FoCa on the first split only: the sweep stays short
        params = {
            "Fn_compute_blocks": fn,
            "Bn_compute_blocks": bn,
            "residual_diff_threshold": threshold,
            "max_warmup_steps": warmup,
            "max_continuous_cached_steps": -1,
        }
        out.append(PeerMethod(CACHE_DIT, "DBCache+FoCa", f"F{fn}B{bn}, threshold={threshold:g}", params))

    return out


def taylorseer(
    interval: int, warm: int, order: int = 1, *, knob: str | None = None, cooldown: int | None = None
) -> PeerMethod:
    """diffusers TaylorSeer computing every ``interval``-th step after ``warm`` full steps (and every step
    from ``cooldown`` on, its ``disable_cache_after_step``), on the attention and feed-forward outputs
    (float32 Taylor factors, as the reference model runs)."""
    params: dict[str, Any] = {
        "cache_interval": interval,
        "max_order": order,
        "disable_cache_before_step": warm,
        "taylor_factors_dtype": "float32",
        "cache_identifiers": list(_TAYLORSEER_TARGETS),
    }
    if cooldown is not None:
        params["disable_cache_after_step"] = cooldown
    return PeerMethod(DIFFUSERS, "TaylorSeer", knob or f"interval={interval}, warm-up={warm}", params)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeerError(f"{name} must be a positive integer, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------- counting
def _first_linear(module: nn.Module) -> nn.Linear | None:
    return next((m for m in module.modules() if isinstance(m, nn.Linear)), None)


@contextmanager
def count_component_calls(
    model: nn.Module, components: Iterable[Any] | None = None
) -> Iterator[Callable[[], dict[str, Any]]]:
    """Count attention (``attn1``/``attn2``) and feed-forward (``ff``) computations that really ran.

    Wrapper-level counts would be wrong: diffusers' hook registry, cache-dit and SmoothCache replace
    module forwards, and a torch hook on the attention or feed-forward module itself also fires when a
    cache returns a stored output. A hook on a leaf inside the component (the attention's ``to_q``, the
    feed-forward's first ``Linear``) fires only when the component is computed. Model calls are counted
    with a pre-hook on the model, which runs whatever replaced its ``forward``.

    Computations are weighted by the rows (batch items) they ran on, relative to the largest batch a
    model call had: a method that runs the model or a component on one guidance half of a batched
    classifier-free-guidance call (FasterCache's CFG cache, stepcache's guidance reuse) is charged half
    a computation there, which is the compute it really spent.

    ``components`` (stepcache's discovered :class:`~stepcache.discovery.Component` s, for any
    diffusers transformer) replaces the ``attn1``/``attn2``/``ff`` children: each is counted by its
    ``to_q`` or else the first ``Linear`` strictly inside it, per component type. A component that
    is itself a ``Linear`` (Flux's single-block ``proj_mlp``) has no leaf inside: a hook on it would
    also fire when a cache returns its stored output, so it is left out of the count (listed
    under ``"left_out"``).

    Yields:
        A function returning ``{"attn", "ff", "executed", "model_calls", "components",
        "total_possible", "fraction"}`` (the types found instead of ``attn`` / ``ff`` with
        ``components``); ``fraction = executed / (model_calls * components)``, i.e.
        executed / (layers * 2 * steps) on the reference DiT (``executed`` in full-batch units).
    """
    kinds: dict[str, float] = {"attn": 0, "ff": 0}
    counts: dict[str, float] = {"model_calls": 0}
    rows = {"max": 0}  # the largest batch a model call had: one full computation
    leaves: list[tuple[str, nn.Module]] = []
    left_out: list[str] = []
    if components is not None:
        kinds = {}
        for comp in components:
            leaf = getattr(comp.module, "to_q", None)
            if not isinstance(leaf, nn.Module):
                leaf = next(
                    (m for m in comp.module.modules() if m is not comp.module and isinstance(m, nn.Linear)),
                    None,
                )
            if leaf is None:
                left_out.append(comp.name)
                continue
            kinds[comp.type] = 0
            leaves.append((comp.type, leaf))
    else:
        for name, module in model.named_modules():
            child = name.rsplit(".", 1)[-1]
            if module is None or child not in ("attn1", "attn2", "ff"):
                continue
            leaf = getattr(module, "to_q", None) if child != "ff" else None
            leaf = leaf if isinstance(leaf, nn.Module) else _first_linear(module)
            if leaf is None:
                raise PeerError(f"{name} has no Linear layer to count its computations with.")
            leaves.append(("ff" if child == "ff" else "attn", leaf))
    counts.update(kinds)
    if not leaves:
        raise PeerError(
            f"{type(model).__name__} has no attn1/attn2/ff components (diffusers BasicTransformerBlock "
            "children); count_component_calls cannot measure it."
        )

    def batch_of(args: tuple, kwargs: dict | None = None) -> int:
        first = next((a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    def counter(kind: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, _out: Any) -> None:
            counts[kind] += batch_of(args)

        return hook

    def model_call(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        counts["model_calls"] += 1
        rows["max"] = max(rows["max"], batch_of(args, kwargs))

    handles = [leaf.register_forward_hook(counter(kind)) for kind, leaf in leaves]
    handles.append(model.register_forward_pre_hook(model_call, with_kwargs=True))

    def read() -> dict[str, Any]:
        total = counts["model_calls"] * len(leaves)
        unit = max(rows["max"], 1)
        executed = sum(counts[k] for k in kinds) / unit
        return {
            **{k: counts[k] / unit for k in kinds},
            **({"left_out": list(left_out)} if left_out else {}),
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


def _version_of(library: str) -> str:
    try:
        return importlib.metadata.version(_PACKAGES[library][1])
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


# ---------------------------------------------------------------------------------------- entry point
def calibrate_mag_ratios(
    model: nn.Module, calibration_run: Callable[[], Any], num_inference_steps: int
) -> list[float]:
    """MagCache's per-step magnitude ratios for ``model`` (see :mod:`.diffusers_caches`)."""
    from . import diffusers_caches

    return diffusers_caches.calibrate_mag_ratios(model, calibration_run, num_inference_steps)


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
    from . import cache_dit, diffusers_caches, smoothcache
    from ._common import peer_errors, quiet_loggers, restore_modules, step_tracker

    tracker, tracking = step_tracker(model, n)
    # stepcache's tracker logs a short generation too; the peer's own warning (once) says more.
    quiet = ["diffusers.hooks", "cache_dit", "CACHE_DIT", "stepcache.runtime"]
    with restore_modules(model), quiet_loggers(quiet), contextlib.ExitStack() as stack:
        if method.library == DIFFUSERS:
            diffusers_caches.enable(method, model, tracker, n, stack, calibration_run=calibration_run)
        elif method.library == CACHE_DIT:
            cache_dit.enable(method, model, tracker, n, stack)
        else:
            smoothcache.enable(method, model, tracker, n, stack)
        stack.enter_context(tracking)
        with peer_errors(n):
            yield
