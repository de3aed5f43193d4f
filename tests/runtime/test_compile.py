"""torch.compile with the cache active: no graph break, a bounded number of graphs (not one per
step, layer or plan value), outputs equal to the eager cached run, right stats; for every compile
pattern users write. aot_eager runs dynamo's tracing without inductor's slow C++ build."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch._dynamo.utils import counters

import stepcache
from stepcache import Schedule, StepCacheWarning
from tests._helpers.families import FAMILIES, run
from tests._helpers.model_state import model_state
from tests._helpers.plain_models import sample

pytestmark = pytest.mark.slow  # compiles: seconds each

PLAN = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)
FAMILY_PLAN = (1, 0, 1, 0)
COMPILED = {f.name: f for f in FAMILIES if f.name in ("dit", "pixart", "flux", "sd3", "wan")}
PATTERNS = ("regional", "in_place", "wrapper")
GRANULARITIES = ("type", "layer")
# One case per behaviour in the default run: every family compiles at least once, and every (pattern,
# granularity) pair once (six cases); the rest of the grid (15 more: each pair on every family) is
# nightly (`make test-all`). The grid was a third of `make test`'s time.
EVERY_PATTERN_AND_GRANULARITY = {
    "dit": {("regional", "type")},
    "pixart": {("in_place", "layer")},
    "flux": {("wrapper", "layer")},
    "sd3": {("in_place", "type")},
    "wan": {("wrapper", "type"), ("regional", "layer")},
}


def family_grid() -> list:
    """Every family x granularity x pattern, ids ``family-granularity-pattern``; nightly where the
    default run already has that family's pattern and granularity."""
    return [
        pytest.param(
            name,
            granularity,
            pattern,
            id=f"{name}-{granularity}-{pattern}",
            marks=()
            if (pattern, granularity) in EVERY_PATTERN_AND_GRANULARITY[name]
            else pytest.mark.nightly,
        )
        for name in sorted(COMPILED)
        for granularity in GRANULARITIES
        for pattern in PATTERNS
    ]


def schedule_for(model, granularity: str, n: int, forecast: bool = False) -> Schedule:
    comps = stepcache.discover(model)
    if granularity == "type":
        sched = Schedule(n, dict.fromkeys({c.type for c in comps}, FAMILY_PLAN if n == 4 else PLAN))
    else:  # a different plan per layer: what made graphs multiply before
        rng = random.Random(0)
        plans = {c.name: (1, *(rng.choice((0, 1)) for _ in range(n - 2)), 1) for c in comps}
        sched = Schedule(n, plans)
    return sched.with_forecast() if forecast else sched


def compile_in(pattern: str, model: torch.nn.Module, backend: str = "aot_eager") -> torch.nn.Module:
    """Compile as users do; returns what the loop should call."""
    if pattern == "regional":  # diffusers' compile_repeated_blocks does this
        for comp in {c.block: c for c in stepcache.discover(model)}.values():
            model.get_submodule(comp.block).compile(backend=backend)
        return model
    if pattern == "in_place":
        model.compile(backend=backend)
        return model
    assert pattern == "wrapper"
    return torch.compile(model, backend=backend)


def uncached_graphs(fam, model: torch.nn.Module, pattern: str, backend: str = "aot_eager") -> int:
    """Graphs dynamo makes for the same model and pattern without a cache (one guided run)."""
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    run(fam, compile_in(pattern, twin, backend), guidance=4.0)
    unique = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    return unique


def graph_bound(uncached: int, branches: int = 2, patterns: int = 1) -> int:
    """The graphs a cache may add: what stays Python per generation multiplies the uncached graphs
    (block shapes, input layouts) by the guidance branch (one kept output each) and by whether
    anything is kept yet (a generation's first call); with regional compilation, by how many
    blocks differ in which of their components forecast (those keep two outputs). Independent of
    steps, layers and plan values."""
    return uncached * 2 * branches * patterns


def forecast_patterns(model: torch.nn.Module, sched: Schedule, pattern: str) -> int:
    """Distinct per-block patterns of forecasting components (regional graphs differ by them)."""
    if pattern != "regional":
        return 1
    comps = stepcache.discover(model)
    plans = sched.resolve(comps)
    by_block: dict[str, list[bool]] = {}
    for c in comps:
        by_block.setdefault(c.block, []).append(2 in plans.get(c.name, ()))
    return len({tuple(v) for v in by_block.values()})


