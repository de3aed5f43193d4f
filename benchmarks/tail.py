"""Does ``tune`` generalise, and does it protect the worst samples? Old-style vs new-default tuning.

On the shipped reference DiT and its shipped calibrations, for each sampler (and guidance scale) and
compute fraction, two tunings on the same ``--tuning`` calibration images (seeds 20_000 + i):

* **old-style**: ``objective="mse"`` (pooled MSE), ``validation=0``, ``family="classic"``: what
  ``tune`` did before issue 15 part 3;
* **new default**: ``tune``'s defaults (worst-quarter objective, half the images held out for the
  choice among the top 3 and for accepting refinement, the full candidate family).

Each schedule is then evaluated on ``--samples`` images of other seeds (0 + i, disjoint from the
tuning seeds): per-image PSNR against the uncached image of the same seed, reported as mean, 5th
percentile and worst. diffusers' TaylorSeer (order 1, the harness adapter) runs on the same
evaluation images as the reference peer, at the settings whose measured compute fraction lies within
0.06 of the target.

    python benchmarks/tail.py                      # the committed results (see --help for sizes)
    python benchmarks/tail.py --quick              # 4 tuning / 8 evaluation images, DPM-Solver++ 20 only
    python benchmarks/tail.py --ablation --runs dpm-20-g3:0.5 dpm-20-g1:0.35 --out benchmarks/results/tail-ablation
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.perimage import generate, per_image_psnr, summary
from stepcache import reference
from stepcache.policies import tune
from stepcache.runtime import cache

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OLD = {"objective": "mse", "validation": 0, "family": "classic"}
#: --ablation: one ingredient at a time on the full family (``tuning`` multiplies the tuning images).
ABLATION: dict[str, dict[str, Any]] = {
    "full family, mse, no validation": {"objective": "mse", "validation": 0},
    "full family, worst-25%, no validation": {"validation": 0},
    "full family, mse, validation": {"objective": "mse"},
    "new default, 2x tuning images": {"tuning": 2},
    "full family, mse, no validation, 2x tuning images": {"objective": "mse", "validation": 0, "tuning": 2},
    "full family, mean, validation, 2x tuning images": {"objective": "mean", "tuning": 2},
}
TUNING_SEED, EVAL_SEED = 20_000, 0
TAYLORSEER = ((2, 3), (3, 3), (4, 3), (3, 2), (4, 2))  # (interval, warm-up): fractions ~0.3..0.55


def taylorseer(model: torch.nn.Module, steps: int, run: Any) -> list[tuple[str, float, torch.Tensor]]:
    """(knob, measured compute fraction, images) of diffusers TaylorSeer at a few settings; [] if absent."""
    from benchmarks.harness import peers

    if not peers.available_peers().get(peers.DIFFUSERS):
        return []
    out = []
    for interval, warm in TAYLORSEER:
        pm = peers.taylorseer(interval, warm)
        with (
            peers.count_component_calls(model) as counts,
            peers.apply_peer(pm, model, num_inference_steps=steps),
        ):
            images = run()
            frac = float(counts()["fraction"])
        out.append((pm.knob, frac, images))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tuning", type=int, default=12, help="calibration images each tuning replays")
    parser.add_argument("--samples", type=int, default=32, help="evaluation images (other seeds)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.35, 0.5])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["dpm-20-g3", "dpm-20-g1", "ddim-50-g1"],
        help="sampler-steps-gGUIDANCE[:fraction]",
    )
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="the ABLATION variants instead of old-style / new default, no peers",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "tail")
    args = parser.parse_args()
    if args.quick:
        args.tuning, args.samples, args.runs = 4, 8, ["dpm-20-g3"]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    models = {name: reference.load_model(model=name) for name in ("ddpm", "flow")}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for spec in args.runs:
        spec, _, only = spec.partition(":")  # "dpm-20-g3:0.5": that fraction only
        scheduler, steps_s, g = spec.rsplit("-", 2)  # "flow-euler-20-g4": the flow-matching model
        model = models["flow" if scheduler == "flow-euler" else "ddpm"]
        steps, guidance = int(steps_s), float(g[1:])
        cal = reference.shipped_calibration(scheduler, steps)
        assert cal is not None, spec

        def tuning_run(s=scheduler, n=steps, g=guidance, times=1, m=model) -> torch.Tensor:
            return generate(m, s, n, args.tuning * times, TUNING_SEED, g)

        def eval_run(s=scheduler, n=steps, g=guidance, m=model) -> torch.Tensor:
            return generate(m, s, n, args.samples, EVAL_SEED, g)

        base = eval_run()
        for fraction in [float(only)] if only else args.fractions:
            variants = ABLATION if args.ablation else {"old-style": OLD, "new default": {}}
            for name, variant in variants.items():
                opts = dict(variant)
                run = functools.partial(tuning_run, times=opts.pop("tuning", 1))
                t0 = time.perf_counter()
                sched = tune(model, run, fraction, calibration=cal, progress=False, **opts)
                seconds = time.perf_counter() - t0
                with cache(model, sched, count_macs=False):
                    psnr = per_image_psnr(eval_run(), base)
                info = sched.meta["tuning"]
                row = {
                    "run": spec,
                    "fraction": fraction,
                    "method": name,
                    "candidate": sched.meta["candidate"],
                    "compute_fraction": round(sched.compute_fraction, 4),
                    **summary(psnr),
                    "tuning_replays": info["runs"],
                    "tuning_s": round(seconds, 1),
                    "refinement": info["refinement"],
                    "plan": list(next(iter(sched.plans.values()))),
                }
                rows.append(row)
                print(
                    json.dumps({k: v for k, v in row.items() if k not in ("plan", "refinement")}), flush=True
                )
        if args.peers and not args.ablation:
            for knob, frac, images in taylorseer(model, steps, eval_run):
                near = [f for f in args.fractions if abs(frac - f) <= 0.06]
                if not near:
                    continue
                row = {
                    "run": spec,
                    "fraction": near[0],
                    "method": "diffusers TaylorSeer",
                    "candidate": knob,
                    "compute_fraction": round(frac, 4),
                    **summary(per_image_psnr(images, base)),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "tuning_images": args.tuning,
        "evaluation_images": args.samples,
        "tuning_seed": TUNING_SEED,
        "evaluation_seed": EVAL_SEED,
        "old_style": OLD,
        "seconds": round(time.perf_counter() - started, 1),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.ablation:
        report["ablation"] = ABLATION
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out.with_suffix('.md')} and .json")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Tail quality of tuned schedules: old-style vs new default tune",
        "",
        f"Reference DiT, shipped calibrations. Tuning on {report['tuning_images']} images (seeds "
        f"{report['tuning_seed']}+), evaluation on {report['evaluation_images']} other images (seeds "
        f"{report['evaluation_seed']}+); PSNR per image against the uncached image of the same seed. "
        "old-style = `objective='mse', validation=0, family='classic'`; new default = `tune(...)` defaults. "
        f"Generated by `python benchmarks/tail.py` in {report['seconds']:.0f} s.",
        "",
        "| run | f | method | fraction | mean dB | p5 dB | worst dB | replays | chosen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['run']} | {r['fraction']:g} | {r['method']} | {r['compute_fraction']:.3f} | {r['mean_db']:.2f} | "
            f"{r['p5_db']:.2f} | {r['worst_db']:.2f} | {r.get('tuning_replays', '-')} | {r['candidate']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
