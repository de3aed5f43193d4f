"""Calibration-free uniform schedules: FORA (compute every i-th step) and even spacing for any
compute fraction. The baselines every other policy must beat, and what the speed benchmarks use."""

from __future__ import annotations

from collections.abc import Sequence

from ..schedule import Schedule
from ._plan import fora_plan, uniform_plan

__all__ = ["fora", "uniform_schedule"]


def _schedule(num_steps: int, plan: tuple[int, ...], types: Sequence[str] | None, meta: dict) -> Schedule:
    keys = ("*",) if types is None else tuple(types)
    return Schedule(num_steps, dict.fromkeys(keys, plan), meta=meta)


def fora(
    num_steps: int, interval: int, *, types: Sequence[str] | None = None, forecast: bool = False
) -> Schedule:
    """FORA's uniform schedule: compute every ``interval``-th step (and the last), reuse between
    (or, with ``forecast=True``, extrapolate from the last two computed outputs).

    By default one plan for every discovered component (the pattern ``*``), so the schedule fits
    any model; ``types`` restricts it to those component types.
    """
    sched = _schedule(
        num_steps, fora_plan(num_steps, interval), types, {"rule": "fora", "interval": interval}
    )
    return sched.with_forecast() if forecast else sched


def uniform_schedule(
    num_steps: int, fraction: float, *, types: Sequence[str] | None = None, forecast: bool = False
) -> Schedule:
    """About ``fraction`` of the steps computed, evenly spaced, first and last included."""
    meta = {"rule": "uniform", "target_compute_fraction": float(fraction)}
    sched = _schedule(num_steps, uniform_plan(num_steps, fraction), types, meta)
    return sched.with_forecast() if forecast else sched
