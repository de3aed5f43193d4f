"""Property tests over hostile input: random mutations of valid schedule and calibration files, and random
command lines. Every outcome is a valid value (or exit code 0) or a StepCacheError (exit code 2 with one
line on stderr), never another exception and never a traceback."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import stepcache.cli as cli
from stepcache import Calibration, Schedule, StepCacheError
from stepcache.calibration import GuidanceCalibration
from stepcache.cli import _targets as targets
from stepcache.guidance import GuidanceReuse


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """Durability is tested in test_io.py; here thousands of small writes need not reach the disk."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


# Sized so the whole file runs in a few seconds; STEPCACHE_FUZZ_EXAMPLES=2000 for a deep run.
EXAMPLES = int(os.environ.get("STEPCACHE_FUZZ_EXAMPLES", "40"))
FAST = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def small_calibration() -> Calibration:
    n, k = 5, 2
    errors = np.full((n, k), np.nan)
    for s in range(1, n):
        errors[s, : min(s, k)] = [0.1 * s, 0.15 * s][: min(s, k)]
    fc = np.where(np.isnan(errors)[..., None], np.nan, 0.05)
    fc = np.broadcast_to(fc, (n, k, k + 1)).copy()
    names = {"b.0.attn": "attn", "b.0.ff": "ff", "b.1.attn": "attn"}
    return Calibration(
        num_steps=n,
        lookahead=k,
        num_samples=2,
        components=names,
        errors=dict.fromkeys(names, errors),
        spread=dict.fromkeys(names, errors / 3),
        macs={"b.0.attn": 10.0, "b.0.ff": 20.0, "b.1.attn": 10.0},
        meta={"model_class": "M", "fingerprint": "f", "scheduler": "DDIM", "guidance_scale": 1.5},
        forecast_errors=dict.fromkeys(names, fc),
        weights=dict.fromkeys(names, np.linspace(0.5, 1.5, n)),
    )


SCHEDULE_DOC = Schedule(
    5,
    {"attn": (1, 0, 2, 0, 1), "transformer_blocks.1.ff": (1, 1, 0, 1, 1)},
    {"attn": 2, "transformer_blocks.1.ff": 1},
    {"rule": "optimal", "lookahead": 2, "alpha": 0.1, "nested": {"a": [1, 2]}},
).to_dict()
CALIBRATION_DOC = small_calibration().to_dict()
GUIDANCE_DOC = GuidanceReuse(
    5,
    {"attn": (False, True, False, True, True), "b.0.ff": (False,) * 5},
    mode="reuse",
    meta={"threshold": 0.1},
).to_dict()
_GERRORS = np.full((5, 2, 3), 0.2)
_GERRORS[0] = np.nan
GUIDANCE_CAL_DOC = GuidanceCalibration(
    5,
    2,
    "uncond-first",
    {"b.0.attn": "attn", "b.0.ff": "ff"},
    {"b.0.attn": _GERRORS, "b.0.ff": _GERRORS / 2},
    3,
).to_dict()
FILES = [
    (Schedule, SCHEDULE_DOC),
    (Calibration, CALIBRATION_DOC),
    (GuidanceReuse, GUIDANCE_DOC),
    (GuidanceCalibration, GUIDANCE_CAL_DOC),
]
FILE_IDS = ["schedule", "calibration", "guidance-plan", "guidance-calibration"]

EXTREMES = [
    None, True, False, 0, 1, 2, 3, -1, 0.5, 1.9, -0.0, 1e308, -1e308, 10**25, 10**40, 2**63, "", "x", "1",
    "attn", [], {}, [[]], [1, 0], [None], {"a": 1}, math.nan, math.inf, -math.inf,
]  # fmt: skip
json_values = st.recursive(
    st.one_of(st.sampled_from(EXTREMES), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def mutate(doc: Any, data: st.DataObject) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(paths(doc)), label="path")
        op = data.draw(st.sampled_from(["replace", "drop", "rename", "grow", "shrink", "wrap"]), label="op")
        if not path:
            if op == "replace":
                doc = data.draw(json_values, label="whole")
            elif op == "wrap":
                doc = [doc]
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key, value = path[-1], parent[path[-1]]
        if op == "replace":
            parent[key] = data.draw(json_values, label="value")
        elif op == "drop":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6), label="name")] = parent.pop(key)
        elif op == "grow" and isinstance(value, list):
            value.append(copy.deepcopy(value[-1]) if value else 0)
        elif op == "shrink" and isinstance(value, list) and value:
            value.pop()
        elif op == "wrap":
            parent[key] = [value]
    return doc


