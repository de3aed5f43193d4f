"""Block layouts: which children of a transformer block are cacheable residual branches.

Data only (no imports of model libraries): a registry keyed by exact block class name, checked
along the class's MRO, plus the attribute names the generic rule recognises for unknown blocks.
Add a family by adding a :class:`BlockLayout`, not by copying its forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import DiscoveryError

__all__ = ["COMPONENT_TYPES", "LAYOUTS", "NAME_TYPES", "BlockLayout"]

COMPONENT_TYPES: tuple[str, ...] = ("attn", "cross_attn", "ff", "block")


@dataclass(frozen=True)
class BlockLayout:
    """Which children of a block class are residual branches, and of which type.

    ``components`` maps a child attribute name to a component type. Children that are ``None`` or
    absent in a given block are skipped (diffusers' ``BasicTransformerBlock`` has no ``attn2``
    without cross-attention). An attention child whose module says ``is_cross_attention=False`` is
    typed ``attn`` whatever the layout says (SD3.5's second self-attention is called ``attn2``).
    """

    components: Mapping[str, str]

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.components.items() if v not in COMPONENT_TYPES[:3]}
        if bad:
            raise DiscoveryError(f"BlockLayout types must be one of {COMPONENT_TYPES[:3]}, got {bad}")


LAYOUTS: dict[str, BlockLayout] = {
    "BasicTransformerBlock": BlockLayout({"attn1": "attn", "attn2": "cross_attn", "ff": "ff"}),
    "DiTBlock": BlockLayout({"attn": "attn", "mlp": "ff"}),  # facebookresearch/DiT
}

# Generic rule: attribute names that mark a residual branch in an unregistered block.
NAME_TYPES: dict[str, str] = {
    "attn": "attn",
    "attn1": "attn",
    "self_attn": "attn",
    "attention": "attn",
    "self_attention": "attn",
    "attn2": "cross_attn",
    "cross_attn": "cross_attn",
    "cross_attention": "cross_attn",
    "ff": "ff",
    "ffn": "ff",
    "mlp": "ff",
    "feed_forward": "ff",
    "feedforward": "ff",
}
