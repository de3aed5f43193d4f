"""Memory-planned caching on the shipped reference model: what a memory budget and cheaper storage cost
in quality, whether the predicted peak is the measured one, and what the peers store.

Three parts, all on the reference DiT (DPM-Solver++ 20 steps, its shipped calibration), one batch of
``--samples`` images (all classes), PSNR of each image against the uncached image of the same seed:

1. **Budgets.** For each policy (the SmoothCache rule, optimal, tuned) at compute fractions 0.35 and
   0.5: the schedule fitted to 100 / 50 / 25 / 10 % of its *unplanned* peak (every output kept, fp32),
   with outputs stored in fp32, bf16 or fp8 (and fp16 at 100 %; the budget in bytes stays the same, so cheaper storage
   buys more reuse), and the SmoothCache rule and optimal on a whole-block calibration (one output per
   block instead of attention + feed-forward). Reported: PSNR mean and worst image, the compute
   fraction the fitted schedule reaches, predicted and measured peak bytes.
2. **Offload.** A few schedules with ``offload=True``: outputs bit-identical to no offload, device
   resident outputs measured vs the transfer schedule's prediction.
3. **Peers.** dit-smoothcache's SmoothCacheHelper and diffusers' TaylorSeer on the same run, their
   stored tensors found by walking their objects (see :func:`held_tensors`) after every step.

    python benchmarks/memory.py                   # ~15 min on 2 shared CPU cores
    python benchmarks/memory.py --quick           # 8 samples, no tuned policy
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

import stepcache
from stepcache import Schedule, reference
from stepcache.calibration import calibrate
from stepcache.memory import output_bytes, unplanned_peak
from stepcache.policies import for_compute_fraction, optimal_schedule, tune
from stepcache.policies._budget import calibration_components, fit_memory
from stepcache.runtime.offload import transfer_schedule

RESULTS = Path(__file__).parent / "results"
SCHEDULER, STEPS = "dpm", 20
BUDGETS = (1.0, 0.5, 0.25, 0.1)
STORAGE = ("fp32", "bf16", "fp16", "fp8")


def run(
    model: torch.nn.Module, labels: torch.Tensor, seed: int, callback: Callable[[int], None] | None = None
) -> Any:
    return reference.sample(
        model, labels, scheduler=SCHEDULER, num_inference_steps=STEPS, seed=seed, callback=callback
    )


def psnrs(images: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    per = peak_signal_noise_ratio(images, exact, data_range=2.0, reduction="none", dim=(1, 2, 3))
    return float(per.mean()), float(per.min())


# ---------------------------------------------------------------------------------------- part 1
def budgets(
    model: torch.nn.Module, labels: torch.Tensor, exact: torch.Tensor, args: argparse.Namespace
) -> list[dict]:
    cal = reference.shipped_calibration(SCHEDULER, STEPS)
    assert cal is not None

    def short() -> Any:  # two steps at the evaluation's batch: the sizes of its outputs
        return reference.sample(model, labels, scheduler=SCHEDULER, num_inference_steps=2)

    sizes = {s: output_bytes(model, short, storage_dtype=None if s == "fp32" else s) for s in STORAGE}
    comps = calibration_components(cal, sizes["fp32"])
    pipe = reference.ReferencePipeline(SCHEDULER, 1.0)
    block_cal = calibrate(
        pipe,
        inputs=[{"class_labels": list(range(10)), "seed": 3000 + i} for i in range(2)],
        num_inference_steps=STEPS,
        types=("block",),
        progress=False,
    )
    block_sizes = {
        s: output_bytes(model, short, types=("block",), storage_dtype=None if s == "fp32" else s)
        for s in ("fp32", "fp8")
    }
    tuning_labels = torch.arange(args.tuning_samples) % 10

    def tuning_run() -> torch.Tensor:
        return run(model, tuning_labels, 20_000)

    rows = []

    def measure(
        policy: str, fraction: float, pct: float, storage: str, layout: str, sched: Schedule, unplanned: int
    ) -> None:
        options: dict[str, Any] = {} if storage == "fp32" else {"storage_dtype": storage}
        if layout == "block":
            options["types"] = ("block",)
        start = time.perf_counter()
        with stepcache.cache(model, sched, **options) as handle:
            images = run(model, labels, 0)
        mean, worst = psnrs(images, exact)
        memory = sched.meta.get("memory", {})
        row = {
            "policy": policy,
            "layout": layout,
            "fraction": fraction,
            "budget_pct": pct,
            "budget_bytes": memory.get("budget"),
            "unplanned_bytes": unplanned,
            "storage": storage,
            "psnr": round(mean, 2),
            "psnr_worst": round(worst, 2),
            "compute_fraction": round(handle.stats.compute_fraction, 4),
            "predicted_peak": memory.get("predicted_peak"),
            "measured_peak": handle.stats.peak_stored_bytes,
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    for fraction in (0.35, 0.5):
        bases = {
            "smoothcache": for_compute_fraction(cal, fraction),
            "optimal": optimal_schedule(cal, fraction),
        }
        for policy, base in bases.items():
            unplanned = unplanned_peak(base, sizes["fp32"], components=comps)
            for pct in BUDGETS:
                for storage in STORAGE if pct == 1.0 else ("fp32", "bf16", "fp8"):
                    fitted = fit_memory(base, cal, int(pct * unplanned), sizes[storage])
                    measure(policy, fraction, pct, storage, "attn+ff", fitted, unplanned)
            # Whole blocks: the same budget in bytes, one stored output per block.
            block_base = (
                for_compute_fraction(block_cal, fraction)
                if policy == "smoothcache"
                else optimal_schedule(block_cal, fraction)
            )
            for pct in BUDGETS:
                for storage in ("fp32", "fp8"):
                    fitted = fit_memory(block_base, block_cal, int(pct * unplanned), block_sizes[storage])
                    measure(policy, fraction, pct, storage, "block", fitted, unplanned)
        if args.tuned:
            free = tune(model, tuning_run, fraction, calibration=cal, progress=False, refine=0)
            unplanned = unplanned_peak(free, sizes["fp32"], components=comps)
            for pct in (1.0, 0.25):
                for storage in ("fp32", "fp8"):
                    if pct == 1.0 and storage == "fp32":
                        sched = fit_memory(free, cal, unplanned, sizes["fp32"])
                    else:
                        sched = tune(
                            model,
                            tuning_run,
                            fraction,
                            calibration=cal,
                            progress=False,
                            memory_budget=int(pct * unplanned),
                            sizes=sizes[storage],
                            refine=0,
                        )
                    measure("tuned", fraction, pct, storage, "attn+ff", sched, unplanned)
    return rows


# ---------------------------------------------------------------------------------------- part 2
def offload(model: torch.nn.Module, labels: torch.Tensor) -> list[dict]:
    cal = reference.shipped_calibration(SCHEDULER, STEPS)
    assert cal is not None
    comps = stepcache.discover(model)
    rows = []
    for name, sched in (
        ("smoothcache 0.5", for_compute_fraction(cal, 0.5)),
        ("optimal 0.35", optimal_schedule(cal, 0.35)),
    ):
        with stepcache.cache(model, sched) as handle:
            exact = run(model, labels, 0)
        for lead in (None, 2, 1):
            with stepcache.cache(model, sched, offload=True, offload_lead=lead) as handle:
                images = run(model, labels, 0)
            plans = sched.resolve(comps)
            ts = transfer_schedule([plans[c.name] for c in comps], lead)
            stats = handle.offload_stats
            assert stats is not None
            row = {
                "schedule": name,
                "lead": lead or len(comps),
                "bit_identical": bool(torch.equal(images, exact)),
                "resident_max_measured": max(stats.resident),
                "resident_max_predicted": max(ts.resident),
                "resident_equal_every_step": stats.resident == ts.resident,
                "kept_max": max(ts.kept),
                "fetched_bytes": stats.fetched_bytes,
                "evicted_bytes": stats.evicted_bytes,
                "late_fetches": stats.late_fetches,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------- part 3
def held_tensors(roots: list[Any], exclude: set[int], depth: int = 40) -> int:
    """Bytes of the distinct tensor storages reachable from ``roots`` (objects' attributes, dicts,
    sequences, closures and bound methods, breadth first to ``depth`` levels), except the storages in
    ``exclude`` (the model's parameters and buffers). What a cache object keeps alive, without
    knowing its code."""
    from collections import deque

    seen_objs: set[int] = set()
    storages: dict[int, int] = {}
    queue: deque[tuple[Any, int]] = deque((r, 0) for r in roots)
    atoms = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, type)
    while queue:
        obj, level = queue.popleft()
        if level > depth or id(obj) in seen_objs or isinstance(obj, atoms):
            continue
        seen_objs.add(id(obj))
        children: list[Any] = []
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, torch.nn.Parameter) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, dict):
            children = list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif isinstance(obj, types.MethodType):
            children = [obj.__self__, obj.__func__]
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):
                    children.append(cell.cell_contents)
        elif isinstance(obj, torch.nn.Module):
            children = [v for k, v in vars(obj).items() if k not in ("_parameters", "_buffers", "_modules")]
        else:
            if hasattr(obj, "__dict__"):
                children.append(vars(obj))
            for slot in getattr(type(obj), "__slots__", ()):
                with contextlib.suppress(AttributeError):
                    children.append(getattr(obj, slot))
        queue.extend((c, level + 1) for c in children)
    return sum(storages.values())


@contextlib.contextmanager
def probe(
    model: torch.nn.Module, extra: list[Any]
) -> Iterator[Callable[[], tuple[int, Callable[[int], None]]]]:
    """A step callback that walks the model's modules (their hooks, wrapped forwards) and ``extra``."""
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    peak = [0]

    def callback(_: int) -> None:
        roots: list[Any] = [*model.modules(), *extra]
        peak[0] = max(peak[0], held_tensors(roots, exclude))

    yield lambda: (peak[0], callback)


def peers_part(model: torch.nn.Module, labels: torch.Tensor) -> list[dict]:
    sys_path = str(Path(__file__).resolve().parents[1])
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from benchmarks.harness import peers

    cal = reference.shipped_calibration(SCHEDULER, STEPS)
    assert cal is not None
    sched = for_compute_fraction(cal, 0.5)
    have = peers.available_peers()
    rows = []

    def record(name: str, exact_peak: int | None, walked: int, fraction: float | None) -> None:
        row = {"method": name, "stats_peak": exact_peak, "walked_peak": walked, "compute_fraction": fraction}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name, options in (
        ("stepcache SmoothCache rule 0.5", {}),
        ("stepcache SmoothCache rule 0.5, fp8", {"storage_dtype": "fp8"}),
    ):
        with stepcache.cache(model, sched, **options) as handle, probe(model, [handle]) as read:
            _, cb = read()
            run(model, labels, 0, callback=cb)
            walked = read()[0]
        record(name, handle.stats.peak_stored_bytes, walked, round(handle.stats.compute_fraction, 4))
    opt = optimal_schedule(cal, 0.35)
    with stepcache.cache(model, opt) as handle, probe(model, [handle]) as read:
        run(model, labels, 0, callback=read()[1])
        walked = read()[0]
    record(
        "stepcache optimal 0.35 (forecast)",
        handle.stats.peak_stored_bytes,
        walked,
        round(handle.stats.compute_fraction, 4),
    )
    methods = []
    if have.get(peers.SMOOTHCACHE):
        methods.append(
            (
                "dit-smoothcache SmoothCacheHelper, same schedule",
                peers.PeerMethod(
                    peers.SMOOTHCACHE, "SmoothCacheHelper", "f=0.5", {"schedule": sched.to_smoothcache()}
                ),
            )
        )
    if have.get(peers.DIFFUSERS):
        for pm in peers.peer_sweeps(STEPS, len(model.transformer_blocks)):
            if pm.name == "TaylorSeer" and pm.knob in ("interval=2", "interval=3"):
                methods.append((f"diffusers TaylorSeer ({pm.knob}, order 1)", pm))
    for name, pm in methods:
        with peers.count_component_calls(model) as counts:
            with peers.apply_peer(pm, model, num_inference_steps=STEPS), probe(model, []) as read:
                run(model, labels, 0, callback=read()[1])
                walked = read()[0]
            fraction = float(counts()["fraction"])
        record(name, None, walked, round(fraction, 4))
    return rows


# ---------------------------------------------------------------------------------------- report
def render(report: dict[str, Any]) -> str:
    out = [
        "# Memory-planned caching on the reference model",
        "",
        f"`python benchmarks/memory.py` ({report['samples']} samples, DPM-Solver++ {STEPS} steps, shipped calibration; "
        f"{report['seconds']:.0f} s on {report['machine']}). PSNR (dB) of each image against the uncached image of the "
        "same seed: mean and worst. Budget = a share of the schedule's *unplanned* peak (every output kept, fp32; "
        "forecasting plans keep two per component). The budget in bytes is the same for every storage and layout "
        "in a row group; fp8 and bf16 store the same outputs in fewer bytes, so more reuse fits. `fraction` is "
        "the compute fraction the fitted schedule reaches (the policy asked for the group's). Peaks in KiB, "
        "predicted = measured on every row (checked).",
        "",
    ]
    rows = report["budgets"]
    for fraction in sorted({r["fraction"] for r in rows}):
        out += [f"## Compute fraction {fraction}", ""]
        out += [
            "| policy | layout | budget | storage | PSNR mean | worst | fraction | peak KiB (pred = meas) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["fraction"] != fraction:
                continue
            out.append(
                f"| {r['policy']} | {r['layout']} | {r['budget_pct']:.0%} | {r['storage']} | {r['psnr']:.2f} "
                f"| {r['psnr_worst']:.2f} | {r['compute_fraction']:.3f} | {r['measured_peak'] / 1024:.0f} |"
            )
        out.append("")
    out += ["## Offload (CPU: the same bookkeeping, no speed meaning)", ""]
    out += [
        "| schedule | lead (calls) | bit-identical | resident max measured / predicted | every step equal | kept max (no offload) | fetched KiB | evicted KiB | late fetches |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["offload"]:
        out.append(
            f"| {r['schedule']} | {r['lead']} | {r['bit_identical']} | {r['resident_max_measured']} / {r['resident_max_predicted']} "
            f"| {r['resident_equal_every_step']} | {r['kept_max']} | {r['fetched_bytes'] / 1024:.0f} | {r['evicted_bytes'] / 1024:.0f} | {r['late_fetches']} |"
        )
    out += [
        "",
        "## Stored bytes of the peers on the same run",
        "",
        "Walked = the distinct tensor storages reachable from the model's modules (hooks, wrapped forwards, "
        "registries) and the cache object, minus parameters and buffers, after every step (`held_tensors`): a "
        "method-agnostic count, sampled at step boundaries. For stepcache the runtime's exact peak is shown too.",
        "",
        "| method | compute fraction | peak KiB (walked, per step) | exact peak KiB (stats) |",
        "|---|---|---|---|",
    ]
    for r in report["peers"]:
        exact = "" if r["stats_peak"] is None else f"{r['stats_peak'] / 1024:.0f}"
        out.append(f"| {r['method']} | {r['compute_fraction']} | {r['walked_peak'] / 1024:.0f} | {exact} |")
    out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tuning-samples", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-tuned", dest="tuned", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.tuned = 8, False
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = reference.load_model()
    labels = torch.arange(args.samples) % 10
    with torch.no_grad():
        exact = run(model, labels, 0)
        report: dict[str, Any] = {
            "samples": args.samples,
            "sampler": f"{SCHEDULER}-{STEPS}",
            "budgets": budgets(model, labels, exact, args),
            "offload": offload(model, labels),
            "peers": peers_part(model, labels),
        }
    for r in report["budgets"]:
        assert r["predicted_peak"] == r["measured_peak"], r
    report["seconds"] = time.perf_counter() - start
    report["machine"] = f"{platform.machine()} CPU, 1 thread, torch {torch.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
