"""Cache memory: stored bytes measured by the runtime, predicted by stepcache.memory, and equal."""

from __future__ import annotations

import pytest
import torch

import stepcache
from stepcache import Schedule
from stepcache.memory import (
    MemoryPeak,
    holdings,
    output_bytes,
    parse_bytes,
    peak_profile,
    predict_peak,
    unplanned_peak,
)
from stepcache.policies import for_compute_fraction, from_calibration, optimal_schedule
from stepcache.policies._budget import calibration_components
from stepcache.runtime.offload import transfer_schedule
from stepcache.schedule import liveness
from tests._helpers.plain_models import sample

N = 10
COPY = (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)
# Per layer: plans that grow and drop their stores at different steps, so the order of the calls
# inside a step matters to the peak.
LAYER_PLANS = [COPY, (1, 1, 0, 0, 1, 0, 1, 0, 1, 1), (1, 0, 1, 1, 0, 0, 0, 1, 1, 1)]


def _schedules(components):
    per_type = Schedule(N, dict.fromkeys(sorted({c.type for c in components}), COPY))
    per_layer = Schedule(N, {c.name: LAYER_PLANS[i % len(LAYER_PLANS)] for i, c in enumerate(components)})
    return {
        "type-copy": per_type,
        "type-forecast": per_type.with_forecast(),
        "layer-copy": per_layer,
        "layer-forecast": per_layer.with_forecast(),
    }


def _check(stats, predicted: MemoryPeak) -> None:
    assert predicted.peak_bytes > 0
    assert stats.peak_stored_bytes == predicted.peak_bytes
    assert {k: s.peak_stored_bytes for k, s in stats.by_type.items()} == predicted.by_type
    assert stats.stored_bytes == 0  # closed: nothing held


