"""Schedules: the SmoothCache rule, budgets, resampling, files, the original package's format."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepcache import Calibration, Schedule, ScheduleError
from stepcache.policies import for_compute_fraction, fora, from_calibration, smoothcache_rule


def make_cal(tables: dict[str, np.ndarray], types: dict[str, str] | None = None) -> Calibration:
    n, k = next(iter(tables.values())).shape
    return Calibration(
        num_steps=n,
        lookahead=k,
        num_samples=1,
        components=types or {name: "attn" for name in tables},
        errors=tables,
    )


def distance_table(increments: list[float], k: int) -> np.ndarray:
    """Errors that grow with the distance between steps: e(s, j) = sum of the last j increments."""
    n = len(increments)
    table = np.full((n, k), np.nan)
    for s in range(n):
        for j in range(1, k + 1):
            if s - j >= 0:
                table[s, j - 1] = sum(increments[s - j + 1 : s + 1])
    return table


def runs_of_reuse(plan):
    return [len(r) for r in "".join(map(str, plan)).split("1") if r]


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 40),
    k=st.integers(1, 4),
    data=st.data(),
    alpha=st.floats(0, 2, allow_nan=False),
)
def test_rule_invariants_on_any_table(n, k, data, alpha):
    table = np.array(data.draw(st.lists(st.floats(0, 1), min_size=n * k, max_size=n * k))).reshape(n, k)
    plan = smoothcache_rule(table, alpha)
    assert len(plan) == n and plan[0] == 1 and plan[-1] == 1
    assert all(r <= k for r in runs_of_reuse(plan))


@settings(max_examples=150, deadline=None)
@given(
    increments=st.lists(st.floats(0.001, 1), min_size=2, max_size=40),
    k=st.integers(1, 4),
    a=st.floats(0, 2),
    b=st.floats(0, 2),
)
def test_larger_alpha_never_computes_more(increments, k, a, b):
    table = distance_table(increments, k)
    lo, hi = sorted((a, b))
    assert sum(smoothcache_rule(table, hi)) <= sum(smoothcache_rule(table, lo))


def test_rule_matches_the_papers_description():
    # e(s, j) small for j <= 2 everywhere, j = 3 too large: compute, reuse 2, compute, ...
    table = np.array([[0.01, 0.02, 0.9]] * 10)
    assert smoothcache_rule(table, 0.05) == (1, 0, 0, 1, 0, 0, 1, 0, 0, 1)
    assert smoothcache_rule(table, 0.0) == (1,) * 10
    assert smoothcache_rule(table, 1.0) == (1, 0, 0, 0, 1, 0, 0, 0, 1, 1)


def test_type_granularity_averages_layers_and_layer_keeps_them():
    a = distance_table([0.01] * 12, 2)
    b = distance_table([0.5] * 12, 2)
    cal = make_cal(
        {"blocks.0.attn": a, "blocks.1.attn": b, "blocks.0.mlp": a},
        {"blocks.0.attn": "attn", "blocks.1.attn": "attn", "blocks.0.mlp": "ff"},
    )
    by_type = from_calibration(cal, 0.1)
    assert set(by_type.plans) == {"attn", "ff"} and by_type.counts == {"attn": 2, "ff": 1}
    by_layer = from_calibration(cal, 0.1, granularity="layer")
    assert set(by_layer.plans) == {"blocks.0.attn", "blocks.1.attn", "blocks.0.mlp"}
    assert sum(by_layer.plans["blocks.1.attn"]) == 12 and sum(by_layer.plans["blocks.0.attn"]) < 12


def test_for_compute_fraction_meets_the_budget_with_the_smallest_alpha():
    rng = np.random.default_rng(0)
    cal = make_cal({f"b.{i}.attn": distance_table(list(rng.uniform(0.01, 0.2, 30)), 3) for i in range(4)})
    for f in (0.9, 0.7, 0.5, 0.4):
        s = for_compute_fraction(cal, f, granularity="layer")
        assert s.compute_fraction <= f + 1e-9
        tighter = from_calibration(cal, np.nextafter(s.meta["alpha"], 0), granularity="layer")
        assert tighter.compute_fraction > f
    with pytest.raises(ScheduleError, match="out of reach"):
        for_compute_fraction(cal, 0.1)


@pytest.mark.parametrize("alpha", [-0.1, math.nan, "0.1", None])
def test_bad_alpha_is_refused(alpha):
    cal = make_cal({"b.0.attn": distance_table([0.1] * 5, 2)})
    with pytest.raises(ScheduleError, match="alpha"):
        from_calibration(cal, alpha)


def test_compute_fraction_and_render():
    s = Schedule(4, {"attn": (1, 0, 0, 1), "ff": (1, 1, 1, 1)}, counts={"attn": 3, "ff": 1})
    assert s.compute_fraction == pytest.approx((3 * 2 + 4) / 16)
    text = s.render()
    assert "attn" in text and "#..#" in text and "####" in text


@pytest.mark.parametrize(
    "plans, match",
    [
        ({"attn": (1, 0, 6)}, "only 1"),
        ({"attn": (1, 0)}, "2 steps"),
        ({"attn": (0, 1, 1)}, "reuses at step 0"),
        ({}, "at least one"),
    ],
)
def test_malformed_schedules_are_refused(plans, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule(3, plans)


def test_save_load_round_trip(tmp_path):
    s = Schedule(5, {"attn": (1, 0, 1, 0, 1), "blocks.2.ff": (1, 1, 0, 0, 1)}, {"attn": 4}, {"alpha": 0.1})
    path = s.save(tmp_path / "s.json")
    assert Schedule.load(path) == s
    assert "[1, 0, 1, 0, 1]" in path.read_text()  # one line per plan


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "stepcache.schedule", "num_steps": 3, "plans": {"attn": [1, 0', "not valid JSON"),
        ("", "not valid JSON"),
        ('{"attn1": [1, 0, 1]}', "not a stepcache schedule"),
        ('{"format": "stepcache.schedule", "plans": {"attn": [1, 0, 1]}}', "num_steps"),
        ('{"format": "stepcache.schedule", "num_steps": 3, "plans": {"attn": [1, 0, 1, 1]}}', "4 steps"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ScheduleError, match=match):
        Schedule.load(path)
    with pytest.raises(ScheduleError, match="cannot read"):
        Schedule.load(tmp_path / "missing.json")


def test_resample_keeps_endpoints_and_run_lengths():
    s = Schedule(10, {"attn": (1, 0, 0, 1, 0, 0, 1, 0, 0, 1)}, meta={"lookahead": 2})
    for n in (5, 7, 20, 31):
        r = s.resample(n)
        plan = r.plans["attn"]
        assert len(plan) == n and plan[0] == plan[-1] == 1
        assert max(runs_of_reuse(plan), default=0) <= 2
        # As close to the original share as the run-length limit allows (5 steps: at least 3 computes).
        assert abs(r.compute_fraction - s.compute_fraction) <= 0.2 + 1e-9
    assert s.resample(10) is s


def test_original_format_round_trip(tmp_path):
    data = {"attn1": [1, 0, 1, 1], "ff": [1, 1, 0, 1], "ff-2": [1, 1, 1, 1]}
    path = tmp_path / "orig.json"
    path.write_text(json.dumps(data))
    s = Schedule.from_smoothcache(path)
    assert s.plans == {"*.attn1": (1, 0, 1, 1), "*.ff": (1, 1, 0, 1), "transformer_blocks.2.ff": (1, 1, 1, 1)}
    ours = Schedule(4, {"attn": (1, 0, 1, 1), "ff": (1, 1, 0, 1), "transformer_blocks.2.ff": (1, 1, 1, 1)})
    assert ours.to_smoothcache() == data
    with pytest.raises(ScheduleError, match="not a SmoothCache key"):
        Schedule.from_smoothcache({"attn1.x": [1, 1]})
    with pytest.raises(ScheduleError, match="common length"):
        Schedule.from_smoothcache({"attn1": [1, 1], "ff": [1]})


def test_original_format_keys_resolve_against_a_model(tiny_pipe):
    import stepcache

    comps = stepcache.discover(tiny_pipe)
    s = Schedule.from_smoothcache({"attn1": [1, 0, 1], "ff-1": [1, 1, 1]})
    plans = s.resolve(comps)
    assert plans["transformer_blocks.0.attn1"] == (1, 0, 1)
    assert plans["transformer_blocks.1.ff"] == (1, 1, 1)
    assert "transformer_blocks.0.ff" not in plans  # no key for it: not cached
    with pytest.raises(ScheduleError, match=r"\*\.mlp"):
        Schedule.from_smoothcache({"mlp": [1, 0, 1]}).resolve(comps)


def test_forecast_schedules():
    plan = fora(10, 3, forecast=True, types=("attn", "ff"))
    assert plan.plans["attn"] == (1, 2, 2, 1, 2, 2, 1, 2, 2, 1)
    assert plan.compute_fraction == fora(10, 3).compute_fraction == 0.4
    assert "#~~#" in plan.render()
    assert plan.to_smoothcache()["attn1"] == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert set(plan.resample(20).plans["attn"]) == {1, 2}
    assert set(fora(10, 2).plans) == {"*"}  # by default: every component of any model
