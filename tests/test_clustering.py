"""Clustering toolkit: sparse Jaccard distance against a slow dense reference, DBSCAN and Infomap on blobs."""

import numpy as np
import pytest
import torch

from common.clustering import (
    centroids,
    cluster_quality,
    cluster_stats,
    dbscan,
    infomap_clusters,
    jaccard_distance,
    relabel,
)


def dense_jaccard_reference(features: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """The k-reciprocal Jaccard distance written plainly with N×N arrays (Zhong et al., unsupervised form)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(2)
    n = len(x)
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        backward = rank[forward, :k + 1]
        return forward[(backward == i).any(1)]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = list(r)
        for c in r:
            h = reciprocal(c, int(round(k1 / 2)))
            if len(np.intersect1d(h, r)) > 2 / 3 * len(h):
                expanded += list(h)
        members = np.unique(expanded)
        w = np.exp(-d[i, members])
        v[i, members] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    s = np.minimum(v[:, None, :], v[None, :, :]).sum(2)
    return np.clip(1 - s / (2 - s), 0, 1)


def blobs(sizes, dim=32, spread=0.08, seed=0):
    """Points around random centres (cosine distance between centres ~1): features (N, dim), true labels (N,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = [c + spread * rng.normal(size=(size, dim)) for c, size in zip(centres, sizes)]
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return torch.tensor(np.concatenate(points), dtype=torch.float32), truth


def purity(labels, truth):
    """Share of clustered points whose cluster's majority identity is theirs."""
    kept = labels >= 0
    majority = {c: np.bincount(truth[labels == c]).argmax() for c in np.unique(labels[kept])}
    return np.mean([majority[c] == t for c, t in zip(labels[kept], truth[kept])])


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("k1,k2,seed", [(6, 3, 0), (10, 1, 1), (4, 6, 2)])
def test_sparse_jaccard_equals_the_dense_reference(k1, k2, seed, dense):
    features, _ = blobs([12, 9, 15, 7], dim=16, spread=0.6, seed=seed)
    expected = dense_jaccard_reference(features.double().numpy(), k1, k2)
    sparse = jaccard_distance(features, k1=k1, k2=k2, dense=dense)
    got = np.ones_like(expected)
    coo = sparse.tocoo()
    got[coo.row, coo.col] = coo.data
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert np.allclose(sparse.diagonal(), 0.0, atol=1e-6)
    assert sparse.nnz < expected.size  # not a dense matrix in disguise


def _groups(sizes, seed):
    """One random set (n, 24) per size, 1–3 looks each with a random spread: a FIRe² identity's images."""
    rng = np.random.default_rng(seed)
    for n in sizes:
        looks = rng.normal(size=(rng.integers(1, 4), 24))
        yield torch.tensor(looks[rng.integers(0, len(looks), n)] + rng.uniform(0.05, 1.0) * rng.normal(size=(n, 24)),
                           dtype=torch.float32)


@pytest.mark.parametrize("k1,k2", [(20, 6), (8, 3), (15, 4), (5, 1), (1, 2)])
def test_small_sets_dense_jaccard_is_bitwise_the_sparse_one(k1, k2):
    """The dense path (small N) adds the same float32 terms in the same order: identical matrices, which keeps
    DBSCAN's labels identical even where a distance is exactly eps in exact arithmetic."""
    sizes = [2, 3, 4, 5, 7, 9, 13, 17, 21, 22, 40, 64, 97]
    for seed in range(3):
        for features in _groups(sizes, seed):
            n = len(features)  # k1, k2 clamped as FIRe² does: n < k1 for the small sets
            a1, a2 = min(k1, n - 1), min(k2, n)
            sparse = jaccard_distance(features, a1, a2, dense=False)
            dense = jaccard_distance(features, a1, a2, dense=True)
            assert dense.dtype == sparse.dtype == np.float32 and dense.shape == sparse.shape == (n, n)
            for name in ("indptr", "indices", "data"):
                np.testing.assert_array_equal(getattr(dense, name), getattr(sparse, name), err_msg=f"n={n} {name}")
            assert dense.indices.dtype == sparse.indices.dtype
    pruned = jaccard_distance(features, k1=min(k1, 96), k2=k2, max_distance=0.6, dense=True)
    full = jaccard_distance(features, k1=min(k1, 96), k2=k2, max_distance=0.6, dense=False)
    assert (pruned != full).nnz == 0 and pruned.data.max() < 0.6


def test_jaccard_of_one_feature_is_refused_by_both_paths():
    for dense in (False, True):
        with pytest.raises(ValueError, match="k1"):
            jaccard_distance(torch.ones(1, 4), k1=1, k2=1, dense=dense)


def test_jaccard_picks_the_dense_path_for_small_sets(monkeypatch):
    import common.clustering as clustering

    calls = []
    real = clustering.dense_overlaps
    monkeypatch.setattr(clustering, "dense_overlaps", lambda *a: calls.append(1) or real(*a))
    features = next(_groups([clustering.DENSE_MAX + 1], seed=0))
    jaccard_distance(features[:clustering.DENSE_MAX], k1=20, k2=6)
    assert calls == [1]
    jaccard_distance(features, k1=20, k2=6)
    assert calls == [1]


def test_jaccard_max_distance_keeps_only_closer_pairs():
    features, _ = blobs([20, 20], spread=0.3)
    full = jaccard_distance(features, k1=8, k2=3)
    pruned = jaccard_distance(features, k1=8, k2=3, max_distance=0.5)
    assert pruned.nnz == int((full.data < 0.5).sum()) and pruned.data.max() < 0.5
    np.testing.assert_array_equal(pruned.toarray()[pruned.toarray() > 0], full.toarray()[(full.toarray() < 0.5)
                                                                                         & (full.toarray() > 0)])


def test_dbscan_finds_the_blobs_and_marks_isolated_points_as_outliers():
    features, truth = blobs([20, 25, 18, 30, 22])
    far = torch.tensor(np.random.default_rng(9).normal(size=(3, 32)) * 5, dtype=torch.float32)
    labels = dbscan(jaccard_distance(torch.cat([features, far]), k1=10, k2=4), eps=0.6, min_samples=4)
    assert labels.dtype == np.int64 and len(labels) == len(truth) + 3
    assert cluster_stats(labels[:len(truth)])["clusters"] == 5
    assert purity(labels[:len(truth)], truth) == 1.0
    # query expansion (k2 > 1) pulls an isolated point towards its neighbours' blob; without it nothing does
    labels = dbscan(jaccard_distance(torch.cat([features, far]), k1=10, k2=1), eps=0.6, min_samples=4)
    assert purity(labels[:len(truth)], truth) == 1.0 and (labels[len(truth):] == -1).all()


def test_dbscan_on_sparse_distance_equals_dbscan_on_the_dense_matrix():
    from sklearn.cluster import DBSCAN

    features, _ = blobs([15, 12, 20, 9], spread=0.5, seed=3)
    sparse = jaccard_distance(features, k1=8, k2=3)
    dense = np.ones(sparse.shape)
    coo = sparse.tocoo()
    dense[coo.row, coo.col] = coo.data
    for eps in (0.3, 0.5, 0.7):
        expected = DBSCAN(eps=eps, min_samples=4, metric="precomputed").fit_predict(dense)
        np.testing.assert_array_equal(dbscan(sparse, eps, 4), expected)


def _random_distance(n, density, seed, symmetric=True, diagonal="zero"):
    """A random sparse (n, n) float32 distance with values on a grid (ties at eps included), explicit zeros,
    and a diagonal that is stored as 0, absent, or stored above eps for some points."""
    import scipy.sparse

    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n, n)) < density, np.round(rng.random((n, n)), 1), np.nan)
    if symmetric:
        dense = np.where(np.triu(np.ones((n, n), dtype=bool)), dense, dense.T)
    if diagonal == "absent":
        np.fill_diagonal(dense, np.nan)
    else:
        np.fill_diagonal(dense, np.where(rng.random(n) < (0.2 if diagonal == "some above eps" else 0.0), 0.9, 0.0))
    row, col = np.nonzero(~np.isnan(dense))
    return scipy.sparse.csr_matrix((dense[row, col].astype(np.float32), (row, col)), shape=(n, n))


