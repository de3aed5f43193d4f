"""The frontier where users live (issue 15): stepcache vs every peer at matched compute fractions.

On the shipped reference DiTs (DDPM model: DDIM / DPM-Solver++; flow model: flow-Euler), for each
configuration (sampler, steps, guidance scale), every method is swept over its knob and each point is
measured the same way: the compute fraction counted by ``peers.count_component_calls`` (attention and
feed-forward computations that really ran, weighted by the batch rows they ran on), and per-image PSNR
of ``--samples`` evaluation images (seed 0, labels ``arange(n) % 10``) against the uncached image of the
same seed, summarised as mean, 5th percentile and worst.

Methods: stepcache's ``tune`` (on ``--tuning`` images of seed 20 000), ``optimal_schedule`` (type and
layer granularity), ``for_compute_fraction`` (SmoothCache by fraction), FORA+forecast as a
non-peer baseline; the installed peers: diffusers (TaylorSeer orders 1 and 2, MagCache calibrated on a
seed-10 000 run, FirstBlockCache, PAB, FasterCache), cache-dit (DBCache, DBCache+TaylorSeer,
DBCache+FoCa, and FoCa on a static step mask) and dit-smoothcache (running our SmoothCache schedules).
stepcache's policies use the shipped calibration when the guidance scale is 1 and one ships, otherwise
``calibrate_reference(..., samples=8, seed=1000, guidance_scale=g)``: what a user with those settings does.

Each family's Pareto frontier (lower fraction, higher mean PSNR) is interpolated linearly at the target
fractions 0.25, 0.35 and 0.5 (mean and p5 with the same weight; no extrapolation beyond 0.01), and the
best stepcache family is compared with the best peer family there.

    python benchmarks/frontier.py                                  # the committed results (~1 h on 2 cores)
    python benchmarks/frontier.py --quick                          # 1 configuration, 8 images, few points
    python benchmarks/frontier.py --configs dpm-20-g4 flow-euler-50-g2:0.25,0.35 --samples 16 --out /tmp/frontier
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stepcache.policies import for_compute_fraction, fora, optimal_schedule

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.perimage import generate, per_image_psnr, summary

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

CONFIGS = (
    "ddim-50-g1",
    "ddim-25-g4",
    "dpm-20-g1",
    "dpm-20-g2",
    "dpm-20-g4",
    "flow-euler-20-g1",
    "flow-euler-20-g4",
    "flow-euler-50-g2",
)
TARGETS = (0.25, 0.35, 0.5)
TUNED_FRACTIONS = (0.25, 0.35, 0.5)
OPTIMAL_FRACTIONS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
SMOOTH_FRACTIONS = (0.25, 0.35, 0.5, 0.6)
SMOOTHCACHE_PKG_FRACTIONS = (0.35, 0.5)  # dit-smoothcache runs these SmoothCache-by-fraction schedules
FORA_INTERVALS = (2, 3, 4)
FOCA_MASK_INTERVALS = (2, 3, 4)  # cache-dit FoCa on a static step mask (no adaptive DBCache decision)
#: extra second-order TaylorSeer settings (interval, warm-up) beyond peer_sweeps' (3, 3) and (4, 3)
TAYLORSEER_ORDER2 = ((2, 3), (5, 3), (6, 3))
TOLERANCE = 0.01  # a frontier point this close to a target fraction counts there (no other extrapolation)
EPS = 1e-9  # fractions are rounded to 4 decimals: 0.25 - 0.24 must count as within 0.01
GOAL_DB = 1.0

EVAL_SEED, TUNING_SEED, CALIBRATION_SEED, MAGCACHE_SEED = 0, 20_000, 1000, 10_000
CALIBRATION_SAMPLES, MAGCACHE_IMAGES = 8, 10

STEPCACHE, BASELINE = "stepcache", "baseline"
PEER_LIBRARIES = ("diffusers", "cache-dit", "dit-smoothcache")


# ------------------------------------------------------------------------------------------ frontier
def frontier(points: Sequence[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """The Pareto-optimal ``(fraction, mean, p5)`` points: no other point has a lower or equal fraction
    and a higher or equal mean (with one of them strictly better); sorted by fraction."""
    out: list[tuple[float, float, float]] = []
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or p[1] > out[-1][1]:  # sorted by fraction: it must beat every cheaper point
            out.append(p)
    return out


def interpolate(
    points: Sequence[tuple[float, float, float]], f: float, tolerance: float = TOLERANCE
) -> tuple[float, float] | None:
    """``(mean, p5)`` of a family's frontier at compute fraction ``f``, or ``None`` outside its range.

    ``points`` are ``(fraction, mean, p5)``; dominated points are dropped first. Between two frontier
    points both values are interpolated linearly with the same weight; outside the frontier's fraction
    range only a point within ``tolerance`` of ``f`` counts (its own values), nothing is extrapolated.
    """
    found = locate(points, f, tolerance)
    return None if found is None else (found[0], found[1])


def locate(
    points: Sequence[tuple[float, float, float]], f: float, tolerance: float = TOLERANCE
) -> tuple[float, float, float, float] | None:
    """:func:`interpolate` plus the fractions of the two frontier points it used: ``(mean, p5, lo, hi)``."""
    front = frontier(points)
    if not front:
        return None
    first, last = front[0], front[-1]
    if f < first[0]:
        return (first[1], first[2], first[0], first[0]) if first[0] - f <= tolerance + EPS else None
    if f > last[0]:
        return (last[1], last[2], last[0], last[0]) if f - last[0] <= tolerance + EPS else None
    for a, b in itertools.pairwise(front):
        if a[0] <= f <= b[0]:
            if f == a[0] or f == b[0]:
                hit = a if f == a[0] else b
                return (hit[1], hit[2], hit[0], hit[0])
            w = (f - a[0]) / (b[0] - a[0])
            return (a[1] + w * (b[1] - a[1]), a[2] + w * (b[2] - a[2]), a[0], b[0])
    return (last[1], last[2], last[0], last[0])  # f equals the single frontier point


def is_peer(family: str) -> bool:
    return family.split("/", 1)[0] in PEER_LIBRARIES


def matched_rows(points: list[dict[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """Per target fraction: every family's interpolated (mean, p5), the best stepcache and best peer
    family, margins and whether the goal (stepcache mean >= best peer mean + 1 dB and stepcache p5 >=
    that peer's p5) holds."""
    by_family: dict[str, list[tuple[float, float, float]]] = {}
    for p in points:
        if "error" not in p:
            by_family.setdefault(p["family"], []).append((p["compute_fraction"], p["mean_db"], p["p5_db"]))
    rows = []
    for f in targets:
        located = {fam: locate(pts, f) for fam, pts in by_family.items()}
        values = {fam: v for fam, v in located.items() if v is not None}
        ours = {fam: v for fam, v in values.items() if fam.startswith(STEPCACHE + "/")}
        theirs = {fam: v for fam, v in values.items() if is_peer(fam)}
        row: dict[str, Any] = {
            "target": f,
            "families": {
                fam: {"mean_db": r2(v[0]), "p5_db": r2(v[1]), "between": [v[2], v[3]]}
                for fam, v in sorted(values.items())
            },
        }
        best = max(ours, key=lambda k: ours[k][0]) if ours else None
        peer = max(theirs, key=lambda k: theirs[k][0]) if theirs else None
        peer_p5 = max(theirs, key=lambda k: theirs[k][1]) if theirs else None
        row["stepcache"] = best and {
            "family": best,
            "mean_db": r2(ours[best][0]),
            "p5_db": r2(ours[best][1]),
            "between": [ours[best][2], ours[best][3]],
        }
        row["peer"] = peer and {
            "family": peer,
            "mean_db": r2(theirs[peer][0]),
            "p5_db": r2(theirs[peer][1]),
            "between": [theirs[peer][2], theirs[peer][3]],
        }
        row["peer_best_p5"] = peer_p5 and {"family": peer_p5, "p5_db": r2(theirs[peer_p5][1])}
        if best and peer and peer_p5:
            m, p = ours[best], theirs[peer]
            row["margin_mean_db"] = r2(m[0] - p[0])
            row["margin_p5_db"] = r2(m[1] - p[1])
            row["margin_p5_vs_best_p5_db"] = r2(m[1] - theirs[peer_p5][1])
            row["goal_met"] = bool(m[0] >= p[0] + GOAL_DB and m[1] >= p[1])
            row["goal_met_vs_best_p5"] = bool(m[0] >= p[0] + GOAL_DB and m[1] >= theirs[peer_p5][1])
        else:
            row["goal_met"] = row["goal_met_vs_best_p5"] = None
        row["at_most"] = at_most_row(points, f)
        rows.append(row)
    return rows


def best_at_most(
    points: list[dict[str, Any]], f: float, keep: Callable[[str], bool], tolerance: float = TOLERANCE
) -> dict[str, Any] | None:
    """The measured point (no interpolation) with the highest mean among the families ``keep`` accepts
    whose compute fraction is at most ``f`` (+ ``tolerance``): what a user gets for that budget."""
    ok = [
        p
        for p in points
        if "error" not in p and keep(p["family"]) and p["compute_fraction"] <= f + tolerance + EPS
    ]
    if not ok:
        return None
    best = max(ok, key=lambda p: p["mean_db"])
    return {k: best[k] for k in ("family", "knob", "compute_fraction", "mean_db", "p5_db")}


def at_most_row(points: list[dict[str, Any]], f: float) -> dict[str, Any]:
    ours = best_at_most(points, f, lambda fam: fam.startswith(STEPCACHE + "/"))
    theirs = best_at_most(points, f, is_peer)
    out: dict[str, Any] = {"stepcache": ours, "peer": theirs}
    if ours and theirs:
        out["margin_mean_db"] = r2(ours["mean_db"] - theirs["mean_db"])
        out["margin_p5_db"] = r2(ours["p5_db"] - theirs["p5_db"])
        out["goal_met"] = bool(
            ours["mean_db"] >= theirs["mean_db"] + GOAL_DB and ours["p5_db"] >= theirs["p5_db"]
        )
    else:
        out["goal_met"] = None
    return out


def r2(x: float) -> float:
    return round(float(x), 2)


# ------------------------------------------------------------------------------------------ measuring
def parse_config(spec: str) -> tuple[str, str, int, float]:
    """``"flow-euler-50-g2"`` -> ``("flow", "flow-euler", 50, 2.0)`` (a ``:fractions`` suffix is ignored)."""
    scheduler, steps_s, g = spec.partition(":")[0].rsplit("-", 2)
    if not g.startswith("g"):
        raise SystemExit(f"bad configuration {spec!r}: expected scheduler-steps-gGUIDANCE, e.g. dpm-20-g4")
    return ("flow" if scheduler == "flow-euler" else "ddpm"), scheduler, int(steps_s), float(g[1:])


def thin(items: list[Any], k: int) -> list[Any]:
    """``k`` evenly spaced items (the ends included)."""
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


def peer_points(
    model: torch.nn.Module, steps: int, mag_run: Callable[[], torch.Tensor], quick: bool
) -> list[tuple[str, str, Callable[[], Any], dict[str, Any]]]:
    """``(family, knob, enter, info)`` of every installed peer setting run here."""
    from benchmarks.harness import peers
    from benchmarks.harness.quality import QualityConfig, _keep

    have = peers.available_peers()
    depth = len(model.transformer_blocks)
    lean = QualityConfig(lean=True)  # suite A's trim: cache-dit's F1B0 split, two PAB / FasterCache points
    sweep = [pm for pm in peers.peer_sweeps(steps, depth) if _keep(pm, lean)]
    for interval, warm in (*TAYLORSEER_ORDER2, (2, max(3, round(0.4 * steps)))):
        knob = f"interval={interval}" + (f", warm-up={warm}" if warm != 3 else "") + ", order 2"
        sweep.append(peers.taylorseer(interval, warm, 2, knob=knob))
    warm = max(1, round(0.06 * steps))
    for interval in FOCA_MASK_INTERVALS:
        mask = [int(s < warm or (s - warm) % interval == 0 or s == steps - 1) for s in range(steps)]
        params = {
            "Fn_compute_blocks": 1,
            "Bn_compute_blocks": 0,
            "residual_diff_threshold": 0.08,
            "max_warmup_steps": warm,
            "max_continuous_cached_steps": -1,
            "steps_computation_mask": mask,
            "steps_computation_policy": "static",
        }
        pm = peers.PeerMethod(peers.CACHE_DIT, "DBCache+FoCa", f"F1B0, static mask every {interval}", params)
        sweep.append(pm)
    out = []
    by_family: dict[str, list[Any]] = {}
    for pm in sweep:
        family = f"{pm.library}/{pm.name}"
        if "steps_computation_mask" in pm.params:
            family = f"{pm.library}/FoCa (static mask)"
        by_family.setdefault(family, []).append(pm)
    for family, pms in by_family.items():
        if not have.get(pms[0].library):
            continue
        for pm in thin(pms, 2) if quick else pms:
            out.append(
                (
                    family,
                    pm.knob,
                    lambda pm=pm: peers.apply_peer(
                        pm, model, num_inference_steps=steps, calibration_run=mag_run
                    ),
                    {"params": {k: v for k, v in pm.params.items() if k != "steps_computation_mask"}},
                )
            )
    return out


def run_config(
    spec: str,
    models: dict[str, torch.nn.Module],
    args: argparse.Namespace,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from benchmarks.harness import peers
    from stepcache import Schedule, reference
    from stepcache.errors import ScheduleError
    from stepcache.policies import tune
    from stepcache.runtime import cache

    name, scheduler, steps, guidance = parse_config(spec)
    spec, _, only = spec.partition(":")  # "ddim-50-g1:0.25,0.35": tune at these fractions only
    tuned_fractions = (
        tuple(float(x) for x in only.split(",")) if only else (0.35,) if args.quick else TUNED_FRACTIONS
    )
    model = models[name]
    t0 = time.perf_counter()
    cal = reference.shipped_calibration(scheduler, steps) if guidance == 1.0 else None
    if cal is not None:
        cal_source = f"shipped ({scheduler}-{steps}.json)"
    else:
        cal = reference.calibrate_reference(
            scheduler,
            steps,
            samples=CALIBRATION_SAMPLES,
            seed=CALIBRATION_SEED,
            guidance_scale=guidance,
            progress=False,
            model=name,
        )
        cal_source = (
            f"calibrate_reference(samples={CALIBRATION_SAMPLES}, seed={CALIBRATION_SEED}, "
            f"guidance_scale={guidance:g})"
        )
    cal_s = time.perf_counter() - t0
    progress(f"[{spec}] calibration: {cal_source} ({cal_s:.1f} s)")

    def eval_run() -> torch.Tensor:
        return generate(model, scheduler, steps, args.samples, EVAL_SEED, guidance)

    def tuning_run() -> torch.Tensor:
        return generate(model, scheduler, steps, args.tuning, TUNING_SEED, guidance)

    def mag_run() -> torch.Tensor:  # MagCache's calibration run (kept alive: its ratios are memoised on it)
        return generate(model, scheduler, steps, MAGCACHE_IMAGES, MAGCACHE_SEED, guidance)

    t0 = time.perf_counter()
    base = eval_run()
    base_s = time.perf_counter() - t0
    progress(f"[{spec}] uncached: {args.samples} images in {base_s:.1f} s")

    quick = args.quick
    methods: list[tuple[str, str, Callable[[], Any] | None, dict[str, Any]]] = []

    def add_schedule(family: str, knob: str, build: Callable[[], Schedule]) -> None:
        methods.append((family, knob, None, {"build": build}))

    for i in FORA_INTERVALS if not quick else FORA_INTERVALS[:1]:
        add_schedule(
            f"{BASELINE}/FORA+forecast",
            f"interval={i}",
            lambda i=i: fora(steps, i, forecast=True),
        )
    for f in thin(list(OPTIMAL_FRACTIONS), 2) if quick else OPTIMAL_FRACTIONS:
        for gran in ("type", "layer"):
            add_schedule(
                f"{STEPCACHE}/optimal ({gran})",
                f"fraction={f:g}",
                lambda f=f, gran=gran: optimal_schedule(cal, f, granularity=gran),
            )
    for f in SMOOTH_FRACTIONS[1:3] if quick else SMOOTH_FRACTIONS:
        add_schedule(
            f"{STEPCACHE}/SmoothCache by fraction",
            f"fraction={f:g}",
            lambda f=f: for_compute_fraction(cal, f),
        )
    tuned_info: dict[str, dict[str, Any]] = {}
    for f in tuned_fractions:

        def build(f=f) -> Schedule:
            t = time.perf_counter()
            sched = tune(model, tuning_run, f, calibration=cal, progress=False)
            tuned_info[f"fraction={f:g}"] = {
                "tuning_s": round(time.perf_counter() - t, 1),
                "tuning_replays": sched.meta["tuning"]["runs"],
                "candidate": sched.meta["candidate"],
                "schedule_compute_fraction": round(sched.compute_fraction, 4),
            }
            return sched

        add_schedule(f"{STEPCACHE}/tuned", f"fraction={f:g}", build)
    methods += peer_points(model, steps, mag_run, quick)
    if peers.available_peers().get(peers.SMOOTHCACHE):
        for f in SMOOTHCACHE_PKG_FRACTIONS[:1] if quick else SMOOTHCACHE_PKG_FRACTIONS:
            with contextlib.suppress(ScheduleError):
                sched = for_compute_fraction(cal, f)
                pm = peers.PeerMethod(
                    peers.SMOOTHCACHE,
                    "SmoothCacheHelper",
                    f"SmoothCache by fraction={f:g}",
                    {"schedule": sched.to_smoothcache()},
                )
                methods.append(
                    (
                        f"{pm.library}/{pm.name}",
                        pm.knob,
                        lambda pm=pm: peers.apply_peer(pm, model, num_inference_steps=steps),
                        {"same_schedule_as": f"{STEPCACHE}/SmoothCache by fraction fraction={f:g}"},
                    )
                )

    points: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    images_of: dict[str, torch.Tensor] = {}
    for k, (family, knob, enter, info) in enumerate(methods):
        row: dict[str, Any] = {"family": family, "knob": knob}
        t0 = time.perf_counter()
        try:
            if "build" in info:  # a stepcache schedule: build it first (tune replays the tuning run)
                try:
                    sched = info["build"]()
                except ScheduleError as e:
                    skipped.append({"family": family, "knob": knob, "reason": str(e)})
                    progress(f"[{spec}] {k + 1}/{len(methods)} {family} ({knob}): skipped ({e})")
                    continue
                row["schedule_compute_fraction"] = round(sched.compute_fraction, 4)
                row.update(tuned_info.get(knob, {}) if family.endswith("/tuned") else {})
                ctx: Any = cache(model, sched, count_macs=False)
            else:
                row.update(info)
                assert enter is not None
                ctx = enter()
            with peers.count_component_calls(model) as counts:
                with ctx:
                    t1 = time.perf_counter()
                    images = eval_run()
                    seconds = time.perf_counter() - t1
                frac = float(counts()["fraction"])
        except Exception as e:  # a failing point is recorded, never allowed to stop the run
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            points.append(row)
            progress(f"[{spec}] {k + 1}/{len(methods)} {family} ({knob}): FAILED {row['error']}")
            continue
        row.update({"compute_fraction": round(frac, 4), **summary(per_image_psnr(images, base))})
        row["seconds"] = round(seconds, 2)
        if family == f"{STEPCACHE}/SmoothCache by fraction":
            images_of[f"{family} {knob}"] = images
        same = info.get("same_schedule_as")
        if same in images_of:
            row["bit_identical_to_stepcache"] = bool(torch.equal(images, images_of[same]))
        points.append(row)
        progress(
            f"[{spec}] {k + 1}/{len(methods)} {family} ({knob}): fraction {frac:.3f}, mean "
            f"{row['mean_db']:.2f} dB, p5 {row['p5_db']:.2f}, worst {row['worst_db']:.2f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return {
        "config": spec,
        "model": name,
        "scheduler": scheduler,
        "steps": steps,
        "guidance_scale": guidance,
        "calibration": cal_source,
        "tuned_fractions": list(tuned_fractions),
        "calibration_s": round(cal_s, 1),
        "uncached_s": round(base_s, 2),
        "points": points,
        "skipped": skipped,
        "matched": matched_rows(points, TARGETS),
    }


# ------------------------------------------------------------------------------------------ output
def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


WIDE = 0.15  # an interpolation between frontier points further apart than this is flagged in the tables


def wide(v: dict[str, Any] | None) -> str:
    return "*" if v and v["between"][1] - v["between"][0] > WIDE else ""


def fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def yes_no(x: bool | None) -> str:
    return "-" if x is None else ("yes" if x else "no")


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# The frontier where users live: stepcache vs peers at matched compute fractions",
        "",
        "Generated by "
        + " then ".join(f"`{cmd}`" for cmd in s.get("commands", [s["command"]]))
        + f" in {report.get('seconds', 0):.0f} s in all "
        f"({'complete' if report.get('complete') else 'PARTIAL: ' + str(len(report['configs'])) + ' configurations so far'})"
        + (f" (matched tables recomputed by `{s['rematched']}`)" if s.get("rematched") else "")
        + f", on {s['platform']}, Python {s['python']}, torch {s['torch']} (torch threads: per configuration below); "
        f"peers: {', '.join(f'{k} {v}' for k, v in s['peers'].items())}.",
        "",
        f"Per configuration: {s['samples']} evaluation images (one `sample()` call, seed {s['eval_seed']}, "
        f"labels `arange(n) % 10`), per-image PSNR against the uncached image of the same seed (range 2, "
        f"clamped at 100 dB), summarised as mean and 5th percentile (p5). `tune` replays {s['tuning']} "
        f"images of seed {s['tuning_seed']}; stepcache's calibration is the shipped one at guidance 1, else "
        f"`calibrate_reference(samples={CALIBRATION_SAMPLES}, seed={s['calibration_seed']}, guidance_scale=g)`; "
        f"MagCache calibrates on {MAGCACHE_IMAGES} images of seed {s['magcache_seed']}. Compute fraction: "
        "`peers.count_component_calls` (attention and feed-forward computations that ran, weighted by batch "
        "rows), the same counter for every method.",
        "",
        "Matched fractions: each family's Pareto frontier (lower fraction, higher mean PSNR) is interpolated "
        f"linearly at the target (mean and p5 with the same weight); a family whose frontier does not span "
        f"the target (within {TOLERANCE}) has no value there. Best stepcache = highest mean among "
        "`stepcache/*`; best peer = highest mean among `diffusers/*`, `cache-dit/*`, `dit-smoothcache/*` "
        "(`baseline/FORA+forecast` is neither). Goal: stepcache mean >= best peer mean + 1 dB and "
        "stepcache p5 >= that peer's p5 ('goal vs best p5': against the highest p5 of any peer instead). "
        f"`*`: interpolated between frontier points more than {WIDE} apart in fraction (e.g. a low-fraction "
        "point and a threshold that computes every step at 100 dB): such values flatter the family; the "
        "JSON gives the two fractions (`between`).",
        "",
    ]
    for target in TARGETS:
        lines += [
            f"## Compute fraction {target:g}",
            "",
            "| configuration | best stepcache | mean | p5 | best peer | mean | p5 | margin mean | margin p5 "
            "| best peer p5 (family) | margin vs best p5 | goal | goal vs best p5 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in report["configs"]:
            m = next(r for r in c["matched"] if r["target"] == target)
            sc, pe, bp = m.get("stepcache") or {}, m.get("peer") or {}, m.get("peer_best_p5") or {}
            lines.append(
                f"| {c['config']} | {sc.get('family', '-')}{wide(sc or None)} | {fmt(sc.get('mean_db'))} "
                f"| {fmt(sc.get('p5_db'))} | {pe.get('family', '-')}{wide(pe or None)} | {fmt(pe.get('mean_db'))} "
                f"| {fmt(pe.get('p5_db'))} "
                f"| {fmt(m.get('margin_mean_db'), True)} | {fmt(m.get('margin_p5_db'), True)} "
                f"| {fmt(bp.get('p5_db'))} ({bp.get('family', '-')}) | {fmt(m.get('margin_p5_vs_best_p5_db'), True)} "
                f"| {yes_no(m.get('goal_met'))} | {yes_no(m.get('goal_met_vs_best_p5'))} |"
            )
        lines.append("")
    lines += [
        "## Cross-check without interpolation: the best measured point within each budget",
        "",
        f"Per target f: the measured point with the highest mean PSNR among stepcache's families and among "
        f"the peers' whose compute fraction is at most f + {TOLERANCE} (no interpolation, so no credit for "
        "a wide gap between sweep points); same goal test.",
        "",
        "| configuration | f | stepcache point | fraction | mean | p5 | peer point | fraction | mean | p5 "
        "| margin mean | margin p5 | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["configs"]:
        for m in c["matched"]:
            a = m.get("at_most") or {}
            sc, pe = a.get("stepcache") or {}, a.get("peer") or {}

            def cell(x: dict[str, Any]) -> str:
                if not x:
                    return "- | - | - | -"
                return (
                    f"{x['family']} ({x['knob']}) | {x['compute_fraction']:.3f} | {x['mean_db']:.2f} "
                    f"| {x['p5_db']:.2f}"
                )

            lines.append(
                f"| {c['config']} | {m['target']:g} | {cell(sc)} | {cell(pe)} | "
                f"{fmt(a.get('margin_mean_db'), True)} | {fmt(a.get('margin_p5_db'), True)} "
                f"| {yes_no(a.get('goal_met'))} |"
            )
    lines.append("")
    lines += ["## Per configuration: every family at the target fractions (mean / p5 dB)", ""]
    for c in report["configs"]:
        fams = sorted({f for m in c["matched"] for f in m["families"]} | {p["family"] for p in c["points"]})
        lines += [
            f"### {c['config']}",
            "",
            f"Calibration: {c['calibration']}; `tune` at fractions {', '.join(f'{x:g}' for x in c['tuned_fractions'])}; "
            f"uncached {c['uncached_s']:.1f} s for {s['samples']} images; "
            f"{c.get('threads', s['threads'])} torch thread(s).",
            "",
            "| family | points | fraction range | " + " | ".join(f"f={t:g}" for t in TARGETS) + " |",
            "|---|---|---|" + "---|" * len(TARGETS),
        ]
        for fam in fams:
            ok = [p for p in c["points"] if p["family"] == fam and "error" not in p]
            rng = (
                f"{min(p['compute_fraction'] for p in ok):.3f}..{max(p['compute_fraction'] for p in ok):.3f}"
                if ok
                else "-"
            )
            cells = []
            for m in c["matched"]:
                v = m["families"].get(fam)
                cells.append(f"{v['mean_db']:.2f} / {v['p5_db']:.2f}{wide(v)}" if v else "-")
            lines.append(f"| {fam} | {len(ok)} | {rng} | " + " | ".join(cells) + " |")
        lines.append("")
    failed = [(c["config"], p) for c in report["configs"] for p in c["points"] if "error" in p]
    lines += ["## Failed points", ""]
    if failed:
        lines += ["| configuration | family | knob | error |", "|---|---|---|---|"]
        for cfg, p in failed:
            err = p["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {cfg} | {p['family']} | {p['knob']} | {err[:300]} |")
    else:
        lines.append("None.")
    skipped = [(c["config"], x) for c in report["configs"] for x in c.get("skipped", [])]
    lines += [
        "",
        "## Skipped stepcache points (ScheduleError: the fraction is out of the calibration's reach)",
        "",
    ]
    lines += [f"* {cfg}: {x['family']} ({x['knob']}): {x['reason']}" for cfg, x in skipped] or ["None."]
    lines += ["", "## Notes", ""] + [f"* {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"


NOTES = [
    "diffusers TaylorSeer: orders 1 and 2 form one family (a user picks any setting), so its frontier is "
    "the best of both.",
    "cache-dit ships FoCa only as a calibrator of its DBCache (`calibrator_config=FoCaCalibratorConfig()` "
    "next to a `DBCacheConfig`); there is no FoCa-only entry point. `cache-dit/DBCache+FoCa` is the adaptive "
    "DBCache (F1B0, residual-diff thresholds) with FoCa forecasts; `cache-dit/FoCa (static mask)` is the "
    "closest thing to FoCa alone: DBCache's `steps_computation_mask` with `steps_computation_policy='static'` "
    "(compute the warm-up steps, every i-th step and the last, forecast the rest with FoCa), where the "
    "first block (F1) still runs at every step.",
    "diffusers FasterCache runs through the harness adapter with `is_guidance_distilled=True`, i.e. only its "
    "attention reuse (extrapolated attn1 outputs); its CFG cache (unconditional-branch skipping) is refused "
    "by the adapter because the hook splits hidden_states/timestep but not DiT's class_labels and assumes an "
    "[uncond; cond] batch, whereas the reference `sample()` batches [cond; uncond] in one call.",
    "MagCache is calibrated once per configuration (diffusers' calibration mode on one uncached run of "
    "the same sampler, steps and guidance), then swept over its thresholds.",
    "dit-smoothcache (`SmoothCacheHelper`) runs stepcache's SmoothCache-by-fraction schedules; "
    "`bit_identical_to_stepcache` in the JSON says whether its images equal stepcache's for the same schedule.",
]


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    configs = report["configs"]
    if not configs:
        return
    cols = min(4, len(configs))
    rows = (len(configs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    names = sorted({p["family"] for c in configs for p in c["points"]})
    colors = {fam: plt.get_cmap("tab20")(i % 20) for i, fam in enumerate(names)}
    for ax, c in zip(axes.flat, configs, strict=False):
        fams: dict[str, list[tuple[float, float, float]]] = {}
        for p in c["points"]:
            if "error" not in p:
                fams.setdefault(p["family"], []).append((p["compute_fraction"], p["mean_db"], p["p5_db"]))
        for fam, pts in sorted(fams.items()):
            front = frontier(pts)
            style = "-" if fam.startswith(STEPCACHE) else (":" if fam.startswith(BASELINE) else "--")
            lw = 2.0 if fam.startswith(STEPCACHE) else 1.0
            ax.plot(
                [p[0] for p in front],
                [p[1] for p in front],
                style,
                marker=".",
                lw=lw,
                color=colors[fam],
                label=fam,
            )
        for t in TARGETS:
            ax.axvline(t, color="0.85", lw=0.8, zorder=0)
        ax.set_title(c["config"])
        ax.set_xlim(0.1, 0.8)
        shown = [p["mean_db"] for p in c["points"] if "error" not in p and p["compute_fraction"] <= 0.8]
        if shown:
            ax.set_ylim(min(shown) - 2, min(max(shown), 80) + 3)
        ax.set_xlabel("compute fraction")
        ax.set_ylabel("mean PSNR (dB)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(configs) :]:
        ax.axis("off")
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        seen.update(dict(zip(lab, h, strict=False)))
    fig.legend(
        list(seen.values()), list(seen.keys()), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def write_all(report: dict[str, Any], stem: Path) -> None:
    write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(report))
    plot(report, stem.with_name(stem.name + "-mean.png"))


def rematch(path: Path) -> None:
    """Recompute every configuration's matched table from its recorded points (this script's rules)."""
    report = json.loads(path.read_text())
    for c in report["configs"]:
        c["matched"] = matched_rows(c["points"], TARGETS)
    report["settings"]["rematched"] = f"python benchmarks/frontier.py --rematch {path.name}"
    report["notes"] = NOTES
    write_all(report, path.with_suffix(""))
    print(f"rewrote {path.with_suffix('.md')}, .json and -mean.png", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        help="scheduler-steps-gGUIDANCE[:f1,f2,...] (the suffix: tune at these fractions only)",
    )
    parser.add_argument("--samples", type=int, default=32, help="evaluation images per point")
    parser.add_argument("--tuning", type=int, default=12, help="images tune replays")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="1 configuration, 8 + 4 images, two points per family"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output stem (default benchmarks/results/frontier)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the configurations already in the output JSON (same sizes and seeds) and run the rest",
    )
    parser.add_argument(
        "--redo",
        nargs="+",
        default=[],
        help="with --resume: run these configurations (scheduler-steps-gGUIDANCE) again, replacing their results",
    )
    parser.add_argument(
        "--rematch",
        type=Path,
        default=None,
        help="recompute the matched tables of a results JSON (no generation) and rewrite its .json/.md/.png",
    )
    args = parser.parse_args()
    if args.rematch is not None:
        rematch(args.rematch)
        return
    if args.quick:
        args.samples, args.tuning = 8, 4
        if args.configs == list(CONFIGS):
            args.configs = ["dpm-20-g4"]
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "frontier-quick" if args.quick else RESULTS / "frontier"
    for spec in args.configs:
        parse_config(spec)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    from benchmarks.harness import peers
    from stepcache import reference

    started = time.perf_counter()
    models = {name: reference.load_model(model=name) for name in {parse_config(c)[0] for c in args.configs}}
    argv = " ".join(sys.argv[1:])
    command = "python benchmarks/frontier.py" + (f" {argv}" if argv else "")
    report: dict[str, Any] = {
        "settings": {
            "command": command,
            "configs": args.configs,
            "samples": args.samples,
            "tuning": args.tuning,
            "eval_seed": EVAL_SEED,
            "tuning_seed": TUNING_SEED,
            "calibration_seed": CALIBRATION_SEED,
            "calibration_samples": CALIBRATION_SAMPLES,
            "magcache_seed": MAGCACHE_SEED,
            "magcache_images": MAGCACHE_IMAGES,
            "targets": list(TARGETS),
            "tolerance": TOLERANCE,
            "goal_db": GOAL_DB,
            "tuned_fractions": list(TUNED_FRACTIONS),
            "optimal_fractions": list(OPTIMAL_FRACTIONS),
            "smoothcache_fractions": list(SMOOTH_FRACTIONS),
            "quick": args.quick,
            "threads": args.threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peers": {k: v or "not installed" for k, v in peers.available_peers().items()},
        },
        "notes": NOTES,
        "configs": [],
        "complete": False,
    }
    earlier = 0.0
    if args.resume and args.out.with_suffix(".json").is_file():
        prev = json.loads(args.out.with_suffix(".json").read_text())
        for key in ("samples", "tuning", "eval_seed", "tuning_seed", "calibration_seed", "magcache_seed"):
            if prev["settings"][key] != report["settings"][key]:
                raise SystemExit(
                    f"--resume: {key} differs from the earlier run's; start a fresh run instead."
                )
        report["configs"] = prev["configs"]
        for c in report["configs"]:
            c.setdefault("threads", prev["settings"]["threads"])
        report["settings"]["commands"] = [
            *prev["settings"].get("commands", [prev["settings"]["command"]]),
            command,
        ]
        report["settings"]["command"] = prev["settings"]["command"]
        earlier = float(prev.get("seconds", 0.0))
    done = {c["config"] for c in report["configs"]}

    def progress(msg: str) -> None:
        print(f"{time.perf_counter() - started:7.0f}s {msg}", flush=True)

    def save() -> None:
        report["seconds"] = round(earlier + time.perf_counter() - started, 1)
        write_all(report, args.out)

    for spec in args.configs:
        if spec.partition(":")[0] in args.redo:  # replaced in place, so the table order stays
            slot = next(
                (i for i, c in enumerate(report["configs"]) if c["config"] == spec.partition(":")[0]), None
            )
            if slot is not None:
                report["configs"][slot] = {
                    **run_config(spec, models, args, progress),
                    "threads": args.threads,
                }
                save()
                progress(f"[{spec}] re-run; wrote {args.out.with_suffix('.json')}")
                continue
        if spec.partition(":")[0] in done:
            progress(f"[{spec}] already in {args.out.with_suffix('.json')} (--resume): skipped")
            continue
        report["configs"].append({**run_config(spec, models, args, progress), "threads": args.threads})
        save()
        progress(f"[{spec}] done; wrote {args.out.with_suffix('.json')}")
    report["complete"] = True
    save()
    print(f"wrote {args.out.with_suffix('.md')}, .json and {args.out.name}-mean.png", flush=True)


if __name__ == "__main__":
    main()
