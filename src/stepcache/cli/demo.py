"""``stepcache demo``: uncached vs SmoothCache on the shipped reference model (images, curves, metrics),
offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .._io import check_output
from ..demo import DEFAULT_ALPHA, DemoConfig, format_report, run_demo
from ..errors import StepCacheError
from ..policies import check_alpha, check_fraction
from ..reference import DEFAULT_GUIDANCE_SCALE, shipped_calibration
from . import _targets
from ._common import check_finite, checked, choice, fail, given
from ._targets import REFERENCE_MODELS, SeedOpt, check_scheduler


def demo(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for grid.png, curves.png, report.json.")
    ] = Path("stepcache-demo"),
    reference_model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Reference model: ddpm (dit_digits) or flow (dit_digits_flow, flow matching).",
            callback=checked(choice(*REFERENCE_MODELS)),
        ),
    ] = "ddpm",
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="ddpm: ddim (default) or dpm (DPM-Solver++ 2M); flow: flow-euler (default).",
            callback=checked(check_scheduler),
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=2, max=10_000, help="Denoising steps.")] = 50,
    per_class: Annotated[int, typer.Option(min=1, max=10_000, help="Samples per class.")] = 20,
    classes: Annotated[str, typer.Option(help="Comma-separated digits.")] = "0,1,2,3,4,5,6,7,8,9",
    alpha: Annotated[
        float | None,
        typer.Option(
            help="SmoothCache threshold of the first cached variant.", callback=checked(check_alpha)
        ),
    ] = None,
    compute_fraction: Annotated[
        float,
        typer.Option(help="Compute budget of the second cached variant.", callback=checked(check_fraction)),
    ] = 0.5,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance (default: the model card's).", callback=checked(check_finite)
        ),
    ] = None,
    seed: SeedOpt = 0,
    calibration_samples: Annotated[
        int, typer.Option(min=1, max=10_000, help="Generations to calibrate when nothing is shipped.")
    ] = 8,
) -> None:
    """Uncached vs SmoothCache on the shipped reference model: images, curves, metrics. Offline."""
    scheduler = _targets.reference_scheduler(reference_model, scheduler)
    try:
        picked = [int(c) for c in classes.split(",") if c.strip()]
    except ValueError:
        fail(f"--classes must be comma-separated digits, got {classes!r}.")
    if not picked or any(not 0 <= c <= 9 for c in picked) or len(set(picked)) != len(picked):
        fail(f"--classes must name distinct digits 0..9, got {classes!r}.")
    try:
        check_output(out, "demo output folder (--out)", folder=True)
        if given(ctx, "calibration_samples"):
            shipped = shipped_calibration(scheduler, steps)
            guidance = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
            if shipped is not None and shipped.meta.get("guidance_scale") == guidance:
                fail(
                    f"--calibration-samples is unused: a calibration for {scheduler} {steps} steps ships "
                    "with stepcache and is used. Leave it out."
                )
    except StepCacheError as e:
        fail(e)
    cfg = DemoConfig(
        out=out,
        model=reference_model,
        scheduler=scheduler,
        steps=steps,
        per_class=per_class,
        classes=picked,
        alpha=DEFAULT_ALPHA if alpha is None else alpha,
        compute_fraction=compute_fraction,
        guidance_scale=guidance_scale,
        seed=seed,
        calibration_samples=calibration_samples,
    )
    try:
        report = run_demo(cfg)
    except (StepCacheError, RuntimeError) as e:
        fail(e)
    typer.echo(format_report(report))
    typer.echo(f"wrote {out / 'grid.png'}, {out / 'curves.png'}, {out / 'report.json'}")
