"""Tests of stepcache.metrics on real digits (fast, CPU, offline)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stepcache.metrics import (
    class_accuracy,
    extract_features,
    frechet_distance,
    frechet_distance_bootstrap,
    frechet_distance_from_features,
    psnr,
    ssim,
)
from stepcache.reference import load_classifier, load_digits


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def test_images():
    return load_digits("test")


def _noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_psnr_identical_and_monotone(test_images):
    x = test_images[0][:32]
    assert math.isinf(psnr(x, x)) or psnr(x, x) > 100
    values = [psnr(x, _noisy(x, s)) for s in (0.01, 0.05, 0.2, 0.5)]
    assert values == sorted(values, reverse=True)
    assert 30 < values[0] < 60


def test_psnr_known_value():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.2)  # mse 0.04, range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-4)


def test_ssim_identical_is_one_and_decreases(test_images):
    x = test_images[0][:32]
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    values = [ssim(x, _noisy(x, s)) for s in (0.05, 0.2, 0.5)]
    assert values == sorted(values, reverse=True)
    assert values[-1] < 0.9


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_fd_self_is_zero_and_grows_with_shift(classifier, test_images):
    x = test_images[0]
    fd_self = frechet_distance(x, x, classifier)
    fd_small = frechet_distance(x, _noisy(x, 0.1), classifier)
    fd_large = frechet_distance(x, _noisy(x, 0.4), classifier)
    shifted = torch.roll(x, shifts=3, dims=-1)
    fd_shift = frechet_distance(x, shifted, classifier)
    assert abs(fd_self) < 1e-3 * fd_large
    assert fd_self < fd_small < fd_large
    assert fd_shift > fd_small


def test_fd_matches_feature_path_and_plain_module(classifier, test_images):
    x = test_images[0]
    y = _noisy(x, 0.3)
    via_images = frechet_distance(x, y, classifier)
    via_features = frechet_distance_from_features(
        extract_features(x, classifier), extract_features(y, classifier)
    )
    assert via_images == pytest.approx(via_features, rel=1e-6)
    # A module without `.features` / `num_features` is used through its forward.
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(256, 8))
    assert frechet_distance(x, x, plain) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, y, plain) > 0


def test_bootstrap_interval_contains_point(classifier, test_images):
    real = load_digits("train")[0][:400]
    fake = _noisy(test_images[0], 0.2)
    fd, (lo, hi) = frechet_distance_bootstrap(real, fake, classifier, n_boot=50, seed=0)
    assert lo <= fd <= hi
    assert hi > lo
    assert fd == pytest.approx(frechet_distance(real, fake, classifier), rel=1e-6)
    again = frechet_distance_bootstrap(real, fake, classifier, n_boot=50, seed=0)
    assert again == (fd, (lo, hi))


def test_class_accuracy(classifier, test_images):
    x, y = test_images
    assert class_accuracy(x, y, classifier) >= 0.98
    assert class_accuracy(x, (y + 1) % 10, classifier) < 0.05
    with pytest.raises(ValueError):
        class_accuracy(x, y[:5], classifier)
