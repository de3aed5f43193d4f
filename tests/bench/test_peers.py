"""Side by side with the original SmoothCache package (dit-smoothcache, from benchmarks/requirements.txt)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import stepcache
from stepcache import Schedule
from tests._helpers.dit_runs import generate

N = 10
PLAN = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)


def test_same_schedule_is_bit_identical_to_the_original_package(tiny_pipe):
    smoothcache = pytest.importorskip(
        "SmoothCache",
        reason="dit-smoothcache is not installed (pip install -r benchmarks/requirements.txt); comparison skipped",
    )
    from diffusers.models.attention import BasicTransformerBlock

    schedule = Schedule(N, {"attn": PLAN, "ff": PLAN})
    with stepcache.cache(tiny_pipe, schedule):
        ours = generate(tiny_pipe)
    # The original counts steps per forward call and never resets: enable() before each generation.
    # It prints a line per wrapped call, so its stdout is swallowed here.
    helper = smoothcache.SmoothCacheHelper(
        tiny_pipe.transformer, BasicTransformerBlock, ["attn1", "ff"], schedule.to_smoothcache()
    )
    with contextlib.redirect_stdout(io.StringIO()):
        helper.enable()
        try:
            theirs = generate(tiny_pipe)
        finally:
            helper.disable()
    uncached = generate(tiny_pipe)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, uncached)
