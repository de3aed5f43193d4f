"""cache-dit's DBCache (Fn/Bn dual block cache), alone, with its TaylorSeer calibrator, or with its
FoCa calibrator (the forecaster cache-dit 1.5 ships next to TaylorSeer).

Enabled through cache-dit's ``BlockAdapter`` with its ``DiTPatchFunctor``, in fused-CFG mode (one
model call per step); a fresh cache context is set at each new generation.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from torch import nn

from stepcache.runtime import StepTracker

from . import CACHE_DIT, PeerError, PeerMethod, _require


def enable(
    method: PeerMethod, model: nn.Module, tracker: StepTracker, n: int, stack: contextlib.ExitStack
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
    foca = method.name.endswith("FoCa")
    depth = len(model.transformer_blocks)
    fn, bn = int(p.get("Fn_compute_blocks", 1)), int(p.get("Bn_compute_blocks", 0))
    if fn < 1 or bn < 0 or fn + bn > depth:
        raise PeerError(f"Fn_compute_blocks={fn}, Bn_compute_blocks={bn} do not fit {depth} blocks.")
    try:
        # Fused CFG (one call per step) and a persistent context that refreshes after n steps.
        cache_config = cache_dit.DBCacheConfig(**p, enable_separate_cfg=False, num_inference_steps=n)
        if foca:  # FoCa (arXiv 2508.16211): BDF2 predictor + Heun corrector on the cached residuals
            calibrator: Any = cache_dit.FoCaCalibratorConfig()
        else:
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
