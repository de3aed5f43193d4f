"""Calibration: how much each component's output changes between denoising steps.

An uncached run records, for every component and step ``s``, the relative L1 change of its output
against ``j = 1..k`` steps earlier, ``e(s, j) = |o_s - o_{s-j}|_1 / |o_s|_1``, per batch item. Items and
guidance branches are averaged within a generation; generations are the samples, averaged with
their spread kept. Only the ``k`` most recent outputs of each component are held, in float32.

A :class:`Calibration` is a plain value: it saves to JSON with the metadata needed to refuse being
applied to a different model, and turns into schedules through :class:`~stepcache.Schedule`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from . import distributed
from ._hub import HubValue
from ._io import CALIBRATION_FILE, check_format_version, is_int, is_number, kind_of
from ._logging import follow_diffusers
from ._version import __version__
from .discovery import COMPONENT_TYPES, Component, denoisers_of, discover
from .errors import CalibrationError, StepCacheError
from .runtime.introspect import count_macs, fingerprint, model_class, weights_state
from .runtime.session import Session
from .runtime.steps import StepTracker
from .schedule import METHODS, forecast_coefficients

__all__ = ["Calibration", "calibrate"]

logger = logging.getLogger(__name__)
_FORMAT = "stepcache.calibration"
_FORMAT_VERSION = 2  # 2 adds second-order forecast errors; files without them are written as 1
SECOND_ORDER = ("taylor2", "bdf2")  # the forecast methods of forecast2_errors, by name (schedule.METHODS)


def _flatten(output: Any) -> torch.Tensor | None:
    """(batch, features) float32 view of a component's output (all tensors of a tuple joined)."""
    if isinstance(output, torch.Tensor):
        tensors = [output]
    elif isinstance(output, (tuple, list)):
        tensors = [o for o in output if isinstance(o, torch.Tensor)]
    else:
        tensors = []
    if not tensors:
        return None
    b = tensors[0].shape[0] if tensors[0].dim() > 0 else 1
    parts = [t.detach().reshape(b, -1).float() for t in tensors if t.dim() > 0 and t.shape[0] == b]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass(frozen=True)