def outcome(load, *args) -> Any:
    """The value, or None for a StepCacheError; any other exception fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return load(*args)
        except StepCacheError:
            return None


@pytest.mark.parametrize("cls, doc", FILES, ids=FILE_IDS)
@FAST
@given(data=st.data())
def test_mutated_files_load_or_raise_a_stepcache_error(tmp_path, cls, doc, data):
    bad = mutate(doc, data)
    value = outcome(cls.from_dict, bad)
    if value is not None:  # a valid value from a dict: saving it is a file or a clear error
        outcome(value.save, tmp_path / "direct.json")
    path = tmp_path / "mutated.json"
    path.write_text(json.dumps(bad, allow_nan=True))  # NaN/Infinity literals reach the parser
    loaded = outcome(cls.load, path)
    if loaded is not None:  # valid from a file: it saves, and reads back the same
        again = outcome(cls.load, outcome(loaded.save, tmp_path / "again.json"))
        assert again is not None
        if cls in (Schedule, GuidanceReuse):
            assert again == loaded
        else:
            assert json.dumps(again.to_dict()) == json.dumps(loaded.to_dict())


@pytest.mark.parametrize("cls, doc", FILES, ids=FILE_IDS)
@FAST
@given(data=st.data())
def test_damaged_bytes_load_or_raise_a_stepcache_error(tmp_path, cls, doc, data):
    raw = bytearray(json.dumps(doc, indent=1).encode())
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(raw)), label="at")
        edit = data.draw(st.sampled_from(["cut", "insert", "flip", "truncate"]), label="edit")
        if edit == "cut":
            del raw[at : at + data.draw(st.integers(1, 20), label="n")]
        elif edit == "insert":
            raw[at:at] = data.draw(
                st.sampled_from(
                    [b"\xff", b"\x00", b"[", b"{", b"NaN", b"1e999", b"9" * 40, b'"', b",", b"-"]
                ),
                label="bytes",
            )
        elif edit == "flip" and at < len(raw):
            raw[at] ^= data.draw(st.integers(1, 255), label="mask")
        else:
            del raw[at:]
    path = tmp_path / "damaged.json"
    path.write_bytes(bytes(raw))
    outcome(cls.load, path)
    if cls is Schedule:
        outcome(Schedule.from_smoothcache, path)


@FAST
@given(plans=st.dictionaries(st.text(max_size=5), json_values, max_size=3), n=json_values, counts=json_values)
def test_the_schedule_constructor_takes_anything_without_crashing(plans, n, counts):
    outcome(Schedule, n, plans, counts if isinstance(counts, dict) else {})
    outcome(Schedule.from_smoothcache, plans)
    outcome(GuidanceReuse, n, plans)
    outcome(GuidanceReuse, 3, plans, counts, counts, counts)


@FAST
@given(
    n=json_values,
    k=json_values,
    layout=json_values,
    comps=json_values,
    errors=json_values,
    samples=json_values,
)
def test_the_guidance_calibration_constructor_takes_anything_without_crashing(
    n, k, layout, comps, errors, samples
):
    value = outcome(GuidanceCalibration, n, k, layout, comps, errors, samples)
    if value is not None:
        outcome(value.summary)


# ---------------------------------------------------------------- the command line
runner = CliRunner()


def assert_clean(result) -> None:
    """Exit 0, or exit 2 with exactly one ``error:`` line on stderr; never a traceback."""
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        assert all(line.startswith("warning: ") for line in result.stderr.splitlines()), result.stderr
        return
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


NUMBERS = ["0", "1", "2", "-1", "0.5", "1.5", "nan", "inf", "-inf", "1e309", "abc", "", "3", "50", "99999999999999999999", "1" * 400, "0x10", "1_000"]  # fmt: skip
numbers = st.sampled_from(NUMBERS)
BUDGETS = ["16GB", "512MiB", "1.5 GiB", ".5KB", "1", "0", "-1", "1e3GB", "abc", "", "16 parsecs", "1" * 400, "9" * 30 + "TB", "1" * 41 + "B", "NaN", "inf"]  # fmt: skip
budgets = st.sampled_from(BUDGETS)
LONG_NAME = "a" * 300 + ".json"  # longer than a file name can be


@pytest.fixture
def places(tmp_path):
    small_calibration().save(tmp_path / "cal.json")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "corrupt.json").write_text('{"format": "stepcache.calibration", "num_steps": Infinity}')
    names = list(small_calibration().components)
    for name, sizes in {
        "sizes.json": json.dumps(dict.fromkeys(names, 4096)),
        "sizes-huge.json": json.dumps(dict.fromkeys(names, 2**64)),
        "sizes-2e62.json": json.dumps(dict.fromkeys(names, 2**62)),
        "sizes-float.json": json.dumps(dict.fromkeys(names, 1.5)),
        "sizes-negative.json": json.dumps(dict.fromkeys(names, -1)),
        "sizes-partial.json": json.dumps({names[0]: 1}),
        "sizes-deep.json": "[" * 100_000 + "]" * 100_000,
        "sizes-nan.json": '{"b.0.attn": NaN}',
        "sizes-list.json": "[1, 2]",
        "sizes-digits.json": '{"b.0.attn": ' + "9" * 40 + "}",
    }.items():
        (tmp_path / name).write_text(sizes)
    return tmp_path


def options(data: st.DataObject, pool: dict[str, st.SearchStrategy | None]) -> list[str]:
    """Some of the options in ``pool`` (None: a flag), each with a drawn value, in random order."""
    names = data.draw(st.lists(st.sampled_from(sorted(pool)), max_size=5, unique=True), label="options")
    args: list[str] = []
    for name in names:
        args += [name] if pool[name] is None else [name, data.draw(pool[name], label=name)]
    return args


@FAST
@given(data=st.data())
def test_schedule_command_lines(places, data):
    t = places
    outputs = st.sampled_from(
        [
            str(t / "s.json"),
            str(t / "dir"),
            str(t / "file" / "s.json"),
            str(t / "cal.json"),
            str(t / "o.json"),
            str(t / LONG_NAME),
            str(t / ("b" * 250 + ".json")),  # long, and fits: the temporary file's name is shortened
        ]
    )
    sizes = st.sampled_from(
        [*sorted(str(p) for p in t.glob("sizes*.json")), str(t / "dir"), str(t / "no.json")]
    )
    pool = {
        "--alpha": numbers,
        "--compute-fraction": numbers,
        "--granularity": st.sampled_from(["type", "layer", "block", ""]),
        "--policy": st.sampled_from(["smoothcache", "optimal", "greedy"]),
        "--forecast": None,
        "--no-forecast": None,
        "--budget": st.sampled_from(["calls", "macs", "flops"]),
        "-o": outputs,
        "--smoothcache-out": outputs,
        "--memory-budget": budgets,
        "--sizes": sizes,
        "--branches": numbers,
        "--bogus": None,
    }
    source = data.draw(
        st.sampled_from(["cal.json", "corrupt.json", "missing.json", "dir", "file"]), label="calibration"
    )
    result = runner.invoke(cli.app, ["schedule", str(t / source), *options(data, pool)])
    assert_clean(result)
    if result.exit_code == 0:
        assert "compute fraction" in result.stdout


class FakePipe:
    """A pipeline-shaped callable; the commands' real work is replaced by stubs below."""

    guidance_scale = 1.0

    def __call__(
        self, class_labels, num_inference_steps=50, guidance_scale=None, generator=None, output_type="pt"
    ):
        raise AssertionError("the stubs do the work")


