"""How well placements are ranked without replays (issue 21, item 3): the calibrated errors against the
output response (``stepcache.response``), on the candidates ``open_loop_study.py`` measured.

For each cell of the study's JSON (a development configuration and fraction; every placement of the
structured family with first- and second-order forecasts, plus the optimal schedules, each measured as
the mean PSNR of 16 evaluation images), the output response is measured on 8 images of the calibration
seed (2 projections) and every candidate gets two predictions: the calibrated cost (the optimal policy's
cost model) and the response's predicted error. Reported per predictor: the rank correlation with the
measured PSNR, and how far below the best measured candidate the best of its top k lies (k = 1, 3, 6,
10), mean and worst over the cells; for k = 1 also among copies and first-order forecasts only (what
the open loop ranks). Writes ``results/open-loop-rank.{json,md}``.

    python benchmarks/open_loop_study.py --configs ... --out /tmp/ol.json   # the measured candidates
    python benchmarks/open_loop_rank.py                      # the committed results/open-loop-study.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.frontier import (
    SEEDS,
    calibration_for,
    heldout_configs,
    load_protocol,
    parse_config,
    with_response,
)
from stepcache import Schedule
from stepcache.policies._response import predicted_error_db
from stepcache.policies.tuned import _predicted
from stepcache.reference import load_model

HERE = Path(__file__).resolve().parent
KS = (1, 3, 6, 10)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path, nargs="?", default=HERE / "results" / "open-loop-study.json")
    p.add_argument("--out", type=Path, default=HERE / "results" / "open-loop-rank")
    args = p.parse_args()
    torch.set_num_threads(2)
    study = json.loads(args.study.read_text())
    held = heldout_configs(load_protocol())
    cells, cals = [], {}
    for key, rows in study.items():
        spec = key.split("@")[0]
        if spec in held:
            raise SystemExit(f"{spec} is held out: the study covers development configurations only")
        model_name, scheduler, steps, guidance = parse_config(spec)
        if spec not in cals:
            model = load_model(model=model_name)
            cal, _ = calibration_for(model_name, scheduler, steps, guidance)
            cals[spec] = with_response(model, cal, scheduler, steps, guidance)
        cal = cals[spec]
        size = cal.meta["response"]["sample_size"]
        rows = [r for r in rows if "layer" not in r["label"]]  # per-layer plans are not predicted
        measured = [r["mean_db"] for r in rows]
        sched = [Schedule(steps, {k: tuple(int(c) for c in v) for k, v in r["plans"].items()}) for r in rows]
        calibrated = [_predicted(s, cal) for s in sched]
        response = [predicted_error_db(s, cal.response, size) for s in sched]
        best = max(measured)
        cell = {"cell": key, "candidates": len(rows), "best_db": best}
        for name, pred in (("calibrated", calibrated), ("response", response)):
            pred = [x if math.isfinite(x) else 1e9 for x in pred]
            order = np.argsort(pred)
            cell[name] = {
                "spearman": round(-spearman(pred, measured), 3),
                **{f"top{k}_gap_db": round(max(measured[i] for i in order[:k]) - best, 2) for k in KS},
            }
            for key, banned in (
                ("top1_no_second_order_gap_db", ("taylor2", "bdf2")),
                ("top1_no_taylor2_gap_db", ("taylor2",)),
            ):
                low = [i for i in order if not any(b in rows[i]["label"] for b in banned)]
                cell[name][key] = round(measured[low[0]] - best, 2)
        cells.append(cell)
        print(key, {n: cell[n] for n in ("calibrated", "response")}, flush=True)
    summary = {}
    for name in ("calibrated", "response"):
        keys = [k for k in cells[0][name]]
        summary[name] = {
            k: {"mean": round(float(np.mean([c[name][k] for c in cells])), 2),
                "worst": round(float(min(c[name][k] for c in cells)), 2)}
            for k in keys
        }  # fmt: skip
    report = {
        "study": str(args.study),
        "response_images": 8,
        "response_seed": SEEDS["calibration"],
        "cells": cells,
        "summary": summary,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Ranking placements without replays: calibrated errors vs the output response",
        "",
        f"{len(cells)} cells (development configurations x fractions; `benchmarks/open_loop_rank.py`). Per "
        "cell: every placement of the structured family with first- and second-order forecasts and the "
        "optimal (type) schedule, measured as mean PSNR of 16 evaluation images; predicted by the calibrated "
        "cost and by the output response (8 images of the calibration seed, 2 projections). Gap: how far "
        "below the best measured candidate the best of the predictor's top k lies (dB; 0 = it found it).",
        "",
        "| predictor | rank corr. (mean / worst) | top 1 | top 1, first-order forecasts only (what the open loop ranks) | top 3 | top 6 | top 10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():

        def mw(k: str, s: dict = s) -> str:
            return f"{s[k]['mean']:+.2f} / {s[k]['worst']:+.2f}"

        lines.append(
            f"| {name} | {s['spearman']['mean']:.2f} / {s['spearman']['worst']:.2f} | {mw('top1_gap_db')} | "
            f"{mw('top1_no_second_order_gap_db')} | {mw('top3_gap_db')} | {mw('top6_gap_db')} | {mw('top10_gap_db')} |"
        )
    lines += ["", "Gaps: mean / worst over the cells.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
