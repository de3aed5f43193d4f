"""benchmarks/frontier.py and its modules (issue 21): matching at exact compute ("no point", the best point
within 0.02), the sweeps' compute counts against counted runs, the threshold search, the held-out guard,
and the quick run end to end (with --resume)."""

from __future__ import annotations

import json

import pytest

from benchmarks import frontier, frontier_sweep
from benchmarks.frontier_match import TUNED, UNBUDGETED, match, tally
from benchmarks.frontier_report import markdown
from benchmarks.harness import peers

# One pytest-xdist worker runs the module: the quick run is the slow part.
pytestmark = pytest.mark.xdist_group("frontier")


def _point(family, frac, mean, p5, knob=""):
    return {
        "family": family,
        "knob": knob,
        "compute_fraction": frac,
        "mean_db": mean,
        "p5_db": p5,
        "worst_db": p5,
    }


# ------------------------------------------------------------------------------------------ matching
def test_best_point_within_tolerance_per_family_and_no_point():
    points = [
        _point("diffusers/TaylorSeer", 0.25, 30.0, 28.0, "a"),
        _point("diffusers/TaylorSeer", 0.27, 33.0, 29.0, "b"),  # 0.02 away: counts
        _point(
            "diffusers/TaylorSeer", 0.2701, 40.0, 39.0, "c"
        ),  # just beyond: never counts, nor interpolates
        _point("diffusers/MagCache", 0.30, 35.0, 30.0),  # nothing near 0.25
        _point("diffusers/MagCache", 0.20, 25.0, 20.0),
        {"family": "diffusers/PAB", "knob": "x", "error": "RuntimeError: boom"},
    ]
    (row,) = match(points, [0.25])
    assert row["families"]["diffusers/TaylorSeer"]["knob"] == "b"
    assert row["families"]["diffusers/TaylorSeer"]["candidates"] == 2
    assert row["families"]["diffusers/MagCache"] is None  # "no point": the gap is not bridged
    assert "diffusers/PAB" not in row["families"]  # failed points are not points
    assert row["peer"]["knob"] == "b" and row["stepcache"] is None and row["goal_met"] is None


def test_goal_against_the_best_peer_point_and_its_p5():
    points = [
        _point(TUNED, 0.35, 40.0, 30.0, "fraction=0.35"),
        _point(UNBUDGETED, 0.35, 50.0, 45.0, "fraction=0.35"),  # measured for the budget check only
        _point("stepcache/optimal (type)", 0.35, 38.0, 36.0, "fraction=0.35"),
        _point("diffusers/TaylorSeer", 0.36, 38.5, 31.0),
        _point("cache-dit/DBCache", 0.34, 30.0, 33.0),
        _point("baseline/FORA+forecast", 0.50, 60.0, 60.0),  # other target
    ]
    (row,) = match(points, [0.35])
    assert row["stepcache"]["family"] == TUNED
    assert row["peer"]["family"] == "diffusers/TaylorSeer"
    assert row["peer_best_p5"]["family"] == "cache-dit/DBCache"
    assert row["margin_mean_db"] == pytest.approx(1.5) and row["margin_p5_db"] == pytest.approx(-1.0)
    assert row["goal_met"] is False  # +1.5 dB mean, but below the peer's p5
    assert row["open_loop"]["family"] == "stepcache/optimal (type)"
    assert row["open_loop_margin_db"] == pytest.approx(-0.5) and row["open_loop_ok"] is True
    assert row["tune_gap_db"] == pytest.approx(10.0) and row["tune_within"] is False
    points[0] = _point(TUNED, 0.35, 40.0, 31.0, "fraction=0.35")
    assert match(points, [0.35])[0]["goal_met"] is True


