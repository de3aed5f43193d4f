"""``stepcache plan-memory [PRESETS]``: the cache memory of large video/image DiTs, from their configs on
meta tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .._io import write_json
from ..errors import StepCacheError
from ..memory import parse_bytes
from ..planner import PRESETS, render_plans
from ..planner import plan_memory as plan_rows
from ..policies import check_fraction
from ._common import check_budget, check_finite, check_outputs, checked, fail


def plan_memory(
    presets: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model shapes: wan2.1-14b-720p, wan2.1-14b-480p, wan2.1-1.3b-480p, hunyuanvideo-720p, "
            "flux.1-dev-1024 (default: all)."
        ),
    ] = None,
    memory_budget: Annotated[
        str, typer.Option(help="GPU memory for the cache, e.g. 16GB.", callback=checked(check_budget))
    ] = "16GB",
    compute_fraction: Annotated[
        float, typer.Option(help="Share of component calls computed.", callback=checked(check_fraction))
    ] = 0.35,
    bandwidth: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Assumed host link GB/s each way (PCIe Gen5 x16 effective: 50).",
            callback=checked(check_finite),
        ),
    ] = 50.0,
    tflops: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Assumed accelerator peak TFLOPS (H200 bf16: 989).",
            callback=checked(check_finite),
        ),
    ] = 989.0,
    utilisation: Annotated[
        float, typer.Option(min=0.001, max=1.0, help="Assumed share of the peak a step sustains.")
    ] = 0.4,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON.")] = None,
) -> None:
    """Cache memory of large video/image DiTs, from their configs on meta tensors (no download):
    unplanned, with liveness, within a budget, with fp8 storage, on the device with offload."""
    names = presets or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        fail(f"unknown model shape(s) {unknown}; choose among {', '.join(PRESETS)}.")
    check_outputs((json_out, "JSON file (--json)"))
    try:
        rows = [
            plan_rows(
                n,
                budget=parse_bytes(memory_budget),
                compute_fraction=compute_fraction,
                bandwidth=bandwidth * 1e9,
                tflops=tflops,
                utilisation=utilisation,
            )
            for n in names
        ]
    except StepCacheError as e:
        fail(e)
    typer.echo(render_plans(rows))
    if json_out is not None:
        try:
            write_json(json_out, [r.as_dict() for r in rows], what="JSON file (--json)")
        except StepCacheError as e:
            fail(e)
        typer.echo(f"wrote {json_out}")
