"""tune: the candidate family (TaylorSeer placements, forced last steps), the objectives over
per-sample errors, the validation split and when refinement is kept."""

from __future__ import annotations

import contextlib
import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

import stepcache
from stepcache import Schedule, ScheduleError
from stepcache.policies import COMPUTE, FORECAST, REUSE, _replay, tuned
from stepcache.policies._family import candidate_plans
from stepcache.policies._plan import offset_plan, spaced_plan

SAMPLES = 8


def taylorseer_steps(n: int, warmup: int, interval: int) -> set[int]:
    """diffusers' TaylorSeer rule: warm-up, then (step - warmup - 1) % interval == 0."""
    return {s for s in range(n) if s < warmup or (s - warmup - 1) % interval == 0}


def computed(plan: tuple[int, ...]) -> set[int]:
    return {s for s, v in enumerate(plan) if v == COMPUTE}


def test_two_computations_are_placed_too():
    # 0.25 of 8 steps: TaylorSeer computes steps 0 and 1 and forecasts the rest; so can the family
    # (the second held-out set found none, docs/policies.md)
    plans = candidate_plans(8, 2, 4)
    assert (1, 1, 2, 2, 2, 2, 2, 2) in plans.values()
    assert all(p.count(COMPUTE) == 2 and p[0] == COMPUTE for p in plans.values())


