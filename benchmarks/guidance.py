"""Guidance-aware caching on both reference models: per-branch calibration, and standing in for the
unconditional branch (plain per-branch reuse vs guidance-difference reuse) against spending the same
compute on the shared schedule.

Per configuration (sampler, steps, guidance scale) on the reference DiT of its objective:

* a shared-schedule calibration (``calibrate_reference`` at that guidance, seeds 1000+) and a guidance
  calibration (:func:`stepcache.calibrate_guidance`, the same seeds): the per-branch errors
  (copying the conditional output, copying the unconditional output, the guidance-difference stand-in)
  averaged over components and steps at gap 1 are reported;
* at each target compute fraction ``f``: ``optimal_schedule(cal, f)`` alone, and ``optimal`` at a higher
  fraction ``f + d`` brought down to ``f`` by ``guidance_for_compute_fraction`` with either stand-in
  (``reuse``: the unconditional output of the last full computation; ``difference``: the conditional
  output now plus the kept guidance difference);
* ``tune_guidance`` (the plain schedule or one of the stand-in combinations, chosen on 12 replayed
  images of seeds 20000+ by the worst quarter of per-image errors);
* every schedule on ``--samples`` evaluation images (seeds 0+), per-image PSNR against the uncached
  image: mean, 5th percentile, worst; compute fraction as the cache measured it (a halved call counts
  half), which the harness counter confirms.

    python benchmarks/guidance.py                         # the committed results
    python benchmarks/guidance.py --quick                 # one configuration, 8 images
    python benchmarks/guidance.py --runs dpm-20-g2 --fractions 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from stepcache.policies import optimal_schedule

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import peers
from benchmarks.harness.perimage import generate, per_image_psnr
from stepcache import Schedule, reference
from stepcache.calibration import calibrate_guidance
from stepcache.errors import ScheduleError
from stepcache.guidance import KINDS, GuidanceReuse
from stepcache.policies import guidance_for_compute_fraction, tune_guidance
from stepcache.reference import calibrate_reference
from stepcache.runtime import cache

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CAL_SEED, EVAL_SEED, CAL_SAMPLES = 1000, 0, 8
TUNE_SEED, TUNE_SAMPLES = 20_000, 12  # tune_guidance's replays: 12 images of other seeds
RUNS = ["dpm-20-g1.5", "dpm-20-g2", "dpm-20-g4", "ddim-50-g4", "flow-euler-20-g1.5", "flow-euler-20-g4"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", default=RUNS, help="sampler-steps-gGUIDANCE")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.35, 0.5])
    parser.add_argument(
        "--raise-by", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="d: base at f + d"
    )
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-tune", dest="tune", action="store_false", help="skip the tune_guidance rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "guidance")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.samples, args.fractions, args.raise_by = ["dpm-20-g4"], 8, [0.5], [0.1]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    models = {name: reference.load_model(model=name) for name in ("ddpm", "flow")}
    started = time.perf_counter()
    configs: list[dict[str, Any]] = []
    for spec in args.runs:
        configs.append(run_config(spec, models, args))
        write(
            args.out,
            {
                "settings": settings(args),
                "seconds": round(time.perf_counter() - started, 1),
                "configs": configs,
            },
        )
    print(f"wrote {args.out.with_suffix('.md')} and .json")


def run_config(spec: str, models: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate, then run every method at every target fraction, for one configuration."""
    scheduler, steps_s, g_s = spec.rsplit("-", 2)
    steps, g = int(steps_s), float(g_s[1:])
    model = models["flow" if scheduler == "flow-euler" else "ddpm"]
    t0 = time.perf_counter()
    cal = calibrate_reference(
        scheduler, steps, samples=CAL_SAMPLES, seed=CAL_SEED, guidance_scale=g, progress=False
    )

    def cal_runs(s=scheduler, n=steps, g=g, m=model) -> None:
        for i in range(CAL_SAMPLES):
            generate(m, s, n, reference.NUM_CLASSES, CAL_SEED + i, g)

    gcal = calibrate_guidance(model, cal_runs, layout="cond-first", progress=False)
    cal_s = time.perf_counter() - t0
    drift = {kind: {k: round(v, 4) for k, v in d.items()} for kind, d in gcal.summary().items()}
    base = generate(model, scheduler, steps, args.samples, EVAL_SEED, g)
    rows: list[dict[str, Any]] = []

    def run(label: str, fraction: float, sched: Schedule, plan: GuidanceReuse | None, **info: Any) -> None:
        with peers.count_component_calls(model) as counts, cache(model, sched, guidance=plan) as handle:
            images = generate(model, scheduler, steps, args.samples, EVAL_SEED, g)
        psnr = per_image_psnr(images, base)
        measured = handle.stats.compute_fraction
        assert abs(measured - counts()["fraction"]) < 1e-6, (measured, counts())
        row = {
            "target": fraction,
            "method": label,
            **info,
            "compute_fraction": round(measured, 4),
            "mean_db": round(float(psnr.mean()), 2),
            "p5_db": round(float(torch.quantile(psnr, 0.05)), 2),
            "worst_db": round(float(psnr.min()), 2),
            "halved_calls": handle.stats.halved,
        }
        rows.append(row)
        print(spec, json.dumps(row), flush=True)

    for f in args.fractions:
        run("optimal", f, optimal_schedule(cal, f), None)
        for d in args.raise_by:
            shared = optimal_schedule(cal, min(1.0, f + d))
            for mode in ("reuse", "difference"):
                try:
                    plan = guidance_for_compute_fraction(gcal, shared, f, mode=mode)
                except ScheduleError as e:
                    print(spec, f, d, mode, "unreachable:", e, flush=True)
                    continue
                run(
                    f"optimal at f+{d:g} + {mode} stand-ins",
                    f,
                    shared,
                    plan,
                    base_fraction=round(f + d, 3),
                )
        if args.tune:  # the closed-loop choice a user would make, on other seeds than the evaluation's
            sched, plan = tune_guidance(
                model,
                lambda: generate(model, scheduler, steps, TUNE_SAMPLES, TUNE_SEED, g),
                f,
                calibration=cal,
                guidance=gcal,
                # The committed results started from the optimal schedule (then tune_guidance's default).
                schedule=optimal_schedule(cal, f),
                raise_by=args.raise_by,
                progress=False,
            )
            run("tune_guidance", f, sched, plan, chosen=sched.meta["guidance_tuning"]["chosen"])
    return {
        "run": spec,
        "model": "flow" if scheduler == "flow-euler" else "ddpm",
        "guidance": g,
        "calibration_s": round(cal_s, 1),
        "branch_errors_gap1": drift,
        "rows": rows,
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "samples": args.samples,
        "fractions": args.fractions,
        "raise_by": args.raise_by,
        "calibration": f"{CAL_SAMPLES} generations of 10 images, seeds {CAL_SEED}+",
        "evaluation_seed": EVAL_SEED,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", markdown(report))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Guidance-aware caching: per-branch reuse vs guidance-difference reuse vs the shared schedule",
        "",
        f"Reference DiTs, batched classifier-free guidance ([cond; uncond] in one call). Calibrations: "
        f"{s['calibration']}; evaluation: {s['samples']} images (seeds {s['evaluation_seed']}+), PSNR per image "
        f"against the uncached image. `python benchmarks/guidance.py`, {report['seconds']:.0f} s, "
        f"{s['platform']}, torch {s['torch']}.",
        "",
        "## How the branches drift (guidance calibration, relative L1 at gap 1, mean over steps and layers)",
        "",
        "| run | type | " + " | ".join(KINDS) + " |",
        "|---|---|" + "---|" * len(KINDS),
    ]
    for c in report["configs"]:
        for kind, d in c["branch_errors_gap1"].items():
            lines.append(f"| {c['run']} | {kind} | " + " | ".join(f"{d[k]:.4f}" for k in KINDS) + " |")
    lines += [
        "",
        "## At matched compute fractions",
        "",
        "| run | f | method | fraction | halved calls | mean dB | p5 dB | worst dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["configs"]:
        for r in c["rows"]:
            lines.append(
                f"| {c['run']} | {r['target']:g} | {r['method']}{' -> ' + r['chosen'] if 'chosen' in r else ''} | {r['compute_fraction']:.3f} | {r['halved_calls']} | "
                f"{r['mean_db']:.2f} | {r['p5_db']:.2f} | {r['worst_db']:.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
