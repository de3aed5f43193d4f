"""Plain-PyTorch diffusion transformers written for the tests (no diffusers).

``PlainDiT`` follows facebookresearch/DiT: ``blocks[i].attn`` / ``.mlp`` with adaLN-Zero gates and
``forward(x, t, y)`` taking the timestep positionally. The adaLN layers are *not* zero-initialised,
so the gates are non-zero and every component matters for the output.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = (
            nn.Linear(dim, 4 * dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * dim, dim),
        )

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sm, cm, gm, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gm.unsqueeze(1) * self.attn(modulate(self.norm1(x), sm, cm))
        return x + gf.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sf, cf))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq=64):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * f[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class PlainDiT(nn.Module):
    """Tokens in, tokens out: x is (B, N, C)."""

    def __init__(self, channels=4, dim=32, depth=3, heads=2, num_classes=5):
        super().__init__()
        self.num_classes = num_classes
        self.x_embed = nn.Linear(channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.final = nn.Linear(dim, channels)

    def forward(self, x, t, y):
        c = self.t_embedder(t) + self.y_embedder(y)
        h = self.x_embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h)


def reference_forward(model: PlainDiT, x, t, y, step, plans, store):
    """What a cache should compute, written out by hand: ``plans[type][step]`` says compute (1) or
    reuse what ``store`` holds for (layer, type)."""
    c = model.t_embedder(t) + model.y_embedder(y)
    h = model.x_embed(x)
    for i, blk in enumerate(model.blocks):
        sm, cm, gm, sf, cf, gf = blk.adaLN_modulation(c).chunk(6, dim=1)
        if plans["attn"][step] or (i, "attn") not in store:
            store[(i, "attn")] = blk.attn(modulate(blk.norm1(h), sm, cm))
        h = h + gm.unsqueeze(1) * store[(i, "attn")]
        if plans["ff"][step] or (i, "ff") not in store:
            store[(i, "ff")] = blk.mlp(modulate(blk.norm2(h), sf, cf))
        h = h + gf.unsqueeze(1) * store[(i, "ff")]
    return model.final(h)


def timesteps(n):
    return torch.linspace(999, 0, n).round()


def sample(model, y, n=10, seed=0, guidance=None, split=False, forward=None, fail_at=None):
    """A minimal sampler (Euler-like update) over ``n`` decreasing timesteps.

    ``guidance``: classifier-free guidance with the null class, batched in one call per step, or as
    two calls per step (cond, then uncond) with ``split=True``. ``forward(x, t, y, step, branch)``
    replaces the model call (for reference loops). ``fail_at`` raises after that many steps.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(y), 16, 4, generator=g)
    null = torch.full_like(y, model.num_classes)
    call = forward or (lambda x, t, y, step, branch: model(x, t, y))
    for step, tv in enumerate(timesteps(n)):
        if fail_at is not None and step == fail_at:
            raise RuntimeError("interrupted")
        if guidance is None:
            eps = call(x, tv.expand(len(y)), y, step, 0)
        elif split:
            cond = call(x, tv.expand(len(y)), y, step, 0)
            unc = call(x, tv.expand(len(y)), null, step, 1)
            eps = unc + guidance * (cond - unc)
        else:
            both = call(torch.cat([x, x]), tv.expand(2 * len(y)), torch.cat([y, null]), step, 0)
            cond, unc = both.chunk(2)
            eps = unc + guidance * (cond - unc)
        x = x - 0.05 * eps
    return x
