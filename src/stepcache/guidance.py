"""Guidance-aware caching: calibrate the two guidance branches apart, and stand in for one of them.

Under classifier-free guidance a denoiser evaluates every step twice, for the conditional and the
unconditional input, and the two drift differently from step to step. A plain schedule reuses both
branches at the same steps. Two finer moves are possible at a step the schedule computes:

* **per-branch reuse** (``mode="reuse"``): compute the conditional branch, reuse the unconditional
  branch's output of the last full computation: half the work of that component at that step;
* **guidance-difference reuse** (``mode="difference"``): compute the conditional branch and stand in
  for the unconditional one with ``cond_now + (uncond - cond)`` of the last full computation, the
  reuse FasterCache (arXiv 2410.19355) applies to the whole model output, here per component.

:func:`calibrate_guidance` measures, per component, step and gap ``j``, the relative L1 error of each
stand-in and of copying either branch (:class:`GuidanceCalibration`); :class:`GuidanceReuse` is the
static plan (per component, per step: stand in for the unconditional branch or not), built from the
calibration by a threshold or a compute fraction on top of any :class:`~stepcache.Schedule`, and
applied with ``stepcache.cache(pipe, schedule, guidance=plan)``.

The runtime part is :mod:`stepcache.runtime.guided`. Eager calls only (under ``torch.compile`` the
first compiled call raises a clear error), no ``storage_dtype``/``offload`` with it.
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
from torch import nn
from tqdm.auto import tqdm

from ._hub import HubValue
from .calibration import _flatten, _progress
from .discovery import Component, denoisers_of, discover
from .errors import CalibrationError, ScheduleError
from .policies import optimal_schedule
from .policies._budget import calibration_components
from .runtime.guided import LAYOUTS, MODES
from .runtime.introspect import fingerprint, model_class
from .runtime.session import Session
from .runtime.steps import StepTracker
from .schedule import COMPUTE, Schedule, match_keys

__all__ = ["KINDS", "GuidanceCalibration", "GuidanceReuse", "calibrate_guidance", "tune_guidance"]

#: What a guidance calibration measures, along its last axis: copying the conditional output,
#: copying the unconditional output (per-branch reuse), and the guidance-difference stand-in.
KINDS = ("cond", "uncond", "difference")
_KIND_OF_MODE = {"reuse": 1, "difference": 2}


def _check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ScheduleError(
            f"layout must be one of {list(LAYOUTS)} (how the pipeline passes the guidance branches: stacked "
            f"in one batch, conditional half first or unconditional first, or as two calls), got {layout!r}."
        )
    return str(layout)


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ScheduleError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    return str(mode)


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
                layout=_check_layout(data["layout"]),
                components=dict(data["components"]),
                errors=errors,
                num_samples=int(data.get("num_samples", 1)),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(f"{source} is malformed ({type(e).__name__}: {e}).") from None


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
        _check_mode(self.mode)
        _check_layout(self.layout)
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ScheduleError(f"num_steps must be an integer >= 2, got {self.num_steps!r}.")
        if self.uncond_branch not in (0, 1):
            raise ScheduleError(f"uncond_branch must be 0 or 1, got {self.uncond_branch!r}.")
        plans = {}
        for key, plan in dict(self.plans).items():
            plan = tuple(bool(v) for v in plan)
            if len(plan) != self.num_steps:
                raise ScheduleError(
                    f"guidance plan {key!r} has {len(plan)} steps, the plan is for {self.num_steps}."
                )
            plans[str(key)] = plan
        object.__setattr__(self, "plans", plans)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_calibration(
        cls, gcal: GuidanceCalibration, schedule: Schedule, threshold: float, *, mode: str = "difference"
    ) -> GuidanceReuse:
        """Stand in wherever the calibrated error of ``mode`` is at most ``threshold``: walking each
        component's compute steps, a step stands in when its distance ``j`` to the last full
        computation is within the calibration's lookahead and ``errors[s, j - 1]`` is small enough."""
        mode = _check_mode(mode)
        if gcal.num_steps != schedule.num_steps:
            raise ScheduleError(
                f"the guidance calibration has {gcal.num_steps} steps, the schedule {schedule.num_steps}."
            )
        q = _KIND_OF_MODE[mode]
        resolved = schedule.resolve(calibration_components(gcal))
        plans = {}
        for name, plan in resolved.items():
            err = gcal.errors[name]
            skip = [False] * len(plan)
            last = None
            for s, v in enumerate(plan):
                if v != COMPUTE:
                    continue
                j = None if last is None else s - last
                if (
                    j is not None
                    and j <= gcal.lookahead
                    and float(np.nan_to_num(err[s, j - 1, q], nan=np.inf)) <= threshold
                ):
                    skip[s] = True
                else:
                    last = s
            plans[name] = tuple(skip)
        return cls(
            schedule.num_steps,
            plans,
            mode=mode,
            layout=gcal.layout,
            uncond_branch=int(gcal.meta.get("uncond_branch", 1)),
            meta={"threshold": float(threshold), "model_class": gcal.meta.get("model_class")},
        )

    @classmethod
    def for_compute_fraction(
        cls, gcal: GuidanceCalibration, schedule: Schedule, fraction: float, *, mode: str = "difference"
    ) -> GuidanceReuse:
        """The smallest threshold whose plan brings ``schedule`` to at most ``fraction`` (every halved
        call counts half); raises if even standing in wherever possible does not get there."""
        comps = calibration_components(gcal)
        q = _KIND_OF_MODE[_check_mode(mode)]
        values = sorted(
            {float(v) for n in gcal.components for v in gcal.errors[n][:, :, q].ravel() if v == v}
        )
        lowest = cls.from_calibration(gcal, schedule, np.inf, mode=mode).compute_fraction(schedule, comps)
        if lowest > fraction + 1e-9:
            raise ScheduleError(
                f"standing in for the unconditional branch at every compute step of this schedule still "
                f"leaves a compute fraction of {lowest:.3f} > {fraction}: "
                "start from a schedule with a lower fraction."
            )
        lo, hi = 0, len(values) - 1  # the first threshold whose plan is within the fraction
        while lo < hi:
            mid = (lo + hi) // 2
            if (
                cls.from_calibration(gcal, schedule, values[mid], mode=mode).compute_fraction(schedule, comps)
                <= fraction + 1e-9
            ):
                hi = mid
            else:
                lo = mid + 1
        return cls.from_calibration(gcal, schedule, values[lo] if values else np.inf, mode=mode)

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
            "format": "stepcache-guidance-reuse",
            "format_version": 1,
            "num_steps": self.num_steps,
            "mode": self.mode,
            "layout": self.layout,
            "uncond_branch": self.uncond_branch,
            "plans": {k: [int(v) for v in p] for k, p in self.plans.items()},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "guidance reuse plan") -> GuidanceReuse:
        if not isinstance(data, dict) or data.get("format") != "stepcache-guidance-reuse":
            raise ScheduleError(f"{source} is not a stepcache guidance reuse plan.")
        try:
            return cls(
                num_steps=int(data["num_steps"]),
                plans={k: tuple(bool(v) for v in p) for k, p in data["plans"].items()},
                mode=data.get("mode", "difference"),
                layout=data.get("layout", "cond-first"),
                uncond_branch=int(data.get("uncond_branch", 1)),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ScheduleError(f"{source} is malformed ({type(e).__name__}: {e}).") from None


# -------------------------------------------------------------------------------- calibration
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
        flat = _flatten(out)
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
    layout = _check_layout(layout)
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
        raise CalibrationError(f"lookahead must be a positive integer, got {lookahead!r}.")
    if run is None:
        if inputs is None or isinstance(target, nn.Module):
            raise CalibrationError("pass run=<callable doing generations>, or a pipeline and inputs=[{...}].")
        inputs = list(inputs)
        extra = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}

        def run() -> None:
            for kwargs in inputs:
                target(**{**extra, **kwargs})

    models = [m for _, m in denoisers_of(target)]
    comps = discover(target, blocks=blocks, components=components, types=types)
    tracker = StepTracker()
    recorder = _BranchRecorder(comps, lookahead, tracker, layout, uncond_branch)
    tracker.on_generation.append(recorder.finish_generation)
    tracker.on_reset.append(recorder.drop_generation)
    bar = _progress(progress, None)
    tracker.on_step.append(lambda _s: bar.update(1) if tracker.branch == 0 else None)
    start = time.perf_counter()
    try:
        with Session(models, comps, recorder.intercept, tracker, timestep_arg=timestep_arg), torch.no_grad():
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


