"""fit_forecasts: per-step forecast gains chosen on the final samples, stored in the schedule, applied
by the runtime; a run without a graph is refused and the model comes back as it was."""

from __future__ import annotations

import pytest
import torch

import stepcache
from stepcache import Schedule, ScheduleError, reference
from stepcache.policies import FORECAST, fit_forecasts
from stepcache.policies.fitted import AUTO_ORDERS, first_order_gains
from tests._helpers.model_state import model_state

STEPS = 8
PLAN = (1, 1, FORECAST, FORECAST, 1, FORECAST, FORECAST, 1)


@pytest.fixture(scope="module")
def model():
    return reference.load_model(model="flow")


def run_of(model, differentiable=True):
    def run():
        return reference.sample(
            model, torch.arange(4), num_inference_steps=STEPS, seed=3, differentiable=differentiable
        )

    return run


def test_fit_lowers_the_error_on_its_samples_and_the_runtime_applies_the_gains(model, tmp_path):
    run = run_of(model)
    flags = [p.requires_grad for p in model.parameters()]
    plain = Schedule(STEPS, {"*": PLAN})
    fitted = fit_forecasts(model, run, plain, iterations=4, progress=False)
    fit = fitted.meta["forecast_fit"]
    # per component (the default): one pair per step for each cached component, by name
    with stepcache.cache(model, plain) as handle:
        names = list(handle._slots)
    assert fitted.gains_per_selector and list(fitted.gains) == names
    assert all(len(rows) == STEPS for rows in fitted.gains.values()) and fit["per"] == "component"
    assert len({rows for rows in fitted.gains.values()}) > 1  # they differ between components
    assert [p == 1 for p in fitted.plans["*"]] == [p == 1 for p in PLAN]  # the placement is kept
    # it replays first order and bdf2 and fits from the better, as bdf2's plan (from first order with
    # gains that make it first order: both handles either way)
    assert fit["forecast"] == "bdf2" and fit["start"] in AUTO_ORDERS and len(fit["scores"]) == 4
    assert fit["scores"][0] == pytest.approx(min(fit["start_scores"].values()), abs=1e-3)
    assert min(fit["scores"]) == fit["scores"][fit["chosen"]] <= fit["scores"][0]
    assert fit["generations"] == 4 * 3 + 2 + 1
    # The model is as it was: its flags restored, no gradients left on it.
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # What the fit scored is what the runtime does with the stored gains.
    reference_samples = run_of(model, False)()

    def error(schedule):
        with stepcache.cache(model, schedule):
            out = run_of(model, False)()
        return float((10 * torch.log10((out - reference_samples).pow(2).flatten(1).mean(1))).mean())

    assert error(fitted) == pytest.approx(min(fit["scores"]), abs=1e-3)
    start = Schedule(STEPS, fitted.plans)
    gains = first_order_gains(start)
    if fit["start"] == "first-order" and gains is not None:
        start = Schedule(STEPS, fitted.plans, gains=gains.tolist())
    assert error(start) == pytest.approx(fit["scores"][0], abs=1e-3)
    # Files keep the gains (format 4: by component); all-zero gains forecast nothing: the copy
    # schedule's samples.
    path = fitted.save(tmp_path / "fitted.json")
    again = Schedule.load(path)
    assert again.gains == fitted.gains and again.to_dict()["format_version"] == 4
    zero = Schedule(STEPS, fitted.plans, gains=[(0.0, 0.0)] * STEPS)
    with stepcache.cache(model, zero):
        a = run_of(model, False)()
    with stepcache.cache(model, fitted.with_forecast("copy")):
        b = run_of(model, False)()
    assert torch.equal(a, b)


