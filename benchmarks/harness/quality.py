"""Suite A: the speed-quality frontier of every method on the shipped reference model.

Every method runs in this process, on the same model, sampler and seeds. For each point of each
method's sweep: the compute fraction (attention and feed-forward computations actually executed,
counted the same way for every method by :func:`~benchmarks.harness.peers.count_component_calls`),
wall time, and PSNR / SSIM against the uncached samples of the same seeds. At the matched fractions,
the point of each method nearest to the target is re-run on ``fd_samples`` samples for the Fréchet
distance to real held-out digits (with a bootstrap interval and the real-vs-real floor) and class
accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from stepcache import Calibration, Schedule, metrics, reference
from stepcache.errors import ScheduleError
from stepcache.policies import for_compute_fraction, fora, from_calibration, optimal_schedule, tune
from stepcache.runtime import cache

from . import peers

logger = logging.getLogger(__name__)

STEPCACHE = "stepcache"
BASELINE = "baseline"


@dataclass(frozen=True)
class QualityConfig:
    """Settings of suite A.

    Attributes:
        samplers: ``(scheduler, steps)`` pairs; the shipped calibrations cover ddim-50 and dpm-20.
        samples: images per sweep point (all classes, equally), for PSNR/SSIM.
        fd_samples: images per method at each matched fraction, for FD and accuracy (0 = skip).
        matched: compute fractions at which methods are compared on FD.
        tolerance: a method's nearest sweep point must lie this close to a matched fraction.
        fractions: budgets of stepcache's fraction-driven policies.
        alphas: thresholds of the SmoothCache rule.
        peers: also run the peer libraries that are installed.
        lean: trim the longest peer sweeps (PAB, FasterCache) to two points.
        tuning_samples: calibration images (other seeds than the evaluation's) the tuned policy replays.
        fd_families: restrict the FD runs to these ``library/method`` families (None = all).
        fd_samplers: run FD only for these ``scheduler-steps`` (None = all).
        seed: noise seed (the same for every method).
        batch: images per model call.
    """

    samplers: tuple[tuple[str, int], ...] = (("ddim", 50), ("dpm", 20))
    samples: int = 200
    fd_samples: int = 2000
    matched: tuple[float, ...] = (0.5, 0.35)
    tolerance: float = 0.06
    fractions: tuple[float, ...] = (0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8)
    alphas: tuple[float, ...] = (0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)
    peers: bool = True
    seed: int = 0
    batch: int = 500
    lean: bool = True
    tuning_samples: int = 20
    fd_families: tuple[str, ...] | None = None
    fd_samplers: tuple[str, ...] | None = None


@dataclass
class Method:
    """One method at one knob setting: a context manager factory that makes the model cached."""

    library: str
    name: str
    knob: str
    enter: Callable[[], contextlib.AbstractContextManager[Any]]
    schedule: Schedule | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return f"{self.library}/{self.name}"


def stepcache_methods(
    model: torch.nn.Module, cal: Calibration, cfg: QualityConfig, tuning_run: Callable[[], Any] | None = None
) -> list[Method]:
    """Our policies and the static baselines, each as a sweep (``tuned`` needs ``tuning_run``)."""
    steps = cal.num_steps
    out: list[Method] = []

    def add(library: str, name: str, knob: str, sched: Schedule) -> None:
        out.append(Method(library, name, knob, lambda s=sched: cache(model, s), schedule=sched))

    for interval in (i for i in (2, 3, 4) if i < steps):
        add(BASELINE, "FORA", f"interval={interval}", fora(steps, interval))
        add(BASELINE, "FORA+forecast", f"interval={interval}", fora(steps, interval, forecast=True))
    for granularity in ("type", "layer"):
        for alpha in cfg.alphas if granularity == "type" else cfg.alphas[::2]:
            add(
                STEPCACHE,
                f"SmoothCache ({granularity})",
                f"alpha={alpha:g}",
                from_calibration(cal, alpha, granularity=granularity),
            )
    for frac in cfg.fractions:
        sparse = frac in cfg.matched or frac in cfg.fractions[::2]  # fewer points for the secondary variants
        # ScheduleError: out of reach for this lookahead; skip the point.
        with contextlib.suppress(ScheduleError):
            if sparse:
                add(
                    STEPCACHE,
                    "SmoothCache by fraction",
                    f"fraction={frac:g}",
                    for_compute_fraction(cal, frac),
                )
        if tuning_run is not None:
            sched = tune(model, tuning_run, frac, calibration=cal, progress=False)
            add(STEPCACHE, "tuned", f"fraction={frac:g}", sched)
            out[-1].info["tuning_runs"] = sched.meta["tuning"]["runs"]
        for granularity in ("type", "layer") if sparse else ("type",):
            with contextlib.suppress(ScheduleError):
                add(
                    STEPCACHE,
                    f"optimal ({granularity})",
                    f"fraction={frac:g}",
                    optimal_schedule(cal, frac, granularity=granularity),
                )
    return out


def peer_methods(
    model: torch.nn.Module, cal: Calibration, cfg: QualityConfig, run: Callable[[], Any]
) -> list[Method]:
    """Installed peers with their sweeps; the original SmoothCache package gets our SmoothCache schedules."""
    steps = cal.num_steps
    depth = len(model.transformer_blocks)
    have = peers.available_peers()
    out: list[Method] = []
    for pm in peers.peer_sweeps(steps, depth):
        if not have.get(pm.library) or not _keep(pm, cfg):
            continue
        out.append(
            Method(
                pm.library,
                pm.name,
                pm.knob,
                lambda pm=pm: peers.apply_peer(pm, model, num_inference_steps=steps, calibration_run=run),
            )
        )
    if have.get(peers.SMOOTHCACHE):
        for alpha in cfg.alphas:
            sched = from_calibration(cal, alpha, granularity="type")
            pm = peers.PeerMethod(
                peers.SMOOTHCACHE,
                "SmoothCacheHelper",
                f"alpha={alpha:g}",
                {"schedule": sched.to_smoothcache()},
            )
            out.append(
                Method(
                    pm.library,
                    pm.name,
                    pm.knob,
                    lambda pm=pm: peers.apply_peer(pm, model, num_inference_steps=steps),
                    schedule=sched,
                )
            )
    return out


def _keep(pm: peers.PeerMethod, cfg: QualityConfig) -> bool:
    """Trim the peers' full sweeps to what fits a CPU run: one Fn/Bn split for cache-dit (F1B0, the
    split its docs recommend for shallow models), two points each of PAB and FasterCache when lean."""
    if pm.library == peers.CACHE_DIT:
        return pm.knob.startswith("F1B0")
    if cfg.lean and pm.name in ("PAB", "FasterCache"):
        return pm.knob.endswith(("=2", "=4"))
    return True


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % reference.NUM_CLASSES


def generate(
    model: torch.nn.Module, scheduler: str, steps: int, n: int, seed: int, batch: int
) -> torch.Tensor:
    """``n`` images of all classes in batches; batch ``i`` uses seed ``seed + i`` (the same for every method)."""
    labels = _labels(n)
    outs = []
    for i, start in enumerate(range(0, n, batch)):
        outs.append(
            reference.sample(
                model,
                labels[start : start + batch],
                scheduler=scheduler,
                num_inference_steps=steps,
                seed=seed + i,
            )
        )
    return torch.cat(outs)


@contextlib.contextmanager
def _measured(model: torch.nn.Module, method: Method | None) -> Iterator[Callable[[], dict[str, Any]]]:
    with peers.count_component_calls(model) as counts:
        if method is None:
            yield counts
        else:
            with method.enter():
                yield counts


def run_point(
    model: torch.nn.Module, method: Method | None, scheduler: str, steps: int, n: int, cfg: QualityConfig
) -> tuple[torch.Tensor, float, float]:
    """(images, wall seconds, compute fraction) of one method at one setting."""
    with _measured(model, method) as counts:
        start = time.perf_counter()
        images = generate(model, scheduler, steps, n, cfg.seed, cfg.batch)
        wall = time.perf_counter() - start
        frac = float(counts()["fraction"])
    return images, wall, frac


def replay_runs(
    model: torch.nn.Module, scheduler: str, steps: int, cfg: QualityConfig
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(calibration run, tuning run): uncached-style generations on seeds the evaluation never uses.

    The first is what MagCache calibrates its ratios on; the second is what the tuned policy replays.
    """

    def calibration_run() -> torch.Tensor:
        return generate(model, scheduler, steps, min(cfg.samples, 20), cfg.seed + 10_000, cfg.batch)

    def tuning_run() -> torch.Tensor:
        return generate(
            model, scheduler, steps, min(cfg.tuning_samples, cfg.samples), cfg.seed + 20_000, cfg.batch
        )

    return calibration_run, tuning_run


