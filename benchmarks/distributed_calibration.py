"""Wall time of ``stepcache calibrate`` on 1 process vs 2 processes (torchrun), same samples.

Three configurations of the same calibration of the reference model, alternated ``--repeats``
times, each a fresh command: one process with one thread, one process with two threads, and
``torchrun --nproc_per_node 2`` with one thread per rank (the samples sharded over the ranks).
Reported per configuration: the median wall time of the whole command (start-up, model load,
calibration, file) and the median of the calibration itself (``meta["seconds"]``, under torchrun
the slowest rank's), plus the load average before and after, which says whether other work shared
the CPU. The files of the three are checked to hold the same calibration.

    python benchmarks/distributed_calibration.py           # ~6 min on 2 CPU cores; run it alone
    python benchmarks/distributed_calibration.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stepcache import Calibration

RESULTS = Path(__file__).parent / "results"
SOURCE = Path(__file__).parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: str, args: list[str], folder: Path) -> tuple[float, Calibration]:
    out = folder / f"{config}.json"
    threads = "2" if config == "1 process, 2 threads" else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(SOURCE)}
    if config.startswith("2 processes"):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        launch += ["--master_port", str(_free_port()), "-m", "stepcache"]
    else:
        launch = [sys.executable, "-m", "stepcache"]
    start = time.perf_counter()
    subprocess.run([*launch, *args, "--out", str(out)], env=env, check=True, capture_output=True)
    return time.perf_counter() - start, Calibration.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples, one repeat")
    parser.add_argument("--repeats", type=int, default=2)
    ns = parser.parse_args()
    steps, samples, batch, repeats = (10, 4, 2, 1) if ns.quick else (50, 8, 10, ns.repeats)
    args = ["calibrate", "reference", "--steps", str(steps), "--samples", str(samples)]
    args += ["--batch", str(batch), "--lookahead", "3"]
    configs = ["1 process, 1 thread", "1 process, 2 threads", "2 processes (torchrun), 1 thread each"]
    walls: dict[str, list[float]] = {c: [] for c in configs}
    inner: dict[str, list[float]] = {c: [] for c in configs}
    cals: dict[str, Calibration] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for config in configs:
                wall, cal = run(config, args, Path(tmp))
                walls[config].append(wall)
                inner[config].append(float(cal.meta["seconds"]))
                cals[config] = cal
    load_after = os.getloadavg()
    reference = cals[configs[0]]
    deviation = max(
        float(np.nanmax(np.abs(cal.errors[name] - reference.errors[name])))
        for cal in cals.values()
        for name in reference.components
    )
    result = {
        "command": "stepcache " + " ".join(args),
        "samples": samples,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "max_abs_difference_of_errors": deviation,
        "configs": {
            c: {
                "wall_s_median": round(statistics.median(walls[c]), 2),
                "calibration_s_median": round(statistics.median(inner[c]), 2),
                "wall_s": [round(v, 2) for v in walls[c]],
                "calibration_s": [round(v, 2) for v in inner[c]],
            }
            for c in configs
        },
    }
    name = "distributed_calibration" + ("_quick" if ns.quick else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    base = result["configs"][configs[0]]["calibration_s_median"]
    lines = [
        f"# Calibration on 1 vs 2 processes ({'quick' if ns.quick else 'full'} run)",
        "",
        f"`{result['command']}`, {repeats} repeat(s), {os.cpu_count()} CPU cores. Load average "
        f"before {result['load_average_before']}, after {result['load_average_after']} "
        "(above ~0.5 other work shared the cores and the times are noisy).",
        "",
        "| configuration | wall (s, median) | calibration (s, median) | calibration speed-up |",
        "|---|---:|---:|---:|",
    ]
    for c in configs:
        r = result["configs"][c]
        speed = base / r["calibration_s_median"] if r["calibration_s_median"] else float("nan")
        lines.append(f"| {c} | {r['wall_s_median']} | {r['calibration_s_median']} | {speed:.2f}x |")
    lines += ["", f"Largest difference between the three calibrations' errors: {deviation:.1e}.", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
