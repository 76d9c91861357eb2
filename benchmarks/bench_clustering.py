"""Re-clustering time and peak memory of the clustering toolkit at Market (12,936) and MSMT17 (32,621) training size.

Usage: PYTHONPATH=. python benchmarks/bench_clustering.py [--sizes 12936,32621] [--cases sparse,infomap,dense]
Prints one JSON object per (case, size).  Each runs in a fresh subprocess with torch.set_num_threads(2).
Features: 2048-d, L2-normalised, one Gaussian blob per identity (~17 images per id as in Market), within-id
cosine distance ~0.3 and across ids ~1, so neighbour lists look like a trained model's, not random ones.

- ``sparse``: ``jaccard_distance(k1=30, k2=6)`` (the global-clustering setting of cluster-contrast-style
  training; CALR's intra-camera k1=15, k2=4 runs per camera, on far fewer images) + ``dbscan(eps=0.6)``;
- ``infomap``: ``infomap_clusters(k=15, max_distance=0.5)`` (CALR's global clustering);
- ``dense``: the anchor, an N×N implementation in the authors' style — dense float32 distance matrix,
  dense k-reciprocal encoding V and a dense N×N Jaccard output, one row of minima at a time — skipped where
  its three N×N float32 matrices would not fit in ``--dense-limit-gib``; it also checks that the sparse
  distances agree with it.

``seconds`` (wall) and ``cpu_seconds`` time the clustering call alone; ``peak_rss_gib`` is the subprocess's
``ru_maxrss`` (features included), ``features_rss_gib`` its ``ru_maxrss`` before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DIM = 2048
IMAGES_PER_ID = 17


def _gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def identity_blobs(n: int, seed: int = 0):
    """(n, DIM) L2-normalised features, one blob per identity of ~IMAGES_PER_ID images; and their ids (n,)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) // IMAGES_PER_ID
    centres = torch.nn.functional.normalize(torch.randn(int(ids[-1]) + 1, DIM, generator=generator), dim=1)
    x = centres[ids] + 0.012 * torch.randn(n, DIM, generator=generator)
    return torch.nn.functional.normalize(x, dim=1), ids


def dense_jaccard(x, k1: int, k2: int):
    """Authors'-style N×N Jaccard distance: dense distance, dense V, dense output (row loop of minima)."""
    import torch

    from common.postprocess import _expanded_sets, _reciprocal

    n = len(x)
    dist = (2.0 - 2.0 * x @ x.T).clamp_(min=0.0)  # N×N
    nearest = dist.topk(max(k1 + 1, k2), dim=1, largest=False).indices
    top, half = nearest[:, :k1 + 1].contiguous(), nearest[:, :round(k1 / 2) + 1].contiguous()
    v = torch.zeros(n, n)  # N×N
    row, col = _expanded_sets(top, half, _reciprocal(half, 1024), torch.arange(n))
    v[row, col] = torch.exp(-dist[row, col])
    v /= v.sum(1, keepdim=True)
    del dist
    if k2 > 1:
        v = torch.stack([v[nearest[i, :k2]].mean(0) for i in range(n)])
    out = torch.empty(n, n)  # N×N
    for i in range(n):
        nz = torch.nonzero(v[i]).squeeze(1)
        s = torch.minimum(v[i, nz], v[:, nz]).sum(1)
        out[i] = 1 - s / (2 - s)
    return out


def run_case(case: str, n: int) -> dict:
    import numpy as np
    import torch

    from common.clustering import cluster_stats, dbscan, infomap_clusters, jaccard_distance

    torch.set_num_threads(2)
    x, _ = identity_blobs(n)
    before = _gib()
    began, cpu = time.perf_counter(), _cpu_seconds()
    extra: dict = {}
    if case == "sparse":
        distance = jaccard_distance(x, k1=30, k2=6)
        jaccard_seconds = time.perf_counter() - began
        labels = dbscan(distance, eps=0.6, min_samples=4)
        extra = {"jaccard_seconds": round(jaccard_seconds, 2), "stored_pairs": int(distance.nnz)}
    elif case == "infomap":
        labels = infomap_clusters(x, k=15, max_distance=0.5).labels
    else:
        dense = dense_jaccard(x, k1=30, k2=6)
        labels = np.zeros(0, dtype=np.int64)
    seconds, cpu_seconds = time.perf_counter() - began, _cpu_seconds() - cpu
    if case == "dense":
        sparse = jaccard_distance(x, k1=30, k2=6).tocoo()
        dense_at_stored = dense[torch.as_tensor(sparse.row), torch.as_tensor(sparse.col)].numpy()
        extra = {"max_abs_diff_to_sparse": float(np.abs(dense_at_stored - sparse.data).max()),
                 "dense_pairs_below_1": int((dense < 1).sum()), "sparse_pairs": int(sparse.nnz)}
    stats = cluster_stats(labels) if len(labels) else {}
    return {"case": case, "n": n, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "features_rss_gib": round(before, 3), "peak_rss_gib": round(_gib(), 3),
            **{k: stats[k] for k in ("clusters", "outliers") if k in stats}, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="12936,32621")
    parser.add_argument("--cases", default="sparse,infomap,dense")
    parser.add_argument("--dense-limit-gib", type=float, default=12.0)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one[0], int(args.one[1]))))
        return
    for n in (int(s) for s in args.sizes.split(",")):
        for case in args.cases.split(","):
            if case == "dense" and 3 * n * n * 4 / 2**30 > args.dense_limit_gib:
                print(json.dumps({"case": case, "n": n, "skipped": f"three N×N float32 matrices need "
                                  f"{3 * n * n * 4 / 2**30:.1f} GiB > --dense-limit-gib {args.dense_limit_gib}"}))
                continue
            load = os.getloadavg()[0]
            done = subprocess.run([sys.executable, __file__, "--one", case, str(n)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": os.getcwd()})
            if done.returncode:
                print(json.dumps({"case": case, "n": n, "error": done.stderr.strip().splitlines()[-1:]}))
                continue
            record = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps({**record, "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}), flush=True)


if __name__ == "__main__":
    main()
