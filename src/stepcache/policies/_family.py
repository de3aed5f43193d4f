"""The family of structured candidate placements ``tune`` replays and the open loop ranks.

Every candidate computes exactly the computations a budget buys (the one rounding rule, split over
component types): warm-ups, even spacing, fixed intervals with phases, TaylorSeer's placement
(computations right after the warm-up, then every ``i``-th step) with none, the last or the last two
steps computed. Labels name the placement; :mod:`.tuned` documents the family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from ..calibration import Calibration
from ..discovery import discover
from ..errors import ScheduleError, StepCacheError
from ..schedule import COMPUTE, Schedule
from ._plan import budget_calls, interval_plan, offset_plan, spaced_plan, split_computes, warmup_plan

__all__ = [
    "FAMILIES",
    "candidate_plans",
    "candidate_schedules",
    "computes_per_type",
    "forecast_variants",
    "type_layers",
]

FAMILIES = ("full", "classic")


def type_layers(target: Any, calibration: Calibration | None = None) -> dict[str, int]:
    """Component type -> layers, in the order types are found (the calibration's, else the model's);
    ``{"*": 1}`` when neither tells (then every component follows one plan)."""
    if calibration is not None:
        names = list(calibration.components.values())
    else:
        try:
            names = [c.type for c in discover(target)]
        except StepCacheError:
            return {"*": 1}
    return {t: names.count(t) for t in dict.fromkeys(names)} or {"*": 1}


def computes_per_type(fraction: float, n: int, layers: Mapping[str, int]) -> dict[str, int]:
    """Computations per component type that ``fraction`` of ``n`` steps buys: the one rounding rule
    (:func:`~._plan.budget_calls`) met per type; when the calls do not split into a whole number of
    computations per type, some types compute once more than others."""
    return split_computes(budget_calls(fraction, n * sum(layers.values())), n, dict(layers), first=2)


def forecast_variants(candidates: Mapping[str, Schedule], forecasts: tuple[str, ...]) -> dict[str, Schedule]:
    """Every candidate with each of ``forecasts`` on its reused steps; the first-order one keeps its
    label, the others name their forecast in place of "forecast" (``..., taylor2``, ``..., copy``)."""
    return {
        (label if f == "first-order" else label.replace(", forecast", f", {f}")): s.with_forecast(f)
        for label, s in candidates.items()
        for f in forecasts
    }


def _spend(plan: tuple[int, ...], computes: int) -> tuple[int, ...]:
    """``plan`` with its unspent computations (below ``computes``) moved onto its last reused steps."""
    out = list(plan)
    left = computes - out.count(COMPUTE)
    for s in range(len(out) - 1, -1, -1):
        if left <= 0:
            break
        if out[s] != COMPUTE:
            out[s], left = COMPUTE, left - 1
    return tuple(out)


def _warmups(computes: int, top: int) -> list[int]:
    grid = [*range(1, 9), 10, 12, 15, 20, 25, 30, 40]
    return [w for w in grid if w <= min(top, max(1, computes - 2))]  # 2 computations: warm-up 1 and one more


def candidate_plans(n: int, computes: int, top: int, family: str = "full") -> dict[str, tuple[int, ...]]:
    """The family's plans (label -> plan of one component type), distinct, each computing exactly
    ``computes`` of ``n`` steps, with warm-ups up to ``top`` (see the module doc). A placement whose
    interval leaves computations unspent computes its last steps with them: a budget is spent, not
    left on the table."""
    if family not in FAMILIES:
        raise ScheduleError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {family!r}.")
    out: dict[str, tuple[int, ...]] = {}
    seen: set[tuple[int, ...]] = set()

    def offer(label: str, build: Callable[[], tuple[int, ...]]) -> None:
        with contextlib.suppress(ScheduleError):  # this variant does not fit the budget
            plan = _spend(build(), computes)
            if plan not in seen and plan.count(COMPUTE) == computes:
                seen.add(plan)
                out[label] = plan

    warmups = _warmups(computes, top)
    for w in warmups:
        offer(f"warm-up {w}, even to the end, forecast", partial(warmup_plan, n, computes, w))
        for phase in range(3):
            offer(
                f"warm-up {w}, every i-th (phase {phase}), forecast",
                partial(interval_plan, n, computes, w, phase),
            )
    if family == "classic":
        return out
    for w in warmups:
        offer(f"warm-up {w}, even, last 2 computed, forecast", partial(spaced_plan, n, computes, w, 2))
        for offset in range(2):
            for tail in range(3):
                last = {0: "", 1: ", last computed", 2: ", last 2 computed"}[tail]
                offer(
                    f"warm-up {w}, first at +{offset} then every i-th{last}, forecast",
                    partial(offset_plan, n, computes, w, offset, tail),
                )
    return out


def candidate_schedules(
    n: int, per_type: Mapping[str, int], layers: Mapping[str, int], top: int, family: str = "full"
) -> dict[str, Schedule]:
    """The family's candidates as schedules (label -> Schedule): each component type computes
    ``per_type[type]`` of ``n`` steps with the same labelled placement (one plan for all when the
    types compute equally often); labels some type's budget cannot realise are left out."""
    families = {c: candidate_plans(n, c, top, family) for c in set(per_type.values())}
    computes = min(per_type.values())
    if len(families) == 1:  # one plan for every component (the common case)
        return {label: Schedule(n, {"*": plan}) for label, plan in families[computes].items()}
    return {
        label: Schedule(n, {t: families[c][label] for t, c in per_type.items()}, dict(layers))
        for label in families[computes]
        if all(label in families[c] for c in per_type.values())
    }
