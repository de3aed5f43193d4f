"""Policies: how a calibration (or a few replays) becomes a :class:`~stepcache.Schedule`.

One module per policy, all returning a plain Schedule and sharing the plan builders of
:mod:`._plan` and the plan values of :class:`~stepcache.schedule.PlanValue`:

* :mod:`.smoothcache`: SmoothCache's threshold rule (by alpha, or by compute fraction);
* :mod:`.uniform`: calibration-free FORA and evenly spaced schedules;
* :mod:`.optimal`: the exact least-error schedule for a budget (dynamic programming + knapsack);
* :mod:`.tuned`: closed loop, the candidate whose final samples stay closest to uncached.
"""

from ..schedule import BDF2, COMPUTE, FORECAST, FORECAST2, REUSE, PlanValue
from ._plan import check_fraction, fora_plan, interval_plan, uniform_plan, warmup_plan
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
    "PlanValue",
    "check_fraction",
    "for_compute_fraction",
    "fora",
    "fora_plan",
    "from_calibration",
    "interval_plan",
    "optimal_schedule",
    "smoothcache_rule",
    "tune",
    "uniform_plan",
    "uniform_schedule",
    "warmup_plan",
]
