"""Every DiT family: discovery, exactness, skipped calls, two-stream outputs, split guidance.

Each family is a tiny random-weight model (tests/_helpers/families.py) driven over a short loop of
decreasing timesteps in its own convention, called the way its pipeline calls it. What a cache
must do is checked against things written out here, never against the cache itself:

* a *reference cache* made of plain forward hooks that substitute a component's stored output at
  reuse steps (the component still runs; only its result is replaced), so the cached model's
  output must be bit-identical to it;
* an *execution counter* at the functional level (``F.linear`` / ``F.conv*`` calls on a layer
  inside each component), which sees real work whatever the engine does to module forwards.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import stepcache
from stepcache import DiscoveryError, Schedule
from stepcache.policies import for_compute_fraction
from tests._helpers.families import FAMILIES, Family, run
from tests._helpers.model_state import model_state

REUSE_PLAN = (1, 0, 1, 0)  # compute, reuse, compute, reuse: every kind of transition in 4 steps
BY_NAME = {f.name: f for f in FAMILIES}
TWO_STREAM = [f for f in FAMILIES if f.two_stream]
# Split guidance (cond and uncond as two calls at one timestep): Wan, whose pipeline does it, and
# the plain-PyTorch Open-Sora model driven the same way.
SPLIT = [BY_NAME["wan"], BY_NAME["opensora_stdit"]]


def params(families: list[Family] | tuple[Family, ...]) -> list[Any]:
    return [pytest.param(f, id=f.name, marks=f.marks) for f in families]


# ---------------------------------------------------------------- helpers


def uniform(num_steps: int, types: set[str], plan: tuple[int, ...] | None = None) -> Schedule:
    """One plan for every type found; all-compute (alpha = 0) by default."""
    return Schedule(num_steps, dict.fromkeys(sorted(types), plan or (1,) * num_steps))


class ReferenceCache:
    """What a cache should do, written as forward hooks: at a reuse step a component's output is
    replaced by what it returned at its last compute step in the same guidance branch."""

    def __init__(self, model: nn.Module, plans: dict[str, tuple[int, ...]], *, per_branch: bool = True):
        self.plans, self.per_branch = plans, per_branch
        self.step = self.branch = 0
        self.store: dict[tuple[str, int], Any] = {}
        named = dict(model.named_modules())
        self.handles = [named[name].register_forward_hook(self._hook(name)) for name in plans]

    def at(self, step: int, branch: int) -> None:
        self.step, self.branch = step, branch

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            key = (name, self.branch if self.per_branch else 0)
            if self.plans[name][self.step]:
                self.store[key] = output
                return None
            return self.store[key]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def probe_weight(module: nn.Module) -> nn.Parameter:
    """The weight of the first Linear / Conv inside a component (the component itself for
    Flux's ``proj_mlp``, a bare Linear): a real execution multiplies by it."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.weight
    raise AssertionError(f"no Linear/Conv inside {type(module).__name__}")


class ExecutionCounter(TorchFunctionMode):
    """Counts ``F.linear`` / ``F.conv*`` calls per probed weight: real work, seen below any
    module-level hook or forward replacement."""

    FUNCS = (
        torch.nn.functional.linear,
        torch.nn.functional.conv1d,
        torch.nn.functional.conv2d,
        torch.nn.functional.conv3d,
    )

    def __init__(self, weights: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.names = {id(w): n for n, w in weights.items()}
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self.FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.names.get(id(weight))
            if name is not None:
                self.counts[name] += 1
        return func(*args, **kwargs)


@contextmanager
def recording(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[Any]]]:
    """Every output each module hands to its block (forward hooks see reused outputs too)."""
    seen: dict[str, list[Any]] = {n: [] for n in modules}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, n=n: seen[n].append(out)) for n, m in modules.items()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- 1. discovery
@pytest.mark.parametrize("fam", params(FAMILIES))
def test_discovery_finds_the_family_components(fam: Family) -> None:
    comps = stepcache.discover(fam.build())
    assert dict(Counter(c.type for c in comps)) == fam.counts
    pairs = {(c.name, c.type) for c in comps}
    for expected in fam.names:
        assert expected in pairs, f"{expected} not in {sorted(pairs)}"
    names = [c.name for c in comps]
    assert len(set(names)) == len(names)  # unambiguous across block lists


