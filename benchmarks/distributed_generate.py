"""Recipe: generate many images over N processes with one cached schedule (docs/distributed.md).

    torchrun --nproc_per_node 2 benchmarks/distributed_generate.py --out images
    accelerate launch --num_processes 2 benchmarks/distributed_generate.py --out images
    python benchmarks/distributed_generate.py --out images        # one process: the same images

Every rank calibrates its share of the calibration samples and receives the calibration of all of
them, so every rank derives the same schedule (the cache checks this when it is enabled, and all
ranks raise if they differ). Then each rank generates its share of the class labels (label ``i`` on
rank ``i % N``) under the cache. With ``--schedule FILE`` calibration is skipped and every rank
loads that file, the usual way when the schedule was made once beforehand
(``torchrun ... -m stepcache calibrate``, then ``stepcache schedule``).

The reference model runs on the CPU here; for a diffusers pipeline on GPUs, load it and move it to
``cuda:LOCAL_RANK``, and initialise the group with ``nccl``. Nothing else changes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

import stepcache
from stepcache.distributed import is_main, shard
from stepcache.reference import ReferencePipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for label-<i>.pt and schedule.json")
    parser.add_argument(
        "--labels", type=int, default=10, help="images to generate (class labels 0..9, cycled)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calibration-samples", type=int, default=4)
    parser.add_argument("--compute-fraction", type=float, default=0.5)
    parser.add_argument("--schedule", type=Path, help="a schedule file (skips calibration)")
    args = parser.parse_args()

    # torchrun and accelerate launch set RANK, WORLD_SIZE and the rendezvous address.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    pipe = ReferencePipeline("ddim")

    if args.schedule:
        schedule = stepcache.Schedule.load(args.schedule)
    else:
        inputs = [
            {"class_labels": [i % 10], "generator": torch.Generator().manual_seed(1000 + i)}
            for i in range(args.calibration_samples)
        ]
        # Sharded over the ranks when a process group is initialised; every rank gets the union.
        cal = stepcache.calibrate(pipe, inputs=inputs, num_inference_steps=args.steps, lookahead=3)
        schedule = stepcache.optimal_schedule(cal, args.compute_fraction)
    if is_main():
        schedule.save(args.out / "schedule.json")

    with stepcache.cache(pipe, schedule) as handle:  # all ranks: the same schedule, or all raise
        for i in shard(range(args.labels)):
            image = pipe(class_labels=[i % 10], num_inference_steps=args.steps, seed=i)
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(image, args.out / f"label-{i}.pt")
    if is_main():
        print(f"rank 0: {handle.stats}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
