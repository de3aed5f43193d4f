"""The ``stepcache`` command line: info, calibrate, schedule, tune, plan-memory, demo, bench.

``MODEL`` is ``reference`` (the shipped trained 16x16-digits DiTs: ``--model ddpm``, the default, or
``--model flow``, the flow-matching one), ``tiny-dit`` (a built-in
random-weight DiT pipeline), a diffusers model id or local folder (loading a hub id needs hub
access), or ``module:factory`` (a function returning a pipeline or a denoiser module).

Bad input never ends in a traceback: every option is checked (and output paths are checked)
before any work starts, and every error is one line on stderr with exit code 2 saying what is wrong
and what to do. Options a command would ignore in the mode asked for are refused, not dropped.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import random
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from .._io import check_output
from ..errors import StepCacheError

if TYPE_CHECKING:
    from ..runtime.introspect import MacShares

# The schedulers the built-in models (reference, tiny-dit) and the demo take. flow-euler fits only the
# flow reference model (--model flow), ddim and dpm only the others: a mismatch is a one-line error.
SCHEDULERS = ("ddim", "dpm", "flow-euler")
# The shipped reference models (MODEL=reference, --model).
REFERENCE_MODELS = ("ddpm", "flow")
_MAX_SEED = 2**62
_verbose = False

# typer >= 0.2x vendors click (typer._click); older typer uses click itself. Take whichever it raises.
_click_errors = sys.modules[typer.BadParameter.__module__]
_ClickException: type[Exception] = _click_errors.ClickException
_NoArgsIsHelp: type[Exception] | None = getattr(_click_errors, "NoArgsIsHelpError", None)
_ParameterSource = importlib.import_module(
    _click_errors.__name__.rpartition(".")[0] + ".core"
).ParameterSource


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad value, an unknown option, a missing argument) on one line with a pointer
    to ``--help``, instead of click's usage block; anything unexpected on one line with exit code 1
    (``--verbose`` shows the traceback)."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _ClickException as e:
            if _NoArgsIsHelp is not None and isinstance(e, _NoArgsIsHelp):
                e.show()  # type: ignore[attr-defined]
                sys.exit(2)
            ctx = getattr(e, "ctx", None)
            hint = f" See '{ctx.command_path} --help'." if ctx is not None else ""
            message = _one_line(e.format_message())  # type: ignore[attr-defined]
            typer.secho(
                f"error: {message}{'' if message.endswith('.') else '.'}{hint}",
                fg=typer.colors.RED,
                err=True,
            )
            sys.exit(getattr(e, "exit_code", 2))
        except typer.Abort:
            typer.secho("aborted.", fg=typer.colors.RED, err=True)
            sys.exit(1)
        except Exception as e:
            if _verbose:
                raise
            typer.secho(
                f"error: unexpected {type(e).__name__}: {_one_line(str(e))} (this is a bug of stepcache or "
                "of the model; rerun with --verbose for the traceback and report it).",
                fg=typer.colors.RED,
                err=True,
            )
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="stepcache",
    cls=_OneLineErrors,
    help="Training-free step caching (SmoothCache and beyond) for diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[
    str, typer.Argument(help="reference, tiny-dit, a diffusers model id or folder, or module:factory")
]


def load_target(spec: str, *, scheduler: str | None = None, reference_model: str = "ddpm") -> Any:
    """Resolve a MODEL argument to a pipeline or module (``reference_model``: which reference DiT)."""
    if spec == "reference":
        from ..reference import ReferencePipeline

        return ReferencePipeline(scheduler, model=reference_model)
    if spec == "tiny-dit":
        from ..integrations.diffusers import tiny_dit_pipeline

        return tiny_dit_pipeline(scheduler=scheduler or "ddim")
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        hint = "Expected module:factory, e.g. mypkg.models:make_pipe."
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except Exception as e:  # ImportError, AttributeError, an empty name, or the module's own error
            raise StepCacheError(f"cannot load {spec!r}: {type(e).__name__}: {e}. {hint}") from None
        if not callable(factory):
            raise StepCacheError(
                f"cannot load {spec!r}: {attr} is a {type(factory).__name__}, not a function. {hint}"
            )
        try:
            return factory()
        except Exception as e:  # the user's code: say where it failed
            raise StepCacheError(f"{spec}() raised {type(e).__name__}: {e}") from None
    from ..integrations.diffusers import load_pipeline

    try:
        return load_pipeline(spec)
    except Exception as e:  # diffusers/hub errors vary; say what was tried
        raise StepCacheError(
            f"cannot load {spec!r} as a diffusers pipeline ({type(e).__name__}: {e}). Use tiny-dit, a local "
            "pipeline folder, a hub id (needs network), or module:factory."
        ) from None


def _inputs_for(
    pipe: Any,
    samples: int,
    prompts: list[str],
    seed: int,
    guidance: float | None,
    batch: int = 1,
    *,
    strict: bool = True,
) -> list[dict]:
    """One call's kwargs per calibration sample, from what the pipeline's __call__ accepts.

    ``strict``: refuse prompts the pipeline would not take (the user gave them)."""
    import torch

    if not callable(pipe) or isinstance(pipe, torch.nn.Module):
        raise StepCacheError(
            "this command runs a pipeline (a callable taking class_labels= or prompt=), but MODEL gave a "
            f"{type(pipe).__name__}: make module:factory return a pipeline."
        )
    try:
        params = inspect.signature(pipe).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if prompts and "prompt" not in params and strict:
        raise StepCacheError("--prompt is for text-conditioned pipelines; this one takes no prompt.")
    if guidance is not None and "guidance_scale" not in params:
        raise StepCacheError("--guidance-scale is unused: this pipeline takes no guidance_scale.")
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    classes = getattr(config, "num_embeds_ada_norm", 1000) if config is not None else 1000
    classes = classes if isinstance(classes, int) and classes > 0 else 1000
    out = []
    rng = random.Random(seed)
    for i in range(samples):
        kw: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed + i)}
        if "class_labels" in params:
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


def _fail(e: Exception | str) -> NoReturn:
    """One line on stderr, exit code 2: what is wrong and what to do."""
    typer.secho(f"error: {_one_line(str(e))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextmanager
def _relay_warnings() -> Iterator[None]:
    """Warnings of stepcache (a lossy export, say) as one ``warning:`` line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        typer.secho(f"warning: {_one_line(str(w.message))}", fg=typer.colors.YELLOW, err=True)