def run_suite(
    cfg: QualityConfig,
    *,
    progress: Callable[[str], None] = print,
    only: tuple[str, ...] | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Suite A; returns the ``quality`` section of the bench report.

    With ``only`` (``library/method`` families) and ``previous`` (an earlier section), re-runs just
    those families and merges them into ``previous``; a point of the earlier run is replayed first
    and must reproduce its PSNR exactly (same model, seeds, sampler), or the merge is refused.
    """
    torch.manual_seed(0)
    model = reference.load_model()
    classifier = reference.load_classifier()
    real_test, _ = reference.load_digits("test")
    real_train, _ = reference.load_digits("train")
    floor = metrics.frechet_distance(real_test, real_train, classifier)
    section: dict[str, Any] = {"fd_floor": round(floor, 4), "samplers": []}
    for scheduler, steps in cfg.samplers:
        cal = calibration(scheduler, steps)
        progress(f"[quality] {scheduler}-{steps}: uncached reference")
        calibration_run, tuning_run = replay_runs(model, scheduler, steps, cfg)
        base, base_wall, _ = run_point(model, None, scheduler, steps, cfg.samples, cfg)
        progress(
            f"[quality] {scheduler}-{steps}: tuning (closed loop on {cfg.tuning_samples} calibration images)"
        )
        tuned = only is None or f"{STEPCACHE}/tuned" in only
        methods = stepcache_methods(model, cal, cfg, tuning_run if tuned else None)
        if cfg.peers:
            methods += peer_methods(model, cal, cfg, calibration_run)
        old = None
        if only is not None and previous is not None:
            old = next(x for x in previous["samplers"] if (x["scheduler"], x["steps"]) == (scheduler, steps))
            _check_reproducible(model, methods, old, base, scheduler, steps, cfg)
            methods = [m for m in methods if m.family in only]
        points: list[dict[str, Any]] = []
        ours_by_knob: dict[str, torch.Tensor] = {}
        for i, method in enumerate(methods):
            progress(f"[quality] {scheduler}-{steps}: {i + 1}/{len(methods)} {method.family} ({method.knob})")
            try:
                images, wall, frac = run_point(model, method, scheduler, steps, cfg.samples, cfg)
            except Exception as e:  # a peer that fails is reported, never allowed to stop the suite
                logger.warning("%s (%s) failed: %s", method.family, method.knob, e)
                points.append({**_describe(method), "error": f"{type(e).__name__}: {e}"})
                continue
            score = scores(images, base, frac)
            row = {
                **_describe(method),
                "compute_fraction": score["compute_fraction"],
                "wall_s": round(wall, 3),
                "speedup": round(base_wall / wall, 3),
                "psnr_db": score["psnr_db"],
                "ssim": score["ssim"],
            }
            if method.library == STEPCACHE and method.name == "SmoothCache (type)":
                ours_by_knob[method.knob] = images
            if method.library == peers.SMOOTHCACHE and method.knob in ours_by_knob:
                row["bit_identical_to_stepcache"] = bool(torch.equal(images, ours_by_knob[method.knob]))
            points.append(row)
        matched = _matched(
            model, methods, points, base, scheduler, steps, cfg, classifier, real_test, progress
        )
        if old is not None:
            keep = [p for p in old["points"] if f"{p['library']}/{p['method']}" not in only]
            points = keep + points
            rest = [m for m in old["matched"] if f"{m['library']}/{m['method']}" not in only]
            matched = rest + [m for m in matched if m["target"] is not None]
            base_wall = old["uncached_wall_s"]
        section["samplers"].append(
            {
                "scheduler": scheduler,
                "steps": steps,
                "samples": cfg.samples,
                "uncached_wall_s": round(base_wall, 3),
                "points": points,
                "matched": matched,
            }
        )
    return section


def _check_reproducible(
    model: torch.nn.Module,
    methods: list[Method],
    old: dict[str, Any],
    base: torch.Tensor,
    scheduler: str,
    steps: int,
    cfg: QualityConfig,
) -> None:
    """Replay one point of the earlier run: its PSNR must come out identical, else refuse to merge."""
    probe = next(m for m in methods if m.family == f"{BASELINE}/FORA+forecast")
    want = next(p for p in old["points"] if p["method"] == probe.name and p["knob"] == probe.knob)
    images, _, _ = run_point(model, probe, scheduler, steps, cfg.samples, cfg)
    got = _db(metrics.psnr(images, base))
    if got != want["psnr_db"]:
        raise RuntimeError(
            f"re-run does not reproduce the earlier run ({probe.family} {probe.knob}: {got} vs "
            f"{want['psnr_db']} dB): run the whole suite instead of merging."
        )


def scores(images: torch.Tensor, base: torch.Tensor, fraction: float) -> dict[str, float]:
    """A point's recorded numbers, rounded as in the report: compute fraction, PSNR and SSIM vs ``base``."""
    return {
        "compute_fraction": round(fraction, 4),
        "psnr_db": _db(metrics.psnr(images, base)),
        "ssim": round(metrics.ssim(images, base), 5),
    }


def _db(value: float) -> float:
    """PSNR for JSON: identical images give inf, recorded as 100 dB (documented in the schema)."""
    return round(min(float(value), 100.0), 3)


def _describe(method: Method) -> dict[str, Any]:
    out: dict[str, Any] = {"library": method.library, "method": method.name, "knob": method.knob}
    if method.schedule is not None:
        out["schedule_compute_fraction"] = round(method.schedule.compute_fraction, 4)
    out.update(method.info)
    return out


def _matched(
    model: torch.nn.Module,
    methods: list[Method],
    points: list[dict[str, Any]],
    base_small: torch.Tensor,
    scheduler: str,
    steps: int,
    cfg: QualityConfig,
    classifier: torch.nn.Module,
    real: torch.Tensor,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Per matched fraction: each method's nearest point, with FD and accuracy on ``fd_samples``."""
    if not cfg.matched:
        return []
    rows: list[dict[str, Any]] = []
    big = cfg.fd_samples if cfg.fd_samplers is None or f"{scheduler}-{steps}" in cfg.fd_samplers else 0
    labels = _labels(big) if big else None
    uncached = None
    if big:
        progress(f"[quality] {scheduler}-{steps}: uncached on {big} samples for FD")
        uncached, _, _ = run_point(model, None, scheduler, steps, big, cfg)
        rows.append(
            {
                "target": None,
                "library": "none",
                "method": "uncached",
                **_fd(uncached, labels, classifier, real),
            }
        )
    by_family: dict[str, list[tuple[Method, dict[str, Any]]]] = {}
    for method, row in zip(methods, points, strict=True):
        if "error" not in row:
            by_family.setdefault(method.family, []).append((method, row))
    for target in cfg.matched:
        for family, cands in by_family.items():
            if cfg.fd_families is not None and family not in cfg.fd_families:
                continue
            method, row = min(
                cands, key=lambda mr: (abs(mr[1]["compute_fraction"] - target), -mr[1]["psnr_db"])
            )
            if abs(row["compute_fraction"] - target) > cfg.tolerance:
                rows.append(
                    {"target": target, **_describe(method), "note": "no sweep point near this fraction"}
                )
                continue
            out = {
                "target": target,
                **_describe(method),
                **{k: row[k] for k in ("compute_fraction", "psnr_db", "ssim", "speedup")},
            }
            if big and uncached is not None:
                progress(f"[quality] {scheduler}-{steps}: FD of {family} ({method.knob}) at {target}")
                images, _, _ = run_point(model, method, scheduler, steps, big, cfg)
                out.update(_fd(images, labels, classifier, real))
                out["psnr_db_fd_samples"] = _db(metrics.psnr(images, uncached))
            rows.append(out)
    return rows


def _fd(
    images: torch.Tensor, labels: torch.Tensor, classifier: torch.nn.Module, real: torch.Tensor
) -> dict[str, Any]:
    fd, (lo, hi) = metrics.frechet_distance_bootstrap(real, images, classifier, n_boot=100, seed=0)
    return {
        "fd": round(fd, 4),
        "fd_interval": [round(lo, 4), round(hi, 4)],
        "class_accuracy": round(metrics.class_accuracy(images, labels, classifier), 4),
        "fd_samples": int(images.shape[0]),
    }


def calibration(scheduler: str, steps: int) -> Calibration:
    """The calibration the suite uses for a sampler: the shipped one, else a fresh one."""
    from stepcache.reference import calibrate_reference, shipped_calibration

    cal = shipped_calibration(scheduler, steps)
    return cal if cal is not None else calibrate_reference(scheduler, steps)
