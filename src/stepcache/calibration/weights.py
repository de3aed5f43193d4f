"""Sensitivity weights: how much an error at a given step, in a given group of layers, moves the sample.

The calibrated relative L1 change of a component is an open-loop proxy: it says how different its
output is, not how much that difference matters for the final sample. Errors early in sampling can
be washed out by later steps or amplified by them, and some layers matter more than others. This
module closes the loop with a few perturbation runs on the calibration inputs: for each group of
layers (type x depth bucket) and each group of steps, it replays the generation reusing that group's
previous output at every other step of the group (a real one-step cache error), measures the RMS change
of the final sample, and divides by the calibrated error it injected. The result, one weight per
(component, step), multiplies the error in the optimal policy's cost (:func:`stepcache.optimal_schedule`).

Cost: ``1 + step_groups * layer_groups`` runs of ``run`` (reported in ``meta["sensitivity"]``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..discovery import Component, discover
from ..errors import CalibrationError
from ..runtime.introspect import final_samples
from ..runtime.steps import StepTracker
from .harness import intercepted
from .harness import progress as progress_bar
from .value import Calibration

__all__ = ["sensitivity"]


class _Perturber:
    """Interceptor: components of the active group return their last stored output at the active steps."""

    def __init__(self, tracker: StepTracker) -> None:
        self.tracker = tracker
        self.names: set[str] = set()
        self.steps: set[int] = set()
        self.last: dict[tuple[str, int], Any] = {}

    def intercept(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        name = comp.name

        def forward(*args: Any, **kwargs: Any) -> Any:
            key = (name, self.tracker.branch)
            if name in self.names and self.tracker.step in self.steps and key in self.last:
                return self.last[key]
            out = original(*args, **kwargs)
            self.last[key] = out
            return out

        return forward

    def clear(self) -> None:
        self.last.clear()


def sensitivity(
    target: Any,
    calibration: Calibration,
    run: Callable[[], Any],
    *,
    step_groups: int = 5,
    depth_groups: int = 2,
    progress: bool = True,
) -> Calibration:
    """Measure per-(layer group, step group) sensitivity weights; return the calibration with them.

    Args:
        target: the pipeline or denoiser the calibration was recorded on.
        calibration: its calibration (the injected errors are read from it).
        run: a callable with no arguments that generates with fixed seeds and returns the final
            samples as a tensor; it is called ``1 + step_groups * types * depth_groups`` times.
        step_groups: contiguous groups of denoising steps (weights are constant within one).
        depth_groups: buckets of layers per component type, by depth.
        progress: show a progress bar over the perturbation runs.
    """
    if (
        not isinstance(step_groups, int)
        or not isinstance(depth_groups, int)
        or step_groups < 1
        or depth_groups < 1
    ):
        raise CalibrationError("step_groups and depth_groups must be positive integers.")
    calibration.check_model(target)
    comps = [c for c in discover(target) if c.name in calibration.components]
    if {c.name for c in comps} != set(calibration.components):
        raise CalibrationError("the model's components differ from the calibration's: recalibrate.")
    n = calibration.num_steps
    bounds = np.linspace(1, n, min(step_groups, n - 1) + 1).round().astype(int)
    step_sets = [list(range(a, b)) for a, b in itertools.pairwise(bounds) if b > a]
    by_type: dict[str, list[str]] = {}
    for c in comps:
        by_type.setdefault(c.type, []).append(c.name)
    layer_sets = []
    for names in by_type.values():
        for part in np.array_split(np.array(names, dtype=object), min(depth_groups, len(names))):
            layer_sets.append([str(x) for x in part])

    tracker = StepTracker()
    perturber = _Perturber(tracker)
    tracker.on_generation.append(perturber.clear)
    tracker.on_reset.append(perturber.clear)
    start = time.perf_counter()
    weights = {name: np.zeros(n) for name in calibration.components}
    runs = 0
    with intercepted(target, comps, perturber.intercept, tracker):
        reference = final_samples(run(), CalibrationError)
        runs += 1
        scale = float(reference.pow(2).mean().sqrt()) or 1.0
        jobs = [(names, steps) for names in layer_sets for steps in step_sets]
        for names, steps in progress_bar(progress, len(jobs), "sensitivity", "run", jobs):
            # Every other step of the group reuses the previous step's output: one-step errors only.
            perturbed = [s for s in steps if (s - steps[0]) % 2 == 0]
            perturber.names, perturber.steps = set(names), set(perturbed)
            try:
                out = final_samples(run(), CalibrationError)
            finally:
                perturber.names, perturber.steps = set(), set()
            runs += 1
            if out.shape != reference.shape:
                raise CalibrationError("`run` returned differently shaped samples on a second call.")
            change = float((out - reference).pow(2).mean().sqrt()) / scale
            injected = sum(
                float(np.nan_to_num(calibration.errors[nm][s, 0])) for nm in names for s in perturbed
            )
            w = change / injected if injected > 0 else 0.0
            for nm in names:
                weights[nm][steps] = w
    for nm in weights:  # step 0 always computes; give it its neighbours' weight for completeness
        weights[nm][0] = weights[nm][1] if n > 1 else 1.0
    mean = float(np.mean([w.mean() for w in weights.values()]))
    if not math.isfinite(mean) or mean <= 0:
        raise CalibrationError("perturbations did not change the samples: does `run` use the model?")
    weights = {nm: w / mean for nm, w in weights.items()}
    info = {
        "step_groups": len(step_sets),
        "layer_groups": len(layer_sets),
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 2),
        "note": "runs are calls of `run`; each costs about one uncached generation of its batch",
    }
    return calibration.replace(weights=weights, meta={**calibration.meta, "sensitivity": info})
