"""Suite B: wall time at realistic shapes, at matched compute fractions.

``DiTTransformer2DModel`` with the DiT-B/2 or DiT-XL/2 256x256 configuration (random weights: speed
does not depend on them), DDIM, batched classifier-free guidance. Every configuration runs once per
repeat, interleaved, so drift hits all alike; we report medians, the speed-up over uncached, the ideal
speed-up implied by the skipped MACs (torch's FLOP counter) and their ratio, and the peak resident
memory during the run (sampled; CUDA: ``max_memory_allocated``).

Static methods are matched by construction: stepcache with evenly spaced computes (copy, and with
first-order forecasting), the original SmoothCache package on the same plan, and diffusers'
TaylorSeer at the interval giving that fraction. Adaptive peers (FirstBlockCache, MagCache, DBCache)
decide from the weights' own residuals, which are meaningless on random weights; they are compared
on speed-to-ideal in suite A instead.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from stepcache import Schedule
from stepcache.discovery import discover
from stepcache.integrations.models import transformer
from stepcache.policies import uniform_plan
from stepcache.runtime import cache, mac_shares

from . import peers

SHAPES: dict[str, dict[str, int]] = {
    # 256x256 images -> 32x32 latents, patch 2 -> 256 tokens.
    "DiT-B/2": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64, "sample_size": 32},
    "DiT-XL/2": {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "sample_size": 32},
    "tiny": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "sample_size": 8},
}


@dataclass(frozen=True)
class SpeedConfig:
    shapes: tuple[str, ...] = ("DiT-B/2",)
    steps: int = 50
    batch: int = 2  # images per generation; x2 with batched guidance
    fractions: tuple[float, ...] = (0.75, 0.5, 0.35)
    repeats: int = 3
    peers: bool = True


def build(shape: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformer("dit", **SHAPES[shape])


def generate(model: torch.nn.Module, steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    """A DDIM loop with batched guidance (scale 4): one model call per step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    labels = torch.arange(batch) % 1000
    null = torch.full((batch,), 1000)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(
                torch.cat([x, x]), timestep=t.expand(2 * batch), class_labels=torch.cat([labels, null])
            ).sample
            cond, unc = out[:, : cfg.in_channels].chunk(2)
            x = scheduler.step(unc + 4.0 * (cond - unc), t, x).prev_sample
    return x


def _macs(model: torch.nn.Module, batch: int) -> tuple[float, float]:
    """(MACs of one denoiser call, MACs of its cached components)."""
    size = model.config.sample_size

    def call() -> None:
        model(
            torch.randn(2 * batch, 4, size, size),
            timestep=torch.full((2 * batch,), 500),
            class_labels=torch.zeros(2 * batch, dtype=torch.long),
        )

    shares = mac_shares(model, discover(model), call)
    return shares.total, sum(shares.by_component.values())


@contextlib.contextmanager
def _peak_memory() -> Iterator[Callable[[], float]]:
    """Peak memory during the block, in MiB: CUDA allocator peak, else sampled resident set growth."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield lambda: torch.cuda.max_memory_allocated() / 2**20
        return

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    try:
        base = rss()
    except OSError:  # not Linux: no cheap RSS reading
        yield lambda: float("nan")
        return
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0] - base
    finally:
        stop.set()
        thread.join()


def _methods(model: torch.nn.Module, cfg: SpeedConfig) -> list[tuple[str, float | None, Callable[[], Any]]]:
    n = cfg.steps
    out: list[tuple[str, float | None, Callable[[], Any]]] = [("uncached", None, contextlib.nullcontext)]
    have = peers.available_peers() if cfg.peers else {}
    for f in cfg.fractions:
        plan = uniform_plan(n, f)
        sched = Schedule(n, dict.fromkeys(("attn", "ff"), plan))
        forecast = sched.with_forecast()
        out.append(("stepcache", f, lambda s=sched: cache(model, s, count_macs=False)))
        out.append(("stepcache+forecast", f, lambda s=forecast: cache(model, s, count_macs=False)))
        if have.get(peers.SMOOTHCACHE):
            pm = peers.PeerMethod(
                peers.SMOOTHCACHE, "SmoothCacheHelper", f"f={f}", {"schedule": sched.to_smoothcache()}
            )
            out.append(
                ("dit-smoothcache", f, lambda pm=pm: peers.apply_peer(pm, model, num_inference_steps=n))
            )
        if have.get(peers.DIFFUSERS):
            interval = max(1, round(1 / f))
            warm = 3 if interval > 1 else n
            if f > 0.6:  # interval 2 plus a full-compute warm-up reaches the higher fractions
                interval, warm = 2, max(3, round((2 * f - 1) * n))
            pm = peers.taylorseer(interval, warm)
            out.append(
                ("diffusers TaylorSeer", f, lambda pm=pm: peers.apply_peer(pm, model, num_inference_steps=n))
            )
    return out


def _mib(value: float) -> float | None:
    return None if value != value else round(value, 1)  # NaN (no RSS reading) -> null


def run_suite(cfg: SpeedConfig, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Suite B; returns the ``speed`` section of the bench report."""
    section: dict[str, Any] = {"shapes": []}
    for shape in cfg.shapes:
        model = build(shape)
        step_macs, comp_macs = _macs(model, cfg.batch)
        methods = _methods(model, cfg)
        times: dict[int, list[float]] = {i: [] for i in range(len(methods))}
        memory: dict[int, list[float]] = {i: [] for i in range(len(methods))}
        fractions: dict[int, float] = {}
        generate(model, 2, cfg.batch)  # warm-up
        for r in range(cfg.repeats):
            for i, (name, f, enter) in enumerate(methods):
                with peers.count_component_calls(model) as counts, _peak_memory() as peak, enter():
                    start = time.perf_counter()
                    generate(model, cfg.steps, cfg.batch, seed=r)
                    times[i].append(time.perf_counter() - start)
                memory[i].append(peak())
                fractions[i] = counts()["fraction"]
                progress(f"[speed] {shape} repeat {r + 1}/{cfg.repeats} {name} f={f}: {times[i][-1]:.2f} s")
        base = statistics.median(times[0])
        rows = []
        for i, (name, f, _) in enumerate(methods):
            med = statistics.median(times[i])
            frac = fractions[i]
            ideal = 1 / (1 - (1 - frac) * comp_macs / step_macs)
            rows.append(
                {
                    "method": name,
                    "target_fraction": f,
                    "compute_fraction": round(frac, 4),
                    "median_s": round(med, 3),
                    "times_s": [round(t, 3) for t in times[i]],
                    "speedup": round(base / med, 4),
                    "ideal_speedup": round(ideal, 4),
                    "speedup_vs_ideal": round(base / med / ideal, 4),
                    "peak_memory_mib": _mib(statistics.median(memory[i])),
                }
            )
        section["shapes"].append(
            {
                "shape": shape,
                "config": SHAPES[shape],
                "tokens": (SHAPES[shape]["sample_size"] // 2) ** 2,
                "steps": cfg.steps,
                "batch": cfg.batch,
                "guidance": f"batched ({cfg.batch} -> {2 * cfg.batch})",
                "repeats": cfg.repeats,
                "component_share_of_macs": round(comp_macs / step_macs, 4),
                "rows": rows,
            }
        )
    return section