# -------------------------------------------------------------------------------- policy
def tune_guidance(
    target: Any,
    run: Callable[[], Any],
    fraction: float,
    *,
    calibration: Any,
    guidance: GuidanceCalibration,
    schedule: Schedule | None = None,
    raise_by: Sequence[float] = (0.05, 0.1, 0.2),
    mode: str = "difference",
    objective: str = "worst-25%",
    validation: float | int | None = None,
    progress: bool = True,
) -> tuple[Schedule, GuidanceReuse | None]:
    """Closed loop: stand in for the unconditional branch only where it beats the plain schedule.

    Candidates at ``fraction``: ``schedule`` alone (default ``optimal_schedule(calibration, fraction)``,
    a tuned schedule is a better start), and for each ``d`` in ``raise_by`` the optimal schedule at
    ``fraction + d`` brought back to ``fraction`` by :meth:`GuidanceReuse.for_compute_fraction`. Each is
    replayed on ``run`` (fixed seeds, final samples along dimension 0, as :func:`stepcache.tune`) and
    scored per sample by ``objective`` against the uncached samples; the best two on the fit samples are
    decided on the held-out ones. Whether stand-ins pay depends on the guidance scale: the stand-in's
    error enters the guided prediction ``u + w (c - u)`` multiplied by ``w - 1``, while copying both
    branches keeps most of ``c - u`` (docs/guidance.md has the measurements).

    Returns:
        ``(schedule, plan)``: ``plan`` is None when the plain schedule won; pass both to
        ``stepcache.cache(target, schedule, guidance=plan)``. The scores are in ``schedule.meta``.
    """
    from .policies._plan import check_fraction
    from .policies.tuned import _db, _rows, _split, objective_function
    from .runtime import cache
    from .runtime.introspect import final_samples

    check_fraction(fraction)
    reduce = objective_function(objective)
    _check_mode(mode)
    plain = schedule if schedule is not None else optimal_schedule(calibration, fraction)
    candidates: dict[str, tuple[Schedule, GuidanceReuse | None]] = {"plain": (plain, None)}
    for d in raise_by:
        base = optimal_schedule(calibration, min(1.0, fraction + d))
        try:
            plan = GuidanceReuse.for_compute_fraction(guidance, base, fraction, mode=mode)
        except ScheduleError:
            continue  # stand-ins cannot bring this base down to the fraction
        candidates[f"optimal at {fraction + d:.3g} + {mode} stand-ins"] = (base, plan)
    with torch.no_grad():
        reference = _rows(final_samples(run(), ScheduleError))
    fit_rows, val_rows = _split(reference.shape[0], validation)
    fit_rows = fit_rows if val_rows else list(range(reference.shape[0]))
    scores: dict[str, tuple[float, float | None]] = {}
    for label, (sched, plan) in tqdm(candidates.items(), desc="guidance", disable=not progress, leave=False):
        with cache(target, sched, guidance=plan, count_macs=False), torch.no_grad():
            out = _rows(final_samples(run(), ScheduleError))
        mse = (out - reference).pow(2).mean(dim=1)
        e = _db(mse)
        scores[label] = (
            reduce(e[fit_rows], mse[fit_rows]),
            reduce(e[val_rows], mse[val_rows]) if val_rows else None,
        )
    leaders = sorted(scores, key=lambda k: scores[k][0])[:2]

    def held(label: str) -> float:  # the validation score (the fit score when nothing is held out)
        fit, val = scores[label]
        return fit if val is None else val

    chosen = min(leaders, key=held)
    sched, chosen_plan = candidates[chosen]
    meta = {
        **sched.meta,
        "guidance_tuning": {
            "chosen": chosen,
            "objective": objective,
            "mode": mode,
            "scores": {
                k: {"fit": round(f, 3), "validation": None if v is None else round(v, 3)}
                for k, (f, v) in scores.items()
            },
        },
    }
    return Schedule(sched.num_steps, sched.plans, sched.counts, meta), chosen_plan
