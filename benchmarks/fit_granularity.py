"""Forecast gains per step, per component type or per component (issue 21, a lead for the next round).

``fit_forecasts`` chooses one pair of gains ``(g_alpha, g_beta)`` per step, shared by every component.
This study fits the same gains (same start, 8 calls, lr 0.1, the step back) at three granularities on
development configurations, at TaylorSeer's placement with bdf2 forecasts (started as first order where
first order replays better), and scores each on 48 evaluation images (seed 50000) against uncached.
The per-type and per-component gains are set on the running cache's slots directly (a study, not an
API: ``Schedule.gains`` holds per-step gains only). Writes ``results/fit-granularity.{json,md}`` (about
10 min here).

    python benchmarks/fit_granularity.py
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stepcache.policies.fitted as F
from benchmarks.frontier import heldout_configs, load_protocol, parse_config
from benchmarks.frontier_sweep import taylorseer_mask
from benchmarks.harness.perimage import generate, per_image_psnr, summary
from stepcache.errors import ScheduleError
from stepcache.policies._replay import rows
from stepcache.reference import load_model
from stepcache.runtime import cache
from stepcache.runtime.introspect import final_samples
from stepcache.schedule import Schedule

HERE = Path(__file__).resolve().parent
#: (configuration, TaylorSeer interval, warm-up): development data only
CELLS = (("flow-euler-14-g3.5", 2, 1), ("flow-euler-28-g1", 2, 1), ("dpm-20-g2", 3, 1))


def fit(
    model: torch.nn.Module,
    tr: Callable[[], torch.Tensor],
    sched: Schedule,
    gains0: torch.Tensor,
    group: Callable[[Any], Any],
    iters: int = 8,
    lr: float = 0.1,
) -> tuple[torch.Tensor, list[int]]:
    """``fit_forecasts``' loop (Adam, the step back, the best gains kept) with one pair of gains per step
    and per group of slots: returns the best gains ``(n, groups, 2)`` and each slot's group."""
    with torch.no_grad():
        ref = rows(final_samples(tr(), ScheduleError)).float()
    with cache(model, sched, count_macs=False) as h:
        keys = [group(slot) for slot in h._slots.values()]
    uniq = sorted(set(keys), key=str)
    idx = [uniq.index(k) for k in keys]
    g = gains0[:, None, :].repeat(1, len(uniq), 1).clone().requires_grad_(True)
    opt = torch.optim.Adam([g], lr=lr)
    best, best_score, delta = g.detach().clone(), math.inf, None
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for it in range(iters):
            with cache(model, sched, count_macs=False) as h, torch.enable_grad():
                for slot, k in zip(h._slots.values(), idx, strict=True):
                    slot.set_plan(slot.plan, g[:, k].float())
                out = rows(final_samples(tr(), ScheduleError, detach=False))
            loss = F._score(out, ref)
            score = float(loss.detach())
            improved = score < best_score
            if improved:
                best_score, best = score, g.detach().clone()
            if it + 1 == iters:
                break
            if improved or delta is None:
                (grad,) = torch.autograd.grad(loss, [g], allow_unused=True)
                g.grad = grad
                opt.step()
                delta = g.detach() - best
            else:
                delta = delta / 2
                with torch.no_grad():
                    g.copy_(best + delta)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return best, idx


def evaluate(
    model: torch.nn.Module,
    ev: Callable[[], torch.Tensor],
    base: torch.Tensor,
    sched: Schedule,
    best: torch.Tensor,
    idx: list[int],
) -> dict[str, float]:
    with torch.no_grad(), cache(model, sched, count_macs=False) as h:
        for slot, k in zip(h._slots.values(), idx, strict=True):
            slot.set_plan(slot.plan, best[:, k].float())
        return summary(per_image_psnr(ev(), base))


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
        mask = taylorseer_mask(n, i, w)
        plain = Schedule(n, {"*": mask})
        sched = plain.with_forecast("bdf2")
        with torch.no_grad():
            ref12 = rows(final_samples(tr(), ScheduleError)).float()
            start = {}
            for name, cand in (("first-order", plain.with_forecast("first-order")), ("bdf2", sched)):
                with cache(model, cand):
                    start[name] = float(F._score(rows(final_samples(tr(), ScheduleError)).float(), ref12))
            with cache(model, plain.with_forecast("taylorseer2")):
                taylorseer = summary(per_image_psnr(ev(), base))
        g0 = F.first_order_gains(sched) if start["first-order"] < start["bdf2"] else None
        if g0 is None:
            g0 = torch.ones(n, 2, dtype=torch.float64)
        row = {"config": spec, "interval": i, "warm_up": w, "start": min(start, key=start.__getitem__),
               "taylorseer2 (TaylorSeer order 2)": taylorseer}  # fmt: skip
        for gname, group in (("per step", lambda sl: 0), ("per type", lambda sl: sl.type), ("per component", lambda sl: sl.name)):  # fmt: skip
            best, idx = fit(model, tr, sched, g0, group)
            row[gname] = evaluate(model, ev, base, sched, best, idx)
            print(spec, gname, row[gname], flush=True)
        results.append(row)
    out = HERE / "results" / "fit-granularity"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    cols = ("taylorseer2 (TaylorSeer order 2)", "per step", "per type", "per component")
    lines = [
        "# Forecast gains per step, per type, per component",
        "",
        "`python benchmarks/fit_granularity.py`: at TaylorSeer's placement (bdf2 forecasts, or first order "
        "where it replays better), 8 fitting calls on 12 tuning images (seed 20000), lr 0.1; mean / p5 dB of 48 "
        "evaluation images (seed 50000) against uncached. Development configurations only.",
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
