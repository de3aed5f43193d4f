"""``stepcache schedule CALIBRATION``: turn a calibration into a schedule (SmoothCache's rule or the
optimal policy), optionally fitted to a memory budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .._io import is_int, read_json
from ..calibration import Calibration
from ..errors import StepCacheError
from ..memory import MAX_BYTES
from ..policies import check_alpha, check_fraction, for_compute_fraction, from_calibration, optimal_schedule
from ._common import (
    MemoryBudgetOpt,
    check_outputs,
    checked,
    choice,
    fail,
    memory_line,
    refuse_unused,
    relay_warnings,
)

BranchesOpt = Annotated[
    int, typer.Option(min=1, max=16, help="With --memory-budget: stores per component, 2 for split guidance.")
]


def _read_sizes(path: Path | None) -> dict[str, int] | None:
    """Component name -> bytes from a JSON file (None: none given), read as strictly as a schedule."""
    if path is None:
        return None
    data = read_json(path, "--sizes", StepCacheError)
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and is_int(v) and 0 <= v <= MAX_BYTES for k, v in data.items()
    ):
        raise StepCacheError(
            f"--sizes {path} must hold a JSON object of component name -> bytes (whole numbers from 0 to "
            f"{MAX_BYTES})."
        )
    return data


def schedule(
    ctx: typer.Context,
    calibration: Annotated[Path, typer.Argument(help="Calibration JSON from `stepcache calibrate`.")],
    alpha: Annotated[
        float | None, typer.Option(help="SmoothCache error threshold.", callback=checked(check_alpha))
    ] = None,
    compute_fraction: Annotated[
        float | None,
        typer.Option(help="Target share of component calls to execute.", callback=checked(check_fraction)),
    ] = None,
    granularity: Annotated[
        str,
        typer.Option(
            help="type (one plan per component type) or layer.", callback=checked(choice("type", "layer"))
        ),
    ] = "type",
    policy: Annotated[
        str,
        typer.Option(
            help="smoothcache (greedy rule, by --alpha or --compute-fraction) or optimal (exact DP for "
            "--compute-fraction, calibrated forecasting and sensitivity weights when recorded).",
            callback=checked(choice("smoothcache", "optimal")),
        ),
    ] = "smoothcache",
    forecast: Annotated[
        bool | None, typer.Option(help="optimal: allow first-order forecasts (default: if calibrated).")
    ] = None,
    budget: Annotated[
        str,
        typer.Option(
            help="optimal: count the budget in calls or macs.", callback=checked(choice("calls", "macs"))
        ),
    ] = "calls",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Schedule JSON to write.")] = None,
    smoothcache_out: Annotated[
        Path | None, typer.Option(help="Also write the original package's format.")
    ] = None,
    memory_budget: MemoryBudgetOpt = None,
    sizes: Annotated[
        Path | None,
        typer.Option(
            help="With --memory-budget: JSON of component name -> bytes per stored output "
            "(stepcache.memory.output_bytes); default: the calibration's meta output_bytes."
        ),
    ] = None,
    branches: BranchesOpt = 1,
) -> None:
    """Turn a calibration into a schedule: --policy smoothcache (--alpha or --compute-fraction) or
    --policy optimal (--compute-fraction), optionally fitted to --memory-budget."""
    if policy == "optimal" and (alpha is not None or compute_fraction is None):
        fail("--policy optimal takes --compute-fraction (not --alpha).")
    if (alpha is None) == (compute_fraction is None):
        fail("give exactly one of --alpha and --compute-fraction.")
    if policy == "smoothcache":
        refuse_unused(ctx, ("forecast", "budget"), "by --policy smoothcache (for --policy optimal only)")
    if memory_budget is None:
        refuse_unused(ctx, ("sizes", "branches"), "without --memory-budget")
    check_outputs(
        (out, "schedule file (--out)"),
        (smoothcache_out, "SmoothCache file (--smoothcache-out)"),
        inputs=(calibration, sizes),
    )
    try:
        cal = Calibration.load(calibration)
        memory: dict[str, Any] = {}
        if memory_budget is not None:
            memory = {"memory_budget": memory_budget, "sizes": _read_sizes(sizes), "branches": branches}
        if policy == "optimal":
            sched = optimal_schedule(
                cal,
                compute_fraction,  # type: ignore[arg-type]
                granularity=granularity,
                forecast=forecast,
                budget=budget,
                **memory,
            )
        elif alpha is not None:
            sched = from_calibration(cal, alpha, granularity=granularity, **memory)
        else:
            sched = for_compute_fraction(cal, compute_fraction, granularity=granularity, **memory)  # type: ignore[arg-type]
        typer.echo(sched.render())
        if "memory" in sched.meta:
            typer.echo(memory_line(sched.meta["memory"]))
        if out:
            sched.save(out)
            typer.echo(f"wrote {out}")
        if smoothcache_out:
            with relay_warnings():
                sched.to_smoothcache(smoothcache_out)
            typer.echo(f"wrote {smoothcache_out}")
    except StepCacheError as e:
        fail(e)
