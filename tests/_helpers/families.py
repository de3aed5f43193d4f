"""Tiny members of every DiT family stepcache supports, for the family tests (nothing downloaded).

Each :class:`Family` knows how to build a random-weight model a few layers deep and a few channels
wide, how to make its inputs, which timesteps its pipeline feeds it (the *convention* differs:
integers 999..0, Flux's t/1000, Stable Audio's 0.25 * log(sigma) with negatives), and how to call it
the way its pipeline does (positional or keyword arguments, guidance batched or split). The
expectations (component counts per type, a few exact names, which components return two streams)
are the facts the family tests check discovery against.

``OpenSoraSTDiT`` is a plain-PyTorch model in the style of Open-Sora's STDiT: spatial and temporal
blocks held in two separate ``ModuleList`` s and run interleaved, each block with self-attention,
cross-attention to a text embedding and an MLP, called as ``forward(x, timestep, y)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stepcache.integrations.models import transformer

Tensor = torch.Tensor
# (model, latent, timestep, conditioning) -> a prediction with the latent's shape
Call = Callable[[nn.Module, Tensor, Tensor, dict[str, Any]], Tensor]


@dataclass(frozen=True)
class Family:
    """One family: a tiny model, its inputs and timesteps, and what discovery should find in it.

    Attributes:
        name: test id.
        build: ``(seed=0) -> model``: a fresh random-weight model in eval mode, the same weights
            for the same seed.
        inputs: ``(batch, seed) -> (latent, conditioning)``; the conditioning is what ``call`` needs
            besides the latent and the timestep.
        call: one denoiser evaluation, as the family's pipeline makes it; returns a prediction
            shaped like the latent (learned-sigma channels dropped).
        timesteps: a short decreasing schedule in the family's convention.
        counts: components per type that default discovery must find.
        names: a few exact ``(name, type)`` pairs discovery must report.
        two_stream: components whose output is a tuple (hidden, encoder) stored and reused as one.
        null_cond: conditioning for the unconditional branch (text-conditioned families).
    """

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[[int, int], tuple[Tensor, dict[str, Any]]]
    call: Call
    timesteps: tuple[float, ...]
    counts: dict[str, int]
    names: tuple[tuple[str, str], ...]
    two_stream: tuple[str, ...] = ()
    null_cond: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    marks: tuple[Any, ...] = ()  # e.g. pytest.mark.xfail for a family the engine cannot serve yet


def _seeded(factory: Callable[[], nn.Module]) -> Callable[..., nn.Module]:
    """Build under a fixed seed without disturbing the caller's RNG stream."""

    def build(seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
        return model.eval()

    return build


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _int_timesteps(n: int = 4) -> tuple[float, ...]:
    """DiT / PixArt / SD3 / Sana / Wan / CogVideoX / Hunyuan / LTX: 999 down towards 0."""
    return tuple(float(t) for t in torch.linspace(999, 0, n + 1)[:-1].round())


def _expand(t: Tensor, batch: int) -> Tensor:
    return t.reshape(1).expand(batch)


# ---------------------------------------------------------------- DiT (diffusers)
def _dit() -> nn.Module:
    return transformer("dit", attention_head_dim=8, num_layers=2, num_embeds_ada_norm=10)


def _dit_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 4, 8, 8), {"class_labels": torch.arange(batch) % 10}


def _dit_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(x, timestep=_expand(t, len(x)), class_labels=c["class_labels"]).sample[:, :4]


# ---------------------------------------------------------------- PixArt
def _pixart() -> nn.Module:
    return transformer("pixart")


def _pixart_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 4, 8, 8), {"encoder_hidden_states": _randn(seed + 1, batch, 5, 12)}


