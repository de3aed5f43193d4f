"""The second reference model, ``dit_digits_flow`` (flow matching): training objective, shipped weights,
flow-Euler sampling, step tracking of float timesteps, caching with its shipped calibration, CLI checks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stepcache import cache, reference
from stepcache.cli import app
from stepcache.errors import StepCacheError
from stepcache.policies import from_calibration
from stepcache.reference._model import FLOW_MODEL_CONFIG_FILE, FLOW_MODEL_WEIGHTS_FILE, MODEL_FILES
from stepcache.reference._weights import file_sha256
from stepcache.runtime.steps import StepTracker

WEIGHTS = reference.DEFAULT_WEIGHTS_DIR
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_reference.py"


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_reference_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def flow_model():
    return reference.load_model(model="flow")


# -- training objective ---------------------------------------------------------------------------
def test_flow_matching_batch_is_rectified_flow(train_script):
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt, timestep, target = train_script.flow_matching_batch(x0, t, noise)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(target, noise - x0) and torch.equal(timestep, t * 1000)


def test_exact_velocity_through_diffusers_flow_euler_recovers_x0(train_script):
    """The training convention matches the sampler: with the exact velocity of a one-point data set,
    flow-Euler from the noise lands on the data point."""
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    sched = reference.make_scheduler("flow-euler", 7)
    x = noise.clone()
    for t in sched.timesteps:
        sigma = float(t) / 1000.0
        _, _, v = train_script.flow_matching_batch(x0, torch.full((2,), sigma), noise)
        x = sched.step(v, t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-5)


@pytest.mark.parametrize("sampling", ["uniform", "logit-normal"])
def test_flow_timesteps_in_unit_interval(train_script, sampling):
    t = train_script.flow_timesteps(1000, torch.Generator().manual_seed(0), sampling)
    assert t.shape == (1000,) and float(t.min()) > 0 and float(t.max()) < 1
    with pytest.raises(ValueError, match="unknown flow timestep sampling"):
        train_script.flow_timesteps(4, torch.Generator(), "cosine")


def test_flow_objective_trains_a_tiny_dit(train_script):
    from stepcache.integrations.models import transformer

    torch.manual_seed(0)
    model = transformer(
        "dit",
        in_channels=1,
        out_channels=1,
        num_layers=1,
        attention_head_dim=8,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    ).train()
    train_script._disable_builtin_label_dropout(model)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    y = torch.arange(16) % 10
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)

    def loss_at(seed: int) -> torch.Tensor:
        return train_script.flow_matching_loss(model, x0, y, torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = float(sum(loss_at(s) for s in range(3)))
    for step in range(15):
        loss = loss_at(100 + step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(sum(loss_at(s) for s in range(3)))
    assert after < 0.8 * before


def test_train_script_flow_options(train_script):
    args = train_script.parse_args(["--objective", "flow", "--only", "dit", "--steps", "3"])
    assert args.objective == "flow" and args.flow_timesteps == "uniform"
    assert args.minutes == 0  # --steps alone: no time budget that could cut the run short
    default = train_script.parse_args([])
    assert default.objective == "ddpm" and default.minutes == 30
    assert args.checkpoint.name == "stepcache_train_reference_flow.ckpt"
    assert default.checkpoint.name == "stepcache_train_reference.ckpt"


# -- shipped weights ------------------------------------------------------------------------------
def test_shipped_flow_weights_match_their_record():
    meta = json.loads((WEIGHTS / FLOW_MODEL_CONFIG_FILE).read_text())
    assert file_sha256(WEIGHTS / FLOW_MODEL_WEIGHTS_FILE) == meta["sha256"]
    assert meta["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    assert meta["scheduler"]["prediction_type"] == "flow" and meta["scheduler"]["shift"] == 1.0
    assert meta["training"]["objective"].startswith("flow matching")
    # the same architecture as the DDPM model, whose files are untouched
    ddpm = json.loads((WEIGHTS / MODEL_FILES["ddpm"][1]).read_text())
    assert meta["model"] == ddpm["model"]
    assert file_sha256(WEIGHTS / MODEL_FILES["ddpm"][0]) == ddpm["sha256"]
    assert reference.load_model_metadata(model="flow")["sha256"] == meta["sha256"]


def test_flow_model_loads_and_remembers_its_kind(flow_model):
    assert flow_model.stepcache_reference_model == "flow" and not flow_model.training
    assert flow_model.stepcache_train_scheduler["prediction_type"] == "flow"
    assert reference.default_scheduler("flow") == "flow-euler" and reference.default_scheduler() == "ddim"
    with pytest.raises(StepCacheError, match="unknown reference model"):
        reference.load_model(model="sd3")


def test_flow_scheduler_and_mismatches(flow_model):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = reference.make_scheduler("flow-euler", 20)
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler) and sched.config.shift == 1.0
    assert len(sched.timesteps) == 20 and float(sched.timesteps[0]) == 1000.0
    assert sched.timesteps.dtype.is_floating_point
    labels = torch.tensor([1])
    with pytest.raises(StepCacheError, match="use flow-euler"):
        reference.sample(flow_model, labels, scheduler="ddim", num_inference_steps=2)
    with pytest.raises(StepCacheError, match="use flow-euler"):
        reference.make_scheduler("dpm", 4, train_config=flow_model.stepcache_train_scheduler)
    with pytest.raises(StepCacheError, match="use flow-euler"):
        reference.ReferencePipeline("ddim", model="flow")


def test_flow_sampling_is_deterministic_and_guided_batches(flow_model):
    labels = torch.tensor([0, 4, 7])
    calls: list[torch.Tensor] = []
    hook = flow_model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["timestep"].clone()), with_kwargs=True
    )
    try:
        a = reference.sample(flow_model, labels, num_inference_steps=6, seed=5)
    finally:
        hook.remove()
    b = reference.sample(flow_model, labels, scheduler="flow-euler", num_inference_steps=6, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 1, 16, 16) and float(a.abs().max()) <= 1.0
    # one call per step, float timesteps sigma * 1000, decreasing from 1000
    assert len(calls) == 6 and calls[0].dtype == torch.float32 and float(calls[0][0]) == 1000.0
    assert all(float(calls[i][0]) > float(calls[i + 1][0]) for i in range(5))
    g = reference.sample(flow_model, labels, num_inference_steps=6, seed=5, guidance_scale=2.0)
    assert g.shape == a.shape and not torch.equal(g, a)


def test_step_tracker_reads_float_flow_timesteps():
    sched = reference.make_scheduler("flow-euler", 5)
    tracker = StepTracker(num_steps=5)
    seen = []
    for _ in range(2):  # two generations
        for t in sched.timesteps:
            for _branch in range(2):  # split guidance: two calls at one timestep
                tracker.begin_call(float(t))
                seen.append((tracker.generation, tracker.step, tracker.branch))
                tracker.end_call()
    assert seen[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert seen[9] == (0, 4, 1) and seen[10] == (1, 0, 0)


# -- shipped calibration and caching --------------------------------------------------------------
def test_shipped_flow_calibration_caches_a_flow_run():
    cal = reference.shipped_calibration("flow-euler", 20)
    assert cal is not None and cal.num_steps == 20
    assert cal.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    schedule = from_calibration(cal, 0.1)
    pipe = reference.ReferencePipeline(model="flow")
    assert pipe.scheduler_name == "flow-euler"
    base = pipe([2, 8], num_inference_steps=20, seed=1)
    with cache(pipe, schedule) as handle:
        cached = pipe([2, 8], num_inference_steps=20, seed=1)
    assert 0 < handle.stats.compute_fraction < 1
    assert cached.shape == base.shape and float((cached - base).abs().mean()) < 0.1


# -- CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--model", "flow", "--scheduler", "ddim"], "use flow-euler"),
        (["demo", "--scheduler", "flow-euler"], "use ddim or dpm"),
        (["demo", "--model", "sd3"], "ddpm, flow"),
        (["calibrate", "reference", "--model", "flow", "--scheduler", "dpm"], "use flow-euler"),
        (["calibrate", "tiny-dit", "--model", "flow"], "--model applies to MODEL=reference"),
        (["calibrate", "tiny-dit", "--scheduler", "flow-euler"], "tiny-dit takes ddim or dpm"),
    ],
)
def test_cli_refuses_mismatched_model_and_scheduler(tmp_path, args, needle):
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert needle in " ".join(result.output.split()), result.output
