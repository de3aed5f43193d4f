"""The frontier at matched compute (issues 15 and 21): stepcache vs every peer setting that lands on a target.

On the shipped reference DiTs (DDPM model: DDIM, DPM-Solver++, UniPC, DEIS, Euler; flow model: flow-Euler),
for each configuration ``<sampler>-<steps>-g<guidance>``, every method runs on the same evaluation images
and each point is measured the same way: the compute fraction counted by ``peers.count_component_calls``
(attention and feed-forward computations that really ran, weighted by the batch rows they ran on), and
per-image PSNR against the uncached image of the same seed, as mean, 5th percentile (p5) and worst.

Methods: stepcache's ``tune`` (at its default ``max_replays``, and unbudgeted for the budget check),
``optimal_schedule`` (type and layer granularity) and ``for_compute_fraction``, each asked for exactly the
target fraction; the FORA baselines; and every installed peer over its knob space, where it can land
within 0.02 of a target (``frontier_sweep``): diffusers TaylorSeer (interval 2-8 x warm-up 1..n/2 x order
1, 2, with and without the last step), MagCache (threshold x K x retention), FirstBlockCache, PAB and
FasterCache; cache-dit DBCache (Fn/Bn x threshold x warm-up x max continuous cached steps) alone and with
its TaylorSeer (orders 1, 2) and FoCa calibrators, and FoCa on static step masks; dit-smoothcache (alpha).
Comparison (``frontier_match``): per target and family, the best measured point within 0.02; "no point"
where a family has none. Nothing is interpolated.

The held-out protocol (issue 21) is ``benchmarks/configs/heldout.json``: ``--set development`` (the
default) runs its development configurations into ``results/frontier-development.{md,json}``;
``--set heldout`` runs the held-out ones into ``results/frontier-heldout.*``, once, at the end, and refuses
to run without ``--final``.

    python benchmarks/frontier.py --plan                          # the size of the development run; runs nothing
    python benchmarks/frontier.py                                 # the development set (resumable: --resume)
    python benchmarks/frontier.py --set heldout4 --final          # the unspent held-out set, once
    python benchmarks/frontier.py --quick                         # 1 configuration, 8 images, thin sweeps
    python benchmarks/frontier.py --configs dpm-20-g4 --samples 16 --out /tmp/frontier
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import frontier_sweep as sweep
from benchmarks.frontier_match import (
    OPEN_FIT_24,
    OPEN_LOOP_DEFAULT,
    REFERENCE_ONLY,
    TUNED,
    TUNED_FIT,
    TUNED_FIT_24,
    UNBUDGETED,
    equal_compute_fractions,
    match,
)
from benchmarks.frontier_report import write_all, write_json
from benchmarks.harness.perimage import generate, per_image_psnr, summary

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROTOCOL = HERE / "configs" / "heldout.json"
SETS = ("development", "heldout", "heldout2", "heldout3", "heldout4")
#: The sets run once each, at the end (the last is the one not yet run).
HELDOUT_SETS = ("heldout", "heldout2", "heldout3", "heldout4")
TARGETS = sweep.TARGETS
QUICK_CONFIG = "dpm-20-g1"
CALIBRATION_SAMPLES, MAGCACHE_IMAGES, MAGCACHE_SEED = 8, 10, 10_000
#: seconds per denoising step per batch row of an uncached run on a quiet 2-core machine with 2 torch threads
#: (the committed frontier's uncached runs: 1.29-1.37 ms at 48 rows); what the up-front estimate multiplies
SECONDS_PER_STEP_ROW = 1.35e-3
#: a cached run at 0.25-0.5 (and the searches' probes) costs about this share of an uncached one
#: (measured 0.3-0.5: 0.8-1.1 ms per step and row against 2.3-2.7 uncached, on a shared machine)
CACHED_SHARE = 0.5
#: the threshold searches took 43-52 % of their bound (every reachable target hit; dpm-20-g1, ddim-50-g1,
#: flow-euler-20-g4, 8 images)
SEARCH_SHARE = 0.55
UNBUDGETED_REPLAYS = 160  # tune's replays without a budget, at most (measured 36-157 on these configurations)

NOTES = [
    "Peers are swept only where they can land within 0.02 of a target: static settings (TaylorSeer, "
    "MagCache, FoCa on a static mask, PAB, FasterCache, dit-smoothcache, the FORA baselines) have their "
    "fraction replayed from the library's own rule (or a dry count) before running; dynamic ones "
    "(FirstBlockCache, DBCache with or without its calibrators) have their threshold bisected toward "
    "each target (`benchmarks/frontier_sweep.py`). `predicted_fraction` in the JSON is the replayed one.",
    "diffusers TaylorSeer: orders 1 and 2 form one family (a user picks any setting); 'last step "
    "computed' is its `disable_cache_after_step = n - 1`.",
    "cache-dit ships FoCa only as a calibrator of its DBCache. `cache-dit/DBCache+FoCa` is the adaptive "
    "DBCache with FoCa forecasts; `cache-dit/FoCa (static mask)` is DBCache's `steps_computation_mask` with "
    "`steps_computation_policy='static'` (warm-up, every i-th step, the last step), F1B0 (the first block "
    "runs at every step). cache-dit's `max_cached_steps` (a cap on all cached steps) is left at -1: the "
    "sweep varies `max_continuous_cached_steps`.",
    "diffusers FasterCache runs with `is_guidance_distilled=True` (attention reuse only): its CFG cache "
    "assumes an [uncond; cond] batch and splits neither DiT's class labels nor the reference loop's "
    "[cond; uncond] batch.",
    "MagCache's ratios come from diffusers' calibration mode on one uncached run of the same sampler, steps "
    "and guidance; its decisions depend only on them, so its fraction is known before running.",
    "dit-smoothcache runs SmoothCache schedules of every alpha whose fraction lands near a target; "
    "`bit_identical_to_stepcache` says whether its images equal stepcache's SmoothCache-by-fraction "
    "images where both ran the same schedule.",
]


# ------------------------------------------------------------------------------------------ protocol
def load_protocol() -> dict[str, Any]:
    return json.loads(PROTOCOL.read_text())


def parse_config(spec: str) -> tuple[str, str, int, float]:
    """``"flow-euler-50-g2"`` -> ``("flow", "flow-euler", 50, 2.0)``; ``"unipc-15-g1.5"`` -> ``("ddpm",
    "unipc", 15, 1.5)`` (the model is the one the sampler belongs to)."""
    from stepcache import reference

    try:
        scheduler, steps_s, g = spec.rsplit("-", 2)
        if not g.startswith("g"):
            raise ValueError
        steps, guidance = int(steps_s), float(g[1:])
    except ValueError:
        raise SystemExit(
            f"bad configuration {spec!r}: expected SAMPLER-STEPS-gGUIDANCE, e.g. dpm-20-g4 or unipc-15-g1.5"
        ) from None
    model = next((m for m, names in reference.MODEL_SCHEDULERS.items() if scheduler in names), None)
    if model is None:
        known = ", ".join(n for names in reference.MODEL_SCHEDULERS.values() for n in names)
        raise SystemExit(f"bad configuration {spec!r}: unknown sampler {scheduler!r} (one of {known})")
    return model, scheduler, steps, guidance


def set_configs(protocol: dict[str, Any], name: str) -> list[str]:
    """The configurations of one of the protocol's sets."""
    value = protocol[name]
    return list(value["configs"] if isinstance(value, dict) else value)


