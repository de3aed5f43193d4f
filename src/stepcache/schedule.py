"""Static caching schedules: which component computes at which denoising step.

A :class:`Schedule` is a plain, versioned, serialisable value: the data that flows from a policy
(:mod:`stepcache.policies`) to the runtime (:mod:`stepcache.runtime`). Each entry maps a *selector*
to a per-step plan of :class:`PlanValue` s (``1`` = compute and store, ``0`` = reuse the stored
output, ``2`` = forecast it from the last two computed outputs by first-order extrapolation, ``3`` =
forecast it from the last three by second-order (quadratic) extrapolation, ``4`` = forecast it along
the tangent of a second-order backward difference (BDF2-style), ``5`` = forecast it by TaylorSeer's
second-order Taylor series; :func:`forecast_coefficients` gives the weights). A selector is one of

* a component type (``attn``, ``cross_attn``, ``ff``, ``block``): every component of that type;
* a qualified component name (``transformer_blocks.3.ff``): that component only;
* a glob pattern (``single_transformer_blocks.*.attn``).

When a schedule is applied, each component takes the most specific selector that matches it
(exact name, then pattern, then type); components that match none are not cached; a selector that
matches no component is an error (the original package ignores such keys silently).
"""

from __future__ import annotations

import enum
import fnmatch
import itertools
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ._hub import HubValue
from ._io import (
    SCHEDULE_FILE,
    check_format_version,
    is_int,
    is_number,
    kind_of,
    read_json,
    write_json,
)
from ._version import __version__
from .discovery import COMPONENT_TYPES, Component
from .errors import ScheduleError, StepCacheError

__all__ = [
    "BDF2",
    "COMPUTE",
    "FORECAST",
    "FORECAST2",
    "FORECASTS",
    "METHODS",
    "REUSE",
    "TAYLORSEER2",
    "PlanValue",
    "Schedule",
    "forecast_coefficients",
    "forecast_sources",
    "liveness",
    "reads",
]


class PlanValue(enum.IntEnum):
    """What a component does at one step. Plans store the plain integers (JSON files stay readable)."""

    REUSE = 0  # return the output kept from the last computed step
    COMPUTE = 1  # run the component and keep its output
    FORECAST = 2  # extrapolate (first order) from the last two kept outputs
    FORECAST2 = 3  # extrapolate (second order, Lagrange/Newton) from the last three kept outputs
    BDF2 = 4  # step along the BDF2 (three-point backward difference) derivative at the last output
    TAYLORSEER2 = 5  # second-order Taylor series with backward-difference derivatives (TaylorSeer's order 2)


COMPUTE, REUSE, FORECAST = int(PlanValue.COMPUTE), int(PlanValue.REUSE), int(PlanValue.FORECAST)
FORECAST2, BDF2 = int(PlanValue.FORECAST2), int(PlanValue.BDF2)
TAYLORSEER2 = int(PlanValue.TAYLORSEER2)
FORECASTS = (FORECAST, FORECAST2, BDF2, TAYLORSEER2)  # the plan values that extrapolate
# Forecast method names (calibration tables, with_forecast, meta) -> plan value.
METHODS = {"first-order": FORECAST, "taylor2": FORECAST2, "bdf2": BDF2, "taylorseer2": TAYLORSEER2}
_VALUES = (REUSE, COMPUTE, *FORECASTS)
_SYMBOLS = {COMPUTE: "#", REUSE: ".", FORECAST: "~", FORECAST2: "^", BDF2: "b", TAYLORSEER2: "t"}


def reads(value: int) -> int:
    """How many earlier computed outputs a step with plan value ``value`` reads beyond the last one
    (``-1`` for a compute, 0 for a copy, 1 for a first-order forecast, 2 for the second-order ones)."""
    return {COMPUTE: -1, REUSE: 0, FORECAST: 1, FORECAST2: 2, BDF2: 2, TAYLORSEER2: 2}[value]


