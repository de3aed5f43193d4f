"""The committed benchmark run: suite A (quality vs peers, reference model) and suite B (speed).

Writes benchmarks/results/bench.{json,md} and frontier-*.png. On 2 CPU cores suite A takes ~35 min
and suite B ~15 min; run alone (two torch jobs on 2 cores slow each other down ~30x).

    python benchmarks/bench.py                    # both suites, the settings committed
    python benchmarks/bench.py --suite quality    # one suite
    stepcache bench --quick                       # the same code on tiny settings (CI)

FD at 2,000 samples is run for DDIM 50 only and for the families below: each FD run costs one
2,000-image generation, and the CPU budget of a committed run does not cover every family twice per
sampler. PSNR/SSIM cover every point of every sweep on both samplers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stepcache.bench import BenchConfig, run_bench
from stepcache.bench.quality import QualityConfig
from stepcache.bench.report import rerun_families
from stepcache.bench.speed import SpeedConfig

RESULTS = Path(__file__).parent / "results"
FD_FAMILIES = (
    "stepcache/tuned",
    "stepcache/optimal (type)",
    "stepcache/SmoothCache by fraction",
    "baseline/FORA+forecast",
    "diffusers/TaylorSeer",
    "cache-dit/DBCache+TaylorSeer",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", action="append", choices=["quality", "speed"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--rerun",
        action="append",
        metavar="FAMILY",
        help="re-run only this suite-A family (e.g. stepcache/tuned) into the existing results",
    )
    args = ap.parse_args()
    cfg = BenchConfig(
        out=args.out,
        suites=tuple(args.suite or ("quality", "speed")),
        threads=args.threads,
        quality=QualityConfig(fd_samples=2000, fd_families=FD_FAMILIES, fd_samplers=("ddim-50",)),
        speed=SpeedConfig(shapes=("DiT-B/2",), steps=50, batch=1, repeats=3),
    )
    if args.rerun:
        rerun_families(cfg, tuple(args.rerun))
    else:
        run_bench(cfg)


if __name__ == "__main__":
    main()