def heldout_configs(protocol: dict[str, Any]) -> set[str]:
    """The held-out configurations not yet run: the last set's (the earlier ones are spent: their one runs
    are committed, and their configurations may be used for development like the development set's)."""
    return set(set_configs(protocol, HELDOUT_SETS[-1]))


def guard_heldout(
    specs: Sequence[str], protocol: dict[str, Any], *, final: bool, quick: bool, whole_set: bool = False
) -> None:
    """The held-out configurations run once, at the end: only with ``--final``, never quick (a held-out
    set's results file, ``whole_set``, is written only so)."""
    held = list(specs) if whole_set else [s for s in specs if s in heldout_configs(protocol)]
    if held and (quick or not final):
        raise SystemExit(
            f"refusing to run held-out configuration(s) {', '.join(held)}: the held-out set "
            f"({PROTOCOL.relative_to(HERE.parent)}) is run once, at the end, with --set {HELDOUT_SETS[-1]} "
            "--final (never --quick). Develop on --set development or a spent held-out set."
        )


# ------------------------------------------------------------------------------------------ plan
def stepcache_methods(
    model: torch.nn.Module,
    calibration: Any,
    tuning_run: Callable[[], torch.Tensor],
    *,
    quick: bool,
    unbudgeted: bool = True,
) -> list[tuple[str, Callable[[float], Any], Sequence[float]]]:
    """``(family, build(fraction) -> Schedule, fractions)``: stepcache's policies, each asked for
    exactly the target fraction (the one rounding rule, ``stepcache.policies._plan.budget_calls``)."""
    from stepcache.errors import ScheduleError
    from stepcache.policies import (
        fit_forecasts,
        for_compute_fraction,
        open_loop_schedule,
        optimal_schedule,
        tune,
    )

    every = TARGETS

    def optimal_both(f: float) -> list[Any]:  # those within the calibration's reach (lookahead)
        out = []
        for granularity in ("type", "layer"):
            with contextlib.suppress(ScheduleError):
                out.append(optimal_schedule(calibration, f, granularity=granularity))
        return out

    def raced(
        schedules: list[Any],
    ) -> Any:  # item 2: forecast gains chosen on the tuning images, placements raced
        return fit_forecasts(model, tuning_run, schedules, progress=False)

    memo: dict[float, Any] = {}

    def tuned(f: float) -> Any:  # deterministic: tuned once per fraction, raced with the fit after
        if f not in memo:
            memo[f] = tune(model, tuning_run, f, calibration=calibration, progress=False)
        return memo[f]

    def tuned_fit_24(f: float) -> Any:  # 12 replays + (1 uncached + 2 plain + 3 calls x 3) = 24
        placed = tune(model, tuning_run, f, calibration=calibration, progress=False, max_replays=12)
        return fit_forecasts(model, tuning_run, placed, iterations=3, progress=False)

    def open_fit_24(f: float) -> Any:  # 1 uncached + 2 plain + 7 calls x 3 = 24
        return fit_forecasts(
            model, tuning_run, open_loop_schedule(calibration, f), iterations=7, progress=False
        )

    out: list[tuple[str, Callable[[float], Any], Sequence[float]]] = [
        (TUNED, tuned, (0.35,) if quick else every),
        (TUNED_FIT, lambda f: raced([tuned(f), *optimal_both(f)]), (0.35,) if quick else every),
        (TUNED_FIT_24, tuned_fit_24, (0.35,) if quick else every),
        (OPEN_FIT_24, open_fit_24, (0.35,) if quick else every),
        (OPEN_LOOP_DEFAULT, lambda f: open_loop_schedule(calibration, f), every),
        (f"{sweep.STEPCACHE}/optimal (type)", lambda f: optimal_schedule(calibration, f), every),
        (f"{sweep.STEPCACHE}/optimal (layer)", lambda f: optimal_schedule(calibration, f, granularity="layer"), every),
        (f"{sweep.STEPCACHE}/SmoothCache by fraction", lambda f: for_compute_fraction(calibration, f), every),
    ]  # fmt: skip
    if unbudgeted and not quick:  # item 4's check: the default budget against none (40-150 replays each)
        out.insert(
            1,
            (UNBUDGETED, lambda f: tune(model, tuning_run, f, calibration=calibration, progress=False, max_replays=None), every),
        )  # fmt: skip
    return out


