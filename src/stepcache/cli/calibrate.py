"""``stepcache calibrate MODEL``: run a model uncached and record per-step error curves of every
component (under torchrun, the processes share the samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..calibration import DEFAULT_LOOKAHEAD
from ..calibration import calibrate as run_calibration
from ..calibration import response as measure_response
from ..calibration import sensitivity as measure_sensitivity
from ..distributed import is_main, launched
from ..errors import StepCacheError
from ..plots import plot_format
from . import _targets
from ._common import check_outputs, fail, refuse_unused, relay_warnings
from ._targets import (
    BatchOpt,
    GuidanceOpt,
    ModelArg,
    PromptOpt,
    ReferenceModelOpt,
    SchedulerOpt,
    SeedOpt,
    StepsOpt,
)


def calibrate(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration JSON to write.")] = Path(
        "calibration.json"
    ),
    steps: StepsOpt = 50,
    samples: Annotated[int, typer.Option(min=1, max=100_000, help="Generations to average.")] = 4,
    batch: BatchOpt = 1,
    lookahead: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help=f"Longest reuse run to measure (k), below --steps [default: {DEFAULT_LOOKAHEAD}, or --steps - 1].",
            show_default=False,
        ),
    ] = None,
    scheduler: SchedulerOpt = None,
    reference_model: ReferenceModelOpt = None,
    prompt: PromptOpt = None,
    guidance_scale: GuidanceOpt = None,
    seed: SeedOpt = 0,
    plot: Annotated[Path | None, typer.Option(help="Also write the error curves as PNG.")] = None,
    forecast: Annotated[
        bool, typer.Option(help="Also record first-order forecast errors (used by the optimal policy).")
    ] = True,
    sensitivity: Annotated[
        int,
        typer.Option(
            min=0,
            help="Step groups for sensitivity weights (0 = skip), at most --steps. Costs 1 + groups x "
            "layer groups replays of --sensitivity-samples generations.",
        ),
    ] = 0,
    sensitivity_samples: Annotated[
        int, typer.Option(min=1, help="Generations replayed per sensitivity run (at most --samples).")
    ] = 2,
    response: Annotated[
        bool,
        typer.Option(
            help="Also record the output response (stepcache.response: one differentiable generation of "
            "the first --batch samples and 2 backward passes), which the open loop and tune rank "
            "placements by. Reference model only.",
        ),
    ] = False,
) -> None:
    """Run MODEL uncached and record per-step error curves of every component.

    Under ``torchrun --nproc_per_node N`` the N processes share the samples and every one gets the
    calibration of all of them; rank 0 alone writes the files and reports."""
    scheduler = _targets.scheduler_for(model, scheduler, reference_model)
    if lookahead is None:
        lookahead = min(DEFAULT_LOOKAHEAD, steps - 1)
    if lookahead >= steps:
        fail(f"--lookahead {lookahead} must be below --steps {steps}: a reuse run fits in one generation.")
    if sensitivity > steps:
        fail(f"--sensitivity {sensitivity} must be at most --steps {steps} (it groups steps).")
    if not sensitivity:
        refuse_unused(ctx, ("sensitivity_samples",), "without --sensitivity N (N > 0)")
    elif sensitivity_samples > samples:
        fail(f"--sensitivity-samples {sensitivity_samples} exceeds --samples {samples}: it replays those.")
    if response and model != "reference":
        fail(
            "--response differentiates through the sampler: the reference model's pipeline does; for other "
            "models call stepcache.response(pipe, calibration, run) with a run that builds the graph."
        )
    check_outputs((out, "calibration file (--out)"), (plot, "plot (--plot)"))
    if plot is not None:
        try:
            plot_format(plot)
        except StepCacheError as e:
            fail(e)
    try:
        with launched():
            target = _targets.load_target(
                model, scheduler=scheduler, reference_model=reference_model or "ddpm"
            )
            inputs = _targets.inputs_for(target, samples, prompt or [], seed, guidance_scale, batch)
            if guidance_scale is None and hasattr(target, "guidance_scale"):
                guidance_scale = target.guidance_scale
            # Under torchrun every rank calibrates its share of the samples; all get the union.
            cal = run_calibration(
                target,
                inputs=inputs,
                num_inference_steps=steps,
                lookahead=lookahead,
                forecast=forecast,
                meta={"guidance_scale": guidance_scale},
            )
        if not is_main():
            return  # rank 0 replays sensitivity, writes the files and reports
        if sensitivity:
            run = _targets.replay(target, inputs[:sensitivity_samples], seed, steps)
            cal = measure_sensitivity(target, cal, run, step_groups=sensitivity)
        if response:
            cal = measure_response(
                target, cal, _targets.replay(target, inputs[:1], seed, steps, differentiable=True)
            )
        with relay_warnings():
            cal.save(out)
        typer.echo(cal.summary())
        typer.echo(f"wrote {out}")
        if plot:
            cal.plot(plot)
            typer.echo(f"wrote {plot}")
    except StepCacheError as e:
        fail(e)
