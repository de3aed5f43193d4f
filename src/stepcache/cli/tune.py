"""``stepcache tune MODEL``: closed loop, try candidate schedules on a few generations and keep the one
closest to uncached."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..calibration import Calibration
from ..errors import StepCacheError
from ..memory import output_bytes
from ..policies import check_fraction, fit_forecasts
from ..policies.fitted import PER
from ..policies.tuned import DEFAULT_MAX_REPLAYS, objective_function
from ..policies.tuned import tune as run_tune
from . import _targets
from ._common import MemoryBudgetOpt, check_outputs, checked, choice, fail, memory_line
from ._targets import (
    BatchOpt,
    GuidanceOpt,
    ModelArg,
    PromptOpt,
    ReferenceModelOpt,
    SchedulerOpt,
    SeedOpt,
)


def _tune_validation(value: float | None) -> float | int | None:
    """--validation as tune takes it: a share below 1, a whole count from 1 up (None: the default)."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or (value >= 1 and value != int(value)):
        raise StepCacheError(f"must be a share in [0, 1) or a whole number of samples, got {value:g}.")
    return int(value) if value >= 1 else value


def tune(
    ctx: typer.Context,
    model: ModelArg,
    compute_fraction: Annotated[
        float,
        typer.Option(help="Share of component calls to execute.", callback=checked(check_fraction)),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Schedule JSON to write.")] = Path("schedule.json"),
    calibration: Annotated[
        Path | None, typer.Option(help="Calibration JSON: adds the optimal policy to the candidates.")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=3, max=10_000, help="Denoising steps per generation (default: the calibration's, or 50)."
        ),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, max=100_000, help="Generations replayed per candidate.")] = 2,
    batch: BatchOpt = 10,
    scheduler: SchedulerOpt = None,
    reference_model: ReferenceModelOpt = None,
    prompt: PromptOpt = None,
    guidance_scale: GuidanceOpt = None,
    seed: SeedOpt = 1000,
    memory_budget: MemoryBudgetOpt = None,
    objective: Annotated[
        str,
        typer.Option(
            help="How per-sample errors make one score: worst-25% (default: the worst quarter of the samples), "
            "mean, worst, worst-K, worst-P%, quantile-Q (e.g. quantile-0.1: the 10th percentile PSNR) or mse.",
            callback=checked(objective_function),
        ),
    ] = "worst-25%",
    validation: Annotated[
        float | None,
        typer.Option(
            help="Samples held out to choose among the top candidates and accept refinement: a share in "
            "[0, 1) or a count (default: half; 0: none).",
            callback=checked(_tune_validation),
        ),
    ] = None,
    top_k: Annotated[
        int,
        typer.Option(
            min=1, max=1000, help="Best candidates on the fit samples that validation chooses among."
        ),
    ] = 3,
    family: Annotated[
        str,
        typer.Option(
            help="Candidate family: full (with TaylorSeer placements and forced last steps) or classic.",
            callback=checked(choice("full", "classic")),
        ),
    ] = "full",
    refine: Annotated[int, typer.Option(min=0, max=100, help="Rounds of local search (0: none).")] = 1,
    max_replays: Annotated[
        int,
        typer.Option(
            min=0,
            max=100_000,
            help=f"Most replays of the --samples generations, the uncached one included (>= 3; "
            f"0: no budget, the whole family and every refinement move: 40-150). [default: {DEFAULT_MAX_REPLAYS}]",
            show_default=False,
        ),
    ] = DEFAULT_MAX_REPLAYS,
    fit: Annotated[
        int,
        typer.Option(
            min=0,
            max=1000,
            help="After tuning, choose the forecast gains on the final samples: this many replays with "
            "gradients (about 3 generations each; 0: none). MODEL=reference only (docs/policies.md).",
        ),
    ] = 0,
    fit_per: Annotated[
        str,
        typer.Option(
            help="With --fit: a pair of gains per step for each component, or per step shared by all.",
            callback=checked(choice(*PER)),
        ),
    ] = "component",
) -> None:
    """Closed-loop: try candidate schedules on a few generations, keep the one closest to uncached
    (by --objective over the samples, chosen among the top candidates on held-out samples)."""
    scheduler = _targets.scheduler_for(model, scheduler, reference_model)
    if 0 < max_replays < 3:
        fail(f"--max-replays {max_replays} leaves no replay to compare: give 3 or more (0: no budget).")
    check_outputs((out, "schedule file (--out)"), inputs=(calibration,))
    try:
        cal = Calibration.load(calibration) if calibration else None
        if cal is not None and steps is not None and steps != cal.num_steps:
            fail(f"--steps {steps} differs from the calibration's {cal.num_steps} steps: leave --steps out.")
        steps = cal.num_steps if cal is not None else steps or 50
        target = _targets.load_target(model, scheduler=scheduler, reference_model=reference_model or "ddpm")
        inputs = _targets.inputs_for(target, samples, prompt or [], seed, guidance_scale, batch)
        replay = _targets.replay(target, inputs, seed, steps)
        memory: dict[str, Any] = {}
        if memory_budget is not None:
            if cal is None:
                fail("--memory-budget needs --calibration: its errors decide what the budget gives up.")
            # The sizes of this run's outputs, measured on a 2-step replay of the same inputs.
            memory = {
                "memory_budget": memory_budget,
                "sizes": output_bytes(target, _targets.replay(target, inputs[:1], seed, 2)),
            }
        sched = run_tune(
            target,
            replay,
            compute_fraction,
            num_steps=steps,
            calibration=cal,
            objective=objective,
            validation=_tune_validation(validation),
            top_k=top_k,
            family=family,
            refine=refine,
            max_replays=max_replays or None,
            **memory,
        )
        if fit:
            from ..reference import ReferencePipeline

            if not isinstance(target, ReferencePipeline):
                fail(
                    f"--fit differentiates the replays through the sampler, which this CLI does for "
                    f"MODEL=reference only; for {model} use stepcache.fit_forecasts with a run that builds "
                    "the graph (docs/policies.md)."
                )
            grads = _targets.replay(target, inputs, seed, steps, differentiable=True)
            sched = fit_forecasts(target, grads, sched, iterations=fit, per=fit_per)
        typer.echo(sched.render())
        if "forecast_fit" in sched.meta:
            f = sched.meta["forecast_fit"]
            typer.echo(
                f"forecast gains fitted ({f['forecast']}, per {f['per']}): {f['scores'][0]} -> {min(f['scores'])} dB mean "
                f"error on the samples, about {f['generations']} generations"
            )
        if "memory" in sched.meta:
            typer.echo(memory_line(sched.meta["memory"]))
        info = sched.meta.get("tuning", {})
        score = info.get("scores", {}).get(sched.meta.get("candidate"), {})
        typer.echo(
            f"chosen: {sched.meta['candidate']} ({info.get('runs', 0)} replays; {objective}: fit "
            f"{score.get('fit')} dB, validation {score.get('validation')} dB on "
            f"{info.get('fit_samples', 0)} + {info.get('validation_samples', 0)} samples)"
        )
        sched.save(out)
        typer.echo(f"wrote {out}")
    except StepCacheError as e:
        fail(e)
