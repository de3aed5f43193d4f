"""The frontier's sweeps (issue 21): every peer over its knob space, but only where it can land on a target.

A setting is worth running only when its compute fraction can come within :data:`TOLERANCE` of a target
fraction (0.25, 0.35, 0.5), since only those points are compared (``frontier_match``). Two kinds:

* **static** settings, whose computations do not depend on the images: the fraction is known before
  running, from the library's own rule replayed here (TaylorSeer's placement, MagCache's accumulated
  ratio error on its calibrated ratios, cache-dit's static step mask, FORA and SmoothCache schedules)
  or from a dry count (one single-image generation under ``peers.count_component_calls``, for PAB and
  FasterCache). Only the settings within the tolerance of a target run; equal placements run once.
  Tests check the replayed rules against counted runs.
* **dynamic** settings (FirstBlockCache, cache-dit's DBCache with or without its TaylorSeer / FoCa
  calibrators), whose computations depend on the features: the threshold is searched per combination
  of the other knobs, coarse to fine: a few coarse thresholds, then per target a bisection (in log
  threshold) between the nearest thresholds that computed too much and too little, until a point lands
  within the tolerance or the probes run out. Every probe is a measured point. Targets below a
  combination's floor (the computations it always makes: warm-up, Fn/Bn blocks, the longest run of
  cached steps it allows) are not searched.

Nothing here runs a model: :func:`static_settings`, :func:`dynamic_settings` and :func:`search` take
the callables that do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.harness import peers

TARGETS = (0.25, 0.35, 0.5)
TOLERANCE = 0.02  # a point counts at a target when its counted fraction is this close (no interpolation)
EPS = 1e-9  # counted fractions are rounded to 4 decimals

STEPCACHE, BASELINE = "stepcache", "baseline"
PEER_LIBRARIES = (peers.DIFFUSERS, peers.CACHE_DIT, peers.SMOOTHCACHE)


def near(fraction: float, targets: Iterable[float], tolerance: float = TOLERANCE) -> bool:
    return any(abs(fraction - t) <= tolerance + EPS for t in targets)


def nearest_gap(fraction: float, targets: Iterable[float]) -> float:
    return min(abs(fraction - t) for t in targets)


# ------------------------------------------------------------------------------------------ the grids
@dataclass(frozen=True)
class Grid:
    """How far each sweep goes: :data:`FULL` (the committed runs) or :data:`QUICK`."""

    taylorseer_intervals: tuple[int, ...] = tuple(range(2, 9))
    taylorseer_orders: tuple[int, ...] = (1, 2)
    #: also the placements with the last step computed (TaylorSeer's ``disable_cache_after_step``)
    taylorseer_last_step: bool = True
    fora_intervals: tuple[int, ...] = tuple(range(2, 9))
    #: cache-dit FoCa on a static step mask: warm-up w, then every i-th step, the last step computed
    mask_intervals: tuple[int, ...] = tuple(range(2, 13))
    mag_max_skip: tuple[int, ...] = (1, 2, 3, 4, 6)
    mag_retention: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    mag_thresholds: int = 241  # log-spaced over 1e-3..10, replayed analytically
    attention_skips: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50)
    db_splits: tuple[tuple[int, int], ...] = ((1, 0), (1, 1), (2, 0), (2, 1), (3, 0))
    db_max_continuous: tuple[int, ...] = (-1, 2)
    #: (family, cache-dit method, TaylorSeer order)
    db_calibrators: tuple[tuple[str, str, int | None], ...] = (
        ("cache-dit/DBCache", "DBCache", None),
        ("cache-dit/DBCache+TaylorSeer", "DBCache+TaylorSeer", 1),
        ("cache-dit/DBCache+TaylorSeer", "DBCache+TaylorSeer", 2),
        ("cache-dit/DBCache+FoCa", "DBCache+FoCa", None),
    )
    fb_coarse: tuple[float, ...] = (0.08, 0.2, 0.5)
    db_coarse: tuple[float, ...] = (0.1, 0.3, 0.8)
    threshold_range: tuple[float, float] = (0.005, 4.0)
    refine: int = 4  # bisection probes per target and combination, at most
    #: at most this many static settings per family and target (nearest the target first); None: all
    per_target: int | None = None
    quick: bool = False

    def db_warmups(self, n: int) -> tuple[int, ...]:
        """cache-dit's ``max_warmup_steps``: 1, and about a tenth of the steps."""
        return (1,) if self.quick else tuple(sorted({1, max(2, round(0.1 * n))}))


