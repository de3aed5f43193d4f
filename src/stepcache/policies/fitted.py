"""Forecast weights chosen on the final samples: :func:`fit_forecasts`.

A forecasting reuse step extrapolates a component's output from its last computed ones with fixed
Taylor/Lagrange weights ``(alpha, beta)`` (:func:`stepcache.schedule.forecast_coefficients`). Those
weights are right for the *features*; what matters is the *image*. Fitting them on calibration
features fails (a probe on the flow reference model: 5-20 % less feature error, 0.3-1.5 dB worse
images on held-out seeds), because a forecast's error is not equally harmful at every step and the
sampler partly corrects some errors and amplifies others.

So this policy keeps a schedule's placement and chooses, for every cached component, one pair of
gains per step, ``(g_alpha, g_beta)``, that multiply the fixed weights, by gradient descent on the
final samples: ``run`` is differentiated through the sampler with autograd, the model's weights frozen,
only ``2 x num_steps x components`` scalars moving (``per="step"``: one pair per step shared by every
component, ``2 x num_steps``). Many pixels per sample keep it from fitting noise: on the development
configurations per-step gains chosen on 12 tuning images raised the mean PSNR of 48 evaluation images
of other seeds by 0.6-2.7 dB over the fixed weights at the same placement, and per-component gains
another 0.3-0.8 dB mean and 0.3-3.2 dB p5 (docs/policies.md). A forecast's error is not equally
harmful in every layer: per component, the fit damps the forecasts that hurt and keeps those that help.

**Several placements, raced.** Which placement is best is the larger question, and the fit changes
the answer (a placement that loses with fixed weights can win with fitted ones). Given several
schedules, each gets half of ``iterations``; the one whose gains score best continues alone for the
rest (successive halving over the fits). On the development configurations the 4-call scores picked
the placement that was best on evaluation images after 8 calls in every case we checked.

**Cost.** Per placement: with ``forecast="auto"`` two plain replays (first- and second-order
forecasts, the fit starts from the better), then its calls of ``run`` with gradients; plus one
uncached call. A call with gradients builds the sampler's graph and is followed by a backward pass:
about three generations of compute, with the activations of every step held in memory (use few,
small samples; docs/policies.md for large models). The result is a plain :class:`~stepcache.Schedule`
whose ``gains`` the runtime applies as numbers (compile-safe).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._logging import get_logger
from ..discovery import denoisers_of
from ..errors import ScheduleError
from ..runtime import cache
from ..runtime.introspect import final_samples
from ..schedule import (
    FORECAST,
    FORECASTS,
    METHODS,
    Schedule,
    forecast_coefficients,
    forecast_sources,
)
from ._replay import rows

__all__ = [
    "AUTO_ORDERS",
    "DEFAULT_FIT_ITERATIONS",
    "FIT_CALL_COST",
    "PER",
    "first_order_gains",
    "fit_forecasts",
]

_log = get_logger(__name__)

DEFAULT_FIT_ITERATIONS = 8
#: what ``per`` may be: one pair of gains per step for each component, or for all
PER = ("component", "step")
#: the forecasts ``forecast="auto"`` replays, the fit starting from the better: first order and the
#: damped second order (``bdf2``). Measured at TaylorSeer's placements (intervals 2-5, warm-ups 1-3) on
#: 7 development configurations of both reference models, the better of these two is 0.03 dB (mean)
#: below the best of all four forecasts; the better of first order and the Lagrange parabola
#: (``taylor2``, the choice before) 0.20 dB, up to 1.4 (docs/policies.md, "Issue 21, third round").
AUTO_ORDERS = ("first-order", "bdf2")
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


class _Fit:
    """One placement's gains, their optimiser and their scores (mean dB of the per-sample MSE).

    ``groups``: None for one pair of gains per step shared by every component (gains ``(n, 2)``), or
    the component names, one pair per step each (gains ``(n, len(groups), 2)``)."""

    def __init__(
        self,
        schedule: Schedule,
        lr: float,
        start_scores: dict[str, float],
        gains: torch.Tensor | None = None,
        groups: list[str] | None = None,
    ) -> None:
        self.schedule, self.start_scores, self.groups = schedule, start_scores, groups
        shape = (schedule.num_steps, 2) if groups is None else (schedule.num_steps, len(groups), 2)
        start = torch.ones(shape, dtype=torch.float64) if gains is None else gains
        if tuple(start.shape) != shape:
            raise ValueError(f"start gains of shape {tuple(start.shape)}, want {shape}")
        self.gains = start.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.gains], lr=lr)
        self.scores: list[float] = []
        self.best_score, self.best = math.inf, self.gains.detach().clone()
        self.delta: torch.Tensor | None = None  # the last step taken from the best gains

    def _gains(self, gains: torch.Tensor) -> Any:
        """What the cache handle takes: per-step rows, or component name -> rows."""
        if self.groups is None:
            return gains.float()
        return {name: gains[:, k].float() for k, name in enumerate(self.groups)}

    def stored(self) -> Any:
        """The best gains as the schedule stores them."""
        best = self.best.tolist()
        if self.groups is None:
            return tuple((float(a), float(b)) for a, b in best)
        return {
            name: tuple((float(row[k][0]), float(row[k][1])) for row in best)
            for k, name in enumerate(self.groups)
        }

    def call(self, target: Any, run: Callable[[], Any], reference: torch.Tensor, step: bool) -> None:
        """Score the current gains on ``run``; with ``step``, one Adam step along their gradient from
        the best gains so far when these are the best, else back half-way along the last step (a step
        that made the samples worse was too long: Adam's first steps move every gain by ``lr``)."""
        with cache(target, self.schedule, count_macs=False) as handle, torch.enable_grad():
            handle.set_forecast_gains(self._gains(self.gains))
            out = rows(final_samples(run(), ScheduleError, detach=False))
        if out.shape != reference.shape:
            raise ScheduleError("`run` returned differently shaped samples on a second call.")
        if not out.requires_grad:
            raise ScheduleError(_NOT_DIFFERENTIABLE)
        loss = _score(out, reference)
        score = float(loss.detach())
        self.scores.append(round(score, 4))
        improved = score < self.best_score
        if improved:
            self.best_score, self.best = score, self.gains.detach().clone()
        if not step:
            return
        if improved or self.delta is None:
            # allow_unused: forecasts with too little history yet are copies, which no gain moves.
            (grad,) = torch.autograd.grad(loss, [self.gains], allow_unused=True)
            if grad is not None:
                self.gains.grad = grad
                self.optimizer.step()
                self.delta = self.gains.detach() - self.best
        else:  # backtrack: half the last step, from the best gains
            self.delta = self.delta / 2
            with torch.no_grad():
                self.gains.copy_(self.best + self.delta)

    def record(self) -> dict[str, Any]:
        return {
            "forecast": self.schedule.meta.get("forecast"),
            "start_scores": self.start_scores,
            # the forecast the fit started from (first order: as the second-order plan's gains)
            "start": min(self.start_scores, key=self.start_scores.__getitem__)
            if self.start_scores
            else self.schedule.meta.get("forecast"),
            "scores": self.scores,
            "calls": len(self.scores),
        }


def fit_forecasts(
    target: Any,
    run: Callable[[], Any],
    schedule: Schedule | Sequence[Schedule],
    *,
    iterations: int = DEFAULT_FIT_ITERATIONS,
    lr: float = 0.1,
    forecast: str | None = "auto",
    reference: torch.Tensor | None = None,
    per: str = "component",
    progress: bool = True,
) -> Schedule:
    """``schedule`` with forecast gains chosen on the final samples of ``run``; given several
    schedules, the one whose fitted gains score best (module doc).

    Args:
        target: the pipeline or denoiser ``run`` uses.
        run: a callable with no arguments that generates with fixed seeds and returns the final samples
            (samples along dimension 0), building the autograd graph when gradients are enabled.
        schedule: the placement to keep (its reuse steps become ``forecast`` forecasts), or several
            placements of the same step count to race.
        iterations: calls of ``run`` with gradients per placement raced to the end; with ``k``
            placements, each gets ``iterations // 2`` and the leader the rest (``k * (iterations // 2) +
            iterations - iterations // 2`` in all). The gains after each call are scored and the best
            kept, the plain weights (all gains 1) being the first. A step that scores worse is
            taken back half-way from the best gains (no backward pass for it).
        lr: Adam's step size on the gains (its first step moves every gain by about ``lr``). 0.1:
            at TaylorSeer's placement at 0.5 of flow-euler-14-g3.5 and flow-euler-28-g1 (development
            data), 8 calls at 0.1 beat 0.2 on 48 evaluation images by 0.0-0.1 dB mean, 0.0-0.2 dB p5;
            without the step back, 0.2 lost 0.7 dB where its first step overshot.
        forecast: the forecast every non-computing step uses: ``"auto"`` (default) replays each
            placement once with first-order and once with the damped second-order forecast
            (``"bdf2"``, :data:`AUTO_ORDERS`) and fits from the better; from first order, as the
            second-order plan with gains that make it first order (:func:`first_order_gains`), so
            the fit has two handles per step either way (where every component follows one plan;
            else it fits the first-order plan); or one of :data:`~stepcache.schedule.METHODS`
            (``"first-order"``, ``"taylor2"``, ``"bdf2"``, ``"taylorseer2"``); or None to keep the
            schedule's values.
        reference: the uncached final samples of ``run`` when already at hand (saves one call).
        per: ``"component"`` (default): one pair of gains per step for each cached component, stored
            by component name; ``"step"``: one pair per step shared by every component. The cost is
            the same (one backward pass either way). Per component: at TaylorSeer's placement on three
            development configurations it beat per step by 0.3-0.8 dB mean and 0.3-3.2 dB p5 on 48
            evaluation images (benchmarks/results/fit-granularity.md).
        progress: show a progress bar.

    Returns:
        The chosen schedule with ``gains`` set and ``meta["forecast_fit"]`` recording every
        placement's scores (mean dB of the per-sample MSE, lower is better), the choice and the cost.

    Raises:
        ScheduleError: bad arguments, schedules without forecasts or of different step counts, or a
            ``run`` that returns differently shaped samples or builds no graph. The model comes back
            unchanged.
    """
    schedules = [schedule] if isinstance(schedule, Schedule) else list(schedule)
    if not schedules or not all(isinstance(s, Schedule) for s in schedules):
        raise ScheduleError(
            f"fit_forecasts needs a Schedule or a non-empty list of them, got {type(schedule).__name__}."
        )
    if len({s.num_steps for s in schedules}) > 1:
        raise ScheduleError(
            f"the schedules to race cover different step counts {sorted({s.num_steps for s in schedules})}."
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ScheduleError(f"iterations must be a whole number >= 1, got {iterations!r}.")
    if len(schedules) > 1 and iterations < 2:
        raise ScheduleError("racing several schedules needs iterations >= 2 (half each, then the leader).")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ScheduleError(f"lr must be a positive number, got {lr!r}.")
    if forecast is not None and forecast != "auto" and forecast not in METHODS:
        raise ScheduleError(f"forecast must be 'auto', one of {sorted(METHODS)} or None, got {forecast!r}.")
    if per not in PER:
        raise ScheduleError(f"per must be one of {list(PER)}, got {per!r}.")
    orders = list(AUTO_ORDERS) if forecast == "auto" else [forecast]
    variants = [[s if o is None else s.with_forecast(o) for o in orders] for s in schedules]
    for vs in variants:
        if not any(v in FORECASTS for plan in vs[0].plans.values() for v in plan):
            raise ScheduleError(
                "a schedule has no forecast steps, so there are no forecast weights to fit; pass forecast="
                "'auto' (the default) or schedules that forecast."
            )
        if not _movable(vs[0]):
            raise ScheduleError(
                "no forecast step of the schedule has two computed outputs before it: each extrapolates "
                "from one output, a copy, which no weight changes. Compute more of the early steps."
            )
    half = iterations // 2 if len(schedules) > 1 else iterations
    rest = iterations - half  # the leader's calls after the race
    calls = len(schedules) * half + rest
    plain = len(schedules) * (len(orders) if len(orders) > 1 else 0) + (reference is None)
    _log.info(
        "fit_forecasts: %d calls of run with gradients over %d placement(s) and %d plain calls "
        "(about %d generations of its samples)",
        calls,
        len(schedules),
        plain,
        calls * FIT_CALL_COST + plain,
    )
    start = time.perf_counter()
    with torch.no_grad():
        if reference is None:
            reference = rows(final_samples(run(), ScheduleError))
        reference = reference.detach().float()
        fits = []
        for vs in variants:
            # per component: each component's plan (the same placement in every variant)
            plans = _component_plans(target, vs[-1]) if per == "component" else None
            groups = None if plans is None else list(plans)
            scores = []
            if len(vs) > 1:  # one plain replay per order: the fit starts from the better one
                for candidate in vs:
                    with cache(target, candidate, count_macs=False):
                        out = rows(final_samples(run(), ScheduleError))
                    scores.append(round(float(_score(out, reference)), 4))
            if not scores:
                fits.append(_Fit(vs[0], float(lr), {}, groups=groups))
                continue
            best = scores.index(min(scores))
            started = {str(o): x for o, x in zip(orders, scores, strict=True)}
            gains = None
            if orders[best] == "first-order":
                if plans is None:
                    gains = first_order_gains(vs[1])
                else:  # per component: each from its own plan, so plans that differ are no obstacle
                    gains = torch.stack([_first_order_rows(p) for p in plans.values()], dim=1)
            if gains is not None:  # the same images, as the second-order plan with its beta gains
                # at 0: the fit keeps both handles whichever forecast it starts from
                fits.append(_Fit(vs[1], float(lr), started, gains, groups))
            else:
                fits.append(_Fit(vs[best], float(lr), started, groups=groups))
    weights = [p for _, m in denoisers_of(target) for p in m.parameters()]
    frozen = [p.requires_grad for p in weights]
    from tqdm.auto import tqdm

    bar = tqdm(total=calls, desc="fitting forecasts", unit="call", disable=not progress, leave=False)
    try:
        for p in weights:  # only the gains move; the weights get no .grad and save no activations
            p.requires_grad_(False)
        for fit in fits:  # the race: half the calls each (the last call of a lone fit only scores)
            for i in range(half):
                fit.call(target, run, reference, step=bool(rest) or i + 1 < half)
                bar.update(1)
        leader = min(fits, key=lambda f: f.best_score)
        for i in range(rest):  # the leader, on from where its race ended
            leader.call(target, run, reference, step=i + 1 < rest)
            bar.update(1)
    finally:
        bar.close()
        for p, flag in zip(weights, frozen, strict=True):
            p.requires_grad_(flag)
    chosen, record = leader.schedule, leader.record()
    meta = {
        **chosen.meta,
        "forecast_fit": {
            "iterations": iterations,
            "lr": float(lr),
            "samples": int(reference.shape[0]),
            "forecast": record["forecast"],
            "per": per,
            "start_scores": record["start_scores"],
            "start": record["start"],
            "scores": leader.scores,
            "chosen": leader.scores.index(round(leader.best_score, 4)),
            "placements": [f.record() for f in fits],
            "placement": fits.index(leader),
            "score_unit": "mean dB of the per-sample MSE against the uncached samples, lower is better",
            "generations": calls * FIT_CALL_COST + plain,
            "seconds": round(time.perf_counter() - start, 2),
        },
    }
    return Schedule(chosen.num_steps, chosen.plans, chosen.counts, meta, leader.stored())


def first_order_gains(schedule: Schedule) -> torch.Tensor | None:
    """Per-step gains ``(n, 2)`` under which ``schedule``'s second-order forecasts give exactly the
    first-order ones: ``g_alpha = alpha_1 / alpha_2``, ``g_beta = 0`` (1 where a step does not
    forecast from three outputs). Gains are per step, shared by every selector: None when the plans
    differ (then no gains make them all first order)."""
    plans = set(schedule.plans.values())
    if len(plans) != 1:
        return None
    return _first_order_rows(plans.pop())


def _first_order_rows(plan: tuple[int, ...]) -> torch.Tensor:
    """:func:`first_order_gains` of one plan, ``(len(plan), 2)``."""
    gains = torch.ones(len(plan), 2, dtype=torch.float64)
    for s, v, a, b, c in forecast_sources(plan):
        if v in FORECASTS and b is not None and c is not None:
            alpha2 = forecast_coefficients(v, s, a, b, c)[0]
            alpha1 = forecast_coefficients(FORECAST, s, a, b, c)[0]
            gains[s, 0], gains[s, 1] = (alpha1 / alpha2 if alpha2 else 1.0), 0.0
    return gains


def _component_plans(target: Any, schedule: Schedule) -> dict[str, tuple[int, ...]]:
    """Component name -> its plan, for the components a cache of ``schedule`` on ``target`` runs
    (in call order: the order the gains of :class:`_Fit` follow)."""
    with cache(target, schedule, count_macs=False) as handle:
        return {name: slot.plan for name, slot in handle._slots.items()}


def _score(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The mean over samples of 10 log10(per-sample MSE): minus the mean PSNR, up to a constant."""
    return (10 * torch.log10((out - reference).pow(2).mean(dim=1).clamp_min(1e-30))).mean()


def _movable(schedule: Schedule) -> bool:
    """Whether some forecast step has two computed steps before it (an extrapolation, not a copy)."""
    return any(
        v in FORECASTS and b is not None
        for plan in schedule.plans.values()
        for _, v, _, b, _ in forecast_sources(plan)
    )