def _given(ctx: typer.Context, *names: str) -> list[str]:
    """The options among ``names`` set on the command line (rather than left at their default)."""
    return [
        "--" + name.replace("_", "-")
        for name in names
        if ctx.get_parameter_source(name) not in (None, _ParameterSource.DEFAULT)
    ]


def _refuse_unused(ctx: typer.Context, names: tuple[str, ...], why: str) -> None:
    given = _given(ctx, *names)
    if given:
        _fail(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} unused {why}: leave {'it' if len(given) == 1 else 'them'} out."
        )


def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A typer callback from one of stepcache's argument checks (None passes: option not given)."""

    def callback(value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except StepCacheError as e:
                raise typer.BadParameter(str(e)) from None
        return value

    return callback


def _choice(*names: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if v not in names]
        if bad:
            raise StepCacheError(f"must be one of {', '.join(names)}, got {bad[0]!r}.")

    return check


def _check_finite(value: float) -> None:
    if not math.isfinite(value):
        raise StepCacheError(f"must be a finite number, got {value}.")


def _check_scheduler(value: str) -> None:
    if value not in SCHEDULERS:
        raise StepCacheError(f"must be one of {', '.join(SCHEDULERS)}, got {value!r}.")


def _check_fraction(value: float) -> None:
    from ..policies._plan import check_fraction

    check_fraction(value)


def _check_alpha(value: float) -> None:
    from ..policies._plan import check_alpha

    check_alpha(value)


def _scheduler_for(model: str, scheduler: str | None, reference_model: str | None = None) -> str:
    """The scheduler of a built-in model; refused for other models, which bring their own, and refused
    when it does not fit the model (flow-euler only for the flow reference model)."""
    if reference_model is not None and model != "reference":
        _fail(f"--model applies to MODEL=reference (ddpm or flow); {model} is its own model.")
    if model not in ("reference", "tiny-dit") and scheduler is not None:
        _fail(f"--scheduler applies to the built-in models (reference, tiny-dit); {model} brings its own.")
    if model == "reference":
        return _reference_scheduler(reference_model or "ddpm", scheduler)
    if model == "tiny-dit" and scheduler == "flow-euler":
        _fail(
            "--scheduler flow-euler fits only the flow reference model (reference --model flow); "
            "tiny-dit takes ddim or dpm."
        )
    return scheduler or "ddim"


def _reference_scheduler(reference_model: str, scheduler: str | None) -> str:
    """The reference model's scheduler: its default when not given, a one-line error when it does not fit."""
    from ..reference._model import check_scheduler_fits, default_scheduler

    if scheduler is None:
        return default_scheduler(reference_model)
    try:
        return check_scheduler_fits(reference_model, scheduler)
    except StepCacheError as e:
        _fail(f"--scheduler {scheduler} does not fit --model {reference_model}: {str(e).split('; ')[-1]}.")


def _outputs(*paths: tuple[Path | None, str], inputs: tuple[Path | None, ...] = ()) -> None:
    """Check every output path before any work: writable, and no two the same (nor an input)."""
    seen: dict[Path, str] = {}
    for path, what in paths:
        if path is None:
            continue
        try:
            check_output(path, what)
        except StepCacheError as e:
            _fail(e)
        key = path.expanduser().resolve()
        if key in seen:
            _fail(f"{what} and {seen[key]} are the same file {path}: give them different names.")
        if any(i is not None and key == i.expanduser().resolve() for i in inputs):
            _fail(f"{what} {path} is also an input of this command: write to another file.")
        seen[key] = what


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at INFO level; show tracebacks of unexpected errors.")
    ] = False,
) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