FULL = Grid()
QUICK = Grid(
    taylorseer_intervals=(2, 3, 4, 5),
    taylorseer_last_step=False,
    fora_intervals=(2, 3, 4),
    mask_intervals=(2, 4, 8),
    mag_max_skip=(3,),
    mag_retention=(0.1,),
    attention_skips=(),
    db_splits=((1, 0),),
    db_max_continuous=(-1,),
    db_calibrators=(("cache-dit/DBCache", "DBCache", None), ("cache-dit/DBCache+FoCa", "DBCache+FoCa", None)),
    fb_coarse=(0.2,),
    db_coarse=(0.3,),
    refine=1,
    per_target=1,
    quick=True,
)


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Setting:
    """One point to run: a peer method, or a stepcache schedule (the FORA baselines)."""

    family: str
    knob: str
    method: peers.PeerMethod | None = None
    schedule: Any = None  # a stepcache Schedule
    predicted: float | None = None  # the compute fraction known before running
    key: Any = None  # equal keys compute the same steps with the same forecasts: run once
    info: dict[str, Any] = field(default_factory=dict)


def _pick(settings: list[Setting], targets: Sequence[float], grid: Grid) -> list[Setting]:
    """Those within the tolerance of a target, each placement once, at most ``grid.per_target`` per
    target (nearest first), in their original order."""
    seen: set[Any] = set()
    unique = []
    for s in settings:
        k = (s.family, s.key if s.key is not None else s.knob)
        if s.predicted is not None and near(s.predicted, targets) and k not in seen:
            seen.add(k)
            unique.append(s)
    if grid.per_target is None:
        return unique
    keep: set[int] = set()
    for t in targets:
        close = [i for i, s in enumerate(unique) if abs(s.predicted - t) <= TOLERANCE + EPS]  # type: ignore[operator]
        close.sort(key=lambda i: abs(unique[i].predicted - t))  # type: ignore[operator]
        keep.update(close[: grid.per_target])
    return [s for i, s in enumerate(unique) if i in keep]


def taylorseer_mask(n: int, interval: int, warmup: int, cooldown: int | None = None) -> tuple[int, ...]:
    """Which steps diffusers' TaylorSeer computes (``TaylorSeerCacheHook._measure_should_compute``):
    every step before ``warmup``, each step ``s`` with ``(s - warmup - 1) % interval == 0`` (so step
    ``warmup`` itself is forecast), and every step from ``cooldown`` on."""
    return tuple(
        int(s < warmup or (s - warmup - 1) % interval == 0 or (cooldown is not None and s >= cooldown))
        for s in range(n)
    )