class Calibration(HubValue):
    """Calibrated per-step error curves of every component.

    Attributes:
        num_steps: denoising steps per generation.
        lookahead: ``k``, the largest step distance measured.
        num_samples: generations averaged.
        components: component name -> type, in model order.
        errors: name -> array ``(num_steps, lookahead)``; ``errors[s, j-1]`` is the mean relative L1
            change of the output at step ``s`` against step ``s-j`` (NaN where ``s < j``).
        spread: name -> standard deviation of the same quantity over generations.
        macs: name -> multiply-accumulates of one call, as counted by torch's FLOP counter.
        meta: model class, config fingerprint, scheduler, stepcache version, date.
        forecast_errors: name -> array ``(num_steps, lookahead, lookahead + 1)``;
            ``forecast_errors[s, j-1, m-1]`` is the mean relative L1 error of the first-order forecast of
            step ``s`` from steps ``s-j`` and ``s-j-m`` (empty when calibrated with ``forecast=False``).
        weights: name -> array ``(num_steps,)``: how much one unit of reuse error of that component at
            that step changes the final sample, from :func:`~stepcache.sensitivity` (empty if not run).
        forecast2_errors: method (``"taylor2"``, ``"bdf2"``) -> name -> array
            ``(num_steps, lookahead, lookahead + 1, lookahead + 1)``; ``[s, j-1, m-1, p-1]`` is the mean
            relative L1 error of that method's forecast of step ``s`` from steps ``a = s-j``,
            ``b = a-m`` and ``c = b-p`` (:func:`stepcache.schedule.forecast_coefficients`); empty
            unless calibrated with ``second_order=True``.
    """

    _what: ClassVar[str] = "calibration"
    _error: ClassVar[type[StepCacheError]] = CalibrationError
    _default_file: ClassVar[str] = CALIBRATION_FILE

    num_steps: int
    lookahead: int
    num_samples: int
    components: Mapping[str, str]
    errors: Mapping[str, np.ndarray]
    spread: Mapping[str, np.ndarray] = field(default_factory=dict)
    macs: Mapping[str, float | None] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    forecast_errors: Mapping[str, np.ndarray] = field(default_factory=dict)
    weights: Mapping[str, np.ndarray] = field(default_factory=dict)
    forecast2_errors: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, value, least in (
            ("num_steps", self.num_steps, 2),
            ("lookahead", self.lookahead, 1),
            ("num_samples", self.num_samples, 1),
        ):
            if not is_int(value) or value < least:
                raise CalibrationError(f"{label} must be an integer >= {least}, got {value!r}.")
        if not isinstance(self.components, Mapping) or not self.components:
            raise CalibrationError("a calibration needs at least one component (name -> type).")
        for name, kind in self.components.items():
            if not isinstance(name, str) or not name:
                raise CalibrationError(f"component names must be non-empty strings, got {name!r}.")
            if kind not in COMPONENT_TYPES:
                raise CalibrationError(
                    f"component {name!r} has unknown type {kind!r}; types are {list(COMPONENT_TYPES)}."
                )
        if not isinstance(self.errors, Mapping) or set(self.errors) != set(self.components):
            raise CalibrationError("calibration errors and components name different sets of components.")
        shape = (self.num_steps, self.lookahead)
        for label, table, want, full in (
            ("errors", self.errors, shape, True),
            ("spread", self.spread, shape, False),
            ("forecast errors", self.forecast_errors, (*shape, self.lookahead + 1), True),
            ("weights", self.weights, (self.num_steps,), True),
        ):
            if not isinstance(table, Mapping):
                raise CalibrationError(f"calibration {label} must map component names to arrays.")
            if table and (
                set(table) != set(self.components) if full else not set(table) <= set(self.components)
            ):
                raise CalibrationError(
                    f"calibration {label} and components name different sets of components."
                )
            for name, arr in table.items():
                _check_array(f"{label} of {name}", arr, want, finite=label == "weights")
        if not isinstance(self.forecast2_errors, Mapping) or not set(self.forecast2_errors) <= set(
            SECOND_ORDER
        ):
            raise CalibrationError(
                f"calibration forecast2_errors must map methods {list(SECOND_ORDER)} to tables, got "
                f"{sorted(self.forecast2_errors) if isinstance(self.forecast2_errors, Mapping) else self.forecast2_errors!r}."
            )
        for method, table in self.forecast2_errors.items():
            if not isinstance(table, Mapping) or set(table) != set(self.components):
                raise CalibrationError(
                    f"calibration {method} forecast errors and components name different sets of components."
                )
            for name, arr in table.items():
                _check_array(
                    f"{method} forecast errors of {name}",
                    arr,
                    (*shape, self.lookahead + 1, self.lookahead + 1),
                    finite=False,
                )
        if not isinstance(self.macs, Mapping) or not set(self.macs) <= set(self.components):
            raise CalibrationError("calibration macs name components the calibration does not have.")
        for name, macs in self.macs.items():
            if macs is not None and (not is_number(macs) or not 0 <= macs < math.inf):
                raise CalibrationError(f"macs of {name} must be a finite number >= 0 or None, got {macs!r}.")
        if not isinstance(self.meta, Mapping) or not all(isinstance(k, str) for k in self.meta):
            raise CalibrationError(f"calibration meta must map strings to values, got {self.meta!r}.")

    # ---------------------------------------------------------------- views
    def type_errors(self) -> dict[str, np.ndarray]:
        """Type -> error table averaged over that type's layers (the paper's per-type curves)."""
        return _by_type(self.components, self.errors)

    def type_forecast_errors(self) -> dict[str, np.ndarray]:
        """Type -> forecast error table averaged over that type's layers (empty without forecasts)."""
        return _by_type(self.components, self.forecast_errors)

    def type_forecast2_errors(self) -> dict[str, dict[str, np.ndarray]]:
        """Method -> type -> second-order forecast error table averaged over that type's layers."""
        return {m: _by_type(self.components, t) for m, t in self.forecast2_errors.items()}

    def type_weights(self) -> dict[str, np.ndarray]:
        """Type -> per-step sensitivity weights averaged over that type's layers (empty if none)."""
        return _by_type(self.components, self.weights)

    def replace(self, **changes: Any) -> Calibration:
        """A copy with some fields changed (the dataclass is frozen)."""
        return dataclasses.replace(self, **changes)

    def provenance(self) -> dict[str, Any]:
        """What a schedule made from this calibration records about where it came from."""
        keys = ("model_class", "fingerprint", "dtype", "adapters", "weights_digest", "scheduler")
        return {k: self.meta[k] for k in keys if self.meta.get(k) is not None} | {
            "lookahead": self.lookahead,
            "calibration_samples": self.num_samples,
        }

    def check_model(self, model: nn.Module) -> None:
        """Raise if ``model`` is not the architecture this calibration was recorded on."""
        want, got = self.meta.get("fingerprint"), fingerprint(model)
        if want and want != got:
            raise CalibrationError(
                f"this calibration was recorded on {self.meta.get('model_class')} (fingerprint {want}) but "
                f"the model is {model_class(model)} (fingerprint {got}): recalibrate on this model."
            )

    @classmethod
    def merge(cls, calibrations: Iterable[Calibration | str | Path]) -> Calibration:
        """One calibration of all the generations of ``calibrations`` (values or files), made by
        separate jobs on the same model and setup: per cell the sample-weighted mean and the pooled
        spread, what one job calibrating all their generations records (to float precision).

        A calibration already holds its sufficient statistics, in files of every format version:
        ``num_samples`` and, per cell, the mean (``errors``) and population standard deviation
        (``spread``) over those generations. Every measured cell averages all ``num_samples``
        generations (a calibration refuses generations of different lengths), so the count, sum and
        sum of squared deviations of each cell follow exactly, and files written before this method
        existed merge as well as new ones.

        Must agree: the model (class, fingerprint, dtype, adapters, weights digest), scheduler,
        guidance scale, ``num_steps``, ``lookahead``, the components and their types, and whether
        forecast errors were recorded. A component without a spread in some input has none in the
        result. Sensitivity weights come from replays of one calibration and do not pool: merge
        calibrations without them (``cal.replace(weights={})``), then run :func:`stepcache.sensitivity`
        on the result.

        Raises:
            CalibrationError: fewer than one calibration, or one that differs in any of the above.
        """
        cals = [c if isinstance(c, Calibration) else cls.load(c) for c in calibrations]
        if not cals:
            raise CalibrationError("Calibration.merge needs at least one calibration.")
        first = cals[0]
        keys = ("model_class", "fingerprint", "dtype", "adapters", "weights_digest", "scheduler")
        for i, cal in enumerate(cals[1:], 1):
            checks: list[tuple[str, Any, Any]] = [
                ("num_steps", first.num_steps, cal.num_steps),
                ("lookahead", first.lookahead, cal.lookahead),
                ("components (names and types)", dict(first.components), dict(cal.components)),
                ("forecast errors recorded", bool(first.forecast_errors), bool(cal.forecast_errors)),
                (
                    "second-order forecast errors recorded",
                    sorted(first.forecast2_errors),
                    sorted(cal.forecast2_errors),
                ),
            ]
            checks += [(f"meta {k!r}", first.meta.get(k), cal.meta.get(k)) for k in (*keys, "guidance_scale")]
            for label, a, b in checks:
                if a != b:
                    shown = "" if isinstance(a, dict) else f" ({b!r} vs {a!r})"
                    raise CalibrationError(
                        f"cannot merge: calibration {i} differs from calibration 0 in {label}{shown}; merge "
                        "only calibrations of one model and setup."
                    )
        if any(cal.weights for cal in cals):
            raise CalibrationError(
                "cannot merge sensitivity weights (they come from replays of one calibration): merge "
                "cal.replace(weights={}) of each, then run stepcache.sensitivity() on the result."
            )
        names = list(first.components)
        errors, spread, forecast = {}, {}, {}
        forecast2: dict[str, dict[str, np.ndarray]] = {m: {} for m in first.forecast2_errors}
        for name in names:
            pooled = functools.reduce(
                operator.add,
                (_Moments.of_summary(c.num_samples, c.errors[name], c.spread.get(name)) for c in cals),
            )
            errors[name] = pooled.mean
            if all(name in c.spread for c in cals):
                spread[name] = pooled.std()
            if first.forecast_errors:
                forecast[name] = functools.reduce(
                    operator.add,
                    (_Moments.of_summary(c.num_samples, c.forecast_errors[name], None) for c in cals),
                ).mean
            for method in forecast2:
                forecast2[method][name] = functools.reduce(
                    operator.add,
                    (
                        _Moments.of_summary(c.num_samples, c.forecast2_errors[method][name], None)
                        for c in cals
                    ),
                ).mean
        macs = {
            name: next((c.macs[name] for c in cals if c.macs.get(name) is not None), None) for name in names
        }
        meta = dict(first.meta) | {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "stepcache_version": __version__,
            "merged_from": len(cals),
        }
        seconds = [c.meta.get("seconds") for c in cals]
        if all(is_number(v) for v in seconds):
            meta["seconds"] = round(sum(float(v) for v in seconds if v is not None), 2)
        return cls(
            num_steps=first.num_steps,
            lookahead=first.lookahead,
            num_samples=sum(c.num_samples for c in cals),
            components=dict(first.components),
            errors=errors,
            spread=spread,
            macs=macs,
            meta=meta,
            forecast_errors=forecast,
            forecast2_errors=forecast2,
        )

    def summary(self) -> str:
        """A short table: per type, the mean 1-step change early, mid-way and late in sampling."""
        n = self.num_steps
        thirds = [(1, max(2, n // 3)), (n // 3, 2 * n // 3), (2 * n // 3, n)]
        lines = [
            f"Calibration: {self.meta.get('model_class', '?')}, {n} steps, {self.num_samples} sample(s), "
            f"lookahead {self.lookahead}, scheduler {self.meta.get('scheduler') or '?'}",
            f"{'type':<11}{'layers':>7}{'early':>10}{'middle':>10}{'late':>10}   (mean rel. L1 change vs previous step)",
        ]
        counts = {t: list(self.components.values()).count(t) for t in set(self.components.values())}
        for kind, table in self.type_errors().items():
            parts = [np.nanmean(table[a:b, 0]) if b > a else math.nan for a, b in thirds]
            lines.append(f"{kind:<11}{counts[kind]:>7}" + "".join(f"{p:>10.4f}" for p in parts))
        return "\n".join(lines)

    def plot(self, path: str | Path, *, schedule: Any = None) -> Path:
        """Error curves per type (PNG). With ``schedule``, also its alpha and a compute/reuse strip."""
        from .plots import plot_calibration

        return plot_calibration(self, Path(path), schedule=schedule)

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        """The JSON form :meth:`save` writes. NaN (a distance not measured) is written as ``null``;
        so is an infinite error, with a warning, as JSON has no infinity and it reads back as missing."""
        infinite = sum(
            int(np.isinf(np.asarray(t[name], dtype=float)).sum())
            for t in (self.errors, self.spread, self.forecast_errors, *self.forecast2_errors.values())
            for name in t
        )
        if infinite:
            warnings.warn(
                f"stepcache: {infinite} infinite error value(s) of this calibration are written as null "
                "(JSON has no infinity) and read back as missing (NaN), which no schedule will reuse.",
                UserWarning,
                stacklevel=2,
            )

        def arr(a: np.ndarray) -> list:
            return [[None if not math.isfinite(v) else float(v) for v in row] for row in np.asarray(a)]

        def second(name: str) -> dict[str, list] | None:
            if not self.forecast2_errors:
                return None
            return {
                m: [[arr(u) for u in t] for t in tables[name]] for m, tables in self.forecast2_errors.items()
            }

        out: dict[str, Any] = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION if self.forecast2_errors else 1,  # readable by older versions
            "stepcache_version": __version__,
            "num_steps": self.num_steps,
            "lookahead": self.lookahead,
            "num_samples": self.num_samples,
            "meta": dict(self.meta),
            "components": {
                name: {
                    "type": kind,
                    "macs": self.macs.get(name),
                    "errors": arr(self.errors[name]),
                    "spread": arr(self.spread[name]) if name in self.spread else None,
                    "forecast_errors": (
                        [arr(t) for t in self.forecast_errors[name]] if name in self.forecast_errors else None
                    ),
                    "weights": ([float(v) for v in self.weights[name]] if name in self.weights else None),
                    "forecast2_errors": second(name),
                }
                for name, kind in self.components.items()
            },
        }
        if not self.forecast2_errors:
            for c in out["components"].values():
                del c["forecast2_errors"]
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "calibration") -> Calibration:
        """The calibration in a dict read from a file written by :meth:`save` (:meth:`to_dict`).

        Strict: exact JSON types (``2.0``, ``"2"`` and ``true`` are not the integer ``2``), errors
        ``>= 0`` or ``null`` (not measured), arrays of exactly the calibrated shape, known component
        types, at least one component; unknown fields are refused rather than dropped.

        Raises:
            CalibrationError: naming ``source`` and the field that is wrong.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise CalibrationError(f'{source} is not a stepcache calibration (no "format": "{_FORMAT}").')
        check_format_version(data, source, CalibrationError, _FORMAT_VERSION)

        def fail(where: str, what: str) -> CalibrationError:
            return CalibrationError(f"{source} is missing or has malformed field {where}: {what}.")

        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise CalibrationError(f"{source} has unknown field(s) {unknown}; expected {sorted(_FIELDS)}.")
        comps = data.get("components")
        if not isinstance(comps, dict) or not comps:
            raise fail("'components'", f"must be a non-empty object, got {kind_of(comps)}")
        for key in ("num_steps", "lookahead", "num_samples"):
            if not is_int(data.get(key)):
                raise fail(repr(key), f"must be an integer, got {kind_of(data.get(key))}")
        n, k = data["num_steps"], data["lookahead"]
        if n < 2 or k < 1:
            raise fail("'num_steps' or 'lookahead'", f"must be >= 2 and >= 1, got {n} and {k}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise fail("'meta'", f"must be an object, got {kind_of(meta)}")
        for key in ("model_class", "fingerprint", "scheduler", "stepcache_version"):
            if meta.get(key) is not None and not isinstance(meta[key], str):
                raise fail(f"meta[{key!r}]", f"must be a string or null, got {kind_of(meta[key])}")
        if "stepcache_version" in data and not isinstance(data["stepcache_version"], str):
            raise fail("'stepcache_version'", f"must be a string, got {kind_of(data['stepcache_version'])}")
        types, macs, errors, spread, forecast, weights = {}, {}, {}, {}, {}, {}
        forecast2: dict[str, dict[str, np.ndarray]] = {}
        for name, c in comps.items():
            where = f"components[{name!r}]"
            if not isinstance(c, dict):
                raise fail(where, f"must be an object, got {kind_of(c)}")
            extra = sorted(set(c) - _COMPONENT_FIELDS)
            if extra:
                raise CalibrationError(
                    f"{source}: {where} has unknown field(s) {extra}; expected {sorted(_COMPONENT_FIELDS)}."
                )
            if c.get("type") not in COMPONENT_TYPES:
                raise fail(f"{where}.type", f"must be one of {list(COMPONENT_TYPES)}, got {c.get('type')!r}")
            types[name] = c["type"]
            m = c.get("macs")
            if m is not None and (not is_number(m) or m < 0):
                raise fail(f"{where}.macs", f"must be a number >= 0 or null, got {kind_of(m)}")
            macs[name] = None if m is None else float(m)
            errors[name] = _table(c.get("errors"), (n, k), f"{where}.errors", fail, missing=True)
            if c.get("spread") is not None:
                spread[name] = _table(c["spread"], (n, k), f"{where}.spread", fail, missing=True)
            if c.get("forecast_errors") is not None:
                forecast[name] = _table(
                    c["forecast_errors"], (n, k, k + 1), f"{where}.forecast_errors", fail, missing=True
                )
            if c.get("weights") is not None:
                weights[name] = _table(c["weights"], (n,), f"{where}.weights", fail, missing=False)
            second = c.get("forecast2_errors")
            if second is not None:
                if not isinstance(second, dict) or not set(second) <= set(SECOND_ORDER):
                    raise fail(
                        f"{where}.forecast2_errors", f"must be an object with keys among {list(SECOND_ORDER)}"
                    )
                for method, table in second.items():
                    forecast2.setdefault(method, {})[name] = _table(
                        table, (n, k, k + 1, k + 1), f"{where}.forecast2_errors.{method}", fail, missing=True
                    )
        try:
            return cls(
                num_steps=n,
                lookahead=k,
                num_samples=data["num_samples"],
                components=types,
                errors=errors,
                spread=spread,
                macs=macs,
                meta=dict(meta),
                forecast_errors=forecast,
                weights=weights,
                forecast2_errors=forecast2,
            )
        except CalibrationError as e:
            raise CalibrationError(f"{source}: {e}") from None


_FIELDS = {"format", "format_version", "stepcache_version", "num_steps", "lookahead", "num_samples"}
_FIELDS |= {"meta", "components"}
_COMPONENT_FIELDS = {"type", "macs", "errors", "spread", "forecast_errors", "weights", "forecast2_errors"}


def _check_array(label: str, arr: Any, shape: tuple[int, ...], *, finite: bool) -> None:
    """Shape ``shape``, numbers >= 0; NaN (not measured) and inf allowed unless ``finite``."""
    try:
        values = np.asarray(arr, dtype=float)
    except (TypeError, ValueError):
        raise CalibrationError(f"{label} must be an array of numbers, got {type(arr).__name__}.") from None
    if values.shape != shape:
        raise CalibrationError(f"{label} have shape {values.shape}, expected {shape}.")
    if finite and not np.all(np.isfinite(values)):
        raise CalibrationError(f"{label} must be finite numbers >= 0.")
    if np.any(values < 0):
        raise CalibrationError(
            f"{label} hold negative values; errors and weights are >= 0 (NaN where not measured)."
        )


def _table(
    value: Any,
    shape: tuple[int, ...],
    where: str,
    fail: Callable[[str, str], CalibrationError],
    *,
    missing: bool,
) -> np.ndarray:
    """A JSON array of exactly ``shape`` holding numbers >= 0 (and ``null`` if ``missing``) as floats."""
    want = "a number >= 0" + (" or null" if missing else "")

    def walk(v: Any, level: int, at: str) -> Any:
        if level == len(shape):
            if v is None and missing:
                return math.nan
            if not is_number(v) or v < 0:
                raise fail(at, f"must be {want}, got {kind_of(v)}")
            return float(v)
        if not isinstance(v, list) or len(v) != shape[level]:
            got = f"{len(v)} entries" if isinstance(v, list) else kind_of(v)
            raise fail(at, f"must be an array of {shape[level]} entries, got {got}")
        return [walk(x, level + 1, f"{at}[{i}]") for i, x in enumerate(v)]

    return np.array(walk(value, 0, where), dtype=float)


def _by_type(components: Mapping[str, str], tables: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    by_type: dict[str, list[np.ndarray]] = {}
    for name, kind in components.items():
        if name in tables:
            by_type.setdefault(kind, []).append(np.asarray(tables[name], dtype=float))
    return {kind: _nanmean(np.stack(arrs)) for kind, arrs in by_type.items()}


def _nanmean(stack: np.ndarray) -> np.ndarray:
    # NaN corners (step < j) are expected: silence numpy's "mean of empty slice".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stack, axis=0)


class _Recorder:
    """Interceptor that runs each component normally and records its step-to-step change.

    With ``forecast``, it also records the error of a first-order forecast: the output at step ``s``
    predicted from the outputs at ``a = s - j`` and ``b = a - m`` as ``o_a + (j / m) (o_a - o_b)``, the
    extrapolation the runtime applies; that needs the ``2k + 1`` most recent outputs instead of ``k``.
    With ``second_order`` as well, the errors of the second-order methods (``SECOND_ORDER``) from
    ``a``, ``b`` and ``c = b - p``, with the runtime's weights (``forecast_coefficients``); that needs
    the ``3k + 2`` most recent outputs and ``2 k (k+1)^2`` more error sums per step.

    Errors of one generation collect in one table per component, ``(steps, k, width)``: along the
    last axis the copy error, then the first-order errors by ``m``, then each second-order method's
    errors by ``(m, p)``.
    """

    def __init__(
        self,
        components: Sequence[Component],
        lookahead: int,
        tracker: StepTracker,
        forecast: bool = False,
        sequence_group: Any = None,
        second_order: bool = False,
    ) -> None:
        self.k = lookahead
        self.forecast = forecast
        self.second_order = second_order and forecast
        k = lookahead
        self.width = (
            1 + (k + 1 if forecast else 0) + (len(SECOND_ORDER) * (k + 1) ** 2 if self.second_order else 0)
        )
        self.tracker = tracker
        self.sequence_group = sequence_group
        self.names = [c.name for c in components]
        self.macs: dict[str, float | None] = {}
        self.generations: list[dict[str, np.ndarray]] = []
        self.forecast_generations: list[dict[str, np.ndarray]] = []
        self._hist: dict[tuple[str, int], deque] = {}
        # (name, step, j, m, per-item |difference|_1, per-item |output|_1); m = 0 marks a copy error.
        # Numerator and denominator stay apart until the generation ends: under context parallelism
        # both are summed over the ranks' sequence slices before dividing.
        # Second-order forecasts come in blocks: j and m are then arrays (one per row of e).
        self._pending: list[tuple[str, int, Any, Any, torch.Tensor, torch.Tensor]] = []
        self._max_step = -1

    def intercept(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        name = comp.name

        def forward(*args: Any, **kwargs: Any) -> Any:
            if name in self.macs:
                out = original(*args, **kwargs)
            else:
                out, self.macs[name] = count_macs(original, *args, **kwargs)
            self._record(name, out)
            return out

        return forward

    def _record(self, name: str, out: Any) -> None:
        step, branch = self.tracker.step, self.tracker.branch
        cur = _flatten(out)
        if cur is None:
            return
        k = self.k
        depth = (3 * k + 2 if self.second_order else 2 * k + 1) if self.forecast else k
        hist = self._hist.setdefault((name, branch), deque(maxlen=depth))
        past = {s: o for s, o in hist if o.shape == cur.shape}
        norm = cur.abs().sum(1)
        for j in range(1, k + 1):
            a = past.get(step - j)
            if a is None:
                continue
            self._pending.append((name, step, j, 0, (cur - a).abs().sum(1), norm))
            if not self.forecast:
                continue
            for m in range(1, k + 2):
                b = past.get(step - j - m)
                if b is None:
                    continue
                pred = a + (j / m) * (a - b)
                self._pending.append((name, step, j, m, (cur - pred).abs().sum(1), norm))
        if self.second_order:
            self._record_second_order(name, step, cur, past, norm)
        hist.append((step, cur))
        self._max_step = max(self._max_step, step)

    def _record_second_order(
        self, name: str, step: int, cur: torch.Tensor, past: dict[int, torch.Tensor], norm: torch.Tensor
    ) -> None:
        """Every second-order forecast of ``step`` from three earlier outputs at once: each is a
        weighted sum of the stacked history (``(1 + alpha) o_a + (beta - alpha) o_b - beta o_c``),
        so one matrix product per chunk of forecasts replaces hundreds of small elementwise ops."""
        k = self.k
        slots = sorted(past)
        where = {t: i for i, t in enumerate(slots)}
        rows, cells = [], []
        for j in range(1, k + 1):
            for m in range(1, k + 2):
                for p in range(1, k + 2):
                    a, b, c = step - j, step - j - m, step - j - m - p
                    if a not in where or b not in where or c not in where:
                        continue
                    for q, method in enumerate(SECOND_ORDER):
                        alpha, beta = forecast_coefficients(METHODS[method], step, a, b, c)
                        row = [0.0] * len(slots)
                        row[where[a]] += 1 + alpha
                        row[where[b]] += beta - alpha
                        row[where[c]] -= beta
                        rows.append(row)
                        cells.append((j, k + 2 + q * (k + 1) ** 2 + (m - 1) * (k + 1) + (p - 1)))
        if not rows:
            return
        history = torch.stack([past[t] for t in slots])  # (slots, batch, features)
        weights = torch.tensor(rows, dtype=history.dtype, device=history.device)
        chunk = max(1, (1 << 26) // max(1, cur.numel()))  # at most ~256 MB of float32 forecasts at once
        for lo in range(0, len(rows), chunk):
            preds = torch.einsum("ch,hbf->cbf", weights[lo : lo + chunk], history)
            errors = (cur - preds).abs().sum(2)  # (forecasts, batch)
            js = np.array([c[0] for c in cells[lo : lo + chunk]])
            ats = np.array([c[1] for c in cells[lo : lo + chunk]])
            self._pending.append((name, step, js, ats, errors, norm))

    def finish_generation(self) -> None:
        """Average the finished generation's errors over items and branches into one sample."""
        if self._max_step < 0:
            return
        n, k = self._max_step + 1, self.k
        sums = {name: np.zeros((n, k, self.width)) for name in self.names}
        counts = {name: np.zeros((n, k, self.width)) for name in self.names}
        if self._pending:
            flat = self._ratios().cpu().numpy()
            at = 0
            for name, step, j, m, e, _ in self._pending:
                vals = flat[at : at + e.numel()]
                at += e.numel()
                if isinstance(j, np.ndarray):  # a block of second-order forecasts: (cells, batch)
                    cells, items = e.shape
                    block = vals.reshape(cells, items)
                    np.add.at(sums[name][step], (j - 1, m), block.sum(1))
                    np.add.at(counts[name][step], (j - 1, m), items)
                    continue
                sums[name][step, j - 1, m] += vals.sum()
                counts[name][step, j - 1, m] += vals.size
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {
                name: np.where(counts[name] > 0, sums[name] / counts[name], np.nan) for name in self.names
            }
        self.generations.append({name: m[:, :, 0] for name, m in means.items()})
        if self.forecast:
            self.forecast_generations.append({name: m[:, :, 1:] for name, m in means.items()})
        self.drop_generation()

    def _ratios(self) -> torch.Tensor:
        """Every pending relative L1 error, flat: numerators over denominators, each summed over the
        sequence group's slices first when there is one (one collective per generation)."""
        num = torch.cat([e.reshape(-1) for *_, e, _ in self._pending])
        den = torch.cat([d.expand_as(e).reshape(-1) for *_, e, d in self._pending])
        group = self.sequence_group
        if group is not None:
            sizes = distributed.all_reduce(torch.tensor([num.numel(), -num.numel()]), group, op="max")
            if int(sizes[0]) != -int(sizes[1]):
                raise CalibrationError(
                    f"the ranks of sequence_group measured different numbers of errors in one generation "
                    f"({-int(sizes[1])} to {int(sizes[0])}): they must run the same generations, each on "
                    "an equal slice of the sequence."
                )
            both = distributed.all_reduce(torch.stack([num, den]), group)
            num, den = both[0], both[1]
        return num / den.clamp_min(1e-12)

    def drop_generation(self) -> None:
        self._hist.clear()
        self._pending.clear()
        self._max_step = -1


def calibrate(
    target: Any,
    run: Callable[[], Any] | None = None,
    *,
    inputs: Iterable[Mapping[str, Any]] | None = None,
    num_inference_steps: int | None = None,
    lookahead: int = 3,
    forecast: bool = True,
    second_order: bool = False,
    blocks: Any = None,
    components: Any = None,
    types: Iterable[str] | None = None,
    timestep_arg: str | None = None,
    scheduler: str | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    process_group: Any = distributed.AUTO,
    sequence_group: Any = None,
) -> Calibration:
    """Record per-step error curves of every cacheable component of ``target``.

    Args:
        target: a diffusers pipeline (its ``.transformer`` is calibrated) or the denoiser module.
        run: a callable with no arguments that performs one or more generations with ``target``.
            Each generation is one sample; they are averaged.
        inputs: instead of ``run`` for a pipeline: a list of call kwargs, one generation each
            (``[{"class_labels": [3]}, ...]``), run with ``num_inference_steps``.
        lookahead: ``k``, the largest step distance to measure (the longest possible reuse run).
        forecast: also record first-order forecast errors (what the ``optimal`` policy uses to choose
            between copying and forecasting); holds ``2k + 1`` outputs per component instead of ``k``.
        second_order: also record the errors of the second-order forecasts (``"taylor2"``, plan value
            3, and ``"bdf2"``, 4; ``forecast2_errors``), which the policies then choose from as well;
            holds ``3k + 2`` outputs per component and costs ``2 k (k+1)^2`` more error sums per
            component and step (off by default).
        blocks, components, types: override discovery (see :func:`stepcache.discover`).
        timestep_arg: name of the denoiser's timestep argument, if it is not found automatically.
        scheduler: scheduler name to record (taken from the pipeline when there is one).
        meta: extra metadata to record (for instance the guidance scale the runs used).
        progress: show a progress bar over denoising steps (on rank 0 only, under a process group).
        process_group: the ranks that calibrate different generations: with ``inputs``, rank ``r`` of
            ``w`` runs the inputs ``i`` with ``i % w == r``; with ``run``, every rank runs its own
            ``run`` (give each its share, e.g. with :func:`stepcache.distributed.shard`). Every rank
            returns the calibration of all ranks' generations, equal (to float precision) to one
            process calibrating them all. ``"auto"`` (default): the whole world when
            ``torch.distributed`` is initialised (torchrun, accelerate) and no ``sequence_group`` is
            given; ``None``: calibrate alone.
        sequence_group: under context parallelism (each rank holds a slice of every sequence), the
            ranks that share one generation. Relative errors are then ratios of sums over the whole
            sequence (numerator and denominator summed over the group), so every rank of it records
            the same curves as one process running the whole sequence. Its ranks must run the same
            generations: with both groups, shard over the data-parallel ``process_group`` only.

    Raises:
        CalibrationError: bad arguments, no generation ran, or generations of different lengths
            (under a process group, on every rank together, whichever rank's generations failed).
    """
    follow_diffusers()
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
        raise CalibrationError(f"lookahead must be a positive integer, got {lookahead!r}.")
    inputs = list(inputs) if inputs is not None else None
    seq = distributed.resolve_group(sequence_group)
    default = isinstance(process_group, str) and process_group == distributed.AUTO and seq is not None
    group = None if default else distributed.resolve_group(process_group)
    if run is None:
        if inputs is None:
            raise CalibrationError(
                "pass run=<callable doing one or more generations>, or a pipeline and inputs=[{...}]."
            )
        if isinstance(target, nn.Module) or not callable(target):
            raise CalibrationError(
                "inputs=[...] needs a callable pipeline as target; for a module pass run=."
            )
        if not inputs:
            raise CalibrationError("inputs is empty: give at least one set of call kwargs.")
        inputs = distributed.shard(inputs, group) if group is not None else inputs
        extra = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}

        def run() -> None:
            for kwargs in inputs:
                target(**{**extra, **kwargs})

    elif inputs is not None:
        raise CalibrationError("pass either run= or inputs=, not both.")

    models = [m for _, m in denoisers_of(target)]
    comps = discover(target, blocks=blocks, components=components, types=types)
    names = [c.name for c in comps]
    tracker = StepTracker()
    if second_order and not forecast:
        raise CalibrationError("second_order=True records forecast errors too: pass forecast=True with it.")
    recorder = _Recorder(
        comps, lookahead, tracker, forecast=forecast, sequence_group=seq, second_order=second_order
    )
    tracker.on_generation.append(recorder.finish_generation)
    tracker.on_reset.append(recorder.drop_generation)

    total = len(inputs) * num_inference_steps if inputs is not None and num_inference_steps else None
    bar = _progress(progress and distributed.is_main(), total)
    tracker.on_step.append(lambda _s: bar.update(1) if tracker.branch == 0 else None)
    start = time.perf_counter()
    failure: Exception | None = None
    try:
        with Session(models, comps, recorder.intercept, tracker, timestep_arg=timestep_arg), torch.no_grad():
            run()
        recorder.finish_generation()
    except Exception as e:
        if group is None:
            raise
        failure = e  # told to the other ranks first, so that none of them waits for this one
    finally:
        bar.close()
    macs = [recorder.macs.get(name) for name in names]
    if seq is not None:
        macs = _sum_over(macs, seq)
    seconds = time.perf_counter() - start
    if group is None:
        num_samples, n, moments, fmoments = _local_statistics(recorder, names)
    else:
        num_samples, n, moments, fmoments, macs, seconds = _pooled_statistics(
            recorder, names, group, failure, macs, seconds
        )
    errors = {name: moments[name].mean for name in names}
    spread = {name: moments[name].std() for name in names}
    forecast_errors = {name: fmoments[name].mean[:, :, : lookahead + 1] for name in names} if fmoments else {}
    forecast2_errors: dict[str, dict[str, np.ndarray]] = {}
    if fmoments and recorder.second_order:
        k1 = lookahead + 1
        for q, method in enumerate(SECOND_ORDER):
            forecast2_errors[method] = {
                name: fmoments[name]
                .mean[:, :, k1 + q * k1 * k1 : k1 + (q + 1) * k1 * k1]
                .reshape(n, lookahead, k1, k1)
                for name in names
            }
    sched = scheduler or (type(target.scheduler).__name__ if hasattr(target, "scheduler") else None)
    info = {
        **dict(meta or {}),
        "model_class": model_class(target),
        "fingerprint": fingerprint(target),
        **weights_state(target),
        "scheduler": sched,
        "stepcache_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(seconds, 2),
    }
    if group is not None:
        info["processes"] = distributed.group_size(group)
    logger.info("calibrated %d components over %d generation(s) of %d steps", len(names), num_samples, n)
    return Calibration(
        num_steps=n,
        lookahead=lookahead,
        num_samples=num_samples,
        components={c.name: c.type for c in comps},
        errors=errors,
        spread=spread,
        macs=dict(zip(names, macs, strict=True)),
        meta=info,
        forecast_errors=forecast_errors,
        forecast2_errors=forecast2_errors,
    )


