"""The public API's shape: one way to enable, handles that open on `with`, one error family,
one version, the stepcache logger namespace, summary()."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import inspect
import logging

import pytest
import torch

import stepcache
from stepcache import CacheConfig, CacheHandle, Schedule, SmoothCacheConfig, StepCacheError, errors
from tests._helpers.model_state import model_state
from tests._helpers.plain_models import sample

N = 10
PLAN = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)


def sched():
    return Schedule(N, {"attn": PLAN, "ff": PLAN})


def test_a_handle_built_directly_caches_inside_with(plain_dit):
    y = torch.tensor([2, 5])
    with stepcache.cache(plain_dit, sched()) as via_cache:
        expected = sample(plain_dit, y, N)
    before = model_state(plain_dit)
    handle = CacheHandle(plain_dit, sched())
    assert not handle.active  # validated, nothing installed yet
    with handle:
        assert handle.active
        got = sample(plain_dit, y, N)
    assert torch.equal(got, expected) and handle.stats.reused == via_cache.stats.reused > 0
    assert not handle.active and model_state(plain_dit) == before


def test_one_way_to_enable_with_typed_keyword_options():
    assert not hasattr(stepcache, "enable")
    params = inspect.signature(stepcache.cache).parameters
    assert all(p.kind is not p.VAR_KEYWORD for p in params.values())
    assert list(params)[:3] == ["target", "schedule", "config"]
    assert all(
        p.kind is p.KEYWORD_ONLY for name, p in params.items() if name not in ("target", "schedule", "config")
    )


def test_every_option_is_reachable_from_both_doors():
    """stepcache.cache's keywords, CacheConfig's fields and SmoothCacheConfig's (the same plus the
    schedule) are one set of options: an option added to one door and not the other fails here."""
    options = {f.name for f in dataclasses.fields(CacheConfig)}
    keywords = {
        name for name, p in inspect.signature(stepcache.cache).parameters.items() if p.kind is p.KEYWORD_ONLY
    }
    assert keywords == options
    assert issubclass(SmoothCacheConfig, CacheConfig)
    assert {f.name for f in dataclasses.fields(SmoothCacheConfig)} == options | {"schedule"}
    # The runtime's own door and the handle take the config whole.
    runtime_params = inspect.signature(stepcache.runtime.cache).parameters
    assert list(runtime_params) == ["target", "schedule", "config", "options"]
    assert list(inspect.signature(CacheHandle).parameters) == ["target", "schedule", "config", "installer"]


def test_keyword_options_win_over_the_config(plain_dit):
    base = CacheConfig(count_macs=True, on_length_mismatch="resample")
    with stepcache.cache(plain_dit, sched(), base, on_length_mismatch="error") as handle:
        assert handle.config == CacheConfig(count_macs=True)
    with stepcache.cache(plain_dit, sched(), base) as handle:
        assert handle.config is base
    with stepcache.cache(plain_dit, sched(), strict=False) as handle:
        assert handle.config == CacheConfig(strict=False)
    with stepcache.cache(plain_dit, sched(), SmoothCacheConfig(sched(), count_macs=True)) as handle:
        assert handle.config.count_macs
    with pytest.raises(StepCacheError, match="offload_lead"):
        stepcache.cache(plain_dit, sched(), CacheConfig(offload=True, offload_lead=2), offload=False)
    with pytest.raises(StepCacheError, match="config must be a stepcache"):
        stepcache.cache(plain_dit, sched(), {"strict": False})


def test_options_are_checked_once_in_the_config(plain_dit, tmp_path):
    for bad, match in (
        ({"offload": 1}, "offload must be True or False"),
        ({"offload_lead": 2}, "offload_lead is the prefetch distance"),
        ({"offload": True, "offload_lead": 0}, "offload_lead must be a positive"),
        ({"on_length_mismatch": "stretch"}, "on_length_mismatch must be"),
        ({"types": "attn"}, "types must be a list"),
        ({"storage_dtype": "int4"}, "storage_dtype must be"),
        ({"guidance": 3}, "guidance must be a stepcache"),
    ):
        for make in (
            CacheConfig,
            functools.partial(SmoothCacheConfig, sched()),
            functools.partial(stepcache.cache, plain_dit, sched()),
        ):
            with pytest.raises(StepCacheError, match=match):
                make(**bad)
    with pytest.raises(StepCacheError, match="CacheConfig takes the guidance plan itself"):
        CacheConfig(guidance=str(tmp_path / "plan.json"))  # the doors read files, the config takes values
    assert CacheConfig(types=["attn"]).types == ("attn",)
    with pytest.raises(stepcache.ScheduleError, match="CacheHandle takes a stepcache"):
        CacheHandle(plain_dit, str(tmp_path))
    with pytest.raises(stepcache.ScheduleError, match="schedule must be a stepcache"):
        stepcache.cache(plain_dit, 3)


def test_every_error_is_a_stepcache_error():
    for name in errors.__all__:
        kind = getattr(errors, name)
        assert issubclass(kind, StepCacheError) or issubclass(kind, Warning), name
    assert issubclass(StepCacheError, ValueError)


def test_one_version_source():
    assert stepcache.__version__ == importlib.metadata.version("stepcache")


def test_summary_from_the_pipeline_active_then_last(plain_dit):
    with pytest.raises(StepCacheError, match="no stepcache cache has run"):
        stepcache.summary(plain_dit)
    handle = stepcache.cache(plain_dit, sched())
    sample(plain_dit, torch.tensor([1]), N)
    live = stepcache.summary(plain_dit)
    assert live.reused > 0 and live.as_dict() == handle.stats.as_dict()
    stepcache.disable(plain_dit)
    assert stepcache.summary(plain_dit).as_dict() == live.as_dict()


def test_logs_under_the_stepcache_namespace_and_follow_diffusers(monkeypatch):
    from stepcache import _logging

    root = logging.getLogger("stepcache")
    monkeypatch.setattr(_logging, "_explicit", False)
    monkeypatch.setattr(root, "level", root.level)
    diffusers_logging = pytest.importorskip("diffusers.utils.logging")
    old = diffusers_logging.get_verbosity()
    try:
        diffusers_logging.set_verbosity_info()
        _logging.follow_diffusers()
        assert logging.getLogger("stepcache.runtime.cache").getEffectiveLevel() == logging.INFO
        stepcache.set_verbosity("error")  # an explicit choice wins from then on
        diffusers_logging.set_verbosity_debug()
        _logging.follow_diffusers()
        assert logging.getLogger("stepcache.calibration").getEffectiveLevel() == logging.ERROR
    finally:
        diffusers_logging.set_verbosity(old)
    with pytest.raises(StepCacheError, match="unknown log level"):
        stepcache.set_verbosity("loud")


def test_cache_finds_a_schedule_saved_next_to_the_model(plain_dit, tmp_path):
    y = torch.tensor([3])
    with stepcache.cache(plain_dit, sched()):
        expected = sample(plain_dit, y, N)
    folder = tmp_path / "my-model"
    sched().save_pretrained(folder)
    for spec in (folder, str(folder), str(folder / "stepcache_schedule.json")):
        with stepcache.cache(plain_dit, spec) as handle:
            assert torch.equal(sample(plain_dit, y, N), expected)
        assert handle.schedule == sched()
    with pytest.raises(stepcache.ScheduleError, match=r"stepcache_schedule\.json"):
        stepcache.cache(plain_dit, tmp_path)