def taylorseer_settings(n: int, targets: Sequence[float], grid: Grid = FULL) -> list[Setting]:
    """diffusers TaylorSeer: interval x warm-up 1..n/2 x order (x the last step computed or not)."""
    out = []
    for order in grid.taylorseer_orders:
        for interval in grid.taylorseer_intervals:
            for warm in range(1, max(1, n // 2) + 1):
                for cooldown in (None, n - 1) if grid.taylorseer_last_step else (None,):
                    mask = taylorseer_mask(n, interval, warm, cooldown)
                    knob = f"interval={interval}, warm-up={warm}, order {order}" + (
                        ", last step computed" if cooldown is not None else ""
                    )
                    method = peers.taylorseer(interval, warm, order, knob=knob, cooldown=cooldown)
                    out.append(
                        Setting("diffusers/TaylorSeer", knob, method, None, sum(mask) / n, (mask, order))
                    )
    return _pick(out, targets, grid)


def fora_settings(n: int, targets: Sequence[float], grid: Grid = FULL) -> list[Setting]:
    """FORA (copy) and FORA+forecast, every i-th step and the last: stepcache's ``fora`` schedules."""
    from stepcache.policies import fora

    out = []
    for forecast in (False, True):
        family = f"{BASELINE}/FORA" + ("+forecast" if forecast else "")
        for interval in grid.fora_intervals:
            sched = fora(n, interval, forecast=forecast)
            key = tuple(sorted(sched.plans.items()))
            out.append(Setting(family, f"interval={interval}", None, sched, sched.compute_fraction, key))
    return _pick(out, targets, grid)


def mask_fraction(mask: Sequence[int], fn: int, bn: int, depth: int) -> float:
    """cache-dit's compute fraction for a step mask: the Fn first and Bn last blocks run at every step,
    the others at the steps the mask computes."""
    n = len(mask)
    return (fn + bn) / depth + (sum(mask) / n) * (depth - fn - bn) / depth


def static_mask(n: int, warmup: int, interval: int) -> tuple[int, ...]:
    """Compute the ``warmup`` first steps, every ``interval``-th step after them and the last step."""
    return tuple(int(s < warmup or (s - warmup) % interval == 0 or s == n - 1) for s in range(n))


def foca_mask_settings(n: int, depth: int, targets: Sequence[float], grid: Grid = FULL) -> list[Setting]:
    """cache-dit FoCa on a static step mask (``steps_computation_policy="static"``, F1B0)."""
    out = []
    for interval in grid.mask_intervals:
        for warm in range(1, max(1, n // 2) + 1):
            mask = static_mask(n, warm, interval)
            params = {
                "Fn_compute_blocks": 1,
                "Bn_compute_blocks": 0,
                "residual_diff_threshold": 0.08,
                "max_warmup_steps": warm,
                "max_continuous_cached_steps": -1,
                "steps_computation_mask": list(mask),
                "steps_computation_policy": "static",
            }
            knob = f"F1B0, warm-up={warm}, every {interval}"
            method = peers.PeerMethod(peers.CACHE_DIT, "DBCache+FoCa", knob, params)
            frac = mask_fraction(mask, 1, 0, depth)
            out.append(Setting("cache-dit/FoCa (static mask)", knob, method, None, frac, (mask, warm)))
    return _pick(out, targets, grid)


def magcache_mask(
    ratios: Sequence[float], n: int, threshold: float, max_skip: int, retention: float
) -> tuple[int, ...]:
    """Which steps diffusers' MagCache computes (``MagCacheHeadHook.new_forward``), replayed on its
    calibrated ratios with the same float32 tensor arithmetic: it depends on nothing else."""
    mag = torch.tensor([float(r) for r in ratios])  # MagCacheConfig makes a float32 tensor of them
    retention_step = int(retention * n + 0.5)
    acc_ratio: Any = 1.0
    acc_steps = 0
    acc_err: Any = 0.0
    out = []
    for step in range(n):
        compute = True
        scale = mag[step] if step < len(mag) else 1.0
        if step >= retention_step:
            acc_ratio *= scale
            acc_steps += 1
            acc_err += abs(1.0 - acc_ratio)
            if step > 0 and acc_err <= threshold and acc_steps <= max_skip:  # step 0 has no residual yet
                compute = False
            else:
                acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
        out.append(int(compute))
    return tuple(out)


def magcache_settings(
    ratios: Sequence[float], n: int, targets: Sequence[float], grid: Grid = FULL
) -> list[Setting]:
    """diffusers MagCache: threshold x max skip steps (K) x retention ratio, on the calibrated ratios."""
    thresholds = [float(f"{t:.4g}") for t in torch.logspace(-3, 1, grid.mag_thresholds).tolist()]
    out = []
    for max_skip in grid.mag_max_skip:
        for retention in grid.mag_retention:
            runs: dict[tuple[int, ...], list[float]] = {}
            for th in thresholds:
                runs.setdefault(magcache_mask(ratios, n, th, max_skip, retention), []).append(th)
            for mask, ths in runs.items():
                th = ths[len(ths) // 2]  # the middle one of the thresholds that give it
                knob = f"threshold={th:g}, K={max_skip}, retention={retention:g}"
                params = {
                    "threshold": th,
                    "max_skip_steps": max_skip,
                    "retention_ratio": retention,
                    "mag_ratios": [float(r) for r in ratios],
                }
                method = peers.PeerMethod(peers.DIFFUSERS, "MagCache", knob, params)
                out.append(Setting("diffusers/MagCache", knob, method, None, sum(mask) / n, mask))
    return _pick(out, targets, grid)


def smoothcache_settings(calibration: Any, targets: Sequence[float], grid: Grid = FULL) -> list[Setting]:
    """dit-smoothcache running SmoothCache schedules (stepcache's ``from_calibration``): every alpha
    where the schedule changes (the calibrated error values), within the tolerance of a target."""
    import numpy as np

    from stepcache.errors import ScheduleError
    from stepcache.policies import from_calibration

    tables = calibration.type_errors()
    values = np.unique(np.concatenate([t[np.isfinite(t)].ravel() for t in tables.values()]))
    out = []
    seen: set[Any] = set()
    for alpha in values[values > 0]:
        try:
            sched = from_calibration(calibration, float(alpha))
        except ScheduleError:
            continue
        key = tuple(sorted(sched.plans.items()))
        if key in seen or not near(sched.compute_fraction, targets):
            continue
        seen.add(key)
        knob = f"alpha={float(alpha):.4g}"
        method = peers.PeerMethod(
            peers.SMOOTHCACHE, "SmoothCacheHelper", knob, {"schedule": sched.to_smoothcache()}
        )
        out.append(
            Setting("dit-smoothcache/SmoothCacheHelper", knob, method, None, sched.compute_fraction, key)
        )
    return _pick(out, targets, grid)


def attention_only_settings(
    n: int, targets: Sequence[float], dry: Callable[[peers.PeerMethod], float], grid: Grid = FULL
) -> list[Setting]:
    """diffusers PAB and FasterCache (attention reuse only: at least half of the calls always run), by
    their attention skip range; their fractions come from dry counts (one single-image generation)."""
    out = []
    for skip in (s for s in grid.attention_skips if s <= n):
        if not near(0.5 + 0.5 / skip, targets, 2 * TOLERANCE):  # about 1/skip of the attention runs
            continue
        for name, params in (
            ("PAB", {"spatial_attention_timestep_skip_range": (0, 1000)}),
            ("FasterCache", {"spatial_attention_timestep_skip_range": (-1, 681)}),
        ):
            knob = f"attn skip range={skip}"
            method = peers.PeerMethod(
                peers.DIFFUSERS, name, knob, {"spatial_attention_block_skip_range": skip, **params}
            )
            out.append(Setting(f"diffusers/{name}", knob, method, None, dry(method), knob))
    return _pick(out, targets, grid)


def static_settings(
    n: int,
    depth: int,
    targets: Sequence[float],
    *,
    calibration: Any,
    mag_ratios: Callable[[], Sequence[float]] | None,
    dry: Callable[[peers.PeerMethod], float] | None,
    available: Mapping[str, Any],
    grid: Grid = FULL,
) -> list[Setting]:
    """Every static setting within the tolerance of a target, peers that are not installed left out."""
    out = fora_settings(n, targets, grid)
    if available.get(peers.DIFFUSERS):
        out += taylorseer_settings(n, targets, grid)
        if mag_ratios is not None:
            out += magcache_settings(mag_ratios(), n, targets, grid)
        if dry is not None:
            out += attention_only_settings(n, targets, dry, grid)
    if available.get(peers.CACHE_DIT):
        out += foca_mask_settings(n, depth, targets, grid)
    if available.get(peers.SMOOTHCACHE):
        out += smoothcache_settings(calibration, targets, grid)
    return out


# ------------------------------------------------------------------------------------------ dynamic
@dataclass(frozen=True)
class Dynamic:
    """A dynamic method with every knob fixed but its threshold."""

    family: str
    library: str
    name: str
    label: str  # the fixed knobs, e.g. "F1B0, warm-up=1, max continuous cached=2"
    params: Mapping[str, Any]
    threshold_key: str
    floor: float  # the lowest compute fraction it can reach
    coarse: tuple[float, ...]

    def method(self, threshold: float) -> peers.PeerMethod:
        knob = (f"{self.label}, " if self.label else "") + f"threshold={threshold:g}"
        return peers.PeerMethod(self.library, self.name, knob, {**self.params, self.threshold_key: threshold})


def dbcache_floor(n: int, depth: int, fn: int, bn: int, warmup: int, max_continuous: int) -> float:
    """The fewest computations DBCache can make: the warm-up steps whole, the Fn + Bn blocks at every
    other step, and (with a limit of consecutive cached steps) one whole step after each run of them."""
    rest = max(0, n - warmup)
    whole = warmup + (rest // (max_continuous + 1) if max_continuous >= 0 else 0)
    return (whole * depth + (n - whole) * (fn + bn)) / (n * depth)


def dynamic_settings(n: int, depth: int, available: Mapping[str, Any], grid: Grid = FULL) -> list[Dynamic]:
    out = []
    if available.get(peers.DIFFUSERS):
        floor = (depth + (n - 1)) / (n * depth)  # the first step whole, then the first block
        out.append(
            Dynamic(
                "diffusers/FirstBlockCache", peers.DIFFUSERS, "FirstBlockCache", "", {}, "threshold", floor,
                grid.fb_coarse,
            )
        )  # fmt: skip
    if available.get(peers.CACHE_DIT):
        for family, name, order in grid.db_calibrators:
            for fn, bn in grid.db_splits:
                if fn + bn >= depth:
                    continue
                for warm in grid.db_warmups(n):
                    for mc in grid.db_max_continuous:
                        params: dict[str, Any] = {
                            "Fn_compute_blocks": fn,
                            "Bn_compute_blocks": bn,
                            "max_warmup_steps": warm,
                            "max_continuous_cached_steps": mc,
                        }
                        label = f"F{fn}B{bn}, warm-up={warm}" + (
                            f", max continuous cached={mc}" if mc >= 0 else ""
                        )
                        if order is not None:
                            params["taylorseer_order"] = order
                            label += f", order {order}"
                        floor = dbcache_floor(n, depth, fn, bn, warm, mc)
                        out.append(
                            Dynamic(
                                family, peers.CACHE_DIT, name, label, params, "residual_diff_threshold", floor,
                                grid.db_coarse,
                            )
                        )  # fmt: skip
    return out


STEP = 3.0  # how far the threshold search steps beyond its probes when the target is not bracketed


def search(
    measure: Callable[[float], float | None],
    targets: Sequence[float],
    *,
    floor: float,
    coarse: Sequence[float],
    lo: float,
    hi: float,
    refine: int,
    tolerance: float = TOLERANCE,
) -> dict[float, float | None]:
    """Thresholds probed (-> counted fraction, or None where the run failed), coarse to fine.

    The compute fraction falls as the threshold rises. After the coarse thresholds, for each target
    the combination can reach (``floor``), while no probe lies within ``tolerance`` of it, at most
    ``refine`` times: probe the geometric middle of the highest threshold that computed more than the
    target and the lowest higher one that computed less; where one side is missing, step :data:`STEP`
    times beyond the other (within ``lo``..``hi``). Thresholds are rounded to 4 significant digits, so
    a resumed run proposes the same ones.
    """
    seen: dict[float, float | None] = {}

    def probe(th: float) -> None:
        th = float(f"{th:.4g}")
        if th not in seen:
            seen[th] = measure(th)

    reachable = [t for t in targets if floor <= t + tolerance + EPS]
    if not reachable:
        return seen
    for th in coarse:
        probe(th)
    for t in reachable:
        for _ in range(refine):
            ok = {th: f for th, f in seen.items() if f is not None}
            if any(abs(f - t) <= tolerance + EPS for f in ok.values()):
                break
            above = [th for th, f in ok.items() if f > t]  # computed too much: the threshold must rise
            a = max(above, default=None)
            b = min((th for th, f in ok.items() if f < t and (a is None or th > a)), default=None)
            if a is None and b is None:  # every probe failed
                nxt = math.sqrt(lo * hi)
            elif a is None:  # step down from the lowest threshold that computed too little
                nxt = max(lo, b / STEP)  # type: ignore[operator]
            elif b is None:
                nxt = min(hi, a * STEP)
            else:  # bisect the bracket
                nxt = math.sqrt(a * b)
            nxt = float(f"{nxt:.4g}")
            if nxt in seen or (a is not None and nxt <= a) or (b is not None and nxt >= b):
                break
            probe(nxt)
    return seen


def dynamic_bound(d: Dynamic, targets: Sequence[float], grid: Grid) -> int:
    """The most probes :func:`search` makes for ``d``."""
    reachable = [t for t in targets if d.floor <= t + TOLERANCE + EPS]
    return len(d.coarse) + grid.refine * len(reachable) if reachable else 0
