"""A small CNN digit classifier, the package's stand-in for Inception.

It scores generated digits two ways: its logits give the class accuracy of conditional samples, and its
penultimate layer gives the features of a Fréchet distance (FD) that, unlike Inception-FID, was trained on
exactly this image domain and runs offline in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stepcache.reference._weights import (
    REGENERATE_HINT,
    ReferenceWeightsError,
    load_state_into,
    read_json,
    read_safetensors,
    resolve_weights_dir,
)

__all__ = ["CLASSIFIER_CONFIG_FILE", "CLASSIFIER_WEIGHTS_FILE", "DigitClassifier", "load_classifier"]

CLASSIFIER_WEIGHTS_FILE = "classifier.safetensors"
CLASSIFIER_CONFIG_FILE = "classifier.json"


class DigitClassifier(nn.Module):
    """Four 3x3 convolutions, two poolings, one hidden fully connected layer (the features), one head.

    Inputs are ``(N, 1, 16, 16)`` images in ``[-1, 1]``, the same range the diffusion model produces, so
    generated samples can be scored without conversion.
    """

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.width = width
        self.num_features = num_features
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 16, num_features),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, shape ``(N, num_features)``: the embedding used by the Fréchet distance."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape ``(N, num_classes)``."""
        return self.head(self.body(x))

    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored next to the weights so the loader can rebuild the network."""
        return {"width": self.width, "num_features": self.num_features, "num_classes": self.num_classes}


def load_classifier(
    device: str | torch.device = "cpu", *, weights_dir: str | Path | None = None
) -> DigitClassifier:
    """Load the shipped evaluation classifier in eval mode.

    Args:
        device: where to put the network.
        weights_dir: folder holding ``classifier.json`` and ``classifier.safetensors``; ``None`` means the
            folder shipped with the package (overridable so tests and retrained copies can point elsewhere).

    Raises:
        ReferenceWeightsError: a file is missing, corrupted, or does not fit the architecture.
    """
    folder = resolve_weights_dir(weights_dir)
    cfg_path = folder / CLASSIFIER_CONFIG_FILE
    weights_path = folder / CLASSIFIER_WEIGHTS_FILE
    meta = read_json(cfg_path)
    arch = meta.get("config", {})
    try:
        model = DigitClassifier(**arch)
    except TypeError as exc:
        raise ReferenceWeightsError(f"{cfg_path} has an invalid 'config' ({exc}). {REGENERATE_HINT}") from exc
    state = read_safetensors(weights_path, expected_sha256=meta.get("sha256"))
    load_state_into(model, state, weights_path)
    return model.to(device).eval()
