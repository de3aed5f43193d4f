"""Find the cacheable components of a diffusion transformer.

A *component* is a residual branch inside a transformer block whose output the block adds back to
its hidden state (self-attention, cross-attention, feed-forward), or a whole block. Reusing a
component's output is safe in a way that skipping arbitrary modules is not: the block's gates,
residual additions and norms still run, so the reused value only perturbs the residual stream.

Known block classes are described by a :class:`BlockLayout` in a small registry; unknown models fall
back to a generic rule (repeated same-class children of a ``ModuleList``, components recognised by
attribute name or class name); the caller can always override which blocks and which children.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import DiscoveryError
from .layouts import COMPONENT_TYPES, LAYOUTS, NAME_TYPES, BlockLayout

__all__ = [
    "COMPONENT_TYPES",
    "DEFAULT_TYPES",
    "BlockLayout",
    "Component",
    "denoiser_of",
    "denoisers_of",
    "discover",
    "register_layout",
    "unwrap",
]

logger = logging.getLogger(__name__)

# Attention alone buys little: the SmoothCache paper reports a much smaller speed-up when only attention
# is cached than with feed-forward too, on the same schedule.
DEFAULT_TYPES: tuple[str, ...] = ("attn", "cross_attn", "ff")


def register_layout(block_class_name: str, components: Mapping[str, str]) -> None:
    """Teach discovery a block class: ``register_layout("MyBlock", {"sa": "attn", "mlp": "ff"})``."""
    LAYOUTS[block_class_name] = BlockLayout(dict(components))


@dataclass(frozen=True)
class Component:
    """One cacheable unit, named relative to the denoiser (``transformer_blocks.3.ff``)."""

    name: str
    type: str
    block: str
    stack: str
    index: int
    module: nn.Module = field(repr=False, compare=False)

    @property
    def child(self) -> str:
        """The attribute name inside the block (``ff``), or ``""`` for a whole block."""
        return "" if self.type == "block" else self.name.rsplit(".", 1)[-1]


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s wrapper (``OptimizedModule._orig_mod``), or the module.

    Discovery, fingerprints, timestep parameters and component names all read the model itself, so
    a schedule made on the uncompiled model applies unchanged to the compiled one.
    """
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod  # type: ignore[assignment]
    return module


