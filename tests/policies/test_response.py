"""The output response (stepcache.response): recorded in one differentiable generation, kept in the
calibration file, and used by the open loop and tune's shortlist to rank placements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stepcache
from stepcache import Calibration, CalibrationError, Schedule, reference
from stepcache.policies import COMPUTE, FORECAST, REUSE, open_loop_schedule, optimal_schedule, tune
from stepcache.policies._response import predicted_error_db
from tests._helpers.model_state import model_state

STEPS = 8


@pytest.fixture(scope="module")
def model():
    return reference.load_model(model="flow")


def run_of(model, differentiable=True, seed=3, n=4):
    def run():
        return reference.sample(
            model, torch.arange(n), num_inference_steps=STEPS, seed=seed, differentiable=differentiable
        )

    return run


@pytest.fixture(scope="module")
def calibrated(model):
    cal = stepcache.calibrate(model, run_of(model, False, seed=1), num_inference_steps=STEPS, progress=False)
    return stepcache.response(model, cal, run_of(model), projections=8)


def actual_error_db(model, schedule):
    base = run_of(model, False)()
    with stepcache.cache(model, schedule):
        out = run_of(model, False)()
    return float((10 * torch.log10((out - base).pow(2).flatten(1).mean(1))).mean())


def test_the_response_predicts_what_placements_do_to_the_samples(model, calibrated):
    before = model_state(model)
    info = calibrated.meta["response"]
    assert info["projections"] == 8 and info["samples"] == 4 and info["generations"] == 17
    assert set(calibrated.response) == set(calibrated.components.values())
    assert all(a.shape == (8, STEPS, STEPS, 4) for a in calibrated.response.values())
    assert model_state(model) == before and all(p.grad is None for p in model.parameters())
    # placements from mild to harsh: the prediction ranks them as the samples do (it is a ranking, not
    # the error itself: module doc)
    plans = [
        (1, 1, 1, FORECAST, 1, 1, 1, 1),
        (1, 1, FORECAST, 1, FORECAST, 1, FORECAST, 1),
        (1, REUSE, 1, REUSE, REUSE, 1, REUSE, 1),
        (1, REUSE, REUSE, REUSE, 1, REUSE, REUSE, 1),
    ]
    size = info["sample_size"]
    schedules = [Schedule(STEPS, {"*": p}) for p in plans]
    predicted = [predicted_error_db(s, calibrated.response, size) for s in schedules]
    actual = [actual_error_db(model, s) for s in schedules]
    assert np.argsort(predicted).tolist() == np.argsort(actual).tolist()
    # nothing reused: no error predicted (the floor)
    assert predicted_error_db(Schedule(STEPS, {"*": (COMPUTE,) * STEPS}), calibrated.response, size) < -250


def test_the_response_is_kept_in_files_and_refuses_to_merge(calibrated, tmp_path):
    path = calibrated.save(tmp_path / "cal.json")
    again = Calibration.load(path)
    assert again.to_dict()["format_version"] == 3
    for kind, arr in calibrated.response.items():
        np.testing.assert_allclose(again.response[kind], arr)
    plain = calibrated.replace(response={})
    assert plain.to_dict()["format_version"] in (1, 2)
    with pytest.raises(CalibrationError, match="cannot merge output responses"):
        Calibration.merge([calibrated, calibrated])
    with pytest.raises(CalibrationError, match="expected \\(projections, 8, 8, samples\\)"):
        calibrated.replace(response={"ff": np.zeros((2, 8, 7, 4))})


def test_a_run_without_graph_or_with_other_steps_is_refused_and_the_model_is_unchanged(model, calibrated):
    before = model_state(model)
    with pytest.raises(CalibrationError, match="without an autograd graph"):
        stepcache.response(model, calibrated, run_of(model, differentiable=False))
    six = lambda: reference.sample(model, torch.arange(2), num_inference_steps=6, seed=0, differentiable=True)  # noqa: E731
    with pytest.raises(CalibrationError, match="at each of the calibration's 8 steps"):
        stepcache.response(model, calibrated, six)
    with pytest.raises(CalibrationError, match="projections"):
        stepcache.response(model, calibrated, run_of(model), projections=0)
    assert model_state(model) == before and all(p.grad is None for p in model.parameters())


def test_the_open_loop_ranks_the_family_by_the_response(model, calibrated):
    plain = calibrated.replace(response={})
    assert open_loop_schedule(plain, 0.5).plans == optimal_schedule(plain, 0.5).plans  # no response
    chosen = open_loop_schedule(calibrated, 0.5)
    info = chosen.meta["open_loop"]
    assert info["rule"] == "output response" and info["candidates"] > 10
    assert chosen.compute_fraction == pytest.approx(0.5)  # the budget, exactly
    assert not any(v == 3 for p in chosen.plans.values() for v in p)  # no second-order forecasts
    assert info["predicted_error_db"] <= min(score for _, score in info["runner_up"])
    # better on the samples than the optimal policy's schedule at the same budget (this model)
    assert actual_error_db(model, chosen) < actual_error_db(model, optimal_schedule(plain, 0.5))


def test_tune_shortlists_by_the_response(model, calibrated):
    from stepcache.policies._family import candidate_schedules, forecast_variants
    from stepcache.policies._response import ranked_by_response

    run = run_of(model, False)
    tuned = tune(model, run, 0.5, calibration=calibrated, max_replays=8, refine=0, progress=False)
    assert tuned.compute_fraction == pytest.approx(0.5)
    scored = [k for k in tuned.meta["tuning"]["scores"] if not k.startswith("optimal")]
    # 8 calls: the uncached one, the copy variant, the optimal schedule and the response's 5 best of
    # the family, each with first-order and second-order forecasts and copies
    family = candidate_schedules(STEPS, {"*": STEPS // 2}, {"*": 1}, STEPS // 2)
    variants = forecast_variants(family, ("first-order", "bdf2", "copy"))
    best = [k for k, _ in ranked_by_response(calibrated, variants)][:5]
    assert set(best) <= set(scored) and len(scored) <= 6
