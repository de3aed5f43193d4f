"""Policies: how a calibration (or a few replays) becomes a :class:`~stepcache.Schedule`.

One module per policy, all returning a plain Schedule and sharing the plan builders of
:mod:`._plan` and the plan values of :class:`~stepcache.schedule.PlanValue`:

* :mod:`.smoothcache`: SmoothCache's threshold rule (by alpha, or by compute fraction);
* :mod:`.uniform`: calibration-free FORA and evenly spaced schedules;
* :mod:`.optimal`: the exact least-error schedule for a budget (dynamic programming + knapsack);
* :mod:`.tuned`: closed loop, the candidate whose final samples stay closest to uncached;
* :mod:`.fitted`: forecast weights chosen on the final samples by gradient descent through the sampler;
* :mod:`.auto`: :func:`open_loop_schedule`, the open-loop policy caching without a schedule uses;
* :mod:`.guidance`: where to stand in for the unconditional guidance branch (threshold, fraction,
  or closed loop).

Shared parts: :mod:`._plan` (plan builders, checks, error tables), :mod:`._cost` (the calibrated cost
of a plan), :mod:`._budget` (fitting a schedule to a memory budget), :mod:`._replay` (scoring replays).
"""

from ..schedule import BDF2, COMPUTE, FORECAST, FORECAST2, REUSE, TAYLORSEER2, PlanValue
from ._plan import check_alpha, check_fraction, fora_plan, interval_plan, uniform_plan, warmup_plan
from .auto import open_loop_schedule
from .fitted import fit_forecasts
from .guidance import guidance_for_compute_fraction, guidance_from_calibration, tune_guidance
from .optimal import optimal_schedule
from .smoothcache import for_compute_fraction, from_calibration, smoothcache_rule
from .tuned import tune
from .uniform import fora, uniform_schedule

__all__ = [
    "BDF2",
    "COMPUTE",
    "FORECAST",
    "FORECAST2",
    "REUSE",
    "TAYLORSEER2",
    "PlanValue",
    "check_alpha",
    "check_fraction",
    "fit_forecasts",
    "for_compute_fraction",
    "fora",
    "fora_plan",
    "from_calibration",
    "guidance_for_compute_fraction",
    "guidance_from_calibration",
    "interval_plan",
    "open_loop_schedule",
    "optimal_schedule",
    "smoothcache_rule",
    "tune",
    "tune_guidance",
    "uniform_plan",
    "uniform_schedule",
    "warmup_plan",
]
