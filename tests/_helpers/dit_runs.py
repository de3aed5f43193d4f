"""One tiny DiT pipeline generation, the way the tests call it (fixed seed, guidance, tensor out)."""

from __future__ import annotations

import torch


def generate(pipe, seed: int = 0, steps: int = 10, labels=(1, 2), guidance: float = 4.0) -> torch.Tensor:
    return pipe(
        list(labels),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
