"""The committed benchmark run: suite A (quality vs peers, reference model) and suite B (speed).

Writes benchmarks/results/bench.{json,md} and frontier-*.png, then prints bench.md. On 2 CPU cores
suite A takes ~35 min and suite B ~15 min; run alone (two torch jobs on 2 cores slow each other
down ~30x). Needs the peers: pip install -r benchmarks/requirements.txt (make setup installs them).

    python benchmarks/bench.py                    # both suites, the settings committed
    python benchmarks/bench.py --suite quality    # one suite
    python benchmarks/bench.py --quick            # the same code on tiny settings (CI), to ./bench-results
    python benchmarks/bench.py --suite quality --sampler dpm-20 --samples 200 --out my-results
    python benchmarks/bench.py --suite speed --shape DiT-XL/2 --repeats 3

FD at 2,000 samples is run for DDIM 50 only and for the families below: each FD run costs one
2,000-image generation, and the CPU budget of a committed run does not cover every family twice per
sampler. PSNR/SSIM cover every point of every sweep on both samplers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import BenchConfig, run_bench
from benchmarks.harness.quality import QualityConfig
from benchmarks.harness.report import rerun_families
from benchmarks.harness.speed import SHAPES, SpeedConfig
from stepcache.errors import StepCacheError

RESULTS = Path(__file__).parent / "results"
QUICK_OUT = Path("bench-results")  # a smoke run never overwrites the committed results by default
FD_FAMILIES = (
    "stepcache/tuned",
    "stepcache/optimal (type)",
    "stepcache/SmoothCache by fraction",
    "baseline/FORA+forecast",
    "diffusers/TaylorSeer",
    "cache-dit/DBCache+TaylorSeer",
)
# The committed settings; command-line options override them.
QUALITY = QualityConfig(fd_samples=2000, fd_families=FD_FAMILIES, fd_samplers=("ddim-50",))
SPEED = SpeedConfig(shapes=("DiT-B/2",), steps=50, batch=1, repeats=3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of everything (~1 min)")
    ap.add_argument(
        "--out", type=Path, default=None, help=f"folder for bench.json, bench.md, plots (default {RESULTS})"
    )
    ap.add_argument("--suite", action="append", choices=["quality", "speed"])
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip the peer libraries")
    ap.add_argument("--samples", type=int, help="suite A: images per sweep point")
    ap.add_argument("--fd-samples", type=int, help="suite A: images per FD run (0 = skip FD)")
    ap.add_argument("--sampler", action="append", help="suite A: scheduler-steps, e.g. ddim-50 (repeatable)")
    ap.add_argument("--shape", action="append", help=f"suite B: one of {list(SHAPES)} (repeatable)")
    ap.add_argument("--repeats", type=int, help="suite B: interleaved repeats (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument(
        "--rerun",
        action="append",
        metavar="FAMILY",
        help="re-run only this suite-A family (e.g. stepcache/tuned) into the existing results",
    )
    args = ap.parse_args(argv)
    try:
        args.samplers = tuple((s.split("-")[0], int(s.split("-")[1])) for s in args.sampler or ())
    except (IndexError, ValueError):
        ap.error(f"--sampler takes scheduler-steps such as ddim-50, got {args.sampler}.")
    if args.shape and any(s not in SHAPES for s in args.shape):
        ap.error(f"--shape must be among {list(SHAPES)}, got {args.shape}.")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else RESULTS
    return args


def config(args: argparse.Namespace) -> BenchConfig:
    """The committed settings with the command line's overrides (``--quick`` replaces them all)."""
    quality = dataclasses.replace(
        QUALITY,
        samplers=args.samplers or QUALITY.samplers,
        samples=args.samples or QUALITY.samples,
        fd_samples=QUALITY.fd_samples if args.fd_samples is None else args.fd_samples,
    )
    speed = dataclasses.replace(
        SPEED, shapes=tuple(args.shape or SPEED.shapes), repeats=args.repeats or SPEED.repeats
    )
    return BenchConfig(
        out=args.out,
        suites=tuple(args.suite or ("quality", "speed")),
        quick=args.quick,
        peers=args.peers,
        threads=args.threads,
        quality=quality,
        speed=speed,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        cfg = config(args)
        if args.rerun:
            rerun_families(cfg, tuple(args.rerun), progress=progress)
        else:
            run_bench(cfg, progress=progress)
    except StepCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print((cfg.out / "bench.md").read_text())
    print(f"wrote {cfg.out / 'bench.json'}, {cfg.out / 'bench.md'}")


if __name__ == "__main__":
    main()