def plan_size(
    spec: str, depth: int, grid: sweep.Grid, available: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The runs a configuration makes, before any model runs: exact where the fraction is analytic,
    estimated (``~``) for MagCache / dit-smoothcache / PAB (they need a calibration or a dry count) and
    bounded (``<=``) for the threshold searches; and an estimate of its time on a quiet machine."""
    _, _, n, g = parse_config(spec)
    exact = len(sweep.fora_settings(n, TARGETS, grid))
    approx = 0
    if available.get("diffusers"):
        exact += len(sweep.taylorseer_settings(n, TARGETS, grid))
        # MagCache: distinct placements near a target, measured 20-47 at 20 steps, 76 at 25, 126 at 50
        approx += (len(TARGETS) if grid.per_target else round(2.5 * n)) + (2 if grid.attention_skips else 0)
    if available.get("cache-dit"):
        exact += len(sweep.foca_mask_settings(n, depth, TARGETS, grid))
    if available.get("dit-smoothcache"):  # distinct schedules near a target: 4-5 at 20 steps, 26-42 at 50
        approx += len(TARGETS) if grid.per_target else round(0.8 * n)
    dyn = sweep.dynamic_settings(n, depth, available, grid)
    bound = sum(sweep.dynamic_bound(d, TARGETS, grid) for d in dyn)
    skip = args.quick or getattr(args, "skip_unbudgeted", False)
    ours = 8 * len(TARGETS) if not args.quick else 4 * len(TARGETS) + 4  # stepcache families x fractions
    if not skip:
        ours += len(TARGETS)
    # generations of the tuning images per fraction: tune 24, the raced fit ~55 more, 24 + 24 for the two
    # 24-generation policies
    budgeted = 127 * (1 if args.quick else len(TARGETS))
    unbudgeted = 0 if skip else len(TARGETS) * min(UNBUDGETED_REPLAYS, 3 * n)  # measured ~1.8-4 n
    replays = budgeted + (0 if skip else UNBUDGETED_REPLAYS * len(TARGETS))
    rows = 2 if g != 1.0 else 1
    runs = exact + approx + bound + ours
    expected = exact + approx + round(SEARCH_SHARE * bound) + ours
    uncached = args.samples + (0 if g == 1.0 else CALIBRATION_SAMPLES * 10) + MAGCACHE_IMAGES  # images

    def seconds(runs: int, replays: int, share: float) -> float:
        cached = (runs * args.samples + replays * args.tuning) * share
        return n * rows * SECONDS_PER_STEP_ROW * (uncached + cached)

    return {
        "config": spec,
        "static": exact,
        "approx": approx,
        "dynamic_combinations": sum(1 for d in dyn if sweep.dynamic_bound(d, TARGETS, grid)),
        "dynamic_bound": bound,
        "stepcache": ours,
        "replays": replays,
        "runs": runs,
        "expected_runs": expected,
        "seconds": seconds(expected, budgeted + unbudgeted, CACHED_SHARE),
        "seconds_bound": seconds(runs, replays, 1.0),
    }


def print_plan(sizes: list[dict[str, Any]], args: argparse.Namespace) -> None:
    total, bound = sum(s["seconds"] for s in sizes), sum(s["seconds_bound"] for s in sizes)
    print(
        f"plan: {len(sizes)} configuration(s); {args.samples} evaluation images per run, tune on {args.tuning}; "
        "time on a quiet 2-core machine: expected (searches at about half their bound, cached runs at half "
        "the cost of an uncached one) and at most (every probe, cached runs as dear as uncached ones)",
        flush=True,
    )
    print(
        "  configuration        static  ~approx  dynamic<=(comb.)  stepcache  replays<=    runs: ~expected <=bound"
        "     ~time  <=time",
        flush=True,
    )
    for s in sizes:
        print(
            f"  {s['config']:<20} {s['static']:>6}  {s['approx']:>7}  {s['dynamic_bound']:>8} ({s['dynamic_combinations']:>3})"
            f"  {s['stepcache']:>9}  {s['replays']:>9}  {s['expected_runs']:>16} {s['runs']:>6}"
            f"  {s['seconds'] / 60:5.0f} min {s['seconds_bound'] / 60:4.0f} min",
            flush=True,
        )
    print(
        f"  total: ~{sum(s['expected_runs'] for s in sizes)} runs (<= {sum(s['runs'] for s in sizes)}), replays <= "
        f"{sum(s['replays'] for s in sizes)}; ~{total / 3600:.1f} h (<= {bound / 3600:.1f} h) at "
        f"{SECONDS_PER_STEP_ROW * 1e3:.2f} ms per step and batch row uncached",
        flush=True,
    )


# ------------------------------------------------------------------------------------------ measuring
class Runner:
    """Measures one configuration's points into ``entry["points"]``, reusing those a resumed run has."""

    def __init__(self, model: torch.nn.Module, entry: dict[str, Any], eval_run: Callable[[], torch.Tensor],
                 base: torch.Tensor, progress: Callable[[str], None], saved: Callable[[], None]) -> None:  # fmt: skip
        self.model, self.entry, self.eval_run, self.base = model, entry, eval_run, base
        self.progress, self.saved = progress, saved
        self.before = {(p["family"], p["knob"]): p for p in entry.get("points", [])}
        self.before_skipped = {(x["family"], x["knob"]): x for x in entry.get("skipped", [])}
        entry["points"], entry["skipped"] = [], []
        self.images: dict[Any, torch.Tensor] = {}  # SmoothCache schedules' images, by plans

    def run(self, family: str, knob: str, make: Callable[[], tuple[Any, dict[str, Any]]], *,
            predicted: float | None = None, same: Any = None) -> dict[str, Any] | None:  # fmt: skip
        """Measure ``make()``'s context (and info) on the evaluation images; ``None`` when it was
        skipped (a stepcache policy's ScheduleError)."""
        from benchmarks.harness import peers
        from stepcache.errors import ScheduleError

        key = (family, knob)
        if key in self.before:
            self.entry["points"].append(self.before[key])
            return self.before[key]
        if key in self.before_skipped:
            self.entry["skipped"].append(self.before_skipped[key])
            return None
        row: dict[str, Any] = {"family": family, "knob": knob}
        if predicted is not None:
            row["predicted_fraction"] = round(predicted, 4)
        t0 = time.perf_counter()
        where = f"{len(self.entry['points']) + len(self.entry['skipped']) + 1}. {family} ({knob})"
        try:
            try:
                ctx, info = make()
            except ScheduleError as e:
                self.entry["skipped"].append({"family": family, "knob": knob, "reason": str(e)})
                self.progress(f"{where}: skipped ({e})")
                return None
            row.update(info)
            with peers.count_component_calls(self.model) as counts:
                with ctx:
                    t1 = time.perf_counter()
                    images = self.eval_run()
                    seconds = time.perf_counter() - t1
                frac = float(counts()["fraction"])
        except Exception as e:  # a failing point is recorded, never allowed to stop the run
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            self.entry["points"].append(row)
            self.progress(f"{where}: FAILED {row['error']}")
            self.saved()
            return row
        row.update({"compute_fraction": round(frac, 4), **summary(per_image_psnr(images, self.base))})
        row["seconds"] = round(seconds, 2)
        if same is not None:
            if family == f"{sweep.STEPCACHE}/SmoothCache by fraction":
                self.images[same] = images
            elif same in self.images:
                row["bit_identical_to_stepcache"] = bool(torch.equal(images, self.images[same]))
        self.entry["points"].append(row)
        self.progress(
            f"{where}: fraction {frac:.3f}, mean {row['mean_db']:.2f} dB, p5 {row['p5_db']:.2f}, "
            f"worst {row['worst_db']:.2f} ({time.perf_counter() - t0:.1f} s)"
        )
        self.saved()
        return row


def calibration_for(model_name: str, scheduler: str, steps: int, guidance: float) -> tuple[Any, str]:
    from stepcache import reference

    cal = reference.shipped_calibration(scheduler, steps) if guidance == 1.0 else None
    if cal is not None:
        return cal, f"shipped ({scheduler}-{steps}.json)"
    cal = reference.calibrate_reference(
        scheduler, steps, samples=CALIBRATION_SAMPLES, seed=SEEDS["calibration"], guidance_scale=guidance,
        progress=False, model=model_name,
    )  # fmt: skip
    return cal, (
        f"calibrate_reference(samples={CALIBRATION_SAMPLES}, seed={SEEDS['calibration']}, guidance_scale={guidance:g})"
    )


SEEDS: dict[str, int] = dict(load_protocol()["seeds"])
RESPONSE_SAMPLES = 8  # images of the calibration seed the output response is measured on


def with_response(model: torch.nn.Module, cal: Any, scheduler: str, steps: int, guidance: float) -> Any:
    """The calibration with its output response (``stepcache.response``, 2 projections) measured on
    ``RESPONSE_SAMPLES`` images of the calibration seed: what the open loop and tune's shortlist rank by."""
    from stepcache import response

    return response(
        model,
        cal,
        lambda: generate(
            model, scheduler, steps, RESPONSE_SAMPLES, SEEDS["calibration"], guidance, differentiable=True
        ),
    )


def run_config(
    spec: str,
    model: torch.nn.Module,
    entry: dict[str, Any],
    args: argparse.Namespace,
    grid: sweep.Grid,
    progress: Callable[[str], None],
    saved: Callable[[], None],
) -> None:
    """Measure one configuration into ``entry`` (which may hold a partial earlier run's points)."""
    from benchmarks.harness import peers
    from stepcache.runtime import cache

    model_name, scheduler, steps, guidance = parse_config(spec)
    say = lambda msg: progress(f"[{spec}] {msg}")  # noqa: E731
    t0 = time.perf_counter()
    cal, cal_source = calibration_for(model_name, scheduler, steps, guidance)
    entry.update(
        {"config": spec, "model": model_name, "scheduler": scheduler, "steps": steps, "guidance_scale": guidance,
         "calibration": cal_source, "calibration_s": round(time.perf_counter() - t0, 1), "complete": False}
    )  # fmt: skip
    say(f"calibration: {cal_source} ({entry['calibration_s']:.1f} s)")
    t0 = time.perf_counter()
    cal = with_response(model, cal, scheduler, steps, guidance)
    entry["response"] = {**cal.meta["response"], "seconds": round(time.perf_counter() - t0, 1)}
    say(
        f"output response: {RESPONSE_SAMPLES} images of seed {SEEDS['calibration']} ({entry['response']['seconds']:.1f} s)"
    )

    def eval_run() -> torch.Tensor:
        return generate(model, scheduler, steps, args.samples, SEEDS["evaluation"], guidance)

    def tuning_run() -> torch.Tensor:  # differentiable where gradients are on: fit_forecasts needs its graph
        return generate(model, scheduler, steps, args.tuning, SEEDS["tuning"], guidance, differentiable=True)

    def mag_run() -> torch.Tensor:
        return generate(model, scheduler, steps, MAGCACHE_IMAGES, MAGCACHE_SEED, guidance)

    def dry(pm: peers.PeerMethod) -> float:  # one single-image generation, counted
        try:
            with (
                peers.count_component_calls(model) as counts,
                peers.apply_peer(pm, model, num_inference_steps=steps),
            ):
                generate(model, scheduler, steps, 1, SEEDS["evaluation"], guidance)
            return float(counts()["fraction"])
        except Exception:  # the real run records the error, if it gets that far
            return float("nan")

    t0 = time.perf_counter()
    base = eval_run()
    entry["uncached_s"] = round(time.perf_counter() - t0, 2)
    say(f"uncached: {args.samples} images in {entry['uncached_s']:.1f} s")
    runner = Runner(model, entry, eval_run, base, say, saved)

    methods = stepcache_methods(model, cal, tuning_run, quick=args.quick, unbudgeted=not args.skip_unbudgeted)

    def ours(asked: dict[float, float], note: str = "") -> None:
        """stepcache's policies, each at ``asked[target]`` for the targets it runs at."""
        for family, build, fractions in methods:
            for t in fractions:
                if t not in asked or (note and family in REFERENCE_ONLY):
                    continue
                f = asked[t]

                def make(
                    build: Callable[[float], Any] = build, f: float = f, family: str = family
                ) -> tuple[Any, dict[str, Any]]:
                    t0 = time.perf_counter()
                    sched = build(f)
                    info: dict[str, Any] = {"schedule_compute_fraction": round(sched.compute_fraction, 4)}
                    if "tuning" in sched.meta:
                        info.update(
                            tuning_s=round(time.perf_counter() - t0, 1),
                            tuning_replays=sched.meta["tuning"]["runs"],
                            candidate=sched.meta.get("candidate"),
                        )
                    if "forecast_fit" in sched.meta:
                        fit = sched.meta["forecast_fit"]
                        info.update(
                            tuning_s=round(time.perf_counter() - t0, 1),
                            fit_generations=fit["generations"],
                            fit_forecast=fit["forecast"],
                            fit_seconds=fit["seconds"],
                        )
                    if "open_loop" in sched.meta:
                        info["candidate"] = sched.meta["open_loop"].get("chosen")
                    return cache(model, sched, count_macs=False), info

                smooth = family.endswith("SmoothCache by fraction")
                key = None
                if smooth and not note:  # the plans, so dit-smoothcache running the same schedule compares
                    from stepcache.errors import ScheduleError
                    from stepcache.policies import for_compute_fraction

                    try:
                        key = tuple(sorted(for_compute_fraction(cal, f).plans.items()))
                    except ScheduleError:
                        key = None
                runner.run(family, f"fraction={f:.4g}{note}", make, same=key)

    ours({t: t for t in TARGETS})

    available = peers.available_peers()
    depth = len(model.transformer_blocks)
    ratios: list[float] = []

    def mag_ratios() -> list[float]:
        if not ratios:
            ratios.extend(peers.calibrate_mag_ratios(model, mag_run, steps))
        return ratios

    static = sweep.static_settings(
        steps, depth, TARGETS, calibration=cal, mag_ratios=mag_ratios, dry=dry, available=available, grid=grid
    )
    counts: dict[str, int] = {}
    for s in static:
        counts[s.family] = counts.get(s.family, 0) + 1
    dynamic = sweep.dynamic_settings(steps, depth, available, grid)
    say(
        f"static settings within {sweep.TOLERANCE} of a target: {len(static)} "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}); dynamic combinations: {len(dynamic)} "
        f"(<= {sum(sweep.dynamic_bound(d, TARGETS, grid) for d in dynamic)} probes)"
    )
    for s in static:
        if s.schedule is not None:
            make = lambda s=s: (cache(model, s.schedule, count_macs=False), {})  # noqa: E731
        else:
            make = lambda s=s: (peers.apply_peer(s.method, model, num_inference_steps=steps), {})  # noqa: E731
        same = s.key if s.family.startswith(peers.SMOOTHCACHE) else None
        runner.run(s.family, s.knob, make, predicted=s.predicted, same=same)
    probes = 0
    for d in dynamic:

        def measure(th: float, d: sweep.Dynamic = d) -> float | None:
            pm = d.method(th)
            row = runner.run(
                d.family, pm.knob, lambda: (peers.apply_peer(pm, model, num_inference_steps=steps), {})
            )
            return None if row is None or "error" in row else row["compute_fraction"]

        lo, hi = grid.threshold_range
        probes += len(
            sweep.search(measure, TARGETS, floor=d.floor, coarse=d.coarse, lo=lo, hi=hi, refine=grid.refine)
        )
    entry["sweep"] = {"static": counts, "dynamic_combinations": len(dynamic), "dynamic_probes": probes}
    # equal counted compute: where the best competitor point spends another fraction than stepcache's
    # rounding of the target (0.267 against 0.233 at 0.25 of 15 steps), stepcache runs at that one too
    total_calls = steps * len(cal.components)
    extra = equal_compute_fractions(entry["points"], TARGETS, total_calls)
    if extra:
        say(
            f"stepcache at the best peers' fractions: {', '.join(f'{t:g} -> {q:.4f}' for t, q in extra.items())}"
        )
        ours(extra, note=" (the best peer's)")
    entry["matched"] = match(entry["points"], TARGETS)
    entry["complete"] = True


