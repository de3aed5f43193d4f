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

from ..errors import ScheduleError
from ..schedule import COMPUTE, Schedule
from ._plan import interval_plan, offset_plan, spaced_plan, warmup_plan

__all__ = ["FAMILIES", "candidate_plans", "candidate_schedules"]

FAMILIES = ("full", "classic")


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