def no_recompile_limit():
    """Hitting dynamo's recompile limit is a failure here, not a silent fallback to eager."""
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def calls(handle) -> dict:
    """Computed and reused calls per type. (Stored bytes differ by design: a compiled graph keeps
    every component's output at every step, eager keeps only what a later step reads.)"""
    stats = handle.stats
    return {k: (v.computed, v.reused) for k, v in stats.by_type.items()} | {"generations": stats.generations}


def graphs() -> tuple[int, int]:
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(("name", "granularity", "pattern"), family_grid())
def test_family_compiles_without_breaks_and_bounded_graphs(name, granularity, pattern):
    fam = COMPILED[name]
    model = fam.build()
    n = len(fam.timesteps)
    sched = schedule_for(model, granularity, n, forecast=(name == "flux"))
    with stepcache.cache(model, sched) as eager_handle:
        expected = [run(fam, model, guidance=4.0), run(fam, model, guidance=4.0, seed=1)]
    base = uncached_graphs(fam, model, pattern)
    called = compile_in(pattern, model)
    before = model_state(model)  # compiling changes the model (torch's doing); the cache must not
    with no_recompile_limit(), stepcache.cache(called, sched) as handle:
        got = [run(fam, called, guidance=4.0), run(fam, called, guidance=4.0, seed=1)]
    breaks, unique = graphs()
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert breaks == 0, dict(counters["graph_break"])
    # compute-or-reuse is data (torch.cond): graphs come from what is fixed per generation only
    # (first call, guidance branch, block shape), never from steps, layers or plan values
    assert unique <= graph_bound(base, patterns=forecast_patterns(model, sched, pattern)), (unique, base)
    assert calls(handle) == calls(eager_handle)
    assert model_state(model) == before


