"""Per-step overhead of the cache's hooks at tiny shapes, where Python cost is most visible.

A GPU run of a small transformer is launch-bound: what the hooks cost in Python per call adds
directly to each step. On these tiny CPU models (DiT, PixArt and Flux transformers of 2-4 blocks)
one denoiser call takes about a millisecond, so the same cost shows here. For each model this
runs a 20-step denoising loop uncached and with an all-compute schedule (every component runs:
only the hooks differ), alternating the configurations ``--repeats`` times, and measures the *thread CPU time*
of each run (less sensitive to other processes than wall time). Reported: medians and the ratio
all-compute / uncached - 1, per model, plus the same with MAC counting on (``count_macs=True``).
Each configuration runs on its own copy of the model with its cache enabled once, as in use.

    python benchmarks/hook_overhead.py            # ~2 min on 2 CPU cores; run it alone
    python benchmarks/hook_overhead.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import stepcache
from stepcache import Schedule
from stepcache.integrations.models import transformer

RESULTS = Path(__file__).parent / "results"


def tiny_models() -> dict[str, tuple[torch.nn.Module, Callable[[torch.nn.Module, torch.Tensor], Any]]]:
    """name -> (model, one denoiser call at timestep t), random weights (speed does not depend on them)."""
    torch.manual_seed(0)  # the models and inputs below draw from one stream, in this order
    dit = transformer("dit")
    x_dit, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    pixart = transformer(
        "pixart", attention_head_dim=16, num_layers=4, cross_attention_dim=32, caption_channels=16
    )
    text = torch.randn(2, 6, 16)
    flux = transformer("flux")
    x_flux, txt = torch.randn(1, 16, 16), torch.randn(1, 6, 16)
    img_ids, txt_ids = torch.zeros(16, 3), torch.zeros(6, 3)
    pooled = torch.randn(1, 16)
    return {
        "dit": (dit, lambda m, t: m(x_dit, timestep=t.expand(2), class_labels=y).sample),
        "pixart": (
            pixart,
            lambda m, t: (
                m(
                    x_dit,
                    encoder_hidden_states=text,
                    timestep=t.expand(2),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                ).sample
            ),
        ),
        "flux": (
            flux,
            lambda m, t: (
                m(
                    x_flux,
                    encoder_hidden_states=txt,
                    pooled_projections=pooled,
                    timestep=(t / 1000).expand(1),
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                ).sample
            ),
        ),
    }


def loop(model: torch.nn.Module, call: Callable[..., Any], steps: int) -> float:
    """Thread CPU seconds of one denoising loop."""
    ts = torch.linspace(999, 1, steps)
    start = time.thread_time()
    with torch.no_grad():
        for t in ts:
            call(model, t)
    return time.thread_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS / "hook_overhead.json")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps = 4, 5
    torch.set_num_threads(1)
    rows = {}
    for name, (model, call) in tiny_models().items():
        comps = stepcache.discover(model)
        schedule = Schedule(args.steps, dict.fromkeys({c.type for c in comps}, (1,) * args.steps))
        # Steady state, as users run it: each configuration on its own copy of the model, its cache
        # enabled once for all repeats (toggling hooks between runs measures Python re-warming its
        # attribute caches, not the hooks); runs alternate between the copies.
        # A second uncached copy is the control: two identical models on different allocations
        # differ by this much (the noise floor of the comparison).
        plain, control = model, copy.deepcopy(model)
        cached, counted = copy.deepcopy(model), copy.deepcopy(model)
        handles = [stepcache.cache(cached, schedule), stepcache.cache(counted, schedule, count_macs=True)]
        configs = {
            "uncached": plain,
            "uncached (control copy)": control,
            "all-compute": cached,
            "all-compute, count_macs": counted,
        }
        times: dict[str, list[float]] = {k: [] for k in configs}
        for m in configs.values():  # warm-up
            for _ in range(3):
                loop(m, call, args.steps)
        order = list(configs)
        for r in range(args.repeats):  # alternating, and rotating who goes first, so drift and
            for k in order[r % len(order) :] + order[: r % len(order)]:  # position hit all alike
                times[k].append(loop(configs[k], call, args.steps))
        for h in handles:
            h.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[name] = {
            "components": len(comps),
            "ms_per_step": {k: round(1e3 * v / args.steps, 4) for k, v in med.items()},
            "overhead": round(med["all-compute"] / med["uncached"] - 1, 4),
            "overhead_count_macs": round(med["all-compute, count_macs"] / med["uncached"] - 1, 4),
            "control": round(med["uncached (control copy)"] / med["uncached"] - 1, 4),
            "us_per_step": round(1e6 * (med["all-compute"] - med["uncached"]) / args.steps, 1),
        }
        print(name, rows[name], flush=True)
    report = {
        "what": "per-step thread CPU time, 20-step loop, median of alternating repeats, 1 thread",
        "repeats": args.repeats,
        "steps": args.steps,
        "results": rows,
        "versions": {
            "stepcache": stepcache.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        lines = [
            "| model | components | uncached ms/step | all-compute ms/step | overhead | µs/step "
            "| with count_macs | control (uncached copy) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            ms = r["ms_per_step"]
            lines.append(
                f"| {name} | {r['components']} | {ms['uncached']:.3f} | {ms['all-compute']:.3f} | "
                f"{100 * r['overhead']:+.2f} % | {r['us_per_step']:+.1f} | {100 * r['overhead_count_macs']:+.2f} % | "
                f"{100 * r['control']:+.2f} % |"
            )
        args.out.with_suffix(".md").write_text(
            "# Hook overhead at tiny shapes\n\n"
            + report["what"]
            + f", {args.repeats} repeats.\n\n"
            + "\n".join(lines)
            + "\n"
        )


if __name__ == "__main__":
    main()
