"""evaluate_rank / evaluate_features against a slow loop reference; extract_features."""

import numpy as np
import pytest
import torch

from common import evaluation
from common.evaluation import compute_distance, evaluate_features, evaluate_rank, extract_features


def reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, q_clothes=None, g_clothes=None,
              protocol="standard"):
    """Obviously-correct loop: stable sort (ties by gallery index), drop same pid+camera, and under the
    cloth-changing protocol also same pid+clothes, under same-clothes also same pid with other clothes."""
    def dropped(i, j):
        if g_pids[j] != q_pids[i]:
            return False
        if g_camids[j] == q_camids[i]:
            return True
        if protocol == "cloth-changing":
            return g_clothes[j] == q_clothes[i]
        return protocol == "same-clothes" and g_clothes[j] != q_clothes[i]

    max_rank = min(max_rank, distmat.shape[1])
    aps, inps, cmcs = [], [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        kept = [j for j in order if not dropped(i, j)]
        hits = [g_pids[j] == q_pids[i] for j in kept]
        if not any(hits):
            continue
        found, precisions, last = 0, [], 0
        for rank, hit in enumerate(hits, start=1):
            if hit:
                found += 1
                precisions.append(found / rank)
                last = rank
        aps.append(sum(precisions) / found)
        inps.append(found / last)
        first = hits.index(True)
        cmcs.append([1.0 if k >= first else 0.0 for k in range(max_rank)])
    return {"mAP": np.mean(aps), "mINP": np.mean(inps), "cmc": np.mean(cmcs, axis=0),
            "num_valid_queries": len(aps)}


def assert_same(got, want):
    assert got["num_valid_queries"] == want["num_valid_queries"]
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-6)
    assert got["mINP"] == pytest.approx(want["mINP"], abs=1e-6)
    assert got["cmc"].shape == want["cmc"].shape
    np.testing.assert_allclose(got["cmc"], want["cmc"], atol=1e-6)


def random_ids(rng, n_query, n_gallery, n_ids=8, n_cams=3, distractors=10):
    """Query pids 1..n_ids; gallery has the same ids, pid-0 distractors and an unseen id."""
    q_pids = rng.integers(1, n_ids + 1, n_query)
    g_pids = rng.integers(1, n_ids + 2, n_gallery)  # id n_ids+1: never queried
    g_pids[rng.choice(n_gallery, distractors, replace=False)] = 0
    cams = rng.integers(1, n_cams + 1, n_query), rng.integers(1, n_cams + 1, n_gallery)
    return q_pids, g_pids, *cams


def test_hand_computed_case():
    # query pid 1 cam 1; gallery sorted by distance: g0 (pid1,cam1: junk), g1 (pid 2),
    # g2 (pid 1 cam 2: hit), g3 (pid 0), g4 (pid 1 cam 3: hit).
    # filtered ranking: g1, g2*, g3, g4* -> AP = (1/2 + 2/4)/2 = 0.5, INP = 2/4, first hit rank 2.
    # query pid 3 cam 2 has no match -> skipped.
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    out = evaluate_rank(dist, [1, 3], [1, 2, 1, 0, 1], [1, 2], [1, 1, 2, 1, 3], max_rank=3)
    assert out["num_valid_queries"] == 1
    assert out["mAP"] == pytest.approx(0.5)
    assert out["mINP"] == pytest.approx(0.5)
    np.testing.assert_allclose(out["cmc"], [0.0, 1.0, 1.0])


def test_hand_computed_ties_by_gallery_index():
    # all distances equal -> order g0, g1, g2; hit g2 (pid 1, cam 2) at rank 3: AP = 1/3.
    dist = np.zeros((1, 3), dtype=np.float32)
    out = evaluate_rank(dist, [1], [2, 0, 1], [1], [1, 1, 2], max_rank=3)
    assert out["mAP"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(out["cmc"], [0.0, 0.0, 1.0])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1])
def test_matches_reference_random(seed, decimals):
    rng = np.random.default_rng(seed)
    n_query, n_gallery = 40, 150
    ids = random_ids(rng, n_query, n_gallery)
    dist = rng.random((n_query, n_gallery), dtype=np.float32) - 0.5 * (seed % 2)
    if decimals is not None:  # many exact ties, also between true matches
        dist = np.round(dist, decimals).astype(np.float32)
    want = reference(dist, *ids, max_rank=20)
    before = dist.copy()
    assert_same(evaluate_rank(dist, *ids, max_rank=20), want)
    np.testing.assert_array_equal(dist, before)  # input untouched


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunk_boundaries(chunk_size):
    rng = np.random.default_rng(3)
    ids = random_ids(rng, 30, 90)
    dist = np.round(rng.random((30, 90)), 2).astype(np.float32)
    assert_same(evaluate_rank(dist, *ids, max_rank=10, chunk_size=chunk_size),
                reference(dist, *ids, max_rank=10))


