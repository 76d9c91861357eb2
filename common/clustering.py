"""Clustering toolkit for unsupervised ReID: pseudo-labels from features, and their quality.

- :func:`jaccard_distance`: k-reciprocal Jaccard distance (Zhong et al.; the form clustering-based unsupervised
  ReID uses) as a sparse matrix, built on the sparse machinery of ``common.postprocess`` — never N×N dense
  except for a small set (N <= ``DENSE_MAX``, e.g. one identity's images), where dense arrays are faster;
- :func:`dbscan`: DBSCAN on such a sparse precomputed distance (connected components of the core points when
  the neighbour relation is symmetric, else scikit-learn);
- :func:`infomap_clusters`: Infomap on a directed kNN graph of cosine similarities (the ``infomap`` package),
  with a density score per point (used to pick high-density pivots);
- :func:`cluster_stats`, :func:`cluster_quality`, :func:`centroids`: counts, pairwise precision / recall /
  F-score / expansion against true identities (evaluation only), L2-normalised cluster means.

Labels are int64 arrays, one per feature: clusters 0..C−1, outliers −1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from common.postprocess import (
    ReciprocalOverlap,
    _exact_knn,
    _features,
    dense_overlaps,
    dense_reciprocal_encoding,
    knn,
    reciprocal_encoding,
)

OUTLIER = -1
DENSE_MAX = 64  # jaccard_distance of at most this many features runs on dense (N, N) arrays (one identity's images)


def jaccard_distance(features: torch.Tensor, k1: int = 15, k2: int = 4, max_distance: float = 1.0,
                     chunk_size: int = 1024, dense: bool | None = None) -> scipy.sparse.csr_matrix:
    """Sparse k-reciprocal Jaccard distance (N, N) float32 between L2-normalised rows of ``features`` (N, D).

    As in clustering-based unsupervised ReID: d(i, j) = |x_i − x_j|² = 2 − 2 cos on normalised features;
    V[i] = exp(−d(i, ·)) over i's expanded k1-reciprocal set, normalised (no division by the row's farthest
    distance, unlike test-time re-ranking), averaged over the k2 nearest rows; distance (unitless, in [0, 1])
    1 − s/(2 − s) with s(i, j) = Σ_k min(V[i, k], V[j, k]), clamped to [0, 1].  Only pairs with distance
    < ``max_distance`` (<= 1) are stored: a missing entry means distance >= ``max_distance`` (1 when s = 0).
    The diagonal is stored (distance 0).  Memory: the sparse V and one (chunk, N) float32 block.

    ``dense`` (default: N <= ``DENSE_MAX``) holds V and s as dense (N, N) float32 arrays instead
    (``common.postprocess.dense_reciprocal_encoding``, ``dense_overlaps``): the same float32 operations in the
    same order, so bitwise the same distances (on the CPU).  It skips the sparse kernels' fixed costs, which
    dominate for a few dozen features (17 features: 1.8 instead of 2.2 ms on one thread of the development CPU);
    its sums cost O(N²·W), W = the largest expanded set, so beyond ~100 features the sparse path is faster.
    """
    x = F.normalize(_features("features", features), dim=1)
    n = len(x)
    if k1 < 1 or k2 < 1 or max(k1 + 1, k2) > n:
        raise ValueError(f"jaccard_distance: k1={k1}, k2={k2} need k1, k2 >= 1 and max(k1 + 1, k2) <= {n} features")
    sq = (x * x).sum(1)
    _, nearest, _ = _exact_knn(x, sq, max(k1 + 1, k2), exclude_self=False)
    if n <= DENSE_MAX if dense is None else dense:
        v, order = dense_reciprocal_encoding(x, sq, nearest, k1, k2, torch.ones_like(sq), chunk_size)
        blocks = iter([(torch.arange(n), dense_overlaps(v, order))])
    else:
        overlap = ReciprocalOverlap(reciprocal_encoding(x, sq, nearest, k1, k2, torch.ones_like(sq), chunk_size),
                                    n, 0)
        blocks = ((rows, overlap.sums(rows)) for rows in overlap.row_chunks(max_rows=max(1, min(chunk_size,
                                                                                                   2**26 // n))))
    rows_out, cols_out, vals_out = [], [], []
    for rows, s in blocks:
        dist = (2.0 - 2.0 * s).div_(2.0 - s).clamp_(0.0, 1.0)
        local, col = torch.nonzero((s > 0) & (dist < max_distance), as_tuple=True)
        rows_out.append((local + rows[0]).to("cpu", torch.int32))  # int32: half the memory of int64 indices
        cols_out.append(col.to("cpu", torch.int32))
        vals_out.append(dist[local, col].cpu())
    row, col, val = torch.cat(rows_out).numpy(), torch.cat(cols_out).numpy(), torch.cat(vals_out).numpy()
    return _csr(n, row, col, val)


def _csr(n: int, row: np.ndarray, col: np.ndarray, val: np.ndarray) -> scipy.sparse.csr_matrix:
    """(n, n) CSR matrix of the entries (E,) row, col, val, sorted by row: built directly, without scipy's
    conversion from coordinates (~0.1 ms, a good part of the cost of a small set)."""
    indptr = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(np.bincount(row, minlength=n))])
    return scipy.sparse.csr_matrix((val, col, indptr), shape=(n, n))


def dbscan(distance: scipy.sparse.spmatrix, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels (N,) int64 on a sparse precomputed distance (N, N); pairs not stored are never neighbours.

    A point is a core point when at least ``min_samples`` points (itself included) lie within ``eps`` (a
    distance <= eps; an absent diagonal entry counts as distance 0).  When that neighbour relation is symmetric
    (as on ``jaccard_distance``'s output, up to float32 ties at eps), the labels are computed here in a few
    array operations, the ones scikit-learn's DBSCAN gives: clusters are the connected components of the core
    points, numbered by smallest member; a non-core point within eps of core points joins the lowest-numbered of
    their clusters; the other points are outliers (−1).  With min_samples = 1 every point within eps of itself is
    a core point and the clusters are the connected components.  Otherwise scikit-learn's DBSCAN runs.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"dbscan: eps={eps} must be in (0, 1) for a Jaccard distance")
    graph = scipy.sparse.csr_matrix(distance)
    n = graph.shape[0]
    row = np.repeat(np.arange(n), np.diff(graph.indptr))
    near, diagonal = graph.data <= eps, row == graph.indices
    own = np.ones(n, dtype=bool)  # i is its own neighbour unless a stored diagonal entry exceeds eps
    own[row[diagonal]] = near[diagonal]
    edge = near & ~diagonal
    src, dst = row[edge], graph.indices[edge].astype(np.int64)
    if min_samples < 1 or not np.array_equal(np.sort(src * n + dst), np.sort(dst * n + src)):
        from sklearn.cluster import DBSCAN

        return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph).astype(np.int64)
    return _dbscan_symmetric(n, src, dst, np.bincount(src, minlength=n) + own >= min_samples)


def _dbscan_symmetric(n: int, src: np.ndarray, dst: np.ndarray, core: np.ndarray) -> np.ndarray:
    """DBSCAN labels (n,) int64 from the symmetric neighbour pairs src → dst (E,) (i ≠ j; sorted by src) and
    ``core`` (n,) bool."""
    from scipy.sparse.csgraph import connected_components

    labels = np.full(n, OUTLIER, dtype=np.int64)
    if not core.any():
        return labels
    both = core[src] & core[dst]
    components = connected_components(_csr(n, src[both], dst[both], np.ones(int(both.sum()))), directed=False)[1]
    labels[core] = relabel(components[core])
    border = ~core[src] & core[dst]  # a non-core point next to a core point: the lowest such cluster
    if border.any():
        point, cluster = src[border], labels[dst[border]]
        order = np.lexsort((cluster, point))
        points, first = np.unique(point[order], return_index=True)
        labels[points] = cluster[order][first]
    return labels


@dataclass
class InfomapResult:
    """``labels`` (N,) int64 (−1 outliers); ``density`` (N,) float64 = Σ over the point's kNN-graph edges of
    1/(d_ij + mean kNN distance), higher = denser (0 for a point without edges)."""

    labels: np.ndarray
    density: np.ndarray


def infomap_clusters(features: torch.Tensor, k: int = 15, max_distance: float = 0.5, max_outlier_size: int = 4,
                     seed: int = 0) -> InfomapResult:
    """Infomap (two-level, directed) on the kNN graph of L2-normalised ``features`` (N, D).

    Each point's k nearest (itself counted, as a search over the whole set returns it) give directed edges
    i → j, j ≠ i, with cosine distance d_ij <= ``max_distance`` and weight 1 − d_ij.  Points without an
    edge and clusters of <= ``max_outlier_size`` members are outliers (−1); the other clusters are
    numbered 0..C−1 in order of their smallest member.
    """
    x = F.normalize(_features("features", features), dim=1)
    n = len(x)
    if not 2 <= k <= n:
        raise ValueError(f"infomap_clusters: k={k} must be in [2, number of features = {n}]")
    if not 0.0 < max_distance <= 1.0:  # edge weights 1 − d must be >= 0
        raise ValueError(f"infomap_clusters: max_distance={max_distance} must be in (0, 1]")
    sqdist, idx = knn(x, k - 1)
    cosine = (sqdist / 2).clamp_(0.0, 2.0).double().numpy()
    idx = idx.numpy()
    mean = cosine.sum() / (n * k)  # the self entries count with distance 0
    keep = cosine <= max_distance
    density = np.where(keep, 1.0 / (cosine + mean), 0.0).sum(1)
    src, slot = np.nonzero(keep)
    modules = _infomap_modules(src, idx[src, slot], 1.0 - cosine[src, slot], seed)
    return InfomapResult(labels=_drop_small(modules, max_outlier_size, n), density=density)


def _infomap_modules(src: np.ndarray, dst: np.ndarray, weight: np.ndarray, seed: int) -> dict[int, int]:
    """node → module of a two-level directed Infomap run on weighted links (nodes without links are absent)."""
    import infomap

    if len(src) == 0:
        return {}
    runner = infomap.Infomap(two_level=True, directed=True, silent=True, seed=seed + 1)  # Infomap seeds are >= 1
    runner.add_links(zip(src.tolist(), dst.tolist(), weight.tolist()))
    return dict(runner.run().modules())


def _drop_small(modules: dict[int, int], max_outlier_size: int, n: int) -> np.ndarray:
    """Labels (n,) from node → module: modules of <= ``max_outlier_size`` nodes and absent nodes become −1."""
    raw = np.full(n, OUTLIER, dtype=np.int64)
    for node, module in modules.items():
        raw[node] = module
    return relabel(raw, min_size=max_outlier_size + 1)


def relabel(labels: np.ndarray, min_size: int = 1) -> np.ndarray:
    """Clusters of >= ``min_size`` members renumbered 0..C−1 by smallest member; the rest (and −1) → −1."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(len(labels), OUTLIER, dtype=np.int64)
    valid = labels >= 0
    if not valid.any():
        return out
    ids, first, inverse, counts = np.unique(labels[valid], return_index=True, return_inverse=True,
                                            return_counts=True)
    big = counts >= min_size
    order = np.argsort(np.where(big, first, np.iinfo(np.int64).max), kind="stable")
    rank = np.full(len(ids), OUTLIER, dtype=np.int64)
    rank[order[:big.sum()]] = np.arange(big.sum())
    out[valid] = rank[inverse]
    return out


