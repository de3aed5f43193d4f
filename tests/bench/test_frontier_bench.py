"""benchmarks/frontier.py: the frontier interpolation and the matched-fraction table (no model)."""

from __future__ import annotations

import pytest

from benchmarks.frontier import frontier, interpolate, matched_rows


def test_frontier_drops_dominated_points():
    pts = [(0.5, 30.0, 25.0), (0.3, 28.0, 20.0), (0.4, 27.0, 26.0), (0.3, 26.0, 30.0), (0.6, 29.0, 29.0)]
    assert frontier(pts) == [(0.3, 28.0, 20.0), (0.5, 30.0, 25.0)]


def test_interpolates_mean_and_p5_with_one_weight():
    pts = [(0.2, 20.0, 10.0), (0.4, 30.0, 14.0)]
    mean, p5 = interpolate(pts, 0.25)
    assert mean == pytest.approx(22.5)
    assert p5 == pytest.approx(11.0)


def test_dominated_point_is_not_used():
    # (0.3, 21, 40) is dominated by (0.2, 22, ...): it must not lift the interpolation at 0.3.
    pts = [(0.2, 22.0, 10.0), (0.3, 21.0, 40.0), (0.4, 32.0, 20.0)]
    mean, p5 = interpolate(pts, 0.3)
    assert mean == pytest.approx(27.0)
    assert p5 == pytest.approx(15.0)


def test_exact_hits():
    pts = [(0.25, 20.0, 18.0), (0.35, 25.0, 21.0), (0.5, 30.0, 27.0)]
    assert interpolate(pts, 0.25) == (20.0, 18.0)
    assert interpolate(pts, 0.35) == (25.0, 21.0)
    assert interpolate(pts, 0.5) == (30.0, 27.0)
    assert interpolate([(0.35, 25.0, 21.0)], 0.35) == (25.0, 21.0)


def test_out_of_range_is_none_except_within_tolerance():
    pts = [(0.3, 20.0, 18.0), (0.45, 25.0, 21.0)]
    assert interpolate(pts, 0.25) is None
    assert interpolate(pts, 0.5) is None
    assert interpolate(pts, 0.295) == (20.0, 18.0)
    assert interpolate(pts, 0.455) == (25.0, 21.0)
    assert interpolate([], 0.35) is None
    # a dominated point outside the frontier's range does not extend it
    assert interpolate([*pts, (0.55, 24.0, 30.0)], 0.5) is None


def _point(family, frac, mean, p5):
    return {"family": family, "knob": "", "compute_fraction": frac, "mean_db": mean, "p5_db": p5}


def test_matched_rows_best_families_and_goal():
    points = [
        _point("stepcache/optimal (type)", 0.3, 30.0, 25.0),
        _point("stepcache/optimal (type)", 0.4, 34.0, 29.0),
        _point("stepcache/tuned", 0.35, 31.0, 28.0),
        _point("diffusers/TaylorSeer", 0.3, 27.0, 26.0),
        _point("diffusers/TaylorSeer", 0.4, 29.0, 26.0),
        _point("cache-dit/DBCache", 0.35, 26.0, 28.0),
        _point("baseline/FORA+forecast", 0.35, 40.0, 40.0),  # neither ours nor a peer
        {"family": "diffusers/PAB", "knob": "x", "error": "RuntimeError: boom"},
    ]
    (row,) = matched_rows(points, [0.35])
    assert row["stepcache"]["family"] == "stepcache/optimal (type)"
    assert row["stepcache"]["mean_db"] == pytest.approx(32.0)
    assert row["peer"] == {
        "family": "diffusers/TaylorSeer",
        "mean_db": 28.0,
        "p5_db": 26.0,
        "between": [0.3, 0.4],
    }
    assert row["peer_best_p5"] == {"family": "cache-dit/DBCache", "p5_db": 28.0}
    assert row["margin_mean_db"] == pytest.approx(4.0)
    assert row["margin_p5_db"] == pytest.approx(1.0)
    assert row["margin_p5_vs_best_p5_db"] == pytest.approx(-1.0)
    assert row["goal_met"] is True
    assert row["goal_met_vs_best_p5"] is False
    assert "baseline/FORA+forecast" in row["families"]


def test_matched_rows_without_peer_value():
    (row,) = matched_rows([_point("stepcache/tuned", 0.5, 30.0, 25.0)], [0.25])
    assert row["stepcache"] is None and row["peer"] is None
    assert row["goal_met"] is None


def test_locate_reports_the_bracket():
    from benchmarks.frontier import locate

    pts = [(0.3, 20.0, 18.0), (0.6, 26.0, 21.0), (0.45, 19.0, 30.0)]
    assert locate(pts, 0.4) == pytest.approx((22.0, 19.0, 0.3, 0.6))
    assert locate(pts, 0.6) == (26.0, 21.0, 0.6, 0.6)


def test_tolerance_survives_rounding():
    assert interpolate([(0.24, 45.0, 42.0), (0.5, 50.0, 45.0)], 0.25) == pytest.approx(
        (45.19, 42.12), abs=0.01
    )
    assert interpolate([(0.24, 45.0, 42.0)], 0.25) == (45.0, 42.0)
    assert interpolate([(0.26, 45.0, 42.0)], 0.25) == (45.0, 42.0)


def test_at_most_picks_best_measured_point_within_budget():
    from benchmarks.frontier import at_most_row

    points = [
        _point("stepcache/tuned", 0.34, 33.0, 30.0),
        _point("stepcache/optimal (type)", 0.36, 35.0, 31.0),  # within 0.01 of 0.35
        _point("stepcache/optimal (type)", 0.5, 40.0, 36.0),  # over budget
        _point("diffusers/TaylorSeer", 0.3, 31.0, 29.0),
        _point("diffusers/TaylorSeer", 0.7, 60.0, 55.0),  # over budget: no credit
        _point("baseline/FORA+forecast", 0.3, 50.0, 50.0),  # neither
    ]
    row = at_most_row(points, 0.35)
    assert row["stepcache"]["compute_fraction"] == 0.36
    assert row["peer"]["mean_db"] == 31.0
    assert row["margin_mean_db"] == pytest.approx(4.0)
    assert row["margin_p5_db"] == pytest.approx(2.0)
    assert row["goal_met"] is True
