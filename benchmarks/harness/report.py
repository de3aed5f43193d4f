"""Run the suites, write ``bench.json`` (validated against ``schema.json``), ``bench.md`` and plots."""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from stepcache.errors import StepCacheError

from . import peers
from .quality import QualityConfig
from .speed import SpeedConfig

_FORMAT = "stepcache.bench"
SCHEMA = Path(__file__).with_name("schema.json")


@dataclass
class BenchConfig:
    """What ``benchmarks/bench.py`` runs. ``quick`` shrinks everything to a smoke run (CI)."""

    out: Path = Path("bench-results")
    suites: tuple[str, ...] = ("quality", "speed")
    quick: bool = False
    peers: bool = True
    threads: int | None = None
    quality: QualityConfig = field(default_factory=QualityConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self) -> None:
        unknown = set(self.suites) - {"quality", "speed"}
        if unknown or not self.suites:
            raise StepCacheError(f"suites must be among 'quality' and 'speed', got {list(self.suites)}.")
        if self.quick:
            self.quality = QualityConfig(
                samplers=(("ddim", 6),),
                samples=10,
                fd_samples=20,
                matched=(0.5,),
                tolerance=0.2,
                fractions=(0.5, 0.7),
                alphas=(0.1, 0.3),
                peers=self.peers,
                batch=10,
                fd_families=("stepcache/tuned", "baseline/FORA+forecast", "diffusers/TaylorSeer"),
            )
            self.speed = SpeedConfig(
                shapes=("tiny",), steps=6, batch=1, fractions=(0.5,), repeats=1, peers=self.peers
            )
        else:
            self.quality = QualityConfig(**{**self.quality.__dict__, "peers": self.peers})
            self.speed = SpeedConfig(**{**self.speed.__dict__, "peers": self.peers})


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def validate(report: Any) -> None:
    """Raise ``StepCacheError`` if ``report`` does not follow ``schema.json``."""
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    try:
        jsonschema.validate(report, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise StepCacheError(f"bench report does not follow its schema at {where}: {e.message}") from None


def run_bench(cfg: BenchConfig, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the chosen suites and write ``bench.json``, ``bench.md`` and ``frontier-*.png`` to ``cfg.out``."""
    from . import quality, speed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    have = peers.available_peers() if cfg.peers else {}
    skipped = [
        f"{lib}: not installed ({peers.INSTALL_HINT})"
        for lib in peers.LIBRARIES
        if cfg.peers and not have.get(lib)
    ]
    if not cfg.peers:
        skipped.append("all peers: --no-peers")
    for line in skipped:
        progress(f"[bench] skipped {line}")
    report: dict[str, Any] = {
        "format": _FORMAT,
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "quick": cfg.quick,
        "threads": torch.get_num_threads(),
        "versions": {
            "stepcache": _version("stepcache"),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "cache-dit": _version("cache-dit"),
            "dit-smoothcache": _version("dit-smoothcache"),
            "python": platform.python_version(),
        },
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "unsupported": peers.unsupported_peers(),
        "skipped": skipped,
    }
    if "quality" in cfg.suites:
        report["quality"] = quality.run_suite(cfg.quality, progress=progress)
        _write(cfg.out, report)
    if "speed" in cfg.suites:
        report["speed"] = speed.run_suite(cfg.speed, progress=progress)
    _write(cfg.out, report)
    return report


def rerun_families(
    cfg: BenchConfig, families: tuple[str, ...], *, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Re-run some suite-A families into an existing ``cfg.out/bench.json`` (after changing one
    method), recording what was re-run and when; everything else stays from the earlier run."""
    from . import quality

    path = cfg.out / "bench.json"
    report = json.loads(path.read_text())
    validate(report)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report["quality"] = quality.run_suite(
        cfg.quality, progress=progress, only=families, previous=report["quality"]
    )
    report.setdefault("reruns", []).append(
        {
            "families": list(families),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "note": "same model, seeds and samplers; a point of the earlier run was replayed and reproduced "
            "its PSNR exactly before merging; wall times of re-run points come from the re-run",
        }
    )
    _write(cfg.out, report)
    return report


def _dump(report: dict[str, Any]) -> str:
    """Indented JSON with each list of numbers kept on one line (readable, diffable results)."""
    text = json.dumps(report, indent=2, allow_nan=False)
    one_line = re.sub(
        r"\[\s+([-\d.eE+,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text
    )
    return one_line + "\n"


def _write(out: Path, report: dict[str, Any]) -> None:
    validate(report)
    (out / "bench.json").write_text(_dump(report))
    (out / "bench.md").write_text(markdown(report))
    if "quality" in report:
        plot_frontier(report, out)


def _best_per_family(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    fam: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if "error" not in p:
            fam.setdefault(f"{p['library']}/{p['method']}", []).append(p)
    return {k: sorted(v, key=lambda p: p["compute_fraction"]) for k, v in fam.items()}


def frontier(points: list[dict[str, Any]], fraction: float) -> dict[str, float | None]:
    """Per family: the best PSNR among its points with compute fraction <= ``fraction`` (+0.005)."""
    out: dict[str, float | None] = {}
    for family, pts in _best_per_family(points).items():
        ok = [p["psnr_db"] for p in pts if p["compute_fraction"] <= fraction + 0.005]
        out[family] = max(ok) if ok else None
    return out


def markdown(report: dict[str, Any]) -> str:
    v = report["versions"]
    lines = [
        "# stepcache bench" + (" (quick smoke run)" if report["quick"] else ""),
        "",
        f"Ran {report['created']} on {report['machine']}, {report.get('threads')} threads; "
        + ", ".join(f"{k} {val or 'not installed'}" for k, val in v.items())
        + ".",
        "",
    ]
    for line in report["skipped"]:
        lines.append(f"- skipped: {line}")
    for r in report.get("reruns", []):
        lines.append(f"- re-run {r['created']}: {', '.join(r['families'])} ({r['note']})")
    q = report.get("quality")
    if q:
        lines += [
            "## Suite A: quality on the reference model",
            "",
            "PSNR / SSIM against the uncached samples of the same seeds; compute fraction = attention and "
            "feed-forward computations executed / possible, counted the same way for every method. "
            f"FD floor (real held-out vs real train): {q['fd_floor']:.2f}.",
            "",
        ]
        grid = (0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8)
        for s in q["samplers"]:
            lines += [
                f"### {s['scheduler']} {s['steps']} steps, {s['samples']} samples (uncached {s['uncached_wall_s']:.1f} s)",
                "",
                "Best PSNR (dB) at compute fraction <= f, per method:",
                "",
                "| method | " + " | ".join(f"{f:g}" for f in grid) + " |",
                "|---|" + "---|" * len(grid),
            ]
            table = {f: frontier(s["points"], f) for f in grid}
            for family in _best_per_family(s["points"]):
                cells = [table[f][family] for f in grid]
                lines.append(
                    f"| {family} | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |"
                )
            lines += ["", "At the matched fractions (FD on the larger sample set):", ""]
            lines += [
                "| target | method | setting | fraction | speed-up | PSNR | SSIM | FD [95% interval] | accuracy |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for m in s["matched"]:
                fd = (
                    f"{m['fd']:.2f} [{m['fd_interval'][0]:.2f}, {m['fd_interval'][1]:.2f}]"
                    if "fd" in m
                    else ""
                )
                acc = f"{m['class_accuracy']:.3f}" if "class_accuracy" in m else ""
                if "note" in m:
                    lines.append(
                        f"| {m['target']} | {m['library']}/{m['method']} | {m['note']} | | | | | | |"
                    )
                    continue
                frac = f"{m['compute_fraction']:.3f}" if "compute_fraction" in m else ""
                sp = f"{m['speedup']:.2f}x" if "speedup" in m else ""
                ps = f"{m['psnr_db']:.2f}" if "psnr_db" in m else ""
                ss = f"{m['ssim']:.4f}" if "ssim" in m else ""
                target = "-" if m["target"] is None else f"{m['target']:g}"
                lines.append(
                    f"| {target} | {m['library']}/{m['method']} | {m.get('knob', '')} | {frac} | {sp} | {ps} | {ss} | {fd} | {acc} |"
                )
            ident = [p for p in s["points"] if "bit_identical_to_stepcache" in p]
            if ident:
                same = sum(p["bit_identical_to_stepcache"] for p in ident)
                lines += [
                    "",
                    f"dit-smoothcache vs stepcache on the same schedules: {same}/{len(ident)} bit-identical.",
                ]
            lines.append("")
    sp = report.get("speed")
    if sp:
        lines += ["## Suite B: speed at realistic shapes", ""]
        for shape in sp["shapes"]:
            lines += [
                f"### {shape['shape']}: {shape['steps']}-step DDIM, guidance {shape['guidance']}, "
                f"median of {shape['repeats']}; cached components hold {shape['component_share_of_macs']:.1%} of the MACs",
                "",
                "| method | target | fraction | median s | speed-up | ideal | speed-up / ideal | peak memory MiB |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in shape["rows"]:
                t = "" if r["target_fraction"] is None else f"{r['target_fraction']:g}"
                lines.append(
                    f"| {r['method']} | {t} | {r['compute_fraction']:.3f} | {r['median_s']:.2f} | {r['speedup']:.3f}x | "
                    f"{r['ideal_speedup']:.3f}x | {r['speedup_vs_ideal']:.3f} | {'n/a' if r['peak_memory_mib'] is None else r['peak_memory_mib']} |"
                )
            lines.append("")
    if report["unsupported"]:
        lines += ["## Could not run", ""]
        lines += [f"- {k}: {v}" for k, v in report["unsupported"].items()]
    return "\n".join(lines) + "\n"


def plot_frontier(report: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per sampler: PSNR vs compute fraction and vs measured speed-up, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepcache.plots import save_figure

    paths = []
    for s in report["quality"]["samplers"]:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
        families = _best_per_family(s["points"])
        colors = plt.get_cmap("tab20").colors
        finite = [p["psnr_db"] for pts in families.values() for p in pts if p["psnr_db"] < 100]
        for k, (family, pts) in enumerate(families.items()):
            ours = family.startswith("stepcache/")
            style = {
                "lw": 2.2 if ours else 1.2,
                "ls": "-" if ours else "--",
                "marker": "o",
                "ms": 3.5,
                "color": colors[k % len(colors)],
            }
            axes[0].plot(
                [p["compute_fraction"] for p in pts], [p["psnr_db"] for p in pts], label=family, **style
            )
            by_speed = sorted(pts, key=lambda p: p["speedup"])
            axes[1].plot([p["speedup"] for p in by_speed], [p["psnr_db"] for p in by_speed], **style)
        axes[0].set_xlabel("compute fraction (attention + feed-forward calls executed)")
        axes[1].set_xlabel("measured speed-up over uncached")
        axes[0].set_ylabel("PSNR vs uncached (dB; identical samples drawn at the top)")
        axes[0].set_ylim(min(finite, default=0) - 2, max(finite, default=60) + 4)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle(f"Reference DiT, {s['scheduler']} {s['steps']} steps, {s['samples']} samples")
        fig.legend(loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.14, 1, 0.95))
        path = out / f"frontier-{s['scheduler']}-{s['steps']}.png"
        save_figure(fig, path, dpi=110)
        paths.append(path)
    return paths
