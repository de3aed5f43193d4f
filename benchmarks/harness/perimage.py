"""Per-image scores shared by the benchmarks that report tails (tail, forecasts, guidance, frontier):
each cached image against the uncached image of the same seed, then mean, 5th percentile and worst."""

from __future__ import annotations

import torch

from stepcache import reference

__all__ = ["generate", "per_image_psnr", "summary"]


def generate(
    model: torch.nn.Module,
    scheduler: str,
    steps: int,
    n: int,
    seed: int,
    guidance: float = 1.0,
    differentiable: bool = False,
) -> torch.Tensor:
    """``n`` images of all classes in turn (labels ``i % 10``) in one ``reference.sample`` call
    (``differentiable``: with its autograd graph where gradients are enabled)."""
    labels = torch.arange(n) % reference.NUM_CLASSES
    return reference.sample(
        model,
        labels,
        scheduler=scheduler,
        num_inference_steps=steps,
        seed=seed,
        guidance_scale=guidance,
        differentiable=differentiable,
    )


def per_image_psnr(images: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image against its uncached twin; images span [-1, 1] (range 2). Identical
    images score 100 dB (not infinity), so means stay finite."""
    mse = (images - base).double().pow(2).flatten(1).mean(1).clamp_min(1e-30)
    return (10 * torch.log10(4.0 / mse)).clamp(max=100.0)


def summary(psnr: torch.Tensor) -> dict[str, float]:
    """Mean, 5th percentile and worst of per-image PSNRs, in dB rounded to 0.01."""
    return {
        "mean_db": round(float(psnr.mean()), 2),
        "p5_db": round(float(torch.quantile(psnr, 0.05)), 2),
        "worst_db": round(float(psnr.min()), 2),
    }