def centroids(features: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """L2-normalised mean feature (C, D) of each cluster 0..C−1 (outliers ignored); features (N, D)."""
    labels_t = torch.as_tensor(labels, dtype=torch.int64, device=features.device)
    keep = labels_t >= 0
    count = int(labels_t.max()) + 1 if keep.any() else 0
    sums = features.new_zeros(count, features.shape[1]).index_add_(0, labels_t[keep], features[keep])
    return F.normalize(sums, dim=1)


def cluster_stats(labels: np.ndarray) -> dict[str, float]:
    """``clusters`` (number), ``outliers`` (number), ``outlier_fraction`` and ``mean_size`` of clustered points."""
    labels = np.asarray(labels)
    clusters = int(labels.max()) + 1 if (labels >= 0).any() else 0
    outliers = int((labels < 0).sum())
    clustered = len(labels) - outliers
    return {"clusters": clusters, "outliers": outliers, "outlier_fraction": outliers / max(len(labels), 1),
            "mean_size": clustered / clusters if clusters else 0.0}


def cluster_quality(labels: np.ndarray, pids: np.ndarray) -> dict[str, float]:
    """Pairwise precision, recall, F-score and expansion of pseudo-``labels`` against true ``pids`` (N,).

    Precision: share of same-cluster pairs that are same-identity; recall: share of same-identity pairs
    that share a cluster (outliers share no cluster); expansion: mean over identities with a clustered
    image of the number of clusters holding its images.  For evaluation reports only (needs true labels).
    """
    labels, pids = np.asarray(labels, dtype=np.int64), np.asarray(pids, dtype=np.int64)
    if labels.shape != pids.shape:
        raise ValueError(f"cluster_quality: labels {labels.shape} and pids {pids.shape} differ in shape")
    _, pid_index = np.unique(pids, return_inverse=True)
    clustered = labels >= 0
    joint = np.unique(np.stack([labels[clustered], pid_index[clustered]]), axis=1, return_counts=True)[1]
    both = float((joint * (joint - 1)).sum() / 2)
    same_cluster = float(sum(c * (c - 1) / 2 for c in np.bincount(labels[clustered])))
    same_id = float(sum(c * (c - 1) / 2 for c in np.bincount(pid_index)))
    precision = both / same_cluster if same_cluster else 0.0
    recall = both / same_id if same_id else 0.0
    fscore = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    pairs = np.unique(np.stack([pid_index[clustered], labels[clustered]]), axis=1)
    expansion = float(np.bincount(pairs[0])[np.unique(pairs[0])].mean()) if pairs.size else 0.0
    return {"precision": precision, "recall": recall, "fscore": fscore, "expansion": expansion}
