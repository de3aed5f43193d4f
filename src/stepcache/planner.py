"""Cache memory at video scale, planned before any weight exists: ``stepcache plan-memory``.

Each preset builds a published model's transformer from its config
(:data:`stepcache.integrations.models.PUBLISHED`) on ``torch.device("meta")`` (no download, no
memory, a second or two) and measures every cached component's output with
:func:`stepcache.memory.output_bytes` at the preset's shape. A SmoothCache-style schedule at a
compute fraction (one computation every ``k`` steps, copy reuse, the first and last steps computed)
with the blocks' phases staggered (the ``b``-th block computes where ``(s + b) % k == 0``, so every
step computes about ``1/k`` of the blocks, whole: what lets transfers hide behind compute) then
gives, through the runtime's own rules:

* ``unplanned``: every output kept (``torch.compile``, the original SmoothCache package);
* ``liveness``: what the eager runtime keeps (:func:`~stepcache.memory.predict_peak`);
* ``budget fraction``: the smallest compute fraction whose reuse fits the budget on the device in
  the compute dtype (a reused step needs its output stored; a lower bound);
* ``fp8``: liveness with ``storage_dtype="fp8"``;
* ``offload``: the most bytes resident on the device with ``offload=True``, bf16 and fp8, and the
  bytes each step moves each way. ``lead`` = three blocks of calls: with one block in three
  computing, every fetch then has a computing block to hide behind.

Step time is an estimate, not a measurement: ``2 x parameters x tokens + 4 x attention layers x
tokens^2 x width`` FLOPs per branch, at an assumed sustained throughput (default 40 % of an H200's
989 TFLOPS dense bf16). Transfers assume PCIe Gen5 x16 at 50 GB/s effective each way, both ways at
once. Both are arguments; the table states them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .discovery import discover
from .errors import StepCacheError
from .integrations.models import transformer
from .memory import output_bytes, predict_peak, stored_sizes, unplanned_peak
from .runtime.offload import transfer_schedule
from .schedule import Schedule

__all__ = ["PRESETS", "MemoryPlan", "Preset", "plan_memory", "render_plans"]

GB = 10**9


@dataclass(frozen=True)
class Preset:
    """A published model at one generation shape (bf16, batch 1)."""

    name: str
    title: str
    tokens: int  # image/video tokens the blocks run on (text tokens of joint attention not included)
    width: int
    branches: int  # stores per component: 2 for split classifier-free guidance
    steps: int
    attention_layers: int
    build: Callable[[], tuple[torch.nn.Module, Callable[[], Any]]]


def _wan(config: str, frames: int, height: int, width: int) -> Any:
    def build() -> tuple[torch.nn.Module, Callable[[], Any]]:
        model = transformer(config, device="meta", dtype=torch.bfloat16)
        with torch.device("meta"):
            latent = torch.empty(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, dtype=torch.bfloat16)
            text = torch.empty(1, 512, 4096, dtype=torch.bfloat16)
            t = torch.zeros(1, dtype=torch.long)
        return model, lambda: model(latent, timestep=t, encoder_hidden_states=text)

    return build


def _hunyuan() -> tuple[torch.nn.Module, Callable[[], Any]]:
    model = transformer("hunyuanvideo", device="meta", dtype=torch.bfloat16)
    with torch.device("meta"):
        latent = torch.empty(1, 16, 33, 90, 160, dtype=torch.bfloat16)  # 129 frames at 720x1280
        text = torch.empty(1, 256, 4096, dtype=torch.bfloat16)
        mask = torch.ones(1, 256, dtype=torch.bool)
        pooled = torch.empty(1, 768, dtype=torch.bfloat16)
        guidance = torch.full((1,), 6000.0, dtype=torch.bfloat16)
        t = torch.zeros(1, dtype=torch.long)
    return model, lambda: model(latent, t, text, mask, pooled, guidance=guidance)


def _flux() -> tuple[torch.nn.Module, Callable[[], Any]]:
    model = transformer("flux.1-dev", device="meta", dtype=torch.bfloat16)
    with torch.device("meta"):
        latent = torch.empty(1, 4096, 64, dtype=torch.bfloat16)  # 1024x1024: 64x64 latent, 2x2 packed
        text = torch.empty(1, 512, 4096, dtype=torch.bfloat16)
        pooled = torch.empty(1, 768, dtype=torch.bfloat16)
        t = torch.ones(1, dtype=torch.bfloat16)
        guidance = torch.ones(1, dtype=torch.bfloat16)
        img_ids, txt_ids = torch.zeros(4096, 3), torch.zeros(512, 3)
    return model, lambda: model(latent, text, pooled, t, img_ids, txt_ids, guidance)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "wan2.1-14b-720p",
            "Wan2.1-T2V-14B 720p 81 frames, split CFG",
            75_600,
            5_120,
            2,
            50,
            40,
            _wan("wan2.1-t2v-14b", 81, 720, 1280),
        ),
        Preset(
            "wan2.1-14b-480p",
            "Wan2.1-T2V-14B 480p 81 frames, split CFG",
            32_760,
            5_120,
            2,
            50,
            40,
            _wan("wan2.1-t2v-14b", 81, 480, 832),
        ),
        Preset(
            "wan2.1-1.3b-480p",
            "Wan2.1-T2V-1.3B 480p 81 frames, split CFG",
            32_760,
            1_536,
            2,
            50,
            30,
            _wan("wan2.1-t2v-1.3b", 81, 480, 832),
        ),
        Preset(
            "hunyuanvideo-720p",
            "HunyuanVideo 720p 129 frames (guidance-distilled)",
            118_800,
            3_072,
            1,
            50,
            60,
            _hunyuan,
        ),
        Preset(
            "flux.1-dev-1024",
            "FLUX.1-dev 1024x1024 (guidance-distilled)",
            4_608,
            3_072,
            1,
            28,
            57,
            _flux,
        ),
    )
}


@dataclass(frozen=True)
class MemoryPlan:
    """One row of the planner table (bytes, seconds; see the module doc for each quantity)."""

    preset: str
    title: str
    components: int
    branches: int
    output_bytes: int  # the largest single output
    unplanned: int
    liveness: int
    budget: int
    budget_fraction: float  # the least compute fraction whose reuse fits the budget in bf16 on the device
    fp8: int
    offload: int
    offload_fp8: int
    to_device: int  # the most bytes one step copies to the device (bf16), all branches
    to_host: int
    to_device_fp8: int
    step_seconds: float  # estimated: one full-compute step, all branches
    cached_step_seconds: (
        float  # the least compute time of one step of the schedule (its share of step_seconds)
    )
    transfer_seconds: float  # the most max(to_device, to_host) / bandwidth of one step, bf16
    transfer_seconds_fp8: float
    stall_seconds: float  # per generation: transfer time not hidden behind the same step's compute, bf16
    stall_seconds_fp8: float
    compute_fraction: float
    lead: int
    assumptions: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_memory(
    preset: str | Preset,
    *,
    budget: int = 16 * GB,
    compute_fraction: float = 0.35,
    bandwidth: float = 50 * GB,
    tflops: float = 989.0,
    utilisation: float = 0.4,
    lead_blocks: int = 3,
) -> MemoryPlan:
    """The planner row of ``preset`` (a name of :data:`PRESETS` or a :class:`Preset`)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise StepCacheError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}.")
        preset = PRESETS[preset]
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # `.to(bfloat16)` on a meta model warns about fp32 modules: moot here
    try:
        model, run = preset.build()
    finally:
        quiet.setLevel(level)
    sizes = output_bytes(model, run)
    comps = [c for c in discover(model) if c.name in sizes]
    n = preset.steps
    k = max(1, round(1 / compute_fraction))
    blocks = {b: i for i, b in enumerate(dict.fromkeys(c.block for c in comps))}  # call order
    staggered = {
        c.name: tuple(1 if s in (0, n - 1) or (s + blocks[c.block]) % k == 0 else 0 for s in range(n))
        for c in comps
    }
    schedule = Schedule(n, staggered)
    b = preset.branches
    fp8_sizes = stored_sizes(sizes, torch.bfloat16, "fp8")
    live = predict_peak(schedule, sizes, components=comps, branches=b).peak_bytes
    fp8 = predict_peak(schedule, fp8_sizes, components=comps, branches=b).peak_bytes
    unplanned = unplanned_peak(schedule, sizes, components=comps, branches=b)
    per_block = max(1, round(len(comps) / len({c.block for c in comps})))
    lead = lead_blocks * per_block
    plans = schedule.resolve(comps)
    order = [c.name for c in comps]
    ts = transfer_schedule([plans[n] for n in order], lead, sizes=[sizes[n] for n in order], branches=b)
    ts8 = transfer_schedule([plans[n] for n in order], lead, sizes=[fp8_sizes[n] for n in order], branches=b)
    params = sum(p.numel() for p in model.parameters())
    flops = 2 * params * preset.tokens + 4 * preset.attention_layers * preset.tokens**2 * preset.width
    step = b * flops / (tflops * 1e12 * utilisation)
    # Compute time of each step: its share of computing components (blocks compute whole: equal cost
    # per block).
    share = [sum(plans[c][s] == 1 for c in order) / len(order) for s in range(n)]
    busy = [step * x for x in share]

    def stall(t: Any) -> float:
        return sum(
            max(0.0, max(i, o) / bandwidth - c) for i, o, c in zip(t.to_device, t.to_host, busy, strict=True)
        )

    cached = min(busy)
    # The smallest compute fraction whose reuse fits: each step, at most budget / liveness of the
    # stored outputs can be held, so at least 1 - that share must compute.
    fits = 1.0 - min(1.0, budget / live) if live else 0.0
    return MemoryPlan(
        preset=preset.name,
        title=preset.title,
        components=len(comps),
        branches=b,
        output_bytes=max(sizes.values()),
        unplanned=unplanned,
        liveness=live,
        budget=budget,
        budget_fraction=max(fits, 0.0),
        fp8=fp8,
        offload=max(ts.resident),
        offload_fp8=max(ts8.resident),
        to_device=max(ts.to_device),
        to_host=max(ts.to_host),
        to_device_fp8=max(ts8.to_device),
        step_seconds=step,
        cached_step_seconds=cached,
        transfer_seconds=max(max(i, o) for i, o in zip(ts.to_device, ts.to_host, strict=True)) / bandwidth,
        transfer_seconds_fp8=max(max(i, o) for i, o in zip(ts8.to_device, ts8.to_host, strict=True))
        / bandwidth,
        stall_seconds=stall(ts),
        stall_seconds_fp8=stall(ts8),
        compute_fraction=schedule.compute_fraction,
        lead=lead,
        assumptions={"bandwidth_GBps": bandwidth / GB, "tflops": tflops, "utilisation": utilisation},
    )


