"""The reference model behind a pipeline-shaped call, and the calibrations shipped with it.

:class:`ReferencePipeline` lets the CLI, calibration, tuning and the benchmarks treat the reference
model exactly like a diffusers pipeline (``pipe(class_labels=[...], num_inference_steps=50)``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from stepcache.calibration import Calibration, calibrate
from stepcache.reference._model import (
    DEFAULT_GUIDANCE_SCALE,
    check_scheduler_fits,
    default_scheduler,
    load_model,
    make_scheduler,
    model_key,
    model_of_scheduler,
    sample,
)

__all__ = ["ReferencePipeline", "calibrate_reference", "shipped_calibration"]


class ReferencePipeline:
    """The reference model behind a pipeline-like call, so the CLI and calibration treat it like
    a diffusers pipeline: ``pipe(class_labels=[...], num_inference_steps=50)`` returns images."""

    def __init__(
        self, scheduler: str | None = None, guidance_scale: float | None = None, *, model: str = "ddpm"
    ) -> None:
        """``model``: ``"ddpm"`` (default) or ``"flow"``; ``scheduler``: one that fits it (``None``: the
        model's default, ``ddim`` or ``flow-euler``); a mismatch raises :class:`StepCacheError`."""
        self.model_name = model_key(model)
        scheduler = default_scheduler(self.model_name) if scheduler is None else scheduler
        self.scheduler_name = check_scheduler_fits(self.model_name, scheduler)
        self.transformer = load_model(model=self.model_name)
        self.guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        self.scheduler = make_scheduler(self.scheduler_name, 50)

    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        output_type: str = "pt",
    ) -> torch.Tensor:
        if generator is not None:
            seed = int(generator.initial_seed())
        # A fresh scheduler per call (multistep solvers keep state), kept on self so a cache can
        # check the step count before the first step.
        self.scheduler = make_scheduler(self.scheduler_name, num_inference_steps)
        return sample(
            self.transformer,
            torch.as_tensor(class_labels),
            scheduler=self.scheduler,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            seed=seed,
            progress=progress,
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
