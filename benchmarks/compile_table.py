"""torch.compile with the cache active: graph breaks, unique graphs and recompiles.

The table of issue 11, re-measured for stepcache: tiny DiT, PixArt and Flux transformers (random
weights), a 20-step loop, ``backend="aot_eager"`` (dynamo's tracing without inductor's C++ build;
graph breaks and graph counts are decided by dynamo, the same for inductor), for

* uncached;
* stepcache with a per-type schedule at compute fraction 0.5 (evenly spaced);
* stepcache with a per-layer schedule at 0.35 (a different plan per component, what the optimal
  policy at granularity="layer" produces and what multiplied graphs before);

compiled as a whole (``torch.compile(model)``, the cache enabled on the compiled model) or
regionally (every transformer block compiled, as diffusers' ``compile_repeated_blocks`` does).
Counts are over one 20-step generation after compilation started, from dynamo's counters and its
"Recompiling" log records. Every cached compiled output is checked equal to the eager cached one.

    python benchmarks/compile_table.py        # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import json
import logging
import platform
import random
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import stepcache
from stepcache import Schedule
from stepcache.policies import uniform_plan

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hook_overhead import loop, tiny_models

RESULTS = Path(__file__).parent / "results"
STEPS = 20

# Measured in issue 11 (torch 2.13, diffusers 0.42.1, same shapes and counts); not re-measured here.
PEERS_AS_REPORTED = {
    "diffusers FirstBlockCache": {"Flux, whole model": "3/12/7", "Flux, regional": "3/8/6"},
    "diffusers TaylorSeer": {"Flux, whole model": "7/14/8", "Flux, regional": "7/11/8"},
    "cache-dit DBCache": {"Flux, whole model": "6/8/2", "Flux, regional": "0/3/1"},
}


class _Recompiles(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Recompiling function" in record.getMessage():
            self.count += 1


def schedules(model: torch.nn.Module) -> dict[str, Schedule]:
    comps = stepcache.discover(model)
    rng = random.Random(0)
    per_layer = {}
    for c in comps:  # 0.35 of the steps, placed differently for each component
        picks = {0, STEPS - 1, *rng.sample(range(1, STEPS - 1), round(0.35 * STEPS) - 2)}
        per_layer[c.name] = tuple(int(s in picks) for s in range(STEPS))
    return {
        "per-type 0.5": Schedule(STEPS, dict.fromkeys({c.type for c in comps}, uniform_plan(STEPS, 0.5))),
        "per-layer 0.35": Schedule(STEPS, per_layer),
    }


def measure(name: str, pattern: str, schedule: Schedule | None) -> dict:
    model, call = tiny_models()[name]
    eager = None
    if schedule is not None:
        with stepcache.cache(model, schedule):
            eager = _run(model, call)
    torch._dynamo.reset()
    counters.clear()
    if pattern == "regional":
        for block in {c.block for c in stepcache.discover(model)}:
            model.get_submodule(block).compile(backend="aot_eager")
        called = model
    else:
        called = torch.compile(model, backend="aot_eager")
    handler = _Recompiles()
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(handler)
    torch._logging.set_logs(recompiles=True)
    try:
        if schedule is None:
            _run(called, call)
        else:
            with stepcache.cache(called, schedule):
                out = _run(called, call)
            assert torch.equal(out, eager), f"{name} {pattern}: compiled cached output differs from eager"
    finally:
        torch._logging.set_logs()
        dynamo_log.removeHandler(handler)
    row = {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": handler.count,
    }
    torch._dynamo.reset()
    return row


def _run(model: torch.nn.Module, call) -> torch.Tensor:
    out = {}

    def keep(m, t):
        out["last"] = call(m, t)
        return out["last"]

    loop(model, keep, STEPS)
    return out["last"]


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for name, pattern in [
        ("flux", "whole"),
        ("flux", "regional"),
        ("dit", "regional"),
        ("pixart", "regional"),
        ("dit", "whole"),
        ("pixart", "whole"),
    ]:
        model, _ = tiny_models()[name]
        for label, sched in [("uncached", None), *schedules(model).items()]:
            r = measure(name, pattern, sched)
            rows.append({"model": name, "compile": pattern, "config": label, **r})
            print(rows[-1], flush=True)
    report = {
        "what": "graph breaks / unique graphs / recompiles over a 20-step generation, aot_eager",
        "rows": rows,
        "peers_as_reported_in_issue_11": PEERS_AS_REPORTED,
        "versions": {
            "stepcache": stepcache.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compile.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# torch.compile with the cache: graph breaks / unique graphs / recompiles",
        "",
        "20-step generation, tiny random-weight transformers, `aot_eager`; every compiled cached output",
        "equals the eager cached output. `python benchmarks/compile_table.py`.",
        "",
        "| model | compile | uncached | stepcache per-type 0.5 | stepcache per-layer 0.35 |",
        "|---|---|---|---|---|",
    ]
    for name, pattern in dict.fromkeys((r["model"], r["compile"]) for r in rows):
        cells = {
            r["config"]: f"{r['graph_breaks']}/{r['unique_graphs']}/{r['recompiles']}"
            for r in rows
            if (r["model"], r["compile"]) == (name, pattern)
        }
        lines.append(
            f"| {name} | {pattern} | {cells['uncached']} | {cells['per-type 0.5']} | {cells['per-layer 0.35']} |"
        )
    lines += [
        "",
        "Peers on Flux, as reported in issue 11 (not re-measured here):",
        "",
        "| peer | whole model | regional |",
        "|---|---|---|",
    ]
    for peer, cells in PEERS_AS_REPORTED.items():
        lines.append(f"| {peer} | {cells['Flux, whole model']} | {cells['Flux, regional']} |")
    (RESULTS / "compile.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