def _gb(v: float) -> str:
    return f"{v / GB:.1f}"


def render_plans(rows: Sequence[MemoryPlan]) -> str:
    """The planner table as Markdown (GB = 10^9 bytes)."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [
        "Stored outputs of one generation (GPU memory for the cache), bf16, batch 1, one computation every "
        f"{round(1 / r0.compute_fraction)} steps per block, blocks' phases staggered (compute fraction about "
        f"{r0.compute_fraction:.2f}), copy reuse. GB = 1e9 bytes; budget {_gb(r0.budget)} GB. Offload: fetch "
        "three blocks of calls ahead.",
        "",
        "| model | outputs x branches | one output MB | unplanned GB | liveness GB | least fraction within budget "
        "(bf16, on device) | fp8 GB | offload, on device GB (bf16 / fp8) | most moved in one step GB (in / out, bf16) "
        "| transfer s / step compute s (bf16) | stall s per generation (bf16 / fp8) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.title} | {r.components} x {r.branches} | {r.output_bytes / 1e6:.0f} | {_gb(r.unplanned)} "
            f"| {_gb(r.liveness)} | {r.budget_fraction:.2f} | {_gb(r.fp8)} "
            f"| {_gb(r.offload)} / {_gb(r.offload_fp8)} | {_gb(r.to_device)} / {_gb(r.to_host)} "
            f"| {r.transfer_seconds:.2f} / {r.cached_step_seconds:.1f} | {r.stall_seconds:.1f} / {r.stall_seconds_fp8:.1f} |"
        )
    a = r0.assumptions
    lines += [
        "",
        f"Assumed: host link {a['bandwidth_GBps']:g} GB/s each way, both ways at once (PCIe Gen5 x16, effective); "
        f"step time from FLOPs (2 x parameters x tokens + 4 x attention layers x tokens^2 x width per branch) "
        f"at {a['utilisation']:.0%} of {a['tflops']:g} TFLOPS (H200 dense bf16); the cached step as the compute "
        "share of blocks computing at that step (equal cost per block). Estimates, not measurements.",
    ]
    return "\n".join(lines)