def _check_lengths(lengths: Sequence[int]) -> int:
    """The one step count of every generation (raises unless there is exactly one, of 2 or more)."""
    if not lengths:
        raise CalibrationError("no denoising step was observed: does `run` call the model?")
    if len(set(lengths)) != 1:
        raise CalibrationError(
            f"generations had different step counts {sorted(set(lengths))}; calibrate one step count at a time."
        )
    if lengths[0] < 2:
        raise CalibrationError("each generation made only one denoising step; nothing to compare.")
    return lengths[0]


def _local_statistics(
    recorder: _Recorder, names: Sequence[str]
) -> tuple[int, int, dict[str, _Moments], dict[str, _Moments]]:
    """(generations, steps, error moments, forecast moments) of this process's generations."""
    gens, fgens = recorder.generations, recorder.forecast_generations
    n = _check_lengths([next(iter(g.values())).shape[0] for g in gens])
    moments = {name: _Moments.of(np.stack([g[name] for g in gens])) for name in names}
    fmoments = {name: _Moments.of(np.stack([g[name] for g in fgens])) for name in names} if fgens else {}
    return len(gens), n, moments, fmoments


def _sum_over(macs: Sequence[float | None], group: Any) -> list[float | None]:
    """Each component's MACs summed over the ranks of ``group`` (None where any rank has none): under
    context parallelism each rank counts its own slice of the sequence."""
    values = torch.tensor([[m or 0.0, m is None] for m in macs], dtype=torch.float64).reshape(-1, 2)
    summed = distributed.all_reduce(values, group)
    return [None if none else float(v) for v, none in summed.tolist()]


