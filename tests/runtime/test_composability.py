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


@pytest.mark.parametrize("change", ["swap-blocks", "permute-rows", "permute-columns"])
def test_the_weights_digest_depends_on_order(tiny_pipe, change):
    """Swapped blocks or permuted rows kept every sum the digest was made of (issue 24)."""
    from stepcache.runtime.introspect import weights_state

    model = tiny_pipe.transformer
    before = weights_state(tiny_pipe)["weights_digest"]
    with torch.no_grad():
        if change == "swap-blocks":
            a, b = model.transformer_blocks[0], model.transformer_blocks[1]
            model.transformer_blocks[0], model.transformer_blocks[1] = b, a
        else:
            weight = model.transformer_blocks[0].ff.net[2].weight
            order = torch.arange(weight.shape[0 if change == "permute-rows" else 1]).flip(0)
            weight.copy_(weight[order] if change == "permute-rows" else weight[:, order])
    assert weights_state(tiny_pipe)["weights_digest"] != before


def test_digests_recorded_before_the_order_aware_one_still_compare(tiny_pipe):
    """Files written before record the order-blind digest: compared by that rule, no false warning."""
    from stepcache.runtime.introspect import weights_state

    cal = stepcache.calibrate(
        tiny_pipe, inputs=[{"class_labels": [1]}], num_inference_steps=N, progress=False
    )
    schedule = from_calibration(cal, 0.2)
    old = weights_state(tiny_pipe, digest_version=1)["weights_digest"]
    assert old != cal.meta["weights_digest"]
    legacy = Schedule(
        schedule.num_steps, schedule.plans, schedule.counts, {**schedule.meta, "weights_digest": old}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stepcache.cache(tiny_pipe, legacy).close()
    with torch.no_grad():
        tiny_pipe.transformer.transformer_blocks[0].ff.net[2].weight += 0.01
    with pytest.warns(StepCacheWarning, match="weights_digest"):
        stepcache.cache(tiny_pipe, legacy).close()