def test_stepcache_is_compared_at_no_more_compute_than_the_peer_point():
    # both within 0.02 of 0.25, but the stepcache point at 0.267 spends more than the peer's 0.233
    points = [
        _point(TUNED, 0.2667, 45.0, 40.0, "fraction=0.2667"),
        _point(TUNED, 0.2333, 28.0, 24.0, "fraction=0.25"),
        _point("stepcache/optimal (type)", 0.2667, 44.0, 40.0, "fraction=0.2667"),
        _point("diffusers/TaylorSeer", 0.2333, 30.0, 25.0, "interval=6"),
    ]
    (row,) = match(points, [0.25])
    assert row["stepcache"]["compute_fraction"] == 0.2333 and row["goal_met"] is False
    assert row["open_loop"] is None  # the open-loop point spends more than the peer's
    # at equal counted compute it is compared
    points.append(_point("diffusers/TaylorSeer", 0.2667, 31.0, 26.0, "interval=5"))
    (row,) = match(points, [0.25])
    assert row["stepcache"]["mean_db"] == 45.0 and row["goal_met"] is True


def test_equal_compute_asks_for_the_peer_points_exact_number_of_calls():
    from benchmarks.frontier_match import equal_compute_fractions

    # 10 of 28 steps with 12 components: 120 of 336 calls, stored as 0.3571 (120.0 - 0.01 calls)
    points = [_point(TUNED, 0.3393, 40.0, 35.0), _point("diffusers/TaylorSeer", 0.3571, 45.0, 40.0)]
    assert equal_compute_fractions(points, [0.35], 336) == {0.35: round(120 / 336, 6)}
    points.append(_point(TUNED, 0.3571, 46.0, 41.0, "fraction=0.3571 (the best peer's)"))
    assert equal_compute_fractions(points, [0.35], 336) == {}  # already compared at equal compute
    # a dynamic point between whole numbers of calls: the largest count not above it
    assert equal_compute_fractions([_point("cache-dit/DBCache", 0.3455, 45.0, 40.0)], [0.35], 336) == {
        0.35: round(116 / 336, 6)
    }


def test_the_goal_is_judged_again_for_the_policies_within_24_generations():
    from benchmarks.frontier_match import TUNED_FIT, TUNED_FIT_24

    points = [
        _point(TUNED_FIT, 0.5, 45.0, 40.0),  # ~79 generations: wins
        _point(TUNED_FIT_24, 0.5, 41.5, 39.0),  # 24 generations: +0.5 dB only
        _point("diffusers/TaylorSeer", 0.5, 41.0, 38.0),
    ]
    (row,) = match(points, [0.5])
    assert row["goal_met"] is True and row["stepcache"]["family"] == TUNED_FIT
    assert row["goal_met_24"] is False and row["stepcache_24"]["family"] == TUNED_FIT_24


def test_a_baseline_placement_is_a_competitor():
    points = [_point(TUNED, 0.5, 40.0, 35.0), _point("baseline/FORA", 0.5, 41.0, 30.0)]
    (row,) = match(points, [0.5])
    assert row["peer"]["family"] == "baseline/FORA" and row["goal_met"] is False


def _report(points, **settings):
    s = {
        "command": "python benchmarks/frontier.py",
        "platform": "test",
        "python": "3",
        "torch": "2",
        "threads": 1,
        "peers": {},
        "samples": 2,
        "eval_seed": 0,
        "tuning": 2,
        "tuning_seed": 1,
        "calibration_samples": 2,
        "calibration_seed": 2,
        "magcache_images": 1,
        "magcache_seed": 3,
        **settings,
    }
    config = {"config": "ddim-6-g1", "calibration": "x", "uncached_s": 1.0, "points": points}
    config["matched"] = match(points, frontier_sweep.TARGETS)
    return {"settings": s, "configs": [config], "complete": True}


def test_markdown_marks_each_cell_and_counts_them():
    points = [
        _point(TUNED, 0.25, 40.0, 35.0, "fraction=0.25"),
        _point("diffusers/TaylorSeer", 0.25, 30.0, 25.0, "interval=4"),
        _point(TUNED, 0.35, 40.0, 35.0, "fraction=0.35"),
        _point("diffusers/TaylorSeer", 0.36, 45.0, 25.0, "interval=3"),
        _point(TUNED, 0.5, 50.0, 45.0, "fraction=0.5"),
    ]
    report = _report(points)
    assert tally(report["configs"], "goal_met") == (1, 2)
    md = markdown(report)
    assert "Goal met in 1 of 2 cells" in md
    assert "| **yes** |" in md and "| no |" in md and "no peer point" in md
    assert "no point" in md


