"""Tests of the shipped reference model, classifier, data and sampling loop (fast, CPU, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stepcache import reference
from stepcache.errors import StepCacheError
from stepcache.reference import (
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    ReferencePipeline,
    ReferenceWeightsError,
    load_classifier,
    load_digits,
    load_model,
    make_scheduler,
    sample,
)
from stepcache.reference._classifier import CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE
from stepcache.reference._model import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE

WEIGHTS = reference.DEFAULT_WEIGHTS_DIR


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_constants():
    assert (NUM_CLASSES, IMAGE_SIZE, NULL_CLASS) == (10, 16, 10)


@pytest.mark.slow
def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, stepcache.reference; print('diffusers' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_load_digits_splits():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.shape == (1437, 1, 16, 16) and xt.shape == (360, 1, 16, 16)
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    assert set(yt.tolist()) == set(range(10))
    # stratified: every class is ~20 % held out
    counts = torch.bincount(yt, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    # fresh copies, deterministic split
    x[0] = 0
    assert not torch.equal(load_digits("train")[0][0], x[0])
    assert torch.equal(load_digits("test")[1], yt)
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")


def test_model_loads_in_eval_mode(model):
    from diffusers import DiTTransformer2DModel

    assert isinstance(model, DiTTransformer2DModel)
    assert not model.training
    assert 1_500_000 < sum(p.numel() for p in model.parameters()) < 3_000_000
    meta = json.loads((WEIGHTS / MODEL_CONFIG_FILE).read_text())
    assert meta["scheduler"]["prediction_type"] == "epsilon"
    assert (WEIGHTS / MODEL_WEIGHTS_FILE).stat().st_size <= 20 * 2**20


def test_classifier_accuracy_meets_documented_figure(classifier):
    meta = json.loads((WEIGHTS / CLASSIFIER_CONFIG_FILE).read_text())
    documented = meta["metrics"]["test_accuracy_first200"]
    x, y = load_digits("test")
    with torch.no_grad():
        logits = classifier(x[:200])
        feats = classifier.features(x[:200])
    acc = float((logits.argmax(1) == y[:200]).float().mean())
    assert acc >= 0.98
    assert acc >= documented - 0.01
    assert feats.shape == (200, classifier.num_features)
    assert not classifier.training


def test_make_scheduler():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddim = make_scheduler("ddim", 10)
    dpm = make_scheduler("dpm", 7)
    assert isinstance(ddim, DDIMScheduler) and len(ddim.timesteps) == 10
    assert isinstance(dpm, DPMSolverMultistepScheduler) and len(dpm.timesteps) == 7
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    meta = json.loads((WEIGHTS / MODEL_CONFIG_FILE).read_text())
    assert ddim.config.beta_schedule == meta["scheduler"]["beta_schedule"]
    assert int(ddim.timesteps[0]) == 999
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("heun", 10)


def test_diffusers_schedulers_by_name_or_object():
    """The samplers users have (UniPC, DEIS, Euler, Euler ancestral) by name, and any scheduler object."""
    from diffusers import UniPCMultistepScheduler

    names = reference.MODEL_SCHEDULERS["ddpm"]
    assert {"unipc", "deis", "euler", "euler-a"} <= set(names)
    by_name = ReferencePipeline("unipc")
    assert isinstance(by_name.scheduler, UniPCMultistepScheduler)
    by_object = ReferencePipeline(make_scheduler("unipc", 10))
    labels = [0, 3]
    assert torch.equal(
        by_name(labels, num_inference_steps=3, seed=5), by_object(labels, num_inference_steps=3, seed=5)
    )
    ancestral = ReferencePipeline("euler-a")  # stochastic: its noise comes from the seed too
    first, again = (ancestral(labels, num_inference_steps=4, seed=5) for _ in range(2))
    assert torch.isfinite(first).all() and torch.equal(first, again)
    with pytest.raises(StepCacheError, match="does not fit the flow reference model"):
        ReferencePipeline(make_scheduler("unipc", 10), model="flow")
    with pytest.raises(StepCacheError, match="scheduler must be a name"):
        ReferencePipeline(42)


@pytest.mark.parametrize("sched", ["euler", "euler-a"])
def test_euler_samplers_make_digits_not_saturated_noise(model, sched):
    labels = torch.arange(10)
    x = sample(model, labels, scheduler=sched, num_inference_steps=8, seed=0)
    assert float((x.abs() >= 0.999).float().mean()) < 0.3  # was 0.99 with trailing spacing
    classifier = reference.load_classifier()
    assert float((classifier(x).argmax(1) == labels).float().mean()) >= 0.7


@pytest.mark.parametrize("sched", ["ddim", "dpm"])
def test_sample_reproducible(model, sched):
    labels = torch.tensor([0, 3, 7])
    a = sample(model, labels, scheduler=sched, num_inference_steps=4, seed=123)
    b = sample(model, labels, scheduler=sched, num_inference_steps=4, seed=123)
    c = sample(model, labels, scheduler=sched, num_inference_steps=4, seed=124)
    assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sample_calls_model_once_per_step(model, guidance):
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def hook(_module, _args, kwargs, _out):
        seen.append((tuple(kwargs["hidden_states"].shape), tuple(kwargs["timestep"].shape)))

    steps_done: list[int] = []
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        sample(
            model,
            torch.tensor([1, 2]),
            num_inference_steps=5,
            guidance_scale=guidance,
            callback=steps_done.append,
        )
    finally:
        handle.remove()
    batch = 4 if guidance != 1.0 else 2
    assert seen == [((batch, 1, 16, 16), (batch,))] * 5
    assert steps_done == [0, 1, 2, 3, 4]


def _copy_weights(tmp_path: Path) -> Path:
    dst = tmp_path / "weights"
    shutil.copytree(WEIGHTS, dst)
    return dst


def _assert_helpful(exc: pytest.ExceptionInfo, filename: str) -> None:
    msg = str(exc.value)
    assert filename in msg
    assert "scripts/train_reference.py" in msg
    assert isinstance(exc.value, StepCacheError)


@pytest.mark.parametrize(
    ("loader", "filename"),
    [
        (load_model, MODEL_WEIGHTS_FILE),
        (load_model, MODEL_CONFIG_FILE),
        (load_classifier, CLASSIFIER_WEIGHTS_FILE),
    ],
)
def test_missing_file_raises_reference_error(tmp_path, loader, filename):
    folder = _copy_weights(tmp_path)
    (folder / filename).unlink()
    with pytest.raises(ReferenceWeightsError) as exc:
        loader(weights_dir=folder)
    _assert_helpful(exc, filename)


@pytest.mark.parametrize(
    ("loader", "filename"), [(load_model, MODEL_WEIGHTS_FILE), (load_classifier, CLASSIFIER_WEIGHTS_FILE)]
)
def test_truncated_file_raises_reference_error(tmp_path, loader, filename):
    folder = _copy_weights(tmp_path)
    (folder / filename).write_bytes(b"\x00\x01garbage")
    with pytest.raises(ReferenceWeightsError) as exc:
        loader(weights_dir=folder)
    _assert_helpful(exc, filename)
    # Without a recorded checksum the safetensors header check itself must be translated too.
    cfg = CLASSIFIER_CONFIG_FILE if loader is load_classifier else MODEL_CONFIG_FILE
    meta = json.loads((folder / cfg).read_text())
    meta.pop("sha256")
    (folder / cfg).write_text(json.dumps(meta))
    with pytest.raises(ReferenceWeightsError) as exc:
        loader(weights_dir=folder)
    _assert_helpful(exc, filename)


def test_flipped_tensor_bytes_detected(tmp_path):
    folder = _copy_weights(tmp_path)
    path = folder / MODEL_WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ReferenceWeightsError, match="corrupted") as exc:
        load_model(weights_dir=folder)
    _assert_helpful(exc, MODEL_WEIGHTS_FILE)


def test_corrupted_json_raises_reference_error(tmp_path):
    folder = _copy_weights(tmp_path)
    (folder / MODEL_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ReferenceWeightsError) as exc:
        load_model(weights_dir=folder)
    _assert_helpful(exc, MODEL_CONFIG_FILE)


def test_default_weights_dir_can_be_monkeypatched(tmp_path, monkeypatch):
    import stepcache.reference._weights as w

    monkeypatch.setattr(w, "DEFAULT_WEIGHTS_DIR", tmp_path)
    with pytest.raises(ReferenceWeightsError, match=str(tmp_path).replace("\\", "\\\\")):
        load_classifier()
