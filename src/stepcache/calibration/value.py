"""The calibration value: how much each component's output changes between denoising steps.

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
import math
import operator
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from .._hub import HubValue
from .._io import CALIBRATION_FILE, check_format_version, is_int, is_number, kind_of
from .._version import __version__
from ..discovery import COMPONENT_TYPES
from ..errors import CalibrationError, StepCacheError
from ..plots import plot_calibration
from ..runtime.introspect import DIGEST_PREFIX, fingerprint, model_class
from .moments import Moments as _Moments
from .moments import nanmean as _nanmean

__all__ = ["DEFAULT_LOOKAHEAD", "SECOND_ORDER", "Calibration"]

_FORMAT = "stepcache.calibration"
#: 2 adds second-order forecast errors, 3 the output response; a file is written as the lowest that fits
_FORMAT_VERSION = 3
#: The lookahead ``k`` (longest reuse run measured) of :func:`~stepcache.calibrate`, the CLI and the shipped
#: calibrations: the longest reuse run the optimal policy chooses at a compute fraction of 0.25 when it may
#: choose up to 10 (measured on both reference models, 20-50 steps, type granularity: 5; docs/policies.md).
DEFAULT_LOOKAHEAD = 5
SECOND_ORDER = ("taylor2", "bdf2")  # the forecast methods of forecast2_errors, by name (schedule.METHODS)


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
        response: type -> array ``(projections, num_steps, num_steps, samples)``:
            ``response[r, s, j, i]`` is the inner product, summed over that type's layers, of the
            output of step ``j`` with the gradient of a random projection ``r`` of sample ``i``'s final
            sample with respect to the output of step ``s``; from :func:`stepcache.response` (empty if
            not run). It predicts, to first order, what any placement of computations and forecasts
            does to the final samples (:mod:`stepcache.policies._response`).
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
    response: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_sizes(self.num_steps, self.lookahead, self.num_samples)
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
        _check_response(self.response, set(self.components.values()), self.num_steps)
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
        on the result. Output sizes (``meta["output_bytes"]``) must agree where recorded, and are kept.

        Each input counts once: the same value or file given twice, or a copy of one (identical
        statistics: the same inputs and seeds), would count its generations twice and is refused.

        Raises:
            CalibrationError: fewer than one calibration, something that is neither a calibration nor
                a calibration file, the same generations twice, or one that differs in any of the above.
        """
        if isinstance(calibrations, (Calibration, str, bytes, Path)) or not isinstance(
            calibrations, Iterable
        ):
            raise CalibrationError(
                f"Calibration.merge takes a list of calibrations (values or files), got "
                f"{kind_of(calibrations)}."
            )
        cals: list[Calibration] = []
        sources: list[str | None] = []
        for i, c in enumerate(calibrations):
            if isinstance(c, Calibration):
                cals.append(c)
                sources.append(None)
            elif isinstance(c, (str, os.PathLike)):
                try:
                    cals.append(cls.load(c))
                except CalibrationError as e:
                    raise CalibrationError(f"cannot merge calibration {i}: {e}") from None
                sources.append(os.path.realpath(c))
            else:
                raise CalibrationError(
                    f"calibration {i} given to Calibration.merge is {kind_of(c)} ({type(c).__name__}), not a "
                    "Calibration or a calibration file."
                )
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
            checks += [
                (f"meta {k!r}", first.meta.get(k), cal.meta.get(k))
                for k in (*keys, "guidance_scale")
                if k != "weights_digest" or _same_digest_rule(first.meta.get(k), cal.meta.get(k))
            ]
            for label, a, b in checks:
                if a != b:
                    shown = "" if isinstance(a, dict) else f" ({b!r} vs {a!r})"
                    raise CalibrationError(
                        f"cannot merge: calibration {i} differs from calibration 0 in {label}{shown}; merge "
                        "only calibrations of one model and setup."
                    )
        if any(cal.response for cal in cals):
            raise CalibrationError(
                "cannot merge output responses (measured on one calibration's samples): merge "
                "cal.replace(response={}) of each, then run stepcache.response() on the result."
            )
        if any(cal.weights for cal in cals):
            raise CalibrationError(
                "cannot merge sensitivity weights (they come from replays of one calibration): merge "
                "cal.replace(weights={}) of each, then run stepcache.sensitivity() on the result."
            )
        _refuse_duplicates(cals, sources)
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
        recorded = [
            (i, c.meta["output_bytes"]) for i, c in enumerate(cals) if c.meta.get("output_bytes") is not None
        ]
        for i, sizes in recorded[1:]:
            if sizes != recorded[0][1]:
                raise CalibrationError(
                    f"cannot merge: calibration {i} records other output sizes (meta output_bytes) than "
                    f"calibration {recorded[0][0]}; they measure one model and setup, so measure them again "
                    "(stepcache.memory.output_bytes) or drop them from one file."
                )
        meta = dict(first.meta) | {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "stepcache_version": __version__,
            "merged_from": len(cals),
        }
        if recorded:
            meta["output_bytes"] = recorded[0][1]
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
            "format_version": 3 if self.response else 2 if self.forecast2_errors else 1,
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
        if self.response:
            out["response"] = {kind: np.asarray(a, dtype=float).tolist() for kind, a in self.response.items()}
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
        response = data.get("response", {})
        if not isinstance(response, dict):
            raise fail("'response'", f"must be an object (component type -> array), got {kind_of(response)}")
        try:
            response = {kind: np.asarray(a, dtype=float) for kind, a in response.items()}
        except (TypeError, ValueError):
            raise fail("'response'", "must hold rectangular arrays of numbers") from None
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
                response=response,
            )
        except CalibrationError as e:
            raise CalibrationError(f"{source}: {e}") from None


