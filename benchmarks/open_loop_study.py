"""Which calibration-only placement rule comes closest to the best peer (issue 21, item 3): a study.

For development configurations (and the spent first held-out set), every candidate of ``tune``'s family
(warm-ups up to ``--max-warmup``) with first- and second-order forecasts, plus the optimal policy's
schedules, replayed on the first ``--images`` evaluation images (seed 50000) and scored as mean / p5
PSNR against uncached; each candidate's calibrated predicted cost is recorded beside it. The JSON it
writes is what the open-loop rule in ``stepcache.policies.auto`` was chosen from (docs/policies.md).
Refuses the second held-out set.

    python benchmarks/open_loop_study.py --configs dpm-20-g1 flow-euler-20-g4 --out /tmp/ol.json

The committed ``results/open-loop-study.json`` (24 cells: flow-euler-12-g1, unipc-15-g1.5, dpm-12-g3,
ddim-28-g1, flow-euler-30-g3, flow-euler-15-g2.5 from the spent first held-out set, dpm-20-g1 and
flow-euler-20-g1 from the development set; warm-ups up to 6; about 25 min here) came from
``--configs unipc-15-g1.5 dpm-12-g3 ddim-28-g1 flow-euler-30-g3 flow-euler-15-g2.5 dpm-20-g1
flow-euler-20-g1`` after ``--configs flow-euler-12-g1``, into one file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.frontier import calibration_for, heldout_configs, load_protocol, parse_config
from benchmarks.harness.perimage import generate, per_image_psnr, summary
from stepcache.errors import ScheduleError
from stepcache.policies import optimal_schedule
from stepcache.policies._family import candidate_schedules, computes_per_type, type_layers
from stepcache.policies.tuned import _predicted
from stepcache.reference import load_model
from stepcache.runtime import cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--fractions", default="0.25,0.35,0.5")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--max-warmup", type=int, default=6)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--orders",
        default="first-order,taylor2",
        help="the forecasts every placement is replayed with (comma-separated: copy and schedule.METHODS)",
    )
    args = p.parse_args()
    held = heldout_configs(load_protocol())
    if held & set(args.configs):
        p.error(f"{sorted(held & set(args.configs))}: the held-out set is run once, by frontier.py --final")
    torch.set_num_threads(2)
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for spec in args.configs:
        model_name, scheduler, steps, guidance = parse_config(spec)
        model = load_model(model=model_name)
        cal, _ = calibration_for(model_name, scheduler, steps, guidance)
        base = generate(model, scheduler, steps, args.images, 50000, guidance)
        layers = type_layers(model, cal)
        for f in (float(x) for x in args.fractions.split(",")):
            key = f"{spec}@{f:g}"
            if key in out:
                continue
            t0 = time.perf_counter()
            per_type = computes_per_type(f, steps, layers)
            cands = candidate_schedules(steps, per_type, layers, min(args.max_warmup, steps // 2))
            rows = []
            for label, s in cands.items():
                for order in args.orders.split(","):
                    rows.append((f"{label} [{order}]", s.with_forecast(order)))
            for g in ("type", "layer"):
                with contextlib.suppress(ScheduleError):
                    rows.append((f"optimal ({g})", optimal_schedule(cal, f, granularity=g)))
            res = []
            for label, s in rows:
                with cache(model, s, count_macs=False):
                    img = generate(model, scheduler, steps, args.images, 50000, guidance)
                r = summary(per_image_psnr(img, base))
                res.append(
                    {
                        "label": label,
                        "fraction": round(s.compute_fraction, 4),
                        "predicted": round(_predicted(s, cal), 5),
                        "plans": {k: "".join(map(str, v)) for k, v in s.plans.items()},
                        **r,
                    }
                )
            out[key] = res
            best = max(res, key=lambda r: r["mean_db"])
            print(
                f"{key}: {len(res)} candidates in {time.perf_counter() - t0:.0f} s; best {best['label']} "
                f"{best['mean_db']:.2f}",
                flush=True,
            )
            args.out.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
