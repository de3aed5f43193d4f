"""The peers on a diffusers pipeline (``benchmarks/real_models.py``): the methods and sweeps of
:func:`~benchmarks.harness.peers.peer_sweeps`, entered through a pipeline instead of the reference loop.

* diffusers' caches are applied to ``pipe.transformer`` with their ``apply_*`` functions and driven by
  stepcache's step tracker, as on the reference DiT (:mod:`.diffusers_caches`), with three changes for
  pipelines: steps are placed by counting ``scheduler.step`` (stepcache's own ``SchedulerWatch``: no
  host sync to read a GPU timestep), PAB and FasterCache read the step's timestep from the scheduler
  (on its 0-1000 scale, whatever the model receives: Flux gets ``t / 1000``), and TaylorSeer hooks the
  components stepcache caches (its default patterns miss Wan's ``attn1`` / ``attn2`` / ``ffn``);
* cache-dit is entered through its own pipeline door, ``cache_dit.enable_cache(pipe, ...)``, which
  finds the blocks and their forward pattern for the pipelines it supports, and left with
  ``cache_dit.disable_cache(pipe)``;
* dit-smoothcache wraps ``BasicTransformerBlock`` children by name: it is the reference DiT's peer only.

On exit every attribute, child, parameter or buffer a peer added to the transformer is removed again
(:func:`._common.restore_modules`).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from stepcache.discovery import discover
from stepcache.runtime.steps import SchedulerWatch

from . import (
    CACHE_DIT,
    DIFFUSERS,
    SMOOTHCACHE,
    PeerError,
    PeerMethod,
    _check_positive_int,
    _require,
    peer_sweeps,
)

__all__ = ["apply_to_pipeline", "pipeline_sweeps", "taylorseer_targets"]

_QUIET = ["diffusers.hooks", "cache_dit", "CACHE_DIT", "stepcache.runtime"]


def taylorseer_targets(model: Any) -> list[str]:
    """Patterns (``re.fullmatch``) naming the components stepcache caches, one per stack and child:
    ``transformer_blocks\\.\\d+\\.attn``, ``blocks\\.\\d+\\.ffn`` and so on."""
    out = {rf"{re.escape(c.stack)}\.\d+\.{re.escape(c.child)}" for c in discover(model) if c.child}
    return sorted(out)


def pipeline_sweeps(pipe: Any, num_inference_steps: int) -> list[PeerMethod]:
    """:func:`peer_sweeps` for ``pipe``'s transformer: the diffusers and cache-dit methods (depth from
    its discovered blocks), TaylorSeer on the components stepcache caches."""
    model = pipe.transformer
    depth = len({c.block for c in discover(model)})
    targets = taylorseer_targets(model)
    out = []
    for pm in peer_sweeps(num_inference_steps, depth):
        if pm.library == SMOOTHCACHE:
            continue
        if pm.name == "TaylorSeer":
            pm = PeerMethod(pm.library, pm.name, pm.knob, {**pm.params, "cache_identifiers": targets})
        out.append(pm)
    return out


@contextmanager
def apply_to_pipeline(
    method: PeerMethod,
    pipe: Any,
    *,
    num_inference_steps: int,
    calibration_run: Callable[[], Any] | None = None,
) -> Iterator[None]:
    """Make ``pipe`` cached by a peer method while the block runs; every ``pipe(...)`` call inside is
    an independent generation of ``num_inference_steps`` steps. On exit the transformer is restored.

    ``calibration_run`` (MagCache with ``calibrate=True``): one uncached generation with the same
    step count, run once before caching to measure the magnitude ratios.
    """
    if not isinstance(method, PeerMethod):
        raise PeerError(f"method must be a PeerMethod, got {type(method).__name__}.")
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    if method.library == SMOOTHCACHE:
        raise PeerError(
            "dit-smoothcache wraps BasicTransformerBlock children by name: it runs on the reference DiT only."
        )
    model = pipe.transformer
    _require(method.library)
    if method.library == CACHE_DIT:
        import importlib

        importlib.import_module("cache_dit.caching.patch_functors")
    from . import diffusers_caches
    from ._common import peer_errors, quiet_loggers, restore_modules, step_tracker

    with restore_modules(model), quiet_loggers(_QUIET), contextlib.ExitStack() as stack:
        if method.library == DIFFUSERS:
            tracker, tracking = step_tracker(model, n)
            watch = SchedulerWatch(pipe, lambda: None)  # steps counted on the host, as stepcache does
            watch.install()
            stack.callback(watch.remove)
            tracker.boundary, tracker.position = watch.new_generation, watch.position

            def timestep() -> float:  # PAB / FasterCache only: they compare it on the host
                return float(pipe.scheduler.timesteps[max(tracker.step, 0)])

            diffusers_caches.enable(
                method, model, tracker, n, stack, calibration_run=calibration_run, timestep=timestep
            )
            stack.enter_context(tracking)
        else:
            _enable_cache_dit(method, pipe, n, stack)
        with peer_errors(n):
            yield


def _enable_cache_dit(method: PeerMethod, pipe: Any, n: int, stack: contextlib.ExitStack) -> None:
    cache_dit = _require(CACHE_DIT)
    p = dict(method.params)
    order = p.pop("taylorseer_order", None)
    if method.name.endswith("TaylorSeer") and order is None:
        order = 1
    try:
        config = cache_dit.DBCacheConfig(**p, num_inference_steps=n)
        if method.name.endswith("FoCa"):
            calibrator: Any = cache_dit.FoCaCalibratorConfig()
        else:
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=int(order)) if order else None
    except TypeError as exc:
        raise PeerError(f"bad params for cache-dit {method.name}: {exc}") from exc
    kwargs: dict[str, Any] = {"cache_config": copy.deepcopy(config)}
    if calibrator is not None:
        kwargs["calibrator_config"] = copy.deepcopy(calibrator)
    cache_dit.enable_cache(pipe, **kwargs)
    stack.callback(cache_dit.disable_cache, pipe)
