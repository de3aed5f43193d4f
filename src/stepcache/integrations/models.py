"""Diffusers models built from configs, nothing downloaded: the one place tiny models are made.

A :class:`ModelConfig` is a diffusers class name and its constructor's keywords. :data:`TINY` holds
random-weight members of every supported family, a few layers deep and a few channels wide (for
tests, smoke runs and the hook-overhead benchmark); :data:`PUBLISHED` the shapes of released
checkpoints (for the memory planner, which builds them on the meta device, and the GPU check,
``benchmarks/gpu_check.py``, with random weights). :func:`transformer`
builds either, with keyword overrides; :func:`tiny_vae` is the one-level VAE the tiny pipelines
share and :func:`tiny_dit_pipeline` a whole ``DiTPipeline``.

Nothing here is imported by ``import stepcache``; diffusers is imported only when a model is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PUBLISHED", "TINY", "ModelConfig", "tiny_dit_pipeline", "tiny_vae", "transformer"]


@dataclass(frozen=True)
class ModelConfig:
    """A diffusers model class (by name) and the keywords its constructor gets."""

    cls: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **overrides: Any) -> ModelConfig:
        return ModelConfig(self.cls, {**self.kwargs, **overrides})


# Random-weight members of each family. Sizes are the smallest that keep each model's structure
# (a block list of two or more, joint and single blocks, cross-attention where the family has it).
TINY: dict[str, ModelConfig] = {
    "dit": ModelConfig(
        "DiTTransformer2DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 4,
            "out_channels": 8,  # learned sigma: pipelines keep the first half
            "num_layers": 4,
            "sample_size": 8,
            "patch_size": 2,
            "num_embeds_ada_norm": 1000,  # DiTPipeline hard-codes class 1000 as the null class
            "norm_num_groups": 4,
        },
    ),
    "pixart": ModelConfig(
        "PixArtTransformer2DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 2,
            "cross_attention_dim": 16,
            "sample_size": 8,  # not 128: that switches on the resolution / aspect-ratio conditioning
            "patch_size": 2,
            "caption_channels": 12,
            "norm_num_groups": 4,
        },
    ),
    "sd3": ModelConfig(
        "SD3Transformer2DModel",
        {
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 12,
            "caption_projection_dim": 16,
            "pooled_projection_dim": 10,
            "out_channels": 4,
            "pos_embed_max_size": 8,
        },
    ),
    "flux": ModelConfig(
        "FluxTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 16,  # 4 latent channels packed 2 x 2
            "num_layers": 2,  # a one-block list is not taken for a block stack by discovery
            "num_single_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 16,
            "pooled_projection_dim": 16,
            "axes_dims_rope": (2, 2, 4),  # must sum to the head dim
        },
    ),
    "stable_audio": ModelConfig(
        "StableAudioDiTModel",
        {
            "sample_size": 16,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "num_key_value_attention_heads": 1,
            "out_channels": 4,
            "cross_attention_dim": 16,
            "time_proj_dim": 8,
            "global_states_input_dim": 12,
            "cross_attention_input_dim": 12,
        },
    ),
    "cogvideox": ModelConfig(
        "CogVideoXTransformer3DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 8,
            "text_embed_dim": 12,
            "num_layers": 2,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 5,  # (frames - 1) * 4 + 1 latent frames = 2
            "patch_size": 2,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": 5,  # the text length must equal it
        },
    ),
    "wan": ModelConfig(
        "WanTransformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 12,
            "freq_dim": 8,
            "ffn_dim": 32,
            "num_layers": 2,
            "rope_max_seq_len": 32,
        },
    ),
    "hunyuan_video": ModelConfig(
        "HunyuanVideoTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "num_single_layers": 2,
            "num_refiner_layers": 2,  # as the real model: a list of >= 2 blocks discovery must not take
            "patch_size": 2,
            "patch_size_t": 1,
            "guidance_embeds": True,
            "text_embed_dim": 12,
            "pooled_projection_dim": 10,
            "rope_axes_dim": (2, 2, 4),
        },
    ),
    "ltx_video": ModelConfig(
        "LTXVideoTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "num_layers": 2,
            "caption_channels": 12,
        },
    ),
    "sana": ModelConfig(
        "SanaTransformer2DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 8,
            "cross_attention_dim": 16,  # Sana needs cross-attention: norm2 exists only with it
            "caption_channels": 12,
            "sample_size": 8,
            "patch_size": 1,
        },
    ),
}


def _wan21(num_layers: int, heads: int, ffn: int) -> ModelConfig:
    return ModelConfig(
        "WanTransformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": heads,
            "attention_head_dim": 128,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "ffn_dim": ffn,
            "num_layers": num_layers,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
        },
    )


# Released checkpoints' transformer configs (as in their config.json files).
PUBLISHED: dict[str, ModelConfig] = {
    # facebook/DiT-XL-2-256: the constructor's defaults are DiT-XL/2's; learned sigma doubles the output.
    "dit-xl-2-256": ModelConfig(
        "DiTTransformer2DModel",
        {
            "num_attention_heads": 16,
            "attention_head_dim": 72,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 28,
            "sample_size": 32,
            "patch_size": 2,
            "num_embeds_ada_norm": 1000,
        },
    ),
    "wan2.1-t2v-14b": _wan21(40, 40, 13_824),
    "wan2.1-t2v-1.3b": _wan21(30, 12, 8_960),
    "hunyuanvideo": ModelConfig(
        "HunyuanVideoTransformer3DModel",
        {
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "num_layers": 20,
            "num_single_layers": 40,
            "num_refiner_layers": 2,
            "mlp_ratio": 4.0,
            "patch_size": 2,
            "patch_size_t": 1,
            "qk_norm": "rms_norm",
            "guidance_embeds": True,
            "text_embed_dim": 4096,
            "pooled_projection_dim": 768,
            "rope_theta": 256.0,
            "rope_axes_dim": (16, 56, 56),
        },
    ),
    "flux.1-dev": ModelConfig(
        "FluxTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": (16, 56, 56),
        },
    ),
}


def _config(name: str | ModelConfig) -> ModelConfig:
    if isinstance(name, ModelConfig):
        return name
    for table in (TINY, PUBLISHED):
        if name in table:
            return table[name]
    from ..errors import StepCacheError

    raise StepCacheError(f"unknown model config {name!r}; known: {', '.join([*TINY, *PUBLISHED])}.")


def transformer(
    config: str | ModelConfig,
    *,
    seed: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """The diffusers model of ``config`` (a name of :data:`TINY` or :data:`PUBLISHED`, or a
    :class:`ModelConfig`), with ``overrides`` replacing its keywords, in eval mode.

    ``seed``: built under that seed without disturbing the caller's random stream; ``None`` draws
    from the current stream (so several models built in a row under one seed stay as they were).
    ``device="meta"`` builds it without memory; ``dtype`` casts it after.
    """
    import diffusers

    cfg = _config(config).replace(**overrides)
    with contextlib.ExitStack() as stack:
        if seed is not None:
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(seed)
        if device is not None:
            stack.enter_context(torch.device(device))
        model = getattr(diffusers, cfg.cls)(**cfg.kwargs)
        if dtype is not None:
            model = model.to(dtype)
    return model.eval()


def tiny_vae(latent_channels: int = 4, *, sample_size: int = 8) -> torch.nn.Module:
    """A one-level ``AutoencoderKL`` (scale factor 1): only its config is read with latent output."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
    ).eval()


def tiny_dit_pipeline(
    *,
    num_layers: int = 4,
    heads: int = 2,
    head_dim: int = 16,
    sample_size: int = 8,
    seed: int = 0,
    scheduler: str = "ddim",
) -> Any:
    """A ``DiTPipeline`` of random-weight tiny components, for smoke runs and tests.

    Random weights: fine for checking mechanics and speed, meaningless for quality (their features
    jump between steps). ``num_embeds_ada_norm=1000`` because ``DiTPipeline`` hard-codes class 1000
    as the null class for guidance.
    """
    if scheduler not in ("ddim", "dpm"):
        from ..errors import StepCacheError

        raise StepCacheError(f"tiny_dit_pipeline: scheduler must be 'ddim' or 'dpm', got {scheduler!r}.")
    from diffusers import DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = transformer(
            "dit",
            num_layers=num_layers,
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            sample_size=sample_size,
        )
        vae = tiny_vae(4, sample_size=sample_size)
    sched_cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler]
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=sched_cls())
    pipe.set_progress_bar_config(disable=True)
    return pipe
