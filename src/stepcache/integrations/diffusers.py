"""diffusers: tiny pipelines built from configs (no download) and loading real ones.

Nothing here is imported by ``import stepcache``; diffusers is needed only when these are called.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["load_pipeline", "tiny_dit_pipeline"]


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
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
        DPMSolverMultistepScheduler,
    )

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformer = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=4,
            out_channels=8,
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(8,),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=sample_size,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    sched_cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler]
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=sched_cls())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(name_or_path: str, *, dtype: torch.dtype | None = None, device: str | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained`` for a local folder or a hub id (needs hub access)."""
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    return pipe.to(device) if device else pipe
