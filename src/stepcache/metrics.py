"""Image-quality metrics for comparing cached against uncached diffusion samples.

All functions take images in ``[-1, 1]`` (the range the reference model produces) and return plain
floats. torchmetrics is imported lazily so ``import stepcache.metrics`` costs nothing extra; the Fréchet
maths is torchmetrics' own ``FrechetInceptionDistance`` fed with a custom feature extractor, not a
hand-written re-implementation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import StepCacheError

__all__ = [
    "class_accuracy",
    "extract_features",
    "frechet_distance",
    "frechet_distance_bootstrap",
    "frechet_distance_from_features",
    "psnr",
    "ssim",
]

logger = logging.getLogger(__name__)

_BATCH = 512


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise StepCacheError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3:  # a single (C, H, W) image
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.dim() != 4:
        raise StepCacheError(f"expected (N, C, H, W) images, got shape {tuple(a.shape)}")
    return a.detach().float().cpu(), b.detach().float().cpu()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB: the MEAN over the batch of per-image PSNR.

    Per-image (rather than PSNR of the pooled MSE) so one badly reconstructed image is not averaged away
    by many good ones. Identical images give ``inf`` (and so does the mean if any pair is identical).
    ``data_range`` is 2.0 because images span ``[-1, 1]``.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _check_pair(a, b)
    per_image = peak_signal_noise_ratio(a, b, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return float(per_image.mean())


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Structural similarity, mean over the batch (1.0 = identical).

    Uses a 7x7 Gaussian window (sigma 1.0) instead of torchmetrics' default 11x11: on 16x16 images an
    11x11 window leaves only the central 6x6 pixels as window centres.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _check_pair(a, b)
    value = structural_similarity_index_measure(
        a, b, data_range=data_range, kernel_size=7, sigma=1.0, reduction="elementwise_mean"
    )
    return float(value if isinstance(value, torch.Tensor) else value[0])


def _feature_fn(feature_extractor: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Use ``.features`` when the module has one (the reference classifier), else its forward."""
    fn = getattr(feature_extractor, "features", None)
    return fn if callable(fn) else feature_extractor


def extract_features(
    images: torch.Tensor, feature_extractor: nn.Module, batch_size: int = _BATCH
) -> torch.Tensor:
    """``(N, d)`` float64 features of ``[-1, 1]`` images, computed once in no-grad batches on the extractor's device."""
    fn = _feature_fn(feature_extractor)
    return _batched_eval(
        feature_extractor, images, lambda x: fn(x).reshape(x.shape[0], -1).double(), batch_size
    )


def _batched_eval(
    module: nn.Module, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> torch.Tensor:
    """``fn`` over ``images`` in no-grad float32 batches on ``module``'s device, in eval mode (restored)."""
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            outs = [
                fn(chunk.to(device=device, dtype=torch.float32)).cpu()
                for chunk in images.detach().split(batch_size)
            ]
    finally:
        module.train(was_training)
    return torch.cat(outs)


class _Identity(nn.Module):
    """Feature "extractor" for already computed features, so bootstrap resamples never re-run the CNN."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _fid_metric(module: nn.Module, reset_real: bool = True) -> Any:
    """torchmetrics' FID around ``module``; its running sums are float64 whatever the features' dtype."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=module, normalize=True, reset_real_features=reset_real)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, feature_extractor: nn.Module) -> float:
    """Fréchet distance between two image sets in the feature space of ``feature_extractor``.

    Args:
        real, fake: ``(N, C, H, W)`` images in ``[-1, 1]`` (at least 2 each; use hundreds for a stable value).
        feature_extractor: a module with a ``features(x)`` method (e.g. ``load_classifier()``) or whose
            forward returns ``(N, d)`` features; the torchmetrics FID state is float64.

    Returns:
        The FD (>= 0 up to round-off). Always compare against a real-vs-real noise floor: with few
        samples the estimate is biased upwards.
    """
    # Features once, in no-grad batches; the FD maths is torchmetrics' (as for the bootstrap).
    return frechet_distance_from_features(
        extract_features(real, feature_extractor), extract_features(fake, feature_extractor)
    )


def frechet_distance_from_features(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Fréchet distance between two precomputed ``(N, d)`` feature sets (torchmetrics' FID maths)."""
    d = int(real_features.shape[1])
    fid = _fid_metric(_Identity(d))
    fid.update(real_features.double(), real=True)
    fid.update(fake_features.double(), real=False)
    return float(fid.compute())


def frechet_distance_bootstrap(
    real: torch.Tensor,
    fake: torch.Tensor,
    feature_extractor: nn.Module,
    n_boot: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, tuple[float, float]]:
    """Fréchet distance with a bootstrap interval over the fake set.

    Features are computed once; each of ``n_boot`` resamples (with replacement) of the fake features is
    scored against the fixed real statistics. Resampling duplicates images, which inflates every
    resampled FD by a roughly constant bias, so the interval is the spread of the bootstrap distribution
    re-centred on the point estimate: ``(fd + q_lo - median, fd + q_hi - median)``, clipped at 0. It
    therefore always contains ``fd`` and measures how much the FD would move with a different fake set
    of the same size.

    Returns:
        ``(fd, (lo, hi))``.
    """
    if n_boot < 1:
        raise StepCacheError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise StepCacheError(f"confidence must be in (0, 1), got {confidence}")
    real_f = extract_features(real, feature_extractor)
    fake_f = extract_features(fake, feature_extractor)
    d = int(real_f.shape[1])
    fid = _fid_metric(_Identity(d), reset_real=False)
    fid.update(real_f, real=True)
    fid.update(fake_f, real=False)
    point = float(fid.compute())
    gen = torch.Generator().manual_seed(int(seed))
    n = fake_f.shape[0]
    boots = torch.empty(n_boot, dtype=torch.float64)
    for i in range(n_boot):
        fid.reset()  # keeps the real statistics (reset_real_features=False)
        idx = torch.randint(0, n, (n,), generator=gen)
        fid.update(fake_f[idx], real=False)
        boots[i] = float(fid.compute())
    alpha = (1.0 - confidence) / 2.0
    q_lo, q_med, q_hi = (
        float(v) for v in torch.quantile(boots, torch.tensor([alpha, 0.5, 1.0 - alpha], dtype=torch.float64))
    )
    lo = max(0.0, min(point, point + q_lo - q_med))
    hi = max(point, point + q_hi - q_med)
    if not math.isfinite(point):
        logger.warning("Fréchet distance is not finite; check the feature extractor output")
    return point, (lo, hi)


def class_accuracy(
    images: torch.Tensor, labels: torch.Tensor, classifier: nn.Module, batch_size: int = _BATCH
) -> float:
    """Fraction of ``images`` (in ``[-1, 1]``) that ``classifier`` assigns to ``labels`` (argmax of logits).

    For conditional samples this measures whether the model draws the digit it was asked for.
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if images.shape[0] != labels.shape[0]:
        raise StepCacheError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    preds = _batched_eval(classifier, images, lambda x: classifier(x).argmax(dim=1), batch_size)
    return float((preds == labels).float().mean())