@pytest.mark.parametrize(
    ("granularity", "pattern"),
    [
        pytest.param("type", "wrapper", id="type-wrapper"),
        pytest.param("layer", "in_place", id="layer-in_place"),
        # Granularity is covered by the family grid; here each pattern once is the behaviour.
        pytest.param("layer", "wrapper", id="layer-wrapper", marks=pytest.mark.nightly),
        pytest.param("type", "in_place", id="type-in_place", marks=pytest.mark.nightly),
    ],
)
def test_pipeline_compiled_after_the_cache_was_enabled(tiny_pipe, pattern, granularity):
    """``stepcache.cache(pipe, ...)`` first, then ``pipe.transformer = torch.compile(...)`` or
    ``pipe.transformer.compile()``: the step hooks move outside the compiled call when the pipeline
    sets up its next generation, before anything is traced."""

    def generate(seed=0):
        return tiny_pipe(
            [1, 2],
            num_inference_steps=len(PLAN),
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images

    model = tiny_pipe.transformer
    sched = schedule_for(model, granularity, len(PLAN))
    with stepcache.cache(tiny_pipe, sched) as eager_handle:
        expected = [generate(), generate(1)]
    torch._dynamo.reset()
    counters.clear()
    with stepcache.cache(tiny_pipe, sched) as handle:
        if pattern == "wrapper":
            tiny_pipe.transformer = torch.compile(model, backend="aot_eager")
        else:
            model.compile(backend="aot_eager")
        got = [generate(), generate(1)]
    breaks, unique = graphs()
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert breaks == 0 and unique <= 4, (dict(counters["graph_break"]), unique)
    assert calls(handle) == calls(eager_handle)


def test_regional_compile_of_a_plain_model_is_exact(plain_dit):
    schedule = Schedule(len(PLAN), {"attn": PLAN, "ff": PLAN})
    y = torch.tensor([1, 2])
    with torch.no_grad():
        with stepcache.cache(plain_dit, schedule):
            eager = sample(plain_dit, y, len(PLAN))
        torch._dynamo.reset()
        counters.clear()
        for block in plain_dit.blocks:
            block.compile(backend="aot_eager")
        with stepcache.cache(plain_dit, schedule) as handle:
            first = sample(plain_dit, y, len(PLAN))
            second = sample(plain_dit, y, len(PLAN))
        uncached = sample(plain_dit, y, len(PLAN))
    breaks, unique = graphs()
    torch._dynamo.reset()
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert breaks == 0 and unique <= 4
    assert handle.stats.computed == 2 * 3 * 2 * sum(PLAN)
    assert handle.stats.reused == 2 * 3 * 2 * (len(PLAN) - sum(PLAN))
    # Stored bytes, counted on the host after each compiled call: compiled graphs keep every
    # component's last output (3 layers x 2 types, a (2, 16, 32) float32 output each).
    assert handle.stats.peak_stored_bytes == 3 * 2 * (2 * 16 * 32 * 4)
    assert not torch.equal(uncached, eager)


def test_plain_model_compiled_after_enabling_warns_with_the_fix(plain_dit):
    """No pipeline tells stepcache that a plain model was compiled after the cache went in: its step
    hooks are then traced, which costs a graph break; it still runs exactly, and says how to avoid it."""
    schedule = Schedule(len(PLAN), {"attn": PLAN, "ff": PLAN})
    y = torch.tensor([1, 2])
    with torch.no_grad():
        with stepcache.cache(plain_dit, schedule):
            eager = sample(plain_dit, y, len(PLAN))
        torch._dynamo.reset()
        with stepcache.cache(plain_dit, schedule):
            plain_dit.compile(backend="aot_eager")
            with pytest.warns(StepCacheWarning, match="enable the cache after compiling"):
                got = sample(plain_dit, y, len(PLAN))
    torch._dynamo.reset()
    assert torch.equal(got, eager)


# Inductor on two families in the default run: Flux regional (forecasting components, so the
# forecast arithmetic is inductor's too) and DiT through the wrapper with a plan per layer; the
# other families and Flux in place are nightly (regional inductor on a split-guidance model is
# test_inductor_regional_plain_model_matches_eager).
INDUCTOR_DEFAULT = {("flux", "regional", "type"), ("dit", "wrapper", "layer")}
INDUCTOR_CASES = [
    pytest.param(*case, id="-".join(case), marks=() if case in INDUCTOR_DEFAULT else pytest.mark.nightly)
    for case in [(name, "regional", "type") for name in sorted(COMPILED)]
    + [("dit", "wrapper", "layer"), ("flux", "in_place", "layer")]
]


@pytest.mark.parametrize(("name", "pattern", "granularity"), INDUCTOR_CASES)
def test_inductor_matches_eager(name, pattern, granularity):
    """Inductor itself (C++ kernels on CPU): equal to eager within 1e-5, no graph break, the graph
    bound, never the recompile limit, and the same compute/reuse counts. (Inductor lays buffers out
    as it likes; the cache pins its inputs' layout before torch.cond and keeps contiguous copies.)"""
    fam = COMPILED[name]
    model = fam.build()
    sched = schedule_for(model, granularity, len(fam.timesteps), forecast=(name == "flux"))
    with stepcache.cache(model, sched) as eager_handle:
        expected = [run(fam, model, guidance=4.0), run(fam, model, guidance=4.0, seed=1)]
    base = uncached_graphs(fam, model, pattern)  # dynamo's graphs do not depend on the backend
    called = compile_in(pattern, model, backend="inductor")
    try:
        with no_recompile_limit(), stepcache.cache(called, sched) as handle:
            got = [run(fam, called, guidance=4.0), run(fam, called, guidance=4.0, seed=1)]
    finally:
        breaks, unique = graphs()
        torch._dynamo.reset()
    assert breaks == 0, dict(counters["graph_break"])
    assert unique <= graph_bound(base, patterns=forecast_patterns(model, sched, pattern)), (unique, base)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls(handle) == calls(eager_handle)


def test_inductor_regional_plain_model_matches_eager(plain_dit):
    """Inductor itself (C++ kernels on CPU) on a cached plain-PyTorch DiT: close to eager, no break."""
    schedule = Schedule(len(PLAN), {"attn": PLAN, "ff": PLAN})
    y = torch.tensor([1, 2])
    with torch.no_grad():
        with stepcache.cache(plain_dit, schedule) as eager_handle:
            expected = sample(plain_dit, y, len(PLAN), guidance=2.0, split=True)
        torch._dynamo.reset()
        counters.clear()
        for block in plain_dit.blocks:
            block.compile()  # default backend: inductor
        try:
            with stepcache.cache(plain_dit, schedule) as handle:
                got = sample(plain_dit, y, len(PLAN), guidance=2.0, split=True)
        finally:
            breaks, unique = graphs()
            torch._dynamo.reset()
    assert breaks == 0 and unique <= 8
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls(handle) == calls(eager_handle)
