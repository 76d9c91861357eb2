"""Synthetic dataset generation speed on one CPU core.

Usage: PYTHONPATH=. python benchmarks/bench_synthetic.py [--ids 48] [--cameras 4]
Prints one JSON object per image size.  Each case runs in a fresh subprocess pinned to one core;
``peak_rss_gib`` is that subprocess's ``ru_maxrss``.  ``generate`` is the whole
``generate_synthetic`` call (render + JPEG + files + poses.npz); ``render`` is rendering alone.
``*_per_s`` uses wall time, ``*_per_cpu_s`` the process CPU time (less sensitive to other load).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = ((128, 64), (256, 128))


def run_case(height: int, width: int, ids: int, cameras: int) -> dict:
    """Time one size in this process (pinned to one core)."""
    from common.data.synthetic import generate_synthetic, plan, render_spec, synthetic_params

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    params = synthetic_params(ids, cameras, 0, height, width)
    with tempfile.TemporaryDirectory() as tmp:
        generate_s, generate_cpu = _timed(lambda: generate_synthetic(Path(tmp) / "ds", ids, cameras, 0, height, width,
                                                                    progress=False))
    specs = plan(ids, cameras, 0, tuple(params["images_per_id_per_camera"]), params["query_fraction"],
                 params["num_distractors"])
    render_s, render_cpu = _timed(lambda: [render_spec(spec, 0, cameras, height, width) for spec in specs])
    n = len(specs)
    return {"case": "synthetic", "size": f"{height}x{width}", "ids": ids, "cameras": cameras, "images": n,
            "cores": 1, "generate_s": round(generate_s, 3), "generate_images_per_s": round(n / generate_s, 1),
            "generate_images_per_cpu_s": round(n / generate_cpu, 1), "render_s": round(render_s, 3),
            "render_images_per_s": round(n / render_s, 1), "render_images_per_cpu_s": round(n / render_cpu, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def _timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) spent in ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=int, default=48)
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--case", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case, args.ids, args.cameras)))
        return
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for height, width in SIZES:
        command = [sys.executable, __file__, "--case", str(height), str(width), "--ids", str(args.ids),
                   "--cameras", str(args.cameras)]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
