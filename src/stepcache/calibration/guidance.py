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
from ..discovery import Component, discover
from ..errors import CalibrationError
from ..guidance import KINDS, check_layout
from ..runtime.introspect import fingerprint, model_class
from ..runtime.steps import StepTracker
from .harness import flatten, generations, intercepted
from .harness import progress as progress_bar

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

    def curve(self, kind: str, gap: int = 1, type: str | None = None) -> np.ndarray:
        """Per step: the error of ``kind`` at distance ``gap``, averaged over the components (of one
        ``type``, or all)."""
        q = KINDS.index(kind)
        names = [n for n, t in self.components.items() if type is None or t == type]
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
            "format": "stepcache-guidance-calibration",
            "format_version": 1,
            "num_steps": self.num_steps,
            "lookahead": self.lookahead,
            "layout": self.layout,
            "num_samples": self.num_samples,
            "components": dict(self.components),
            "errors": {
                n: [[[None if v != v else float(v) for v in c] for c in r] for r in e]
                for n, e in self.errors.items()
            },
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "guidance calibration") -> GuidanceCalibration:
        if not isinstance(data, dict) or data.get("format") != "stepcache-guidance-calibration":
            raise CalibrationError(f"{source} is not a stepcache guidance calibration.")
        try:
            errors = {n: np.array(e, dtype=float) for n, e in data["errors"].items()}
            return cls(
                num_steps=int(data["num_steps"]),
                lookahead=int(data["lookahead"]),
                layout=check_layout(data["layout"]),
                components=dict(data["components"]),
                errors=errors,
                num_samples=int(data.get("num_samples", 1)),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(f"{source} is malformed ({type(e).__name__}: {e}).") from None


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
    try:
        with intercepted(target, comps, recorder.intercept, tracker, timestep_arg):
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