def test_several_block_lists_get_distinct_names_and_separate_schedules() -> None:
    """Flux: `transformer_blocks.*` and `single_transformer_blocks.*` are scheduled apart by glob."""
    fam = BY_NAME["flux"]
    model = fam.build()
    comps = stepcache.discover(model)
    assert {c.stack for c in comps} == {"transformer_blocks", "single_transformer_blocks"}
    n = len(fam.timesteps)
    schedule = Schedule(
        n,
        {
            "transformer_blocks.*.attn": (1,) * n,
            "single_transformer_blocks.*.attn": REUSE_PLAN,
            "single_transformer_blocks.*.proj_mlp": REUSE_PLAN,
        },
    )
    with stepcache.cache(model, schedule) as handle:
        run(fam, model)
    # double-stream attn: 2 layers x 4 steps computed; single-stream: 3 x 2 computed, 3 x 2 reused.
    assert handle.stats.by_type["attn"].computed == 2 * n + 3 * sum(REUSE_PLAN)
    assert handle.stats.by_type["attn"].reused == 3 * (n - sum(REUSE_PLAN))
    assert handle.stats.by_type["ff"].components == 3  # only the selected proj_mlp branches


def test_hunyuan_text_refiner_is_not_a_denoising_stack() -> None:
    """The refiner's blocks have attn + ff like any block; the registry keeps them out."""
    model = BY_NAME["hunyuan_video"].build()
    assert len(model.context_embedder.token_refiner.refiner_blocks) >= 2
    assert not [c for c in stepcache.discover(model) if "refiner" in c.name]


def test_sd3_dual_attention_and_context_pre_only_block() -> None:
    model = BY_NAME["sd3"].build()
    types = {c.name: c.type for c in stepcache.discover(model)}
    assert model.transformer_blocks[0].attn2.is_cross_attention is False
    assert types["transformer_blocks.0.attn2"] == "attn"  # a second self-attention, not cross
    assert "transformer_blocks.1.attn2" not in types  # None outside the dual-attention layers
    assert model.transformer_blocks[-1].context_pre_only
    assert "transformer_blocks.2.ff_context" not in types


class _Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token_mix = nn.Linear(8, 8)
        self.channel_mix = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mix(x)
        return x + self.channel_mix(x)


class _MixerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Mixer() for _ in range(3))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_unrecognised_model_gets_an_error_naming_what_to_pass() -> None:
    model = _MixerModel()
    with pytest.raises(DiscoveryError) as err:
        stepcache.discover(model)
    msg = str(err.value)
    assert "_MixerModel" in msg and "layers (3 x _Mixer)" in msg
    assert "blocks=[" in msg and "components={" in msg
    comps = stepcache.discover(model, blocks="layers", components={"token_mix": "attn", "channel_mix": "ff"})
    assert [c.name for c in comps[:2]] == ["layers.0.token_mix", "layers.0.channel_mix"]


# ---------------------------------------------------------------- 2. all-compute is exact
@pytest.mark.parametrize("fam", params(FAMILIES))
def test_all_compute_schedule_is_bit_identical_and_restores_the_model(fam: Family) -> None:
    model = fam.build()
    ref = run(fam, model)
    before = model_state(model)
    types = {c.type for c in stepcache.discover(model)}
    n = len(fam.timesteps)
    with stepcache.cache(model, uniform(n, types)) as handle:
        out = run(fam, model)
    assert torch.equal(out, ref)
    assert handle.stats.reused == 0
    assert handle.stats.computed == sum(fam.counts.values()) * n
    assert model_state(model) == before
    assert torch.equal(run(fam, model), ref)