# Options shared by the commands that run a model (calibrate, tune).
StepsOpt = Annotated[int, typer.Option(min=2, max=10_000, help="Denoising steps per generation.")]
BatchOpt = Annotated[int, typer.Option(min=1, max=100_000, help="Class labels or prompts per generation.")]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        help="reference and tiny-dit: ddim (default) or dpm; reference --model flow: flow-euler (its default).",
        callback=_checked(_check_scheduler),
    ),
]
ReferenceModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="MODEL=reference only: ddpm (default; dit_digits) or flow (dit_digits_flow, flow matching).",
        callback=_checked(_choice(*REFERENCE_MODELS)),
    ),
]
PromptOpt = Annotated[list[str] | None, typer.Option(help="Prompt(s) for text-conditioned pipelines.")]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(help="Guidance scale passed to the pipeline.", callback=_checked(_check_finite)),
]
SeedOpt = Annotated[int, typer.Option(min=0, max=_MAX_SEED, help="Seed of the first generation.")]


def _check_budget(value: str) -> None:
    from ..memory import parse_bytes

    try:
        parse_bytes(value, what="--memory-budget")
    except StepCacheError as e:
        raise typer.BadParameter(str(e)) from None


MemoryBudgetOpt = Annotated[
    str | None,
    typer.Option(
        help="Bytes the stored outputs may hold at once, e.g. 16GB or 512MiB: the schedule is fitted to it "
        "(it may compute more when the budget is tight; the output says).",
        callback=_checked(_check_budget),
    ),
]
BranchesOpt = Annotated[
    int, typer.Option(min=1, max=16, help="With --memory-budget: stores per component, 2 for split guidance.")
]


def _read_sizes(path: Path | None) -> dict[str, int] | None:
    """Component name -> bytes from a JSON file (None: none given)."""
    if path is None:
        return None
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StepCacheError(f"--sizes {path}: not a readable JSON file ({_one_line(str(e))}).") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()
    ):
        raise StepCacheError(f"--sizes {path} must hold a JSON object of component name -> bytes (integers).")
    return data


def _memory_line(info: dict[str, Any]) -> str:
    line = (
        f"memory: predicted peak {info['predicted_peak'] / 2**20:.2f} MiB within the budget "
        f"{info['budget'] / 2**20:.2f} MiB (every output kept: {info['unplanned_peak'] / 2**20:.2f} MiB)"
    )
    if info.get("changed"):
        line += (
            f"; fitted: compute fraction {info['compute_fraction']:.3f} "
            f"(asked {info['asked_compute_fraction']:.3f})"
        )
    return line


