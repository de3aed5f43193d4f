"""Cache memory: stored bytes measured by the runtime, predicted by stepcache.memory, and equal."""

from __future__ import annotations

import pytest
import torch
from plain_models import sample

import stepcache
from stepcache import Schedule
from stepcache.memory import MemoryPeak, output_bytes, predict_peak
from stepcache.runtime.cache import liveness

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
    from diffusers import DiTTransformer2DModel

    config = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=4,
    )
    with torch.device("meta"):
        meta = DiTTransformer2DModel(**config)
        x, t, y = torch.empty(3, 4, 8, 8), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    assert all(p.is_meta for p in meta.parameters())
    predicted = output_bytes(meta, lambda: meta(x, timestep=t, class_labels=y))
    real = DiTTransformer2DModel(**config).eval()
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
