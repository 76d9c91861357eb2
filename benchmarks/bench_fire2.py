"""FIRe²'s re-clustering cost (FFM, once per epoch from the start epoch) at Market training size.

Usage: PYTHONPATH=. python benchmarks/bench_fire2.py [--size 12936]
Prints one JSON object per case, each timed in the same process with torch.set_num_threads(2), on the features
of ``bench_clustering.identity_blobs`` (2048-d, ~17 images per identity, as Market):

- ``per-identity``: ``common.fire2.mine_fine_ids`` — every identity clustered alone (Jaccard k1 = 20, k2 = 6,
  DBSCAN eps 0.4, min_samples 1; clamped to the identity's size) plus the fine-grained centres;
- ``global`` (the anchor): one ``jaccard_distance`` + ``dbscan`` over all features with the same settings, the
  cost of a clustering-based method's re-clustering; ``per_identity_over_global`` = the ratio of their seconds.
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
    args = parser.parse_args()
    torch.set_num_threads(2)
    import sklearn.cluster  # noqa: F401  (imported before timing: its first import takes seconds)
    config = Config()
    features, ids = identity_blobs(args.size)
    common = {"n": args.size, "identities": int(ids.max()) + 1}
    load = os.getloadavg()[0]
    began = time.perf_counter()
    fine = mine_fine_ids(features, ids.numpy(), config)
    per_identity = time.perf_counter() - began
    print(json.dumps({"case": "per-identity", **common, "seconds": round(per_identity, 2), "fine_ids": fine.count,
                      "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}), flush=True)
    load = os.getloadavg()[0]
    began = time.perf_counter()
    labels = dbscan(jaccard_distance(features, config.fire2_k1, config.fire2_k2), config.fire2_eps,
                    config.fire2_min_samples)
    global_seconds = time.perf_counter() - began
    print(json.dumps({"case": "global", **common, "seconds": round(global_seconds, 2),
                      "clusters": int(np.unique(labels[labels >= 0]).size),
                      "per_identity_over_global": round(per_identity / global_seconds, 2),
                      "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}), flush=True)

if __name__ == "__main__":
    main()
