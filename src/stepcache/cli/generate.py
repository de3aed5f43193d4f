"""``stepcache generate MODEL``: the one line on the command line. Generate with caching that calibrates
itself (the first generation of a kind is recorded uncached and remembered in ``$STEPCACHE_HOME``),
write the image, and with ``--compare`` time an uncached run of the same seed and write both side by
side."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from .._io import atomic_write
from ..api import cache
from ..auto import AutoPlanner
from ..errors import StepCacheError
from ..metrics import psnr
from ..policies import check_fraction
from ..runtime.config import DEFAULT_COMPUTE_FRACTION
from ..store import describe
from . import _targets
from ._common import check_outputs, checked, fail, relay_warnings
from ._targets import GuidanceOpt, ModelArg, PromptOpt, ReferenceModelOpt, SchedulerOpt, SeedOpt

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
_MIN_SIDE = 128  # small images (the reference model's 16x16 digits) are enlarged to at least this


def generate(
    model: ModelArg,
    prompt: PromptOpt = None,
    compute_fraction: Annotated[
        float,
        typer.Option(help="Share of component calls to execute.", callback=checked(check_fraction)),
    ] = DEFAULT_COMPUTE_FRACTION,
    out: Annotated[Path, typer.Option("--out", "-o", help="Image to write (.png, .jpg, .webp).")] = Path(
        "out.png"
    ),
    compare: Annotated[
        bool,
        typer.Option(
            help="Also run uncached with the same seed: print time, speed-up and PSNR, and write "
            "OUT-compare.png (uncached | cached | difference x10)."
        ),
    ] = False,
    steps: Annotated[int, typer.Option(min=2, max=1000, help="Denoising steps.")] = 50,
    calibration_runs: Annotated[
        int,
        typer.Option(min=1, max=100, help="Generations recorded before caching, when none is stored."),
    ] = 1,
    scheduler: SchedulerOpt = None,
    reference_model: ReferenceModelOpt = None,
    guidance_scale: GuidanceOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Generate one image with caching that calibrates itself: the first generation of each kind (model,
    scheduler, steps, guidance, size) runs uncached and is recorded in $STEPCACHE_HOME; the next ones
    are cached."""
    if out.suffix.lower() not in _FORMATS:
        fail(f"--out {out}: give an image file name ending in {', '.join(_FORMATS)}.")
    side = out.with_name(f"{out.stem}-compare{out.suffix}")
    check_outputs((out, "image (--out)"), (side if compare else None, "comparison image"))
    scheduler = _targets.scheduler_for(model, scheduler, reference_model)
    try:
        with relay_warnings():
            target = _targets.load_target(
                model, scheduler=scheduler, reference_model=reference_model or "ddpm"
            )
            inputs = _targets.inputs_for(target, 1, prompt or [], seed, guidance_scale)
            run = _targets.replay(target, inputs, seed, steps)
            seconds, cached = _cached(target, run, compute_fraction, calibration_runs)
            _save(out, [cached])
            typer.echo(f"wrote {out}")
            if compare:
                base_seconds, base = _timed(run)  # after the cached run: any warm-up went to it
                speed = base_seconds / seconds if seconds > 0 else float("inf")
                a, b = _unit(base), _unit(cached)
                quality = psnr(a * 2 - 1, b * 2 - 1)
                typer.echo(
                    f"uncached {base_seconds:.2f} s, cached {seconds:.2f} s: speed-up {speed:.2f}x, "
                    f"PSNR {quality:.1f} dB against uncached (same seed)"
                )
                _save(side, [base, cached, (b - a).abs().mul(10).clamp(0, 1)])
                typer.echo(f"wrote {side} (uncached | cached | difference x10)")
    except StepCacheError as e:
        fail(e)


def _timed(run: Callable[[], Any]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    images = run()
    return time.perf_counter() - start, torch.as_tensor(images).detach().float().cpu()


def _cached(target: Any, run: Callable[[], Any], fraction: float, runs: int) -> tuple[float, torch.Tensor]:
    """One cached generation (after the calibrating ones, when nothing was stored): (seconds, images)."""
    with cache(target, compute_fraction=fraction, calibration_runs=runs) as handle:
        planner = handle.planner
        assert isinstance(planner, AutoPlanner)
        for i in range(runs + 1):
            seconds, images = _timed(run)
            last = planner.last
            if last.get("action") != "calibrate":
                break
            typer.echo(f"calibration run {i + 1}: uncached and recorded ({seconds:.2f} s)")
        key = last.get("key") or {}
        if last.get("action") == "cache":
            typer.echo(
                f"cached {describe(key)} at compute fraction {handle.running_schedule.compute_fraction:.3f} "
                f"({seconds:.2f} s) with {last.get('source')}"
            )
        else:
            typer.echo(f"ran uncached ({seconds:.2f} s): {last.get('source') or 'no schedule for it'}")
    return seconds, images


def _unit(images: torch.Tensor) -> torch.Tensor:
    """The first image (first frame of a video) in [0, 1], as (C, H, W): pipelines give [0, 1], the
    reference model [-1, 1]."""
    x = images
    while x.dim() > 3:
        x = x[0]
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):  # (H, W, C) numpy-style
        x = x.permute(2, 0, 1)
    if float(x.min()) < -0.01:
        x = (x + 1) / 2
    return x.clamp(0, 1)


def _save(path: Path, panels: list[torch.Tensor]) -> None:
    """Write images side by side (2 px apart), enlarged when small."""
    try:
        from PIL import Image
    except ImportError:
        raise StepCacheError("writing images needs Pillow: pip install pillow.") from None
    tiles = [_unit(p) for p in panels]
    h, w = tiles[0].shape[-2:]
    scale = max(1, _MIN_SIDE // max(h, w))
    channels = 3 if any(t.shape[0] >= 3 for t in tiles) else 1
    tiles = [
        t[:channels].expand(channels, h, w).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        for t in tiles
    ]
    h, w, gap = h * scale, w * scale, 2
    canvas = torch.ones(channels, h, w * len(tiles) + gap * (len(tiles) - 1))
    for i, t in enumerate(tiles):
        canvas[:, :, i * (w + gap) : i * (w + gap) + w] = t
    array = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    atomic_write(path, lambda fh: image.save(fh, format=_FORMATS[path.suffix.lower()]), what="image")
