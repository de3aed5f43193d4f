"""The MODEL side: a StepCache node patches a clone and leaves the original, other models, LoRA patches and
ComfyUI's model management (loading, offloading, unloading) as they were."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.comfyui import _tiny


def _patched(model, **settings):
    from stepcache.integrations.comfyui import Settings, apply

    return apply(model, Settings(**settings))


def _last(model):
    from stepcache.integrations.comfyui import patch_of

    return patch_of(model).last


def _patcher_state(model) -> dict:
    """Everything a node could change on a ModelPatcher (deep-copied where it is a container)."""
    return {
        "wrappers": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()},
        "callbacks": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.callbacks.items()},
        "model_options": copy.deepcopy(model.model_options),
        "patches": {k: list(v) for k, v in model.patches.items()},
        "object_patches": dict(model.object_patches),
        "injections": dict(model.injections),
        "attachments": dict(model.attachments),
        "model": model.model,
    }


def _module_state(module: torch.nn.Module) -> list:
    """Hooks and instance attributes of every submodule that a cache could leave behind (ComfyUI's own
    loading adds and removes attributes of its own: those are not compared)."""
    return [
        (
            name,
            sorted(k for k in m.__dict__ if k == "forward" or "stepcache" in k.lower()),
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._forward_hooks_always_called),
        )
        for name, m in module.named_modules()
    ]


def test_the_original_model_is_untouched(stepcache_folder):
    """The node returns a clone: the MODEL it was given keeps its wrappers, options and patches, samples
    bit-identically before and after the patched clone ran (calibrating, cached, interrupted), and no
    hook or attribute of stepcache stays on the shared diffusion model, before or after ComfyUI unloads
    it."""
    import comfy.model_management as mm

    from stepcache.runtime.session import active_session

    family = "flux"
    model = _tiny.build(family)
    dm = model.model.diffusion_model
    reference = _tiny.sample(model, family)
    before, modules = _patcher_state(model), _module_state(dm)
    patched = _patched(model, compute_fraction=0.5)
    assert patched is not model and patched.model is model.model
    assert _patcher_state(model) == before
    for _ in range(3):
        _tiny.sample(patched, family)
        assert _module_state(dm) == modules and active_session(dm) is None
        assert torch.equal(_tiny.sample(model, family), reference)
    assert _last(patched).action == "cached"
    assert _patcher_state(model) == before
    mm.unload_all_models()
    mm.soft_empty_cache()
    assert _module_state(dm) == modules
    assert torch.equal(_tiny.sample(model, family), reference)


def test_two_models_do_not_share_state(stepcache_folder):
    """Two models (Flux and Wan) and one model patched twice (fractions 1 and 0.5) sampled in turn in one
    process: each keeps its own calibration, schedule and stats, and gives what it gives alone."""
    flux, wan = _tiny.build("flux"), _tiny.build("wan")
    alone = {}
    for family, model in (("flux", flux), ("wan", wan)):
        solo = _patched(model, compute_fraction=0.5, folder=str(stepcache_folder / "solo" / family))
        _tiny.sample(solo, family)
        alone[family] = _tiny.sample(solo, family)
    reference = _tiny.sample(flux, "flux")
    a, b, exact = (
        _patched(flux, compute_fraction=0.5),
        _patched(wan, compute_fraction=0.5),
        _patched(flux, compute_fraction=1.0),
    )
    runs = [(a, "flux"), (b, "wan"), (exact, "flux")] * 2
    outs, actions = [], []
    for m, f in runs:
        outs.append(_tiny.sample(m, f))
        actions.append(_last(m).action)
    assert actions == ["calibrated", "calibrated", "cached"] + ["cached"] * 3
    assert torch.equal(outs[3], alone["flux"]) and torch.equal(outs[4], alone["wan"])
    assert torch.equal(outs[2], reference) and torch.equal(outs[5], reference)
    reports = [_last(m) for m in (a, b, exact)]
    assert len({id(r.stats) for r in reports}) == 3
    assert reports[0].stats.compute_fraction == pytest.approx(reports[0].schedule.compute_fraction)
    assert reports[2].stats.compute_fraction == 1.0
    assert reports[0].key.digest != reports[1].key.digest


def _lora(model, strength: float = 1.0):
    """The LoraLoader node's path (comfy.sd.load_lora_for_models) with a rank-2 LoRA on Flux's blocks."""
    import comfy.sd

    generator = torch.Generator().manual_seed(5)
    weights = model.model.state_dict()
    lora = {}
    for path in ("double_blocks.0.img_mlp.0", "single_blocks.1.linear1"):
        out_features, in_features = weights[f"diffusion_model.{path}.weight"].shape
        name = "lora_unet_" + path.replace(".", "_")
        lora[f"{name}.lora_up.weight"] = torch.randn(out_features, 2, generator=generator)
        lora[f"{name}.lora_down.weight"] = torch.randn(2, in_features, generator=generator)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    assert len(patched.patches) == 2
    return patched


@pytest.mark.parametrize("order", ["lora-then-stepcache", "stepcache-then-lora"])
def test_lora_patches_compose(order, stepcache_folder):
    """A LoRA loaded before or after the node is applied in both the calibrating and the cached runs
    (all-compute is bit-identical to the LoRA model without the node), and is part of the run's key:
    the model without it has a calibration of its own."""
    family = "flux"
    base = _tiny.build(family)
    with_lora = _lora(base)
    reference = _tiny.sample(with_lora, family)
    assert not torch.equal(reference, _tiny.sample(base, family))
    if order == "lora-then-stepcache":
        patched = _patched(with_lora, compute_fraction=1.0)
    else:
        patched = _lora(_patched(base, compute_fraction=1.0))
    outs = [_tiny.sample(patched, family) for _ in range(2)]
    assert _last(patched).action == "cached"
    assert all(torch.equal(o, reference) for o in outs)
    plain = _patched(base, compute_fraction=1.0)
    _tiny.sample(plain, family)
    assert _last(plain).action == "calibrated"
    assert _last(plain).key.digest != _last(patched).key.digest
    assert _last(plain).key.info["weights"] == _last(patched).key.info["weights"]


def test_offloaded_models(stepcache_folder, monkeypatch):
    """ComfyUI's low-VRAM path (weights cast to the device per layer, LoRA applied per forward) under the
    cache: forced on the CPU by making ComfyUI see no VRAM. All-compute stays bit-identical to no node, a
    cached run computes its fraction, and unloading leaves no trace."""
    import comfy.model_management as mm

    family = "flux"
    mm.unload_all_models()
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    model = _lora(_tiny.build(family))
    dm = model.model.diffusion_model
    modules = _module_state(dm)
    reference = _tiny.sample(model, family)
    assert model.model.model_lowvram
    exact = _patched(model, compute_fraction=1.0)
    assert all(torch.equal(_tiny.sample(exact, family), reference) for _ in range(2))
    cached = _patched(model, compute_fraction=0.5)
    _tiny.sample(cached, family)
    assert _last(cached).action == "cached"
    assert _last(cached).stats.compute_fraction == pytest.approx(_last(cached).schedule.compute_fraction)
    mm.unload_all_models()
    assert not model.model.model_lowvram
    assert _module_state(dm) == modules


def test_torch_compile_model_is_refused_with_a_reason(stepcache_folder):
    """ComfyUI's TorchCompileModel compiles the whole diffusion model at sampling time; stepcache's
    per-step choice does not trace inside it yet, so a run with both says so instead of failing deep
    in dynamo (the compile itself never starts)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from stepcache.errors import StepCacheError

    family = "wan"
    model = _patched(_tiny.build(family), compute_fraction=0.5)
    set_torch_compile_wrapper(model, backend="eager")
    with pytest.raises(StepCacheError, match="TorchCompileModel"):
        _tiny.sample(model, family)