def _pixart_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    out = m(
        x,
        encoder_hidden_states=c["encoder_hidden_states"],
        timestep=_expand(t, len(x)),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    return out.sample[:, :4]


# ---------------------------------------------------------------- SD3 / SD3.5
def _sd3() -> nn.Module:
    # SD3.5: block 0's attn2 is a second self-attention
    return transformer("sd3", num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")


def _sd3_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 4, 8, 8), {
        "encoder_hidden_states": _randn(seed + 1, batch, 5, 12),
        "pooled_projections": _randn(seed + 2, batch, 10),
    }


def _sd3_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(hidden_states=x, timestep=_expand(t, len(x)), **c).sample


# ---------------------------------------------------------------- Flux
def _flux() -> nn.Module:
    return transformer(
        "flux",
        in_channels=8,
        num_single_layers=3,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        guidance_embeds=True,
    )


def _flux_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return _randn(seed, batch, h * w, 8), {
        "encoder_hidden_states": _randn(seed + 1, batch, 5, 12),
        "pooled_projections": _randn(seed + 2, batch, 10),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(5, 3),
        "guidance": torch.full((batch,), 3.5),
    }


def _flux_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(hidden_states=x, timestep=_expand(t, len(x)), **c).sample


# ---------------------------------------------------------------- Stable Audio Open
def _stable_audio() -> nn.Module:
    return transformer("stable_audio")


def _stable_audio_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 4, 16), {
        "encoder_hidden_states": _randn(seed + 1, batch, 5, 12),
        "global_hidden_states": _randn(seed + 2, batch, 1, 12),
        "rotary_embedding": None,
    }


def _stable_audio_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    # StableAudioPipeline: timestep positional, shape (1,) whatever the batch.
    return m(x, t.reshape(1), **c, return_dict=False)[0]


# 0.25 * log(sigma) for EDM sigmas from 500 down to ~0.3: positive, then negative.
_STABLE_AUDIO_T = (1.55, 0.9, 0.2, -0.3)


# ---------------------------------------------------------------- CogVideoX
def _cogvideox() -> nn.Module:
    return transformer("cogvideox")


def _cogvideox_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 2, 4, 8, 8), {"encoder_hidden_states": _randn(seed + 1, batch, 5, 12)}


def _cogvideox_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(hidden_states=x, timestep=_expand(t, len(x)), **c).sample


# ---------------------------------------------------------------- Wan 2.1
def _wan() -> nn.Module:
    return transformer("wan")


def _wan_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 4, 2, 8, 8), {"encoder_hidden_states": _randn(seed + 1, batch, 5, 12)}


def _wan_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(hidden_states=x, timestep=_expand(t, len(x)), **c).sample


def _zeros_like_text(c: dict[str, Any]) -> dict[str, Any]:
    return {**c, "encoder_hidden_states": torch.zeros_like(c["encoder_hidden_states"])}


# ---------------------------------------------------------------- HunyuanVideo
def _hunyuan() -> nn.Module:
    return transformer("hunyuan_video")


def _hunyuan_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 4, 2, 8, 8), {
        "encoder_hidden_states": _randn(seed + 1, batch, 5, 12),
        "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.long),
        "pooled_projections": _randn(seed + 2, batch, 10),
        "guidance": torch.full((batch,), 6.0 * 1000),
    }


def _hunyuan_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(hidden_states=x, timestep=_expand(t, len(x)), **c).sample


# ---------------------------------------------------------------- LTX-Video
def _ltx() -> nn.Module:
    return transformer("ltx_video")


_LTX_SIZE = {"num_frames": 2, "height": 4, "width": 4}


def _ltx_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    tokens = _LTX_SIZE["num_frames"] * _LTX_SIZE["height"] * _LTX_SIZE["width"]
    return _randn(seed, batch, tokens, 4), {
        "encoder_hidden_states": _randn(seed + 1, batch, 5, 12),
        "encoder_attention_mask": torch.ones(batch, 5),
        **_LTX_SIZE,
    }


def _ltx_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(hidden_states=x, timestep=_expand(t, len(x)), **c).sample


# ---------------------------------------------------------------- Sana
def _sana() -> nn.Module:
    return transformer("sana")


def _sana_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 4, 8, 8), {"encoder_hidden_states": _randn(seed + 1, batch, 5, 12)}


def _sana_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(hidden_states=x, timestep=_expand(t, len(x)), **c).sample


