"""What the GPU check (``benchmarks/gpu_check.py``) is made of: workloads, their loop, its report.

* :class:`Shape` and :data:`SHAPES`: the models the check runs (random weights from
  :mod:`stepcache.integrations.models` configs) at the real shapes, and at tiny shapes for ``--dry-run``;
* :class:`Workload`: one model on the device with its inputs, and :class:`Loop`, the pipeline around
  it: a denoising loop whose timesteps and scheduler arithmetic stay on the device (as a diffusers
  pipeline's do), so stepcache places calls by counting ``scheduler.step`` and nothing here makes the
  host wait for the GPU;
* :class:`Section` and :class:`Check`: what a section reports, with the rule that decides its status
  (a section passes only when every check it states was measured and passed).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stepcache import Schedule
from stepcache.discovery import discover
from stepcache.integrations.models import transformer
from stepcache.policies import uniform_plan
from stepcache.runtime import cache, mac_shares

__all__ = [
    "CHECK_STATUSES",
    "NO_CUDA",
    "SECTION_STATUSES",
    "SHAPES",
    "Check",
    "Loop",
    "Section",
    "Shape",
    "Workload",
    "compile_regionally",
    "staggered_schedule",
    "time_configs",
    "uniform_schedule",
]

NO_CUDA = "no CUDA"
#: pass / fail: measured and judged; measured: a number with no claim (a GPU criterion measured on the
#: CPU); skipped: not measured, with the reason.
CHECK_STATUSES = ("pass", "fail", "measured", "skipped")
SECTION_STATUSES = ("pass", "fail", "partial", "measured", "skipped", "error")


# ---------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """One workload: a transformer config, its inputs and its loop.

    ``latent`` is ``(channels, height, width)`` of a DiT latent, ``(tokens,)`` of Flux's packed
    latent, ``(frames, height, width)`` of a Wan latent; ``text`` the text tokens (Flux, Wan).
    ``guidance``: ``"batched"`` (cond and uncond in one call, DiT), ``"distilled"`` (one call, no
    uncond: FLUX.1-dev) or ``"split"`` (two calls per step, Wan).
    """

    name: str
    family: str
    config: str
    steps: int
    latent: tuple[int, ...]
    batch: int = 1
    text: int = 0
    guidance: str = "batched"
    dtype: str = "bf16"
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def branches(self) -> int:
        return 2 if self.guidance == "split" else 1

    def describe(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "overrides": dict(self.overrides),
            "steps": self.steps,
            "latent": list(self.latent),
            "batch": self.batch,
            "text_tokens": self.text,
            "guidance": self.guidance,
            "dtype": self.dtype,
            **({"note": self.note} if self.note else {}),
        }


_FLUX_BLOCKS = {"num_layers": 8, "num_single_layers": 16}
SHAPES: dict[str, dict[str, Shape]] = {
    "gpu": {
        "dit": Shape("DiT-XL/2 256x256", "dit", "dit-xl-2-256", 50, (4, 32, 32), batch=2),
        "flux": Shape(
            "FLUX-shaped 1024x1024",
            "flux",
            "flux.1-dev",
            20,
            (4096,),
            text=512,
            guidance="distilled",
            overrides=_FLUX_BLOCKS,
            note="8 of FLUX.1-dev's 19 double blocks and 16 of its 38 single blocks (5.0 B parameters)",
        ),
        "wan": Shape(
            "Wan2.1-1.3B-shaped 480p, 17 frames",
            "wan",
            "wan2.1-t2v-1.3b",
            20,
            (5, 60, 104),
            text=512,
            guidance="split",
            note="all 30 blocks; 17 frames (5 latent frames, 7,800 tokens) instead of 81",
        ),
        "wan-offload": Shape(
            "Wan2.1-1.3B-shaped 480p, 81 frames",
            "wan",
            "wan2.1-t2v-1.3b",
            10,
            (21, 60, 104),
            text=512,
            guidance="split",
            note="the planner's wan2.1-1.3b-480p preset (32,760 tokens), 10 steps",
        ),
        "dit-fp32": Shape("DiT-XL/2 256x256 fp32", "dit", "dit-xl-2-256", 20, (4, 32, 32), dtype="fp32"),
        "tiny-dit": Shape("tiny DiT (launch-bound)", "dit", "dit", 20, (4, 8, 8), batch=2, dtype="fp32"),
        "tiny-flux": Shape(
            "tiny Flux (launch-bound)", "flux", "flux", 20, (16,), text=6, guidance="distilled", dtype="fp32"
        ),
    },
    "dry-run": {
        "dit": Shape("tiny DiT", "dit", "dit", 8, (4, 8, 8), dtype="fp32", overrides={"num_layers": 2}),
        "flux": Shape("tiny Flux", "flux", "flux", 8, (16,), text=6, guidance="distilled", dtype="fp32"),
        "wan": Shape("tiny Wan", "wan", "wan", 8, (2, 8, 8), text=6, guidance="split", dtype="fp32"),
        "wan-offload": Shape("tiny Wan", "wan", "wan", 9, (2, 8, 8), text=6, guidance="split", dtype="fp32"),
        "dit-fp32": Shape("tiny DiT fp32", "dit", "dit", 8, (4, 8, 8), dtype="fp32"),
        "tiny-dit": Shape("tiny DiT", "dit", "dit", 10, (4, 8, 8), batch=2, dtype="fp32"),
        "tiny-flux": Shape(
            "tiny Flux", "flux", "flux", 10, (16,), text=6, guidance="distilled", dtype="fp32"
        ),
    },
}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------- the loop
class DeviceEuler:
    """Flow-matching Euler steps with the timesteps on the device, as a diffusers pipeline sets them
    up (``set_timesteps(n, device=...)``). Indexing a device tensor with a Python int and the step's
    arithmetic stay on the device: nothing here reads a device value on the host."""

    def __init__(self) -> None:
        self.sigmas = self.timesteps = torch.empty(0)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | None = None) -> None:
        self.sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)
        self.timesteps = self.sigmas[:-1] * 1000

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        return sample + (self.sigmas[index + 1] - self.sigmas[index]) * velocity


class Loop:
    """A pipeline as stepcache sees one (``.transformer``, ``.scheduler``): ``loop()`` is one generation.

    ``on_step(i)`` runs after step ``i`` (the memory section samples the allocator there).
    """

    def __init__(self, workload: Workload, model: torch.nn.Module | None = None) -> None:
        self.workload = workload
        self.transformer = workload.model if model is None else model
        self.scheduler = DeviceEuler()

    def __call__(
        self, steps: int | None = None, on_step: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        w = self.workload
        n = w.shape.steps if steps is None else steps
        self.scheduler.set_timesteps(n, device=w.device)
        x = w.x0.clone()
        with torch.no_grad():
            for i in range(n):
                v = w.denoise(self.transformer, x, self.scheduler.timesteps[i])
                x = self.scheduler.step(v, i, x)
                del v
                if on_step is not None:
                    on_step(i)
        return x


class Workload:
    """A :class:`Shape`'s model on ``device``, its inputs (made once, before any timed loop) and
    :meth:`denoise`, one step's denoiser calls with their guidance."""

    def __init__(self, shape: Shape, device: torch.device, model: torch.nn.Module | None = None) -> None:
        self.shape, self.device = shape, device
        self.dtype = _DTYPES[shape.dtype]
        if model is None:  # built on the device (no host copy of a large model), every buffer there
            quiet = logging.getLogger("diffusers.models.modeling_utils")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # `.to(dtype)` warns about modules real checkpoints keep in fp32
            try:
                model = transformer(shape.config, seed=0, device=device, dtype=self.dtype, **shape.overrides)
            finally:
                quiet.setLevel(level)
            model.to(device)
        self.model = model
        self.types = sorted({c.type for c in discover(model)})
        self.inputs = self._inputs()
        self.x0 = self.inputs.pop("x")
        self.loop = Loop(self)

    def _inputs(self) -> dict[str, torch.Tensor]:
        s, cfg = self.shape, self.model.config
        g = torch.Generator().manual_seed(0)

        def randn(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=g).to(self.device, self.dtype)

        b = s.batch
        if s.family == "dit":
            labels = torch.arange(b) % 1000
            return {
                "x": randn(b, *s.latent),
                "labels": torch.cat([labels, torch.full((b,), 1000)]).to(self.device),
            }
        if s.family == "flux":
            side = int(s.latent[0] ** 0.5)
            rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
            out = {
                "x": randn(b, s.latent[0], cfg.in_channels),
                "text": randn(b, s.text, cfg.joint_attention_dim),
                "pooled": randn(b, cfg.pooled_projection_dim),
                "img_ids": img_ids.to(self.device),
                "txt_ids": torch.zeros(s.text, 3, device=self.device),
            }
            if cfg.guidance_embeds:
                out["guidance"] = torch.full((b,), 3.5, device=self.device)
            return out
        if s.family == "wan":
            return {
                "x": randn(b, cfg.in_channels, *s.latent),
                "text": randn(b, s.text, cfg.text_dim),
                "negative": randn(b, s.text, cfg.text_dim),
            }
        raise ValueError(f"unknown family {s.family!r}")

    def denoise(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One denoising step's velocity: every denoiser call the step makes, guidance applied."""
        s, k = self.shape, self.inputs
        b = s.batch
        if s.family == "dit":
            out = model(torch.cat([x, x]), timestep=t.expand(2 * b), class_labels=k["labels"]).sample
            cond, uncond = out[:, : x.shape[1]].chunk(2)
            return uncond + 4.0 * (cond - uncond)
        if s.family == "flux":
            return model(
                hidden_states=x,
                encoder_hidden_states=k["text"],
                pooled_projections=k["pooled"],
                timestep=(t / 1000).expand(b),
                img_ids=k["img_ids"],
                txt_ids=k["txt_ids"],
                guidance=k.get("guidance"),
            ).sample
        cond = model(hidden_states=x, timestep=t.expand(b), encoder_hidden_states=k["text"]).sample
        uncond = model(hidden_states=x, timestep=t.expand(b), encoder_hidden_states=k["negative"]).sample
        return uncond + 5.0 * (cond - uncond)

    def call_once(self) -> None:
        """One step's denoiser calls at t = 500 (for MAC counting and output sizes)."""
        with torch.no_grad():
            self.denoise(self.model, self.x0, torch.full((), 500.0, device=self.device))

    def mac_share(self) -> float:
        """The cached components' share of one step's MACs (torch's FLOP counter)."""
        shares = mac_shares(self.model, discover(self.model), self.call_once)
        return sum(shares.by_component.values()) / shares.total


def uniform_schedule(workload: Workload, fraction: float, steps: int | None = None) -> Schedule:
    """Evenly spaced computations for every component type (the same plan for all)."""
    n = workload.shape.steps if steps is None else steps
    return Schedule(n, dict.fromkeys(workload.types, uniform_plan(n, fraction)))


def staggered_schedule(workload: Workload, every: int, steps: int | None = None) -> Schedule:
    """The planner's schedule (``stepcache.planner``): one computation every ``every`` steps per
    block, the ``b``-th block's phase shifted by ``b`` (each step computes about ``1 / every`` of the
    blocks, whole), the first and last steps computed; per component, copy reuse."""
    n = workload.shape.steps if steps is None else steps
    comps = discover(workload.model)
    blocks = {b: i for i, b in enumerate(dict.fromkeys(c.block for c in comps))}
    return Schedule(
        n,
        {
            c.name: tuple(1 if s in (0, n - 1) or (s + blocks[c.block]) % every == 0 else 0 for s in range(n))
            for c in comps
        },
    )


def compile_regionally(model: torch.nn.Module, backend: str, mode: str | None = None) -> int:
    """Compile every block that holds cached components, in place (what diffusers'
    ``compile_repeated_blocks`` does for the models that declare their blocks); returns how many."""
    blocks = dict.fromkeys(c.block for c in discover(model))
    for name in blocks:
        model.get_submodule(name).compile(backend=backend, mode=mode)
    return len(blocks)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_configs(
    workload: Workload,
    configs: Sequence[tuple[str, Schedule | None, dict[str, Any]]],
    repeats: int,
    *,
    budget_s: float,
    warmup: bool = True,
) -> dict[str, dict[str, Any]]:
    """Wall time of one generation per configuration ``(name, schedule or None, cache options)``.

    A first round runs every configuration once (a warm-up that compiles and settles the allocator,
    or, with ``warmup=False``, the first timed round), then up to ``repeats`` timed rounds,
    interleaved so drift hits all alike; the rounds shrink (to one at least) to fit ``budget_s``
    at the first round's pace. Returns per name the times, their median, the measured compute
    fraction and the last output.
    """
    d = workload.device
    out: dict[str, dict[str, Any]] = {name: {"times_s": []} for name, _, _ in configs}

    def once(name: str, schedule: Schedule | None, options: dict[str, Any]) -> float:
        sync(d)
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            handle = (
                None if schedule is None else stack.enter_context(cache(workload.loop, schedule, **options))
            )
            x = workload.loop()
        sync(d)
        took = time.perf_counter() - start
        out[name]["output"] = x
        out[name]["compute_fraction"] = 1.0 if handle is None else handle.stats.compute_fraction
        return took

    start = time.perf_counter()
    for name, schedule, options in configs:
        took = once(name, schedule, options)
        if not warmup:
            out[name]["times_s"].append(took)
    round_s = time.perf_counter() - start
    done = 0 if warmup else 1
    fits = int((budget_s - round_s) // max(round_s, 1e-3))
    for _ in range(max(1 - done, min(repeats - done, fits))):
        for name, schedule, options in configs:
            out[name]["times_s"].append(once(name, schedule, options))
    for row in out.values():
        row["median_s"] = statistics.median(row["times_s"])
    return out


# ---------------------------------------------------------------------------------------- report
@dataclass
class Check:
    """One stated criterion and what was measured against it."""

    name: str
    status: str
    value: Any = None
    limit: str | None = None
    needs: str | None = None  # "cuda": only a GPU can measure it
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


class Section:
    """One section's report: its checks, its numbers, its time against its budget."""

    def __init__(self, name: str, title: str, budget_s: float, cuda: bool) -> None:
        self.name, self.title, self.budget_s, self.cuda = name, title, budget_s, cuda
        self.checks: list[Check] = []
        self.numbers: dict[str, Any] = {}
        self.notes: list[str] = []
        self.error: str | None = None
        self.reason: str | None = None  # why the whole section was skipped
        self.started = time.perf_counter()
        self.elapsed_s = 0.0

    # ------------------------------------------------------------------ stating checks
    def judge(
        self, name: str, value: Any, ok: bool, limit: str, *, gpu_claim: bool = False, note: str = ""
    ) -> None:
        """A measured value against its criterion. ``gpu_claim``: the criterion is about a GPU; on
        another device the value is reported as ``measured``, with no claim."""
        if gpu_claim and not self.cuda:
            self.checks.append(Check(name, "measured", value, limit, note=note or "not a GPU: no claim"))
        else:
            self.checks.append(Check(name, "pass" if ok else "fail", value, limit, note=note))

    def measure(self, name: str, value: Any, note: str) -> None:
        """A behaviour reported with no criterion (what it does is the finding)."""
        self.checks.append(Check(name, "measured", value, None, note=note))

    def needs_cuda(self, name: str, limit: str) -> bool:
        """True on CUDA; elsewhere records the check as skipped (never as passed) and returns False."""
        if self.cuda:
            return True
        self.checks.append(Check(name, "skipped", None, limit, needs="cuda", note=f"skipped: {NO_CUDA}"))
        return False

    def skip(self, name: str, limit: str, why: str) -> None:
        self.checks.append(Check(name, "skipped", None, limit, note=f"skipped: {why}"))

    def time_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    # ------------------------------------------------------------------ verdict
    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        statuses = {c.status for c in self.checks}
        if not statuses or statuses == {"skipped"}:
            return "skipped"
        if "fail" in statuses:
            return "fail"
        if statuses == {"pass"}:
            return "pass"
        return "partial" if "pass" in statuses else "measured"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "budget_s": self.budget_s,
            "elapsed_s": round(self.elapsed_s, 1),
            "over_budget": self.elapsed_s > self.budget_s,
            "checks": [c.as_dict() for c in self.checks],
            "numbers": self.numbers,
        }
        for key in ("reason", "error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.notes:
            out["notes"] = self.notes
        return out


@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the duration (CUDA only)."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)
