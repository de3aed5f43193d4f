"""The command line, end to end on the built-in tiny DiT."""

from __future__ import annotations

from typer.testing import CliRunner

from stepcache import Calibration, Schedule
from stepcache.cli import app
from stepcache.policies import open_loop_schedule

runner = CliRunner()


def test_info():
    result = runner.invoke(app, ["info", "tiny-dit"])
    assert result.exit_code == 0, result.output
    assert "transformer_blocks: 4 blocks of BasicTransformerBlock" in result.output
    assert "attn1=attn, ff=ff" in result.output
    assert "share of the denoiser's MACs per step" in result.output


def test_calibrate_then_schedule(tmp_path):
    cal_path, sched_path, orig = tmp_path / "cal.json", tmp_path / "s.json", tmp_path / "orig.json"
    result = runner.invoke(
        app,
        [
            "calibrate",
            "tiny-dit",
            "--steps",
            "8",
            "--samples",
            "2",
            "-o",
            str(cal_path),
            "--plot",
            str(tmp_path / "c.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert Calibration.load(cal_path).num_samples == 2
    assert (tmp_path / "c.png").exists()
    result = runner.invoke(
        app,
        [
            "schedule",
            str(cal_path),
            "--compute-fraction",
            "0.7",
            "-o",
            str(sched_path),
            "--smoothcache-out",
            str(orig),
        ],
    )
    assert result.exit_code == 0, result.output
    assert Schedule.load(sched_path).compute_fraction <= 0.7
    assert "compute fraction" in result.output and orig.exists()


def test_errors_are_clean(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = runner.invoke(app, ["schedule", str(bad), "--alpha", "0.1"])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    result = runner.invoke(app, ["schedule", str(bad)])
    assert result.exit_code == 2 and "exactly one of" in result.output
    result = runner.invoke(app, ["info", "no_such_module:factory"])
    assert result.exit_code == 2 and "cannot load" in result.output


def test_model_from_a_local_pipeline_folder(tmp_path):
    """The real loading code (DiffusionPipeline.from_pretrained) on a folder, nothing downloaded."""
    from stepcache.integrations.diffusers import tiny_dit_pipeline

    tiny_dit_pipeline(num_layers=2).save_pretrained(tmp_path / "pipe")
    result = runner.invoke(app, ["info", str(tmp_path / "pipe"), "--no-macs"])
    assert result.exit_code == 0, result.output
    assert "transformer_blocks: 2 blocks of BasicTransformerBlock" in result.output
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "cannot load" in result.output


def test_sensitivity_optimal_and_tune_from_the_command_line(tmp_path):
    cal_path, out = tmp_path / "cal.json", tmp_path / "s.json"
    args = [
        "calibrate",
        "tiny-dit",
        "--steps",
        "8",
        "--samples",
        "2",
        "--sensitivity",
        "2",
        "-o",
        str(cal_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cal = Calibration.load(cal_path)
    assert (
        cal.weights and cal.forecast_errors and cal.meta["sensitivity"]["runs"] == 1 + 2 * 2 * 2
    )  # step groups x types x depth halves
    args = ["schedule", str(cal_path), "--policy", "optimal", "--compute-fraction", "0.5", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    sched = Schedule.load(out)
    assert sched.meta["rule"] == "optimal" and sched.meta["weighted"] and sched.compute_fraction == 0.5
    result = runner.invoke(app, ["schedule", str(cal_path), "--policy", "optimal", "--alpha", "0.1"])
    assert result.exit_code == 2 and "--compute-fraction" in result.output
    args = ["tune", "tiny-dit", "--compute-fraction", "0.5", "--steps", "8", "--samples", "1", "--batch", "2"]
    result = runner.invoke(app, [*args, "--calibration", str(cal_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "chosen:" in result.output and Schedule.load(out).meta["rule"] == "tuned"
    result = runner.invoke(app, [*args, "--fit", "2"])
    assert result.exit_code == 2 and "MODEL=reference only" in result.output


def test_tune_with_fitted_forecasts(tmp_path):
    out = tmp_path / "fitted.json"
    args = [
        "tune",
        "reference",
        "--model",
        "flow",
        "--compute-fraction",
        "0.5",
        "--steps",
        "8",
        "--samples",
        "1",
    ]
    result = runner.invoke(app, [*args, "--max-replays", "4", "--fit", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "forecast gains fitted" in result.output and "per component" in result.output
    sched = Schedule.load(out)
    assert sched.gains_per_selector and sched.meta["forecast_fit"]["iterations"] == 2
    result = runner.invoke(
        app, [*args, "--max-replays", "4", "--fit", "1", "--fit-per", "layer", "-o", str(out)]
    )
    assert result.exit_code != 0 and "must be one of component, step" in result.output


def test_plan_memory_table(tmp_path):
    import json

    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan-memory", "wan2.1-1.3b-480p", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "| Wan2.1-T2V-1.3B 480p 81 frames, split CFG | 90 x 2 | 101 |" in result.output
    assert "Estimates, not measurements" in result.output
    (row,) = json.loads(out.read_text())
    # Measured on the meta model: tokens x width x 2 bytes (bf16), one store per branch.
    assert row["output_bytes"] == 32_760 * 1_536 * 2
    assert row["unplanned"] == 2 * 90 * 32_760 * 1_536 * 2
    assert row["fp8"] < row["liveness"] / 1.9 and row["offload"] < row["liveness"] / 10
    result = runner.invoke(app, ["plan-memory", "--memory-budget", "16 parsecs"])
    assert result.exit_code == 2 and "unknown unit" in result.output
    result = runner.invoke(app, ["plan-memory", "sdxl"])
    assert result.exit_code == 2 and "unknown model shape" in result.output


def test_schedule_with_a_memory_budget(tmp_path):
    import json

    from stepcache import reference

    cal = reference.shipped_calibration("ddim", 50)
    cal_path = tmp_path / "cal.json"
    cal.save(cal_path)
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps(dict.fromkeys(cal.components, 1000)))
    out = tmp_path / "s.json"
    args = ["schedule", str(cal_path), "--compute-fraction", "0.5", "--memory-budget", "6kB"]
    result = runner.invoke(app, [*args, "--sizes", str(sizes), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "memory: predicted peak" in result.output and "fitted" in result.output
    assert Schedule.load(out).meta["memory"]["predicted_peak"] <= 6000
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "output size" in result.output
    result = runner.invoke(
        app, ["schedule", str(cal_path), "--compute-fraction", "0.5", "--sizes", str(sizes)]
    )
    assert result.exit_code == 2 and "--memory-budget" in result.output


def test_calibrate_records_the_output_response_on_the_reference_model(tmp_path):
    cal_path = tmp_path / "cal.json"
    base = ["calibrate", "reference", "--model", "flow", "--steps", "6", "--samples", "2", "--batch", "2"]
    result = runner.invoke(app, [*base, "--response", "-o", str(cal_path)])
    assert result.exit_code == 0, result.output
    cal = Calibration.load(cal_path)
    assert cal.meta["response"]["samples"] == 2 and all(
        a.shape == (2, 6, 6, 2) for a in cal.response.values()
    )
    schedule = open_loop_schedule(cal, 0.5)
    assert schedule.meta["open_loop"]["rule"] == "output response"
    result = runner.invoke(
        app, ["calibrate", "tiny-dit", "--steps", "6", "--response", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "reference model" in " ".join(result.output.split())
