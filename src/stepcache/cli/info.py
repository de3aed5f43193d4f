"""``stepcache info MODEL``: the blocks and cacheable components of a model, and their share of MACs."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Annotated, Any

import typer

from ..discovery import COMPONENT_TYPES, denoiser_of, discover
from ..errors import StepCacheError
from ..runtime.introspect import MacShares, mac_shares
from . import _targets
from ._common import fail
from ._targets import ModelArg

# Logged as the command line, whichever command module logs.
_log = logging.getLogger(__package__)


def info(
    model: ModelArg,
    types: Annotated[str, typer.Option(help="Comma-separated component types.")] = "attn,cross_attn,ff",
    macs: Annotated[
        bool, typer.Option(help="Measure MAC shares with a 2-step generation (pipelines).")
    ] = True,
) -> None:
    """List the blocks and cacheable components stepcache finds in MODEL, and their share of MACs."""
    wanted = [t.strip() for t in types.split(",") if t.strip()]
    if not wanted or any(t not in COMPONENT_TYPES for t in wanted):
        fail(f"--types takes comma-separated types among {', '.join(COMPONENT_TYPES)}, got {types!r}.")
    try:
        target = _targets.load_target(model)
        comps = discover(target, types=wanted)
        denoiser = denoiser_of(target)
    except StepCacheError as e:
        fail(e)
    params = sum(p.numel() for p in denoiser.parameters())
    covered = sum(p.numel() for c in comps for p in c.module.parameters())
    shares = _mac_shares(target, denoiser, comps) if macs and target is not denoiser else None
    typer.echo(
        f"{type(denoiser).__name__}: {params / 1e6:.2f} M parameters, "
        f"{covered / params if params else 0:.0%} of them in cached components"
    )
    if shares is not None:
        parts = ", ".join(f"{k} {v / shares.total:.1%}" for k, v in shares.by_type(comps).items())
        typer.echo(f"  share of the denoiser's MACs per step: {shares.cached_share:.1%} ({parts})")
    for stack in Counter(c.stack for c in comps):
        blocks = sorted({c.index for c in comps if c.stack == stack})
        kinds = Counter(c.type for c in comps if c.stack == stack)
        example = next(c for c in comps if c.stack == stack)
        children = ", ".join(f"{c.child}={c.type}" for c in comps if c.block == example.block)
        typer.echo(
            f"  {stack}: {len(blocks)} blocks of {type(denoiser.get_submodule(example.block)).__name__}; "
            f"components per block: {children}; total {dict(kinds)}"
        )


def _mac_shares(target: Any, denoiser: Any, comps: list) -> MacShares | None:
    """MACs of the denoiser and of each component over a 2-step generation (pipelines)."""
    try:
        kwargs = _targets.inputs_for(target, 1, ["a photo"], 0, None, strict=False)[0]
        shares = mac_shares(denoiser, comps, lambda: target(**kwargs, num_inference_steps=2))
    except Exception as e:  # any pipeline may need inputs we cannot guess: say so, do not fail
        _log.info("MAC shares not measured: %s", e)
        return None
    return shares if shares.total else None
