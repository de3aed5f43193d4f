"""Real models, for users with their weights and a GPU: stepcache against the diffusers caches and
cache-dit on FLUX.1-dev, Wan2.1-1.3B, PixArt-Sigma, SD3.5 and HunyuanVideo.

Per model, in one process, on the same pipeline, prompts and seeds:

1. the uncached outputs of the evaluation prompts (the first ``--prompts`` of
   ``benchmarks/prompts/real_models.txt``, seeds 0, 1, ...): the reference of every score;
2. ``stepcache.calibrate`` on the calibration prompts (the last ``--calibration-prompts``, other seeds);
3. stepcache's schedules at compute fractions 0.25 / 0.35 / 0.5: ``optimal_schedule`` and ``tune``
   (which replays the calibration prompts at other seeds);
4. every installed peer over its sweep (the quality suite's, :func:`benchmarks.harness.peers.peer_sweeps`):
   diffusers' FirstBlockCache, TaylorSeer, PAB, FasterCache and MagCache (its ratios from its own
   calibration run), cache-dit's DBCache alone, with TaylorSeer and with FoCa;
5. per point: the compute fraction, counted the same way for every method (attention and feed-forward
   computations that really ran), PSNR / SSIM of each output against the uncached one (mean, 5th
   percentile, worst), LPIPS and CLIP score when their weights are already on disk (never downloaded:
   the report says what was skipped and why), seconds per output (the whole pipeline call: text
   encoders and decoder included, the same for every method) and peak memory;
6. at each of the three fractions, each family's best point within 0.02 (``benchmarks/frontier_match.py``),
   best stepcache family against best peer family.

The pipelines come from their hub ids (``MODELS``; ``--path KEY=FOLDER`` for a local copy) in bf16;
weights are downloaded by diffusers only if they are not in your cache yet. ``--tiny`` runs the same
code on tiny random-weight pipelines of the same classes on the CPU (the test suite's, built from
``stepcache.integrations.models`` configs with in-memory text encoders: from a checkout only), which
is what the tests run; its numbers mean nothing.

    python benchmarks/real_models.py flux.1-dev --out real-models                   # ~1 h on one H100
    python benchmarks/real_models.py wan2.1-1.3b pixart-sigma --prompts 8 --quick   # 2 points per peer
    python benchmarks/real_models.py sd3.5-large --path sd3.5-large=/data/sd35 --steps 28
    python benchmarks/real_models.py --tiny --out /tmp/real-models                  # the CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import stepcache
from stepcache.discovery import discover
from stepcache.memory import output_bytes
from stepcache.policies import optimal_schedule, tune

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.frontier_match import match
from benchmarks.harness import peers
from benchmarks.harness.images import describe, per_sample_psnr, per_sample_ssim, perceptual_metrics
from benchmarks.harness.peers.pipelines import apply_to_pipeline, pipeline_sweeps
from benchmarks.harness.perimage import summary
from benchmarks.harness.speed import _peak_memory

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "prompts" / "real_models.txt"
FORMAT, FORMAT_VERSION = "stepcache.real_models", 1
FRACTIONS = (0.25, 0.35, 0.5)
EVAL_SEED, CALIBRATION_SEED, TUNING_SEED, MAGCACHE_SEED = 0, 1000, 2000, 3000


@dataclass(frozen=True)
class RealModel:
    """A released pipeline and how this kit calls it: ``call`` holds the keywords besides the prompt,
    seed and step count; ``tiny`` names the test suite's tiny pipeline of the same class."""

    title: str
    repo: str
    steps: int
    call: dict[str, Any]
    video: bool = False
    fp32_vae: bool = False  # Wan's VAE is meant to run in float32
    vae_tiling: bool = False
    tiny: str | None = None
    tiny_call: dict[str, Any] = field(default_factory=dict)