@pytest.mark.parametrize(("n", "fraction"), [(20, 0.35), (20, 0.5), (25, 0.36), (50, 0.35), (50, 0.5)])
def test_family_holds_taylorseer_placements_and_forced_last_steps_within_budget(n, fraction):
    computes = int(fraction * n + 1e-9)
    plans = candidate_plans(n, computes, n // 2)
    assert all(p.count(COMPUTE) == computes for p in plans.values())  # the budget is spent, exactly
    sets = [computed(p) for p in plans.values()]
    for warmup in (2, 3):
        # The densest TaylorSeer interval within budget, first computation right after the warm-up (+1);
        # computations its interval leaves unspent go to the last steps.
        interval = next(i for i in range(1, n) if len(taylorseer_steps(n, warmup, i)) <= computes)
        assert any(taylorseer_steps(n, warmup, interval) <= s for s in sets)
    # The first computation *at* the end of warm-up (offset 0) is a candidate too.
    assert any(computed(offset_plan(n, computes, 3, 0)) <= s for s in sets)
    last_two = [label for label, p in plans.items() if p[-1] == p[-2] == COMPUTE]
    assert any("even" in label for label in last_two) and any("every i-th" in label for label in last_two)
    assert any("every i-th, last computed" in label and p[-1] == COMPUTE for label, p in plans.items())
    classic = candidate_plans(n, computes, n // 2, "classic")
    assert set(classic.values()) < set(plans.values())


def test_plan_builders():
    assert spaced_plan(20, 7, 3, 2) == (1, 1, 1, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 1, 1)
    assert computed(offset_plan(25, 10, 3, 1)) == taylorseer_steps(25, 3, 3)
    tailed = offset_plan(25, 9, 3, 1, tail=2)
    assert tailed[-2:] == (COMPUTE, COMPUTE) and tailed.count(COMPUTE) <= 9
    for bad in [
        lambda: spaced_plan(10, 3, 2, 2),
        lambda: offset_plan(10, 3, 3, 1),
        lambda: offset_plan(10, 4, 3, 9),
    ]:
        with pytest.raises(ScheduleError):
            bad()


# ------------------------------------------------------------------ a fake model: errors we choose
class Fake:
    """Stands in for ``cache`` and ``run``: ``run`` returns zeros uncached, and under a schedule
    samples whose squared error per sample is ``errors(plan)`` (a list, one per sample)."""

    def __init__(self, monkeypatch, errors):
        self.active: tuple[int, ...] | None = None
        self.errors = errors
        self.replays = 0
        monkeypatch.setattr(tuned, "cache", self.cache)

    @contextlib.contextmanager
    def cache(self, target, schedule, count_macs=False):
        self.active = schedule.plans["*"]
        try:
            yield
        finally:
            self.active = None

    def run(self):
        self.replays += 1
        if self.active is None:
            return torch.zeros(SAMPLES, 3)
        mse = torch.tensor(self.errors(self.active), dtype=torch.float64)
        return mse.sqrt()[:, None].expand(SAMPLES, 3).float()


N, COMPUTES = 12, 6  # fraction 0.5 of 12 steps


def family():
    return list(candidate_plans(N, COMPUTES, N // 2).values())


def tune(fake, **kw):
    kw.setdefault("max_replays", None)  # these tests choose among every candidate
    return tuned.tune(object(), fake.run, COMPUTES / N, num_steps=N, progress=False, **kw)


def test_max_replays_bounds_the_calls_of_run(monkeypatch, caplog):
    """The closed loop a user can afford: at most ``max_replays`` calls of run (the uncached one
    included), said before the first replay; the best candidate of the shortlist is still found."""
    plans = family()
    assert len(plans) + 2 > 12  # the family alone would not fit
    best = plans[len(plans) // 2]
    fake = Fake(monkeypatch, lambda plan: [1e-3] * SAMPLES if plan == best else [1.0] * SAMPLES)
    with caplog.at_level("INFO", logger="stepcache"):
        sched = tune(fake, max_replays=12, validation=0)
    assert fake.replays <= 12 and sched.meta["tuning"]["runs"] == fake.replays
    assert sched.meta["tuning"]["max_replays"] == 12
    assert any("at most 12 calls of run" in r.getMessage() for r in caplog.records)
    fake.replays = 0
    unbudgeted = tune(fake, validation=0)
    assert fake.replays > 12 and unbudgeted.plans["*"] == best
    with pytest.raises(ScheduleError, match="max_replays"):
        tune(fake, max_replays=2)


def test_objective_decides_between_a_good_mean_and_a_good_worst_sample(monkeypatch):
    plans = family()
    spiky, flat = plans[0], plans[1]  # spiky: best mean, one ruined sample; flat: best worst sample

    def errors(plan):
        if plan == spiky:
            return [1e-4] * (SAMPLES - 1) + [10.0]
        if plan == flat:
            return [1e-2] * SAMPLES
        return [1.0] * SAMPLES

    fake = Fake(monkeypatch, errors)
    kw = {"validation": 0, "refine": 0}
    assert tune(fake, objective="mean", **kw).plans["*"] == spiky
    assert tune(fake, objective="mse", **kw).plans["*"] == flat  # pooled: the ruined sample dominates
    for objective in ("worst", "worst-2", "worst-25%", "quantile-0.05"):
        assert tune(fake, objective=objective, **kw).plans["*"] == flat, objective
    # The default protects the tail.
    assert inspect.signature(tuned.tune).parameters["objective"].default == tuned.DEFAULT_OBJECTIVE
    assert tuned.DEFAULT_OBJECTIVE == "worst-25%"
    sched = tune(fake)
    assert sched.plans["*"] == flat and sched.meta["tuning"]["objective"] == "worst-25%"


def test_validation_chooses_among_the_top_k_and_records_both_splits(monkeypatch):
    fit_rows, val_rows = _replay.split(SAMPLES, None)
    plans = family()
    lucky, steady = plans[0], plans[1]  # lucky: best on the fit samples only

    def errors(plan):
        if plan == lucky:
            return [1e-4 if i in fit_rows else 1.0 for i in range(SAMPLES)]
        if plan == steady:
            return [1e-3] * SAMPLES
        return [1e-1] * SAMPLES

    fake = Fake(monkeypatch, errors)
    sched = tune(fake, refine=0)
    info = sched.meta["tuning"]
    assert sched.plans["*"] == steady and info["chosen_by"] == "validation among the top-k"
    assert (info["fit_samples"], info["validation_samples"]) == (len(fit_rows), len(val_rows)) == (4, 4)
    assert info["validation_rows"] == val_rows
    assert sched.meta["candidate"] in info["top_k"]
    score = info["scores"][info["top_k"][0]]
    assert score["fit"] < info["scores"][sched.meta["candidate"]]["fit"]
    assert score["validation"] > info["scores"][sched.meta["candidate"]]["validation"]
    assert set(info["scores"]) >= set(candidate_plans(N, COMPUTES, N // 2))
    # Without a choice (top 1) or without held-out samples, the fit score decides.
    assert tune(fake, refine=0, top_k=1).plans["*"] == lucky
    alone = tune(fake, refine=0, validation=0).meta["tuning"]  # all samples: lucky's bad half shows
    assert (alone["validation_samples"], alone["chosen_by"]) == (0, "fit score")
    assert tune(fake, refine=0, validation=2).meta["tuning"]["validation_samples"] == 2


def test_refinement_is_kept_only_when_it_also_improves_validation(monkeypatch):
    fit_rows, _ = _replay.split(SAMPLES, None)
    plans = family()
    best = plans[0]
    members = set(plans)

    def errors(plan):
        if plan == best:
            return [1e-2] * SAMPLES
        if plan in members or REUSE in plan:
            return [1.0] * SAMPLES
        # a local move of best: better on the fit samples, worse on the held-out ones
        assert FORECAST in plan
        return [1e-3 if i in fit_rows else 5e-2 for i in range(SAMPLES)]

    fake = Fake(monkeypatch, errors)
    sched = tune(fake)
    [round1] = sched.meta["tuning"]["refinement"]
    assert sched.plans["*"] == best and round1["accepted"] is False
    assert round1["fit"] < sched.meta["tuning"]["scores"][sched.meta["candidate"]]["fit"]
    # Judged on all samples (no validation), the same move is an improvement of the fit and is kept.
    fake.errors = lambda plan: (
        [1e-2] * SAMPLES
        if plan == best
        else [1.0] * SAMPLES
        if plan in members or REUSE in plan
        else [1e-3] * SAMPLES
    )
    kept = tune(fake, validation=0, refine=1)
    assert kept.plans["*"] != best and kept.meta["tuning"]["refinement"][0]["accepted"] is True
    assert kept.plans["*"].count(COMPUTE) == COMPUTES


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"objective": "median"}, "objective must be"),
        ({"objective": "worst-0"}, "K >= 1"),
        ({"objective": "worst-0%"}, "0 < P <= 100"),
        ({"objective": "quantile-1.5"}, "0 < Q < 1"),
        ({"objective": 3}, "objective must be"),
        ({"validation": 1.5}, "below 1"),
        ({"validation": -1}, "validation must be"),
        ({"validation": "half"}, "validation must be"),
        ({"validation": SAMPLES}, "leaving none to fit"),
        ({"top_k": 0}, "top_k"),
        ({"family": "taylor"}, "family must be"),
        ({"refine": -1}, "refine"),
    ],
)
def test_bad_values_are_clear_errors(monkeypatch, kw, match):
    fake = Fake(monkeypatch, lambda plan: [1.0] * SAMPLES)
    with pytest.raises(ScheduleError, match=match):
        tune(fake, **kw)
    if "validation" not in kw or kw["validation"] != SAMPLES:
        assert fake.replays == 0  # refused before any replay


def test_default_tune_on_a_real_model_records_the_split(plain_dit):
    from tests._helpers.plain_models import sample

    def run():
        return torch.cat([sample(plain_dit, torch.tensor([1, 2, 3, 4]), 8, seed=s) for s in (5, 6)])

    sched = stepcache.tune(plain_dit, run, 0.5, num_steps=8, progress=False, refine=0)
    info = sched.meta["tuning"]
    assert info["objective"] == "worst-25%" and info["family"] == "full"
    assert (info["fit_samples"], info["validation_samples"]) == (4, 4)
    assert sched.meta["candidate"] in info["top_k"] and sched.compute_fraction <= 0.5
    assert Schedule.from_dict(json.loads(json.dumps(sched.to_dict()))) == sched


def test_cli_tune_options(tmp_path):
    from stepcache.cli import app

    out = tmp_path / "s.json"
    base = ["tune", "tiny-dit", "--compute-fraction", "0.5", "--steps", "8", "--samples", "1", "--batch", "2"]
    result = CliRunner().invoke(app, [*base, "--objective", "median", "-o", str(out)])
    assert result.exit_code == 2 and "objective must be" in result.output
    result = CliRunner().invoke(app, [*base, "--validation", "1.5", "-o", str(out)])
    assert result.exit_code == 2 and "--validation" in result.output
    args = [
        "--objective",
        "worst",
        "--validation",
        "0",
        "--family",
        "classic",
        "--refine",
        "0",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == 0, result.output
    info = Schedule.load(out).meta["tuning"]
    assert (info["objective"], info["family"], info["validation_samples"], info["refinement"]) == (
        "worst",
        "classic",
        0,
        [],
    )