# ---------------------------------------------------------------- 3. reuse runs exactly the plan
@pytest.mark.parametrize("fam", params(FAMILIES))
def test_reuse_schedule_executes_exactly_the_scheduled_calls(fam: Family) -> None:
    model = fam.build()
    comps = stepcache.discover(model)
    n = len(fam.timesteps)
    plan = REUSE_PLAN[:n]

    reference = ReferenceCache(model, {c.name: plan for c in comps})
    expected = run(fam, model, before_call=reference.at)
    reference.remove()

    counter = ExecutionCounter({c.name: probe_weight(c.module) for c in comps})
    with stepcache.cache(model, uniform(n, set(fam.counts), plan)) as handle, counter:
        out = run(fam, model)
    assert torch.equal(out, expected)
    assert not torch.equal(out, run(fam, model))  # reuse changed something: the check has teeth
    assert counter.counts == dict.fromkeys((c.name for c in comps), sum(plan))
    for kind, count in fam.counts.items():
        stats = handle.stats.by_type[kind]
        assert (stats.components, stats.computed, stats.reused) == (
            count,
            count * sum(plan),
            count * (n - sum(plan)),
        )


# ---------------------------------------------------------------- 4. two-stream outputs
@pytest.mark.parametrize("fam", params(TWO_STREAM))
def test_two_stream_attention_reuses_both_streams_of_one_step(fam: Family) -> None:
    """Joint attention returns (hidden, encoder): a reuse step must hand back both streams of the
    same compute step, never a hidden stream from one step and an encoder stream from another."""
    model = fam.build()
    named = dict(model.named_modules())
    n = len(fam.timesteps)
    with (
        stepcache.cache(model, uniform(n, set(fam.counts), REUSE_PLAN)),
        recording({name: named[name] for name in fam.two_stream}) as seen,
    ):
        run(fam, model)
    for name, outs in seen.items():
        assert len(outs) == n
        for step, out in enumerate(outs):
            assert isinstance(out, tuple) and len(out) == 2, (name, type(out))
            if REUSE_PLAN[step]:
                continue
            last = outs[step - 1]  # REUSE_PLAN computes right before each reuse
            assert all(a is b for a, b in zip(out, last, strict=True)), (name, step)
        # and a compute step really produces new streams
        assert not torch.equal(outs[0][0], outs[2][0])
        assert not torch.equal(outs[0][1], outs[2][1])


# ---------------------------------------------------------------- 5. split guidance
@pytest.mark.parametrize("fam", params(SPLIT))
def test_split_guidance_branches_keep_separate_outputs(fam: Family) -> None:
    """Cond and uncond as two calls at one timestep (Wan's pipeline, inside `cache_context`)."""
    model = fam.build()
    comps = stepcache.discover(model)
    n = len(fam.timesteps)
    plans = {c.name: REUSE_PLAN for c in comps}

    def reference(per_branch: bool) -> torch.Tensor:
        ref = ReferenceCache(model, plans, per_branch=per_branch)
        try:
            return run(fam, model, guidance=4.0, before_call=ref.at)
        finally:
            ref.remove()

    expected, mixed = reference(True), reference(False)
    assert not torch.equal(expected, mixed)  # the check below can tell shared from separate stores
    before = model_state(model)
    with stepcache.cache(model, uniform(n, set(fam.counts), REUSE_PLAN)) as handle:
        out = run(fam, model, guidance=4.0)
    assert torch.equal(out, expected)
    assert handle.stats.computed == 2 * len(comps) * sum(REUSE_PLAN)
    assert handle.stats.reused == 2 * len(comps) * (n - sum(REUSE_PLAN))
    assert model_state(model) == before


# ---------------------------------------------------------------- Wan 2.2: two experts
def _two_experts() -> tuple[nn.Module, nn.Module]:
    """Wan 2.2 A14B's layout: `transformer` denoises the high-noise steps, `transformer_2` the rest."""
    return BY_NAME["wan"].build(seed=0), BY_NAME["wan"].build(seed=1)


def _run_two_experts(high: nn.Module, low: nn.Module, boundary: float = 600.0) -> torch.Tensor:
    """WanPipeline with `boundary_ratio`: which expert runs is decided by the timestep."""
    fam = BY_NAME["wan"]
    x, cond = fam.inputs(1, 0)
    with torch.no_grad():
        for tv in fam.timesteps:
            model = high if tv >= boundary else low
            x = x - 0.1 * fam.call(model, x, torch.tensor(tv), cond)
    return x


