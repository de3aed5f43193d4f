"""Discovery of blocks and components."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stepcache
from stepcache import DiscoveryError


def test_diffusers_dit_layout(tiny_pipe):
    comps = stepcache.discover(tiny_pipe)
    assert [(c.name, c.type) for c in comps[:2]] == [
        ("transformer_blocks.0.attn1", "attn"),
        ("transformer_blocks.0.ff", "ff"),
    ]
    assert len(comps) == 6 and {c.stack for c in comps} == {"transformer_blocks"}
    blocks = stepcache.discover(tiny_pipe, types=["block"])
    assert [c.name for c in blocks] == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "transformer_blocks.2",
    ]


def test_plain_dit_layout(plain_dit):
    comps = stepcache.discover(plain_dit)
    assert [(c.name, c.type) for c in comps[:2]] == [("blocks.0.attn", "attn"), ("blocks.0.mlp", "ff")]
    assert [c.name for c in stepcache.discover(plain_dit, types=["ff"])] == [
        "blocks.0.mlp",
        "blocks.1.mlp",
        "blocks.2.mlp",
    ]


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.gate = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.mix(x) * self.gate(x)


class OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Odd() for _ in range(3))

    def forward(self, x, timestep):
        for layer in self.layers:
            x = layer(x)
        return x


def test_unknown_model_gets_a_clear_error_and_overrides_work():
    model = OddModel()
    with pytest.raises(DiscoveryError, match=r"No transformer blocks.*blocks=\["):
        stepcache.discover(model)
    comps = stepcache.discover(model, blocks="layers", components={"mix": "ff"})
    assert [c.name for c in comps] == ["layers.0.mix", "layers.1.mix", "layers.2.mix"]
    with pytest.raises(DiscoveryError, match="no submodule 'layer'"):
        stepcache.discover(model, blocks="layer")
    with pytest.raises(DiscoveryError, match=r"\['nope'\] not found"):
        stepcache.discover(model, blocks="layers", components=["nope"])
    blocks = stepcache.discover(model, blocks=Odd, types=["block"])
    assert [c.name for c in blocks] == ["layers.0", "layers.1", "layers.2"]


def test_bad_types(plain_dit):
    with pytest.raises(DiscoveryError, match="unknown component type"):
        stepcache.discover(plain_dit, types=["mlp"])
    with pytest.raises(DiscoveryError, match="not both"):
        stepcache.discover(plain_dit, types=["block", "attn"])
    with pytest.raises(DiscoveryError, match="no component of type"):
        stepcache.discover(plain_dit, types=["cross_attn"])


def test_not_a_model():
    with pytest.raises(DiscoveryError, match="pass the denoiser module"):
        stepcache.discover(object())


def test_caching_an_overridden_unknown_model():
    torch.manual_seed(0)
    model = OddModel()
    sched = stepcache.Schedule(3, {"layers.*.mix": (1, 0, 1)})
    x = torch.randn(2, 4)
    with stepcache.cache(model, sched, blocks="layers", components={"mix": "ff"}) as h:
        for t in (3.0, 2.0, 1.0):
            model(x, timestep=torch.tensor([t]))
    assert h.stats.computed == 6 and h.stats.reused == 3
