"""What a cache could leave behind on a model: compared before and after, it must be unchanged."""

from __future__ import annotations

from torch import nn


def model_state(model: nn.Module) -> list[tuple[str, int, int, int, list[str]]]:
    """Hooks of all kinds and the instance attributes (an instance ``forward``) of every submodule."""
    return [
        (
            name,
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._forward_hooks_with_kwargs),
            sorted(m.__dict__),
        )
        for name, m in model.named_modules()
    ]