@pytest.mark.parametrize("limit", ["_BLOCK_ELEMENTS", "_MAX_BUCKETS"])
def test_internal_blocks_inside_feature_chunks(monkeypatch, limit):
    # force ranking blocks of one row inside distance chunks of 7 rows
    monkeypatch.setattr(evaluation, limit, 30)
    rng = np.random.default_rng(8)
    ids = random_ids(rng, 20, 60)
    qf, gf = torch.randn(20, 8), torch.randn(60, 8)
    want = reference(compute_distance(qf, gf).numpy(), *ids, max_rank=10)
    assert_same(evaluate_features(qf, gf, *ids, max_rank=10, chunk_size=7), want)


def test_dtypes_and_torch_input():
    rng = np.random.default_rng(4)
    ids = random_ids(rng, 20, 60)
    dist = rng.random((20, 60))
    want = reference(dist, *ids)
    assert_same(evaluate_rank(dist, *ids), want)  # float64
    ints = (dist * 5).astype(np.int64)  # integer distances: heavy ties
    with pytest.warns(UserWarning):
        assert_same(evaluate_rank(torch.from_numpy(ints), *ids, max_rank=70),
                    reference(ints, *ids, max_rank=70))


def test_small_gallery_clamps_max_rank():
    rng = np.random.default_rng(5)
    ids = random_ids(rng, 10, 12, n_ids=3, distractors=2)
    dist = rng.random((10, 12), dtype=np.float32)
    with pytest.warns(UserWarning, match="max_rank"):
        out = evaluate_rank(dist, *ids, max_rank=50)
    assert out["cmc"].shape == (12,)
    assert_same(out, reference(dist, *ids, max_rank=50))
    assert out["cmc"][-1] == pytest.approx(1.0)


def test_errors():
    dist = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="no query"):  # all matches in the same camera
        evaluate_rank(dist, [1, 2], [1, 2, 0], [1, 1], [1, 1, 1], max_rank=3)
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_rank(dist, [1, 2], [1, 2], [1, 1], [1, 1, 1], max_rank=3)
    with pytest.raises(ValueError, match="2-D"):
        evaluate_rank(dist[0], [1, 2], [1, 2, 0], [1, 1], [2, 2, 2], max_rank=3)
    dist[0, 2] = np.nan  # not a true match: caught by the grid check
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(dist, [1, 2], [1, 2, 0], [1, 1], [2, 2, 2], max_rank=3)
    dist[0, 0] = np.inf  # a true match
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_rank(dist, [1, 2], [1, 2, 0], [1, 1], [2, 2, 2], max_rank=3)
    with pytest.raises(ValueError, match="metric"):
        compute_distance(torch.ones(2, 4), torch.ones(3, 4), metric="l1")


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_features_cosine_matches_reference(chunk_size):
    rng = np.random.default_rng(6)
    ids = random_ids(rng, 25, 80)
    qf, gf = torch.randn(25, 16), torch.randn(80, 16) * 3.0
    dist = compute_distance(qf, gf, "cosine").numpy()
    qn, gn = torch.nn.functional.normalize(qf), torch.nn.functional.normalize(gf)
    np.testing.assert_allclose(dist, (1 - qn @ gn.T).numpy(), atol=1e-5)
    got = evaluate_features(qf, gf, *ids, metric="cosine", max_rank=15, chunk_size=chunk_size)
    assert_same(got, reference(dist, *ids, max_rank=15))


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_features_euclidean_with_ties(chunk_size):
    rng = np.random.default_rng(7)
    ids = random_ids(rng, 25, 80)
    # small integer features: squared distances are exact integers, with many ties
    qf = torch.from_numpy(rng.integers(-2, 3, (25, 4))).float()
    gf = torch.from_numpy(rng.integers(-2, 3, (80, 4))).float()
    dist = torch.cdist(qf.double(), gf.double()).pow(2).numpy()
    np.testing.assert_allclose(compute_distance(qf, gf, "euclidean").numpy(), dist, atol=1e-5)
    got = evaluate_features(qf, gf, *ids, metric="euclidean", max_rank=15, chunk_size=chunk_size)
    assert_same(got, reference(dist, *ids, max_rank=15))


class _Linear(torch.nn.Module):
    """Model whose feature depends on the horizontal orientation of the image."""

    def forward(self, x):
        assert not self.training and not torch.is_grad_enabled()
        w = torch.arange(x.shape[3], dtype=x.dtype)
        return torch.stack([(x * w).sum((1, 2, 3)), x.sum((1, 2, 3))], dim=1)


def test_extract_features_flip_and_ids():
    images = torch.rand(5, 3, 4, 6)
    batches = [(images[:3], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 2]), ["a"] * 3),
               (images[3:], torch.tensor([4, 5]), torch.tensor([2, 3]), ["b"] * 2)]
    model = _Linear().train()
    feats, pids, camids = extract_features(model, batches, "cpu")
    assert model.training  # restored
    assert feats.dtype == torch.float32 and feats.shape == (5, 2)
    np.testing.assert_array_equal(pids, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(camids, [1, 1, 2, 2, 3])
    flipped, _, _ = extract_features(model, batches, "cpu", flip=True)
    with torch.no_grad():
        expected = _Linear().eval()(images) + _Linear().eval()(images.flip(3))
    torch.testing.assert_close(flipped, expected)
    assert not torch.allclose(flipped, 2 * feats)  # the flip changed the first feature
