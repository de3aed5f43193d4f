"""Locating and safely reading the shipped reference weights.

Every failure to read a weights or config file is turned into :class:`ReferenceWeightsError`, which names
the file and says how to regenerate it. Users of the demos never see a raw safetensors/torch traceback
for what is, in practice, always the same fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from stepcache.errors import ReferenceWeightsError

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "REGENERATE_HINT",
    "ReferenceWeightsError",
    "file_sha256",
    "read_json",
    "read_safetensors",
    "resolve_weights_dir",
]

#: Where the trained weights ship inside the package.
DEFAULT_WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"

#: The one command that recreates every file in the weights folder.
REGENERATE_HINT = (
    "Regenerate the reference weights with `python scripts/train_reference.py` (about 30 min on a CPU; "
    "add `--objective flow` for the flow-matching model dit_digits_flow)."
)


def resolve_weights_dir(weights_dir: str | Path | None) -> Path:
    """Return the folder to read weights from; ``None`` means the folder shipped with the package."""
    return DEFAULT_WEIGHTS_DIR if weights_dir is None else Path(weights_dir)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, used to detect silently corrupted tensor bytes that safetensors cannot see."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fail(path: Path, what: str) -> ReferenceWeightsError:
    return ReferenceWeightsError(f"Reference weights file {path} {what}. {REGENERATE_HINT}")


def read_json(path: Path) -> dict[str, Any]:
    """Read a config json, mapping every failure to :class:`ReferenceWeightsError`."""
    if not path.is_file():
        raise _fail(path, "is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"could not be read as JSON ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise _fail(path, "does not hold a JSON object")
    return data


def read_safetensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file on CPU, checking its checksum when one is recorded.

    The checksum matters because safetensors only validates the header: flipped bytes inside a tensor
    would otherwise load "fine" and give a silently broken model.
    """
    from safetensors.torch import load_file

    if not path.is_file():
        raise _fail(path, "is missing")
    if expected_sha256 is not None:
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise _fail(path, f"could not be read ({exc})") from exc
        if digest != expected_sha256:
            raise _fail(path, f"is corrupted (sha256 {digest[:12]}... != recorded {expected_sha256[:12]}...)")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own Rust-side error types; all mean "bad file".
        raise _fail(
            path, f"is corrupted or not a safetensors file ({exc.__class__.__name__}: {exc})"
        ) from exc


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with a mismatch reported as :class:`ReferenceWeightsError`."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _fail(path, f"does not match the model architecture ({exc})") from exc