def _pooled_statistics(
    recorder: _Recorder,
    names: Sequence[str],
    group: Any,
    failure: Exception | None,
    macs: Sequence[float | None],
    seconds: float,
) -> tuple[int, int, dict[str, _Moments], dict[str, _Moments], list[float | None], float]:
    """The statistics of every rank's generations, identical on every rank of ``group``.

    Two collectives: a MAX-reduce of what every rank must agree on (failures, step counts, MACs),
    then an all-gather of each rank's per-cell moments, combined exactly in rank order. Every
    decision to raise is taken on reduced values, so all ranks raise together, never one alone while
    the others wait in a collective.
    """
    me = distributed.group_rank(group)
    gens, fgens = recorder.generations, recorder.forecast_generations
    lengths = [next(iter(g.values())).shape[0] for g in gens] if failure is None else []
    big = float(2**52)
    status = [
        me + 1.0 if failure is not None else 0.0,
        float(max(lengths, default=-1)),
        -float(min(lengths, default=big)),
        float(len(names)),
        -float(len(names)),
        float(bool(fgens)),
        seconds,
        *[-1.0 if m is None else float(m) for m in macs],
    ]
    got = distributed.all_reduce(torch.tensor(status, dtype=torch.float64), group, op="max").tolist()
    if got[0] > 0:
        if failure is not None:
            raise failure
        raise CalibrationError(
            f"rank {int(got[0]) - 1} of the calibration's process group failed during its generations "
            "(see its log); no calibration was made."
        )
    if got[3] != -got[4]:
        raise CalibrationError(
            f"the ranks discovered different numbers of components ({int(-got[4])} to {int(got[3])}): "
            "every rank must calibrate the same model with the same discovery options."
        )
    n_max, n_min = int(got[1]), int(-got[2])
    if n_max < 0:
        _check_lengths([])
    _check_lengths([n_max, n_min])
    n, k = n_max, recorder.k
    f = recorder.width - 1  # forecast errors per (step, j): first order, then second order if recorded
    forecast = bool(got[5])
    pooled_macs = [None if m < 0 else m for m in got[7:]]
    local = (
        {name: _Moments.of(np.stack([g[name] for g in gens])) for name in names}
        if gens
        else {name: _Moments.empty((n, k)) for name in names}
    )
    flocal = (
        {name: _Moments.of(np.stack([g[name] for g in fgens])) for name in names}
        if fgens
        else {name: _Moments.empty((n, k, f)) for name in names}
    )
    parts = [np.array([float(len(gens))])]
    for name in names:
        parts += local[name].pack() + (flocal[name].pack() if forecast else [])
    gathered = distributed.all_gather(torch.from_numpy(np.concatenate(parts)), group)
    sizes = [1] + ([n * k] * 3 + ([n * k * f] * 3 if forecast else [])) * len(names)
    total = 0
    moments = {name: _Moments.empty((n, k)) for name in names}
    fmoments = {name: _Moments.empty((n, k, f)) for name in names} if forecast else {}
    for flat in gathered:
        chunks = np.split(flat.numpy(), np.cumsum(sizes)[:-1])
        total += int(chunks[0][0])
        at = 1
        for name in names:
            moments[name] = moments[name] + _Moments.unpack(chunks[at : at + 3], (n, k))
            at += 3
            if forecast:
                fmoments[name] = fmoments[name] + _Moments.unpack(chunks[at : at + 3], (n, k, f))
                at += 3
    return total, n, moments, fmoments, pooled_macs, got[6]