@app.command()
def info(
    model: ModelArg,
    types: Annotated[str, typer.Option(help="Comma-separated component types.")] = "attn,cross_attn,ff",
    macs: Annotated[
        bool, typer.Option(help="Measure MAC shares with a 2-step generation (pipelines).")
    ] = True,
) -> None:
    """List the blocks and cacheable components stepcache finds in MODEL, and their share of MACs."""
    from ..discovery import COMPONENT_TYPES, denoiser_of, discover

    wanted = [t.strip() for t in types.split(",") if t.strip()]
    if not wanted or any(t not in COMPONENT_TYPES for t in wanted):
        _fail(f"--types takes comma-separated types among {', '.join(COMPONENT_TYPES)}, got {types!r}.")
    try:
        target = load_target(model)
        comps = discover(target, types=wanted)
        denoiser = denoiser_of(target)
    except StepCacheError as e:
        _fail(e)
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
    from ..runtime.introspect import mac_shares

    try:
        kwargs = _inputs_for(target, 1, ["a photo"], 0, None, strict=False)[0]
        shares = mac_shares(denoiser, comps, lambda: target(**kwargs, num_inference_steps=2))
    except Exception as e:  # any pipeline may need inputs we cannot guess: say so, do not fail
        logging.getLogger(__name__).info("MAC shares not measured: %s", e)
        return None
    return shares if shares.total else None


@app.command()
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
        int, typer.Option(min=1, max=64, help="Longest reuse run to measure (k), below --steps.")
    ] = 3,
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
) -> None:
    """Run MODEL uncached and record per-step error curves of every component.

    Under ``torchrun --nproc_per_node N`` the N processes share the samples and every one gets the
    calibration of all of them; rank 0 alone writes the files and reports."""
    from ..calibration import calibrate as run_calibration
    from ..distributed import is_main, launched
    from ..sensitivity import sensitivity as measure_sensitivity

    scheduler = _scheduler_for(model, scheduler, reference_model)
    if lookahead >= steps:
        _fail(f"--lookahead {lookahead} must be below --steps {steps}: a reuse run fits in one generation.")
    if sensitivity > steps:
        _fail(f"--sensitivity {sensitivity} must be at most --steps {steps} (it groups steps).")
    if not sensitivity:
        _refuse_unused(ctx, ("sensitivity_samples",), "without --sensitivity N (N > 0)")
    elif sensitivity_samples > samples:
        _fail(f"--sensitivity-samples {sensitivity_samples} exceeds --samples {samples}: it replays those.")
    _outputs((out, "calibration file (--out)"), (plot, "plot (--plot)"))
    if plot is not None:
        from ..plots import plot_format

        try:
            plot_format(plot)
        except StepCacheError as e:
            _fail(e)
    try:
        with launched():
            target = load_target(model, scheduler=scheduler, reference_model=reference_model or "ddpm")
            inputs = _inputs_for(target, samples, prompt or [], seed, guidance_scale, batch)
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
            run = _replay(target, inputs[:sensitivity_samples], seed, steps)
            cal = measure_sensitivity(target, cal, run, step_groups=sensitivity)
        with _relay_warnings():
            cal.save(out)
        typer.echo(cal.summary())
        typer.echo(f"wrote {out}")
        if plot:
            cal.plot(plot)
            typer.echo(f"wrote {plot}")
    except StepCacheError as e:
        _fail(e)


