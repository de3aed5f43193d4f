"""Plots (matplotlib is imported here only, on first use)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._io import atomic_write
from .errors import StepCacheError

if TYPE_CHECKING:
    from .calibration import Calibration

_COLORS = {"attn": "tab:blue", "cross_attn": "tab:green", "ff": "tab:orange", "block": "tab:purple"}


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise StepCacheError("plots need matplotlib: pip install 'stepcache[plot]'.") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_format(path: str | Path) -> str:
    """The image format ``path`` asks for (its suffix; none: PNG), checked against what matplotlib
    writes, so a bad plot path fails before any work is done."""
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix[1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise StepCacheError(
            f"cannot write a plot to {path}: .{fmt} is not an image format; use one of "
            f"{', '.join('.' + f for f in sorted(supported))}."
        )
    return fmt


def save_figure(fig: Any, path: str | Path, *, dpi: int) -> Path:
    """Write ``fig`` to ``path`` atomically (a failed write leaves an existing file as it was) and close it."""
    plt = pyplot()
    try:
        fmt = plot_format(path)
        return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi), what="plot")
    finally:
        plt.close(fig)


def plot_calibration(cal: Calibration, path: Path, *, schedule: Any = None) -> Path:
    """Per-type error curves (1-step change solid, longer distances fainter); with a schedule, its
    alpha as a dashed line and one compute/reuse strip per schedule entry underneath."""
    plt = pyplot()
    plot_format(path)  # before drawing: a bad suffix is an error, not a wasted figure
    tables = cal.type_errors()
    strips = list(schedule.plans.items()) if schedule is not None else []
    heights = [4.0] + ([0.35 * len(strips) + 0.4] if strips else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(8, sum(heights)), height_ratios=heights, squeeze=False)
    ax = axes[0][0]
    steps = np.arange(cal.num_steps)
    for kind, table in tables.items():
        for j in range(cal.lookahead):
            ax.plot(
                steps,
                table[:, j],
                color=_COLORS.get(kind, "gray"),
                alpha=1.0 if j == 0 else 0.45 / j,
                lw=1.8 if j == 0 else 1.0,
                label=kind if j == 0 else None,
            )
    alpha = schedule.meta.get("alpha") if schedule is not None else None
    if alpha is not None:
        ax.axhline(alpha, color="black", ls="--", lw=1, label=f"alpha = {alpha:.3g}")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, cal.num_steps - 0.5)
    ax.set_ylabel("relative L1 change")
    ax.set_title(
        f"{cal.meta.get('model_class', 'model')}: change vs 1..{cal.lookahead} steps earlier "
        f"({cal.num_samples} sample(s), {cal.meta.get('scheduler') or 'scheduler ?'})",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    if strips:
        sax = axes[1][0]
        grid = np.array([plan for _, plan in strips], dtype=float)
        sax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
        sax.set_yticks(range(len(strips)), [k for k, _ in strips], fontsize=8)
        sax.set_xlim(-0.5, cal.num_steps - 0.5)
        sax.set_xlabel(f"denoising step (dark = compute; compute fraction {schedule.compute_fraction:.2f})")
    else:
        ax.set_xlabel("denoising step")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
