"""Guidance calibration: the two guidance branches calibrated apart (see :mod:`stepcache.guidance`).

:func:`calibrate_guidance` measures, per component, step and gap ``j``, the relative L1 error of
copying either branch's output and of the guidance-difference stand-in (:class:`GuidanceCalibration`).
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .._hub import HubValue
from .._io import check_format_version, is_int, kind_of
from ..discovery import COMPONENT_TYPES, Component, discover
from ..errors import CalibrationError, StepCacheError
from ..guidance import KINDS, check_layout
from ..runtime.guided import guidance_batch
from ..runtime.introspect import fingerprint, model_class
from ..runtime.steps import StepTracker
from .harness import flatten, generations, intercepted
from .harness import progress as progress_bar
from .value import _check_array, _table, check_sizes

__all__ = ["GuidanceCalibration", "calibrate_guidance"]


@dataclass(frozen=True)
class GuidanceCalibration(HubValue):
    """Per component: ``errors[name][s, j - 1, q]``, the mean relative L1 error at step ``s`` of
    ``KINDS[q]`` built from the outputs ``j`` steps earlier (NaN where there is no earlier step).

    ``"cond"`` / ``"uncond"``: copying that branch's output (what plain reuse costs each branch);
    ``"difference"``: the unconditional output stood in for by ``cond_s + (uncond - cond)_{s-j}``.
    """

    num_steps: int
    lookahead: int
    layout: str
    components: dict[str, str]
    errors: dict[str, np.ndarray]
    num_samples: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    _what: ClassVar[str] = "guidance calibration"
    _error: ClassVar[type] = CalibrationError
    _default_file: ClassVar[str] = "stepcache_guidance_calibration.json"

    def __post_init__(self) -> None:
        check_sizes(self.num_steps, self.lookahead, self.num_samples)
        try:
            check_layout(self.layout)
        except StepCacheError as e:
            raise CalibrationError(str(e)) from None
        if not isinstance(self.components, Mapping) or not self.components:
            raise CalibrationError("a guidance calibration needs at least one component (name -> type).")
        for name, kind in self.components.items():
            if not isinstance(name, str) or not name:
                raise CalibrationError(f"component names must be non-empty strings, got {name!r}.")
            if not isinstance(kind, str) or kind not in COMPONENT_TYPES:
                raise CalibrationError(
                    f"component {name!r} has unknown type {kind!r}; types are {list(COMPONENT_TYPES)}."
                )
        if not isinstance(self.errors, Mapping) or set(self.errors) != set(self.components):
            raise CalibrationError(
                "guidance calibration errors and components name different sets of components."
            )
        shape = (self.num_steps, self.lookahead, len(KINDS))
        errors = {}
        for name, arr in self.errors.items():
            _check_array(f"guidance errors of {name}", arr, shape, finite=False)
            errors[name] = np.asarray(arr, dtype=float)
        if not isinstance(self.meta, Mapping) or not all(isinstance(k, str) for k in self.meta):
            raise CalibrationError(
                f"guidance calibration meta must map strings to values, got {self.meta!r}."
            )
        branch = self.meta.get("uncond_branch", 1)
        if not is_int(branch) or branch not in (0, 1):
            raise CalibrationError(f'meta "uncond_branch" must be the integer 0 or 1, got {branch!r}.')
        object.__setattr__(self, "components", dict(self.components))
        object.__setattr__(self, "errors", errors)
        object.__setattr__(self, "meta", dict(self.meta))

    def curve(self, kind: str, gap: int = 1, type: str | None = None) -> np.ndarray:
        """Per step: the error of ``kind`` at distance ``gap``, averaged over the components (of one
        ``type``, or all)."""
        if not isinstance(kind, str) or kind not in KINDS:
            raise CalibrationError(f"kind must be one of {list(KINDS)}, got {kind!r}.")
        if not is_int(gap) or not 1 <= gap <= self.lookahead:
            raise CalibrationError(
                f"gap must be an integer in 1..{self.lookahead} (the lookahead), got {gap!r}."
            )
        q = KINDS.index(kind)
        names = [n for n, t in self.components.items() if type is None or t == type]
        if not names:
            raise CalibrationError(
                f"this guidance calibration has no component of type {type!r}; it has "
                f"{sorted(set(self.components.values()))}."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps with no earlier output stay NaN
            return np.nanmean(np.stack([self.errors[n][:, gap - 1, q] for n in names]), axis=0)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per component type: each kind's error at gap 1, averaged over steps (what the docs quote)."""
        out: dict[str, dict[str, float]] = {}
        for kind in sorted(set(self.components.values())):
            out[kind] = {k: float(np.nanmean(self.curve(k, 1, kind))) for k in KINDS}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "num_steps": self.num_steps,
            "lookahead": self.lookahead,
            "layout": self.layout,
            "num_samples": self.num_samples,
            "components": dict(self.components),
            "errors": {  # NaN (not measured) and infinities (JSON has none) are written as null
                n: [[[float(v) if np.isfinite(v) else None for v in c] for c in r] for r in e]
                for n, e in self.errors.items()
            },
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "guidance calibration") -> GuidanceCalibration:
        """The calibration in a dict read from a file written by :meth:`save` (:meth:`to_dict`).

        Strict like a calibration file: exact JSON types, errors ``>= 0`` or ``null``, arrays of
        exactly the calibrated shape, known component types; unknown fields and newer format versions
        are refused.

        Raises:
            CalibrationError: naming ``source`` and the field that is wrong.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise CalibrationError(
                f'{source} is not a stepcache guidance calibration (no "format": "{_FORMAT}").'
            )
        check_format_version(data, source, CalibrationError, _FORMAT_VERSION)

        def fail(where: str, what: str) -> CalibrationError:
            return CalibrationError(f"{source} is missing or has malformed field {where}: {what}.")

        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise CalibrationError(f"{source} has unknown field(s) {unknown}; expected {sorted(_FIELDS)}.")
        for key in ("num_steps", "lookahead") + (("num_samples",) if "num_samples" in data else ()):
            if not is_int(data.get(key)):
                raise fail(repr(key), f"must be an integer, got {kind_of(data.get(key))}")
        n, k = data["num_steps"], data["lookahead"]
        if n < 2 or k < 1:
            raise fail("'num_steps' or 'lookahead'", f"must be >= 2 and >= 1, got {n} and {k}")
        if not isinstance(data.get("layout"), str):
            raise fail("'layout'", f"must be a string, got {kind_of(data.get('layout'))}")
        for key in ("components", "errors", "meta"):
            if key in data and not isinstance(data[key], dict):
                raise fail(repr(key), f"must be an object, got {kind_of(data[key])}")
        comps, raw = data.get("components"), data.get("errors")
        if not comps or raw is None:
            raise fail("'components' and 'errors'", "both are needed, with at least one component")
        if set(raw) != set(comps):
            raise fail("'errors'", "must name exactly the components of 'components'")
        errors = {
            name: _table(raw[name], (n, k, len(KINDS)), f"errors[{name!r}]", fail, missing=True)
            for name in comps
        }
        try:
            return cls(
                num_steps=n,
                lookahead=k,
                layout=data["layout"],
                components=comps,
                errors=errors,
                num_samples=data.get("num_samples", 1),
                meta=data.get("meta", {}),
            )
        except CalibrationError as e:
            raise CalibrationError(f"{source}: {e}") from None


_FORMAT = "stepcache-guidance-calibration"
_FORMAT_VERSION = 1
_FIELDS = {"format", "format_version", "num_steps", "lookahead", "layout", "num_samples", "components"}
_FIELDS |= {"errors", "meta"}


class _BranchRecorder:
    """Runs each component normally and records, per item, the three errors of :data:`KINDS`."""

    def __init__(
        self,
        components: Sequence[Component],
        lookahead: int,
        tracker: StepTracker,
        layout: str,
        uncond_branch: int,
    ) -> None:
        self.k, self.tracker, self.layout, self.uncond_branch = lookahead, tracker, layout, uncond_branch
        self.names = [c.name for c in components]
        self.hist: dict[str, deque] = {}
        self.cond: dict[str, torch.Tensor] = {}  # split calls: the conditional output of this step
        self.sums: dict[str, dict[tuple[int, int, int], list[float]]] = {}
        self.generations: list[dict[str, np.ndarray]] = []
        self.max_step = -1

    def intercept(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        name = comp.name

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self._record(name, out)
            return out

        return forward

    def _record(self, name: str, out: Any) -> None:
        flat = flatten(out)
        if flat is None:
            return
        step = self.tracker.step
        if self.layout == "split":
            if self.tracker.branch != self.uncond_branch:
                self.cond[name] = flat
                return
            c, u = self.cond.pop(name, None), flat
            if c is None or c.shape != u.shape:
                return
        else:
            if flat.shape[0] % 2:
                raise CalibrationError(
                    f"layout={self.layout!r} expects stacked guidance batches (an even batch), but {name} "
                    f"got a batch of {flat.shape[0]}: is guidance on, and batched? For two calls per step "
                    "pass layout='split'."
                )
            h = flat.shape[0] // 2
            c, u = (flat[:h], flat[h:]) if self.layout == "cond-first" else (flat[h:], flat[:h])
        hist = self.hist.setdefault(name, deque(maxlen=self.k))
        cn, un = c.abs().sum(1).clamp_min(1e-12), u.abs().sum(1).clamp_min(1e-12)
        sums = self.sums.setdefault(name, {})
        for ps, pc, pu in hist:
            j = step - ps
            if not 1 <= j <= self.k or pc.shape != c.shape:
                continue
            errs = (
                (c - pc).abs().sum(1) / cn,
                (u - pu).abs().sum(1) / un,
                (u - (c + pu - pc)).abs().sum(1) / un,
            )
            for q, e in enumerate(errs):
                sums.setdefault((step, j, q), []).append(float(e.mean()))
        hist.append((step, c, u))
        self.max_step = max(self.max_step, step)

    def finish_generation(self) -> None:
        if self.max_step < 0:
            return
        n = self.max_step + 1
        gen = {}
        for name in self.names:
            arr = np.full((n, self.k, len(KINDS)), np.nan)
            for (s, j, q), vals in self.sums.get(name, {}).items():
                arr[s, j - 1, q] = float(np.mean(vals))
            gen[name] = arr
        self.generations.append(gen)
        self.drop_generation()

    def drop_generation(self) -> None:
        self.hist.clear()
        self.cond.clear()
        self.sums.clear()
        self.max_step = -1


def calibrate_guidance(
    target: Any,
    run: Callable[[], Any] | None = None,
    *,
    inputs: Iterable[Mapping[str, Any]] | None = None,
    num_inference_steps: int | None = None,
    layout: str = "cond-first",
    uncond_branch: int = 1,
    lookahead: int = 2,
    blocks: Any = None,
    components: Any = None,
    types: Iterable[str] | None = None,
    timestep_arg: str | None = None,
    progress: bool = True,
) -> GuidanceCalibration:
    """Record, per component, step and gap, the errors of copying either guidance branch and of the
    guidance-difference stand-in (:class:`GuidanceCalibration`). Generations must use guidance.

    Args:
        target, run, inputs, num_inference_steps: as :func:`stepcache.calibrate`.
        layout: how the branches reach the denoiser: ``"cond-first"`` (one call on ``[cond; uncond]``,
            as the reference model and diffusers' DiT pipeline stack them), ``"uncond-first"``
            (``[uncond; cond]``: PixArt, SD3, most diffusers pipelines) or ``"split"`` (two calls per
            step: Wan, Flux true CFG).
        uncond_branch: with ``"split"``, which call of a step is the unconditional one (0 or 1).
        lookahead: the largest gap ``j`` measured.
    """
    layout = check_layout(layout)
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
        raise CalibrationError(f"lookahead must be a positive integer, got {lookahead!r}.")
    run, _ = generations(target, run, inputs, num_inference_steps)
    comps = discover(target, blocks=blocks, components=components, types=types)
    tracker = StepTracker()
    recorder = _BranchRecorder(comps, lookahead, tracker, layout, uncond_branch)
    tracker.on_generation.append(recorder.finish_generation)
    tracker.on_reset.append(recorder.drop_generation)
    bar = progress_bar(progress, None)
    tracker.on_step.append(lambda _s: bar.update(1) if tracker.branch == 0 else None)
    start = time.perf_counter()

    def check_batch(args: tuple, kwargs: dict) -> None:
        # An even batch without guidance (scale 1) would be split into "branches" of distinct samples.
        if (
            layout != "split"
            and tracker.step == 0
            and tracker.branch == 0
            and not guidance_batch(args, kwargs)
        ):
            raise CalibrationError(
                f"calibrate_guidance with layout={layout!r} needs stacked classifier-free guidance batches "
                "(an even batch of two equal halves), but a generation's denoiser input has no two equal "
                "halves (guidance scale 1, or no guidance): calibrate generations that use guidance, or "
                "pass layout='split' for two calls per step."
            )

    try:
        with intercepted(target, comps, recorder.intercept, tracker, timestep_arg, inspect=check_batch):
            run()
        recorder.finish_generation()
    finally:
        bar.close()
    gens = recorder.generations
    if not gens:
        raise CalibrationError("no denoising step was observed: does `run` call the model?")
    lengths = {next(iter(g.values())).shape[0] for g in gens}
    if len(lengths) != 1:
        raise CalibrationError(
            f"generations had different step counts {sorted(lengths)}; calibrate one at a time."
        )
    if all(np.isnan(g[n]).all() for g in gens for n in g):
        raise CalibrationError(
            "no guidance branch pair was observed: do the generations use guidance (a scale other than 1), "
            f"and does layout={layout!r} match how the pipeline passes the branches?"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (step 0) stay NaN
        errors = {n: np.nanmean(np.stack([g[n] for g in gens]), axis=0) for n in recorder.names}
    return GuidanceCalibration(
        num_steps=lengths.pop(),
        lookahead=lookahead,
        layout=layout,
        components={c.name: c.type for c in comps},
        errors=errors,
        num_samples=len(gens),
        meta={
            "model_class": model_class(target),
            "fingerprint": fingerprint(target),
            "seconds": round(time.perf_counter() - start, 2),
            "uncond_branch": uncond_branch,
        },
    )
