"""Hook overhead and speed-up vs ideal at a realistic shape (core issue's performance target).

A DiT-B/2-sized ``DiTTransformer2DModel`` (12 layers, hidden 768, 256 tokens, random weights: speed
does not depend on the weights), 50-step DDIM, batched classifier-free guidance (batch 1 -> 2 by
default). Configurations run interleaved, ``--repeats`` times each; we report medians and ratios
taken within one run:

* overhead = time(all-compute schedule) / time(uncached) - 1 (target <= 2 %);
* speed-up at compute fraction f = time(uncached) / time(cached), against the ideal
  1 / (1 - skipped MACs / total MACs) from ``stepcache.runtime.mac_shares`` (target >= 0.9 x ideal).

    python benchmarks/overhead.py                # ~10 min on 2 CPU cores
    python benchmarks/overhead.py --quick        # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import stepcache
from stepcache import Schedule
from stepcache.integrations.models import transformer
from stepcache.policies import uniform_plan
from stepcache.runtime import mac_shares

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.speed import generate

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1, help="samples per generation (x2 with guidance)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        config = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8)
        args.steps, args.repeats = 10, 2
    else:  # DiT-B/2 at 256x256: latent 32x32, patch 2 -> 256 tokens
        config = dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, sample_size=32)
    torch.manual_seed(0)
    model = transformer("dit", **config)
    n = args.steps

    # Total MACs of one denoiser call, and of one call of each cached component.
    x = torch.randn(2 * args.batch, 4, config["sample_size"], config["sample_size"])
    shares = mac_shares(
        model,
        stepcache.discover(model),
        lambda: model(
            x,
            timestep=torch.full((2 * args.batch,), 500),
            class_labels=torch.zeros(2 * args.batch, dtype=torch.long),
        ),
    )
    step_macs, comp_macs = shares.total, sum(shares.by_component.values())

    fractions = [1.0, 0.75, 0.5, 0.35]
    schedules = {f: Schedule(n, dict.fromkeys(("attn", "ff"), uniform_plan(n, f))) for f in fractions}
    configs = ["uncached"] + [f"f={f}" for f in fractions]
    times: dict[str, list[float]] = {c: [] for c in configs}
    measured_fraction = {}
    generate(model, 2, args.batch)  # warm-up
    for r in range(args.repeats):
        for name in configs:  # interleaved, so drift affects every configuration alike
            start = time.perf_counter()
            if name == "uncached":
                generate(model, n, args.batch, seed=r)
            else:
                f = float(name[2:])
                with stepcache.cache(model, schedules[f], count_macs=False) as handle:
                    generate(model, n, args.batch, seed=r)
                measured_fraction[name] = handle.stats.compute_fraction
            times[name].append(time.perf_counter() - start)
            print(f"repeat {r + 1}/{args.repeats} {name:>9}: {times[name][-1]:.2f} s", flush=True)

    base = statistics.median(times["uncached"])
    rows = []
    for name in configs[1:]:
        f = float(name[2:])
        med = statistics.median(times[name])
        frac = measured_fraction[name]
        skipped = (1 - frac) * comp_macs / step_macs
        ideal = 1 / (1 - skipped)
        rows.append(
            {
                "schedule": name,
                "compute_fraction": round(frac, 4),
                "median_s": round(med, 3),
                "speedup": round(base / med, 4),
                "ideal_speedup": round(ideal, 4),
                "speedup_vs_ideal": round(base / med / ideal, 4),
                "overhead": round(med / base - 1, 4) if f == 1.0 else None,
                "times_s": [round(t, 3) for t in times[name]],
            }
        )
    result = {
        "benchmark": "overhead",
        "model": {"class": "DiTTransformer2DModel", **config, "tokens": (config["sample_size"] // 2) ** 2},
        "steps": n,
        "batch": args.batch,
        "guidance": "batched (x2)",
        "repeats": args.repeats,
        "threads": args.threads,
        "uncached_median_s": round(base, 3),
        "uncached_times_s": [round(t, 3) for t in times["uncached"]],
        "component_share_of_macs": round(comp_macs / step_macs, 4),
        "rows": rows,
        "versions": {
            "torch": torch.__version__,
            "stepcache": stepcache.__version__,
            "python": platform.python_version(),
        },
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Overhead and speed-up: {result['model']['num_layers']} layers, {config['num_attention_heads'] * config['attention_head_dim']} hidden, "
        f"{result['model']['tokens']} tokens, {n}-step DDIM, batched CFG (batch {args.batch} -> {2 * args.batch}), "
        f"{args.threads} threads, median of {args.repeats}",
        "",
        f"Uncached: {base:.2f} s. Cached components hold {comp_macs / step_macs:.1%} of the MACs.",
        "",
        "| schedule | compute fraction | median s | speed-up | ideal | speed-up / ideal | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ov = "" if row["overhead"] is None else f"{row['overhead']:+.1%}"
        lines.append(
            f"| {row['schedule']} | {row['compute_fraction']:.3f} | {row['median_s']:.2f} | {row['speedup']:.3f}x | "
            f"{row['ideal_speedup']:.3f}x | {row['speedup_vs_ideal']:.3f} | {ov} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
