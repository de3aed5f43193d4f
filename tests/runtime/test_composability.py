"""Composability: another library's cache on the same model is refused (with an opt-in to stack),
and a schedule whose model changed since calibration (weights, dtype, adapters) gets a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

import stepcache
from stepcache import Schedule, StepCacheError, StepCacheWarning
from stepcache.policies import from_calibration

N = 6
PLAN = (1, 0, 1, 0, 1, 1)


def sched():
    return Schedule(N, {"attn": PLAN, "ff": PLAN})


def test_a_diffusers_cache_hook_is_refused_unless_stacking_is_asked(tiny_pipe):
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    model = tiny_pipe.transformer
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.1))
    try:
        with pytest.raises(StepCacheError, match=r"another cache is active.*fbc"):
            stepcache.cache(tiny_pipe, sched())
        with pytest.raises(StepCacheError, match="another cache is active"):
            stepcache.calibrate(
                tiny_pipe, inputs=[{"class_labels": [1]}], num_inference_steps=N, progress=False
            )
        stepcache.cache(tiny_pipe, sched(), allow_other_caches=True).close()
    finally:
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("fbc_leader_block_hook")
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("fbc_block_hook")
    stepcache.cache(tiny_pipe, sched()).close()  # gone: accepted again


def test_cache_dit_is_refused(tiny_pipe):
    model = tiny_pipe.transformer
    model._is_cached = True  # what cache-dit's enable_cache sets on the transformer while active
    try:
        with pytest.raises(StepCacheError, match="cache-dit"):
            stepcache.cache(tiny_pipe, sched())
    finally:
        del model._is_cached


def test_changed_weights_or_dtype_since_calibration_warn(tiny_pipe):
    cal = stepcache.calibrate(
        tiny_pipe, inputs=[{"class_labels": [1]}], num_inference_steps=N, progress=False
    )
    assert cal.meta["dtype"] == "float32" and cal.meta["weights_digest"]
    schedule = from_calibration(cal, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged model: not a word
        stepcache.cache(tiny_pipe, schedule).close()
    linear = tiny_pipe.transformer.transformer_blocks[0].ff.net[2]
    with torch.no_grad():
        linear.weight += 0.01  # what fusing a LoRA does
    with pytest.warns(StepCacheWarning, match="weights_digest"):
        stepcache.cache(tiny_pipe, schedule).close()
    tiny_pipe.transformer.to(torch.float64)
    with pytest.warns(StepCacheWarning, match="dtype float32 -> float64"):
        stepcache.cache(tiny_pipe, schedule).close()