@pytest.fixture
def stubbed(places, monkeypatch):
    """Commands that would run a model for minutes run stubs, so what is tested is the argument handling."""
    monkeypatch.chdir(places)  # default output paths land here
    monkeypatch.setattr(cli, "_verbose", False)
    cal = small_calibration()
    sched = Schedule(
        5, {"attn": (1, 0, 1, 0, 1)}, meta={"rule": "tuned", "candidate": "c", "tuning": {"runs": 1}}
    )
    # Stubbed where the commands look them up: their own modules (the model loader: cli._targets).
    calibrate_cmd, tune_cmd, demo_cmd = (
        importlib.import_module(f"stepcache.cli.{name}") for name in ("calibrate", "tune", "demo")
    )
    monkeypatch.setattr(targets, "load_target", lambda spec, **kw: FakePipe())
    monkeypatch.setattr(calibrate_cmd, "run_calibration", lambda *a, **k: cal)
    monkeypatch.setattr(calibrate_cmd, "measure_sensitivity", lambda target, c, run, **k: c)
    monkeypatch.setattr(tune_cmd, "run_tune", lambda *a, **k: sched)

    def fake_demo(cfg):
        (cfg.out).mkdir(parents=True, exist_ok=True)
        return {"variants": {}}

    monkeypatch.setattr(demo_cmd, "run_demo", fake_demo)
    monkeypatch.setattr(demo_cmd, "format_report", lambda report: "report")

    class Row:
        def as_dict(self):
            return {"title": "stub"}

    generate_cmd = importlib.import_module("stepcache.cli.generate")
    image = torch.zeros(1, 3, 4, 4)
    monkeypatch.setattr(generate_cmd, "_cached", lambda *a, **k: (1.0, image))
    monkeypatch.setattr(generate_cmd, "_timed", lambda run: (1.0, image))
    monkeypatch.setattr(generate_cmd, "_save", lambda path, panels: None)
    plan_cmd = importlib.import_module("stepcache.cli.plan_memory")
    monkeypatch.setattr(plan_cmd, "plan_rows", lambda name, **kw: Row())
    monkeypatch.setattr(plan_cmd, "render_plans", lambda rows: "table")

    return places