@pytest.mark.parametrize("diagonal", ["zero", "absent", "some above eps"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dbscan_equals_scikit_learn_on_random_graphs(symmetric, diagonal):
    from sklearn.cluster import DBSCAN

    for seed in range(12):
        for n, density in ((1, 1.0), (5, 0.5), (30, 0.1), (200, 0.02)):
            distance = _random_distance(n, density, seed, symmetric, diagonal)
            for eps in (0.3, 0.5):
                for min_samples in (1, 2, 3, 5):
                    expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distance)
                    got = dbscan(distance, eps, min_samples)
                    assert got.dtype == np.int64
                    np.testing.assert_array_equal(got, expected, err_msg=f"seed {seed} n {n} eps {eps} m {min_samples}")


def test_dbscan_rejects_an_eps_outside_the_jaccard_range():
    with pytest.raises(ValueError, match="eps"):
        dbscan(jaccard_distance(blobs([10, 10])[0], k1=4, k2=2), eps=1.5, min_samples=4)


def test_infomap_finds_the_blobs_and_small_clusters_are_outliers():
    features, truth = blobs([20, 16, 24, 3])  # the 3-point blob is too small: outliers
    lone = torch.tensor(np.random.default_rng(5).normal(size=(1, 32)), dtype=torch.float32)
    result = infomap_clusters(torch.cat([features, lone]), k=15, max_distance=0.5, max_outlier_size=4)
    labels = result.labels
    assert cluster_stats(labels)["clusters"] == 3
    assert purity(labels, np.append(truth, 99)) == 1.0
    assert (labels[:-1][truth == 3] == -1).all() and labels[-1] == -1
    assert result.density[-1] == 0.0 and (result.density[:60] > 0).all()
    np.testing.assert_array_equal(infomap_clusters(torch.cat([features, lone])).labels, labels)  # deterministic


def test_infomap_without_edges_labels_everything_an_outlier():
    features = torch.eye(6)  # cosine distance 1 between every pair: no edge passes 0.5
    assert (infomap_clusters(features, k=3).labels == -1).all()


def test_cluster_quality_by_hand():
    labels = np.array([0, 0, 1, 1, -1])
    pids = np.array([5, 5, 5, 7, 7])
    quality = cluster_quality(labels, pids)
    # same-cluster pairs: (0,1) right, (2,3) wrong; same-id pairs: (0,1) (0,2) (1,2) (3,4)
    assert quality["precision"] == pytest.approx(0.5)
    assert quality["recall"] == pytest.approx(0.25)
    assert quality["fscore"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert quality["expansion"] == pytest.approx(1.5)  # id 5 in clusters {0, 1}, id 7 in {1}


def test_relabel_stats_and_centroids():
    labels = relabel(np.array([7, 7, 3, -1, 3, 9, 7]), min_size=2)
    np.testing.assert_array_equal(labels, [0, 0, 1, -1, 1, -1, 0])
    assert cluster_stats(labels) == {"clusters": 2, "outliers": 2, "outlier_fraction": 2 / 7, "mean_size": 2.5}
    features = torch.tensor([[1.0, 0], [3, 0], [0, 2], [5, 5], [0, 4], [1, 1], [0, 1]])
    expected = torch.nn.functional.normalize(torch.tensor([[4.0, 1.0], [0.0, 6.0]]), dim=1)
    assert torch.allclose(centroids(features, labels), expected)
