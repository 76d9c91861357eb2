"""Speed and memory of NFC and k-reciprocal re-ranking on random 2048-d L2-normalised features.

Usage: PYTHONPATH=. python benchmarks/bench_postprocess.py [--cases nfc-15913,nfc-82161,rerank-market]
       (add rerank-msmt for the MSMT17-size re-ranking case; it takes minutes)
Prints one JSON object per case.  Each case runs in a fresh subprocess with torch.set_num_threads(2);
``seconds`` (wall) and ``cpu_seconds`` (user + system) time the post-processing call alone (feature
generation excluded); ``peak_rss_gib`` is the subprocess's ``ru_maxrss`` (features included),
``features_rss_gib`` its ``ru_maxrss`` just before the call; ``load_avg_1min`` is the machine's load
before/after (other jobs on the 2 cores inflate wall time).
Random features are a hard case: neighbours are near-uniform, so few are mutual and the bfloat16
screen of NFC must re-check many candidates.
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

DIM = 2048
# name: (kind, sizes, anchor seconds of the standard/authors' code on this CPU or None, target seconds)
CASES = {
    "nfc-15913": ("nfc", (15913,), 8.4, 1.0),
    "nfc-82161": ("nfc", (82161,), None, 60.0),
    "rerank-market": ("rerank", (3368, 15913), 89.0, 15.0),
    "rerank-msmt": ("rerank", (11659, 82161), None, 600.0),
}
ANCHORS = {
    "nfc-15913": "authors' NFC 8.4 s (full N×N matrix)",
    "nfc-82161": "authors' NFC cannot run (~50 GiB N×N matrix)",
    "rerank-market": "standard re-ranking 89–121 s, 8.3 GiB",
    "rerank-msmt": "standard re-ranking cannot run (35 GB N×N matrix)",
}


def _gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _unit_features(n: int, seed: int):
    import torch

    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return x.div_(x.norm(dim=1, keepdim=True))


def run_case(name: str) -> dict:
    """Run one case in this process."""
    import torch

    from common.postprocess import k_reciprocal_rerank, nfc

    torch.set_num_threads(2)
    kind, sizes, anchor_s, target_s = CASES[name]
    feats = [_unit_features(n, seed) for seed, n in enumerate(sizes)]
    before, load, cpu = _gib(), os.getloadavg()[0], _cpu_seconds()
    start = time.perf_counter()
    out = nfc(feats[0]) if kind == "nfc" else k_reciprocal_rerank(feats[0], feats[1])
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    result = {"case": name, "sizes": list(sizes), "dim": DIM, "threads": 2, "output_shape": list(out.shape),
              "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_gib": round(_gib(), 3),
              "features_rss_gib": round(before, 3), "target_s": target_s, "anchor": ANCHORS[name]}
    if anchor_s:
        result["speedup_vs_anchor"] = round(anchor_s / seconds, 2)
    result["load_avg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # before, after
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="nfc-15913,nfc-82161,rerank-market",
                        help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--case", name], env=env, check=True,
                             capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