def liveness(plan: tuple[int, ...]) -> tuple[list[int], int]:
    """How many computed outputs a plan keeps, and when: ``(held, history)``.

    ``held[s]`` (for a computing step ``s``): how many outputs the component's store holds after it,
    0 to 3: the one just computed and the most recent earlier ones, as many as some later step
    still reads. A copy (plan value 0) reads the last computed output, a first-order forecast (2)
    the last two, a second-order one (3, 4, 5) the last three; an output is kept from its computation
    until the computation after the last interval that reads it. So an output nothing reads is never
    stored, an all-compute step stores nothing, and a plan of copies keeps one output, of first-order
    forecasts two, of second-order forecasts three. For a reusing step, ``held[s]`` is what a
    computation there keeps when nothing is stored to reuse (1 if the next step reuses, else 0).

    ``history``: the most earlier outputs any step of the plan reads (0 copies only, 1 first order,
    2 second order): what a compiled graph keeps at every step. The runtime's slots,
    :func:`stepcache.memory.predict_peak` and the offload schedule all follow this one rule.
    """
    n = len(plan)
    history = max((reads(v) for v in plan if v != COMPUTE), default=0)
    computes = [s for s, v in enumerate(plan) if v == COMPUTE]
    deepest = []  # per compute: the most earlier outputs a step before the next compute reads (-1: none)
    for i, a in enumerate(computes):
        end = computes[i + 1] if i + 1 < len(computes) else n
        deepest.append(max((reads(plan[u]) for u in range(a + 1, end)), default=-1))
    # The last interval (indexed by the compute that opens it) that reads compute i's output.
    last = [
        max((j for j in range(i, min(i + 3, len(computes))) if deepest[j] >= j - i), default=-1)
        for i in range(len(computes))
    ]
    held = [int(s + 1 < n and plan[s + 1] != COMPUTE) for s in range(n)]
    for j, a in enumerate(computes):  # the outputs still read are the most recent ones
        held[a] = sum(1 for i in range(max(0, j - 2), j + 1) if last[i] >= j)
    return held, history


def forecast_coefficients(
    value: int, s: float, a: float, b: float | None = None, c: float | None = None
) -> tuple[float, float]:
    """Weights ``(alpha, beta)`` of a forecast at step ``s`` from outputs computed at ``a > b > c``:
    ``o_s ~ o_a + alpha (o_a - o_b) + beta (o_b - o_c)``, exact in step index for any gaps:

    * ``FORECAST`` (first order, TaylorSeer's order 1): the line through ``a`` and ``b``:
      ``alpha = (s - a) / (a - b)``, ``beta = 0``.
    * ``FORECAST2`` (second order): the parabola through ``a, b, c`` (Lagrange, or Newton's divided
      differences ``o_a + (s-a) D1 + (s-a)(s-b) D2``): exact for outputs quadratic in the step index.
      ``alpha = w_a - 1``, ``beta = -w_c`` with the Lagrange weights ``w_a = (s-b)(s-c)/((a-b)(a-c))``,
      ``w_c = (s-a)(s-b)/((a-c)(b-c))``.
    * ``BDF2``: one step along the derivative at ``a`` of that parabola, the three-point backward
      difference of BDF2 (``(3 o_a - 4 o_b + o_c) / 2h`` for equal gaps ``h``):
      ``o_a + (s-a) (D1 + (a-b) D2)``. Exact for lines, not for parabolas: it keeps the curvature
      term of the derivative but not the ``(s-a)^2`` one, a damped second-order forecast.
    * ``TAYLORSEER2``: the Taylor series ``o_a + k D1 + k^2 D2 / 2`` (``k = s - a``) with TaylorSeer's
      backward-difference derivatives, ``D1 = (o_a - o_b) / h1`` and ``D2 = (D1 - (o_b - o_c) / h2) / h1``
      (``h1 = a - b``, ``h2 = b - c``): ``alpha = k / h1 + k^2 / (2 h1^2)``, ``beta = -k^2 / (2 h1 h2)``.
      Not exact on parabolas (its ``D1`` is the slope at ``a - h1/2``, not at ``a``): between first
      order and the Lagrange parabola, it is what diffusers' ``TaylorSeerCacheConfig(max_order=2)``
      computes, so a stepcache placement with it reproduces TaylorSeer order 2 exactly; and it is
      often the better forecast when computations are two or more steps apart (docs/policies.md).

    Missing history degrades: a second-order value without ``c`` is first order, any forecast
    without ``b`` is a copy (``(0, 0)``), as the runtime does at the start of a generation.
    """
    if value in (COMPUTE, REUSE) or b is None:
        return 0.0, 0.0
    h1 = a - b
    if value == FORECAST or c is None:
        return (s - a) / h1, 0.0
    h2 = b - c
    if value == FORECAST2:
        w_a = (s - b) * (s - c) / (h1 * (h1 + h2))
        w_c = (s - a) * (s - b) / ((h1 + h2) * h2)
        return w_a - 1.0, -w_c
    if value == BDF2:
        return (s - a) * (2 * h1 + h2) / (h1 * (h1 + h2)), -(s - a) * h1 / (h2 * (h1 + h2))
    if value == TAYLORSEER2:
        k = s - a
        return k / h1 + k * k / (2 * h1 * h1), -k * k / (2 * h1 * h2)
    raise ScheduleError(f"{value!r} is not a plan value.")


