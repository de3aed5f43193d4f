"""One prepared GPU check (issue 26): every GPU-only path of stepcache, one command, one summary.

Sections, in the order they run, each with a time budget (seconds) and pass/fail checks:

* ``sync_free`` (30): a cached generation (forecasting plan) under
  ``torch.cuda.set_sync_debug_mode("error")``, its timesteps on the GPU as a diffusers pipeline's are;
  the uncached loop first (the control: the loop itself never syncs), then, when the cached one
  raises, a ``"warn"`` run that lists where each sync happens.
* ``memory`` (30): the allocator's bytes held by the cache after every step, against the plan
  (``stepcache.memory.holdings``) and the peak of ``stepcache.memory.predict_peak``: a uniform plan
  with forecasting, a per-layer staggered plan, and fp8 storage.
* ``offload`` (60): ``offload=True`` on a Wan-shaped video model (the planner's 1.3B 480p preset,
  split guidance, staggered plan, fetches three blocks ahead): step time with / without <= 1.05,
  host copies in pinned memory, no late fetch, outputs bit-identical.
* ``hook_overhead`` (25): all-compute schedule vs uncached at launch-bound (tiny) shapes, <= 1 %.
* ``speed_eager`` (90): speed-up over uncached against the ideal implied by the skipped MACs, at
  compute fractions 0.5 and 0.35: DiT-XL/2 256x256, a FLUX-shaped transformer (bf16, 1024x1024 =
  4,096 image tokens; 8 + 16 of FLUX.1-dev's 19 + 38 blocks) and a Wan2.1-1.3B-shaped one (480p,
  17 frames); >= 0.9 x ideal.
* ``inductor`` (90): regional inductor on DiT-XL/2 (fp32), cached output equal to eager (no further
  from it than the compiler's own difference without a cache), no graph break, no host sync; then
  ``mode="reduce-overhead"``: does it run, equal to eager, how many CUDA graphs inductor skipped.
* ``speed_compiled`` (140): ``speed_eager`` again with every block compiled in place.

Everything runs on random weights built from configs (``stepcache.integrations.models``); nothing is
downloaded. The whole check is sized for one H100 / H200 in <= 8 minutes (``--budget``, 450 s): a
section fits its repeats to its budget; one still running 30 s past 1.5 x its budget, or past the total
budget, is stopped; the sections left once the total budget is spent are reported as skipped. The
summary is rewritten after every section, so a run cut short still leaves what it measured.

``--dry-run`` runs the same code on the CPU at tiny shapes (compiling with ``aot_eager``) in well under
two minutes. What only a GPU can measure is reported as ``skipped: no CUDA``, and a GPU criterion
measured on the CPU (a speed ratio) as ``measured``: neither is ever a pass. A section passes only
when every check it states was measured and passed.

    python benchmarks/gpu_check.py --out gpu-check              # one H100 / H200, <= 8 min
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc      # the same code on the CPU (in the tests)
    python benchmarks/gpu_check.py --only offload --only memory
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import stepcache
from stepcache import Schedule
from stepcache.discovery import discover
from stepcache.memory import holdings, output_bytes, predict_peak, stored_sizes
from stepcache.runtime import cache
from stepcache.runtime.offload import transfer_schedule

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.gpu import (
    SHAPES,
    Loop,
    Section,
    Workload,
    compile_regionally,
    staggered_schedule,
    sync,
    sync_debug,
    time_configs,
    uniform_schedule,
)

FORMAT, FORMAT_VERSION = "stepcache.gpu_check", 1
TOTAL_BUDGET_S = 450.0  # + at most 30 s for a section stopped at the deadline: <= 8 min
FRACTIONS = (0.5, 0.35)
SPEEDUP_VS_IDEAL = 0.9
OFFLOAD_RATIO = 1.05
HOOK_OVERHEAD = 0.01
ALLOCATOR_GRANULE = 512  # the CUDA caching allocator rounds every block up to this many bytes


@dataclass
class Context:
    """What every section shares: the device, the shapes, the models built so far, the clock."""

    dry_run: bool
    device: torch.device
    backend: str
    repeats: int
    deadline: float
    shapes: dict[str, Any]
    models: dict[tuple[str, str, str], torch.nn.Module] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)
    eager_uncached_s: dict[str, float] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def workload(self, role: str) -> Workload:
        """The workload of ``role``, built once; roles of the same config and dtype share the model."""
        if role not in self.workloads:
            shape = self.shapes[role]
            key = (shape.config, json.dumps(shape.overrides, sort_keys=True), shape.dtype)
            w = Workload(shape, self.device, self.models.get(key))
            self.models[key] = w.model
            self.workloads[role] = w
        return self.workloads[role]

    def release(self, *roles: str) -> None:
        for role in roles:
            w = self.workloads.pop(role, None)
            if w is not None:
                self.models = {k: m for k, m in self.models.items() if m is not w.model}
        if self.cuda:
            torch.cuda.empty_cache()

    def share(self, role: str) -> float:
        """The cached components' share of ``role``'s MACs, measured once on the eager model."""
        if role not in self.shares:
            self.shares[role] = self.workload(role).mac_share()
        return self.shares[role]


def r(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


# ---------------------------------------------------------------------------------------- host syncs
def raises_under_sync_error(run: Callable[[], Any]) -> str | None:
    """None when ``run`` makes no host sync, else the error and where it happened."""
    try:
        with sync_debug("error"):
            run()
    except RuntimeError as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "site-packages/torch" not in f.filename]
        where = f" at {_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        return f"{str(e).splitlines()[0]}{where}"
    return None


def sync_sites(run: Callable[[], Any]) -> dict[str, int]:
    """Where ``run`` syncs with the host (``"warn"`` mode): file:line of the Python caller -> count."""
    with warnings.catch_warnings(record=True) as seen, sync_debug("warn"):
        warnings.simplefilter("always")
        run()
    sites = collections.Counter(
        f"{_short(w.filename)}:{w.lineno}" for w in seen if "synchroniz" in str(w.message).lower()
    )
    return dict(sites.most_common())


def _short(path: str) -> str:
    for marker in ("/stepcache/", "/benchmarks/", "/diffusers/", "/torch/"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return os.path.basename(path)


# ---------------------------------------------------------------------------------------- sections
def sync_free(ctx: Context, sec: Section) -> None:
    w = ctx.workload("dit")
    schedule = uniform_schedule(w, 0.35).with_forecast()

    def cached() -> None:
        with cache(w.loop, schedule):
            w.loop()

    w.loop()  # warm-up: first calls set up cuBLAS and the allocator, which may sync
    cached()
    sec.numbers["model"] = {"shape": w.shape.name, **w.shape.describe()}
    if not sec.needs_cuda("the uncached loop makes no host sync (control)", "no error in 'error' mode"):
        sec.needs_cuda("a cached generation makes no host sync", "no error in 'error' mode")
        return
    control = raises_under_sync_error(w.loop)
    sec.judge(
        "the uncached loop makes no host sync (control)",
        control or "none",
        control is None,
        "no error in 'error' mode",
    )
    error = raises_under_sync_error(cached)
    sec.judge(
        "a cached generation makes no host sync", error or "none", error is None, "no error in 'error' mode"
    )
    if error is not None or control is not None:
        sec.numbers["syncs_uncached"] = sync_sites(w.loop)
        sec.numbers["syncs_cached"] = sync_sites(cached)
        sec.notes.append(
            "syncs_*: where each host sync happened ('warn' mode), file:line -> count per generation"
        )


def memory(ctx: Context, sec: Section) -> None:
    w = ctx.workload("dit-fp32")
    sizes = output_bytes(w.model, w.call_once)
    comps = [c for c in discover(w.model) if c.name in sizes]
    cases = [
        ("uniform 0.35, forecasting", uniform_schedule(w, 0.35).with_forecast(), None),
        ("staggered per layer, every 3 steps", staggered_schedule(w, 3), None),
        ("uniform 0.35, fp8 storage", uniform_schedule(w, 0.35), "fp8"),
    ]

    def allocated_per_step(run: Callable[..., Any]) -> list[int]:
        out: list[int] = []
        run(on_step=lambda i: out.append(torch.cuda.memory_allocated(ctx.device)))
        return out

    base = None
    if ctx.cuda:
        w.loop()  # warm-up
        base = allocated_per_step(w.loop)
    sec.numbers["model"] = {"shape": w.shape.name, **w.shape.describe()}
    for label, schedule, storage in cases:
        stored = sizes if storage is None else stored_sizes(sizes, w.dtype, storage)
        peak = predict_peak(schedule, sizes, components=comps, storage_dtype=storage, compute_dtype=w.dtype)
        plans = schedule.resolve(comps)
        held = [holdings(plans[c.name]) for c in comps]
        outputs = [sum(h[s] for h in held) for s in range(schedule.num_steps)]
        expected = [
            sum(h[s] * stored[c.name] for h, c in zip(held, comps, strict=True))
            for s in range(schedule.num_steps)
        ]
        options = {} if storage is None else {"storage_dtype": storage}
        with cache(w.loop, schedule, **options) as handle:
            got = allocated_per_step(w.loop) if base is not None else (w.loop(), [])[1]
            runtime = handle.stats.peak_stored_bytes
        row: dict[str, Any] = {
            "predicted_peak_bytes": peak.peak_bytes,
            "runtime_peak_bytes": runtime,
            "predicted_end_of_step_peak_bytes": max(expected),
        }
        sec.judge(f"{label}: the runtime's peak = predict_peak", runtime, runtime == peak.peak_bytes, "equal")
        limit = "allocator's bytes held by the cache after every step = the plan's, within the allocator's rounding"
        if base is not None:
            delta = [g - b for g, b in zip(got, base, strict=True)]
            tensors = 2 if storage == "fp8" else 1  # fp8: data and scale, each its own block
            allowance = [ALLOCATOR_GRANULE * tensors * n for n in outputs]
            worst = max(abs(d - e) - a for d, e, a in zip(delta, expected, allowance, strict=True))
            row.update({"allocator_peak_bytes": max(delta), "allocator_minus_plan_worst_step_bytes": worst})
            sec.judge(f"{label}: allocator = plan after every step", worst, worst <= 0, limit)
            if max(expected) == peak.peak_bytes:  # the peak falls between steps, where it is sampled
                err = abs(max(delta) - peak.peak_bytes) - max(allowance)
                sec.judge(
                    f"{label}: allocator's peak = predict_peak",
                    max(delta),
                    err <= 0,
                    "equal, within rounding",
                )
        else:
            sec.needs_cuda(f"{label}: allocator = plan after every step", limit)
        sec.numbers[label] = row
    ctx.release("dit-fp32")


def host_copies(handle: Any) -> list[torch.Tensor]:
    """The host tensors of every offloaded output the cache holds now (reads the runtime's slots)."""
    from stepcache.runtime.offload import _Host

    out: list[torch.Tensor] = []
    for slot in handle._slots.values():  # internal: no public view of where outputs live
        for branch in range(len(slot.store)):
            entry = slot.kept(branch)
            for part in entry[1:] if entry else ():
                if isinstance(part, _Host) and isinstance(part.host, torch.Tensor):
                    out.append(part.host)
    return out


def offload(ctx: Context, sec: Section) -> None:
    w = ctx.workload("wan-offload")
    schedule = staggered_schedule(w, 3)
    comps = discover(w.model)
    blocks = len({c.block for c in comps})
    lead = min(3, blocks - 1) * max(1, round(len(comps) / blocks))  # the planner's: three blocks ahead
    options = {"offload": True, "offload_lead": lead}
    sec.numbers["model"] = {"shape": w.shape.name, **w.shape.describe()}
    sec.numbers["schedule"] = {"compute_fraction": r(schedule.compute_fraction), "lead_calls": lead}

    pinned: list[bool] = []

    def inspect(handle: Any, step: int) -> None:
        if step == w.shape.steps // 2:
            pinned.extend(t.is_pinned() for t in host_copies(handle))

    peaks = {}
    for name, opts in (("cached", {}), ("cached + offload", options)):  # warm-ups, with memory peaks
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        with cache(w.loop, schedule, **opts) as handle:
            w.loop(on_step=(lambda i, h=handle: inspect(h, i)) if opts else None)
            stats = handle.offload_stats
        if ctx.cuda:
            peaks[name] = torch.cuda.max_memory_allocated(ctx.device)
    assert stats is not None
    plans = schedule.resolve(comps)
    planned = transfer_schedule([plans[c.name] for c in comps], lead, branches=w.shape.branches)
    steps = w.shape.steps
    sec.numbers["transfers"] = {
        "fetched_bytes_per_step": stats.fetched_bytes // steps,
        "evicted_bytes_per_step": stats.evicted_bytes // steps,
        "most_outputs_on_device": max(stats.resident),
        "planned_most_outputs_on_device": max(planned.resident),
        "outputs_kept_without_offload": max(planned.kept),
    }
    sec.judge(
        "no late fetch (every read found its output fetched)",
        stats.late_fetches,
        stats.late_fetches == 0,
        "0",
    )
    sec.judge(
        "outputs on the device = the transfer schedule's",
        list(stats.resident),
        tuple(stats.resident) == tuple(planned.resident),
        "equal at every step",
    )
    if sec.needs_cuda("host copies are in pinned memory", "all pinned"):
        sec.judge(
            "host copies are in pinned memory",
            f"{sum(pinned)} of {len(pinned)}",
            bool(pinned) and all(pinned),
            "all pinned",
        )
        sec.numbers["peak_memory_bytes"] = peaks
    budget = max(1.0, sec.time_left() - 5)
    times = time_configs(
        w,
        [("cached", schedule, {}), ("cached + offload", schedule, options)],
        ctx.repeats,
        budget_s=budget,
        warmup=False,
    )
    same = torch.equal(times["cached"]["output"], times["cached + offload"]["output"])
    sec.judge("outputs bit-identical with and without offload", same, same, "bit-identical")
    ratio = times["cached + offload"]["median_s"] / times["cached"]["median_s"]
    sec.judge(
        "time with offload / without", r(ratio), ratio <= OFFLOAD_RATIO, f"<= {OFFLOAD_RATIO}", gpu_claim=True
    )
    sec.numbers["times_s"] = {k: [r(t, 3) for t in v["times_s"]] for k, v in times.items()}


def hook_overhead(ctx: Context, sec: Section) -> None:
    rounds = 3 if ctx.dry_run else 30
    for role in ("tiny-dit", "tiny-flux"):
        w = ctx.workload(role)
        n = w.shape.steps
        schedule = Schedule(n, dict.fromkeys(w.types, (1,) * n))
        # Steady state, as users run it: each configuration its own copy, the cache enabled once;
        # a second uncached copy is the control (the noise floor of the comparison).
        loops = {
            "uncached": w.loop,
            "uncached (control copy)": Loop(w, copy.deepcopy(w.model)),
            "all-compute": Loop(w, copy.deepcopy(w.model)),
        }
        times: dict[str, list[float]] = {k: [] for k in loops}
        with cache(loops["all-compute"], schedule):
            order = list(loops)
            for k in order:  # warm-up
                loops[k]()
            for i in range(rounds):
                for k in order[i % 3 :] + order[: i % 3]:
                    sync(ctx.device)
                    start = time.perf_counter()
                    loops[k]()
                    sync(ctx.device)
                    times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        overhead = med["all-compute"] / med["uncached"] - 1
        sec.numbers[w.shape.name] = {
            "ms_per_step": {k: r(1e3 * v / n, 4) for k, v in med.items()},
            "us_per_step": r(1e6 * (med["all-compute"] - med["uncached"]) / n, 1),
            "control": r(med["uncached (control copy)"] / med["uncached"] - 1),
            "rounds": rounds,
        }
        sec.judge(
            f"{w.shape.name}: all-compute / uncached - 1",
            r(overhead),
            overhead <= HOOK_OVERHEAD,
            f"<= {HOOK_OVERHEAD:.0%}",
            gpu_claim=True,
        )
        ctx.release(role)


def _speed(ctx: Context, sec: Section, compiled: bool) -> None:
    roles = ("dit", "flux", "wan")
    how = "compiled" if compiled else "eager"
    for i, role in enumerate(roles):
        shape = ctx.shapes[role]
        left = sec.time_left()
        if left < (30 if compiled else 10):  # a compile needs more than a run
            for f in FRACTIONS:
                sec.skip(
                    f"{shape.name}, f={f}, {how}: speed-up / ideal",
                    f">= {SPEEDUP_VS_IDEAL}",
                    "section time budget spent",
                )
            continue
        w = ctx.workload(role)
        share = ctx.share(role)
        blocks = compile_regionally(w.model, ctx.backend) if compiled else 0
        configs: list[tuple[str, Schedule | None, dict[str, Any]]] = [("uncached", None, {})]
        configs += [(f"f={f}", uniform_schedule(w, f), {}) for f in FRACTIONS]
        times = time_configs(w, configs, ctx.repeats, budget_s=left / (len(roles) - i) - 2)
        base = times["uncached"]["median_s"]
        rows = {}
        for name, row in times.items():
            frac = row["compute_fraction"]
            ideal = 1 / (1 - (1 - frac) * share)
            rows[name] = {
                "compute_fraction": r(frac),
                "median_s": r(row["median_s"], 3),
                "times_s": [r(t, 3) for t in row["times_s"]],
                "speedup": r(base / row["median_s"]),
                "ideal_speedup": r(ideal),
                "speedup_vs_ideal": r(base / row["median_s"] / ideal),
            }
        for f in FRACTIONS:
            ratio = rows[f"f={f}"]["speedup_vs_ideal"]
            sec.judge(
                f"{shape.name}, f={f}, {how}: speed-up / ideal",
                ratio,
                ratio >= SPEEDUP_VS_IDEAL,
                f">= {SPEEDUP_VS_IDEAL}",
                gpu_claim=True,
            )
        entry: dict[str, Any] = {
            **shape.describe(),
            "component_share_of_macs": r(share),
            "rows": rows,
        }
        if compiled:
            entry["compiled_blocks"] = blocks
            entry["backend"] = ctx.backend
            if role in ctx.eager_uncached_s:
                entry["compiled_vs_eager_uncached_speedup"] = r(ctx.eager_uncached_s[role] / base)
        else:
            ctx.eager_uncached_s[role] = base
        sec.numbers[shape.name] = entry
        if compiled:
            ctx.release(role)  # its blocks stay compiled: nothing later may use it eagerly


def speed_eager(ctx: Context, sec: Section) -> None:
    _speed(ctx, sec, compiled=False)


def speed_compiled(ctx: Context, sec: Section) -> None:
    sec.numbers["backend"] = ctx.backend
    _speed(ctx, sec, compiled=True)


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def inductor(ctx: Context, sec: Section) -> None:
    shape = dataclasses.replace(ctx.shapes["dit-fp32"], steps=10)
    w = Workload(shape, ctx.device)  # its own model: its blocks get compiled
    schedule = uniform_schedule(w, 0.35).with_forecast()

    def cached() -> torch.Tensor:
        with cache(w.loop, schedule):
            return w.loop()

    eager = {"uncached": w.loop(), "cached": cached()}
    torch._dynamo.reset()
    before = _dynamo_counts()
    compile_regionally(w.model, ctx.backend)
    got = {"uncached": w.loop(), "cached": cached()}
    cached()  # a second generation: the steady state (graphs already made)
    counts = {k: v - before[k] for k, v in _dynamo_counts().items()}
    d_plain, d_cached = _diff(got["uncached"], eager["uncached"]), _diff(got["cached"], eager["cached"])
    scale = float(eager["cached"].abs().max())
    tolerance = 2 * d_plain + 1e-5 * scale
    sec.numbers["model"] = {"shape": shape.name, **shape.describe(), "backend": ctx.backend}
    sec.numbers["default"] = {
        "max_abs_diff_uncached": d_plain,
        "max_abs_diff_cached": d_cached,
        "output_scale": scale,
        **counts,
    }
    device = "CUDA" if ctx.cuda else ctx.device.type.upper()
    sec.judge(
        f"compiled ({ctx.backend}, {device}) cached = eager cached",
        d_cached,
        d_cached <= tolerance,
        "max abs diff <= 2 x the uncached model's compiled-vs-eager diff + 1e-5 x scale",
    )
    sec.judge("no graph break", counts["graph_breaks"], counts["graph_breaks"] == 0, "0")
    if sec.needs_cuda("compiled cached generation makes no host sync", "no error in 'error' mode"):
        error = raises_under_sync_error(cached)
        sec.judge(
            "compiled cached generation makes no host sync",
            error or "none",
            error is None,
            "no error in 'error' mode",
        )
        if error is not None:
            sec.numbers["syncs_compiled_cached"] = sync_sites(cached)
    if not sec.needs_cuda("reduce-overhead: runs, cached = eager cached", "max abs diff as above"):
        sec.needs_cuda("reduce-overhead: CUDA graphs inductor skipped", "reported, no criterion")
        return
    if ctx.backend != "inductor":
        sec.skip("reduce-overhead: runs, cached = eager cached", "max abs diff as above", "an inductor mode")
        return
    torch._dynamo.reset()
    before = _dynamo_counts()
    compile_regionally(w.model, ctx.backend, mode="reduce-overhead")
    row: dict[str, Any] = {}
    sec.numbers["reduce-overhead"] = row
    try:
        for _ in range(3):  # cudagraph trees record on the first runs, replay afterwards
            out = cached()
        sync(ctx.device)
        start = time.perf_counter()
        out = cached()
        sync(ctx.device)
        row["cached_generation_s"] = r(time.perf_counter() - start, 4)
        d = _diff(out, eager["cached"])
        row["max_abs_diff_cached"] = d
        sec.judge("reduce-overhead: runs, cached = eager cached", d, d <= tolerance, "max abs diff as above")
    except Exception as e:  # what it does is the finding
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        sec.judge(
            "reduce-overhead: runs, cached = eager cached", row["error"], False, "max abs diff as above"
        )
    finally:
        counts = {k: v - before[k] for k, v in _dynamo_counts().items()}
        torch._dynamo.reset()  # drops the CUDA graph trees too: later sections compile afresh
    row.update(counts)
    sec.measure(
        "reduce-overhead: CUDA graphs inductor skipped",
        counts["cudagraph_skips"],
        "read from torch's source, expected > 0: torch.cond's predicate is a CPU tensor (README, torch.compile)",
    )


SECTIONS: tuple[tuple[str, str, float, Callable[[Context, Section], None]], ...] = (
    ("sync_free", "Sync-free cached generation (CUDA timesteps)", 30, sync_free),
    ("memory", "GPU memory of stored outputs = predict_peak", 30, memory),
    ("offload", "Offload: transfers hidden, pinned, bit-identical", 60, offload),
    ("hook_overhead", "Hook overhead at launch-bound shapes", 25, hook_overhead),
    ("speed_eager", "Speed-up vs ideal, eager", 90, speed_eager),
    ("inductor", "Inductor equal to eager; reduce-overhead", 90, inductor),
    ("speed_compiled", "Speed-up vs ideal, compiled regionally", 140, speed_compiled),
)


# ---------------------------------------------------------------------------------------- running
class SectionTimeout(BaseException):  # BaseException: library code must not swallow it
    """Raised in the main thread when a section runs past its hard limit."""


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    if not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SectionTimeout

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(
    ctx: Context, name: str, title: str, budget: float, fn: Callable[[Context, Section], None]
) -> Section:
    sec = Section(name, title, budget, ctx.cuda)
    left = ctx.deadline - time.perf_counter()
    if left < min(budget, 20):
        sec.reason = "the check's total time budget is spent"
        return sec
    sec.budget_s = min(budget, left)
    try:
        with hard_limit(min(1.5 * sec.budget_s, ctx.deadline - time.perf_counter()) + 30):
            fn(ctx, sec)
    except SectionTimeout:
        sec.error = f"stopped after {time.perf_counter() - sec.started:.0f} s: over its hard limit"
    except Exception as e:
        sec.error = f"{type(e).__name__}: {e}"
        sec.notes.append(traceback.format_exc()[-3000:])
    finally:
        sec.elapsed_s = time.perf_counter() - sec.started
        if ctx.cuda:
            torch.cuda.empty_cache()
    return sec


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {
        "device": str(device),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {
            "stepcache": stepcache.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            {
                "gpu": p.name,
                "gpu_memory_gib": r(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "cuda": torch.version.cuda,
            }
        )
    return env


def summary(
    ctx: Context, sections: list[Section], env: dict[str, Any], started: float, budget: float
) -> dict[str, Any]:
    statuses = {s.status for s in sections}
    overall = "fail" if statuses & {"fail", "error"} else "pass" if statuses == {"pass"} else "incomplete"
    elapsed = time.perf_counter() - started
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": ctx.dry_run,
        "status": overall,
        "budget_s": budget,
        "elapsed_s": round(elapsed, 1),
        "within_budget": elapsed <= budget,
        "environment": env,
        "backend": ctx.backend,
        "sections": [s.as_dict() for s in sections],
    }


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    where = env.get("gpu", env["device"])
    lines = [
        f"# GPU check on {where}: {report['status']}"
        + (" (dry run on the CPU, tiny shapes)" if report["dry_run"] else ""),
        "",
        f"{report['created']}; stepcache {env['versions']['stepcache']}, torch {env['versions']['torch']}, "
        f"diffusers {env['versions']['diffusers']}"
        + (f", CUDA {env['cuda']}" if "cuda" in env else "")
        + f"; compile backend {report['backend']}; {report['elapsed_s']} s of a {report['budget_s']:g} s budget.",
        "",
        "| section | status | time / budget (s) |",
        "|---|---|---|",
    ]
    for s in report["sections"]:
        lines.append(f"| {s['title']} | {s['status']} | {s['elapsed_s']} / {s['budget_s']:g} |")
    for s in report["sections"]:
        lines += ["", f"## {s['title']}: {s['status']}", ""]
        for key in ("reason", "error"):
            if key in s:
                lines += [f"{key.capitalize()}: {s[key]}", ""]
        if s["checks"]:
            lines += ["| check | status | value | criterion | note |", "|---|---|---|---|---|"]
            for c in s["checks"]:
                value = json.dumps(c.get("value")) if "value" in c else ""
                cells = (c["name"], c["status"], value, c.get("limit", ""), c.get("note", ""))
                lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
        rest = {k: v for k, v in s["numbers"].items() if not (isinstance(v, dict) and "rows" in v)}
        tables = {k: v for k, v in s["numbers"].items() if k not in rest}
        if tables:
            lines += [
                "",
                "| model | schedule | compute fraction | median s | speed-up | ideal | speed-up / ideal |",
                "|---|---|---|---|---|---|---|",
            ]
            for model, entry in tables.items():
                for name, row in entry["rows"].items():
                    lines.append(
                        f"| {model} | {name} | {row['compute_fraction']} | {row['median_s']} | {row['speedup']} "
                        f"| {row['ideal_speedup']} | {row['speedup_vs_ideal']} |"
                    )
            rest.update({k: {f: x for f, x in v.items() if f != "rows"} for k, v in tables.items()})
        if rest:
            lines += ["", "```json", compact_json(rest), "```"]
    return "\n".join(lines) + "\n"


def compact_json(value: Any) -> str:
    """Indented JSON with every list of plain values on one line."""
    text = json.dumps(value, indent=1, default=str)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes")
    ap.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.{json,md}")
    names = [s[0] for s in SECTIONS]
    ap.add_argument("--only", action="append", choices=names, help="run only these sections (repeatable)")
    ap.add_argument("--skip", action="append", choices=names, default=[], help="leave these out (repeatable)")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole check")
    ap.add_argument("--repeats", type=int, help="timed repeats per configuration (default 3, dry run 1)")
    ap.add_argument("--backend", help="torch.compile backend (default inductor; aot_eager in a dry run)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the code on the CPU")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    if args.dry_run:
        torch.set_num_threads(1)  # tiny models: one thread is fastest, and kind to other work
    ctx = Context(
        dry_run=args.dry_run,
        device=device,
        backend=args.backend or ("aot_eager" if args.dry_run else "inductor"),
        repeats=args.repeats or (1 if args.dry_run else 3),
        deadline=started + args.budget,
        shapes=SHAPES["dry-run" if args.dry_run else "gpu"],
    )
    env = environment(device)
    sections: list[Section] = []
    for name, title, budget, fn in SECTIONS:
        if (args.only and name not in args.only) or name in args.skip:
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        sec = run_section(ctx, name, title, budget, fn)
        sections.append(sec)
        print(
            f"[gpu_check] {name}: {sec.status} in {sec.elapsed_s:.1f} s"
            + (f" ({sec.error})" if sec.error else ""),
            flush=True,
        )
        write(summary(ctx, sections, env, started, args.budget), args.out)
    report = summary(ctx, sections, env, started, args.budget)
    write(report, args.out)
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["status"] != "fail" else 1)
