"""The ComfyUI integration's parts that need no ComfyUI (the real sampling is in tests/comfyui, run in
.venv-comfyui): importing it, the model families and block layouts as data, settings, keys, the
installer, and the calibration hooks it drives (an external step tracker and installer)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import stepcache
from stepcache.errors import StepCacheError


def test_importing_stepcache_needs_no_comfyui():
    code = (
        "import sys, stepcache, stepcache.integrations.comfyui as c; "
        "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes') for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith(('comfy', 'folder_paths'))); "
        "print(len(c.FAMILIES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 5


_CLASSES: dict[str, type] = {}


def _named(name: str, **children: nn.Module) -> nn.Module:
    """An instance of a class called ``name`` (one of ComfyUI's class names) holding ``children``."""
    cls = _CLASSES.setdefault(name, type(name, (nn.Module,), {"forward": lambda self, *a, **k: a[0]}))
    module = cls()
    for attr, child in children.items():
        setattr(module, attr, child)
    return module


def _flux_like() -> nn.Module:
    """The shape of comfy.ldm.flux.model.Flux: double blocks (attention computed inline, two MLPs) and
    single blocks (attention and MLP fused in linear1 / linear2)."""

    def double() -> nn.Module:
        return _named(
            "DoubleStreamBlock",
            img_attn=_named("SelfAttention", qkv=nn.Linear(4, 12)),
            txt_attn=_named("SelfAttention", qkv=nn.Linear(4, 12)),
            img_mlp=nn.Sequential(nn.Linear(4, 4)),
            txt_mlp=nn.Sequential(nn.Linear(4, 4)),
        )

    def single() -> nn.Module:
        return _named("SingleStreamBlock", linear1=nn.Linear(4, 4), linear2=nn.Linear(4, 4))

    return _named(
        "Flux",
        double_blocks=nn.ModuleList([double(), double()]),
        single_blocks=nn.ModuleList([single(), single()]),
    )


def test_comfy_block_layouts_name_only_the_branches_a_call_reaches():
    """Flux's double-stream block computes its attention inline (`img_attn` is never called): the layout
    lists its MLPs only, where the generic rule would take `img_attn` too."""
    from stepcache.integrations.comfyui import family_of
    from stepcache.integrations.comfyui.families import discovery_args

    flux = _flux_like()
    found = stepcache.discover(flux)
    assert [(c.name, c.type) for c in found] == [
        ("double_blocks.0.img_mlp", "ff"),
        ("double_blocks.0.txt_mlp", "ff"),
        ("double_blocks.1.img_mlp", "ff"),
        ("double_blocks.1.txt_mlp", "ff"),
    ]
    family = family_of(flux)
    assert family.name == "flux" and family.in_place and family.default == "blocks"
    args = discovery_args(family, flux, "auto")
    assert args == {"blocks": ["double_blocks", "single_blocks"], "types": ("block",)}
    blocks = stepcache.discover(flux, **args)
    assert [c.name for c in blocks] == [
        f"{s}.{i}" for s in ("double_blocks", "single_blocks") for i in (0, 1)
    ]

    def wan_block() -> nn.Module:
        return _named(
            "WanAttentionBlock",
            self_attn=_named("WanSelfAttention", q=nn.Linear(4, 4)),
            cross_attn=_named("WanT2VCrossAttention", q=nn.Linear(4, 4)),
            ffn=nn.Sequential(nn.Linear(4, 4)),
        )

    wan = _named("WanModel", blocks=nn.ModuleList([wan_block(), wan_block()]))
    assert family_of(wan).name == "wan" and not family_of(wan).in_place
    args = discovery_args(family_of(wan), wan, "auto")
    assert [(c.name, c.type) for c in stepcache.discover(wan, **args)][:3] == [
        ("blocks.0.self_attn", "attn"),
        ("blocks.0.cross_attn", "cross_attn"),
        ("blocks.0.ffn", "ff"),
    ]
    assert family_of(nn.Linear(2, 2)).name == "generic" and family_of(nn.Linear(2, 2)).in_place
    with pytest.raises(StepCacheError, match="cache must be one of"):
        discovery_args(family, flux, "everything")


def test_settings_are_checked_when_made():
    from stepcache.integrations.comfyui import Settings

    assert Settings(memory_budget="1GB").memory_budget == 10**9
    for bad, match in (
        ({"mode": "always"}, "mode must be"),
        ({"mode": "schedule"}, "needs a stepcache.Schedule"),
        ({"compute_fraction": 0.0}, "compute_fraction"),
        ({"cache": "layers"}, "cache must be"),
        ({"granularity": "block"}, "granularity"),
        ({"storage_dtype": "int4"}, "storage"),
        ({"memory_budget": "lots"}, "not a size"),
        ({"lookahead": 0}, "lookahead"),
    ):
        with pytest.raises(StepCacheError, match=match):
            Settings(**bad)


def test_run_key_names():
    from stepcache.integrations.comfyui.keys import RunKey, sampler_name

    def sample_dpmpp_2m():
        pass

    sampler = type("KSAMPLER", (), {"sampler_function": staticmethod(sample_dpmpp_2m), "extra_options": {}})()
    assert sampler_name(sampler) == "dpmpp_2m"
    sampler.extra_options = {"eta": 0.5}
    assert sampler_name(sampler).startswith("dpmpp_2m+")
    assert sampler_name(object()) == "object"
    key = RunKey("ab" * 32, {"family": "flux", "sampler": "euler", "steps": 20})
    assert key.filename == "flux-euler-20steps-abababababababab.json"


def test_install_node(tmp_path, capsys):
    from stepcache.integrations.comfyui.install import install_node, main

    (tmp_path / "custom_nodes").mkdir()
    folder = install_node(tmp_path)
    assert folder == tmp_path / "custom_nodes" / "stepcache"
    assert (
        "from stepcache.integrations.comfyui.nodes import comfy_entrypoint"
        in (folder / "__init__.py").read_text()
    )
    assert install_node(tmp_path / "custom_nodes") == folder
    assert main([str(tmp_path / "nowhere")]) == 1 and "not a folder" in capsys.readouterr().err
    assert main([]) == 2


def test_calibrate_with_an_external_step_tracker(plain_dit):
    """A host that knows its steps (ComfyUI's sampler evaluations) drives calibrate's steps and branches
    itself: here every call has the same timestep, which read from the calls would be one step."""
    from stepcache.runtime import StepTracker
    from stepcache.runtime.session import TorchInstaller

    tracker = StepTracker()
    calls = []

    class Counting(TorchInstaller):
        def hook_component(self, comp, make_forward):
            calls.append(comp.name)
            return super().hook_component(comp, make_forward)

    x, t, y = torch.randn(2, 16, 4), torch.full((2,), 500.0), torch.tensor([1, 2])

    def run():
        for step in range(5):
            for branch in range(2):
                tracker.set_step(step, branch)
                plain_dit(x * (1 + 0.1 * step), t, y)

    cal = stepcache.calibrate(plain_dit, run=run, tracker=tracker, installer=Counting(), progress=False)
    assert cal.num_steps == 5 and cal.num_samples == 1
    assert calls == list(cal.components)
    assert not plain_dit._forward_hooks and "forward" not in plain_dit.blocks[0].attn.__dict__