_TINY_IMAGE = {"height": 8, "width": 8, "max_sequence_length": 8}
MODELS: dict[str, RealModel] = {
    "flux.1-dev": RealModel(
        "FLUX.1-dev 1024x1024",
        "black-forest-labs/FLUX.1-dev",
        28,
        {"height": 1024, "width": 1024, "guidance_scale": 3.5},
        tiny="flux_pipeline",
        tiny_call={**_TINY_IMAGE, "guidance_scale": 3.5},
    ),
    "wan2.1-1.3b": RealModel(
        "Wan2.1-T2V-1.3B 480p, 17 frames",
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        50,
        {"height": 480, "width": 832, "num_frames": 17, "guidance_scale": 5.0},
        video=True,
        fp32_vae=True,
        tiny="wan_pipeline",
        tiny_call={
            "height": 16,
            "width": 16,
            "num_frames": 3,
            "guidance_scale": 5.0,
            "max_sequence_length": 8,
        },
    ),
    "pixart-sigma": RealModel(
        "PixArt-Sigma XL 1024x1024",
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        20,
        {"height": 1024, "width": 1024, "guidance_scale": 4.5},
        tiny="pixart_sigma",
        tiny_call={
            **_TINY_IMAGE,
            "guidance_scale": 4.5,
            "clean_caption": False,
            "use_resolution_binning": False,
        },
    ),
    "sd3.5-large": RealModel(
        "Stable Diffusion 3.5 Large 1024x1024",
        "stabilityai/stable-diffusion-3.5-large",
        28,
        {"height": 1024, "width": 1024, "guidance_scale": 3.5},
        tiny="sd3_pipeline",
        tiny_call={**_TINY_IMAGE, "guidance_scale": 3.5},
    ),
    "sd3.5-medium": RealModel(
        "Stable Diffusion 3.5 Medium 1024x1024",
        "stabilityai/stable-diffusion-3.5-medium",
        40,
        {"height": 1024, "width": 1024, "guidance_scale": 4.5},
        tiny="sd3_pipeline",
        tiny_call={**_TINY_IMAGE, "guidance_scale": 4.5},
    ),
    "hunyuanvideo": RealModel(
        "HunyuanVideo 320x512, 17 frames",
        "hunyuanvideo-community/HunyuanVideo",
        30,
        {"height": 320, "width": 512, "num_frames": 17, "guidance_scale": 6.0},
        video=True,
        vae_tiling=True,
    ),
}
TINY_DEFAULT = ("flux.1-dev", "wan2.1-1.3b", "pixart-sigma", "sd3.5-large")