def forecast_sources(plan: Sequence[int]) -> Iterator[tuple[int, int, int, int | None, int | None]]:
    """``(s, value, a, b, c)`` for every step ``s`` of ``plan`` that does not compute, once some step
    before it has: its last three computed steps ``a > b > c`` (``b``, ``c`` None where fewer), what
    :func:`forecast_coefficients` extrapolates from. The one walk the runtime's slots, the response's
    prediction and the fit's first-order gains share."""
    a: int | None = None
    b: int | None = None
    c: int | None = None
    for s, v in enumerate(plan):
        if v == COMPUTE:
            a, b, c = s, a, b
        elif a is not None:
            yield s, v, a, b, c


Gains = tuple[tuple[float, float], ...]


def _check_gains(gains: Any, num_steps: int) -> Gains | dict[str, Gains] | None:
    """``gains`` as ``num_steps`` pairs of finite floats, or a mapping selector -> such pairs (None
    stays None)."""
    if gains is None:
        return None
    if isinstance(gains, Mapping):
        if not gains:
            raise ScheduleError("gains by selector need at least one selector (or pass gains=None).")
        out: dict[str, Gains] = {}
        for key, rows in gains.items():
            if not isinstance(key, str) or not key:
                raise ScheduleError(f"gains keys must be non-empty strings (selectors), got {key!r}.")
            try:
                out[key] = _check_gain_rows(rows, num_steps)
            except ScheduleError as e:
                raise ScheduleError(f"gains[{key!r}]: {e}") from None
        return out
    return _check_gain_rows(gains, num_steps)


def _check_gain_rows(gains: Any, num_steps: int) -> Gains:
    want = f"gains must be {num_steps} pairs (g_alpha, g_beta) of finite numbers, one per step"
    if isinstance(gains, (str, bytes, Mapping)) or not isinstance(gains, Iterable):
        raise ScheduleError(f"{want}; got {kind_of(gains)}.")
    out = []
    for pair in gains:
        if isinstance(pair, (str, bytes, Mapping)) or not isinstance(pair, Iterable):
            raise ScheduleError(f"{want}; got {pair!r}.")
        pair = tuple(pair)
        if len(pair) != 2 or not all(is_number(g) and math.isfinite(g) for g in pair):
            raise ScheduleError(f"{want}; got {pair!r}.")
        out.append((float(pair[0]), float(pair[1])))
    if len(out) != num_steps:
        raise ScheduleError(f"{want}; got {len(out)}.")
    return tuple(out)