def test_two_expert_wan_cached_one_module_at_a_time() -> None:
    """What works today: each expert calibrated and cached as a module, with its own schedule over
    its own part of the steps (each expert's first call starts its generation)."""
    high, low = _two_experts()
    calibrations = [
        stepcache.calibrate(m, lambda: [_run_two_experts(high, low) for _ in range(2)], progress=False)
        for m in (high, low)
    ]
    assert [c.num_steps for c in calibrations] == [2, 2]
    plan = (1, 0)  # reuse each expert's second step
    weights = {
        f"{i}:{c.name}": probe_weight(c.module)
        for i, m in enumerate((high, low))
        for c in stepcache.discover(m)
    }
    with (
        stepcache.cache(high, uniform(2, {"attn", "cross_attn", "ff"}, plan)) as h1,
        stepcache.cache(low, uniform(2, {"attn", "cross_attn", "ff"}, plan)) as h2,
        ExecutionCounter(weights) as counter,
    ):
        _run_two_experts(high, low)
    assert counter.counts == dict.fromkeys(weights, 1)
    assert h1.stats.reused == h2.stats.reused == 6


def test_two_expert_wan_pipeline_caches_both_experts() -> None:
    """Wan 2.2 A14B: `transformer` runs the high-noise steps, `transformer_2` the rest; both are
    cached through the pipeline, with one step count across the switch."""
    high, low = _two_experts()
    pipe = SimpleNamespace(transformer=high, transformer_2=low)
    n = len(BY_NAME["wan"].timesteps)
    low_weights = {c.name: probe_weight(c.module) for c in stepcache.discover(low)}
    with (
        stepcache.cache(pipe, uniform(n, {"attn", "cross_attn", "ff"}, REUSE_PLAN)),
        ExecutionCounter(low_weights) as counter,
    ):
        _run_two_experts(high, low)
    # steps 2 and 3 run on the low-noise expert: compute at 2, reuse at 3
    assert counter.counts == dict.fromkeys(low_weights, sum(REUSE_PLAN[2:]))
    names = [c.name for c in stepcache.discover(pipe)]
    assert any(n.startswith("transformer_2.") for n in names) and not names[0].startswith("transformer_2.")


# ---------------------------------------------------------------- 6. the whole workflow
@pytest.mark.parametrize("fam", params(FAMILIES))
def test_calibrate_schedule_by_budget_and_apply(fam: Family) -> None:
    """Calibration reads every component's output (tuples, conv maps) and the schedule it yields
    is applied as planned."""
    model = fam.build()
    cal = stepcache.calibrate(model, lambda: [run(fam, model, seed=s) for s in (0, 1)], progress=False)
    assert cal.num_samples == 2 and cal.num_steps == len(fam.timesteps)
    for name, errors in cal.errors.items():
        assert np.isfinite(errors[1:, 0]).all(), name  # an output was recorded at every step
    schedule = for_compute_fraction(cal, 0.75)
    with stepcache.cache(model, schedule) as handle:
        run(fam, model)
    assert handle.stats.compute_fraction == pytest.approx(schedule.compute_fraction)
    assert handle.stats.compute_fraction <= 0.75


# ---------------------------------------------------------------- docs/families.md
def test_family_docs_examples_parse_and_use_the_real_api() -> None:
    """The examples need GPUs and checkpoints, so CI does not run them; it does check that they
    are Python and that every ``stepcache.<name>`` they use exists."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "families.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= len(FAMILIES)
    for code in blocks:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "stepcache":
                assert hasattr(stepcache, node.attr), node.attr
    for title in (
        "DiT",
        "PixArt",
        "Stable Diffusion 3",
        "Flux",
        "Stable Audio",
        "CogVideoX",
        "Wan",
        "HunyuanVideo",
        "LTX-Video",
        "Sana",
        "Open-Sora",
    ):
        assert f"## {title}" in text, title