def read_prompts(path: Path = PROMPTS) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------------------------------- pipelines
def load_pipeline(spec: RealModel, source: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The released pipeline, from a hub id or a local folder."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    if spec.fp32_vae:
        pipe.vae.to(torch.float32)
    if spec.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(key: str, spec: RealModel) -> Any:
    """The test suite's tiny pipeline of ``spec``'s class (a checkout's ``tests/_helpers``)."""
    if spec.tiny is None:
        raise SystemExit(
            f"{key} has no tiny pipeline (tiny: {', '.join(k for k, m in MODELS.items() if m.tiny)})."
        )
    try:
        from tests._helpers import pipelines
    except ImportError as e:
        raise SystemExit(
            f"--tiny builds the test suite's tiny pipelines: run it from a checkout ({e})."
        ) from e
    if spec.tiny == "pixart_sigma":
        from diffusers import PixArtSigmaPipeline

        pipe = PixArtSigmaPipeline(**pipelines.pixart_pipeline().components)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = getattr(pipelines, spec.tiny)()
    if "shift_factor" in pipe.vae.config and pipe.vae.config.shift_factor is None:
        pipe.vae.register_to_config(shift_factor=0.0)  # the tiny VAE has none; the pipelines add it
    return pipe


# ---------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Callable[[], float]]:
    """Peak memory in MiB during the block: the CUDA allocator's, else resident-set growth."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield lambda: torch.cuda.max_memory_allocated(device) / 2**20
        return
    with _peak_memory() as peak:
        yield peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model's evaluation: generations, and the measured point of each method."""

    def __init__(self, pipe: Any, spec: RealModel, args: argparse.Namespace, device: torch.device) -> None:
        self.pipe, self.spec, self.device = pipe, spec, device
        self.steps = args.steps or (8 if args.tiny else spec.steps)
        self.call = {**(spec.tiny_call if args.tiny else spec.call), **args.call}
        prompts = read_prompts(args.prompt_file)
        n, k = args.prompts, args.calibration_prompts
        if n + k > len(prompts):
            raise SystemExit(
                f"{n} evaluation + {k} calibration prompts: {args.prompt_file} has {len(prompts)}."
            )
        self.eval_prompts, self.cal_prompts = prompts[:n], prompts[len(prompts) - k :]
        self.components = discover(pipe.transformer)
        self.perceptual = perceptual_metrics(device)
        self.base: torch.Tensor | None = None
        self.base_s = float("nan")

    def generate(
        self, prompts: Sequence[str], seed: int, output_type: str = "pt", steps: int | None = None
    ) -> torch.Tensor:
        """One output per prompt (batch 1, seed ``seed + i``), stacked on the CPU."""
        outs = []
        for i, prompt in enumerate(prompts):
            result = self.pipe(
                prompt=prompt,
                generator=torch.Generator().manual_seed(seed + i),
                num_inference_steps=self.steps if steps is None else steps,
                output_type=output_type,
                **self.call,
            )
            x = result.frames if self.spec.video else result.images
            outs.append(torch.as_tensor(x).detach().float().cpu())
        return torch.cat(outs)

    def inputs(self, prompts: Sequence[str], seed: int) -> list[dict[str, Any]]:
        return [
            {
                "prompt": p,
                "generator": torch.Generator().manual_seed(seed + i),
                "output_type": "latent",
                **self.call,
            }
            for i, p in enumerate(prompts)
        ]

    def measure(self, family: str, knob: str, enter: Callable[[], Any]) -> dict[str, Any]:
        """Enter the method, generate the evaluation prompts, score them against the uncached ones."""
        point: dict[str, Any] = {"family": family, "knob": knob}
        try:
            with enter() as handle, peak_memory(self.device) as peak:
                with peers.count_component_calls(self.pipe.transformer, self.components) as counts:
                    sync(self.device)
                    start = time.perf_counter()
                    out = self.generate(self.eval_prompts, EVAL_SEED)
                    sync(self.device)
                    took = (time.perf_counter() - start) / len(self.eval_prompts)
                point["peak_memory_mib"] = round(peak(), 1)
            counted = counts()
            point["compute_fraction"] = round(counted["fraction"], 4)
            if isinstance(handle, stepcache.CacheHandle):
                point["schedule_compute_fraction"] = round(handle.stats.compute_fraction, 4)
            point["s_per_output"] = round(took, 3)
            if self.base is None:
                self.base, self.base_s = out, took
            point["speedup"] = round(self.base_s / took, 4)
            point.update(self.scores(out))
        except Exception as e:  # a method that fails is reported with its error, never dropped
            point["error"] = f"{type(e).__name__}: {e}"
            point["traceback"] = traceback.format_exc()[-2000:]
        print(f"  {family} ({knob}): " + _brief(point), flush=True)
        return point

    def scores(self, out: torch.Tensor) -> dict[str, Any]:
        assert self.base is not None
        psnr = per_sample_psnr(out, self.base)
        row: dict[str, Any] = {
            **summary(psnr),
            "ssim": round(float(per_sample_ssim(out, self.base).mean()), 4),
        }
        p = self.perceptual
        if p.lpips is not None:
            row["lpips"] = round(float(p.lpips(out, self.base).mean()), 4)
        if p.clip is not None:
            row["clip_score"] = round(float(p.clip(out, self.eval_prompts).mean()), 2)
        return row


def _brief(point: dict[str, Any]) -> str:
    if "error" in point:
        return f"error: {point['error'][:200]}"
    return (
        f"fraction {point['compute_fraction']:.3f}, PSNR {point['mean_db']:.2f} dB (p5 {point['p5_db']:.2f}), "
        f"{point['s_per_output']:.2f} s/output, x{point['speedup']:.2f}"
    )


def calibration_memory(run: Runner, lookahead: int, dtype: torch.dtype) -> tuple[bool, dict[str, Any]]:
    """Whether calibration can record forecast errors here, and why.

    Calibration holds, per component and guidance branch, the last ``lookahead`` outputs (``2 x
    lookahead + 1`` with forecast errors) in fp32 on the device. Their sizes come from a two-step
    generation (``stepcache.memory.output_bytes``); forecast errors are recorded when that fits in
    80 % of the free GPU memory (always on the CPU).
    """
    calls = [0]
    hook = run.pipe.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        sizes = output_bytes(
            run.pipe, lambda: run.generate(run.cal_prompts[:1], CALIBRATION_SEED, "latent", steps=2)
        )
    finally:
        hook.remove()
    branches = max(1, calls[0] // 2)
    one = sum(sizes.values()) * 4 // dtype.itemsize * branches  # one output of each, fp32, every branch
    info: dict[str, Any] = {
        "one_output_each_fp32_bytes": one,
        "with_forecast_bytes": one * (2 * lookahead + 1),
        "copy_only_bytes": one * lookahead,
    }
    if run.device.type != "cuda":
        return True, info
    info["free_bytes"] = torch.cuda.mem_get_info(run.device)[0]
    forecast = info["with_forecast_bytes"] <= 0.8 * info["free_bytes"]
    if not forecast:
        info["note"] = "forecast errors not recorded: they would not fit (optimal_schedule then copies only)"
    return forecast, info


# ---------------------------------------------------------------------------------------- one model
def run_model(key: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    spec = MODELS[key]
    source = "tiny random pipeline" if args.tiny else args.paths.get(key, spec.repo)
    print(f"[real_models] {key}: {source}", flush=True)
    pipe = tiny_pipeline(key, spec) if args.tiny else load_pipeline(spec, source, device, dtype)
    run = Runner(pipe, spec, args, device)
    n = run.steps
    report: dict[str, Any] = {
        "model": key,
        "title": spec.title + (" (tiny random pipeline)" if args.tiny else ""),
        "source": source,
        "pipeline": type(pipe).__name__,
        "steps": n,
        "call": run.call,
        "evaluation_prompts": len(run.eval_prompts),
        "calibration_prompts": len(run.cal_prompts),
        "perceptual": describe(run.perceptual),
    }
    run.generate(run.eval_prompts[:1], EVAL_SEED)  # warm-up: first calls pick kernels, fill caches
    points = [run.measure("uncached", "", contextlib.nullcontext)]
    if "error" in points[0]:
        report["points"] = points
        return report
    if run.perceptual.clip is not None:
        report["uncached_clip_score"] = points[0].get("clip_score")

    start = time.perf_counter()
    lookahead = args.lookahead or math.ceil(1 / min(args.fractions))  # long enough reuse runs for the budget
    forecast, report["calibration_memory"] = calibration_memory(run, lookahead, dtype)
    cal = stepcache.calibrate(
        pipe,
        inputs=run.inputs(run.cal_prompts, CALIBRATION_SEED),
        num_inference_steps=n,
        lookahead=lookahead,
        forecast=forecast,
        progress=False,
    )
    report["lookahead"] = lookahead
    report["calibration_s"] = round(time.perf_counter() - start, 1)

    def replay() -> torch.Tensor:  # tune's samples: the calibration prompts at other seeds
        return run.generate(run.cal_prompts, TUNING_SEED, output_type="latent")

    for f in args.fractions:
        schedules = [("stepcache/optimal (type)", lambda f=f: optimal_schedule(cal, f))]
        if not args.no_tune:
            schedules.append(
                ("stepcache/tuned", lambda f=f: tune(pipe, replay, f, calibration=cal, progress=False))
            )
        for family, make in schedules:
            start = time.perf_counter()
            try:
                schedule = make()
            except Exception as e:
                points.append({"family": family, "knob": f"f={f}", "error": f"{type(e).__name__}: {e}"})
                continue
            made = round(time.perf_counter() - start, 1)
            point = run.measure(family, f"f={f}", lambda s=schedule: stepcache.cache(pipe, s))
            point["schedule_s"] = made
            points.append(point)

    if not args.no_peers:
        have = peers.available_peers()
        report["peers"] = {lib: have.get(lib) for lib in (peers.DIFFUSERS, peers.CACHE_DIT)}

        def mag_run() -> torch.Tensor:
            return run.generate(run.cal_prompts[:1], MAGCACHE_SEED, output_type="latent")

        by_family: dict[str, list[peers.PeerMethod]] = {}
        for pm in pipeline_sweeps(pipe, n):
            if have.get(pm.library):
                by_family.setdefault(f"{pm.library}/{pm.name}", []).append(pm)
        for family, pms in by_family.items():
            for pm in thin(pms, args.peer_points) if args.peer_points else pms:
                points.append(run.measure(family, pm.knob, _peer(pm, pipe, n, mag_run)))
    report["points"] = points
    report["matched"] = match(points, args.fractions)
    return report


def _peer(pm: peers.PeerMethod, pipe: Any, n: int, mag_run: Callable[[], Any]) -> Callable[[], Any]:
    return lambda: apply_to_pipeline(pm, pipe, num_inference_steps=n, calibration_run=mag_run)


def thin(items: list[Any], k: int) -> list[Any]:
    """``k`` evenly spaced items (the ends included)."""
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


# ---------------------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Real models: stepcache vs the diffusers caches and cache-dit"
        + (" (tiny random pipelines)" if report["tiny"] else ""),
        "",
        f"{report['created']} on {report['machine']['device']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
        + ". Scores against the uncached output of the same prompt and seed; seconds per output are whole "
        "pipeline calls.",
    ]
    if report["tiny"]:
        lines += ["", "Tiny random-weight pipelines: the mechanics run end to end; the numbers mean nothing."]
    for m in report["models"]:
        lines += [
            "",
            f"## {m['title']}",
            "",
            f"`{m['source']}` ({m['pipeline']}), {m['steps']} steps, "
            f"{m['evaluation_prompts']} evaluation prompts, {m['calibration_prompts']} calibration prompts.",
        ]
        mem = m.get("calibration_memory")
        if mem:
            gb = {k: f"{v / 1e9:.1f} GB" for k, v in mem.items() if k.endswith("_bytes")}
            lines.append(
                f"Calibration: lookahead {m['lookahead']}, {m['calibration_s']} s; its stored outputs (fp32) "
                f"take {gb['with_forecast_bytes']} with forecast errors, {gb['copy_only_bytes']} without"
                + (f", {gb['free_bytes']} free" if "free_bytes" in mem else "")
                + (f": {mem['note']}." if "note" in mem else ".")
            )
        missing = m["perceptual"].get("missing", {})
        for metric, why in missing.items():
            lines.append(f"{metric} skipped: {why}.")
        lines += [
            "",
            "| method | knob | compute fraction | PSNR mean / p5 / worst (dB) | SSIM | LPIPS | CLIP | s / output | speed-up | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in m.get("points", []):
            if "error" in p:
                lines.append(f"| {p['family']} | {p['knob']} | error: {p['error'][:120]} | | | | | | | |")
                continue
            lines.append(
                f"| {p['family']} | {p['knob']} | {p['compute_fraction']:.3f} | {p['mean_db']:.2f} / {p['p5_db']:.2f} / "
                f"{p['worst_db']:.2f} | {p['ssim']:.4f} | {p.get('lpips', '')} | {p.get('clip_score', '')} | "
                f"{p['s_per_output']:.3f} | {p['speedup']:.2f} | {p['peak_memory_mib']} |"
            )
        if m.get("matched"):
            lines += [
                "",
                "At each compute fraction, the best measured point within 0.02 of it (PSNR mean / p5, dB; nothing interpolated):",
                "",
                "| fraction | best stepcache | best peer | margin (mean / p5) |",
                "|---|---|---|---|",
            ]
            for row in m["matched"]:
                ours, theirs = row.get("stepcache"), row.get("peer")
                margin = (
                    f"{row['margin_mean_db']:+.2f} / {row['margin_p5_db']:+.2f}"
                    if row.get("margin_mean_db") is not None
                    else ""
                )
                lines.append(f"| {row['target']} | {_cell(ours)} | {_cell(theirs)} | {margin} |")
    return "\n".join(lines) + "\n"


def _cell(v: dict[str, Any] | None) -> str:
    return f"{v['family']}: {v['mean_db']:.2f} / {v['p5_db']:.2f}" if v else "none in range"


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_models.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "real_models.md").write_text(markdown(report))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {', '.join(MODELS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny random pipelines on the CPU (a smoke run)")
    ap.add_argument("--out", type=Path, default=Path("real-models"), help="folder for real_models.{json,md}")
    ap.add_argument(
        "--path", action="append", default=[], metavar="MODEL=FOLDER", help="a local copy of MODEL"
    )
    ap.add_argument("--prompts", type=int, help="evaluation prompts (default 8; tiny 2)")
    ap.add_argument(
        "--calibration-prompts", type=int, help="calibration and tuning prompts (default 4; tiny 2)"
    )
    ap.add_argument("--prompt-file", type=Path, default=PROMPTS)
    ap.add_argument("--steps", type=int, help="denoising steps (default: each model's; tiny 8)")
    ap.add_argument(
        "--call",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pipeline keyword for every call, e.g. num_frames=81 (VALUE read as JSON when it parses)",
    )
    ap.add_argument(
        "--lookahead",
        type=int,
        help="calibration lookahead (default: 1 / the smallest fraction, rounded up); calibration holds "
        "2 x lookahead + 1 outputs per component and guidance branch on the device",
    )
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument(
        "--quick", action="store_true", help="two points per peer family instead of the full sweeps"
    )
    ap.add_argument(
        "--peer-points", type=int, help="this many points per peer family (evenly spaced in its sweep)"
    )
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument(
        "--no-tune",
        action="store_true",
        help="optimal_schedule only (tune replays ~20 generations per fraction)",
    )
    ap.add_argument("--device", help="default: cuda when available (tiny: cpu)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}: choose among {', '.join(MODELS)}")
    if not args.models:
        if not args.tiny:
            ap.error(f"name at least one model: {', '.join(MODELS)}")
        args.models = list(TINY_DEFAULT)
    args.paths = {}
    for item in args.path:
        key, sep, folder = item.partition("=")
        if not sep or key not in MODELS:
            ap.error(f"--path takes MODEL=FOLDER with MODEL one of {', '.join(MODELS)}, got {item!r}")
        args.paths[key] = folder
    calls = {}
    for item in args.call:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--call takes KEY=VALUE, got {item!r}")
        try:
            calls[key] = json.loads(value)
        except json.JSONDecodeError:
            calls[key] = value
    args.call = calls
    if args.peer_points is None and args.quick:
        args.peer_points = 2
    args.prompts = args.prompts or (2 if args.tiny else 8)
    args.calibration_prompts = args.calibration_prompts or (2 if args.tiny else 4)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import diffusers

    have = peers.available_peers()
    report: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "fractions": args.fractions,
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "python": platform.python_version(),
        },
        "versions": {
            "stepcache": stepcache.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            peers.CACHE_DIT: have.get(peers.CACHE_DIT),
        },
        "models": [],
    }
    for key in args.models:
        report["models"].append(run_model(key, args, device, dtype))
        write(report, args.out)
    write(report, args.out)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
