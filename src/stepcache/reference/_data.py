"""The reference data set: scikit-learn's bundled 8x8 digits, upsampled to 16x16.

The digits ship inside scikit-learn, so nothing is downloaded, and 16x16 keeps a DiT with patch size 2
at 64 tokens, small enough to train and sample on a laptop CPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from stepcache.errors import StepCacheError

__all__ = ["IMAGE_SIZE", "NUM_CLASSES", "SPLIT_SEED", "TEST_FRACTION", "load_digits"]

NUM_CLASSES = 10
IMAGE_SIZE = 16
#: Fraction of the 1,797 images held out (stratified by class) for evaluation.
TEST_FRACTION = 0.2
#: Seed of the stratified split; changing it changes which images are "held out".
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    # Bilinear with align_corners=False is a convex combination, so values stay inside [0, 1].
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=TEST_FRACTION, stratify=labels.numpy(), random_state=SPLIT_SEED
    )
    idx_train_t = torch.as_tensor(sorted(idx_train), dtype=torch.long)
    idx_test_t = torch.as_tensor(sorted(idx_test), dtype=torch.long)
    return {
        "train": (images[idx_train_t], labels[idx_train_t]),
        "test": (images[idx_test_t], labels[idx_test_t]),
    }


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split of the upsampled digits.

    Args:
        split: ``"train"`` (1,437 images) or ``"test"`` (360 held-out images); a fixed stratified split
            (seed :data:`SPLIT_SEED`), so every metric in the package refers to the same held-out set.

    Returns:
        ``images`` of shape ``(N, 1, 16, 16)``, float32 in ``[-1, 1]``, and ``labels`` of shape ``(N,)``,
        int64 in ``0..9``. Fresh copies: callers may modify them freely.
    """
    splits = _splits()
    if split not in splits:
        raise StepCacheError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = splits[split]
    return images.clone(), labels.clone()