@FAST
@given(data=st.data())
def test_command_lines_of_the_commands_that_run_models(stubbed, data):
    t = stubbed
    files = st.sampled_from(
        [str(t / "out.json"), str(t / "dir"), str(t / "file" / "x.json"), str(t / "c.png"), str(t / "c.txt"),
         str(t / LONG_NAME), str(t / (LONG_NAME[:-5] + ".png"))]
    )  # fmt: skip
    folders = st.sampled_from([str(t / "demo"), str(t / "file"), str(t / "dir"), str(t / LONG_NAME[:-5])])
    model = st.sampled_from(["tiny-dit", "reference", "some/model", "pkg:factory"])
    run_opts = {
        "--steps": numbers, "--samples": numbers, "--batch": numbers, "--seed": numbers,
        "--scheduler": st.sampled_from(["ddim", "dpm", "euler"]), "--guidance-scale": numbers,
        "--prompt": st.sampled_from(["a cat", ""]), "-o": files,
    }  # fmt: skip
    commands = {
        "calibrate": (True, {**run_opts, "--lookahead": numbers, "--plot": files, "--no-forecast": None,
                             "--sensitivity": numbers, "--sensitivity-samples": numbers}),
        "tune": (True, {**run_opts, "--compute-fraction": numbers,
                        "--calibration": st.sampled_from([str(t / "cal.json"), str(t / "corrupt.json")]),
                        "--memory-budget": budgets, "--validation": numbers, "--top-k": numbers,
                        "--refine": numbers, "--max-replays": numbers,
                        "--objective": st.sampled_from(["mean", "worst-25%", "worst-0", "quantile-2", "x"])}),
        "demo": (False, {"-o": folders, "--scheduler": st.sampled_from(["ddim", "dpm", "x"]), "--steps": numbers,
                         "--per-class": numbers, "--classes": st.sampled_from(["0,1", "1,1", "x", "", "12"]),
                         "--alpha": numbers, "--compute-fraction": numbers, "--guidance-scale": numbers,
                         "--seed": numbers, "--calibration-samples": numbers}),
        "info": (True, {"--types": st.sampled_from(["attn,ff", "mlp", ",", "block"]), "--no-macs": None}),
        "generate": (True, {"--compute-fraction": numbers, "-o": files, "--compare": None, "--steps": numbers,
                             "--calibration-runs": numbers, "--seed": numbers, "--guidance-scale": numbers,
                             "--prompt": st.sampled_from(["a cat", ""]),
                             "--scheduler": st.sampled_from(["ddim", "dpm", "euler"])}),
        "plan-memory": (False, {"--memory-budget": budgets, "--compute-fraction": numbers, "--bandwidth": numbers,
                                "--tflops": numbers, "--utilisation": numbers, "--json": files}),
    }  # fmt: skip
    name = data.draw(st.sampled_from(sorted(commands)), label="command")
    takes_model, pool = commands[name]
    args = [name, *([data.draw(model, label="model")] if takes_model else []), *options(data, pool)]
    assert_clean(runner.invoke(cli.app, args))


TOKENS = ["calibrate", "schedule", "tune", "demo", "bench", "info", "tiny-dit", "cal.json", "--steps", "--out", "-o", "-v", "--help-me", "0", "nan", "--", "x:y", "--alpha", "--compute-fraction", "-1", "0.5"]  # fmt: skip


@FAST
@given(tokens=st.lists(st.sampled_from(TOKENS), max_size=7))
def test_arbitrary_token_soup(stubbed, tokens):
    """Whatever the tokens (in a scratch folder, with the heavy work stubbed), never a traceback."""
    result = runner.invoke(cli.app, tokens)
    assert "Traceback" not in result.output, tokens
    assert result.exit_code in (0, 2), (tokens, result.output, repr(result.exception))
