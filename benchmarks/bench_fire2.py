"""FIRe²'s re-clustering cost (FFM, once per epoch from the start epoch) at Market training size.

Usage: PYTHONPATH=. python benchmarks/bench_fire2.py [--size 12936] [--threads 2]
Prints one JSON object per case, each timed in the same process with torch.set_num_threads(--threads), on the
features of ``bench_clustering.identity_blobs`` (2048-d, ~17 images per identity, as Market):

- ``per-identity``: ``common.fire2.mine_fine_ids`` — every identity clustered alone (Jaccard k1 = 20, k2 = 6,
  DBSCAN eps 0.4, min_samples 1; clamped to the identity's size) plus the fine-grained centres;
  ``ms_per_identity`` = its wall seconds / identities;
- ``global`` (the anchor): one ``jaccard_distance`` + ``dbscan`` over all features with the same settings, the
  cost of a clustering-based method's re-clustering; ``per_identity_over_global`` = the ratio of their seconds
  (wall; ``cpu_per_identity_over_global``: of their process CPU seconds, the steadier figure on a loaded machine).

To time an older version of the clustering code with this script, run it from that checkout:
``cd <old checkout> && PYTHONPATH=. python <this file>``.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    import numpy as np
    import torch

    from benchmarks.bench_clustering import identity_blobs
    from common.clustering import dbscan, jaccard_distance
    from common.config import Config
    from common.fire2 import mine_fine_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12936)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import sklearn.cluster  # noqa: F401  (imported before timing: its first import takes seconds)
    config = Config()
    features, ids = identity_blobs(args.size)
    identities = int(ids.max()) + 1
    common = {"n": args.size, "identities": identities, "threads": torch.get_num_threads()}
    load = os.getloadavg()[0]
    began, cpu = time.perf_counter(), time.process_time()
    fine = mine_fine_ids(features, ids.numpy(), config)
    per_identity, per_identity_cpu = time.perf_counter() - began, time.process_time() - cpu
    print(json.dumps({"case": "per-identity", **common, "seconds": round(per_identity, 2),
                      "cpu_seconds": round(per_identity_cpu, 2),
                      "ms_per_identity": round(1000 * per_identity / identities, 2), "fine_ids": fine.count,
                      "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}), flush=True)
    load = os.getloadavg()[0]
    began, cpu = time.perf_counter(), time.process_time()
    labels = dbscan(jaccard_distance(features, config.fire2_k1, config.fire2_k2), config.fire2_eps,
                    config.fire2_min_samples)
    global_seconds, global_cpu = time.perf_counter() - began, time.process_time() - cpu
    print(json.dumps({"case": "global", **common, "seconds": round(global_seconds, 2),
                      "cpu_seconds": round(global_cpu, 2), "clusters": int(np.unique(labels[labels >= 0]).size),
                      "per_identity_over_global": round(per_identity / global_seconds, 3),
                      "cpu_per_identity_over_global": round(per_identity_cpu / global_cpu, 3),
                      "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}), flush=True)


if __name__ == "__main__":
    main()