@app.command()
def schedule(
    ctx: typer.Context,
    calibration: Annotated[Path, typer.Argument(help="Calibration JSON from `stepcache calibrate`.")],
    alpha: Annotated[
        float | None, typer.Option(help="SmoothCache error threshold.", callback=_checked(_check_alpha))
    ] = None,
    compute_fraction: Annotated[
        float | None,
        typer.Option(help="Target share of component calls to execute.", callback=_checked(_check_fraction)),
    ] = None,
    granularity: Annotated[
        str,
        typer.Option(
            help="type (one plan per component type) or layer.", callback=_checked(_choice("type", "layer"))
        ),
    ] = "type",
    policy: Annotated[
        str,
        typer.Option(
            help="smoothcache (greedy rule, by --alpha or --compute-fraction) or optimal (exact DP for "
            "--compute-fraction, calibrated forecasting and sensitivity weights when recorded).",
            callback=_checked(_choice("smoothcache", "optimal")),
        ),
    ] = "smoothcache",
    forecast: Annotated[
        bool | None, typer.Option(help="optimal: allow first-order forecasts (default: if calibrated).")
    ] = None,
    budget: Annotated[
        str,
        typer.Option(
            help="optimal: count the budget in calls or macs.", callback=_checked(_choice("calls", "macs"))
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
    from ..calibration import Calibration
    from ..schedule import Schedule

    if policy == "optimal" and (alpha is not None or compute_fraction is None):
        _fail("--policy optimal takes --compute-fraction (not --alpha).")
    if (alpha is None) == (compute_fraction is None):
        _fail("give exactly one of --alpha and --compute-fraction.")
    if policy == "smoothcache":
        _refuse_unused(ctx, ("forecast", "budget"), "by --policy smoothcache (for --policy optimal only)")
    if memory_budget is None:
        _refuse_unused(ctx, ("sizes", "branches"), "without --memory-budget")
    _outputs(
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
            sched = Schedule.optimal(
                cal,
                compute_fraction,  # type: ignore[arg-type]
                granularity=granularity,
                forecast=forecast,
                budget=budget,
                **memory,
            )
        elif alpha is not None:
            sched = Schedule.from_calibration(cal, alpha, granularity=granularity, **memory)
        else:
            sched = Schedule.for_compute_fraction(cal, compute_fraction, granularity=granularity, **memory)  # type: ignore[arg-type]
        typer.echo(sched.render())
        if "memory" in sched.meta:
            typer.echo(_memory_line(sched.meta["memory"]))
        if out:
            sched.save(out)
            typer.echo(f"wrote {out}")
        if smoothcache_out:
            with _relay_warnings():
                sched.to_smoothcache(smoothcache_out)
            typer.echo(f"wrote {smoothcache_out}")
    except StepCacheError as e:
        _fail(e)


def _check_objective(value: str) -> None:
    from ..policies.tuned import objective_function

    objective_function(value)


def _tune_validation(value: float | None) -> float | int | None:
    """--validation as tune takes it: a share below 1, a whole count from 1 up (None: the default)."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or (value >= 1 and value != int(value)):
        raise StepCacheError(f"must be a share in [0, 1) or a whole number of samples, got {value:g}.")
    return int(value) if value >= 1 else value


@app.command()
def tune(
    ctx: typer.Context,
    model: ModelArg,
    compute_fraction: Annotated[
        float,
        typer.Option(help="Share of component calls to execute.", callback=_checked(_check_fraction)),
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
            callback=_checked(_check_objective),
        ),
    ] = "worst-25%",
    validation: Annotated[
        float | None,
        typer.Option(
            help="Samples held out to choose among the top candidates and accept refinement: a share in "
            "[0, 1) or a count (default: half; 0: none).",
            callback=_checked(_tune_validation),
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
            callback=_checked(_choice("full", "classic")),
        ),
    ] = "full",
    refine: Annotated[int, typer.Option(min=0, max=100, help="Rounds of local search (0: none).")] = 1,
) -> None:
    """Closed-loop: try candidate schedules on a few generations, keep the one closest to uncached
    (by --objective over the samples, chosen among the top candidates on held-out samples)."""
    from ..calibration import Calibration
    from ..policies.tuned import tune as run_tune

    scheduler = _scheduler_for(model, scheduler, reference_model)
    _outputs((out, "schedule file (--out)"), inputs=(calibration,))
    try:
        cal = Calibration.load(calibration) if calibration else None
        if cal is not None and steps is not None and steps != cal.num_steps:
            _fail(f"--steps {steps} differs from the calibration's {cal.num_steps} steps: leave --steps out.")
        steps = cal.num_steps if cal is not None else steps or 50
        target = load_target(model, scheduler=scheduler, reference_model=reference_model or "ddpm")
        inputs = _inputs_for(target, samples, prompt or [], seed, guidance_scale, batch)
        replay = _replay(target, inputs, seed, steps)
        memory: dict[str, Any] = {}
        if memory_budget is not None:
            if cal is None:
                _fail("--memory-budget needs --calibration: its errors decide what the budget gives up.")
            from ..memory import output_bytes

            # The sizes of this run's outputs, measured on a 2-step replay of the same inputs.
            memory = {
                "memory_budget": memory_budget,
                "sizes": output_bytes(target, _replay(target, inputs[:1], seed, 2)),
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
            **memory,
        )
        typer.echo(sched.render())
        if "memory" in sched.meta:
            typer.echo(_memory_line(sched.meta["memory"]))
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
        _fail(e)


@app.command("plan-memory")
def plan_memory(
    presets: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model shapes: wan2.1-14b-720p, wan2.1-14b-480p, wan2.1-1.3b-480p, hunyuanvideo-720p, "
            "flux.1-dev-1024 (default: all)."
        ),
    ] = None,
    memory_budget: Annotated[
        str, typer.Option(help="GPU memory for the cache, e.g. 16GB.", callback=_checked(_check_budget))
    ] = "16GB",
    compute_fraction: Annotated[
        float, typer.Option(help="Share of component calls computed.", callback=_checked(_check_fraction))
    ] = 0.35,
    bandwidth: Annotated[
        float, typer.Option(min=0.001, help="Assumed host link GB/s each way (PCIe Gen5 x16 effective: 50).")
    ] = 50.0,
    tflops: Annotated[
        float, typer.Option(min=0.001, help="Assumed accelerator peak TFLOPS (H200 bf16: 989).")
    ] = 989.0,
    utilisation: Annotated[
        float, typer.Option(min=0.001, max=1.0, help="Assumed share of the peak a step sustains.")
    ] = 0.4,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON.")] = None,
) -> None:
    """Cache memory of large video/image DiTs, from their configs on meta tensors (no download):
    unplanned, with liveness, within a budget, with fp8 storage, on the device with offload."""
    from ..memory import parse_bytes
    from ..planner import PRESETS, render_plans
    from ..planner import plan_memory as plan_rows

    names = presets or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        _fail(f"unknown model shape(s) {unknown}; choose among {', '.join(PRESETS)}.")
    _outputs((json_out, "JSON file (--json)"))
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
        _fail(e)
    typer.echo(render_plans(rows))
    if json_out is not None:
        import json

        json_out.write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


@app.command()
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
            callback=_checked(_choice(*REFERENCE_MODELS)),
        ),
    ] = "ddpm",
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="ddpm: ddim (default) or dpm (DPM-Solver++ 2M); flow: flow-euler (default).",
            callback=_checked(_check_scheduler),
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=2, max=10_000, help="Denoising steps.")] = 50,
    per_class: Annotated[int, typer.Option(min=1, max=10_000, help="Samples per class.")] = 20,
    classes: Annotated[str, typer.Option(help="Comma-separated digits.")] = "0,1,2,3,4,5,6,7,8,9",
    alpha: Annotated[
        float | None,
        typer.Option(
            help="SmoothCache threshold of the first cached variant.", callback=_checked(_check_alpha)
        ),
    ] = None,
    compute_fraction: Annotated[
        float,
        typer.Option(help="Compute budget of the second cached variant.", callback=_checked(_check_fraction)),
    ] = 0.5,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance (default: the model card's).", callback=_checked(_check_finite)
        ),
    ] = None,
    seed: SeedOpt = 0,
    calibration_samples: Annotated[
        int, typer.Option(min=1, max=10_000, help="Generations to calibrate when nothing is shipped.")
    ] = 8,
) -> None:
    """Uncached vs SmoothCache on the shipped reference model: images, curves, metrics. Offline."""
    from ..demo import DEFAULT_ALPHA, DemoConfig, format_report, run_demo

    scheduler = _reference_scheduler(reference_model, scheduler)
    try:
        picked = [int(c) for c in classes.split(",") if c.strip()]
    except ValueError:
        _fail(f"--classes must be comma-separated digits, got {classes!r}.")
    if not picked or any(not 0 <= c <= 9 for c in picked) or len(set(picked)) != len(picked):
        _fail(f"--classes must name distinct digits 0..9, got {classes!r}.")
    try:
        check_output(out, "demo output folder (--out)", folder=True)
        if _given(ctx, "calibration_samples"):
            from ..reference import DEFAULT_GUIDANCE_SCALE
            from ..reference.pipeline import shipped_calibration

            shipped = shipped_calibration(scheduler, steps)
            guidance = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
            if shipped is not None and shipped.meta.get("guidance_scale") == guidance:
                _fail(
                    f"--calibration-samples is unused: a calibration for {scheduler} {steps} steps ships "
                    "with stepcache and is used. Leave it out."
                )
    except StepCacheError as e:
        _fail(e)
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