def test_a_run_without_a_graph_is_refused_and_the_model_comes_back_unchanged(model):
    flags = [p.requires_grad for p in model.parameters()]
    before = model_state(model)
    with pytest.raises(ScheduleError, match="without an autograd graph"):
        fit_forecasts(model, run_of(model, False), Schedule(STEPS, {"*": PLAN}), iterations=2, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model_state(model) == before


@pytest.mark.parametrize(
    ("gains", "match"),
    [
        ([(1.0, 1.0)] * 3, "got 3"),
        ([(1.0, float("nan"))] * STEPS, "finite"),
        ("1,1", "pairs"),
        ([(1.0,)] * STEPS, "pairs"),
    ],
)
def test_bad_gains_are_refused(gains, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule(STEPS, {"*": PLAN}, gains=gains)


def test_gains_by_selector_apply_to_the_components_they_select(model):
    """Gains keyed like plans: "*" equals per-step gains; a type's gains leave the other types on the
    plain weights; a selector that matches nothing, or bad rows under a key, are refused by name."""
    run = run_of(model, False)
    rows = [(1.0, 1.0), (1.0, 1.0), (0.5, 1.0), (1.5, 1.0), (1.0, 1.0), (0.7, 1.0), (1.2, 1.0), (1.0, 1.0)]
    plan = {"*": PLAN}

    def sample(**kw):
        with stepcache.cache(model, Schedule(STEPS, plan, **kw)):
            return run()

    torch.testing.assert_close(sample(gains={"*": rows}), sample(gains=rows))
    plain, attn_only = sample(), sample(gains={"attn": rows})
    assert not torch.equal(attn_only, plain) and not torch.equal(attn_only, sample(gains=rows))
    with stepcache.cache(model, Schedule(STEPS, plan, gains={"attn": rows})) as handle:
        per = {n: r for n, r in handle._gains.items() if r is not None}
    assert per and all(n.endswith("attn1") for n in per)
    with pytest.raises(ScheduleError, match="match no component"):
        stepcache.cache(model, Schedule(STEPS, plan, gains={"nothing.here": rows})).open()
    with pytest.raises(ScheduleError, match="gains\\['ff'\\]"):
        Schedule(STEPS, plan, gains={"ff": rows[:3]})
    with pytest.raises(ScheduleError, match="at least one selector"):
        Schedule(STEPS, plan, gains={})


def test_per_component_first_order_start_works_where_plans_differ(model):
    """Per component, the first-order start is each component's own plan's gains: plans that differ
    (which share no per-step gains) still give exactly the first-order images as bdf2 plans."""
    from stepcache.policies.fitted import _component_plans, _first_order_rows

    run = run_of(model, False)
    mixed = Schedule(STEPS, {"attn": PLAN, "ff": (1, 1, FORECAST, 1, FORECAST, FORECAST, 1, 1)})
    with stepcache.cache(model, mixed):
        want = run()
    second = mixed.with_forecast("bdf2")
    plans = _component_plans(model, second)
    gains = {name: _first_order_rows(plan).tolist() for name, plan in plans.items()}
    assert len(set(plans.values())) == 2 and first_order_gains(second) is None
    with stepcache.cache(model, Schedule(STEPS, second.plans, gains=gains)):
        got = run()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused(model):
    run = run_of(model)
    copy = Schedule(STEPS, {"*": PLAN}).with_forecast("copy")
    for kwargs, match in [
        ({"iterations": 0}, "iterations"),
        ({"lr": -1.0}, "lr"),
        ({"forecast": "cubic"}, "forecast"),
        ({"per": "layer"}, "per must be"),
    ]:
        with pytest.raises(ScheduleError, match=match):
            fit_forecasts(model, run, copy, progress=False, **kwargs)
    with pytest.raises(ScheduleError, match="no forecast steps"):
        fit_forecasts(model, run, copy, forecast=None, progress=False)


def test_several_placements_race_and_the_leader_continues(model):
    other = (1, FORECAST, 1, FORECAST, FORECAST, 1, FORECAST, 1)
    a, b = Schedule(STEPS, {"*": PLAN}), Schedule(STEPS, {"*": other})
    fitted = fit_forecasts(
        model, run_of(model), [a, b], iterations=4, forecast="first-order", per="step", progress=False
    )
    fit = fitted.meta["forecast_fit"]
    assert len(fitted.gains) == STEPS and not fitted.gains_per_selector and fit["per"] == "step"
    assert fitted.to_dict()["format_version"] == 3
    first, second = fit["placements"]
    assert first["calls"] + second["calls"] == 2 + 2 + 2  # half each, then the leader the rest
    leader = fit["placements"][fit["placement"]]
    assert leader["calls"] == 4 and leader["scores"] == fit["scores"]
    # The leader is the placement whose gains scored best in the race.
    raced = [min(p["scores"][:2]) for p in (first, second)]
    assert fit["placement"] == raced.index(min(raced))
    assert [v == 1 for v in fitted.plans["*"]] == [v == 1 for v in (PLAN, other)[fit["placement"]]]
    assert fit["generations"] == 6 * 3 + 1  # no order choice: one uncached call
    with pytest.raises(ScheduleError, match="different step counts"):
        fit_forecasts(model, run_of(model), [a, Schedule(4, {"*": (1, FORECAST, 1, 1)})], progress=False)
    with pytest.raises(ScheduleError, match="iterations >= 2"):
        fit_forecasts(model, run_of(model), [a, b], iterations=1, progress=False)


def test_forecasts_without_history_are_refused_up_front(model):
    # Step 1 forecasts from one computed output: a copy, which no weight changes.
    early = Schedule(STEPS, {"*": (1, FORECAST, 1, 1, 1, 1, 1, 1)})
    with pytest.raises(ScheduleError, match="two computed outputs"):
        fit_forecasts(model, run_of(model), early, iterations=2, forecast="first-order", progress=False)


def test_first_order_gains_turn_a_second_order_plan_into_first_order(model):
    """The fit's first-order start: a bdf2 (or taylor2, taylorseer2) plan with these gains makes the
    first-order images; steps with fewer than three computed outputs keep gain 1."""
    run = run_of(model, False)
    first = Schedule(STEPS, {"*": PLAN})
    with stepcache.cache(model, first):
        want = run()
    for method in ("bdf2", "taylor2", "taylorseer2"):
        second = first.with_forecast(method)
        gains = first_order_gains(second)
        # step 5 is the first with three outputs
        assert gains is not None and gains[:5].eq(1).all() and gains[5, 1] == 0
        with stepcache.cache(model, Schedule(STEPS, second.plans, gains=gains.tolist())):
            got = run()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # plans that differ share no per-step gains: none (the fit then starts from the first-order plan)
    mixed = Schedule(STEPS, {"attn": PLAN, "ff": (1,) * STEPS}).with_forecast("bdf2")
    assert first_order_gains(mixed) is None


def test_a_step_that_scores_worse_is_taken_back_half_way(model):
    from stepcache.policies._replay import rows
    from stepcache.policies.fitted import _Fit
    from stepcache.runtime.introspect import final_samples

    with torch.no_grad():
        want = rows(final_samples(run_of(model, False)(), ScheduleError)).float()
    fit = _Fit(Schedule(STEPS, {"*": PLAN}).with_forecast("bdf2"), 5.0, {})  # a step far too long
    fit.call(model, run_of(model), want, step=True)
    first = fit.gains.detach().clone()
    fit.call(model, run_of(model), want, step=True)
    assert fit.scores[1] > fit.scores[0] and fit.best.eq(1).all()  # worse: the start stays the best
    torch.testing.assert_close(fit.gains.detach(), 1 + (first - 1) / 2)  # half-way back
    fit.call(model, run_of(model), want, step=False)
    assert len(fit.scores) == 3 and round(fit.best_score, 4) == min(fit.scores)
