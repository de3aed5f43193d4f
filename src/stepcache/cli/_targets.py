"""What a command runs and on what: MODEL resolved to a pipeline or module (``reference``, ``tiny-dit``, a
diffusers model id or folder, ``module:factory``), the scheduler of a built-in model, one call's inputs per
sample, and the replay of those inputs; with the options that choose them."""

from __future__ import annotations

import importlib
import inspect
import random
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from ..errors import StepCacheError
from ..integrations.diffusers import load_pipeline, tiny_dit_pipeline
from ..reference import SCHEDULER_NAMES, ReferencePipeline, check_scheduler_fits, default_scheduler
from ._common import check_finite, checked, choice, fail

# The schedulers the built-in models (reference, tiny-dit) and the demo take. flow-euler fits only the
# flow reference model (--model flow), the others only the DDPM one; tiny-dit takes ddim and dpm. A
# mismatch is a one-line error.
SCHEDULERS = SCHEDULER_NAMES
TINY_DIT_SCHEDULERS = ("ddim", "dpm")
# The shipped reference models (MODEL=reference, --model).
REFERENCE_MODELS = ("ddpm", "flow")
MAX_SEED = 2**62


def check_scheduler(value: str) -> None:
    if value not in SCHEDULERS:
        raise StepCacheError(f"must be one of {', '.join(SCHEDULERS)}, got {value!r}.")


ModelArg = Annotated[
    str, typer.Argument(help="reference, tiny-dit, a diffusers model id or folder, or module:factory")
]
# Options shared by the commands that run a model (calibrate, tune).
StepsOpt = Annotated[int, typer.Option(min=2, max=10_000, help="Denoising steps per generation.")]
BatchOpt = Annotated[int, typer.Option(min=1, max=100_000, help="Class labels or prompts per generation.")]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        help="reference: ddim (default), dpm, unipc, deis, euler or euler-a; reference --model flow: "
        "flow-euler (its default); tiny-dit: ddim (default) or dpm.",
        callback=checked(check_scheduler),
    ),
]
ReferenceModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="MODEL=reference only: ddpm (default; dit_digits) or flow (dit_digits_flow, flow matching).",
        callback=checked(choice(*REFERENCE_MODELS)),
    ),
]
PromptOpt = Annotated[list[str] | None, typer.Option(help="Prompt(s) for text-conditioned pipelines.")]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(help="Guidance scale passed to the pipeline.", callback=checked(check_finite)),
]
SeedOpt = Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the first generation.")]


def load_target(spec: str, *, scheduler: str | None = None, reference_model: str = "ddpm") -> Any:
    """Resolve a MODEL argument to a pipeline or module (``reference_model``: which reference DiT)."""
    if spec == "reference":
        return ReferencePipeline(scheduler, model=reference_model)
    if spec == "tiny-dit":
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
    try:
        return load_pipeline(spec)
    except Exception as e:  # diffusers/hub errors vary; say what was tried
        raise StepCacheError(
            f"cannot load {spec!r} as a diffusers pipeline ({type(e).__name__}: {e}). Use tiny-dit, a local "
            "pipeline folder, a hub id (needs network), or module:factory."
        ) from None


def inputs_for(
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


def replay(target: Any, inputs: list[dict], seed: int, steps: int, differentiable: bool = False) -> Any:
    """A no-argument callable generating ``inputs`` with fresh generators (the same noise every call)
    and returning the final samples as one tensor: what sensitivity() and tune() replay
    (``differentiable``: with their autograd graph, for fit_forecasts; the reference pipeline only)."""
    extra = {"differentiable": True} if differentiable else {}

    def run() -> Any:
        outs = []
        for i, kw in enumerate(inputs):
            kw = {
                **kw,
                **extra,
                "generator": torch.Generator().manual_seed(seed + i),
                "num_inference_steps": steps,
            }
            outs.append(target(**kw))
        return torch.cat([torch.as_tensor(getattr(o, "images", o)) for o in outs])

    return run


def scheduler_for(model: str, scheduler: str | None, reference_model: str | None = None) -> str:
    """The scheduler of a built-in model; refused for other models, which bring their own, and refused
    when it does not fit the model (flow-euler only for the flow reference model)."""
    if reference_model is not None and model != "reference":
        fail(f"--model applies to MODEL=reference (ddpm or flow); {model} is its own model.")
    if model not in ("reference", "tiny-dit") and scheduler is not None:
        fail(f"--scheduler applies to the built-in models (reference, tiny-dit); {model} brings its own.")
    if model == "reference":
        return reference_scheduler(reference_model or "ddpm", scheduler)
    if model == "tiny-dit" and scheduler is not None and scheduler not in TINY_DIT_SCHEDULERS:
        where = (
            "the flow reference model (reference --model flow)" if scheduler == "flow-euler" else "reference"
        )
        fail(f"--scheduler {scheduler} fits only {where}; tiny-dit takes ddim or dpm.")
    return scheduler or "ddim"


def reference_scheduler(reference_model: str, scheduler: str | None) -> str:
    """The reference model's scheduler: its default when not given, a one-line error when it does not fit."""
    if scheduler is None:
        return default_scheduler(reference_model)
    try:
        return check_scheduler_fits(reference_model, scheduler)
    except StepCacheError as e:
        fail(f"--scheduler {scheduler} does not fit --model {reference_model}: {str(e).split('; ')[-1]}.")
