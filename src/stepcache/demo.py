"""``stepcache demo``: speed and quality of SmoothCache on the shipped reference model, offline.

Generates the same seeds for every class without cache and with two SmoothCache schedules (one by
alpha, one by compute fraction), then writes ``grid.png`` (uncached | cached | amplified
difference, per class), ``curves.png`` (calibration error curves with alpha and the schedule) and
``report.json``, and prints a table: wall time, speed-up, compute fraction, PSNR and SSIM against
the uncached images, Fréchet distance to real held-out digits (with the real-vs-real noise floor),
and class accuracy by the shipped classifier.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics, reference
from ._io import atomic_write, check_output
from ._version import __version__
from .plots import pyplot, save_figure
from .policies import for_compute_fraction, from_calibration
from .reference import (
    ReferencePipeline,
    calibrate_reference,
    check_scheduler_fits,
    model_key,
    shipped_calibration,
)
from .runtime import cache

__all__ = ["DEFAULT_ALPHA", "DemoConfig", "run_demo"]

logger = logging.getLogger(__name__)

_MODEL_TITLES = {
    "ddpm": "stepcache reference DiT (16x16 digits)",
    "flow": "stepcache reference DiT, flow matching (16x16 digits, dit_digits_flow)",
}

# The threshold the reference model's card reports results for (src/stepcache/reference/MODEL_CARD.md).
DEFAULT_ALPHA = 0.1


@dataclass
class DemoConfig:
    out: Path = Path("stepcache-demo")
    #: ``"ddpm"`` (the default reference model) or ``"flow"`` (the flow-matching one).
    model: str = "ddpm"
    #: ``None``: the model's default sampler (``ddim`` for ddpm, ``flow-euler`` for flow).
    scheduler: str | None = None
    steps: int = 50
    per_class: int = 20
    classes: list[int] = field(default_factory=lambda: list(range(10)))
    alpha: float = DEFAULT_ALPHA
    compute_fraction: float = 0.5
    guidance_scale: float | None = None
    seed: int = 0
    calibration_samples: int = 8
    progress: bool = True


def _grid(
    columns: list[tuple[str, torch.Tensor]], labels: torch.Tensor, classes: list[int], per_row: int
) -> np.ndarray:
    """Rows = classes; column groups = variants, ``per_row`` images each; 1-pixel gutters."""
    rows = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()[:per_row]
        groups = []
        for _, imgs in columns:
            tiles = [np.pad(imgs[i, 0].numpy(), 1, constant_values=1.0) for i in idx]
            groups.append(np.concatenate(tiles, axis=1))
            groups.append(np.ones((groups[-1].shape[0], 4)))
        rows.append(np.concatenate(groups[:-1], axis=1))
    return np.concatenate(rows, axis=0)


def _plot_grid(
    path: Path, columns: list[tuple[str, torch.Tensor]], labels: torch.Tensor, classes: list[int]
) -> None:
    plt = pyplot()
    per_row = 4
    # Images in [-1, 1] -> [0, 1]; differences amplified x10 and shown as |diff| on the same scale.
    shown = [
        (name, imgs.clamp(-1, 1) * 0.5 + 0.5 if "diff" not in name else imgs.abs().clamp(0, 1))
        for name, imgs in columns
    ]
    grid = _grid(shown, labels, classes, per_row)
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 1, 0.5 * len(classes) + 1))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    tile = 18
    group_w = per_row * tile + 4
    ax.set_xticks(
        [group_w * i + per_row * tile / 2 for i in range(len(columns))], [n for n, _ in columns], fontsize=7
    )
    ax.set_yticks([tile * i + tile / 2 for i in range(len(classes))], [str(c) for c in classes], fontsize=7)
    ax.tick_params(length=0)
    ax.set_title("per class: uncached | cached | |difference| x 10", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``cfg.out / "report.json"``)."""
    check_output(cfg.out, "demo output folder", folder=True)
    model = model_key(cfg.model)
    scheduler = check_scheduler_fits(model, cfg.scheduler or reference.default_scheduler(model))
    guidance = reference.DEFAULT_GUIDANCE_SCALE if cfg.guidance_scale is None else cfg.guidance_scale
    cal = shipped_calibration(scheduler, cfg.steps)
    cal_source = f"shipped ({scheduler}-{cfg.steps}.json)"
    # A calibration holds for the guidance it was recorded with: guidance changes the trajectories.
    if cal is None or cal.meta.get("guidance_scale") != guidance:
        logger.info("no shipped calibration for %s/%d steps: calibrating", scheduler, cfg.steps)
        cal = calibrate_reference(
            scheduler,
            cfg.steps,
            cfg.calibration_samples,
            guidance_scale=guidance,
            progress=cfg.progress,
            model=model,
        )
        cal_source = f"calibrated now ({cfg.calibration_samples} samples)"
    schedules = {
        f"alpha={cfg.alpha:g}": from_calibration(cal, cfg.alpha),
        f"fraction={cfg.compute_fraction:g}": for_compute_fraction(cal, cfg.compute_fraction),
    }
    cal.plot(cfg.out / "curves.png", schedule=schedules[f"alpha={cfg.alpha:g}"])

    pipe = ReferencePipeline(scheduler, guidance, model=model)
    labels = torch.tensor([c for c in cfg.classes for _ in range(cfg.per_class)])

    def generate() -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        images = pipe(labels, num_inference_steps=cfg.steps, seed=cfg.seed, progress=cfg.progress)
        return images, time.perf_counter() - start

    pipe(labels[:2], num_inference_steps=2)  # warm-up, so the first timing is not penalised
    images, times, fractions, stats = {}, {}, {}, {}
    images["uncached"], times["uncached"] = generate()
    fractions["uncached"] = 1.0
    for name, sched in schedules.items():
        with cache(pipe, sched, count_macs=True) as handle:
            images[name], times[name] = generate()
        fractions[name] = handle.stats.compute_fraction
        stats[name] = handle.stats.as_dict()

    classifier = reference.load_classifier()
    real_test, _ = reference.load_digits("test")
    real_train, _ = reference.load_digits("train")
    floor = metrics.frechet_distance(real_test, real_train, classifier)
    variants: dict[str, Any] = {}
    base = images["uncached"]
    for name, imgs in images.items():
        fd, (lo, hi) = metrics.frechet_distance_bootstrap(
            real_test, imgs, classifier, n_boot=100, seed=cfg.seed
        )
        row: dict[str, Any] = {
            "wall_s": round(times[name], 3),
            "speedup": round(times["uncached"] / times[name], 3),
            "compute_fraction": round(fractions[name], 4),
            "fd": round(fd, 4),
            "fd_interval": [round(lo, 4), round(hi, 4)],
            "class_accuracy": round(metrics.class_accuracy(imgs, labels, classifier), 4),
        }
        if name != "uncached":
            row["psnr_db"] = round(metrics.psnr(imgs, base), 3)
            row["ssim"] = round(metrics.ssim(imgs, base), 4)
            row["alpha"] = schedules[name].meta.get("alpha")
            row["schedule"] = {k: "".join(map(str, v)) for k, v in schedules[name].plans.items()}
            row["stats"] = stats[name]
        variants[name] = row

    columns: list[tuple[str, torch.Tensor]] = [("uncached", base)]
    for name in schedules:
        columns += [(name, images[name]), (f"diff {name}", (images[name] - base) * 10)]
    _plot_grid(cfg.out / "grid.png", columns, labels, cfg.classes)

    report = {
        "stepcache_version": __version__,
        "model": _MODEL_TITLES[model],
        "scheduler": scheduler,
        "steps": cfg.steps,
        "guidance_scale": guidance,
        "classes": cfg.classes,
        "samples": len(labels),
        "seed": cfg.seed,
        "calibration": cal_source,
        "fd_noise_floor": round(floor, 4),
        "variants": variants,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    import json

    atomic_write(cfg.out / "report.json", json.dumps(report, indent=2) + "\n", what="demo report")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The printed table."""
    head = (
        f"{'variant':<15}{'wall s':>8}{'speed-up':>10}{'compute':>9}{'PSNR dB':>9}{'SSIM':>7}"
        f"{'FD':>9}{'FD 95% interval':>19}{'accuracy':>10}"
    )
    lines = [
        f"stepcache demo: {report['samples']} samples, {report['scheduler']} {report['steps']} steps, "
        f"guidance {report['guidance_scale']}, calibration {report['calibration']}",
        head,
        "-" * len(head),
    ]
    for name, v in report["variants"].items():
        psnr = f"{v['psnr_db']:.2f}" if "psnr_db" in v else "-"
        ssim = f"{v['ssim']:.3f}" if "ssim" in v else "-"
        interval = f"[{v['fd_interval'][0]:.2f}, {v['fd_interval'][1]:.2f}]"
        lines.append(
            f"{name:<15}{v['wall_s']:>8.2f}{v['speedup']:>9.2f}x{v['compute_fraction']:>9.2f}{psnr:>9}{ssim:>7}"
            f"{v['fd']:>9.2f}{interval:>19}{v['class_accuracy']:>10.3f}"
        )
    lines.append(f"FD noise floor (real held-out vs real train): {report['fd_noise_floor']:.2f}")
    return "\n".join(lines)
