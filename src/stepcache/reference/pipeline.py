"""The reference model behind a pipeline-shaped call, and the calibrations shipped with it.

:class:`ReferencePipeline` lets the CLI, calibration, tuning and the benchmarks treat the reference
model exactly like a diffusers pipeline (``pipe(class_labels=[...], num_inference_steps=50)``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stepcache.calibration import Calibration, calibrate
from stepcache.errors import StepCacheError
from stepcache.reference._model import (
    DEFAULT_GUIDANCE_SCALE,
    MODEL_SCHEDULERS,
    check_scheduler_fits,
    default_scheduler,
    is_flow_scheduler,
    load_model,
    make_scheduler,
    model_key,
    model_of_scheduler,
    sample,
)

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["ReferencePipeline", "calibrate_reference", "shipped_calibration"]


class ReferencePipeline:
    """The reference model behind a pipeline-like call, so the CLI and calibration treat it like
    a diffusers pipeline: ``pipe(class_labels=[...], num_inference_steps=50)`` returns images."""

    def __init__(
        self, scheduler: Any = None, guidance_scale: float | None = None, *, model: str = "ddpm"
    ) -> None:
        """``model``: ``"ddpm"`` (default) or ``"flow"``; ``scheduler``: a name that fits it
        (:data:`~stepcache.reference.MODEL_SCHEDULERS`; ``None``: the model's default, ``ddim`` or
        ``flow-euler``) or a diffusers scheduler object configured for the model's training schedule
        (a fresh copy of it, from its config, runs each call); a mismatch raises :class:`StepCacheError`."""
        self.model_name = model_key(model)
        self._template: SchedulerMixin | None = None
        if scheduler is None or isinstance(scheduler, str):
            name = default_scheduler(self.model_name) if scheduler is None else scheduler
            self.scheduler_name = check_scheduler_fits(self.model_name, name)
        elif hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "config"):
            if is_flow_scheduler(scheduler) != (self.model_name == "flow"):
                kind = "a flow-matching" if is_flow_scheduler(scheduler) else "a DDPM (epsilon)"
                raise StepCacheError(
                    f"{type(scheduler).__name__} is {kind} scheduler and does not fit the {self.model_name} "
                    f"reference model; use one of {', '.join(MODEL_SCHEDULERS[self.model_name])}."
                )
            self._template = scheduler
            self.scheduler_name = type(scheduler).__name__
        else:
            raise StepCacheError(
                f"scheduler must be a name ({', '.join(MODEL_SCHEDULERS[self.model_name])}) or a diffusers "
                f"scheduler object, got {type(scheduler).__name__}."
            )
        self.transformer = load_model(model=self.model_name)
        self.guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        self.scheduler = self._fresh_scheduler(50)

    def _fresh_scheduler(self, steps: int) -> SchedulerMixin:
        if self._template is None:
            return make_scheduler(self.scheduler_name, steps)
        sched = type(self._template).from_config(self._template.config)
        sched.set_timesteps(steps)
        return sched

    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        output_type: str = "pt",
        differentiable: bool = False,
    ) -> torch.Tensor:
        if generator is not None:
            seed = int(generator.initial_seed())
        # A fresh scheduler per call (multistep solvers keep state), kept on self so a cache can
        # check the step count before the first step.
        self.scheduler = self._fresh_scheduler(num_inference_steps)
        return sample(
            self.transformer,
            torch.as_tensor(class_labels),
            scheduler=self.scheduler,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            seed=seed,
            progress=progress,
            differentiable=differentiable,
        )


def shipped_calibration(scheduler: str, steps: int) -> Calibration | None:
    """The calibration shipped for (scheduler, steps), if there is one.

    Scheduler names are unique to a model (``ddim``/``dpm``: the DDPM model; ``flow-euler``: the flow
    model), so ``flow-euler-20.json`` is the flow model's."""
    path = resources.files("stepcache.reference") / "calibrations" / f"{scheduler}-{steps}.json"
    if not path.is_file():
        return None
    return Calibration.load(Path(str(path)))


def calibrate_reference(
    scheduler: str,
    steps: int,
    samples: int = 8,
    seed: int = 1000,
    guidance_scale: float | None = None,
    progress: bool = True,
    model: str | None = None,
) -> Calibration:
    """Calibrate a reference model: ``samples`` generations of one image per class each.

    ``model``: ``"ddpm"`` or ``"flow"``; ``None`` means the model the scheduler belongs to."""
    pipe = ReferencePipeline(scheduler, guidance_scale, model=model or model_of_scheduler(scheduler))
    inputs = [{"class_labels": list(range(10)), "seed": seed + i} for i in range(samples)]
    return calibrate(pipe, inputs=inputs, num_inference_steps=steps, progress=progress)
