"""Per-cell statistics over generations that combine exactly: what pooling ranks and merging
calibration files need."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Moments", "nanmean"]


def nanmean(stack: np.ndarray) -> np.ndarray:
    # NaN corners (step < j) are expected: silence numpy's "mean of empty slice".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stack, axis=0)


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a per-cell quantity over generations: how many generations measured
    each cell, their mean, and the sum of squared deviations from it (``m2``).

    Two sets combine exactly (the pairwise update of Chan, Golub and LeVeque), in any grouping: what
    pooling ranks and merging calibration files need, and stabler than sums of squares. The mean of
    the pooled set is the sample-weighted mean, never a mean of means.
    """

    count: np.ndarray
    mean: np.ndarray  # NaN where count is 0
    m2: np.ndarray

    @classmethod
    def of(cls, stack: np.ndarray) -> Moments:
        """Of a stack ``(generations, ...)`` holding NaN where a generation did not measure a cell."""
        count = np.isfinite(stack).sum(0).astype(float)
        mean = nanmean(stack)
        m2 = np.nansum((stack - mean) ** 2, axis=0)
        return cls(count, mean, m2)

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> Moments:
        return cls(np.zeros(shape), np.full(shape, np.nan), np.zeros(shape))

    @classmethod
    def of_summary(cls, samples: int, mean: np.ndarray, std: np.ndarray | None) -> Moments:
        """From a calibration's mean and (population) spread of ``samples`` generations; without a
        spread, ``m2`` is NaN (the pooled spread is then unknown)."""
        mean = np.asarray(mean, dtype=float)
        count = np.where(np.isfinite(mean), float(samples), 0.0)
        m2 = (
            np.full(mean.shape, np.nan)
            if std is None
            else np.nan_to_num(np.asarray(std, dtype=float) ** 2) * count
        )
        return cls(count, mean, m2)

    def __add__(self, other: Moments) -> Moments:
        n = self.count + other.count
        a, b = np.nan_to_num(self.mean), np.nan_to_num(other.mean)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, (self.count * a + other.count * b) / n, np.nan)
            cross = np.where(n > 0, (b - a) ** 2 * self.count * other.count / n, 0.0)
        return Moments(n, mean, self.m2 + other.m2 + cross)

    def std(self) -> np.ndarray:
        """Population standard deviation per cell (NaN where nothing was measured)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.sqrt(self.m2 / self.count), np.nan)

    def pack(self) -> list[np.ndarray]:
        return [self.count.reshape(-1), self.mean.reshape(-1), self.m2.reshape(-1)]

    @classmethod
    def unpack(cls, chunks: Sequence[np.ndarray], shape: tuple[int, ...]) -> Moments:
        return cls(*(np.asarray(c, dtype=float).reshape(shape) for c in chunks))
