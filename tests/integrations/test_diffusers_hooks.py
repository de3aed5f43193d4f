"""The diffusers-native front door: apply_smoothcache / remove_smoothcache through HookRegistry."""

from __future__ import annotations

import pytest
import torch

import stepcache
from stepcache import Schedule, SmoothCacheConfig, StepCacheError, apply_smoothcache, remove_smoothcache
from tests._helpers.model_state import model_state
from tests._helpers.plain_models import sample

pytest.importorskip("diffusers")
from diffusers.hooks import HookRegistry

from tests._helpers.dit_runs import generate

N = 10
PLAN = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)


def schedule(forecast=False):
    sched = Schedule(N, {"attn": PLAN, "ff": PLAN})
    return sched.with_forecast() if forecast else sched


@pytest.mark.parametrize("forecast", [False, True])
def test_bit_identical_to_cache_and_listed_in_the_hook_registry(tiny_pipe, forecast):
    model = tiny_pipe.transformer
    before = model_state(model)
    uncached = generate(tiny_pipe)
    with stepcache.cache(tiny_pipe, schedule(forecast)) as handle:
        expected = [generate(tiny_pipe), generate(tiny_pipe, seed=1)]
    assert model_state(model) == before

    hook_handle = apply_smoothcache(model, SmoothCacheConfig(schedule(forecast)))
    try:
        assert model._diffusers_hook.get_hook("stepcache_steps") is not None
        block = model.transformer_blocks[0]
        for child in ("attn1", "ff"):
            assert getattr(block, child)._diffusers_hook.get_hook("stepcache_cache") is not None
        got = [generate(tiny_pipe), generate(tiny_pipe, seed=1)]
        assert stepcache.summary(model).as_dict() == hook_handle.stats.as_dict()
    finally:
        remove_smoothcache(model)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not torch.equal(got[0], uncached)  # the schedule really reused something
    assert hook_handle.stats.as_dict() == handle.stats.as_dict()
    # removed exactly: no hooks, no instance forward, no registry attribute left behind
    assert model_state(model) == before
    assert torch.equal(generate(tiny_pipe), uncached)
    assert stepcache.summary(tiny_pipe).reused == handle.stats.reused  # the last cache's stats


def test_stacks_with_other_diffusers_hooks_in_registration_order(tiny_pipe):
    from diffusers.hooks import ModelHook

    class Scale(ModelHook):
        def post_forward(self, module, output):
            return output  # a pass-through hook: only its position in the chain matters here

    model = tiny_pipe.transformer
    expected_cached = None
    with stepcache.cache(tiny_pipe, schedule()):
        expected_cached = generate(tiny_pipe)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(Scale(), "user_hook")
    apply_smoothcache(model, SmoothCacheConfig(schedule()))
    assert model._diffusers_hook._hook_order == ["user_hook", "stepcache_steps"]
    assert torch.equal(generate(tiny_pipe), expected_cached)
    remove_smoothcache(model)
    assert model._diffusers_hook._hook_order == ["user_hook"]  # the user's hook stays
    registry.remove_hook("user_hook")
    assert torch.equal(generate(tiny_pipe), generate(tiny_pipe))


def test_reset_stateful_hooks_starts_a_fresh_generation(tiny_pipe):
    model = tiny_pipe.transformer
    apply_smoothcache(model, SmoothCacheConfig(schedule()))
    try:
        first = generate(tiny_pipe)
        model._diffusers_hook.reset_stateful_hooks()  # what diffusers pipelines call between runs
        assert torch.equal(generate(tiny_pipe), first)
    finally:
        remove_smoothcache(model)


def test_plain_module_takes_the_torch_path(plain_dit):
    y = torch.tensor([0, 3])
    with stepcache.cache(plain_dit, schedule()):
        expected = sample(plain_dit, y, N, guidance=2.0)
    before = model_state(plain_dit)
    handle = apply_smoothcache(plain_dit, SmoothCacheConfig(schedule()))
    assert not hasattr(plain_dit, "_diffusers_hook")
    assert torch.equal(sample(plain_dit, y, N, guidance=2.0), expected)
    remove_smoothcache(plain_dit)
    assert not handle.active and model_state(plain_dit) == before
    remove_smoothcache(plain_dit)  # a no-op when nothing is active