def gen_pipe(pipe, steps=N):
    return pipe(
        [1, 2],
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


@pytest.mark.parametrize("kind", ["type-copy", "type-forecast", "layer-copy", "layer-forecast"])
def test_prediction_equals_measured_peak_on_dit_pipeline(tiny_pipe, kind):
    sizes = output_bytes(tiny_pipe, lambda: gen_pipe(tiny_pipe, steps=2))
    components = stepcache.discover(tiny_pipe)
    assert list(sizes) == [c.name for c in components]  # call order
    assert all(v == 2 * 2 * 16 * 32 * 4 for v in sizes.values())  # CFG-batched (2 x 2, 16 tokens, 32 dims)
    schedule = _schedules(components)[kind]
    predicted = predict_peak(schedule, sizes, components=tiny_pipe)
    with stepcache.cache(tiny_pipe, schedule) as handle:
        gen_pipe(tiny_pipe)
    _check(handle.stats, predicted)
    assert predicted == predict_peak(schedule, sizes, components=components)


@pytest.mark.parametrize("kind", ["type-copy", "type-forecast", "layer-copy", "layer-forecast"])
def test_prediction_equals_measured_peak_with_split_guidance(plain_dit, kind):
    y = torch.tensor([1, 3, 4])
    sizes = output_bytes(plain_dit, lambda: sample(plain_dit, y, 2, guidance=2.0, split=True))
    assert all(v == 3 * 16 * 32 * 4 for v in sizes.values())  # one branch per call
    components = stepcache.discover(plain_dit)
    schedule = _schedules(components)[kind]
    predicted = predict_peak(schedule, sizes, components=plain_dit, branches=2)
    with stepcache.cache(plain_dit, schedule) as handle:
        sample(plain_dit, y, N, guidance=2.0, split=True)
    _check(handle.stats, predicted)
    one_branch = predict_peak(schedule, sizes, components=plain_dit)
    assert predicted.peak_bytes == 2 * one_branch.peak_bytes


def test_peak_by_hand():
    comps = [stepcache.Component("b.0.attn", "attn", "b.0", "b", 0, torch.nn.Identity())]
    sizes = {"b.0.attn": 100}
    # Copy: kept after step 0 for step 1; step 2's output is read by no one (step 3 computes).
    copy = predict_peak(Schedule(4, {"attn": (1, 0, 1, 1)}), sizes, components=comps)
    assert copy == MemoryPeak(100, {"attn": 100}, 0)
    # Forecast: step 1 keeps its output and step 0's, which step 2 extrapolates from.
    forecast = predict_peak(Schedule(5, {"attn": (1, 1, 2, 2, 1)}), sizes, components=comps)
    assert forecast == MemoryPeak(200, {"attn": 200}, 1)
    # All computed: nothing is ever stored.
    assert predict_peak(Schedule(3, {"attn": (1, 1, 1)}), sizes, components=comps).step is None
    assert liveness((1, 0, 1, 1)) == ([True, False, False, False], False)


def test_missing_sizes_and_bad_branches_are_refused(plain_dit):
    schedule = Schedule(N, {"attn": COPY})
    with pytest.raises(stepcache.StepCacheError, match="no output size"):
        predict_peak(schedule, {}, components=plain_dit)
    with pytest.raises(stepcache.StepCacheError, match="branches"):
        predict_peak(schedule, {}, components=plain_dit, branches=0)


def test_output_bytes_of_a_meta_model_costs_nothing_and_matches_the_real_one():
    from stepcache.integrations.models import transformer

    meta = transformer("dit", num_layers=2, device="meta")
    with torch.device("meta"):
        x, t, y = torch.empty(3, 4, 8, 8), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    assert all(p.is_meta for p in meta.parameters())
    predicted = output_bytes(meta, lambda: meta(x, timestep=t, class_labels=y))
    real = transformer("dit", num_layers=2)
    measured = output_bytes(
        real,
        lambda: real(
            torch.randn(3, 4, 8, 8), timestep=torch.tensor([10] * 3), class_labels=torch.tensor([1] * 3)
        ),
    )
    assert predicted == measured and len(predicted) == 4
    assert set(predicted.values()) == {3 * 16 * 32 * 4}
    # And the schedule's peak follows, for a model that was never materialised.
    peak = predict_peak(Schedule(4, {"attn": (1, 0, 1, 1), "ff": (1, 0, 0, 1)}), predicted, components=meta)
    assert peak.by_type == {"attn": 2 * 6144, "ff": 2 * 6144} and peak.peak_bytes == 4 * 6144


def test_stats_report_bytes(plain_dit):
    with stepcache.cache(plain_dit, Schedule(N, {"attn": COPY, "ff": COPY})) as handle:
        sample(plain_dit, torch.tensor([0]), N)
        open_stats = handle.stats
    stats = handle.stats
    assert open_stats.stored_bytes == 0  # the last step's outputs are read by no later step
    assert stats.peak_stored_bytes == 2 * 3 * 16 * 32 * 4  # 3 layers x 2 types, one output each
    d = stats.as_dict()
    assert d["peak_stored_bytes"] == stats.peak_stored_bytes and d["by_type"]["ff"]["stored_bytes"] == 0
    assert "peak MiB" in str(stats)


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16GB", 16 * 10**9), ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29), ("100", 100), (4096, 4096)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("16 parsecs", "unknown unit"),
        ("-3GB", "not a size"),
        ("GB", "not a size"),
        (0, "positive"),
        (1.5e9, "float"),
        (True, "number of bytes"),
        ([16], "list"),
    ],
)
def test_parse_bytes_names_the_problem(value, problem):
    with pytest.raises(stepcache.StepCacheError, match=problem):
        parse_bytes(value)


@pytest.fixture(scope="module")
def ref():
    from stepcache import reference

    model = reference.load_model()
    cal = reference.shipped_calibration("ddim", 50)
    labels = torch.arange(3)
    sizes = output_bytes(model, lambda: reference.sample(model, labels, num_inference_steps=2))
    return model, cal, labels, sizes


def _run_ref(model, labels, schedule, **options):
    from stepcache import reference

    with stepcache.cache(model, schedule, **options) as handle:
        images = reference.sample(model, labels, num_inference_steps=schedule.num_steps)
    return images, handle