def _same_digest_rule(a: Any, b: Any) -> bool:
    """Whether two recorded weights digests were made by one rule (files written before the digest
    depended on order hold the older one; those two cannot be compared)."""
    return (isinstance(a, str) and a.startswith(DIGEST_PREFIX)) == (
        isinstance(b, str) and b.startswith(DIGEST_PREFIX)
    )


def _refuse_duplicates(cals: list[Calibration], sources: list[str | None]) -> None:
    """The same generations given twice (one object or file twice, or two copies of one file) would
    count twice: refused. Identical statistics mean the same generations (the same inputs and seeds)."""

    def stats(c: Calibration) -> Any:  # the means: NaN (not measured) made one bit pattern
        return c.num_samples, tuple(
            (n, np.where(np.isnan(a := np.asarray(c.errors[n], dtype=np.float64)), np.nan, a).tobytes())
            for n in c.components
        )

    how = {
        "object": "the same value",
        "file": "the same file",
        "statistics": "identical statistics: a copy of it, or a run of the same inputs and seeds",
    }
    seen: dict[Any, int] = {}
    for i, (cal, source) in enumerate(zip(cals, sources, strict=True)):
        for key in (("object", id(cal)), ("file", source), ("statistics", stats(cal))):
            if key[1] is None:
                continue
            j = seen.setdefault(key, i)
            if j != i:
                raise CalibrationError(
                    f"cannot merge: calibration {i} is calibration {j} again ({how[key[0]]}): the same "
                    "generations twice would count twice. Merge each calibration once."
                )


def check_sizes(num_steps: Any, lookahead: Any, num_samples: Any) -> None:
    """The sizes every calibration value has (this one and the guidance calibration), checked alike."""
    for label, value, least in (
        ("num_steps", num_steps, 2),
        ("lookahead", lookahead, 1),
        ("num_samples", num_samples, 1),
    ):
        if not is_int(value) or value < least:
            raise CalibrationError(f"{label} must be an integer >= {least}, got {value!r}.")


_FIELDS = {"format", "format_version", "stepcache_version", "num_steps", "lookahead", "num_samples"}
_FIELDS |= {"meta", "components", "response"}
_COMPONENT_FIELDS = {"type", "macs", "errors", "spread", "forecast_errors", "weights", "forecast2_errors"}


def _check_response(response: Any, types: set[str], n: int) -> None:
    """Type -> finite array ``(projections, n, n, samples)`` (:func:`stepcache.response`)."""
    if not isinstance(response, Mapping):
        raise CalibrationError("calibration response must map component types to arrays.")
    shapes = set()
    for kind, arr in response.items():
        if kind not in types:
            raise CalibrationError(f"calibration response names type {kind!r}, which no component has.")
        values = np.asarray(arr, dtype=float)
        if values.ndim != 4 or values.shape[1:3] != (n, n) or 0 in values.shape:
            raise CalibrationError(
                f"response of {kind} has shape {values.shape}, expected (projections, {n}, {n}, samples)."
            )
        if not np.all(np.isfinite(values)):
            raise CalibrationError(f"response of {kind} must be finite numbers.")
        shapes.add(values.shape)
    if len(shapes) > 1:
        raise CalibrationError(f"the response arrays of the types differ in shape: {sorted(shapes)}.")


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
