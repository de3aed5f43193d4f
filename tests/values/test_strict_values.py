"""Schedules and calibrations refuse what they used to coerce (1.9 -> 1, "50" -> 50, negative errors,
unknown types, empty or zero-weight values), name the field that is wrong, and warn when an export
loses information."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest

from stepcache import Calibration, CalibrationError, Schedule, ScheduleError


# ---------------------------------------------------------------- the Schedule constructor
@pytest.mark.parametrize(
    "args, match",
    [
        ((3, {"attn": (1, 1.9, 1)}), "step 1 is a number 1.9"),
        ((3, {"attn": (1, 0.5, 1)}), "step 1 is a number 0.5"),
        ((3, {"attn": (1.0, 0, 1)}), "step 0 is a number 1.0"),
        ((3, {"attn": ("1", "0", "1")}), "step 0 is a string '1'"),
        ((3, {"attn": (True, False, True)}), "step 0 is a boolean"),
        ((3, {"attn": "101"}), "must be a list of plan values"),
        ((3, {"attn": {1, 0}}), "must be a list of plan values"),
        ((3, {"attn": None}), "must be a list of plan values"),
        (("3", {"attn": (1, 0, 1)}), "num_steps must be a positive integer"),
        ((3.0, {"attn": (1, 0, 1)}), "num_steps must be a positive integer"),
        ((True, {"attn": (1,)}), "num_steps must be a positive integer"),
        ((3, {"attn": (1, 0, 1)}, {"attn": 0}), r"counts\['attn'\] must be a positive integer"),
        ((3, {"attn": (1, 0, 1)}, {"attn": 1.5}), r"counts\['attn'\] must be a positive integer"),
        ((3, {"attn": (1, 0, 1)}, {"attn": "4"}), r"counts\['attn'\] must be a positive integer"),
        ((3, {"attn": (1, 0, 1)}, {"ff": 2}), "counts names 'ff', which has no plan"),
        ((3, {"attn": (1, 0, 1)}, {}, {"lookahead": "2"}), 'meta "lookahead"'),
        ((3, {"attn": (1, 0, 1)}, {}, {"alpha": -1}), 'meta "alpha"'),
        ((3, []), "at least one entry"),
    ],
)
def test_the_schedule_constructor_rejects_instead_of_coercing(args, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule(*args)


def test_plan_values_of_integer_kinds_are_kept_as_plain_ints():
    from stepcache import PlanValue

    s = Schedule(3, {"attn": (PlanValue.COMPUTE, np.int64(0), 1)}, {"attn": np.int32(2)})
    assert s.plans["attn"] == (1, 0, 1) and type(s.plans["attn"][1]) is int and s.counts == {"attn": 2}
    assert Schedule(3, {"attn": np.array([1, 2, 1])}).plans["attn"] == (1, 2, 1)
    with pytest.raises(ScheduleError):
        Schedule(2, {"attn": (1, 1)}).resample(True)  # type: ignore[arg-type]


# ---------------------------------------------------------------- schedule files
GOOD_SCHEDULE = {
    "format": "stepcache.schedule",
    "format_version": 1,
    "stepcache_version": "0.1.0",
    "num_steps": 4,
    "plans": {"attn": [1, 0, 2, 1], "ff": [1, 1, 0, 1]},
    "counts": {"attn": 3, "ff": 3},
    "meta": {"rule": "optimal", "lookahead": 2},
}


def edited(base: dict, path: tuple, value=None, *, drop: bool = False) -> dict:
    data = copy.deepcopy(base)
    *head, last = path
    node = data
    for key in head:
        node = node[key]
    if drop:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("plans", "attn", 1), 1.9, "step 1 is a number 1.9"),
        (("plans", "attn", 1), 0.5, "step 1 is a number 0.5"),
        (("plans", "attn", 1), True, "step 1 is a boolean"),
        (("plans", "attn", 1), 6, "step 1 is 6"),
        (("plans", "attn", 1), -1, "step 1 is -1"),
        (("plans", "attn"), "1021", "must be a list"),
        (("plans", "attn"), [1, 0, 1], "has 3 steps, the schedule 4"),
        (("plans",), {}, "at least one entry"),
        (("plans",), [], "field 'plans' must be a JSON object"),
        (("num_steps",), "4", "num_steps must be a positive integer, got '4'"),
        (("num_steps",), 4.7, "num_steps must be a positive integer, got 4.7"),
        (("num_steps",), 4.0, "num_steps must be a positive integer"),
        (("num_steps",), 0, "num_steps must be a positive integer"),
        (("counts", "attn"), 0, r"counts\['attn'\] must be a positive integer"),
        (("counts",), {"attn": 0, "ff": 0}, "must be a positive integer"),
        (("counts", "nope"), 1, "counts names 'nope'"),
        (("counts",), [3, 3], "field 'counts' must be a JSON object"),
        (("meta",), "note", "field 'meta' must be a JSON object"),
        (("meta", "lookahead"), 2.5, 'meta "lookahead"'),
        (("format_version",), "1", "format_version must be a positive integer"),
        (("format_version",), 1.0, "format_version must be a positive integer"),
        (("format_version",), [1], "format_version must be a positive integer"),
        (("format_version",), 5, "upgrade stepcache"),
        (("gains",), "1,1", "field 'gains' must be a JSON array .per step. or object"),
        (("gains",), {"attn": [[1, 1]] * 3}, r"gains\['attn'\]: gains must be 4 pairs"),
        (("gains",), {"attn": [[1, True]] * 4}, r"gains\['attn'\]"),
        (("stepcache_version",), 1, "field 'stepcache_version' must be a string"),
        (("extra",), 1, r"unknown field\(s\) \['extra'\]"),
    ],
)
def test_schedule_files_are_read_strictly(tmp_path, path, value, match):
    file = tmp_path / "s.json"
    file.write_text(json.dumps(edited(GOOD_SCHEDULE, path, value)))
    with pytest.raises(ScheduleError, match=match) as info:
        Schedule.load(file)
    assert str(file) in str(info.value)  # every message names the file


def test_a_renamed_field_is_refused_not_dropped(tmp_path):
    data = edited(GOOD_SCHEDULE, ("counts",), drop=True)
    data["cuonts"] = {"attn": 3, "ff": 3}
    with pytest.raises(ScheduleError, match=r"unknown field.*cuonts"):
        Schedule.from_dict(data)
    with pytest.raises(ScheduleError, match=r"missing field\(s\) \['num_steps'\]"):
        Schedule.from_dict(edited(GOOD_SCHEDULE, ("num_steps",), drop=True))
    assert Schedule.from_dict(GOOD_SCHEDULE).counts == {"attn": 3, "ff": 3}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"attn1": [1, 0.9, 1]}, "only 1 .compute. and 0"),
        ({"attn1": [1, 2, 1]}, "only 1 .compute. and 0"),
        ({"attn1": [True, False, True]}, "only 1 .compute. and 0"),
        ({"attn1": "101"}, "common length"),
        ({"attn1": [1, 0, 1], "ff": 5}, "common length"),
    ],
)
def test_original_format_files_are_read_strictly(data, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule.from_smoothcache(data)


def test_forecast_steps_in_the_original_format_warn():
    s = Schedule(4, {"attn": (1, 2, 2, 1), "ff": (1, 0, 1, 1)})
    with pytest.warns(UserWarning, match=r"stepcache: .*2 forecast step\(s\).*written as 0"):
        assert s.to_smoothcache() == {"attn1": [1, 0, 0, 1], "ff": [1, 0, 1, 1]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Schedule(4, {"attn": (1, 0, 0, 1)}).to_smoothcache()  # nothing lost: no warning


# ---------------------------------------------------------------- calibrations
def good_calibration() -> Calibration:
    n, k = 4, 2
    errors = np.full((n, k), np.nan)
    for s in range(n):
        for j in range(1, min(s, k) + 1):
            errors[s, j - 1] = 0.1 * j
    fc = np.where(np.isnan(errors)[..., None], np.nan, 0.05 * np.ones((n, k, k + 1)))
    names = {"b.0.attn": "attn", "b.0.ff": "ff"}
    return Calibration(
        num_steps=n,
        lookahead=k,
        num_samples=2,
        components=names,
        errors=dict.fromkeys(names, errors),
        spread=dict.fromkeys(names, errors / 10),
        macs={"b.0.attn": 100.0, "b.0.ff": 200.0},
        meta={"model_class": "M", "fingerprint": "abc", "scheduler": "DDIM"},
        forecast_errors=dict.fromkeys(names, fc),
        weights=dict.fromkeys(names, np.ones(n)),
    )


@pytest.mark.parametrize(
    "change, match",
    [
        ({"errors": {"b.0.attn": -np.ones((4, 2)), "b.0.ff": np.ones((4, 2))}}, "negative values"),
        ({"components": {"b.0.attn": "mlp", "b.0.ff": "ff"}}, "unknown type 'mlp'"),
        ({"components": {}, "errors": {}}, "at least one component"),
        ({"num_steps": "4"}, "num_steps must be an integer >= 2"),
        ({"lookahead": 2.0}, "lookahead must be an integer >= 1"),
        ({"num_samples": True}, "num_samples must be an integer >= 1"),
        ({"weights": {"b.0.attn": np.full(4, np.inf), "b.0.ff": np.ones(4)}}, "must be finite"),
        ({"macs": {"b.0.attn": -1.0}}, "macs of b.0.attn"),
        ({"macs": {"b.0.attn": True}}, "macs of b.0.attn"),
        ({"macs": {"b.9.attn": 1.0}}, "macs name components"),
        ({"spread": {"b.0.attn": np.ones((3, 2))}}, r"spread of b.0.attn have shape \(3, 2\)"),
    ],
)
def test_the_calibration_constructor_is_strict(change, match):
    with pytest.raises(CalibrationError, match=match):
        good_calibration().replace(**change)


GOOD_CAL = good_calibration().to_dict()


@pytest.mark.parametrize(
    "path, value, match",
    [
        (
            ("components", "b.0.attn", "errors", 2, 0),
            -0.1,
            r"errors\[2\]\[0\]: must be a number >= 0 or null",
        ),
        (("components", "b.0.attn", "errors", 2, 0), "0.1", r"errors\[2\]\[0\]: .*got a string '0.1'"),
        (("components", "b.0.attn", "errors", 2, 0), True, r"errors\[2\]\[0\]: .*got a boolean"),
        (("components", "b.0.attn", "errors", 2), [0.1], r"errors\[2\]: must be an array of 2 entries"),
        (("components", "b.0.attn", "errors"), None, r"errors: must be an array of 4 entries, got null"),
        (("components", "b.0.attn", "spread", 1, 0), -1, r"spread\[1\]\[0\]"),
        (("components", "b.0.attn", "forecast_errors", 3, 1, 2), -1, r"forecast_errors\[3\]\[1\]\[2\]"),
        (("components", "b.0.attn", "forecast_errors", 3), [], r"forecast_errors\[3\]: must be an array"),
        (("components", "b.0.attn", "weights", 0), None, r"weights\[0\]: must be a number >= 0, got null"),
        (("components", "b.0.attn", "type"), "mlp", r"\.type: must be one of"),
        (("components", "b.0.attn", "type"), None, r"\.type: must be one of"),
        (("components", "b.0.attn", "macs"), "100", r"\.macs: must be a number >= 0 or null"),
        (("components", "b.0.attn", "macs"), -5, r"\.macs: must be a number >= 0 or null"),
        (("components", "b.0.attn", "extra"), 1, r"unknown field\(s\) \['extra'\]"),
        (("components", "b.0.attn"), [], "must be an object"),
        (("components",), {}, "'components': must be a non-empty object"),
        (("num_steps",), "4", "'num_steps': must be an integer, got a string '4'"),
        (("num_steps",), 4.0, "'num_steps': must be an integer, got a number 4.0"),
        (("lookahead",), True, "'lookahead': must be an integer, got a boolean"),
        (("num_samples",), None, "'num_samples': must be an integer, got null"),
        (("num_steps",), 1, ">= 2 and >= 1"),
        (("num_samples",), 0, "num_samples must be an integer >= 1"),
        (("num_steps",), 5, r"errors: must be an array of 5 entries"),
        (("format_version",), "1", "format_version must be a positive integer"),
        (("meta",), [], "'meta': must be an object"),
        (("meta", "fingerprint"), 12, r"meta\['fingerprint'\]: must be a string or null"),
        (("extra",), {}, r"unknown field\(s\) \['extra'\]"),
    ],
)
def test_calibration_files_are_read_strictly(tmp_path, path, value, match):
    file = tmp_path / "c.json"
    file.write_text(json.dumps(edited(GOOD_CAL, path, value)))
    with pytest.raises(CalibrationError, match=match) as info:
        Calibration.load(file)
    assert str(file) in str(info.value)


def test_missing_values_are_null_and_only_where_the_format_allows():
    cal = Calibration.from_dict(GOOD_CAL)
    assert math.isnan(cal.errors["b.0.attn"][0, 0]) and cal.errors["b.0.attn"][1, 0] == pytest.approx(0.1)
    assert Calibration.from_dict(
        edited(GOOD_CAL, ("components", "b.0.attn", "spread"), None)
    ).spread.keys() == {"b.0.ff"}
    with pytest.raises(CalibrationError, match="forecast errors and components"):
        Calibration.from_dict(edited(GOOD_CAL, ("components", "b.0.attn", "forecast_errors"), None))


def test_infinite_errors_warn_when_written_as_null(tmp_path):
    errors = np.array([[np.nan], [np.inf], [0.2]])
    cal = Calibration(3, 1, 1, {"a": "attn"}, {"a": errors})
    with pytest.warns(UserWarning, match=r"stepcache: 1 infinite error value\(s\).*written as null"):
        path = cal.save(tmp_path / "c.json")
    assert math.isnan(Calibration.load(path).errors["a"][1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good_calibration().save(tmp_path / "fine.json")  # NaN (not measured) is not a loss: no warning


# ---------------------------------------------------------------- guidance plans and calibrations (issue 24)
from stepcache.calibration import GuidanceCalibration  # noqa: E402
from stepcache.guidance import GuidanceReuse  # noqa: E402

GOOD_GUIDANCE = GuidanceReuse(4, {"ff": (False, False, True, True)}, meta={"threshold": 0.1}).to_dict()


def good_guidance_calibration() -> GuidanceCalibration:
    errors = np.full((4, 2, 3), 0.25)
    errors[0] = np.nan
    errors[1, 1] = np.nan
    return GuidanceCalibration(
        num_steps=4,
        lookahead=2,
        layout="cond-first",
        components={"b.0.ff": "ff", "b.0.attn": "attn"},
        errors={"b.0.ff": errors, "b.0.attn": errors / 2},
        num_samples=2,
        meta={"uncond_branch": 1},
    )


GOOD_GCAL = good_guidance_calibration().to_dict()


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("plans", "ff", 2), "1", "step 2 is a string '1'"),
        (("plans", "ff", 2), 0.5, "step 2 is a number 0.5"),
        (("plans", "ff", 2), 1.0, "step 2 is a number 1.0"),
        (("plans", "ff", 2), -1, "step 2 is an integer -1"),
        (("plans", "ff", 2), 2, "step 2 is an integer 2"),
        (("plans", "ff", 2), True, "step 2 is a boolean"),
        (("plans", "ff"), "0011", "must be an array"),
        (("plans", "ff"), [0, 0, 1], "has 3 steps, the plan is for 4"),
        (("plans",), [], "field 'plans' must be a JSON object"),
        (("plans",), {"": [0, 0, 0, 0]}, "non-empty strings"),
        (("num_steps",), 6.9, "num_steps must be an integer >= 2, got 6.9"),
        (("num_steps",), "4", "num_steps must be an integer >= 2"),
        (("num_steps",), True, "num_steps must be an integer >= 2"),
        (("uncond_branch",), True, "uncond_branch must be the integer 0 or 1"),
        (("uncond_branch",), 1.0, "uncond_branch must be the integer 0 or 1"),
        (("uncond_branch",), 2, "uncond_branch must be the integer 0 or 1"),
        (("mode",), ["reuse"], "field 'mode' must be a string"),
        (("mode",), "copy", "mode must be one of"),
        (("layout",), "sideways", "layout must be one of"),
        (("meta",), [], "field 'meta' must be a JSON object"),
        (("format_version",), 2, "upgrade stepcache"),
        (("format_version",), "1", "format_version must be a positive integer"),
        (("extra",), 1, r"unknown field\(s\) \['extra'\]"),
        (("format",), "stepcache.schedule", "not a stepcache guidance reuse plan"),
    ],
)
def test_guidance_plan_files_are_read_strictly(tmp_path, path, value, match):
    file = tmp_path / "g.json"
    file.write_text(json.dumps(edited(GOOD_GUIDANCE, path, value)))
    with pytest.raises(ScheduleError, match=match) as info:
        GuidanceReuse.load(file)
    assert str(file) in str(info.value)


@pytest.mark.parametrize("missing", ["num_steps", "plans"])
def test_guidance_plan_files_missing_a_field(tmp_path, missing):
    file = tmp_path / "g.json"
    file.write_text(json.dumps(edited(GOOD_GUIDANCE, (missing,), drop=True)))
    with pytest.raises(ScheduleError, match="missing field"):
        GuidanceReuse.load(file)


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("num_samples",), -3, "num_samples must be an integer >= 1"),
        (("num_samples",), 2.5, "'num_samples'.*must be an integer"),
        (("num_steps",), 4.0, "'num_steps'.*must be an integer"),
        (("lookahead",), 0, "must be >= 2 and >= 1"),
        (("layout",), 3, "'layout'.*must be a string"),
        (("layout",), "sideways", "layout must be one of"),
        (("errors", "b.0.ff", 2, 0, 1), -0.5, "must be a number >= 0 or null, got a number -0.5"),
        (("errors", "b.0.ff", 2, 0, 1), "0.5", "must be a number >= 0 or null, got a string"),
        (("errors", "b.0.ff", 2, 0), [0.1, 0.1], "must be an array of 3 entries"),
        (("errors", "b.0.ff", 2), [], "must be an array of 2 entries"),
        (("errors", "b.0.ff"), None, "must be an array of 4 entries"),
        (("errors", "b.0.gone"), [], "must name exactly the components"),
        (("errors",), [], "'errors'.*must be an object"),
        (("components", "b.0.ff"), "mlp", "unknown type 'mlp'"),
        (("components", "b.0.ff"), ["ff"], "unknown type"),
        (("components",), "ff", "'components'.*must be an object"),
        (("meta",), 1, "'meta'.*must be an object"),
        (("meta", "uncond_branch"), 2, "uncond_branch"),
        (("format_version",), 9, "upgrade stepcache"),
        (("extra",), 1, r"unknown field\(s\) \['extra'\]"),
    ],
)
def test_guidance_calibration_files_are_read_strictly(tmp_path, path, value, match):
    file = tmp_path / "gc.json"
    file.write_text(json.dumps(edited(GOOD_GCAL, path, value)))
    with pytest.raises(CalibrationError, match=match) as info:
        GuidanceCalibration.load(file)
    assert str(file) in str(info.value)


def test_guidance_values_round_trip_and_the_constructors_are_strict(tmp_path):
    gcal = good_guidance_calibration()
    again = GuidanceCalibration.load(gcal.save(tmp_path / "gc.json"))
    assert again.to_dict() == gcal.to_dict()
    plan = GuidanceReuse.from_dict(GOOD_GUIDANCE)
    assert GuidanceReuse.load(plan.save(tmp_path / "g.json")) == plan
    assert GuidanceReuse(3, {"ff": (np.bool_(True), 0, 1)}).plans["ff"] == (True, False, True)
    for bad in [(1, 0.5, 1), ("1", 0, 1), (1, -1, 0), (1, 0)]:
        with pytest.raises(ScheduleError):
            GuidanceReuse(3, {"ff": bad})
    with pytest.raises(ScheduleError, match="uncond_branch"):
        GuidanceReuse(3, {"ff": (0, 0, 1)}, uncond_branch=True)
    with pytest.raises(CalibrationError, match="shape"):
        gcal.__class__(**{**vars(gcal), "errors": {n: e[:, :1] for n, e in gcal.errors.items()}})
    with pytest.raises(CalibrationError, match="kind must be one of"):
        gcal.curve("both")
    with pytest.raises(CalibrationError, match="gap must be"):
        gcal.curve("cond", 3)
    with pytest.raises(CalibrationError, match="no component of type"):
        gcal.curve("cond", 1, type="cross_attn")
