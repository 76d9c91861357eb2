"""Benchmark common.evaluation at Market-1501 and MSMT17 sizes; one JSON line per case.

Cases (each in a fresh subprocess so ru_maxrss is its own):
  market       evaluate_rank on a random float32 (3368, 15913) matrix, 751 ids, 6 cams,
               2793 distractors (pid 0)
  market-cc    the same under the cloth-changing protocol, random clothes ids 1..3 per image
  msmt         evaluate_rank on a random float32 (11659, 82161) matrix, 3060 ids, 15 cams
  msmt-feat    evaluate_features (cosine) on random 2048-d float32 features at MSMT17 size
Data generation is excluded from ``seconds`` (wall) and ``cpu_seconds`` (process CPU time,
steadier when other jobs share the cores). Memory: ``resource.getrusage`` ru_maxrss,
read after generation and after the evaluation; ``peak_above_input_gib`` is the difference.

Usage: python benchmarks/bench_evaluation.py [--cases market msmt msmt-feat] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.evaluation import evaluate_features, evaluate_rank  # noqa: E402

SIZES = {  # n_query, n_gallery, ids, cameras, distractors
    "market": (3368, 15913, 751, 6, 2793),
    "market-cc": (3368, 15913, 751, 6, 2793),
    "msmt": (11659, 82161, 3060, 15, 0),
    "msmt-feat": (11659, 82161, 3060, 15, 0),
}
GIB = 2 ** 30


def _max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def _ids(rng, n_query, n_gallery, n_ids, n_cams, n_distractors):
    g_pids = rng.integers(1, n_ids + 1, n_gallery)
    g_pids[rng.choice(n_gallery, n_distractors, replace=False)] = 0
    return (rng.integers(1, n_ids + 1, n_query), g_pids,
            rng.integers(1, n_cams + 1, n_query), rng.integers(1, n_cams + 1, n_gallery))


def run_case(case: str, threads: int) -> dict:
    """Generate the case's data, then time one evaluation."""
    torch.set_num_threads(threads)
    n_query, n_gallery, *id_spec = SIZES[case]
    rng = np.random.default_rng(0)
    q_pids, g_pids, q_camids, g_camids = _ids(rng, n_query, n_gallery, *id_spec)
    if case == "msmt-feat":
        gen = torch.Generator().manual_seed(0)
        qf = torch.randn(n_query, 2048, generator=gen)
        gf = torch.randn(n_gallery, 2048, generator=gen)
        input_gib = (qf.numel() + gf.numel()) * 4 / GIB
        run = lambda: evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids)  # noqa: E731
    else:
        dist = rng.random((n_query, n_gallery), dtype=np.float32)
        input_gib = dist.nbytes / GIB
        clothes = {"q_clothes": rng.integers(1, 4, n_query), "g_clothes": rng.integers(1, 4, n_gallery),
                   "protocol": "cloth-changing"} if case == "market-cc" else {}
        run = lambda: evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, **clothes)  # noqa: E731
    rss_before = _max_rss_gib()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = run()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rss_after = _max_rss_gib()
    return {"case": case, "shape": [n_query, n_gallery], "threads": threads,
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "input_gib": round(input_gib, 3),
            "peak_rss_gib": round(rss_after, 3),
            "peak_above_input_gib": round(rss_after - rss_before, 3),
            "mAP": round(out["mAP"], 6), "rank1": round(float(out["cmc"][0]), 6),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.cases[0], args.threads)), flush=True)
        return
    for case in args.cases:
        subprocess.run([sys.executable, __file__, "--child", "--cases", case,
                        "--threads", str(args.threads)], check=True)


if __name__ == "__main__":
    main()
