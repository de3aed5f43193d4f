"""`stepcache demo` end to end on a tiny setting (5 steps, 2 classes)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stepcache.cli import app

# compiles / generates: seconds each; one pytest-xdist worker runs the module, so demo_run runs once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]

# 5 steps, 2 classes: nothing is shipped for 5 steps, so the demo also calibrates.
TINY = ["--steps", "5", "--classes", "3,7", "--per-class", "4", "--calibration-samples", "2"]
VARIANT_KEYS = {"wall_s", "speedup", "compute_fraction", "fd", "fd_interval", "class_accuracy"}
CACHED_KEYS = VARIANT_KEYS | {"psnr_db", "ssim", "alpha", "schedule", "stats"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    args = ["demo", "--out", str(out), *TINY]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_writes_three_files_with_documented_keys(demo_run):
    out, output = demo_run
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert {
        "scheduler",
        "steps",
        "guidance_scale",
        "classes",
        "samples",
        "seed",
        "calibration",
        "fd_noise_floor",
        "variants",
    } <= set(report)
    assert report["steps"] == 5 and report["classes"] == [3, 7] and report["samples"] == 8
    assert "calibrated now" in report["calibration"]  # nothing is shipped for 5 steps
    names = list(report["variants"])
    assert names[0] == "uncached" and len(names) == 3
    assert set(report["variants"]["uncached"]) >= VARIANT_KEYS
    for name in names[1:]:
        v = report["variants"][name]
        assert set(v) >= CACHED_KEYS
        assert 0 < v["compute_fraction"] <= 1 and v["psnr_db"] > 0
    assert "FD noise floor" in output and "speed-up" in output


def test_demo_is_reproducible(demo_run, tmp_path):
    out, _ = demo_run
    args = ["demo", "--out", str(tmp_path), *TINY]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = json.loads((out / "report.json").read_text())["variants"]
    second = json.loads((tmp_path / "report.json").read_text())["variants"]
    for name in first:
        for key in ("compute_fraction", "fd", "class_accuracy", "psnr_db", "ssim"):
            assert first[name].get(key) == second[name].get(key), (name, key)


def test_demo_rejects_bad_classes(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--classes", "3,x"])
    assert result.exit_code == 2 and "--classes" in result.output


def test_demo_on_the_flow_model(tmp_path):
    """`--model flow` runs the demo on dit_digits_flow with its flow-Euler sampler."""
    args = ["demo", "--model", "flow", "--out", str(tmp_path), *TINY]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["scheduler"] == "flow-euler" and "flow matching" in report["model"]
    assert report["samples"] == 8 and len(report["variants"]) == 3
    assert "flow-euler 5 steps" in result.output
