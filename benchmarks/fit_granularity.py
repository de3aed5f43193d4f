"""Forecast gains per step or per component (issue 21): ``fit_forecasts(per="step")`` against
``fit_forecasts(per="component")``, the default.

Both fit the same way (start from the better of first order and bdf2, 8 calls, lr 0.1, the step back) on
12 tuning images (seed 20000) of development configurations, at TaylorSeer's placement, and are scored
on 48 evaluation images (seed 50000) against uncached, next to TaylorSeer order 2 at that placement.
(The first version of this study, at commit c19bf10, fitted per type too, with its own copy of the loop:
mixed; its per-step and per-component numbers are the ones this API run reproduces. The committed
results have a third column, "step-then-component": per step for half the calls, then per component
from there, measured at commit a314ccd and not adopted: no better than per component.) Writes
``results/fit-granularity.{json,md}`` (about 8 min here).

    python benchmarks/fit_granularity.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.frontier import heldout_configs, load_protocol, parse_config
from benchmarks.frontier_sweep import taylorseer_mask
from benchmarks.harness.perimage import generate, per_image_psnr, summary
from stepcache.policies import fit_forecasts
from stepcache.reference import load_model
from stepcache.runtime import cache
from stepcache.schedule import Schedule

HERE = Path(__file__).resolve().parent
#: (configuration, TaylorSeer interval, warm-up): development data only
CELLS = (
    ("flow-euler-14-g3.5", 2, 1),
    ("flow-euler-28-g1", 2, 1),
    ("dpm-20-g2", 3, 1),
    ("flow-euler-24-g1.5", 2, 1),
    ("flow-euler-10-g2", 2, 1),
    ("unipc-24-g2.5", 3, 1),
    ("deis-18-g3", 3, 1),
    ("dpm-10-g1", 3, 1),
)
PERS = ("step", "component")


def main() -> None:
    held = heldout_configs(load_protocol())
    if held & {c for c, _, _ in CELLS}:
        raise SystemExit("the study runs on development configurations only")
    torch.set_num_threads(2)
    results = []
    for spec, i, w in CELLS:
        m, s, n, gsc = parse_config(spec)
        model = load_model(model=m)

        def ev() -> torch.Tensor:
            return generate(model, s, n, 48, 50000, gsc)  # noqa: B023

        def tr() -> torch.Tensor:
            return generate(model, s, n, 12, 20000, gsc, differentiable=True)  # noqa: B023

        with torch.no_grad():
            base = ev()
        plain = Schedule(n, {"*": taylorseer_mask(n, i, w)})
        with torch.no_grad(), cache(model, plain.with_forecast("taylorseer2")):
            taylorseer = summary(per_image_psnr(ev(), base))
        row = {"config": spec, "interval": i, "warm_up": w, "taylorseer2 (TaylorSeer order 2)": taylorseer}
        for per in PERS:
            fitted = fit_forecasts(model, tr, plain, iterations=8, per=per, progress=False)
            row["start"] = fitted.meta["forecast_fit"]["start"]
            with torch.no_grad(), cache(model, fitted):
                row[f"per {per}"] = summary(per_image_psnr(ev(), base))
            print(spec, per, row[f"per {per}"], flush=True)
        results.append(row)
    out = HERE / "results" / "fit-granularity"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    cols = ("taylorseer2 (TaylorSeer order 2)", *(f"per {p}" for p in PERS))
    lines = [
        "# Forecast gains per step or per component",
        "",
        "`python benchmarks/fit_granularity.py`: `fit_forecasts(per=...)` at TaylorSeer's placement (bdf2 "
        "forecasts, started as first order where it replays better), 8 fitting calls on 12 tuning images "
        "(seed 20000), lr 0.1; mean / p5 dB of 48 evaluation images (seed 50000) against uncached. "
        "Development configurations only.",
        "",
        "| configuration | placement | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
        *(
            f"| {r['config']} | interval {r['interval']}, warm-up {r['warm_up']}, from {r['start']} | "
            + " | ".join(f"{r[c]['mean_db']:.2f} / {r[c]['p5_db']:.2f}" for c in cols)
            + " |"
            for r in results
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
