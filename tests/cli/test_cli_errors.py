"""The command line never answers bad input with a traceback: exit code 2 and one line on stderr that
says what is wrong (and, for usage errors, where to look), checked before any work starts."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

import stepcache
import stepcache.cli as cli
from stepcache import Calibration, Schedule
from stepcache.cli import _targets as targets

runner = CliRunner()
SHIPPED_FILE = Path(stepcache.__file__).parent / "reference" / "calibrations" / "dpm-20.json"


def run(args: list[str]):
    return runner.invoke(cli.app, args)


def assert_one_line_error(result, expect: str = "") -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    err = result.stderr
    assert "Traceback" not in result.output
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert expect.lower() in err.lower(), err
    return err


@pytest.fixture
def shipped(tmp_path):
    """A copy of a shipped calibration: a command that wrongly wrote over its input must not reach
    the package's own file."""
    copy = tmp_path / "shipped-dpm-20.json"
    copy.write_bytes(SHIPPED_FILE.read_bytes())
    return str(copy)


@pytest.fixture
def files(tmp_path, monkeypatch, shipped):
    """Paths for the cases, and a model loader that fails the test if any case gets that far."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "nan.json").write_text('{"format": "stepcache.calibration", "num_steps": NaN}')
    bad = json.loads(SHIPPED_FILE.read_text())
    first = next(iter(bad["components"].values()))
    first["errors"][3][0] = -0.5
    (tmp_path / "negative.json").write_text(json.dumps(bad))

    def no_work(*args, **kw):
        raise AssertionError(f"work started although the arguments were bad: {args}")

    names = list(bad["components"])
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "huge-sizes.json").write_text(json.dumps(dict.fromkeys(names, 2**64)))
    (tmp_path / "float-sizes.json").write_text(json.dumps(dict.fromkeys(names, 1.5)))
    (tmp_path / "nan-sizes.json").write_text('{"a": NaN}')
    monkeypatch.setattr(targets, "load_target", no_work)
    monkeypatch.setattr(importlib.import_module("stepcache.cli.demo"), "run_demo", no_work)
    monkeypatch.setattr(importlib.import_module("stepcache.cli.plan_memory"), "plan_rows", no_work)
    return tmp_path


LONG = "a" * 300 + ".json"  # longer than a file name can be (255 bytes)


# (arguments, a phrase the one-line error must contain). {t} is a temporary folder, {cal} a calibration.
CASES = [
    # calibrate
    ("calibrate tiny-dit --steps 0", "--steps"),
    ("calibrate tiny-dit --steps 1", "--steps"),
    ("calibrate tiny-dit --steps abc", "--steps"),
    ("calibrate tiny-dit --steps 99999999999999999999", "--steps"),
    ("calibrate tiny-dit --samples 0", "--samples"),
    ("calibrate tiny-dit --batch 0", "--batch"),
    ("calibrate tiny-dit --lookahead 0", "--lookahead"),
    ("calibrate tiny-dit --steps 8 --lookahead 8", "below --steps"),
    ("calibrate tiny-dit --scheduler euler", "--scheduler"),
    ("calibrate some/model --scheduler dpm", "built-in models"),
    ("calibrate tiny-dit --guidance-scale nan", "finite"),
    ("calibrate tiny-dit --guidance-scale inf", "finite"),
    ("calibrate tiny-dit --seed -1", "--seed"),
    ("calibrate tiny-dit --sensitivity -1", "--sensitivity"),
    ("calibrate tiny-dit --sensitivity-samples 3", "--sensitivity-samples is unused"),
    ("calibrate tiny-dit --sensitivity 2 --sensitivity-samples 9", "exceeds --samples"),
    ("calibrate tiny-dit --steps 10 --sensitivity 11", "at most --steps"),
    ("calibrate tiny-dit -o {t}/dir", "is a folder"),
    ("calibrate tiny-dit -o {t}/file/c.json", "is a file, not a folder"),
    ("calibrate tiny-dit -o {t}/c.json --plot {t}/c.json", "same file"),
    ("calibrate tiny-dit -o {t}/c.json --plot {t}/c.txt", "not an image format"),
    ("calibrate tiny-dit --no-such-option", "no such option"),
    ("calibrate", "missing argument"),
    # schedule
    ("schedule {cal} --alpha -1", "--alpha"),
    ("schedule {cal} --alpha nan", "--alpha"),
    ("schedule {cal} --compute-fraction 0", "--compute-fraction"),
    ("schedule {cal} --compute-fraction 1.5", "--compute-fraction"),
    ("schedule {cal} --compute-fraction nan", "--compute-fraction"),
    ("schedule {cal} --alpha 0.1 --policy greedy", "--policy"),
    ("schedule {cal} --alpha 0.1 --granularity block", "--granularity"),
    ("schedule {cal} --policy optimal --compute-fraction 0.5 --budget flops", "--budget"),
    ("schedule {cal} --policy optimal --alpha 0.1", "--compute-fraction"),
    ("schedule {cal} --alpha 0.1 --compute-fraction 0.5", "exactly one"),
    ("schedule {cal}", "exactly one"),
    ("schedule {cal} --alpha 0.1 --forecast", "--forecast is unused"),
    ("schedule {cal} --alpha 0.1 --budget macs", "--budget is unused"),
    ("schedule {cal} --alpha 0.1 -o {t}/dir", "is a folder"),
    ("schedule {cal} --alpha 0.1 -o {cal}", "also an input"),
    ("schedule {cal} --alpha 0.1 -o {t}/s.json --smoothcache-out {t}/s.json", "same file"),
    ("schedule {t}/nan.json --alpha 0.1", "NaN is not a JSON number"),
    ("schedule {t}/negative.json --alpha 0.1", "must be a number >= 0 or null"),
    ("schedule {t}/dir --alpha 0.1", "cannot read"),
    ("schedule {t}/missing.json --alpha 0.1", "cannot read"),
    # tune
    ("tune tiny-dit --compute-fraction 0", "--compute-fraction"),
    ("tune tiny-dit", "--compute-fraction"),
    ("tune tiny-dit --compute-fraction 0.5 --steps 2", "--steps"),
    ("tune tiny-dit --compute-fraction 0.5 --batch 0", "--batch"),
    ("tune tiny-dit --compute-fraction 0.5 --samples 0", "--samples"),
    ("tune tiny-dit --compute-fraction 0.5 --scheduler foo", "--scheduler"),
    ("tune tiny-dit --compute-fraction 0.5 -o {t}/dir", "is a folder"),
    ("tune tiny-dit --compute-fraction 0.5 --calibration {t}/nan.json", "NaN"),
    ("tune tiny-dit --compute-fraction 0.5 --calibration {cal} --steps 30", "differs from the calibration"),
    ("tune tiny-dit --compute-fraction 0.5 --calibration {cal} -o {cal}", "also an input"),
    # demo
    ("demo --classes 1,1", "distinct digits"),
    ("demo --classes a,b", "digits"),
    ("demo --classes 10", "digits 0..9"),
    ("demo --classes ,", "digits 0..9"),
    ("demo --steps 1", "--steps"),
    ("demo --per-class 0", "--per-class"),
    ("demo --alpha -1", "--alpha"),
    ("demo --compute-fraction 2", "--compute-fraction"),
    ("demo --guidance-scale nan", "finite"),
    ("demo --scheduler heun", "--scheduler"),
    ("demo --seed 99999999999999999999", "--seed"),
    ("demo -o {t}/file", "is a file, not a folder"),
    ("demo --calibration-samples 3 -o {t}/demo", "--calibration-samples is unused"),
    ("demo --calibration-samples 0", "--calibration-samples"),
    # info
    ("info tiny-dit --types mlp", "--types"),
    ("info tiny-dit --types ,", "--types"),
    ("info", "missing argument"),
    ("frobnicate", "no such command"),
    # issue 24: numbers, JSON and names that ended in the unexpected-error path (exit 1), or after the work
    ("schedule {cal} --alpha 0.1 --memory-budget " + "1" * 400, "--memory-budget"),
    ("schedule {cal} --alpha 0.1 --memory-budget 99999999999999999999TB", "--memory-budget"),
    ("schedule {cal} --alpha 0.1 --memory-budget 1GB --sizes {t}/deep.json", "nests"),
    ("schedule {cal} --alpha 0.1 --memory-budget 1GB --sizes {t}/huge-sizes.json", "bytes"),
    ("schedule {cal} --alpha 0.1 --memory-budget 1GB --sizes {t}/float-sizes.json", "bytes"),
    ("schedule {cal} --alpha 0.1 --memory-budget 1GB --sizes {t}/nan-sizes.json", "NaN"),
    ("schedule {cal} --alpha 0.1 --memory-budget 1GB --sizes {t}/dir", "folder"),
    ("schedule {cal} --alpha 0.1 -o {t}/" + LONG, "too long"),
    ("schedule {cal} --alpha 0.1 --smoothcache-out {t}/" + LONG, "too long"),
    ("calibrate tiny-dit -o {t}/" + LONG, "too long"),
    ("calibrate tiny-dit --plot {t}/" + LONG[:-5] + ".png", "too long"),
    ("tune tiny-dit --compute-fraction 0.5 -o {t}/" + LONG, "too long"),
    ("tune tiny-dit --compute-fraction 0.5 --memory-budget " + "9" * 400, "--memory-budget"),
    ("demo -o {t}/" + LONG[:-5], "too long"),
    ("plan-memory flux.1-dev-1024 --json {t}/" + LONG, "too long"),
    ("plan-memory flux.1-dev-1024 --memory-budget " + "1" * 400, "--memory-budget"),
    ("plan-memory flux.1-dev-1024 --bandwidth inf", "--bandwidth"),
    ("plan-memory flux.1-dev-1024 --tflops 1e309", "--tflops"),
    ("plan-memory flux.1-dev-1024 --bandwidth nan", "--bandwidth"),
]


@pytest.mark.parametrize("line, expect", CASES, ids=[c[0].replace("{", "").replace("}", "") for c in CASES])
def test_bad_arguments_are_one_line_errors_before_any_work(files, shipped, line, expect):
    args = shlex.split(line.format(t=files, cal=shipped))
    assert_one_line_error(run(args), expect)


@pytest.mark.parametrize(
    "model, expect",
    [
        ("os:sep", "not a function"),
        ("json:loads", "json:loads() raised TypeError"),
        ("no_such_module_xyz:make", "ModuleNotFoundError"),
        (":", "Empty module name"),
        ("os:", "cannot load"),
        ("stepcache:__version__", "not a function"),
    ],
)
def test_module_factories_that_are_not_factories(model, expect):
    assert_one_line_error(run(["info", model]), expect)
    assert_one_line_error(run(["calibrate", model, "--steps", "4"]), expect)


def test_a_factory_returning_a_module_is_refused_where_a_pipeline_is_needed(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(targets, "load_target", lambda spec, **kw: torch.nn.Linear(2, 2))
    assert_one_line_error(
        run(["calibrate", "m:f", "-o", str(tmp_path / "c.json")]), "make module:factory return a pipeline"
    )


def test_unwritable_output_folder(tmp_path, monkeypatch, shipped):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    monkeypatch.setattr(targets, "load_target", lambda *a, **k: pytest.fail("model loaded"))
    assert_one_line_error(run(["calibrate", "tiny-dit", "-o", str(locked / "c.json")]), "no permission")
    assert_one_line_error(
        run(["schedule", shipped, "--alpha", "0.1", "-o", str(locked / "s.json")]), "no permission"
    )


def test_a_write_that_fails_at_the_end_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, shipped):
    out = tmp_path / "s.json"
    out.write_text("old schedule")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    err = assert_one_line_error(run(["schedule", shipped, "--alpha", "0.1", "-o", str(out)]), "No space left")
    assert "previous file is unchanged" in err and out.read_text() == "old schedule"


def test_lossy_exports_are_one_warning_line(tmp_path, shipped):
    out = tmp_path / "orig.json"
    result = run(
        [
            "schedule",
            shipped,
            "--policy",
            "optimal",
            "--compute-fraction",
            "0.5",
            "--smoothcache-out",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: stepcache: the original SmoothCache format has no forecasting")
    assert result.stderr.count("\n") == 1 and json.loads(out.read_text())


def test_the_mac_budget_from_the_command_line(tmp_path, shipped):
    out = tmp_path / "s.json"
    args = [
        "schedule",
        shipped,
        "--policy",
        "optimal",
        "--compute-fraction",
        "0.5",
        "--budget",
        "macs",
        "-o",
        str(out),
    ]
    result = run(args)
    assert result.exit_code == 0, result.output
    assert Schedule.load(out).meta["budget"] == "macs"


def test_an_unexpected_error_is_one_line_with_exit_1_and_verbose_shows_it(monkeypatch, shipped):
    def boom(path):
        raise RuntimeError("disk controller on fire\nsecond line")

    monkeypatch.setattr(Calibration, "load", boom)
    result = run(["schedule", shipped, "--alpha", "0.1"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: unexpected RuntimeError: disk controller on fire second line")
    assert "--verbose" in result.stderr
    result = run(["--verbose", "schedule", shipped, "--alpha", "0.1"])
    assert isinstance(result.exception, RuntimeError)
    monkeypatch.setattr(cli, "_verbose", False)


def test_help_and_no_arguments_still_work():
    assert run(["--help"]).exit_code == 0
    assert run(["schedule", "--help"]).exit_code == 0
    result = run([])
    assert result.exit_code == 2 and "calibrate" in result.output
