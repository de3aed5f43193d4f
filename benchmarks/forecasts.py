"""Copy vs first-order vs second-order (taylor2) vs BDF2-style forecasts on the reference model.

For each sampler (DDIM 50, DPM-Solver++ 20): calibrate the reference DiT with second-order forecast
errors (``calibrate(..., second_order=True)``; seeds 1000+, disjoint from the evaluation's seeds
0, 1, ...), then at compute fractions 0.25 / 0.35 / 0.5 run

* an even schedule (FORA-style: evenly spaced computations, first and last step included, one plan
  per type) whose reused steps copy, forecast first order, taylor2 or bdf2;
* the optimal (DP) policy choosing per reused step among copy only, copy or first order, copy or
  first order or taylor2, copy or first order or bdf2, and all four;

and score the final samples against the uncached samples of the same seeds: mean per-image PSNR
and the worst image's PSNR, plus the measured peak of stored outputs (kept outputs x bytes).

    python benchmarks/forecasts.py [--samples 40] [--calibration-samples 6] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from stepcache.policies import optimal_schedule

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stepcache
from benchmarks.harness.perimage import per_image_psnr
from stepcache import Calibration, Schedule, reference
from stepcache.policies._plan import uniform_plan

SAMPLERS = (("ddim", 50), ("dpm", 20))
FRACTIONS = (0.25, 0.35, 0.5)
METHODS = ("copy", "first-order", "taylor2", "bdf2")


def generate(model: torch.nn.Module, scheduler: str, steps: int, n: int, batch: int) -> torch.Tensor:
    labels = torch.arange(n) % reference.NUM_CLASSES
    outs = []
    for i, start in enumerate(range(0, n, batch)):  # batch i uses seed i: disjoint from calibration's 1000+
        outs.append(
            reference.sample(
                model, labels[start : start + batch], scheduler=scheduler, num_inference_steps=steps, seed=i
            )
        )
    return torch.cat(outs)


def calibrate(scheduler: str, steps: int, samples: int) -> Calibration:
    pipe = reference.ReferencePipeline(scheduler, guidance_scale=1.0)  # the evaluation is unguided too
    inputs = [{"class_labels": list(range(10)), "seed": 1000 + i} for i in range(samples)]
    shipped = reference.shipped_calibration(scheduler, steps)
    lookahead = shipped.lookahead if shipped is not None else 4
    return stepcache.calibrate(
        pipe,
        inputs=inputs,
        num_inference_steps=steps,
        lookahead=lookahead,
        second_order=True,
        progress=False,
    )


def schedules(cal: Calibration, steps: int, fraction: float) -> dict[str, Schedule]:
    plan = uniform_plan(steps, fraction)
    even = Schedule(steps, {"attn": plan, "ff": plan}, meta={"rule": "even"})
    out: dict[str, Schedule] = {}
    for method in METHODS:
        out[f"even {method}"] = even if method == "copy" else even.with_forecast(method)
    only = {m: cal.replace(forecast2_errors={m: cal.forecast2_errors[m]}) for m in ("taylor2", "bdf2")}
    out["optimal copy"] = optimal_schedule(cal, fraction, forecast=False)
    out["optimal first-order"] = optimal_schedule(cal, fraction, second_order=False)
    out["optimal taylor2"] = optimal_schedule(only["taylor2"], fraction, second_order=True)
    out["optimal bdf2"] = optimal_schedule(only["bdf2"], fraction, second_order=True)
    out["optimal all"] = optimal_schedule(cal, fraction, second_order=True)
    return out


def mix(schedule: Schedule) -> dict[str, int]:
    """How many reused steps (per type plan, summed) take each predictor."""
    names = {0: "copy", 2: "first-order", 3: "taylor2", 4: "bdf2"}
    counts = dict.fromkeys(names.values(), 0)
    for plan in schedule.plans.values():
        for v in plan:
            if v in names:
                counts[names[v]] += 1
    return counts


def run(samples: int, cal_samples: int, batch: int, out_dir: Path) -> dict[str, Any]:
    torch.set_num_threads(2)
    model = reference.load_model()
    results: dict[str, Any] = {
        "samples": samples,
        "calibration_samples": cal_samples,
        "eval_seeds": f"0..{math.ceil(samples / batch) - 1} (batches of {batch})",
        "calibration_seeds": f"1000..{1000 + cal_samples - 1} (10 images each)",
        "rows": [],
    }
    for scheduler, steps in sorted(SAMPLERS, key=lambda x: x[1]):  # the short sampler first
        start = time.perf_counter()
        cal = calibrate(scheduler, steps, cal_samples)
        cal_seconds = time.perf_counter() - start
        with torch.no_grad():
            base = generate(model, scheduler, steps, samples, batch)
        results[f"{scheduler}-{steps}"] = {
            "calibration_seconds": round(cal_seconds, 1),
            "lookahead": cal.lookahead,
        }
        for fraction in FRACTIONS:
            for name, sched in schedules(cal, steps, fraction).items():
                with torch.no_grad(), stepcache.cache(model, sched) as handle:
                    images = generate(model, scheduler, steps, samples, batch)
                psnr = per_image_psnr(images, base)
                row = {
                    "sampler": f"{scheduler}-{steps}",
                    "fraction": fraction,
                    "method": name,
                    "compute_fraction": round(sched.compute_fraction, 4),
                    "psnr_mean": round(float(psnr.mean()), 2),
                    "psnr_worst": round(float(psnr.min()), 2),
                    "peak_stored_bytes": handle.stats.peak_stored_bytes,
                    "predictors": mix(sched),
                    "render": sched.render(),
                }
                results["rows"].append(row)
                print(
                    f"{row['sampler']} f={fraction} {name:<22} {row['psnr_mean']:6.2f} / {row['psnr_worst']:6.2f} dB",
                    flush=True,
                )
        out_dir.mkdir(parents=True, exist_ok=True)  # written after each sampler
        (out_dir / "forecasts.json").write_text(json.dumps(results, indent=1) + "\n")
        (out_dir / "forecasts.md").write_text(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "# Forecast methods: copy vs first order vs taylor2 vs BDF2-style (benchmarks/forecasts.py)",
        "",
        f"Reference DiT, unguided, {results['samples']} evaluation images (seeds {results['eval_seeds']}); "
        f"calibration with second-order errors on {results['calibration_samples']} generations "
        f"(seeds {results['calibration_seeds']}). PSNR of the final samples against the uncached samples "
        "of the same seeds, mean / worst image, dB. Peak = measured peak of stored outputs (KiB).",
        "",
    ]
    for scheduler, steps in SAMPLERS:
        key = f"{scheduler}-{steps}"
        rows = [r for r in results["rows"] if r["sampler"] == key]
        if not rows:
            continue
        info = results.get(key, {})
        lines += [
            f"## {key} (lookahead {info.get('lookahead')}, calibration {info.get('calibration_seconds')} s)",
            "",
            "| schedule | "
            + " | ".join(f"f = {f}" for f in FRACTIONS)
            + " | peak KiB at "
            + " / ".join(map(str, FRACTIONS))
            + " |",
            "|---|" + "---|" * (len(FRACTIONS) + 1),
        ]
        names = list(dict.fromkeys(r["method"] for r in rows))
        for name in names:
            cells, peaks = [], []
            for f in FRACTIONS:
                r = next(r for r in rows if r["method"] == name and r["fraction"] == f)
                cells.append(f"{r['psnr_mean']:.2f} / {r['psnr_worst']:.2f} @ {r['compute_fraction']:.2f}")
                peaks.append(f"{r['peak_stored_bytes'] / 1024:.0f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " / ".join(peaks) + " |")
        lines += ["", "Predictors the optimal policy chose (reused steps of the attn + ff type plans):", ""]
        for r in rows:
            if r["method"] == "optimal all":
                lines.append(f"- f = {r['fraction']}: {r['predictors']}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--calibration-samples", type=int, default=6)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    run(args.samples, args.calibration_samples, args.batch, args.out)


if __name__ == "__main__":
    main()
