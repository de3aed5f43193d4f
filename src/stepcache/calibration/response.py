"""The output response: what an error in a component's output at a step does to the final samples.

The calibrated errors say how much a reused or forecast output differs from the computed one; they do
not say what that difference does to the image, and ranking placements by them fails (on the reference
models the placement they rank first is 4-12 dB below the best of the same family; docs/policies.md).
This module measures, in one differentiable generation, the first-order answer for *every* placement
at once.

Each component's output at each step gets a zero added that autograd tracks; the final samples ``x``
are projected on ``projections`` random directions ``w_r`` and differentiated, which gives for every
step ``s`` the gradient ``g_s = d<w_r, x>/dh_s`` (a vector-Jacobian product: one backward pass per
projection, whatever the number of placements). A placement replaces ``h_s`` by a copy or a forecast
``sum_j c_j h_j`` of computed outputs; to first order the final sample moves by
``<w_r, dx> = sum_s <g_s, sum_j c_j h_j - h_s>``. So the inner products ``<g_s, h_j>``, summed over a
type's layers (every layer of a type follows one plan) and kept per sample, are all a placement's
prediction needs: ``E_w[<w, dx>^2] = |dx|^2`` for standard normal ``w``, so the mean of the squared
projections over ``r`` estimates each sample's squared error. :mod:`stepcache.policies._response`
turns them into a predicted score; :func:`stepcache.policies.open_loop_schedule` and ``tune``'s
shortlist rank placements by it.

An approximation, twice over. It is first order, so it misses how errors compound (optimistic for
forecasts that extrapolate far: second-order ones over long gaps). And the gradients are those of the
uncached model, in which every later output responds to a changed trajectory, while in a cached run
the reused outputs do not (neither within the step nor at later reused steps). So its values are not
the errors themselves (on the reference models they came out 3-4 dB away, both ways), but it *ranks*
placements better than the calibrated errors: rank correlation with the measured image error 0.78 on
average over 24 development cells (0.58 for the calibrated errors), and its ten best-ranked placements
held one within 0.2 dB of the best measured on average, 1.9 dB at worst
(benchmarks/results/open-loop-rank.md). Gradients through a model whose reused outputs are
cut off (a detached variant) ranked worse. The open loop therefore ranks copies and first-order
forecasts only, and ``tune`` replays its shortlist.

Cost: one generation of ``run`` with its autograd graph held (the model's weights frozen) and
``projections`` backward passes, about ``1 + 2 * projections`` generations of its samples, plus the
component outputs of every step kept in memory: use a few small samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..discovery import Component, denoisers_of, discover
from ..errors import CalibrationError
from ..runtime.introspect import final_samples
from ..runtime.steps import StepTracker
from .harness import intercepted
from .value import Calibration

__all__ = ["DEFAULT_PROJECTIONS", "response"]

DEFAULT_PROJECTIONS = 2
_NO_GRAPH = (
    "stepcache.response differentiates the final samples, but `run` returned samples without an "
    "autograd graph (it runs under torch.no_grad or torch.inference_mode). Make it build the graph when "
    "gradients are enabled: stepcache.reference.sample(..., differentiable=True); for a diffusers "
    "pipeline call type(pipe).__call__.__wrapped__(pipe, ..., output_type='latent')."
)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


class _Recorder:
    """Interceptor: every floating output gets a tracked zero added; the output (detached) is kept."""

    def __init__(self, tracker: StepTracker) -> None:
        self.tracker = tracker
        self.outputs: list[tuple[str, int, list[torch.Tensor], list[torch.Tensor]]] = []
        self.generations: set[int] = set()

    def intercept(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        name = comp.name

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            zeros: list[torch.Tensor] = []

            def shift(t: Any) -> Any:
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    return t
                z = torch.zeros_like(t, requires_grad=True)
                zeros.append(z)
                return t + z

            if isinstance(out, torch.Tensor):
                shifted = shift(out)
            elif type(out) in (tuple, list):
                shifted = type(out)(shift(t) for t in out)
            else:
                raise CalibrationError(
                    f"{name} returns a {type(out).__name__}; the response handles components returning "
                    "tensors or plain tuples of them."
                )
            self.generations.add(self.tracker.generation)
            if zeros:
                kept = [t.detach() for t in _tensors(out) if t.is_floating_point()]
                self.outputs.append((name, self.tracker.step, kept, zeros))
            return shifted

        return forward


def response(
    target: Any,
    calibration: Calibration,
    run: Callable[[], Any],
    *,
    projections: int = DEFAULT_PROJECTIONS,
    seed: int = 0,
) -> Calibration:
    """``calibration`` with its output response measured on ``run`` (module doc).

    Args:
        target: the pipeline or denoiser the calibration was recorded on.
        calibration: its calibration (steps and components are read from it).
        run: a callable with no arguments that generates with fixed seeds and returns the final samples
            (samples along dimension 0), building the autograd graph when gradients are enabled; a
            few samples (4-8) suffice. Called once.
        projections: random projections of the final samples (backward passes); 2 by default.
        seed: seed of the projections.

    Raises:
        CalibrationError: a bad ``projections``, a model that is not the calibration's, a ``run`` that
            builds no graph, calls the model another number of times than the calibration's steps, or
            whose components' batch rows are not a multiple of its samples. The model comes back
            unchanged (its weights' ``requires_grad`` flags included).
    """
    if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
        raise CalibrationError(f"projections must be a whole number >= 1, got {projections!r}.")
    calibration.check_model(target)
    comps = [c for c in discover(target) if c.name in calibration.components]
    if {c.name for c in comps} != set(calibration.components):
        raise CalibrationError("the model's components differ from the calibration's: recalibrate.")
    tracker = StepTracker()
    recorder = _Recorder(tracker)
    weights = [p for _, m in denoisers_of(target) for p in m.parameters()]
    frozen = [p.requires_grad for p in weights]
    start = time.perf_counter()
    try:
        for p in weights:  # only the added zeros are differentiated: no .grad on the model
            p.requires_grad_(False)
        with intercepted(target, comps, recorder.intercept, tracker, gradients=True):
            x = final_samples(run(), CalibrationError, detach=False)
            if not x.requires_grad:
                raise CalibrationError(_NO_GRAPH)
            zeros = [z for *_, zs in recorder.outputs for z in zs]
            generator = torch.Generator().manual_seed(seed)
            grads = []
            for r in range(projections):
                w = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
                grads.append(
                    torch.autograd.grad(
                        (w * x).sum(), zeros, retain_graph=r + 1 < projections, allow_unused=True
                    )
                )
    finally:
        for p, flag in zip(weights, frozen, strict=True):
            p.requires_grad_(flag)
    if len(recorder.generations) > 1:
        raise CalibrationError(
            f"`run` made {len(recorder.generations)} generations; the response needs one generation of "
            "all its samples (one batched call), so that each batch row belongs to one sample."
        )
    table = _inner_products(recorder.outputs, grads, calibration, x.shape[0])
    info = {
        "projections": projections,
        "samples": int(x.shape[0]),
        "sample_size": int(x[0].numel()),
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
        "generations": 1 + 2 * projections,
        "note": "generations: one differentiable generation of run and a backward pass per projection "
        "(about two generations each)",
    }
    return calibration.replace(response=table, meta={**calibration.meta, "response": info})


def _inner_products(
    outputs: list[tuple[str, int, list[torch.Tensor], list[torch.Tensor]]],
    grads: Sequence[Sequence[torch.Tensor | None]],
    calibration: Calibration,
    samples: int,
) -> dict[str, np.ndarray]:
    """Type -> ``(projections, n, n, samples)``: ``<g_s, h_j>`` summed over the type's layers (and over
    calls within a step: guidance branches), per sample (batch row ``b`` belongs to sample ``b % samples``)."""
    n, kinds = calibration.num_steps, calibration.components
    steps: dict[str, dict[int, list[tuple[list[torch.Tensor], int]]]] = {}
    offset = 0
    for name, step, kept, zs in outputs:
        if not 0 <= step < n:
            raise CalibrationError(
                f"`run` called the model at step {step}, outside the calibration's {n} steps: run one "
                "generation with the calibration's number of steps."
            )
        steps.setdefault(name, {}).setdefault(step, []).append((kept, offset))
        offset += len(zs)
    missing = sorted(name for name in kinds if set(steps.get(name, {})) != set(range(n)))
    if missing:
        raise CalibrationError(
            f"`run` did not call {missing[0]} at each of the calibration's {n} steps: run one generation "
            "with the calibration's number of steps."
        )
    projections = len(grads)
    table = {kind: np.zeros((projections, n, n, samples)) for kind in dict.fromkeys(kinds.values())}
    for name, by_step in steps.items():
        out = table[kinds[name]]
        stacked: dict[tuple[int, int], torch.Tensor] = {}
        for s in range(n):
            for b, (kept_s, off_s) in enumerate(by_step[s]):
                for i, h_s in enumerate(kept_s):
                    rows = h_s.shape[0] if h_s.ndim else 1
                    if rows % samples:
                        raise CalibrationError(
                            f"{name} runs on {rows} batch rows, not a multiple of the {samples} samples "
                            "`run` returned: the response needs each row to belong to one sample."
                        )
                    # step j's output of the same call (guidance branch) b, every j at once
                    if (b, i) not in stacked:
                        h = torch.stack([by_step[j][min(b, len(by_step[j]) - 1)][0][i] for j in range(n)])
                        stacked[b, i] = h.reshape(n, rows, -1).double()
                    h = stacked[b, i]
                    sample = torch.arange(rows, device=h.device) % samples
                    for r in range(projections):
                        g = grads[r][off_s + i]
                        if g is None:
                            continue
                        per_row = torch.einsum("rf,jrf->jr", g.reshape(rows, -1).double(), h)
                        summed = torch.zeros(n, samples, dtype=torch.float64, device=h.device)
                        out[r, s] += summed.index_add_(1, sample, per_row).cpu().numpy()
    return table
