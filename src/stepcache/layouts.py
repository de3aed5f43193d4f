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
    An empty layout marks a block class that has attention / feed-forward children but is no part
    of the denoising trunk, so that the generic rule does not take its list for a block stack.
    """

    components: Mapping[str, str]

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.components.items() if v not in COMPONENT_TYPES[:3]}
        if bad:
            raise DiscoveryError(f"BlockLayout types must be one of {COMPONENT_TYPES[:3]}, got {bad}")


_CROSS = BlockLayout({"attn1": "attn", "attn2": "cross_attn", "ff": "ff"})
# Two-stream (image, text) blocks: joint attention returns both streams as one tuple, which is stored
# and reused whole; `ff_context` is the text stream's feed-forward (absent in SD3's last block).
_JOINT = BlockLayout({"attn": "attn", "ff": "ff", "ff_context": "ff"})
# Flux / Hunyuan single-stream blocks have no feed-forward module: the MLP branch is `proj_mlp`
# (+ activation), joined with the attention output by a shared `proj_out` that keeps running.
_SINGLE = BlockLayout({"attn": "attn", "proj_mlp": "ff"})

LAYOUTS: dict[str, BlockLayout] = {
    # diffusers DiT and PixArt (no `attn2` in DiT: skipped); also the generic Transformer2DModel.
    "BasicTransformerBlock": _CROSS,
    "DiTBlock": BlockLayout({"attn": "attn", "mlp": "ff"}),  # facebookresearch/DiT
    # SD3 / SD3.5: `attn2` exists only in dual-attention layers and is a second *self*-attention
    # (its `is_cross_attention=False` makes it `attn`).
    "JointTransformerBlock": BlockLayout({"attn": "attn", "attn2": "attn", "ff": "ff", "ff_context": "ff"}),
    "FluxTransformerBlock": _JOINT,
    "FluxSingleTransformerBlock": _SINGLE,
    "HunyuanVideoTransformerBlock": _JOINT,
    "HunyuanVideoTokenReplaceTransformerBlock": _JOINT,
    "HunyuanVideoSingleTransformerBlock": _SINGLE,
    "HunyuanVideoTokenReplaceSingleTransformerBlock": _SINGLE,
    # Hunyuan's text refiner (`context_embedder.token_refiner.refiner_blocks`) runs on the text
    # tokens only, a sliver of the cost, and is no part of the denoising trunk: not cached by
    # default (to include it: blocks=[...refiner_blocks], components={"attn": "attn", "ff": "ff"}).
    "HunyuanVideoIndividualTokenRefinerBlock": BlockLayout({}),
    "StableAudioDiTBlock": _CROSS,
    # CogVideoX: `attn1` is joint over [text, video] and returns both streams; one `ff` over both.
    "CogVideoXBlock": BlockLayout({"attn1": "attn", "ff": "ff"}),
    "WanTransformerBlock": BlockLayout({"attn1": "attn", "attn2": "cross_attn", "ffn": "ff"}),
    # LTX's attention class has no `is_cross_attention` flag: the layout is what types `attn2`.
    "LTXVideoTransformerBlock": _CROSS,
    "SanaTransformerBlock": _CROSS,  # `ff` is a convolutional GLU (GLUMBConv) on a (B, C, H, W) map
    # Open-Sora 1.2 (STDiT3): separate `spatial_blocks` / `temporal_blocks` of this one class.
    "STDiT3Block": BlockLayout({"attn": "attn", "cross_attn": "cross_attn", "mlp": "ff"}),
    # Open-Sora 1.0 / 1.1 (STDiT): one block list; each block also holds its temporal attention.
    "STDiTBlock": BlockLayout({"attn": "attn", "attn_temp": "attn", "cross_attn": "cross_attn", "mlp": "ff"}),
    # ComfyUI's own model classes (comfy.ldm.*; also the reference code they follow). Only children whose
    # forward the block calls are listed: a layout names modules to intercept, not the math around them.
    # Wan 2.1 / 2.2 (comfy.ldm.wan.model; the VACE, camera, S2V and HuMo variants subclass it).
    "WanAttentionBlock": BlockLayout({"self_attn": "attn", "cross_attn": "cross_attn", "ffn": "ff"}),
    # Qwen-Image (comfy.ldm.qwen_image and diffusers alike): joint attention returns both streams.
    "QwenImageTransformerBlock": BlockLayout({"attn": "attn", "img_mlp": "ff", "txt_mlp": "ff"}),
    # Flux, Chroma and HunyuanVideo (comfy.ldm.flux.layers): the double-stream block computes its joint
    # attention inline (`img_attn.qkv`, the attention function, `img_attn.proj`), so its MLPs are the only
    # residual branches a call reaches; the single-stream block fuses attention and MLP into `linear1` /
    # `linear2` and has none. Cache their attention with whole blocks (types=("block",)).
    "DoubleStreamBlock": BlockLayout({"img_mlp": "ff", "txt_mlp": "ff"}),
    # SD3 / SD3.5 MMDiT (comfy.ldm.modules.diffusionmodules.mmdit): each JointBlock's `context_block` and
    # `x_block` mix their attention in a shared function; the MLP is called from `post_attention`.
    "DismantledBlock": BlockLayout({"mlp": "ff"}),
}

# Generic rule: attribute names that mark a residual branch in an unregistered block.
NAME_TYPES: dict[str, str] = {
    "attn": "attn",
    "attn1": "attn",
    "self_attn": "attn",
    "attention": "attn",
    "self_attention": "attn",
    "attn_temp": "attn",
    "attn2": "cross_attn",
    "cross_attn": "cross_attn",
    "cross_attention": "cross_attn",
    "ff": "ff",
    "ffn": "ff",
    "mlp": "ff",
    "feed_forward": "ff",
    "feedforward": "ff",
}