_FORMAT = "stepcache.schedule"
# 2: plans may hold second-order forecasts (3, 4); 3: forecast gains per step; 4: gains per selector
_FORMAT_VERSION = 4
_FIELDS = {"format", "format_version", "stepcache_version", "num_steps", "plans", "counts", "meta", "gains"}
# Keys of the original SmoothCache package: child names, optionally with a block index ("attn1-3").
_SMOOTHCACHE_KEY = re.compile(r"^(?P<child>[A-Za-z_][A-Za-z0-9_]*)(?:-(?P<index>\d+))?$")
# Our type -> the child name the original package uses for diffusers' BasicTransformerBlock.
SMOOTHCACHE_NAMES = {"attn": "attn1", "cross_attn": "attn2", "ff": "ff"}


@dataclass(frozen=True)
class Schedule(HubValue):
    """Per-step compute/reuse plans keyed by selector (type, component name or glob pattern).

    Attributes:
        num_steps: denoising steps the plans cover.
        plans: selector -> tuple of plan values, one per step: ``1`` compute, ``0`` reuse, ``2``
            first-order forecast, ``3`` second-order forecast, ``4`` BDF2-style forecast, ``5``
            TaylorSeer-style second-order forecast (:class:`PlanValue`).
        counts: selector -> number of components it stood for when it was made; weights
            :attr:`compute_fraction`. Missing selectors count once.
        meta: provenance (rule, alpha, granularity, calibration fingerprint, model class, ...).
        gains: per step, ``(g_alpha, g_beta)`` multiplying the forecast weights ``(alpha, beta)`` of
            :func:`forecast_coefficients` at that step, for every component; or a mapping selector
            (component name, glob pattern or type, as in ``plans``) -> such per-step pairs, for the
            components it selects (components no selector names keep the plain weights). ``None``:
            all 1. Chosen on final samples by :func:`stepcache.fit_forecasts`; the fixed
            Taylor/Lagrange weights predict features, not what a forecast does to the image
            (docs/policies.md).
    """

    _what: ClassVar[str] = "schedule"
    _error: ClassVar[type[StepCacheError]] = ScheduleError
    _default_file: ClassVar[str] = SCHEDULE_FILE

    num_steps: int
    plans: Mapping[str, tuple[int, ...]]
    counts: Mapping[str, int] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    gains: Sequence[Sequence[float]] | Mapping[str, Sequence[Sequence[float]]] | None = None

    def __post_init__(self) -> None:
        if not is_int(self.num_steps) or self.num_steps < 1:
            raise ScheduleError(f"num_steps must be a positive integer, got {self.num_steps!r}.")
        if not isinstance(self.plans, Mapping) or not self.plans:
            raise ScheduleError("a schedule needs at least one entry (selector -> per-step plan).")
        plans: dict[str, tuple[int, ...]] = {}
        for key, plan in self.plans.items():
            if not isinstance(key, str) or not key:
                raise ScheduleError(f"schedule keys must be non-empty strings, got {key!r}.")
            plans[key] = _check_plan(key, plan, self.num_steps)
        if not isinstance(self.counts, Mapping):
            raise ScheduleError(f"counts must map selectors to numbers of components, got {self.counts!r}.")
        counts: dict[str, int] = {}
        for key, count in self.counts.items():
            if key not in plans:
                raise ScheduleError(f"counts names {key!r}, which has no plan in the schedule.")
            if not is_int(count) or count < 1:
                raise ScheduleError(
                    f"counts[{key!r}] must be a positive integer (components the selector stands for), "
                    f"got {count!r}."
                )
            counts[key] = int(count)
        if not isinstance(self.meta, Mapping) or not all(isinstance(k, str) for k in self.meta):
            raise ScheduleError(f"meta must map strings to values, got {self.meta!r}.")
        lookahead = self.meta.get("lookahead")
        if lookahead is not None and (not is_int(lookahead) or lookahead < 1):
            raise ScheduleError(f'meta "lookahead" must be a positive integer, got {lookahead!r}.')
        alpha = self.meta.get("alpha")
        if alpha is not None and (not is_number(alpha) or not alpha >= 0):
            raise ScheduleError(f'meta "alpha" must be a number >= 0, got {alpha!r}.')
        object.__setattr__(self, "plans", plans)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "meta", dict(self.meta))
        object.__setattr__(self, "gains", _check_gains(self.gains, self.num_steps))

    # ---------------------------------------------------------------- properties
    @property
    def compute_fraction(self) -> float:
        """Executed component calls / all component calls over one run (weighted by ``counts``)."""
        total = executed = 0
        for key, plan in self.plans.items():
            w = self.counts.get(key, 1)
            total += w * self.num_steps
            executed += w * plan.count(COMPUTE)
        return executed / total

    def with_forecast(self, method: str = "first-order") -> Schedule:
        """The same compute steps, with every step that does not compute forecast by ``method``.

        ``method``: ``"first-order"`` (plan value 2, the default), ``"taylor2"`` (3: second-order
        extrapolation from the last three computed outputs), ``"bdf2"`` (4), ``"taylorseer2"`` (5:
        TaylorSeer's order 2, see :func:`forecast_coefficients`) or ``"copy"`` (0: reuse the
        last output, no forecast). Steps that already forecast are converted too, so
        ``tuned.with_forecast("taylor2")`` is the tuned placement with second-order forecasts
        everywhere. Where fewer outputs have been computed yet, the runtime falls back to a lower
        order (first order, then a copy). Second-order methods keep three outputs per component
        instead of two (docs/memory.md).
        """
        if method != "copy" and method not in METHODS:
            raise ScheduleError(f"method must be one of {[*METHODS, 'copy']}, got {method!r}.")
        fill = REUSE if method == "copy" else METHODS[method]
        plans = {k: tuple(v if v == COMPUTE else fill for v in plan) for k, plan in self.plans.items()}
        return Schedule(self.num_steps, plans, self.counts, {**self.meta, "forecast": method}, self.gains)

    def resample(self, num_steps: int) -> Schedule:
        """The same schedule stretched or squeezed to ``num_steps`` steps.

        The share of computes and their placement over time are kept; the first and last steps stay
        computed; no reuse run exceeds the calibration's lookahead (or, without one, the longest run
        of the original, scaled by the stretch).
        """
        if not is_int(num_steps) or num_steps < 1:
            raise ScheduleError(f"num_steps must be a positive integer, got {num_steps!r}.")
        if num_steps == self.num_steps:
            return self
        scale = (num_steps - 1) / max(self.num_steps - 1, 1)
        plans = {}
        for key, plan in self.plans.items():
            longest = max((len(r) for r in "".join(map(str, plan)).split("1")), default=0)
            bound = int(self.meta.get("lookahead") or max(longest, round(longest * scale)))
            plans[key] = _resample_plan(plan, num_steps, scale, bound)
        meta = {**self.meta, "resampled_from": self.num_steps}
        # Gains were chosen for the steps they name: a stretched schedule runs the plain weights.
        return Schedule(num_steps, plans, self.counts, meta)

    def resolve(self, components: Iterable[Component]) -> dict[str, tuple[int, ...]]:
        """Component name -> plan, for the components this schedule covers.

        Raises:
            ScheduleError: a selector matches no component, or a component matches two patterns.
        """
        components = list(components)
        self.gains_of(components)  # gains selectors must match too
        keys = match_keys(self.plans, components)
        out = {name: self.plans[key] for name, key in keys.items()}
        used = set(keys.values())
        unused = [k for k in self.plans if k not in used]
        if unused:
            names = [c.name for c in components]
            example = names[:3] + (["..."] if len(names) > 3 else [])
            raise ScheduleError(
                f"schedule key(s) {unused} match no component of this model. Keys are component types "
                f"{list(COMPONENT_TYPES)}, component names such as {example}, or glob patterns. "
                "For files of the original SmoothCache package use Schedule.from_smoothcache()."
            )
        return out

    def gains_of(self, components: Iterable[Component]) -> dict[str, Gains | None]:
        """Component name -> its per-step gains (None: the plain weights), for ``components``.

        Raises:
            ScheduleError: a gains selector matches no component, or a component matches two.
        """
        components = list(components)
        if not isinstance(self.gains, Mapping):
            return {c.name: self.gains for c in components}  # type: ignore[misc]
        keys = match_keys(self.gains, components)
        unused = sorted(set(self.gains) - set(keys.values()))
        if unused:
            raise ScheduleError(
                f"gains selector(s) {unused} match no component of this model (gains are keyed like plans: "
                "component names, glob patterns or types)."
            )
        gains: dict[str, Gains] = self.gains  # type: ignore[assignment]  # checked in __post_init__
        return {c.name: gains.get(keys[c.name]) if c.name in keys else None for c in components}

    @property
    def gains_per_selector(self) -> bool:
        """Whether :attr:`gains` are per selector (component) rather than one pair per step for all."""
        return isinstance(self.gains, Mapping)

    # ---------------------------------------------------------------- text
    def render(self) -> str:
        """One line per selector: ``#`` computes, ``.`` reuses (copies), ``~`` forecasts (first order),
        ``^`` forecasts (second order), ``b`` forecasts (BDF2-style), ``t`` forecasts (TaylorSeer-style); step numbers on top."""
        width = max(len(k) for k in self.plans)
        ruler = "".join(str((s // 10) % 10) if s % 10 == 0 else " " for s in range(self.num_steps))
        lines = [f"{'step':<{width}}  {ruler}"]
        for key, plan in self.plans.items():
            bar = "".join(_SYMBOLS[v] for v in plan)
            lines.append(f"{key:<{width}}  {bar}  {plan.count(COMPUTE)}/{self.num_steps}")
        desc = ", ".join(
            f"{k}={v}" for k, v in self.meta.items() if k in ("rule", "alpha", "granularity", "interval")
        )
        target = self.meta.get("target_compute_fraction")
        spent = f"compute fraction {self.compute_fraction:.3f}"
        if target is not None:  # what was asked; what is spent follows policies._plan.budget_calls
            spent += f" (target {target:g})"
        lines.append(spent + (f"  ({desc})" if desc else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            # Files older readers can read stay version 1; second-order values make them say "upgrade".
            "format_version": 4
            if isinstance(self.gains, Mapping)
            else 3
            if self.gains is not None
            else 2
            if any(max(p) > FORECAST for p in self.plans.values())
            else 1,
            "stepcache_version": __version__,
            "num_steps": self.num_steps,
            "plans": {k: list(v) for k, v in self.plans.items()},
            "counts": dict(self.counts),
            "meta": dict(self.meta),
            **({} if self.gains is None else {"gains": _gains_json(self.gains)}),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "schedule") -> Schedule:
        """The schedule in a dict read from a file written by :meth:`save` (:meth:`to_dict`).

        Strict: every field must have its exact JSON type (``1.0``, ``"1"`` and ``true`` are not the
        integer ``1``), values must be in range, and unknown fields are refused rather than dropped.

        Raises:
            ScheduleError: naming ``source`` and the field that is wrong.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ScheduleError(
                f'{source} is not a stepcache schedule (no "format": "{_FORMAT}"). A file of the original '
                "SmoothCache package loads with Schedule.from_smoothcache()."
            )
        check_format_version(data, source, ScheduleError, _FORMAT_VERSION)
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ScheduleError(f"{source} has unknown field(s) {unknown}; expected {sorted(_FIELDS)}.")
        if "num_steps" not in data or "plans" not in data:
            missing = [f for f in ("num_steps", "plans") if f not in data]
            raise ScheduleError(f"{source} is missing field(s) {missing}.")
        for name, kind in (("plans", dict), ("counts", dict), ("meta", dict), ("stepcache_version", str)):
            if name in data and not isinstance(data[name], kind):
                want = "a JSON object" if kind is dict else "a string"
                raise ScheduleError(f"{source}: field {name!r} must be {want}, got {kind_of(data[name])}.")
        try:
            gains = data.get("gains")
            if gains is not None and not isinstance(gains, (list, dict)):
                raise ScheduleError(
                    f"field 'gains' must be a JSON array (per step) or object (per selector), got {kind_of(gains)}."
                )
            return cls(data["num_steps"], data["plans"], data.get("counts", {}), data.get("meta", {}), gains)
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None

    # ---------------------------------------------------------------- the original package's format
    def to_smoothcache(
        self, path: str | Path | None = None, *, names: Mapping[str, str] | None = None
    ) -> dict:
        """The schedule in the original package's format (``{"attn1": [...], "ff-3": [...]}``).

        ``names`` maps our types to the child names the original uses (default: diffusers'
        ``BasicTransformerBlock``: attn -> attn1, cross_attn -> attn2, ff -> ff). Layer selectors
        ``<stack>.<i>.<child>`` become ``<child>-<i>``.
        """
        names = dict(SMOOTHCACHE_NAMES if names is None else names)
        forecasts = sum(plan.count(v) for plan in self.plans.values() for v in FORECASTS)
        if forecasts:
            warnings.warn(
                f"stepcache: the original SmoothCache format has no forecasting; {forecasts} forecast "
                "step(s) of this schedule are written as 0 (reuse), which copies instead of extrapolating.",
                UserWarning,
                stacklevel=2,
            )
        out: dict[str, list[int]] = {}
        for key, plan in self.plans.items():
            if key in names:
                out[names[key]] = [int(v == COMPUTE) for v in plan]
                continue
            m = re.match(r"^.*\.(\d+)\.([A-Za-z_][A-Za-z0-9_]*)$", key)
            if m is None:
                raise ScheduleError(f"{key!r} has no equivalent in the original package's format.")
            out[f"{m.group(2)}-{m.group(1)}"] = [int(v == COMPUTE) for v in plan]
        if path is not None:
            write_json(path, out, what="SmoothCache schedule file", error=ScheduleError)
        return out

    @classmethod
    def from_smoothcache(
        cls,
        source: str | Path | Mapping[str, Sequence[int]],
        *,
        key_map: Mapping[str, str] | None = None,
        stack: str = "transformer_blocks",
    ) -> Schedule:
        """Read the original package's schedule (a file or a dict).

        Its keys are child names (``attn1``, ``ff``, ``mlp``) for every block, or ``<child>-<i>`` for
        block ``i``. ``key_map`` maps a child name to one of our selectors (a type or pattern); by
        default a child name becomes the pattern ``*.<child>``, which matches that child in every block,
        and ``<child>-<i>`` becomes ``<stack>.<i>.<child>``. Keys that match no component of the model
        are reported when the schedule is applied, never ignored.
        """
        data = (
            read_json(source, "SmoothCache schedule", ScheduleError)
            if isinstance(source, (str, Path))
            else source
        )
        if not isinstance(data, Mapping) or not data:
            raise ScheduleError(
                'a SmoothCache schedule is a non-empty JSON object {"attn1": [1, 0, ...], ...}.'
            )
        key_map = dict(key_map or {})
        plans: dict[str, Sequence[int]] = {}
        for key, plan in data.items():
            m = _SMOOTHCACHE_KEY.match(str(key))
            if m is None:
                raise ScheduleError(
                    f"{key!r} is not a SmoothCache key (a child name, or <child>-<block index>)."
                )
            child, index = m.group("child"), m.group("index")
            if index is not None:
                plans[f"{stack}.{index}.{child}"] = plan
            else:
                plans[key_map.get(child, f"*.{child}")] = plan
        lengths = {
            len(p) if isinstance(p, Sequence) and not isinstance(p, str) else -1 for p in plans.values()
        }
        if len(lengths) != 1 or -1 in lengths:
            raise ScheduleError(
                f"SmoothCache schedule plans must be lists of one common length, got lengths {lengths}."
            )
        for key, plan in plans.items():
            if isinstance(plan, Sequence) and any(v not in (0, 1) or not is_int(v) for v in plan):
                raise ScheduleError(
                    f"SmoothCache plan {key!r} may hold only 1 (compute) and 0 (reuse), got {list(plan)!r}."
                )
        return cls(lengths.pop(), {k: tuple(p) for k, p in plans.items()}, meta={"rule": "smoothcache-file"})


def match_keys(keys: Iterable[str], components: Iterable[Component]) -> dict[str, str]:
    """Component name -> the key that selects it: its name, else the one glob pattern it matches,
    else its type (components nothing selects are left out). Shared by every per-component plan
    (:class:`Schedule`, :class:`stepcache.guidance.GuidanceReuse`).

    Raises:
        ScheduleError: a component matches two patterns.
    """
    keys = list(keys)
    patterns = [k for k in keys if any(ch in k for ch in "*?[")]
    out: dict[str, str] = {}
    for comp in components:
        if comp.name in keys:
            out[comp.name] = comp.name
            continue
        hits = [p for p in patterns if fnmatch.fnmatchcase(comp.name, p)]
        if len(hits) > 1:
            raise ScheduleError(f"{comp.name} matches several plan patterns {hits}; make them disjoint.")
        key = hits[0] if hits else (comp.type if comp.type in keys else "")
        if key:
            out[comp.name] = key
    return out


def _gains_json(gains: Any) -> Any:
    if isinstance(gains, Mapping):
        return {k: [list(g) for g in rows] for k, rows in gains.items()}
    return [list(g) for g in gains]


def _check_plan(key: str, plan: Any, num_steps: int) -> tuple[int, ...]:
    """A plan as a tuple of plain ints, or a ScheduleError saying what is wrong with it."""
    if isinstance(plan, (str, bytes, Mapping, set, frozenset)) or not isinstance(plan, Iterable):
        raise ScheduleError(f"plan for {key!r} must be a list of plan values 0-5, got {kind_of(plan)}.")
    values = tuple(plan)
    for step, v in enumerate(values):
        if not is_int(v) or v not in _VALUES:
            raise ScheduleError(
                f"plan for {key!r} may hold only 1 (compute), 0 (reuse), 2 (first-order forecast), 3 "
                f"(second-order forecast), 4 (BDF2-style forecast) and 5 (TaylorSeer-style forecast), as integers; step {step} is "
                f"{kind_of(v) if not is_int(v) else v}."
            )
    if len(values) != num_steps:
        raise ScheduleError(f"plan for {key!r} has {len(values)} steps, the schedule {num_steps}.")
    if values[0] != COMPUTE:
        raise ScheduleError(f"plan for {key!r} reuses at step 0, where nothing is stored yet.")
    return tuple(int(v) for v in values)


def _resample_plan(plan: tuple[int, ...], n: int, scale: float, longest: int) -> tuple[int, ...]:
    """Keep the share of computes, their placement over time and the endpoints; cap reuse runs."""
    target = max(min(n, 2), round(plan.count(COMPUTE) * n / len(plan)))
    picks = sorted({round(s * scale) for s, v in enumerate(plan) if v == COMPUTE})
    if len(picks) > target:  # fewer steps: keep evenly spaced members of the mapped positions
        picks = sorted({picks[round(q * (len(picks) - 1) / max(target - 1, 1))] for q in range(target)})
    while len(picks) < target:  # more steps: split the widest gap
        gaps = [(b - a, a, b) for a, b in itertools.pairwise(picks)]
        width, a, b = max(gaps) if gaps else (0, 0, 0)
        if width < 2:
            break
        picks = sorted({*picks, (a + b) // 2})
    new = [_fill(plan)] * n
    for p in picks:
        new[p] = COMPUTE
    new[0] = new[-1] = COMPUTE
    run = 0
    for s in range(n):
        run = 0 if new[s] == COMPUTE else run + 1
        if run > longest:
            new[s], run = COMPUTE, 0
    return tuple(new)


def _fill(plan: Sequence[int]) -> int:
    """The forecast value a plan's reused steps mostly take (ties: the higher order), REUSE if it
    never forecasts."""
    counts = {v: plan.count(v) for v in FORECASTS if v in plan}
    return max(counts, key=lambda v: (counts[v], v)) if counts else REUSE