@pytest.mark.parametrize("policy", ["smoothcache", "optimal"])
def test_memory_budget_is_respected_and_measured_peak_equals_predicted(ref, policy):
    model, cal, labels, sizes = ref
    comps = calibration_components(cal, sizes)
    make = for_compute_fraction if policy == "smoothcache" else optimal_schedule
    free = make(cal, 0.5)
    unplanned = unplanned_peak(free, sizes, components=comps)
    assert predict_peak(free, sizes, components=comps).peak_bytes == unplanned  # all reuse at some step
    same = make(cal, 0.5, memory_budget=unplanned, sizes=sizes)
    assert same.plans == free.plans and same.meta["memory"]["changed"] is False
    budget = unplanned // 4
    fitted = make(cal, 0.5, memory_budget=budget, sizes=sizes)
    predicted = predict_peak(fitted, sizes, components=comps).peak_bytes
    assert predicted == fitted.meta["memory"]["predicted_peak"] <= budget
    _, handle = _run_ref(model, labels, fitted)
    assert handle.stats.peak_stored_bytes == predicted
    # A tight budget costs computations (said in meta), never memory.
    assert fitted.compute_fraction == pytest.approx(fitted.meta["memory"]["compute_fraction"], abs=1e-6)
    assert fitted.compute_fraction >= free.compute_fraction
    # Every computation the policy placed stays: a budget costs speed, not the policy's choices.
    free_plans = free.resolve(comps)
    for name, plan in fitted.resolve(comps).items():
        assert all(v == 1 for v, w in zip(plan, free_plans[name], strict=True) if w == 1)


def test_memory_budget_as_a_string_and_missing_sizes(ref):
    _, cal, _, sizes = ref
    fitted = from_calibration(cal, 0.1, memory_budget="1MiB", sizes=sizes)
    assert fitted.meta["memory"]["budget"] == 2**20 and fitted.meta["memory"]["predicted_peak"] <= 2**20
    with pytest.raises(stepcache.ScheduleError, match="output size"):
        from_calibration(cal, 0.1, memory_budget="1MiB")
    with pytest.raises(stepcache.ScheduleError, match="no output size for 1"):
        optimal_schedule(cal, 0.5, memory_budget="1MiB", sizes=dict(list(sizes.items())[1:]))
    with pytest.raises(stepcache.ScheduleError, match="unknown unit"):
        optimal_schedule(cal, 0.5, memory_budget="1 MegaByte", sizes=sizes)
    # The calibration may carry the sizes itself.
    carried = cal.replace(meta={**cal.meta, "output_bytes": sizes})
    assert optimal_schedule(carried, 0.5, memory_budget="1MiB").meta["memory"]["predicted_peak"] <= 2**20


def test_peak_profile_equals_predict_peak():
    import random

    rng = random.Random(0)
    comps = [
        stepcache.Component(f"b.{i}.attn", "attn", f"b.{i}", "b", i, torch.nn.Identity()) for i in range(5)
    ]
    sizes = {c.name: 100 * (i + 1) for i, c in enumerate(comps)}
    for _ in range(30):
        plans = {}
        for c in comps:
            plan = [1] + [rng.choice((0, 1, 2)) for _ in range(10)] + [1]
            plans[c.name] = tuple(plan)
        schedule = Schedule(12, plans)
        for branches in (1, 2):
            want = predict_peak(schedule, sizes, components=comps, branches=branches)
            rows = [holdings(schedule.plans[c.name]) for c in comps]
            got = peak_profile(rows, [sizes[c.name] for c in comps], branches)
            assert got[0] == want.peak_bytes
            assert (got[1] if got[0] else None) == want.step


# ---------------------------------------------------------------- storage dtype


def test_fp16_storage_scales_what_fp16_cannot_hold_and_is_exact_otherwise():
    """Beyond fp16's range (65504) a stored output became inf and the sample NaN, silently (issue 24):
    it is scaled by a power of two, exact in every bit that fp16 can hold."""
    from stepcache.runtime.storage import pack, stored_nbytes, unpack

    torch.manual_seed(0)
    big = torch.randn(4, 64) * 1e6
    back = unpack(pack(big, torch.float16))
    assert torch.isfinite(back).all()
    assert ((back - big).abs().max() / big.abs().max()).item() < 1e-3
    small = torch.randn(4, 64) * 3
    packed = pack(small, torch.float16)
    assert torch.equal(unpack(packed), small.to(torch.float16).float())  # bit-identical in range
    assert packed.nbytes == stored_nbytes(small, torch.float16) == small.numel() * 2 + 4
    bf = (torch.randn(8) * 3).to(torch.bfloat16)
    assert torch.equal(unpack(pack(bf, torch.float16)), bf.to(torch.float16).to(torch.bfloat16))
    inf = torch.tensor([1.0, float("inf"), -2.0])
    assert torch.equal(unpack(pack(inf, torch.float16)), inf)  # an inf the model made stays one