# ------------------------------------------------------------------------------------------ counts
def test_taylorseer_placement_rule():
    # warm-up 2 computes steps 0, 1; step 2 (= warm-up) is forecast; then 3, 6, 9; cooldown from 9
    assert frontier_sweep.taylorseer_mask(10, 3, 2) == (1, 1, 0, 1, 0, 0, 1, 0, 0, 1)
    assert frontier_sweep.taylorseer_mask(10, 4, 1) == (1, 0, 1, 0, 0, 0, 1, 0, 0, 0)
    assert frontier_sweep.taylorseer_mask(10, 4, 1, cooldown=9) == (1, 0, 1, 0, 0, 0, 1, 0, 0, 1)


def test_sweeps_keep_only_settings_near_a_target_once():
    n = 20
    settings = frontier_sweep.taylorseer_settings(n, frontier_sweep.TARGETS)
    assert settings and all(frontier_sweep.near(s.predicted, frontier_sweep.TARGETS) for s in settings)
    assert len({s.key for s in settings}) == len(settings)  # equal placement and order: run once
    knobs = {s.knob for s in settings}
    assert "interval=3, warm-up=1, order 2" in knobs  # 7 of 20 steps: the strongest kind
    assert "interval=4, warm-up=1, order 2" not in knobs  # 6 of 20 = 0.3: near no target
    assert not frontier_sweep.fora_settings(n, [0.35])  # every 2nd/3rd step: 0.55 / 0.4, neither is near
    fora = [(s.family, s.knob, s.predicted) for s in frontier_sweep.fora_settings(n, [0.25])]
    assert fora == [
        (f, f"interval={i}", 0.25) for f in ("baseline/FORA", "baseline/FORA+forecast") for i in (5, 6)
    ]


def _counted(model, run, method, n):
    with peers.count_component_calls(model) as counts, peers.apply_peer(method, model, num_inference_steps=n):
        run()
    return counts()["fraction"]


@pytest.fixture
def counted_run(tiny_pipe):
    n = 8

    def run():
        return tiny_pipe([1, 2], num_inference_steps=n, guidance_scale=1.0, output_type="pt").images

    return tiny_pipe.transformer, run, n


