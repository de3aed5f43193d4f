"""Forecast weights chosen on the final samples: :func:`fit_forecasts`.

A forecasting reuse step extrapolates a component's output from its last computed ones with fixed
Taylor/Lagrange weights ``(alpha, beta)`` (:func:`stepcache.schedule.forecast_coefficients`). Those
weights are right for the *features*; what matters is the *image*. Fitting them on calibration
features fails (a probe on the flow reference model: 5-20 % less feature error, 0.3-1.5 dB worse
images on held-out seeds), because a forecast's error is not equally harmful at every step and the
sampler partly corrects some errors and amplifies others.

So this policy keeps the schedule's placement and chooses one pair of gains per step,
``(g_alpha, g_beta)``, shared by every component, that multiply the fixed weights, by gradient descent
on the final samples: ``run`` is differentiated through the sampler with autograd, the model's
weights frozen, only ``2 x num_steps`` scalars moving (most of them at forecast steps). Few
parameters and many pixels per sample keep it from fitting noise: on the development configurations
the gains chosen on 12 tuning images raised the mean PSNR of 48 evaluation images by 0.6-2.7 dB over
the fixed weights at the same placement, the 5th percentile by 0.2-3.8 dB (docs/policies.md).

**Cost.** ``iterations`` calls of ``run`` with gradients, plus one uncached call and (with
``forecast="auto"``) two plain replays: each call builds
the sampler's graph and is followed by a backward pass, about three generations of compute, and it
holds the activations of every step of the run in memory (use few, small samples; see
docs/policies.md for large models). The result is a plain :class:`~stepcache.Schedule` whose
``gains`` the runtime applies as numbers (compile-safe).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .._logging import get_logger
from ..discovery import denoisers_of
from ..errors import ScheduleError
from ..runtime import cache
from ..runtime.introspect import final_samples
from ..schedule import FORECASTS, METHODS, Schedule
from ._replay import rows

__all__ = ["DEFAULT_FIT_ITERATIONS", "FIT_CALL_COST", "fit_forecasts"]

_log = get_logger(__name__)

DEFAULT_FIT_ITERATIONS = 8
#: what one fitting call of ``run`` costs, in generations of its samples: the forward pass and the
#: backward pass, which costs about twice as much
FIT_CALL_COST = 3
_NOT_DIFFERENTIABLE = (
    "fit_forecasts differentiates the final samples with respect to the forecast weights, but `run` "
    "returned samples without an autograd graph: it runs under torch.no_grad or torch.inference_mode. "
    "Make it build the graph when gradients are enabled (stepcache.reference.sample(..., "
    "differentiable=True); a diffusers pipeline's __call__ is wrapped in torch.no_grad: call "
    "type(pipe).__call__.__wrapped__(pipe, ..., output_type='latent'), docs/policies.md)."
)


def fit_forecasts(
    target: Any,
    run: Callable[[], Any],
    schedule: Schedule,
    *,
    iterations: int = DEFAULT_FIT_ITERATIONS,
    lr: float = 0.2,
    forecast: str | None = "auto",
    reference: torch.Tensor | None = None,
    progress: bool = True,
) -> Schedule:
    """``schedule`` with per-step forecast gains chosen on the final samples of ``run`` (module doc).

    Args:
        target: the pipeline or denoiser ``run`` uses.
        run: a callable with no arguments that generates with fixed seeds and returns the final samples
            (samples along dimension 0), building the autograd graph when gradients are enabled.
        schedule: the placement to keep; its reuse steps become ``forecast`` forecasts first.
        iterations: calls of ``run`` with gradients (the gains after each are scored; the best is kept,
            the schedule's own weights, all gains 1, being the first).
        lr: Adam's step size on the gains.
        forecast: the forecast every non-computing step uses: ``"auto"`` (default) replays the
            placement once with first-order and once with second-order forecasts (``"taylor2"``) and
            fits from the better (second order gives the fit two handles per step, but extrapolates
            badly over long gaps: -4 to -5 dB at 0.25 of 20 steps on the flow model); or one of
            ``"first-order"``, ``"taylor2"``, ``"bdf2"``; or None to keep the schedule's values.
        reference: the uncached final samples of ``run`` when already at hand (saves one call).
        progress: show a progress bar.

    Returns:
        The schedule with ``gains`` set and ``meta["forecast_fit"]`` recording the score (mean dB of
        the per-sample MSE, lower is better) after each iteration and the cost.

    Raises:
        ScheduleError: bad arguments, a schedule without forecasts, or a ``run`` that returns
            differently shaped samples or builds no graph. The model comes back unchanged.
    """
    if not isinstance(schedule, Schedule):
        raise ScheduleError(f"fit_forecasts needs a Schedule, got {type(schedule).__name__}.")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ScheduleError(f"iterations must be a whole number >= 1, got {iterations!r}.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ScheduleError(f"lr must be a positive number, got {lr!r}.")
    if forecast is not None and forecast != "auto" and forecast not in METHODS:
        raise ScheduleError(f"forecast must be 'auto', one of {sorted(METHODS)} or None, got {forecast!r}.")
    starts = (
        [schedule.with_forecast("first-order"), schedule.with_forecast("taylor2")]
        if forecast == "auto"
        else [schedule if forecast is None else schedule.with_forecast(forecast)]
    )
    if not any(v in FORECASTS for plan in starts[0].plans.values() for v in plan):
        raise ScheduleError(
            "the schedule has no forecast steps, so there are no forecast weights to fit; pass forecast="
            "'auto' (the default) or a schedule that forecasts."
        )
    n = schedule.num_steps
    start = time.perf_counter()
    given = reference is not None
    with torch.no_grad():
        if reference is None:
            reference = rows(final_samples(run(), ScheduleError))
        reference = reference.detach().float()
        start_scores = []
        if len(starts) > 1:  # one plain replay per order: the fit starts from the better one
            for candidate in starts:
                with cache(target, candidate, count_macs=False):
                    out = rows(final_samples(run(), ScheduleError))
                start_scores.append(round(float(_score(out, reference)), 4))
    schedule = starts[start_scores.index(min(start_scores))] if start_scores else starts[0]
    gains = torch.ones(n, 2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([gains], lr=float(lr))
    scores: list[float] = []
    best_score, best = math.inf, gains.detach().clone()
    weights = [p for _, m in denoisers_of(target) for p in m.parameters()]
    frozen = [p.requires_grad for p in weights]
    _log.info(
        "fit_forecasts: %d calls of run with gradients (about %d generations of its samples)%s",
        iterations,
        iterations * FIT_CALL_COST,
        ", the uncached samples given" if given else " and one uncached call",
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=iterations, desc="fitting forecasts", unit="call", disable=not progress, leave=False)
    try:
        for p in weights:  # only the gains move; the weights get no .grad and save no activations
            p.requires_grad_(False)
        for it in range(iterations):
            with cache(target, schedule, count_macs=False) as handle, torch.enable_grad():
                handle.set_forecast_gains(gains.float())
                out = rows(final_samples(run(), ScheduleError, detach=False))
            if out.shape != reference.shape:
                raise ScheduleError("`run` returned differently shaped samples on a second call.")
            if not out.requires_grad:
                raise ScheduleError(_NOT_DIFFERENTIABLE)
            loss = _score(out, reference)
            score = float(loss.detach())
            scores.append(round(score, 4))
            if score < best_score:
                best_score, best = score, gains.detach().clone()
            bar.update(1)
            if it + 1 < iterations:  # the last call only scores
                (grad,) = torch.autograd.grad(loss, [gains])
                gains.grad = grad
                optimizer.step()
            del out, loss
    finally:
        bar.close()
        for p, flag in zip(weights, frozen, strict=True):
            p.requires_grad_(flag)
    fitted = tuple((float(a), float(b)) for a, b in best.tolist())
    meta = {
        **schedule.meta,
        "forecast_fit": {
            "iterations": iterations,
            "lr": float(lr),
            "forecast": schedule.meta.get("forecast"),
            "start_scores": dict(zip(("first-order", "taylor2"), start_scores, strict=False)),
            "samples": int(reference.shape[0]),
            "scores": scores,
            "score_unit": "mean dB of the per-sample MSE against the uncached samples, lower is better",
            "chosen": scores.index(round(best_score, 4)),
            "generations": iterations * FIT_CALL_COST + len(start_scores) + (0 if given else 1),
            "seconds": round(time.perf_counter() - start, 2),
        },
    }
    return Schedule(n, schedule.plans, schedule.counts, meta, fitted)


def _score(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The mean over samples of 10 log10(per-sample MSE): minus the mean PSNR, up to a constant."""
    return (10 * torch.log10((out - reference).pow(2).mean(dim=1).clamp_min(1e-30))).mean()
