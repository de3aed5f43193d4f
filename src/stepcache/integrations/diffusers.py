"""diffusers: loading real pipelines, and the tiny one built from configs (no download; it lives
with the other tiny models in :mod:`stepcache.integrations.models`).

Nothing here is imported by ``import stepcache``; diffusers is needed only when these are called.
"""

from __future__ import annotations

from typing import Any

import torch

from .models import tiny_dit_pipeline

__all__ = ["load_pipeline", "tiny_dit_pipeline"]


def load_pipeline(name_or_path: str, *, dtype: torch.dtype | None = None, device: str | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained`` for a local folder or a hub id (needs hub access)."""
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    return pipe.to(device) if device else pipe
