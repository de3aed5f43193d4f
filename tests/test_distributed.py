"""Calibration and caching across real processes: two ranks on the CPU (gloo), one spawn for every
scenario (see tests/_helpers/distributed_workers.run), compared here with one process doing all the work."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import stepcache
from stepcache import Calibration, distributed
from stepcache.errors import DistributedError
from tests._helpers.distributed_workers import STEPS, PlainPipe, inputs, make_model, run, sample, schedule

WORLD = 2


def two_processes(test):
    """A check of what the two processes of ``ranks`` wrote: slow (they start once per module, a few
    seconds), and kept on one pytest-xdist worker so that they start once."""
    return pytest.mark.slow(pytest.mark.xdist_group("ranks")(test))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario on two processes; the folder of what they wrote."""
    out = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(run, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the distributed scenarios hung (killed after 120 s)")
    return out


def assert_same(a: Calibration, b: Calibration, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert (a.num_steps, a.lookahead, a.num_samples) == (b.num_steps, b.lookahead, b.num_samples)
    assert dict(a.components) == dict(b.components)
    for table in ("errors", "spread", "forecast_errors"):
        x, y = getattr(a, table), getattr(b, table)
        assert set(x) == set(y), table
        for name in x:
            np.testing.assert_allclose(x[name], y[name], rtol=rtol, atol=atol, equal_nan=True, err_msg=table)


@pytest.fixture(scope="module")
def whole():
    """One process calibrating every input."""
    return stepcache.calibrate(
        PlainPipe(make_model()), inputs=inputs(), num_inference_steps=STEPS, lookahead=2, progress=False
    )


@two_processes
def test_sharded_calibration_equals_one_process(ranks, whole):
    per_rank = [Calibration.load(ranks / f"sharded_rank{r}.json") for r in range(WORLD)]
    for cal in per_rank:
        assert_same(cal, whole)
        assert cal.meta["processes"] == WORLD
    assert np.nanmax(whole.spread[next(iter(whole.spread))]) > 0  # spread really pooled


@two_processes
def test_merge_of_per_rank_files_equals_one_process(ranks, whole):
    files = [ranks / f"alone_rank{r}.json" for r in range(WORLD)]
    parts = [Calibration.load(f) for f in files]
    assert [p.num_samples for p in parts] == [2, 1]  # inputs 0, 2 on rank 0; input 1 on rank 1
    merged = Calibration.merge(files)
    assert_same(merged, whole)
    assert merged.meta["merged_from"] == WORLD


@two_processes
def test_a_failing_generation_fails_every_rank(ranks):
    reports = [json.loads((ranks / f"report_rank{r}.json").read_text()) for r in range(WORLD)]
    assert "rank 1 of the calibration's process group failed" in reports[0]["failure"]
    assert reports[1]["failure"] == "RuntimeError: this rank's generation failed"


@two_processes
def test_schedule_mismatch_fails_fast_on_every_rank(ranks):
    for r in range(WORLD):
        report = json.loads((ranks / f"report_rank{r}.json").read_text())
        assert "ranks enable different schedules" in report["mismatch"], report["mismatch"]
        assert f"this is rank {r}" in report["mismatch"]
        assert report["mismatch_seconds"] < 10


@two_processes
def test_a_rank_missing_the_check_times_out_instead_of_hanging(ranks):
    report = json.loads((ranks / "report_rank0.json").read_text())
    assert "schedule check: not every rank of the process group took part within 3 s" in report["timeout"]
    assert 2.5 < report["timeout_seconds"] < 20


@two_processes
def test_context_parallel_generation_cached_and_not_equals_one_process(ranks):
    model = make_model()
    y = torch.tensor([1, 3])
    uncached = sample(model, y, STEPS, seed=5, guidance=2.0)
    with stepcache.cache(model, schedule()) as handle:
        cached = sample(model, y, STEPS, seed=5, guidance=2.0)
        cached2 = sample(model, torch.tensor([2]), STEPS, seed=6, guidance=2.0)
    assert not torch.allclose(cached, uncached, atol=1e-4)  # the schedule really reuses
    report = json.loads((ranks / "report_rank0.json").read_text())
    assert report["sp_reused"] == handle.stats.reused > 0
    for r in range(WORLD):
        torch.testing.assert_close(torch.load(ranks / f"sp_uncached_rank{r}.pt"), uncached)
        torch.testing.assert_close(torch.load(ranks / f"sp_cached_rank{r}.pt"), cached)
        torch.testing.assert_close(torch.load(ranks / f"sp_cached2_rank{r}.pt"), cached2)


@two_processes
def test_calibration_under_context_parallelism_measures_the_whole_sequence(ranks):
    model = make_model()

    def whole_run():
        for i in range(2):
            sample(model, torch.tensor(inputs(2)[i]["labels"]), STEPS, seed=i, guidance=2.0)

    want = stepcache.calibrate(model, run=whole_run, lookahead=2, progress=False)
    for r in range(WORLD):
        got = Calibration.load(ranks / f"sp_calibration_rank{r}.json")
        assert_same(got, want, rtol=2e-5, atol=1e-7)
        # MACs: each rank counts its slice; summed over the group they are the whole sequence's.
        for name, macs in want.macs.items():
            assert got.macs[name] == pytest.approx(macs, rel=0.05)


@two_processes
def test_diffusers_ulysses_context_parallelism_cached_and_calibrated(ranks):
    """diffusers' own ContextParallelConfig(ulysses_degree=2) on a tiny Flux transformer: cached
    output and calibration (with sequence_group) equal one process's; without sequence_group each
    rank measures only its slice and the ranks disagree."""
    from tests._helpers.distributed_workers import flux_runs, flux_sample, tiny_flux

    report = json.loads((ranks / "report_rank0.json").read_text())
    assert "diffusers_error" not in report, report["diffusers_error"]
    model = tiny_flux()
    with stepcache.cache(model, schedule()) as handle:
        cached = flux_sample(model)
    assert handle.stats.reused > 0
    want = stepcache.calibrate(model, run=flux_runs(model), lookahead=2, progress=False)
    slices = [Calibration.load(ranks / f"flux_slice_calibration_rank{r}.json") for r in range(WORLD)]
    name = "transformer_blocks.0.ff"
    assert not np.allclose(slices[0].errors[name], slices[1].errors[name], equal_nan=True)
    for r in range(WORLD):
        torch.testing.assert_close(torch.load(ranks / f"flux_cached_rank{r}.pt"), cached)
        got = Calibration.load(ranks / f"flux_calibration_rank{r}.json")
        assert_same(got, want, rtol=2e-5, atol=1e-7)
        assert got.macs == pytest.approx(want.macs)


def test_without_a_process_group_nothing_distributed_happens():
    assert not distributed.is_initialized()
    assert distributed.resolve_group(distributed.AUTO) is None
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(DistributedError, match="not initialised"):
        distributed.resolve_group(object())
    with pytest.raises(DistributedError, match="timeout"):
        distributed.set_schedule_check(timeout=0)


def _torchrun(args: list[str], cwd, timeout: float = 180, launcher: str = "torchrun"):
    """``torchrun --nproc_per_node 2 ARGS`` (or ``accelerate launch --cpu --num_processes 2 ARGS``)
    with this checkout's stepcache, one thread per rank."""
    import os
    import subprocess
    import sys

    source = os.path.dirname(os.path.dirname(stepcache.__file__))
    path = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--main_process_port", str(_free_port()), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command += ["--master_port", str(_free_port()), *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        "torchrun",
        # accelerate launch sets the same RANK, WORLD_SIZE and rendezvous variables, all the script reads
        pytest.param("accelerate", marks=pytest.mark.nightly),
    ],
)
def test_generation_recipe_under_torchrun_equals_one_process(tmp_path, launcher):
    """benchmarks/distributed_generate.py (the recipe of docs/distributed.md) on two processes: the
    schedule from the sharded calibration is one process's, and each image is what one process
    generates with it."""
    from pathlib import Path

    from stepcache.reference import ReferencePipeline

    script = Path(__file__).parents[1] / "benchmarks" / "distributed_generate.py"
    args = ["--labels", "3", "--steps", "6", "--calibration-samples", "2"]
    done = _torchrun([str(script), "--out", "out", *args], tmp_path, launcher=launcher)
    assert done.stdout.count("rank 0:") == 1
    pipe = ReferencePipeline("ddim")
    inputs = [{"class_labels": [i], "generator": torch.Generator().manual_seed(1000 + i)} for i in range(2)]
    cal = stepcache.calibrate(pipe, inputs=inputs, num_inference_steps=6, lookahead=3, progress=False)
    schedule = stepcache.Schedule.load(tmp_path / "out" / "schedule.json")
    assert schedule.plans == stepcache.optimal_schedule(cal, 0.5).plans
    with stepcache.cache(pipe, schedule):
        for i in range(3):
            image = pipe(class_labels=[i], num_inference_steps=6, seed=i)
            torch.testing.assert_close(torch.load(tmp_path / "out" / f"label-{i}.pt"), image)