# ------------------------------------------------------------------------------------------ main
def rematch(path: Path, out: Path | None) -> None:
    """Recompute every configuration's matched table from its recorded points (this script's rules)."""
    report = json.loads(path.read_text())
    for c in report["configs"]:
        c["matched"] = match(c["points"], TARGETS)
    report["settings"]["rematched"] = f"python benchmarks/frontier.py --rematch {path.name}"
    report["notes"] = NOTES
    stem = (out or path).with_suffix("")
    write_all(report, stem)
    print(f"wrote {stem.with_suffix('.md')}, .json and -mean.png", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=SETS, default=None, help="the protocol's set (default: development)")
    p.add_argument("--final", action="store_true", help="allow the held-out set (run once, at the end)")
    p.add_argument("--configs", nargs="+", default=None, help="SAMPLER-STEPS-gGUIDANCE, instead of a set")
    p.add_argument(
        "--samples", type=int, default=None, help="evaluation images per point (default: the protocol's 48)"
    )
    p.add_argument("--tuning", type=int, default=12, help="images tune replays")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--quick", action="store_true", help=f"{QUICK_CONFIG}, 8 + 4 images, thin sweeps (a smoke test)"
    )
    p.add_argument(
        "--plan", action="store_true", help="print the size of the run and its estimated time; run nothing"
    )
    p.add_argument("--out", type=Path, default=None, help="output stem (default results/frontier-<set>)")
    p.add_argument(
        "--resume", action="store_true", help="keep what the output JSON has (configurations and points)"
    )
    p.add_argument(
        "--redo", nargs="+", default=[], help="with --resume: run these configurations again from scratch"
    )
    p.add_argument(
        "--skip-unbudgeted",
        action="store_true",
        help="do not run tune unbudgeted (item 4's budget check; 40-150 replays per fraction)",
    )
    p.add_argument(
        "--rematch", type=Path, default=None, help="recompute the tables of a results JSON; no generation"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rematch is not None:
        rematch(args.rematch, args.out)
        return
    protocol = load_protocol()
    if args.configs is not None and args.set is not None:
        raise SystemExit("--configs and --set are exclusive")
    set_name = None if args.configs is not None else (args.set or "development")
    specs = list(args.configs) if args.configs is not None else set_configs(protocol, set_name)
    if args.quick and set_name == "development":
        specs = [QUICK_CONFIG]
    if (set_name in HELDOUT_SETS or args.configs is not None) and not args.plan:
        guard_heldout(specs, protocol, final=args.final, quick=args.quick, whole_set=set_name in HELDOUT_SETS)
    if args.samples is None:
        args.samples = 8 if args.quick else int(protocol["seeds"]["evaluation_images"])
    if args.quick:
        args.tuning = min(args.tuning, 4)
    for spec in specs:
        parse_config(spec)
    if args.quick:  # a smoke test: never a set's result
        set_name = None
    if args.out is None:
        if set_name is not None:
            args.out = RESULTS / f"frontier-{set_name}"
        else:
            args.out = Path(tempfile.gettempdir()) / ("frontier-quick" if args.quick else "frontier-adhoc")
    grid = sweep.QUICK if args.quick else sweep.FULL
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    from benchmarks.harness import peers
    from stepcache import reference

    available = peers.available_peers()
    models = {name: reference.load_model(model=name) for name in {parse_config(c)[0] for c in specs}}
    sizes = [
        plan_size(s, len(models[parse_config(s)[0]].transformer_blocks), grid, available, args) for s in specs
    ]
    print_plan(sizes, args)
    if args.plan:
        return
    started = time.perf_counter()
    argv_s = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    command = "python benchmarks/frontier.py" + (f" {argv_s}" if argv_s else "")
    settings: dict[str, Any] = {
        "command": command,
        "set": set_name,
        "final": bool(args.final and set_name in HELDOUT_SETS),
        "protocol": (
            f"the {set_name} set of benchmarks/configs/heldout.json"
            if set_name
            else "given on the command line"
        ),
        "configs": specs,
        "samples": args.samples,
        "tuning": args.tuning,
        "eval_seed": SEEDS["evaluation"],
        "tuning_seed": SEEDS["tuning"],
        "calibration_seed": SEEDS["calibration"],
        "calibration_samples": CALIBRATION_SAMPLES,
        "magcache_seed": MAGCACHE_SEED,
        "magcache_images": MAGCACHE_IMAGES,
        "targets": list(TARGETS),
        "tolerance": sweep.TOLERANCE,
        "grid": "quick" if args.quick else "full",
        "plan": sizes,
        "quick": args.quick,
        "threads": args.threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peers": {k: v or "not installed" for k, v in available.items()},
    }
    report: dict[str, Any] = {"settings": settings, "notes": NOTES, "configs": [], "complete": False}
    earlier = 0.0
    path = args.out.with_suffix(".json")
    if args.resume and path.is_file():
        prev = json.loads(path.read_text())
        for key in (
            "samples",
            "tuning",
            "eval_seed",
            "tuning_seed",
            "calibration_seed",
            "magcache_seed",
            "grid",
        ):
            if prev["settings"].get(key) != settings[key]:
                raise SystemExit(
                    f"--resume: {key} differs from the earlier run's; start a fresh run instead."
                )
        report["configs"] = [c for c in prev["configs"] if c["config"] not in args.redo]
        settings["commands"] = [*prev["settings"].get("commands", [prev["settings"]["command"]]), command]
        settings["command"] = prev["settings"]["command"]
        earlier = float(prev.get("seconds", 0.0))
    last_save = [time.perf_counter()]
    current: dict[
        str, Any
    ] = {}  # the configuration being run: its entry, when it started, its earlier seconds

    def progress(msg: str) -> None:
        print(f"{time.perf_counter() - started:7.0f}s {msg}", flush=True)

    def save(full: bool = False) -> None:
        report["seconds"] = round(earlier + time.perf_counter() - started, 1)
        if current:
            current["entry"]["seconds"] = round(current["before"] + time.perf_counter() - current["t0"], 1)
        (write_all if full else write_json)(report, args.out)
        last_save[0] = time.perf_counter()

    def saved() -> None:  # after each point: the JSON, at most every 20 s (what --resume reads)
        if time.perf_counter() - last_save[0] > 20:
            save()

    for spec in specs:
        entry = next((c for c in report["configs"] if c["config"] == spec), None)
        if entry is not None and entry.get("complete"):
            progress(f"[{spec}] already in {path} (--resume): skipped")
            continue
        if entry is None:
            entry = {"config": spec}
            report["configs"].append(entry)
        else:
            progress(f"[{spec}] resuming: {len(entry.get('points', []))} points already measured")
        current.update(entry=entry, t0=time.perf_counter(), before=float(entry.get("seconds", 0.0)))
        run_config(spec, models[parse_config(spec)[0]], entry, args, grid, progress, saved)
        save(full=True)
        current.clear()
        progress(f"[{spec}] done; wrote {path}")
    report["complete"] = True
    save(full=True)
    print(f"wrote {args.out.with_suffix('.md')}, .json and {args.out.name}-mean.png", flush=True)


if __name__ == "__main__":
    main()
