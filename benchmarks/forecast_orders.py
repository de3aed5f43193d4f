"""Which forecast to extrapolate with, at TaylorSeer's own placements (issue 21, third round): a study.

For development configurations of both reference models, every TaylorSeer placement (intervals 2-5,
warm-ups 1-3: ``frontier_sweep.taylorseer_mask``) replayed with each forecast stepcache has: first order
(TaylorSeer order 1), ``taylor2`` (the Lagrange parabola), ``bdf2`` (one step along the parabola's
derivative at the last output, damped) and ``taylorseer2`` (TaylorSeer's order 2: the Taylor series
with backward-difference derivatives), scored as the mean PSNR of 24 evaluation images (seed 50000)
against uncached. Reported: how often each forecast is best, and how far below the best the better of
a pair lies (the pair ``fit_forecasts(forecast="auto")`` replays and starts from). Writes
``results/forecast-orders.{json,md}`` (about 8 min here).

    python benchmarks/forecast_orders.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.frontier import heldout_configs, load_protocol, parse_config
from benchmarks.frontier_sweep import taylorseer_mask
from benchmarks.harness.perimage import generate, per_image_psnr, summary
from stepcache.reference import load_model
from stepcache.runtime import cache
from stepcache.schedule import Schedule

HERE = Path(__file__).resolve().parent
CONFIGS = (
    "flow-euler-20-g1",
    "flow-euler-12-g1",
    "flow-euler-30-g3",
    "dpm-20-g2",
    "ddim-25-g4",
    "unipc-15-g1.5",
)
ORDERS = ("first-order", "taylor2", "bdf2", "taylorseer2")
PAIRS = (
    ("first-order",),
    ("first-order", "taylor2"),
    ("first-order", "bdf2"),
    ("first-order", "taylorseer2"),
    ("first-order", "bdf2", "taylorseer2"),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--out", type=Path, default=HERE / "results" / "forecast-orders")
    args = p.parse_args()
    held = heldout_configs(load_protocol()) & set(args.configs)
    if held:
        p.error(f"{sorted(held)}: the held-out set is run once, by frontier.py --final")
    torch.set_num_threads(2)
    rows: dict[str, dict[str, float]] = {}
    for spec in args.configs:
        model_name, scheduler, n, guidance = parse_config(spec)
        model = load_model(model=model_name)

        def run() -> torch.Tensor:
            return generate(model, scheduler, n, args.images, 50000, guidance)  # noqa: B023

        with torch.no_grad():
            base = run()
        for interval in (2, 3, 4, 5):
            for warm in (1, 2, 3):
                mask = taylorseer_mask(n, interval, warm)
                row = {}
                for order in ORDERS:
                    with torch.no_grad(), cache(model, Schedule(n, {"*": mask}).with_forecast(order)):
                        row[order] = summary(per_image_psnr(run(), base))["mean_db"]
                key = f"{spec} interval {interval} warm-up {warm} (f={sum(mask) / n:.2f})"
                rows[key] = row
                print(key, row, flush=True)
    best = Counter(max(r, key=r.__getitem__) for r in rows.values())
    loss = {
        " + ".join(pair): [round(max(r.values()) - max(r[k] for k in pair), 2) for r in rows.values()]
        for pair in PAIRS
    }
    summary_ = {k: {"mean": round(sum(v) / len(v), 2), "worst": max(v)} for k, v in loss.items()}
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"images": args.images, "rows": rows, "best": dict(best), "below_best": summary_}, indent=1
        )
    )
    lines = [
        "# Forecasts at TaylorSeer's placements",
        "",
        f"`python benchmarks/forecast_orders.py`: {len(rows)} placements (TaylorSeer intervals 2-5 x warm-ups "
        f"1-3) on {', '.join(args.configs)}; mean PSNR of {args.images} evaluation images against uncached.",
        "",
        "Best forecast: " + ", ".join(f"{k} {v}" for k, v in best.most_common()) + f" (of {len(rows)}).",
        "",
        "| forecasts tried | dB below the best of all four, mean | worst |",
        "|---|---|---|",
        *(f"| {k} | {v['mean']:.2f} | {v['worst']:.2f} |" for k, v in summary_.items()),
        "",
        "| placement | " + " | ".join(ORDERS) + " |",
        "|---|" + "---|" * len(ORDERS),
        *(f"| {k} | " + " | ".join(f"{r[o]:.2f}" for o in ORDERS) + " |" for k, r in rows.items()),
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
