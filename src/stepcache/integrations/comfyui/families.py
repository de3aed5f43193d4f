"""ComfyUI's diffusion model classes (``comfy.ldm.*``) as data: which block lists a cache uses, what it
caches by default, and whether the blocks update their inputs in place.

The block layouts themselves (which children are attention, cross-attention, feed-forward) are
registered with the others in :mod:`stepcache.layouts`; this table says how to use them on each
ComfyUI model, keyed by the diffusion model's class name (looked up along its MRO, so Wan's VACE,
camera, S2V and HuMo variants are Wan). No ComfyUI import: class names only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...discovery import DEFAULT_TYPES
from ...errors import StepCacheError

__all__ = ["CACHE_MODES", "FAMILIES", "Family", "discovery_args", "family_of"]

CACHE_MODES = ("auto", "blocks", "components")


@dataclass(frozen=True)
class Family:
    """How stepcache caches one ComfyUI model class.

    Attributes:
        name: short family name (in calibration file names and logs).
        stacks: the block lists of the denoising trunk (discovery's ``blocks``); empty: discovery's
            own rule (every list of repeated blocks).
        default: ``"components"`` (attention / cross-attention / feed-forward branches) or
            ``"blocks"`` (whole blocks), what ``cache="auto"`` picks. Whole blocks where the attention
            is computed inline and no module call reaches it (Flux's double- and single-stream blocks,
            SD3's joint blocks).
        in_place: the blocks add their branches to their input tensors in place (``img += ...``), so a
            kept whole-block output would be overwritten by the next block: kept outputs are then
            handed on as copies.
    """

    name: str
    stacks: tuple[str, ...] = ()
    default: str = "components"
    in_place: bool = False


_FLUX = Family("flux", ("double_blocks", "single_blocks"), "blocks", in_place=True)

FAMILIES: dict[str, Family] = {
    "Flux": _FLUX,  # comfy.ldm.flux.model (Flux.1, Flux.2, Kontext)
    "Chroma": Family("chroma", _FLUX.stacks, "blocks", in_place=True),
    "HunyuanVideo": Family("hunyuan_video", _FLUX.stacks, "blocks", in_place=True),
    "WanModel": Family("wan", ("blocks",)),  # Wan 2.1 and 2.2 (each expert is a MODEL of its own)
    "QwenImageTransformer2DModel": Family("qwen_image", ("transformer_blocks",)),
    "MMDiT": Family("sd3", ("joint_blocks",), "blocks"),  # SD3 / SD3.5
    # Others whose blocks the generic rule reads (attn1 / attn2 / ff, attention / feed_forward, ...).
    "LTXVModel": Family("ltxv", ("transformer_blocks",), in_place=True),  # x.addcmul_(...) in its blocks
    "NextDiT": Family("lumina2", ("layers",)),  # Lumina 2 / Z-Image; not its refiners
    "PixArtMS": Family("pixart", ("blocks",)),
}

# Classes not in the table: discovery's generic rule, and outputs copied (a block of unknown code may
# update a kept tensor in place).
GENERIC = Family("generic", (), "components", in_place=True)


def family_of(model: Any) -> Family:
    """The family of a ComfyUI diffusion model (``model_patcher.model.diffusion_model``)."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return GENERIC


def discovery_args(family: Family, model: Any, cache: str) -> dict[str, Any]:
    """``blocks`` and ``types`` for :func:`stepcache.discover` (and the cache and calibration that use
    it) on ``model`` with ``cache`` one of :data:`CACHE_MODES`."""
    if cache not in CACHE_MODES:
        raise StepCacheError(f"cache must be one of {CACHE_MODES}, got {cache!r}.")
    mode = family.default if cache == "auto" else cache
    stacks = [s for s in family.stacks if _has(model, s)]
    blocks: Any = stacks or None
    if mode == "components" and family.name == "sd3" and stacks:
        # SD3's residual branches live one level down, in each joint block's two streams.
        blocks = [
            f"joint_blocks.{i}.{stream}"
            for i in range(len(model.joint_blocks))
            for stream in ("context_block", "x_block")
        ]
    types = ("block",) if mode == "blocks" else DEFAULT_TYPES
    return {"blocks": blocks, "types": types}


def _has(model: Any, path: str) -> bool:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    try:
        return len(obj) > 0
    except TypeError:
        return False