def test_fp16_storage_of_large_outputs_in_a_cache(plain_dit):
    with torch.no_grad():
        for block in plain_dit.blocks:
            block.attn.proj.weight.mul_(1e6)  # attention outputs far beyond 65504
    schedule = Schedule(10, {"attn": (1, 0, 0, 1, 0, 1, 1, 0, 0, 1)})
    y = torch.tensor([1])
    with stepcache.cache(plain_dit, schedule):
        exact = sample(plain_dit, y, 10)
    with stepcache.cache(plain_dit, schedule, storage_dtype="fp16"):
        got = sample(plain_dit, y, 10)
    assert torch.isfinite(exact).all() and torch.isfinite(got).all()
    assert ((got - exact).abs().max() / exact.abs().max()).item() < 1e-2


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8"])
def test_storage_round_trip(dtype):
    from stepcache.runtime.storage import FP8_MAX, pack, resolve_storage_dtype, unpack

    torch.manual_seed(0)
    x = torch.randn(4, 64, 32) * 3
    packed = pack((x, x[:1]), resolve_storage_dtype(dtype))
    back = unpack(packed)
    assert back[0].dtype == torch.float32 and back[0].shape == x.shape
    rel = ((back[0] - x).abs().max() / x.abs().max()).item()
    assert rel < {"bf16": 4e-3, "fp16": 1e-3, "fp8": 0.07}[dtype]
    if dtype == "fp8":
        assert packed[0].data.dtype == torch.float8_e4m3fn
        assert packed[0].scale.item() == pytest.approx(x.abs().max().item() / FP8_MAX)
        assert packed[0].data.float().abs().max().item() <= FP8_MAX  # no element overflows
        assert packed[0].nbytes == x.numel() + 4
        zero = pack(torch.zeros(3), torch.float8_e4m3fn)
        assert torch.equal(unpack(zero), torch.zeros(3))  # an all-zero output keeps scale 1
    with pytest.raises(stepcache.StepCacheError, match="storage_dtype"):
        resolve_storage_dtype("int8")


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_storage_dtype_in_the_cache(plain_dit, dtype):
    schedule = Schedule(N, {"attn": COPY, "ff": (1, 1, 2, 2, 1, 2, 1, 1, 2, 1)})
    y = torch.tensor([1, 3])
    with stepcache.cache(plain_dit, schedule) as handle:
        exact = sample(plain_dit, y, N)
    full = handle.stats.peak_stored_bytes
    with stepcache.cache(plain_dit, schedule, storage_dtype=dtype) as handle:
        cheap = sample(plain_dit, y, N)
    sizes = output_bytes(plain_dit, lambda: sample(plain_dit, y, 2))
    stored = output_bytes(plain_dit, lambda: sample(plain_dit, y, 2), storage_dtype=dtype)
    by_dtype = predict_peak(
        schedule, sizes, components=plain_dit, storage_dtype=dtype, compute_dtype=torch.float32
    )
    assert handle.stats.peak_stored_bytes == by_dtype.peak_bytes
    assert by_dtype == predict_peak(schedule, stored, components=plain_dit)
    per_output = 2 * 16 * 32
    assert handle.stats.peak_stored_bytes == full // 4 * (2 if dtype == "bf16" else 1) + (
        0 if dtype == "bf16" else 4 * full // (4 * per_output)
    )
    assert 0 < (cheap - exact).abs().max() < 0.05
    with pytest.raises(stepcache.StepCacheError, match="compute_dtype"):
        predict_peak(schedule, sizes, components=plain_dit, storage_dtype=dtype)


@pytest.mark.filterwarnings("ignore:a generation ended")
def test_storage_and_offload_are_refused_under_compile(plain_dit):
    schedule = Schedule(N, {"attn": COPY})
    compiled = torch.compile(plain_dit, backend="eager")
    with (
        pytest.raises(stepcache.StepCacheError, match="eager calls only"),
        stepcache.cache(compiled, schedule, storage_dtype="fp8"),
    ):
        sample(compiled, torch.tensor([1]), N)


# ---------------------------------------------------------------- offload


