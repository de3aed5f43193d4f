"""Forecast gains fitted on final samples vs the fixed weights at the same placement (issue 21, item 2).

For a development configuration and a few fractions: ``tune``'s placement (24 replays, no calibration)
with its fixed first-order weights, the same placement with second-order ones, and the same placement
after ``fit_forecasts`` (8 calls with gradients, 12 tuning images of seed 20000); each scored on 48
evaluation images of seed 50000 (mean / p5 PSNR against uncached). The numbers in docs/policies.md's
"Forecast gains chosen on the final samples" table come from this script.

    python benchmarks/fit_study.py flow-euler-20-g4 0.25,0.35,0.5
    python benchmarks/fit_study.py dpm-20-g1 0.25,0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.frontier import heldout_configs, load_protocol, parse_config
from benchmarks.harness.perimage import generate, per_image_psnr, summary
from stepcache.policies import fit_forecasts, tune
from stepcache.reference import load_model
from stepcache.runtime import cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a development configuration, e.g. dpm-20-g1")
    p.add_argument("fractions", help="comma-separated, e.g. 0.25,0.35,0.5")
    args = p.parse_args()
    if args.config in heldout_configs(load_protocol()):
        p.error(f"{args.config} is a held-out configuration: study on the development set only.")
    torch.set_num_threads(2)
    model_name, scheduler, steps, guidance = parse_config(args.config)
    model = load_model(model=model_name)

    def tuning_run() -> torch.Tensor:
        return generate(model, scheduler, steps, 12, 20000, guidance, differentiable=True)

    base = generate(model, scheduler, steps, 48, 50000, guidance)

    def score(schedule) -> str:
        with cache(model, schedule, count_macs=False):
            images = generate(model, scheduler, steps, 48, 50000, guidance)
        s = summary(per_image_psnr(images, base))
        return f"{s['mean_db']:.2f} / {s['p5_db']:.2f}"

    for f in (float(x) for x in args.fractions.split(",")):
        placed = tune(model, tuning_run, f, num_steps=steps, progress=False)
        fitted = fit_forecasts(model, tuning_run, placed, iterations=8, progress=False)
        print(
            f"{args.config} f={f:g} ({placed.meta['candidate']}): fixed first order {score(placed)}, "
            f"fixed second order {score(placed.with_forecast('taylor2'))}, fitted "
            f"({fitted.meta['forecast_fit']['forecast']}) {score(fitted)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
