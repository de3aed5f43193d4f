"""Sync-free step tracking: a denoiser call whose timestep lives on a device is placed by the
pipeline's host-side count of ``scheduler.step`` calls, never by reading the tensor (which would
wait for the GPU on every call). There is no GPU here, so the tests make every timestep tensor
count as a device tensor and make reading one fail: the runs must equal ordinary runs exactly."""

from __future__ import annotations

import pytest
import torch

import stepcache
from stepcache import Schedule
from stepcache.policies import from_calibration
from stepcache.runtime import session as session_module
from stepcache.runtime import steps as steps_module
from tests._helpers.dit_runs import generate
from tests._helpers.pipelines import CASES

PLAN = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)


def unread(value):
    raise AssertionError("a device timestep was read (a host sync on a GPU)")


@pytest.fixture
def as_if_on_gpu(monkeypatch):
    def pretend():
        monkeypatch.setattr(session_module, "on_device", lambda v: isinstance(v, torch.Tensor))
        monkeypatch.setattr(steps_module, "read_timestep", unread)

    return pretend


def stats(handle):
    s = handle.stats
    return {k: (v.computed, v.reused, v.peak_stored_bytes) for k, v in s.by_type.items()}, s.generations


def test_dit_pipeline_is_placed_by_the_scheduler_count(tiny_pipe, as_if_on_gpu):
    schedule = Schedule(len(PLAN), {"attn": PLAN, "ff": PLAN})
    with stepcache.cache(tiny_pipe, schedule) as read:
        expected = [generate(tiny_pipe), generate(tiny_pipe, seed=1, steps=len(PLAN))]
    as_if_on_gpu()
    with stepcache.cache(tiny_pipe, schedule) as counted:
        got = [generate(tiny_pipe), generate(tiny_pipe, seed=1, steps=len(PLAN))]
        assert counted.tracker.timestep is None  # never read
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert stats(counted) == stats(read)
    assert "step" not in vars(tiny_pipe.scheduler)  # the step counter is removed exactly


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("wan", "flux_true_cfg")], ids=lambda c: c.name
)
def test_split_guidance_branches_by_the_count(case, as_if_on_gpu):
    """Two transformer calls per scheduler step: the second is the step's other branch."""
    pipe = case.build()
    names = {c.type for c in stepcache.discover(pipe)}
    plan = (1, 0, 1, 1)
    schedule = Schedule(len(plan), dict.fromkeys(names, plan))
    with stepcache.cache(pipe, schedule) as read:
        expected = pipe(**case.inputs("a photo of a cat", 0), num_inference_steps=len(plan))[0]
    as_if_on_gpu()
    with stepcache.cache(pipe, schedule) as counted:
        got = pipe(**case.inputs("a photo of a cat", 0), num_inference_steps=len(plan))[0]
        assert counted.tracker.timestep is None
    assert torch.equal(got, expected)
    assert stats(counted) == stats(read)


def test_interrupted_generation_then_the_next_counts_from_zero(tiny_pipe, as_if_on_gpu):
    schedule = Schedule(len(PLAN), {"attn": PLAN, "ff": PLAN})
    with stepcache.cache(tiny_pipe, schedule):
        expected = generate(tiny_pipe)
    as_if_on_gpu()
    with stepcache.cache(tiny_pipe, schedule) as handle:
        calls = {"n": 0}
        original = tiny_pipe.scheduler.step

        def stop(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        tiny_pipe.scheduler.step = stop
        with pytest.raises(KeyboardInterrupt):
            generate(tiny_pipe)
        tiny_pipe.scheduler.step = original
        assert torch.equal(generate(tiny_pipe), expected)
    assert handle.stats.generations == 2


def test_reference_pipeline_new_scheduler_per_call(as_if_on_gpu):
    """ReferencePipeline makes a fresh scheduler for every call: its count starts with it."""
    from stepcache.reference import ReferencePipeline, shipped_calibration

    pipe = ReferencePipeline("dpm", guidance_scale=2.0)
    schedule = from_calibration(shipped_calibration("dpm", 20), alpha=0.1)
    kwargs = {"class_labels": [3, 7], "num_inference_steps": 20, "seed": 0}
    with stepcache.cache(pipe, schedule) as read:
        expected = [pipe(**kwargs), pipe(**kwargs)]
    as_if_on_gpu()
    with stepcache.cache(pipe, schedule) as counted:
        got = [pipe(**kwargs), pipe(**kwargs)]
        assert counted.tracker.timestep is None
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert stats(counted) == stats(read)


def test_a_plain_loop_with_device_timesteps_still_reads_them(plain_dit, monkeypatch):
    """No pipeline, no count: the tracker falls back to reading the tensor (documented)."""
    from tests._helpers.plain_models import sample

    schedule = Schedule(len(PLAN), {"attn": PLAN, "ff": PLAN})
    y = torch.tensor([1, 2])
    with torch.no_grad(), stepcache.cache(plain_dit, schedule):
        expected = sample(plain_dit, y, len(PLAN))
    monkeypatch.setattr(session_module, "on_device", lambda v: isinstance(v, torch.Tensor))
    with torch.no_grad(), stepcache.cache(plain_dit, schedule) as handle:
        got = sample(plain_dit, y, len(PLAN))
        assert handle.tracker.timestep is not None
    assert torch.equal(got, expected)
