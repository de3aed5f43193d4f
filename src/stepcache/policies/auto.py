"""The open-loop policy of caching without a schedule: :func:`open_loop_schedule`.

:mod:`stepcache.auto` (``stepcache.cache(pipe, compute_fraction=0.5)``) turns each stored calibration
into a schedule through this one function, so the policy it uses is chosen in one place.
"""

from __future__ import annotations

from ..calibration import Calibration
from ..schedule import Schedule
from .optimal import optimal_schedule

__all__ = ["open_loop_schedule"]


def open_loop_schedule(calibration: Calibration, fraction: float) -> Schedule:
    """The best open-loop schedule for ``calibration`` at compute ``fraction``: today the optimal
    policy (:func:`~stepcache.policies.optimal_schedule`, its defaults).

    Raises:
        ScheduleError: the fraction is out of (0, 1], or out of the calibration's reach.
    """
    return optimal_schedule(calibration, fraction)
