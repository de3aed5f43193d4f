"""torch.compile: the cache inside compiled blocks is exact, adds no graph break, few graphs."""

from __future__ import annotations

import pytest
import torch
from plain_models import sample

import stepcache
from stepcache import Schedule

pytestmark = pytest.mark.slow  # compiles / generates: seconds each

PLAN = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)


def test_regional_compile_is_exact_without_graph_breaks(plain_dit):
    from torch._dynamo.utils import counters

    schedule = Schedule(len(PLAN), {"attn": PLAN, "ff": PLAN})
    y = torch.tensor([1, 2])
    with torch.no_grad():
        with stepcache.cache(plain_dit, schedule):
            eager = sample(plain_dit, y, len(PLAN))
        torch._dynamo.reset()
        counters.clear()
        for block in plain_dit.blocks:
            block.compile(backend="aot_eager")  # dynamo's tracing, without inductor's slow C++ build
        with stepcache.cache(plain_dit, schedule) as handle:
            first = sample(plain_dit, y, len(PLAN))
            second = sample(plain_dit, y, len(PLAN))
        uncached = sample(plain_dit, y, len(PLAN))
    torch._dynamo.reset()
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] <= 4  # compute/reuse variants, not one per step
    assert handle.stats.computed == 2 * 3 * 2 * sum(PLAN)
    assert handle.stats.reused == 2 * 3 * 2 * (len(PLAN) - sum(PLAN))
    assert not torch.equal(uncached, eager)