def test_config_and_arguments_are_checked(tiny_pipe, tmp_path):
    with pytest.raises(StepCacheError, match="on_length_mismatch"):
        SmoothCacheConfig(schedule(), on_length_mismatch="stretch")
    with pytest.raises(StepCacheError, match="types must be a list"):
        SmoothCacheConfig(schedule(), types="attn")
    with pytest.raises(StepCacheError, match="transformer module"):
        apply_smoothcache(tiny_pipe, SmoothCacheConfig(schedule()))
    with pytest.raises(StepCacheError, match="SmoothCacheConfig"):
        apply_smoothcache(tiny_pipe.transformer, {"schedule": schedule()})
    path = schedule().save(tmp_path / "s.json")
    assert SmoothCacheConfig(str(path)).schedule == schedule()
    before = model_state(tiny_pipe.transformer)
    apply_smoothcache(tiny_pipe.transformer, SmoothCacheConfig(schedule()))
    with pytest.raises(StepCacheError, match="already has an active"):
        apply_smoothcache(tiny_pipe.transformer, SmoothCacheConfig(schedule()))
    remove_smoothcache(tiny_pipe.transformer)
    assert model_state(tiny_pipe.transformer) == before


def test_a_guidance_plan_file_through_either_door(plain_dit, tmp_path):
    """SmoothCacheConfig has every option of stepcache.cache: here a guidance plan, read from its file."""
    from stepcache.guidance import GuidanceReuse

    plan = GuidanceReuse(N, {"ff": tuple(s % 3 == 2 for s in range(N))}, layout="cond-first")
    path = plan.save(tmp_path / "guidance.json")
    full = Schedule(N, {"attn": (1,) * N, "ff": (1,) * N})
    y = torch.tensor([0, 3])
    with stepcache.cache(plain_dit, full, guidance=str(path)) as via_cache:
        expected = sample(plain_dit, y, N, guidance=2.0)
    config = SmoothCacheConfig(full, guidance=path, allow_other_caches=True)
    assert config.guidance == plan
    handle = apply_smoothcache(plain_dit, config)
    assert torch.equal(sample(plain_dit, y, N, guidance=2.0), expected)
    assert handle.stats.halved == via_cache.stats.halved > 0
    remove_smoothcache(plain_dit)


def test_resampling_through_apply_smoothcache_is_bit_identical_to_cache(tiny_pipe):
    """Before, apply_smoothcache on the transformer could not see the pipeline's step count and ran the
    first 7 entries of the 10-step plan (issue 24); now it finds the calling pipeline."""
    model = tiny_pipe.transformer
    with stepcache.cache(tiny_pipe, schedule(), on_length_mismatch="resample") as handle:
        expected = [generate(tiny_pipe, steps=7), generate(tiny_pipe, steps=N)]
    hook_handle = apply_smoothcache(model, SmoothCacheConfig(schedule(), on_length_mismatch="resample"))
    try:
        got = [generate(tiny_pipe, steps=7)]
        assert hook_handle.running_schedule.num_steps == 7
        got.append(generate(tiny_pipe, steps=N))
        assert hook_handle.running_schedule.num_steps == N
    finally:
        remove_smoothcache(model)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert hook_handle.stats.as_dict() == handle.stats.as_dict()
    # error mode: the pipeline's other step count is a clear error at once, as with cache()
    hook_handle = apply_smoothcache(model, SmoothCacheConfig(schedule()))
    try:
        with pytest.raises(stepcache.ScheduleLengthError, match="set up for 7"):
            generate(tiny_pipe, steps=7)
    finally:
        remove_smoothcache(model)
