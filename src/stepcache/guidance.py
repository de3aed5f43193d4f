"""Guidance-aware caching's plan value: where a component stands in for its unconditional branch.

Under classifier-free guidance a denoiser evaluates every step twice, for the conditional and the
unconditional input, and the two drift differently from step to step. A plain schedule reuses both
branches at the same steps. Two finer moves are possible at a step the schedule computes:

* **per-branch reuse** (``mode="reuse"``): compute the conditional branch, reuse the unconditional
  branch's output of the last full computation: half the work of that component at that step;
* **guidance-difference reuse** (``mode="difference"``): compute the conditional branch and stand in
  for the unconditional one with ``cond_now + (uncond - cond)`` of the last full computation, the
  reuse FasterCache (arXiv 2410.19355) applies to the whole model output, here per component.

:func:`stepcache.calibration.calibrate_guidance` measures, per component, step and gap ``j``, the relative L1 error of each
stand-in and of copying either branch (:class:`GuidanceCalibration`); :class:`GuidanceReuse` is the
static plan (per component, per step: stand in for the unconditional branch or not), built from the
calibration by a threshold or a compute fraction on top of any :class:`~stepcache.Schedule`, and
applied with ``stepcache.cache(pipe, schedule, guidance=plan)``.

The runtime part is :mod:`stepcache.runtime.guided`. Eager calls only (under ``torch.compile`` the
first compiled call raises a clear error), no ``storage_dtype``/``offload`` with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._hub import HubValue
from ._io import check_format_version, is_int, kind_of
from .discovery import Component
from .errors import ScheduleError
from .schedule import COMPUTE, Schedule, match_keys

__all__ = ["KINDS", "KIND_OF_MODE", "LAYOUTS", "MODES", "GuidanceReuse", "check_layout", "check_mode"]

#: How a pipeline passes the guidance branches: one call on ``[cond; uncond]`` or ``[uncond; cond]``,
#: or two calls per step.
LAYOUTS = ("cond-first", "uncond-first", "split")
#: What stands in for the unconditional branch: the guidance difference, or its last output.
MODES = ("difference", "reuse")

#: What a guidance calibration measures, along its last axis: copying the conditional output,
#: copying the unconditional output (per-branch reuse), and the guidance-difference stand-in.
KINDS = ("cond", "uncond", "difference")
#: The stand-in each mode uses, as an index into :data:`KINDS`.
KIND_OF_MODE = {"reuse": 1, "difference": 2}


_FORMAT = "stepcache-guidance-reuse"
_FORMAT_VERSION = 1
_FIELDS = {"format", "format_version", "num_steps", "mode", "layout", "uncond_branch", "plans", "meta"}


def check_layout(layout: Any) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ScheduleError(
            f"layout must be one of {list(LAYOUTS)} (how the pipeline passes the guidance branches: stacked "
            f"in one batch, conditional half first or unconditional first, or as two calls), got {layout!r}."
        )
    return str(layout)


def check_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ScheduleError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    return str(mode)


@dataclass(frozen=True)
class GuidanceReuse(HubValue):
    """Where each component stands in for its unconditional branch: ``plans[key][s]`` is True at the
    steps ``s`` where it computes the conditional branch only. A key is a component name, a
    ``fnmatch`` pattern or a component type, as in :class:`~stepcache.Schedule`.

    Only steps at which the schedule computes matter (a reuse step reuses both branches anyway), and a
    step with nothing kept from a full computation before it computes in full.
    """

    num_steps: int
    plans: dict[str, tuple[bool, ...]]
    mode: str = "difference"
    layout: str = "cond-first"
    uncond_branch: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    _what: ClassVar[str] = "guidance reuse plan"
    _error: ClassVar[type] = ScheduleError
    _default_file: ClassVar[str] = "stepcache_guidance.json"

    def __post_init__(self) -> None:
        check_mode(self.mode)
        check_layout(self.layout)
        if not is_int(self.num_steps) or self.num_steps < 2:
            raise ScheduleError(f"num_steps must be an integer >= 2, got {self.num_steps!r}.")
        if not is_int(self.uncond_branch) or self.uncond_branch not in (0, 1):
            raise ScheduleError(f"uncond_branch must be the integer 0 or 1, got {self.uncond_branch!r}.")
        if not isinstance(self.plans, Mapping):
            raise ScheduleError(f"plans must map selectors to per-step plans, got {kind_of(self.plans)}.")
        plans = {}
        for key, plan in self.plans.items():
            if not isinstance(key, str) or not key:
                raise ScheduleError(f"guidance plan keys must be non-empty strings, got {key!r}.")
            if isinstance(plan, (str, bytes, Mapping, set, frozenset)) or not isinstance(plan, Iterable):
                raise ScheduleError(
                    f"guidance plan {key!r} must be a list of per-step flags, got {kind_of(plan)}."
                )
            values = tuple(plan)
            for step, v in enumerate(values):
                if not _is_flag(v):
                    raise ScheduleError(
                        f"guidance plan {key!r} may hold only True/False (1/0); step {step} is {kind_of(v)}."
                    )
            if len(values) != self.num_steps:
                raise ScheduleError(
                    f"guidance plan {key!r} has {len(values)} steps, the plan is for {self.num_steps}."
                )
            plans[key] = tuple(bool(v) for v in values)
        if not isinstance(self.meta, Mapping) or not all(isinstance(k, str) for k in self.meta):
            raise ScheduleError(f"meta must map strings to values, got {self.meta!r}.")
        object.__setattr__(self, "plans", plans)
        object.__setattr__(self, "uncond_branch", int(self.uncond_branch))
        object.__setattr__(self, "meta", dict(self.meta))

    # ---------------------------------------------------------------- reading
    def resolve(self, components: Iterable[Component]) -> dict[str, tuple[bool, ...]]:
        """Component name -> plan, for the components these plans cover (a key matching none raises)."""
        keys = match_keys(self.plans, components)
        out = {name: self.plans[key] for name, key in keys.items()}
        used = set(keys.values())
        unused = sorted(set(self.plans) - used)
        if unused:
            raise ScheduleError(
                f"guidance plan keys {unused[:3]} match none of the cached components; build the plan "
                "from a guidance calibration of this model."
            )
        return out

    def compute_fraction(self, schedule: Schedule, components: Iterable[Component]) -> float:
        """The compute fraction of ``schedule`` with these stand-ins (each counts half a call)."""
        components = list(components)
        plans = schedule.resolve(components)
        skips = self.resolve(c for c in components if c.name in plans)
        total = executed = 0.0
        for name, plan in plans.items():
            skip = skips.get(name, (False,) * len(plan))
            total += len(plan)
            executed += sum(1.0 - 0.5 * skip[s] for s, v in enumerate(plan) if v == COMPUTE)
        return executed / total if total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "num_steps": self.num_steps,
            "mode": self.mode,
            "layout": self.layout,
            "uncond_branch": self.uncond_branch,
            "plans": {k: [int(v) for v in p] for k, p in self.plans.items()},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "guidance reuse plan") -> GuidanceReuse:
        """The plan in a dict read from a file written by :meth:`save` (:meth:`to_dict`).

        Strict like a schedule file: exact JSON types (plan entries are the integers 0 and 1, never
        ``true``, ``0.5`` or ``"1"``), unknown fields and newer format versions refused.

        Raises:
            ScheduleError: naming ``source`` and the field that is wrong.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ScheduleError(
                f'{source} is not a stepcache guidance reuse plan (no "format": "{_FORMAT}").'
            )
        check_format_version(data, source, ScheduleError, _FORMAT_VERSION)
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ScheduleError(f"{source} has unknown field(s) {unknown}; expected {sorted(_FIELDS)}.")
        missing = [f for f in ("num_steps", "plans") if f not in data]
        if missing:
            raise ScheduleError(f"{source} is missing field(s) {missing}.")
        for name, kind in (("plans", dict), ("meta", dict), ("mode", str), ("layout", str)):
            if name in data and not isinstance(data[name], kind):
                want = "a JSON object" if kind is dict else "a string"
                raise ScheduleError(f"{source}: field {name!r} must be {want}, got {kind_of(data[name])}.")
        for key, plan in data["plans"].items():
            if not isinstance(plan, list):
                raise ScheduleError(
                    f"{source}: plans[{key!r}] must be an array of 0 and 1, got {kind_of(plan)}."
                )
            bad = next((s for s, v in enumerate(plan) if not is_int(v) or v not in (0, 1)), None)
            if bad is not None:
                raise ScheduleError(
                    f"{source}: plans[{key!r}] may hold only the integers 0 and 1; step {bad} is "
                    f"{kind_of(plan[bad])}."
                )
        try:
            return cls(
                num_steps=data["num_steps"],
                plans={k: tuple(p) for k, p in data["plans"].items()},
                mode=data.get("mode", "difference"),
                layout=data.get("layout", "cond-first"),
                uncond_branch=data.get("uncond_branch", 1),
                meta=data.get("meta", {}),
            )
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None


def _is_flag(value: Any) -> bool:
    """True/False, 0/1 (numpy's too): what a per-step guidance flag may be; not 0.5, "1" or -1."""
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":
        return True
    return is_int(value) and value in (0, 1)