@pytest.mark.slow
def test_cli_calibrate_under_torchrun_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m stepcache calibrate``: the ranks share the samples, rank 0
    alone writes and reports (one summary, one progress bar), and the file equals one process's."""
    from typer.testing import CliRunner

    from stepcache.cli import app

    args = ["calibrate", "reference", "--steps", "6", "--samples", "3", "--lookahead", "2"]
    done = _torchrun(["-m", "stepcache", *args, "--out", "dist.json"], tmp_path)
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("Calibration:") == 1, done.stdout
    assert done.stderr.count("calibrating:   0%") <= 1  # a progress bar on rank 0 only
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    got, want = Calibration.load(tmp_path / "dist.json"), Calibration.load(tmp_path / "one.json")
    assert got.meta["processes"] == 2 and "processes" not in want.meta
    assert_same(got, want)


def test_ranks_other_than_0_log_warnings_only(monkeypatch):
    import logging

    from stepcache import _logging

    root = logging.getLogger("stepcache")
    monkeypatch.setattr(_logging, "_explicit", False)
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setenv("RANK", "0")
    _logging.quiet_other_ranks()
    assert root.level == logging.INFO and distributed.is_main()
    monkeypatch.setenv("RANK", "3")  # set by torchrun before any process group exists
    _logging.quiet_other_ranks()
    assert root.level == logging.WARNING and not distributed.is_main()
    monkeypatch.setattr(root, "level", logging.DEBUG)
    monkeypatch.setattr(_logging, "_explicit", True)  # set_verbosity() wins on every rank
    _logging.quiet_other_ranks()
    assert root.level == logging.DEBUG


def test_collectives_without_a_process_group_are_clear_errors_or_a_group_of_one():
    """all_reduce / all_gather / group_rank without an initialised process group raised torch's raw
    errors (issue 24). Without a group (None) they act on this process alone."""
    assert not distributed.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce(t, None), t)
    assert [x.tolist() for x in distributed.all_gather(t, None)] == [[1.0, 2.0]]
    assert distributed.group_rank(None) == 0 and distributed.group_size(None) == 1
    for call in (
        lambda: distributed.all_reduce(t, object()),
        lambda: distributed.all_gather(t, object()),
        lambda: distributed.group_rank(object()),
        lambda: distributed.group_size(object()),
    ):
        with pytest.raises(DistributedError, match="not initialised"):
            call()
    with pytest.raises(DistributedError, match="op"):
        distributed.all_reduce(t, None, op="mean")
