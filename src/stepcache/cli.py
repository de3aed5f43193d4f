"""The ``stepcache`` command line: info, calibrate, schedule, demo.

``MODEL`` is ``reference`` (the shipped trained 16x16-digits DiT), ``tiny-dit`` (a built-in
random-weight DiT pipeline), a diffusers model id or local folder (loading a hub id needs hub
access), or ``module:factory`` (a function returning a pipeline or a denoiser module).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import random
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .errors import StepCacheError

if TYPE_CHECKING:
    from .runtime.introspect import MacShares

app = typer.Typer(
    name="stepcache",
    help="Training-free step caching (SmoothCache and beyond) for diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[
    str, typer.Argument(help="reference, tiny-dit, a diffusers model id or folder, or module:factory")
]


def load_target(spec: str, *, scheduler: str = "ddim") -> Any:
    """Resolve a MODEL argument to a pipeline or module."""
    if spec == "reference":
        from .reference import ReferencePipeline

        return ReferencePipeline(scheduler)
    if spec == "tiny-dit":
        from .integrations.diffusers import tiny_dit_pipeline

        return tiny_dit_pipeline(scheduler=scheduler)
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise StepCacheError(
                f"cannot load {spec!r}: {e}. Expected module:factory, e.g. mypkg.models:make_pipe."
            ) from None
        return factory()
    from .integrations.diffusers import load_pipeline

    try:
        return load_pipeline(spec)
    except Exception as e:  # diffusers/hub errors vary; say what was tried
        raise StepCacheError(
            f"cannot load {spec!r} as a diffusers pipeline ({type(e).__name__}: {e}). Use tiny-dit, a local "
            "pipeline folder, a hub id (needs network), or module:factory."
        ) from None


def _inputs_for(
    pipe: Any, samples: int, prompts: list[str], seed: int, guidance: float | None, batch: int = 1
) -> list[dict]:
    """One call's kwargs per calibration sample, from what the pipeline's __call__ accepts."""
    import torch

    params = inspect.signature(pipe.__call__).parameters
    out = []
    rng = random.Random(seed)
    for i in range(samples):
        kw: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed + i)}
        if "class_labels" in params:
            classes = int(getattr(pipe.transformer.config, "num_embeds_ada_norm", 1000) or 1000)
            kw["class_labels"] = [rng.randrange(classes) for _ in range(batch)]
        elif "prompt" in params:
            if not prompts:
                raise StepCacheError("this pipeline takes prompts: pass --prompt (repeatable).")
            kw["prompt"] = [prompts[(i + b) % len(prompts)] for b in range(batch)]
        if guidance is not None and "guidance_scale" in params:
            kw["guidance_scale"] = guidance
        if "output_type" in params:
            kw["output_type"] = "pt"
        out.append(kw)
    return out


def _replay(target: Any, inputs: list[dict], seed: int, steps: int) -> Any:
    """A no-argument callable generating ``inputs`` with fresh generators (the same noise every call)
    and returning the final samples as one tensor: what sensitivity() and tune() replay."""

    def run() -> Any:
        import torch

        outs = []
        for i, kw in enumerate(inputs):
            kw = {**kw, "generator": torch.Generator().manual_seed(seed + i), "num_inference_steps": steps}
            outs.append(target(**kw))
        return torch.cat([torch.as_tensor(getattr(o, "images", o)) for o in outs])

    return run


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


# Options shared by the commands that run a model (calibrate, tune).
StepsOpt = Annotated[int, typer.Option(help="Denoising steps per generation.")]
BatchOpt = Annotated[int, typer.Option(help="Class labels or prompts per generation.")]
SchedulerOpt = Annotated[str, typer.Option(help="reference and tiny-dit: ddim or dpm.")]
PromptOpt = Annotated[list[str] | None, typer.Option(help="Prompt(s) for text-conditioned pipelines.")]
GuidanceOpt = Annotated[float | None, typer.Option(help="Guidance scale passed to the pipeline.")]


@app.command()
def info(
    model: ModelArg,
    types: Annotated[str, typer.Option(help="Comma-separated component types.")] = "attn,cross_attn,ff",
    macs: Annotated[
        bool, typer.Option(help="Measure MAC shares with a 2-step generation (pipelines).")
    ] = True,
) -> None:
    """List the blocks and cacheable components stepcache finds in MODEL, and their share of MACs."""
    from .discovery import denoiser_of, discover

    try:
        target = load_target(model)
        comps = discover(target, types=[t for t in types.split(",") if t])
    except StepCacheError as e:
        _fail(e)
    denoiser = denoiser_of(target)
    params = sum(p.numel() for p in denoiser.parameters())
    covered = sum(p.numel() for c in comps for p in c.module.parameters())
    shares = _mac_shares(target, denoiser, comps) if macs and target is not denoiser else None
    typer.echo(
        f"{type(denoiser).__name__}: {params / 1e6:.2f} M parameters, {covered / params:.0%} of them in cached components"
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
    from .runtime.introspect import mac_shares

    try:
        kwargs = _inputs_for(target, 1, ["a photo"], 0, None)[0]
        shares = mac_shares(denoiser, comps, lambda: target(**kwargs, num_inference_steps=2))
    except Exception as e:  # any pipeline may need inputs we cannot guess: say so, do not fail
        logging.getLogger(__name__).info("MAC shares not measured: %s", e)
        return None
    return shares if shares.total else None


@app.command()
def calibrate(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration JSON to write.")] = Path(
        "calibration.json"
    ),
    steps: StepsOpt = 50,
    samples: Annotated[int, typer.Option(help="Generations to average.")] = 4,
    batch: BatchOpt = 1,
    lookahead: Annotated[int, typer.Option(help="Longest reuse run to measure (k).")] = 3,
    scheduler: SchedulerOpt = "ddim",
    prompt: PromptOpt = None,
    guidance_scale: GuidanceOpt = None,
    seed: int = 0,
    plot: Annotated[Path | None, typer.Option(help="Also write the error curves as PNG.")] = None,
    forecast: Annotated[
        bool, typer.Option(help="Also record first-order forecast errors (used by the optimal policy).")
    ] = True,
    sensitivity: Annotated[
        int,
        typer.Option(
            help="Step groups for sensitivity weights (0 = skip). Costs 1 + groups x layer groups "
            "replays of --sensitivity-samples generations."
        ),
    ] = 0,
    sensitivity_samples: Annotated[int, typer.Option(help="Generations replayed per sensitivity run.")] = 2,
) -> None:
    """Run MODEL uncached and record per-step error curves of every component."""
    from .calibration import calibrate as run_calibration
    from .sensitivity import sensitivity as measure_sensitivity

    try:
        target = load_target(model, scheduler=scheduler)
        inputs = _inputs_for(target, samples, prompt or [], seed, guidance_scale, batch)
        if guidance_scale is None and hasattr(target, "guidance_scale"):
            guidance_scale = target.guidance_scale
        cal = run_calibration(
            target,
            inputs=inputs,
            num_inference_steps=steps,
            lookahead=lookahead,
            forecast=forecast,
            meta={"guidance_scale": guidance_scale},
        )
        if sensitivity:
            run = _replay(target, inputs[: max(1, sensitivity_samples)], seed, steps)
            cal = measure_sensitivity(target, cal, run, step_groups=sensitivity)
    except StepCacheError as e:
        _fail(e)
    cal.save(out)
    typer.echo(cal.summary())
    typer.echo(f"wrote {out}")
    if plot:
        cal.plot(plot)
        typer.echo(f"wrote {plot}")


@app.command()
def schedule(
    calibration: Annotated[Path, typer.Argument(help="Calibration JSON from `stepcache calibrate`.")],
    alpha: Annotated[float | None, typer.Option(help="SmoothCache error threshold.")] = None,
    compute_fraction: Annotated[
        float | None, typer.Option(help="Target share of component calls to execute.")
    ] = None,
    granularity: Annotated[
        str | None, typer.Option(help="type (one plan per component type) or layer.")
    ] = None,
    policy: Annotated[
        str,
        typer.Option(
            help="smoothcache (greedy rule, by --alpha or --compute-fraction) or optimal (exact DP for "
            "--compute-fraction, calibrated forecasting and sensitivity weights when recorded)."
        ),
    ] = "smoothcache",
    forecast: Annotated[
        bool | None, typer.Option(help="optimal: allow first-order forecasts (default: if calibrated).")
    ] = None,
    budget: Annotated[str, typer.Option(help="optimal: count the budget in calls or macs.")] = "calls",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Schedule JSON to write.")] = None,
    smoothcache_out: Annotated[
        Path | None, typer.Option(help="Also write the original package's format.")
    ] = None,
) -> None:
    """Turn a calibration into a schedule: --policy smoothcache (--alpha or --compute-fraction) or
    --policy optimal (--compute-fraction)."""
    from .calibration import Calibration
    from .schedule import Schedule

    if policy not in ("smoothcache", "optimal"):
        _fail(StepCacheError(f"--policy must be smoothcache or optimal, got {policy!r}."))
    if policy == "optimal" and (alpha is not None or compute_fraction is None):
        _fail(StepCacheError("--policy optimal takes --compute-fraction (not --alpha)."))
    if (alpha is None) == (compute_fraction is None):
        _fail(StepCacheError("give exactly one of --alpha and --compute-fraction."))
    try:
        cal = Calibration.load(calibration)
        if policy == "optimal":
            sched = Schedule.optimal(
                cal,
                compute_fraction,  # type: ignore[arg-type]
                granularity=granularity or "type",
                forecast=forecast,
                budget=budget,
            )
        elif alpha is not None:
            sched = Schedule.from_calibration(cal, alpha, granularity=granularity or "type")
        else:
            sched = Schedule.for_compute_fraction(cal, compute_fraction, granularity=granularity or "type")  # type: ignore[arg-type]
        if smoothcache_out:
            sched.to_smoothcache(smoothcache_out)
    except StepCacheError as e:
        _fail(e)
    typer.echo(sched.render())
    if out:
        sched.save(out)
        typer.echo(f"wrote {out}")


@app.command()
def tune(
    model: ModelArg,
    compute_fraction: Annotated[float, typer.Option(help="Share of component calls to execute.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Schedule JSON to write.")] = Path("schedule.json"),
    calibration: Annotated[
        Path | None, typer.Option(help="Calibration JSON: adds the optimal policy to the candidates.")
    ] = None,
    steps: StepsOpt = 50,
    samples: Annotated[int, typer.Option(help="Generations replayed per candidate.")] = 2,
    batch: BatchOpt = 10,
    scheduler: SchedulerOpt = "ddim",
    prompt: PromptOpt = None,
    guidance_scale: GuidanceOpt = None,
    seed: int = 1000,
) -> None:
    """Closed-loop: try candidate schedules on a few generations, keep the one closest to uncached."""
    from .calibration import Calibration
    from .policies.tuned import tune as run_tune

    try:
        target = load_target(model, scheduler=scheduler)
        inputs = _inputs_for(target, samples, prompt or [], seed, guidance_scale, batch)
        cal = Calibration.load(calibration) if calibration else None
        sched = run_tune(
            target, _replay(target, inputs, seed, steps), compute_fraction, num_steps=steps, calibration=cal
        )
    except StepCacheError as e:
        _fail(e)
    typer.echo(sched.render())
    typer.echo(f"chosen: {sched.meta['candidate']} ({sched.meta['tuning']['runs']} replays)")
    sched.save(out)
    typer.echo(f"wrote {out}")


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for grid.png, curves.png, report.json.")
    ] = Path("stepcache-demo"),
    scheduler: Annotated[str, typer.Option(help="ddim or dpm (DPM-Solver++ 2M).")] = "ddim",
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    per_class: Annotated[int, typer.Option(help="Samples per class.")] = 20,
    classes: Annotated[str, typer.Option(help="Comma-separated digits.")] = "0,1,2,3,4,5,6,7,8,9",
    alpha: Annotated[
        float | None, typer.Option(help="SmoothCache threshold of the first cached variant.")
    ] = None,
    compute_fraction: Annotated[
        float, typer.Option(help="Compute budget of the second cached variant.")
    ] = 0.5,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Classifier-free guidance (default: the model card's).")
    ] = None,
    seed: int = 0,
    calibration_samples: Annotated[
        int, typer.Option(help="Generations to calibrate when nothing is shipped.")
    ] = 8,
) -> None:
    """Uncached vs SmoothCache on the shipped reference model: images, curves, metrics. Offline."""
    from .demo import DEFAULT_ALPHA, DemoConfig, format_report, run_demo

    try:
        picked = [int(c) for c in classes.split(",") if c.strip()]
    except ValueError:
        _fail(StepCacheError(f"--classes must be comma-separated digits, got {classes!r}."))
    if not picked or any(not 0 <= c <= 9 for c in picked):
        _fail(StepCacheError(f"--classes must name digits 0..9, got {classes!r}."))
    cfg = DemoConfig(
        out=out,
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
        _fail(e)
    typer.echo(format_report(report))
    typer.echo(f"wrote {out / 'grid.png'}, {out / 'curves.png'}, {out / 'report.json'}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