def test_static_fractions_equal_counted_runs(counted_run):
    pytest.importorskip("diffusers")
    model, run, n = counted_run
    depth = len(model.transformer_blocks)
    grid = frontier_sweep.Grid(taylorseer_intervals=(2, 3), mag_max_skip=(2, 4), mag_retention=(0.0, 0.25))
    every = [i / (n * depth) for i in range(n * depth + 1)]  # every fraction: no filtering by target
    taylor = frontier_sweep.taylorseer_settings(n, every, grid)
    assert any("last step" in s.knob for s in taylor) and any("order 2" in s.knob for s in taylor)
    ratios = peers.calibrate_mag_ratios(model, run, n)
    mag = frontier_sweep.magcache_settings(ratios, n, every, grid)
    assert len({s.predicted for s in mag}) >= 3
    for s in taylor[::3] + mag[:: max(1, len(mag) // 5)]:
        assert _counted(model, run, s.method, n) == pytest.approx(s.predicted), s.knob


def test_cache_dit_fractions_equal_counted_runs(counted_run):
    pytest.importorskip("cache_dit")
    model, run, n = counted_run
    depth = len(model.transformer_blocks)
    every = [i / (n * depth) for i in range(n * depth + 1)]
    grid = frontier_sweep.Grid(mask_intervals=(2, 3))
    masks = frontier_sweep.foca_mask_settings(n, depth, every, grid)
    for s in masks[::3]:
        assert _counted(model, run, s.method, n) == pytest.approx(s.predicted), s.knob
    # a threshold nothing stays under: DBCache caches all it may, i.e. computes exactly its floor
    for fn, bn, warm, mc in ((1, 0, 2, -1), (1, 1, 1, 2), (1, 0, 1, 1)):
        params = {"Fn_compute_blocks": fn, "Bn_compute_blocks": bn, "max_warmup_steps": warm}
        params.update(max_continuous_cached_steps=mc, residual_diff_threshold=1e6)
        method = peers.PeerMethod(peers.CACHE_DIT, "DBCache", "all", params)
        floor = frontier_sweep.dbcache_floor(n, depth, fn, bn, warm, mc)
        assert _counted(model, run, method, n) == pytest.approx(floor), (fn, bn, warm, mc)


# ------------------------------------------------------------------------------------------ search
def _steps(fractions):
    """A monotone step function of the threshold, like a dynamic cache's compute fraction."""
    probes = []

    def measure(th):
        probes.append(th)
        return next(f for limit, f in fractions if th <= limit)

    return measure, probes


def test_search_brackets_each_reachable_target():
    table = [(0.01, 1.0), (0.05, 0.8), (0.09, 0.6), (0.15, 0.51), (0.3, 0.4), (0.5, 0.34), (0.9, 0.29),
             (1.5, 0.26), (float("inf"), 0.2)]  # fmt: skip
    measure, probes = _steps(table)
    seen = frontier_sweep.search(
        measure, [0.25, 0.35, 0.5], floor=0.2, coarse=[0.2], lo=0.005, hi=4.0, refine=4
    )
    fracs = [f for f in seen.values() if f is not None]
    for t in (0.25, 0.35, 0.5):
        assert any(abs(f - t) <= 0.02 for f in fracs), (t, seen)
    assert len(probes) == len(seen) <= 1 + 3 * 4  # each threshold once, within the bound
    again, _ = _steps(table)
    assert (
        frontier_sweep.search(again, [0.25, 0.35, 0.5], floor=0.2, coarse=[0.2], lo=0.005, hi=4.0, refine=4)
        == seen
    )


def test_search_skips_unreachable_targets_and_stops_at_the_cap():
    measure, probes = _steps([(float("inf"), 0.49)])
    assert (
        frontier_sweep.search(measure, [0.25, 0.35], floor=0.45, coarse=[0.1], lo=0.005, hi=4, refine=3) == {}
    )
    assert not probes  # below the floor (+ 0.02): not one run
    seen = frontier_sweep.search(measure, [0.25, 0.5], floor=0.2, coarse=[0.1], lo=0.005, hi=4, refine=2)
    assert len(seen) == 1 + 2  # 0.25 never comes: two probes, then the next target (0.5) is hit already
    assert set(seen.values()) == {0.49}


# ------------------------------------------------------------------------------------------ protocol
def test_config_specs():
    assert frontier.parse_config("unipc-15-g1.5") == ("ddpm", "unipc", 15, 1.5)
    assert frontier.parse_config("flow-euler-15-g2.5") == ("flow", "flow-euler", 15, 2.5)
    assert frontier.parse_config("euler-a-20-g1") == ("ddpm", "euler-a", 20, 1.0)
    for bad in ("dpm-20", "dpm-x-g1", "lms-20-g1", "dpm-20-4"):
        with pytest.raises(SystemExit, match="bad configuration"):
            frontier.parse_config(bad)
    protocol = frontier.load_protocol()
    sets = [set(protocol["development"])] + [
        set(frontier.set_configs(protocol, n)) for n in frontier.HELDOUT_SETS
    ]
    for spec in set().union(*sets):
        frontier.parse_config(spec)
    assert all(not a & b for i, a in enumerate(sets) for b in sets[i + 1 :])  # disjoint
    assert frontier.heldout_configs(protocol) == sets[-1]  # the earlier sets are spent
    assert protocol["fractions"] == list(frontier_sweep.TARGETS)


@pytest.mark.parametrize(
    "argv",
    [
        ["--set", "heldout"],
        ["--set", "heldout2"],
        ["--configs", "dpm-20-g1", "unipc-12-g1"],
        ["--set", "heldout4"],
        ["--configs", "flow-euler-36-g1"],
        ["--set", "heldout", "--final", "--quick"],
        ["--configs", "ddim-40-g2", "--quick", "--final"],
    ],
)
def test_the_heldout_set_refuses_to_run_without_final(argv, tmp_path, monkeypatch):
    monkeypatch.setattr(frontier, "run_config", lambda *a, **k: pytest.fail("ran a held-out configuration"))
    with pytest.raises(SystemExit, match="refusing to run held-out"):
        frontier.main([*argv, "--out", str(tmp_path / "f")])
    assert not (tmp_path / "f.json").exists()


def test_plan_runs_nothing_and_sizes_the_sets(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(frontier, "run_config", lambda *a, **k: pytest.fail("--plan ran a configuration"))
    frontier.main(["--set", "heldout", "--plan", "--out", str(tmp_path / "f")])
    out = capsys.readouterr().out
    assert "unipc-15-g1.5" in out and "flow-euler-15-g2.5" in out and "total: ~" in out
    assert not (tmp_path / "f.json").exists()


# ------------------------------------------------------------------------------------------ quick run
@pytest.mark.slow
def test_quick_run_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier, "CALIBRATION_SAMPLES", 2)
    out = tmp_path / "frontier"
    argv = ["--quick", "--configs", "ddim-6-g1", "--samples", "2", "--tuning", "2", "--threads", "1"]
    frontier.main([*argv, "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["complete"] and report["settings"]["grid"] == "quick"
    (config,) = report["configs"]
    fams = {p["family"] for p in config["points"]}
    assert {TUNED, "stepcache/optimal (type)", "diffusers/TaylorSeer", "diffusers/FirstBlockCache"} <= fams
    assert [m["target"] for m in config["matched"]] == list(frontier_sweep.TARGETS)
    static = [p for p in config["points"] if "predicted_fraction" in p and "error" not in p]
    assert static and all(
        p["predicted_fraction"] == pytest.approx(p["compute_fraction"], abs=1e-4) for p in static
    )
    # 1 or 2 of 6 steps: nothing lands within 0.02 of 0.25
    assert all(v is None for v in config["matched"][0]["families"].values())
    md = out.with_suffix(".md").read_text()
    assert "Quick run: a smoke test" in md and "no point" in md

    # a run cut short resumes where it stopped, with the same points
    cut = json.loads(out.with_suffix(".json").read_text())
    cut["complete"] = cut["configs"][0]["complete"] = False
    del cut["configs"][0]["points"][-3:]
    out.with_suffix(".json").write_text(json.dumps(cut))
    frontier.main([*argv, "--out", str(out), "--resume"])
    resumed = json.loads(out.with_suffix(".json").read_text())
    key = lambda p: (p["family"], p["knob"], p.get("compute_fraction"), p.get("mean_db"))  # noqa: E731
    assert [key(p) for p in resumed["configs"][0]["points"]] == [key(p) for p in config["points"]]
    assert len(resumed["settings"]["commands"]) == 2


@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_is_a_stepcache_placement_with_its_forecast(order):
    """diffusers' TaylorSeer at any (interval, warm-up) is stepcache's schedule of the same mask with
    first-order (order 1) or ``taylorseer2`` (order 2) forecasts: the same images, to float rounding."""
    pytest.importorskip("diffusers")
    import torch

    from stepcache import reference
    from stepcache.runtime import cache
    from stepcache.schedule import Schedule

    model, n = reference.load_model(), 9
    labels = torch.arange(3)

    def run():
        return reference.sample(model, labels, num_inference_steps=n, seed=7)

    mask = frontier_sweep.taylorseer_mask(n, 2, 1)
    with peers.apply_peer(peers.taylorseer(2, 1, order), model, num_inference_steps=n):
        theirs = run()
    schedule = Schedule(n, {"*": mask}).with_forecast("first-order" if order == 1 else "taylorseer2")
    with cache(model, schedule):
        ours = run()
    with cache(model, Schedule(n, {"*": mask}).with_forecast("taylor2")):
        lagrange = run()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if order == 2:  # and it is not the Lagrange parabola stepcache's "taylor2" extrapolates along
        assert (lagrange - theirs).abs().max() > 1e-3