def test_transfer_schedule_by_hand():
    # One component: stored at 0, read at 1 and 2 (one step apart: stays), dropped at 3.
    ts = transfer_schedule([(1, 0, 0, 1, 1)])
    assert ts.resident == ts.kept == (1, 1, 1, 0, 0) and not any(ts.fetch) and not any(ts.evict)
    # Forecast: step 0's output becomes the previous one at 1, read at 2 and 3 (forecasts).
    ts = transfer_schedule([(1, 1, 2, 2, 1)] * 2, lead=1)
    assert ts.evict[0] == ((0, 1), (1, 1))  # read two steps later: to host right away
    assert ts.fetch[1][0] == (1, (0, 2))  # back one call before step 2 reads it (as the previous output)
    assert sum(ts.resident) < sum(ts.kept)
    with pytest.raises(stepcache.StepCacheError, match="lead"):
        transfer_schedule([(1, 0, 1)], lead=0)


@pytest.mark.parametrize("lead", [None, 1, 3])
@pytest.mark.parametrize("split", [False, True])
def test_offload_follows_the_transfer_schedule_bit_identically(plain_dit, lead, split):
    schedule = Schedule(
        N, {"attn": (1, 0, 0, 1, 0, 2, 1, 0, 1, 1), "ff": (1, 1, 2, 2, 1, 2, 1, 1, 2, 1)}
    ).with_forecast()
    y = torch.tensor([1, 3])
    guidance = 2.0 if split else None
    with stepcache.cache(plain_dit, schedule) as handle:
        exact = sample(plain_dit, y, N, guidance=guidance, split=split)
    kept_peak = handle.stats.peak_stored_bytes
    with stepcache.cache(plain_dit, schedule, offload=True, offload_lead=lead) as handle:
        moved = sample(plain_dit, y, N, guidance=guidance, split=split)
    assert torch.equal(moved, exact)
    assert handle.stats.peak_stored_bytes == kept_peak  # every kept output, wherever it lives
    stats = handle.offload_stats
    comps = stepcache.discover(plain_dit)
    plans = schedule.resolve(comps)
    branches = 2 if split else 1
    ts = transfer_schedule([plans[c.name] for c in comps], lead, branches=branches)
    planned = (
        sorted(
            [(s, q, "fetch", p, r) for s, f in enumerate(ts.fetch) for q, (p, r) in f]
            + [(s, p, "evict", p, r) for s, e in enumerate(ts.evict) for p, r in e]
            + [(s, p, "discard", p, r) for s, d in enumerate(ts.discard) for p, r in d]
        )
        * 1
    )
    assert sorted(stats.events) == sorted(planned * branches)
    assert stats.late_fetches == 0
    assert stats.resident == ts.resident
    size = 2 * 16 * 32 * 4  # every output of this model: (2, 16, 32) float32
    assert stats.fetched_bytes == sum(ts.to_device) * size and stats.evicted_bytes == sum(ts.to_host) * size
    if lead == 1:
        assert max(stats.resident) < max(ts.kept)
        assert stats.fetched_bytes > 0 and stats.evicted_bytes > 0


def test_offload_options_are_checked(plain_dit):
    schedule = Schedule(N, {"attn": COPY})
    with pytest.raises(stepcache.StepCacheError, match="offload_lead"):
        stepcache.cache(plain_dit, schedule, offload_lead=2)
    with pytest.raises(stepcache.StepCacheError, match="offload_lead"):
        stepcache.cache(plain_dit, schedule, offload=True, offload_lead=0)
    with pytest.raises(stepcache.StepCacheError, match="offload must"):
        stepcache.cache(plain_dit, schedule, offload="yes")


def test_smoothcache_config_stores_cheaper(tiny_pipe):
    from stepcache.integrations.diffusers_hooks import SmoothCacheConfig, apply_smoothcache

    schedule = Schedule(N, {"attn": COPY, "ff": COPY})
    with pytest.raises(stepcache.StepCacheError, match="storage_dtype"):
        SmoothCacheConfig(schedule, storage_dtype="int4")
    peaks = {}
    for dtype in (None, "fp16"):
        handle = apply_smoothcache(tiny_pipe.transformer, SmoothCacheConfig(schedule, storage_dtype=dtype))
        gen_pipe(tiny_pipe)
        handle.close()
        peaks[dtype] = handle.stats.peak_stored_bytes
    # fp16 keeps half the bytes, plus its 4-byte scale per stored output (issue 24)
    assert peaks[None] // 2 < peaks["fp16"] <= peaks[None] // 2 + 4 * 64