@dataclass(frozen=True)
class _Moments:
    """Sufficient statistics of a per-cell quantity over generations: how many generations measured
    each cell, their mean, and the sum of squared deviations from it (``m2``).

    Two sets combine exactly (the pairwise update of Chan, Golub and LeVeque), in any grouping: what
    pooling ranks and merging calibration files need, and stabler than sums of squares. The mean of
    the pooled set is the sample-weighted mean, never a mean of means.
    """

    count: np.ndarray
    mean: np.ndarray  # NaN where count is 0
    m2: np.ndarray

    @classmethod
    def of(cls, stack: np.ndarray) -> _Moments:
        """Of a stack ``(generations, ...)`` holding NaN where a generation did not measure a cell."""
        count = np.isfinite(stack).sum(0).astype(float)
        mean = _nanmean(stack)
        m2 = np.nansum((stack - mean) ** 2, axis=0)
        return cls(count, mean, m2)

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> _Moments:
        return cls(np.zeros(shape), np.full(shape, np.nan), np.zeros(shape))

    @classmethod
    def of_summary(cls, samples: int, mean: np.ndarray, std: np.ndarray | None) -> _Moments:
        """From a calibration's mean and (population) spread of ``samples`` generations; without a
        spread, ``m2`` is NaN (the pooled spread is then unknown)."""
        mean = np.asarray(mean, dtype=float)
        count = np.where(np.isfinite(mean), float(samples), 0.0)
        m2 = (
            np.full(mean.shape, np.nan)
            if std is None
            else np.nan_to_num(np.asarray(std, dtype=float) ** 2) * count
        )
        return cls(count, mean, m2)

    def __add__(self, other: _Moments) -> _Moments:
        n = self.count + other.count
        a, b = np.nan_to_num(self.mean), np.nan_to_num(other.mean)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, (self.count * a + other.count * b) / n, np.nan)
            cross = np.where(n > 0, (b - a) ** 2 * self.count * other.count / n, 0.0)
        return _Moments(n, mean, self.m2 + other.m2 + cross)

    def std(self) -> np.ndarray:
        """Population standard deviation per cell (NaN where nothing was measured)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.sqrt(self.m2 / self.count), np.nan)

    def pack(self) -> list[np.ndarray]:
        return [self.count.reshape(-1), self.mean.reshape(-1), self.m2.reshape(-1)]

    @classmethod
    def unpack(cls, chunks: Sequence[np.ndarray], shape: tuple[int, ...]) -> _Moments:
        return cls(*(np.asarray(c, dtype=float).reshape(shape) for c in chunks))


def _progress(enabled: bool, total: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrating", unit="step", disable=not enabled, leave=False)
