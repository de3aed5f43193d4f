"""The ``stepcache`` command line: info, calibrate, schedule (and, later, demo and bench).

``MODEL`` is ``tiny-dit`` (a built-in random-weight DiT pipeline, no download), a diffusers model
id or local folder (loading a hub id needs hub access), or ``module:factory`` (a function returning
a pipeline or a denoiser module).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import StepCacheError

app = typer.Typer(
    name="stepcache",
    help="Training-free step caching (SmoothCache and beyond) for diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[str, typer.Argument(help="tiny-dit, a diffusers model id or folder, or module:factory")]


def load_target(spec: str, *, scheduler: str = "ddim") -> Any:
    """Resolve a MODEL argument to a pipeline or module."""
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


def _inputs_for(pipe: Any, samples: int, prompts: list[str], seed: int, guidance: float | None) -> list[dict]:
    """One call's kwargs per calibration sample, from what the pipeline's __call__ accepts."""
    import torch

    params = inspect.signature(pipe.__call__).parameters
    out = []
    rng = random.Random(seed)
    for i in range(samples):
        kw: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed + i)}
        if "class_labels" in params:
            classes = int(getattr(pipe.transformer.config, "num_embeds_ada_norm", 1000) or 1000)
            kw["class_labels"] = [rng.randrange(classes)]
        elif "prompt" in params:
            if not prompts:
                raise StepCacheError("this pipeline takes prompts: pass --prompt (repeatable).")
            kw["prompt"] = prompts[i % len(prompts)]
        if guidance is not None and "guidance_scale" in params:
            kw["guidance_scale"] = guidance
        if "output_type" in params:
            kw["output_type"] = "latent" if "latent" in str(params.get("output_type")) else "pt"
        out.append(kw)
    return out


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


@app.command()
def info(
    model: ModelArg,
    types: Annotated[str, typer.Option(help="Comma-separated component types.")] = "attn,cross_attn,ff",
) -> None:
    """List the blocks and cacheable components stepcache finds in MODEL."""
    from .discovery import denoiser_of, discover

    try:
        target = load_target(model)
        comps = discover(target, types=[t for t in types.split(",") if t])
    except StepCacheError as e:
        _fail(e)
    denoiser = denoiser_of(target)
    params = sum(p.numel() for p in denoiser.parameters())
    covered = sum(p.numel() for c in comps for p in c.module.parameters())
    typer.echo(
        f"{type(denoiser).__name__}: {params / 1e6:.2f} M parameters, {covered / params:.0%} inside cached components"
    )
    stacks = Counter(c.stack for c in comps)
    for stack in stacks:
        blocks = sorted({c.index for c in comps if c.stack == stack})
        kinds = Counter(c.type for c in comps if c.stack == stack)
        example = next(c for c in comps if c.stack == stack)
        children = ", ".join(f"{c.child}={c.type}" for c in comps if c.block == example.block)
        typer.echo(
            f"  {stack}: {len(blocks)} blocks of {type(denoiser.get_submodule(example.block)).__name__}; "
            f"components per block: {children}; total {dict(kinds)}"
        )


@app.command()
def calibrate(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration JSON to write.")] = Path(
        "calibration.json"
    ),
    steps: Annotated[int, typer.Option(help="Denoising steps per generation.")] = 50,
    samples: Annotated[int, typer.Option(help="Generations to average.")] = 4,
    lookahead: Annotated[int, typer.Option(help="Longest reuse run to measure (k).")] = 3,
    scheduler: Annotated[str, typer.Option(help="tiny-dit only: ddim or dpm.")] = "ddim",
    prompt: Annotated[
        list[str] | None, typer.Option(help="Prompt(s) for text-conditioned pipelines.")
    ] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Guidance scale passed to the pipeline.")
    ] = None,
    seed: int = 0,
    plot: Annotated[Path | None, typer.Option(help="Also write the error curves as PNG.")] = None,
) -> None:
    """Run MODEL uncached and record per-step error curves of every component."""
    from .calibration import calibrate as run_calibration

    try:
        target = load_target(model, scheduler=scheduler)
        inputs = _inputs_for(target, samples, prompt or [], seed, guidance_scale)
        cal = run_calibration(target, inputs=inputs, num_inference_steps=steps, lookahead=lookahead)
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
    granularity: Annotated[str, typer.Option(help="type (one plan per component type) or layer.")] = "type",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Schedule JSON to write.")] = None,
    smoothcache_out: Annotated[
        Path | None, typer.Option(help="Also write the original package's format.")
    ] = None,
) -> None:
    """Turn a calibration into a schedule, by --alpha or by --compute-fraction."""
    from .calibration import Calibration
    from .schedule import Schedule

    if (alpha is None) == (compute_fraction is None):
        _fail(StepCacheError("give exactly one of --alpha and --compute-fraction."))
    try:
        cal = Calibration.load(calibration)
        if alpha is not None:
            sched = Schedule.from_calibration(cal, alpha, granularity=granularity)
        else:
            sched = Schedule.for_compute_fraction(cal, compute_fraction, granularity=granularity)  # type: ignore[arg-type]
        if smoothcache_out:
            sched.to_smoothcache(smoothcache_out)
    except StepCacheError as e:
        _fail(e)
    typer.echo(sched.render())
    if out:
        sched.save(out)
        typer.echo(f"wrote {out}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