def denoiser_of(target: object) -> nn.Module:
    """The module that runs once per denoising step: a pipeline's ``transformer``, or the module itself."""
    if isinstance(target, nn.Module):
        return target
    for attr in ("transformer", "denoiser", "model"):
        mod = getattr(target, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    raise DiscoveryError(
        f"{type(target).__name__} is neither an nn.Module nor a pipeline with a `.transformer`: "
        "pass the denoiser module itself."
    )


def denoisers_of(target: object) -> list[tuple[str, nn.Module]]:
    """Every denoiser of ``target`` with the prefix its component names get.

    A module is its own only denoiser (prefix ``""``). A pipeline has ``.transformer`` and, in
    two-expert pipelines such as Wan 2.2 A14B (high-noise and low-noise models), ``.transformer_2``,
    whose components are named ``transformer_2.<...>``. All of them share one step count.
    """
    first = denoiser_of(target)
    found = [("", first)]
    second = None if isinstance(target, nn.Module) else getattr(target, "transformer_2", None)
    if isinstance(second, nn.Module) and second is not first:
        found.append(("transformer_2.", second))
    return found


def _layout_for(block: nn.Module) -> BlockLayout | None:
    for cls in type(block).__mro__:
        if cls.__name__ in LAYOUTS:
            return LAYOUTS[cls.__name__]
    return None


def _generic_type(name: str, child: nn.Module) -> str | None:
    if name in NAME_TYPES:
        return NAME_TYPES[name]
    cls = type(child).__name__
    if "CrossAttention" in cls:
        return "cross_attn"
    if "Attention" in cls:
        return "attn"
    if "FeedForward" in cls or cls.lower().endswith("mlp"):
        return "ff"
    return None


def _refine(kind: str, child: nn.Module) -> str:
    # `attn2` is a second *self*-attention in SD3.5 dual-attention blocks: trust the module's own flag.
    flag = getattr(child, "is_cross_attention", None)
    if kind in ("attn", "cross_attn") and isinstance(flag, bool):
        return "cross_attn" if flag else "attn"
    return kind


def _block_children(block: nn.Module, override: Mapping[str, str | None] | None) -> dict[str, str]:
    """Child attribute name -> component type for one block."""
    if override is not None:
        found = {}
        for name, kind in override.items():
            child = getattr(block, name, None)
            if isinstance(child, nn.Module):
                found[name] = _refine(kind or _generic_type(name, child) or "attn", child)
        return found
    layout = _layout_for(block)
    if layout is not None:
        return {
            name: _refine(kind, getattr(block, name))
            for name, kind in layout.components.items()
            if isinstance(getattr(block, name, None), nn.Module)
        }
    found = {}
    for name, child in block.named_children():
        kind = _generic_type(name, child)
        if kind is not None:
            found[name] = _refine(kind, child)
    return found


def _auto_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """ModuleLists/Sequentials of >= 2 same-class blocks that contain components, outermost only."""
    stacks: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        if any(name.startswith(s + ".") for s, _ in stacks):
            continue  # nested inside a block we already have
        classes = {type(b) for b in mod}
        if len(classes) != 1:
            continue
        if _block_children(mod[0], None):
            stacks.append((name, mod))
    return stacks


def _resolve_blocks(
    model: nn.Module, blocks: str | type | Sequence[str | type] | None
) -> list[tuple[str, str, int, nn.Module]]:
    """(block name, stack name, index, block) for every block, in execution-list order."""
    named = dict(model.named_modules())
    if blocks is None:
        stacks = _auto_stacks(model)
        return [(f"{s}.{i}", s, i, b) for s, mod in stacks for i, b in enumerate(list(mod.children()))]
    if isinstance(blocks, (str, type)):
        blocks = [blocks]
    out: list[tuple[str, str, int, nn.Module]] = []
    for spec in blocks:
        if isinstance(spec, type):
            hits = [(n, named[n]) for n in named if isinstance(named[n], spec)]
            if not hits:
                raise DiscoveryError(f"blocks: no module of class {spec.__name__} in {type(model).__name__}.")
            for n, m in hits:
                stack, _, idx = n.rpartition(".")
                out.append((n, stack, int(idx) if idx.isdigit() else 0, m))
            continue
        if not isinstance(spec, str):
            raise DiscoveryError(f"blocks: expected module names or classes, got {spec!r}.")
        if spec not in named:
            close = difflib.get_close_matches(spec, list(named), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise DiscoveryError(f"blocks: {type(model).__name__} has no submodule {spec!r}.{hint}")
        mod = named[spec]
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            out.extend((f"{spec}.{i}", spec, i, b) for i, b in enumerate(mod))
        else:
            stack, _, idx = spec.rpartition(".")
            out.append((spec, stack, int(idx) if idx.isdigit() else 0, mod))
    return out


def _describe(model: nn.Module) -> str:
    lists = [
        f"{n} ({len(m)} x {type(m[0]).__name__})"
        for n, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0
    ][:8]
    children = [n for n, _ in model.named_children()][:12]
    return f"top-level children: {children}; module lists: {lists or 'none'}"


def discover(
    target: object,
    *,
    blocks: str | type | Sequence[str | type] | None = None,
    components: Iterable[str] | Mapping[str, str | None] | None = None,
    types: Iterable[str] | None = None,
) -> list[Component]:
    """List the cacheable components of ``target`` (a module or a pipeline with ``.transformer``).

    Args:
        blocks: override which blocks to use: qualified names of block lists or single blocks
            (``"transformer_blocks"``), or block classes. Default: every list of repeated blocks.
        components: override which children of each block are components: names
            (``["attn1", "ff"]``, type guessed) or a mapping ``{"attn1": "attn", "ff": "ff"}``.
        types: which component types to keep, from ``attn``, ``cross_attn``, ``ff``, ``block``.
            Default: ``attn``, ``cross_attn``, ``ff``. ``block`` caches whole blocks and cannot be
            combined with the others (a block contains them).

    Raises:
        DiscoveryError: nothing matched. stepcache never caches nothing silently.
    """
    wanted = tuple(DEFAULT_TYPES if types is None else types)
    unknown = [t for t in wanted if t not in COMPONENT_TYPES]
    if unknown:
        raise DiscoveryError(f"types: unknown component type(s) {unknown}; choose from {COMPONENT_TYPES}.")
    if "block" in wanted and len(wanted) > 1:
        raise DiscoveryError(
            "types: 'block' caches whole blocks, which contain their attention and feed-forward; "
            "ask for either ('block',) or sub-block types, not both."
        )
    override: dict[str, str | None] | None = None
    if components is not None:
        override = dict(components) if isinstance(components, Mapping) else dict.fromkeys(components)
        bad = {k: v for k, v in override.items() if v is not None and v not in COMPONENT_TYPES[:3]}
        if bad:
            raise DiscoveryError(f"components: unknown type(s) {bad}; choose from {COMPONENT_TYPES[:3]}.")
    result: list[Component] = []
    for prefix, model in denoisers_of(target):
        for c in _discover_one(unwrap(model), blocks, override, wanted):
            result.append(
                Component(prefix + c.name, c.type, prefix + c.block, prefix + c.stack, c.index, c.module)
            )
    return result


def _discover_one(
    model: nn.Module, blocks: Any, override: dict[str, str | None] | None, wanted: tuple[str, ...]
) -> list[Component]:
    found_blocks = _resolve_blocks(model, blocks)
    if not found_blocks:
        raise DiscoveryError(
            f"No transformer blocks found in {type(model).__name__} ({_describe(model)}). "
            "Pass blocks=['<name of the block list>'] and components={'<child>': 'attn'|'cross_attn'|'ff'}."
        )

    result: list[Component] = []
    seen_children: set[str] = set()
    for block_name, stack, idx, block in found_blocks:
        if wanted == ("block",):
            result.append(Component(block_name, "block", block_name, stack, idx, block))
            continue
        for child, kind in _block_children(block, override).items():
            seen_children.add(child)
            if kind in wanted:
                mod = getattr(block, child)
                result.append(Component(f"{block_name}.{child}", kind, block_name, stack, idx, mod))

    if override is not None and wanted != ("block",):
        missing = [c for c in override if c not in seen_children]
        if missing:
            sample = found_blocks[0][3]
            raise DiscoveryError(
                f"components: {missing} not found in any block (children of {found_blocks[0][0]}: "
                f"{[n for n, _ in sample.named_children()]})."
            )
    if not result:
        raise DiscoveryError(
            f"Found {len(found_blocks)} block(s) in {type(model).__name__} but no component of type "
            f"{list(wanted)} in them (children of {found_blocks[0][0]}: "
            f"{[n for n, _ in found_blocks[0][3].named_children()]}). "
            "Pass components={'<child>': 'attn'|'cross_attn'|'ff'} or types=('block',)."
        )
    logger.debug("discovered %d components in %d blocks", len(result), len(found_blocks))
    return result
