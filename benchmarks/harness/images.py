"""Scores of a pipeline's outputs against the uncached outputs of the same prompts and seeds (the
real-model kit, ``benchmarks/real_models.py``): per-sample PSNR and SSIM, LPIPS and CLIP score.

Outputs are images ``(N, C, H, W)`` or videos ``(N, F, C, H, W)`` in ``[0, 1]`` (``output_type="pt"``);
a video's PSNR is over all its frames, its SSIM and LPIPS the mean over its frames, its CLIP score
that of its middle frame.

LPIPS (torchmetrics, AlexNet features) and CLIP score need pretrained weights. They are used only
when the weights are already on this machine: :func:`perceptual_metrics` looks for them (torchvision's
AlexNet checkpoint in torch's hub cache, a CLIP model in the Hugging Face cache or a folder) and
returns, for what it cannot find, why; nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Perceptual", "describe", "frames", "per_sample_psnr", "per_sample_ssim", "perceptual_metrics"]

CLIP_MODEL = "openai/clip-vit-large-patch14"


def frames(x: torch.Tensor) -> torch.Tensor:
    """``(N, F, C, H, W)`` videos or ``(N, C, H, W)`` images as ``(N, F, C, H, W)``, float on the CPU."""
    x = x.detach().float().cpu()
    return x if x.dim() == 5 else x.unsqueeze(1)


def per_sample_psnr(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, range 1) of each sample against its uncached twin; identical samples score 100 dB."""
    mse = (frames(x) - frames(base)).double().pow(2).flatten(1).mean(1).clamp_min(1e-30)
    return (10 * torch.log10(1.0 / mse)).clamp(max=100.0)


def per_sample_ssim(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """SSIM (range 1) of each sample against its uncached twin, averaged over a video's frames."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = frames(x), frames(base)
    n, f = a.shape[:2]
    per = structural_similarity_index_measure(
        a.flatten(0, 1), b.flatten(0, 1), data_range=1.0, reduction="none"
    )
    return per.reshape(n, f).mean(1)


@dataclass
class Perceptual:
    """The perceptual metrics available here: ``lpips(x, base)`` and ``clip(x, prompts)`` per sample,
    or None with the reason in ``missing``."""

    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    clip: Callable[[torch.Tensor, Sequence[str]], torch.Tensor] | None = None
    missing: dict[str, str] = field(default_factory=dict)


def perceptual_metrics(device: torch.device, clip_model: str = CLIP_MODEL) -> Perceptual:
    """LPIPS and CLIP score where their weights are already local (see the module doc)."""
    out = Perceptual()
    try:
        out.lpips = _lpips(device)
    except LookupError as e:
        out.missing["lpips"] = str(e)
    try:
        out.clip = _clip(device, clip_model)
    except LookupError as e:
        out.missing["clip_score"] = str(e)
    return out


def _lpips(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        import torchvision
    except ImportError as e:
        raise LookupError("torchvision is not installed (torchmetrics' LPIPS needs its AlexNet)") from e
    weights = torchvision.models.AlexNet_Weights.DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    if not path.exists():
        raise LookupError(f"AlexNet's weights are not in {path.parent} (they are never downloaded here)")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device).eval()

    def score(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        a, b = frames(x), frames(base)
        n, f = a.shape[:2]
        per = []
        with torch.no_grad():
            for i in range(n * f):
                pair = (t.flatten(0, 1)[i : i + 1].to(device) for t in (a, b))
                per.append(float(metric(*pair)))
        return torch.tensor(per).reshape(n, f).mean(1)

    return score


def _clip(device: torch.device, name: str) -> Callable[[torch.Tensor, Sequence[str]], torch.Tensor]:
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name, local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LookupError(f"{name} is not in the local Hugging Face cache (never downloaded here)") from e

    def score(x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """100 x max(cos(image, text), 0), as torchmetrics' CLIPScore; a video's middle frame."""
        v = frames(x)
        images = [(img.clamp(0, 1) * 255).round().to(torch.uint8) for img in v[:, v.shape[1] // 2]]
        inputs = processor(
            text=list(prompts), images=images, return_tensors="pt", padding=True, truncation=True
        )
        with torch.no_grad():
            img = model.get_image_features(pixel_values=inputs["pixel_values"].to(device))
            txt = model.get_text_features(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
            )
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100 * cos.clamp_min(0)).cpu()

    return score


def describe(perceptual: Perceptual) -> dict[str, Any]:
    return {
        "lpips": perceptual.lpips is not None,
        "clip_score": perceptual.clip is not None,
        **({"missing": perceptual.missing} if perceptual.missing else {}),
    }