# ---------------------------------------------------------------- Open-Sora STDiT (plain PyTorch)
class STAttention(nn.Module):
    """Multi-head attention; with ``context`` it attends to it (cross-attention)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        src = x if context is None else context
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(src).reshape(b, src.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class STMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = (
            nn.Linear(dim, 4 * dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * dim, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class STDiT3Block(nn.Module):
    """Open-Sora's STDiT block: adaLN-single modulated self-attention over either the tokens of one
    frame (spatial) or one position across frames (temporal), then cross-attention to the text,
    then an MLP. ``temporal`` only decides how the (B, F, S, D) video is folded into sequences.
    Named as in Open-Sora 1.2, so the registry entry for ``STDiT3Block`` is what finds it."""

    def __init__(self, dim: int, heads: int, text_dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = STAttention(dim, heads)
        self.cross_attn = STAttention(dim, heads, context_dim=text_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = STMlp(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        b, f, s, d = x.shape
        sm, cm, gm, sf, cf, gf = (self.scale_shift_table[None] + t.reshape(b, 6, d)).chunk(6, dim=1)
        h = (self.norm1(x).reshape(b, f * s, d) * (1 + cm) + sm).reshape(b, f, s, d)
        if self.temporal:  # one sequence per spatial position, across frames
            a = self.attn(h.transpose(1, 2).reshape(b * s, f, d)).reshape(b, s, f, d).transpose(1, 2)
        else:  # one sequence per frame
            a = self.attn(h.reshape(b * f, s, d)).reshape(b, f, s, d)
        tokens = (x + gm[:, None] * a).reshape(b, f * s, d)
        tokens = tokens + self.cross_attn(tokens, y)
        tokens = tokens + gf * self.mlp(self.norm2(tokens) * (1 + cf) + sf)
        return tokens.reshape(b, f, s, d)


class OpenSoraSTDiT(nn.Module):
    """STDiT: ``spatial_blocks[i]`` then ``temporal_blocks[i]``, interleaved; x is (B, F, S, C)."""

    def __init__(self, channels: int = 4, dim: int = 16, depth: int = 2, heads: int = 2, text_dim: int = 12):
        super().__init__()
        self.x_embed = nn.Linear(channels, dim)
        self.freq = 16
        self.t_embedder = nn.Sequential(nn.Linear(self.freq, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.spatial_blocks = nn.ModuleList(STDiT3Block(dim, heads, text_dim, False) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(dim, heads, text_dim, True) for _ in range(depth))
        self.final = nn.Linear(dim, channels)

    def _t_embed(self, t: Tensor) -> Tensor:
        half = self.freq // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * f[None]
        return self.t_embedder(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

    def forward(self, x: Tensor, timestep: Tensor, y: Tensor) -> Tensor:
        t = self.t_block(self._t_embed(timestep))
        h = self.x_embed(x)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            h = temporal(spatial(h, y, t), y, t)
        return self.final(h)


def _opensora() -> nn.Module:
    return OpenSoraSTDiT()


def _opensora_inputs(batch: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    return _randn(seed, batch, 3, 4, 4), {"y": _randn(seed + 1, batch, 5, 12)}


def _opensora_call(m: nn.Module, x: Tensor, t: Tensor, c: dict[str, Any]) -> Tensor:
    return m(x, _expand(t, len(x)), c["y"])  # positional, as Open-Sora's samplers call it


# ---------------------------------------------------------------- the list
FAMILIES: tuple[Family, ...] = (
    Family(
        "dit",
        _seeded(_dit),
        _dit_inputs,
        _dit_call,
        _int_timesteps(),
        {"attn": 2, "ff": 2},
        (("transformer_blocks.0.attn1", "attn"), ("transformer_blocks.1.ff", "ff")),
    ),
    Family(
        "pixart",
        _seeded(_pixart),
        _pixart_inputs,
        _pixart_call,
        _int_timesteps(),
        {"attn": 2, "cross_attn": 2, "ff": 2},
        (("transformer_blocks.0.attn2", "cross_attn"), ("transformer_blocks.1.ff", "ff")),
    ),
    Family(
        "sd3",
        _seeded(_sd3),
        _sd3_inputs,
        _sd3_call,
        _int_timesteps(),
        # 3 joint attentions + block 0's second self-attention; 3 ff + ff_context in blocks 0 and 1
        # (block 2 is context_pre_only: no ff_context).
        {"attn": 4, "ff": 5},
        (
            ("transformer_blocks.0.attn", "attn"),
            ("transformer_blocks.0.attn2", "attn"),
            ("transformer_blocks.1.ff_context", "ff"),
            ("transformer_blocks.2.ff", "ff"),
        ),
        two_stream=("transformer_blocks.0.attn", "transformer_blocks.2.attn"),
        null_cond=_zeros_like_text,
    ),
    Family(
        "flux",
        _seeded(_flux),
        _flux_inputs,
        _flux_call,
        tuple(t / 1000 for t in _int_timesteps()),
        {"attn": 5, "ff": 7},
        (
            ("transformer_blocks.0.attn", "attn"),
            ("transformer_blocks.1.ff_context", "ff"),
            ("single_transformer_blocks.2.attn", "attn"),
            ("single_transformer_blocks.0.proj_mlp", "ff"),
        ),
        two_stream=("transformer_blocks.0.attn", "transformer_blocks.1.attn"),
    ),
    Family(
        "stable_audio",
        _seeded(_stable_audio),
        _stable_audio_inputs,
        _stable_audio_call,
        _STABLE_AUDIO_T,
        {"attn": 2, "cross_attn": 2, "ff": 2},
        (("transformer_blocks.0.attn1", "attn"), ("transformer_blocks.1.attn2", "cross_attn")),
    ),
    Family(
        "cogvideox",
        _seeded(_cogvideox),
        _cogvideox_inputs,
        _cogvideox_call,
        _int_timesteps(),
        {"attn": 2, "ff": 2},
        (("transformer_blocks.0.attn1", "attn"), ("transformer_blocks.1.ff", "ff")),
        two_stream=("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"),
    ),
    Family(
        "wan",
        _seeded(_wan),
        _wan_inputs,
        _wan_call,
        _int_timesteps(),
        {"attn": 2, "cross_attn": 2, "ff": 2},
        (("blocks.0.attn1", "attn"), ("blocks.0.attn2", "cross_attn"), ("blocks.1.ffn", "ff")),
        null_cond=_zeros_like_text,
    ),
    Family(
        "hunyuan_video",
        _seeded(_hunyuan),
        _hunyuan_inputs,
        _hunyuan_call,
        _int_timesteps(),
        {"attn": 4, "ff": 6},
        (
            ("transformer_blocks.0.attn", "attn"),
            ("transformer_blocks.1.ff_context", "ff"),
            ("single_transformer_blocks.1.attn", "attn"),
            ("single_transformer_blocks.0.proj_mlp", "ff"),
        ),
        two_stream=("transformer_blocks.0.attn", "transformer_blocks.1.attn"),
    ),
    Family(
        "ltx_video",
        _seeded(_ltx),
        _ltx_inputs,
        _ltx_call,
        _int_timesteps(),
        {"attn": 2, "cross_attn": 2, "ff": 2},
        (("transformer_blocks.0.attn1", "attn"), ("transformer_blocks.1.attn2", "cross_attn")),
    ),
    Family(
        "sana",
        _seeded(_sana),
        _sana_inputs,
        _sana_call,
        _int_timesteps(),
        {"attn": 2, "cross_attn": 2, "ff": 2},
        (("transformer_blocks.0.attn1", "attn"), ("transformer_blocks.1.ff", "ff")),
    ),
    Family(
        "opensora_stdit",
        _seeded(_opensora),
        _opensora_inputs,
        _opensora_call,
        _int_timesteps(),
        {"attn": 4, "cross_attn": 4, "ff": 4},
        (
            ("spatial_blocks.0.attn", "attn"),
            ("temporal_blocks.0.cross_attn", "cross_attn"),
            ("temporal_blocks.1.mlp", "ff"),
        ),
        null_cond=lambda c: {"y": torch.zeros_like(c["y"])},
    ),
)


def run(
    fam: Family,
    model: nn.Module,
    *,
    batch: int = 2,
    seed: int = 0,
    guidance: float | None = None,
    before_call: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """A short sampling loop in the family's timestep convention (Euler-like update).

    ``guidance`` runs classifier-free guidance as two calls per step, cond then uncond, each in
    ``cache_context`` when the model has one (as Wan's pipeline does). ``before_call(step, branch)``
    lets a reference cache know where the loop is.
    """
    x, cond = fam.inputs(batch, seed)
    uncond = fam.null_cond(cond) if fam.null_cond else cond
    branches = [("cond", cond)] if guidance is None else [("cond", cond), ("uncond", uncond)]
    with torch.no_grad():
        for step, tv in enumerate(fam.timesteps):
            t = torch.tensor(tv)
            preds = []
            for branch, (label, c) in enumerate(branches):
                if before_call:
                    before_call(step, branch)
                ctx = getattr(model, "cache_context", None)
                if ctx is not None and guidance is not None:
                    with ctx(label):
                        preds.append(fam.call(model, x, t, c))
                else:
                    preds.append(fam.call(model, x, t, c))
            pred = preds[0] if guidance is None else preds[1] + guidance * (preds[0] - preds[1])
            x = x - 0.1 * pred
    return x
