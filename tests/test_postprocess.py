"""Post-processing (common/postprocess.py) against slow, dense, loop-based reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import postprocess as pp


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


def _sqdist64(x: np.ndarray) -> np.ndarray:
    """Dense squared Euclidean distances, one pair at a time, float64."""
    n = len(x)
    return np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])


# ----------------------------------------------------------------------------- references


def nfc_reference(features: torch.Tensor, k1: int, k2: int) -> np.ndarray:
    f = features.double().numpy()
    d = _sqdist64(f)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    out = f.copy()
    for i in range(len(f)):
        for j in order[i, :k1]:
            if i in order[j, :k2]:
                out[i] += f[j]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def rerank_reference(q: torch.Tensor, g: torch.Tensor, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s algorithm re-stated densely, loop by loop, in float64."""
    x = np.concatenate([q.double().numpy(), g.double().numpy()])
    n, nq = len(x), len(q)
    d = _sqdist64(x)
    original = np.transpose(d / np.max(d, axis=0))
    rank = np.argsort(original, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> list[int]:
        return [j for j in rank[i, :k + 1] if i in rank[j, :k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            h = reciprocal(c, int(np.around(k1 / 2)))
            if len(set(h) & set(r)) > 2 / 3 * len(h):
                expanded |= set(h)
        cols = sorted(expanded)
        w = np.exp(-original[i, cols])
        v[i, cols] = w / w.sum()
    if k2 != 1:
        v = np.array([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        for j in range(n):
            s = np.minimum(v[i], v[j]).sum()
            jaccard[i, j] = 1 - s / (2 - s)
    final = jaccard * (1 - lam) + original[:nq] * lam
    return final[:, nq:]


def knn_reference(x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = _sqdist64(x.double().numpy())
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


# ----------------------------------------------------------------------------- kNN and NFC


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("block", [7, pp.BLOCK])
def test_knn_matches_dense(monkeypatch, coarse, block):
    monkeypatch.setattr(pp, "BLOCK", block)
    x = _unit(120, 16, seed=1) * torch.rand(120, 1, generator=torch.Generator().manual_seed(2)).add(0.5)
    dist, idx = pp.knn(x, 5, chunk_size=13, coarse=coarse)
    ref_d, ref_i = knn_reference(x, 5)
    assert np.array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(dist.numpy(), ref_d, atol=1e-5)


def test_coarse_knn_recomputes_unverifiable_rows(monkeypatch):
    """Tight clusters: a 1-candidate margin cannot be verified, so rows fall back to the exact scan."""
    monkeypatch.setattr(pp, "BLOCK", 16)
    g = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    x = torch.nn.functional.normalize(centres.repeat_interleave(8, 0) + 0.02 * torch.randn(80, 16, generator=g), dim=1)
    sq = (x * x).sum(1)
    dist, idx, redone = pp._coarse_knn(x, sq, 3, 4, chunk_size=11)
    ref_d, ref_i = knn_reference(x, 3)
    assert redone > 0
    assert np.array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(dist.numpy(), ref_d, atol=1e-5)


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize(("k1", "k2"), [(2, 2), (3, 1), (1, 4)])
def test_nfc_matches_reference(monkeypatch, coarse, k1, k2):
    monkeypatch.setattr(pp, "BLOCK", 9)
    x = _unit(80, 16, seed=4)
    out = pp.nfc(x, k1, k2, chunk_size=7, coarse=coarse)
    np.testing.assert_allclose(out.numpy(), nfc_reference(x, k1, k2), atol=1e-5)
    assert not torch.allclose(out, x)  # something was aggregated


def test_nfc_errors():
    with pytest.raises(ValueError, match="features"):
        pp.nfc(torch.zeros(5))
    with pytest.raises(ValueError, match="need more than"):
        pp.nfc(_unit(3, 4, 0), k1=3)
    with pytest.raises(ValueError, match="k=0"):
        pp.knn(_unit(5, 4, 0), 0)


# ----------------------------------------------------------------------------- re-ranking


@pytest.mark.parametrize(("k1", "k2", "lam", "block", "chunk"), [
    (20, 6, 0.3, pp.BLOCK, 1024),
    (20, 6, 0.3, 17, 9),
    (5, 1, 0.0, 23, 16),
    (7, 3, 1.0, 50, 4),
])
def test_rerank_matches_reference(monkeypatch, k1, k2, lam, block, chunk):
    monkeypatch.setattr(pp, "BLOCK", block)
    q, g = _unit(30, 16, seed=5), _unit(80, 16, seed=6)
    out = pp.k_reciprocal_rerank(q, g, k1, k2, lam, chunk_size=chunk)
    assert out.shape == (30, 80) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), rerank_reference(q, g, k1, k2, lam), atol=1e-5)


def test_rerank_unnormalised_features_and_pair_chunks(monkeypatch):
    """Raw (unnormalised) features and tiny min-sum budgets that force one query row per chunk."""
    monkeypatch.setattr(pp, "PAIR_BUDGET", 5)
    gen = torch.Generator().manual_seed(7)
    q, g = torch.randn(12, 8, generator=gen) * 3, torch.randn(40, 8, generator=gen) * 3
    out = pp.k_reciprocal_rerank(q, g, 6, 3, 0.3)
    np.testing.assert_allclose(out.numpy(), rerank_reference(q, g, 6, 3, 0.3), atol=1e-5)


def test_row_ranges_respect_budgets():
    ranges = [r.tolist() for r in pp._row_ranges(torch.tensor([3, 3, 9, 1, 1, 1]), max_rows=2, max_pairs=6)]
    assert ranges == [[0, 1], [2], [3, 4], [5]]


def test_rerank_errors():
    with pytest.raises(ValueError, match="dimension"):
        pp.k_reciprocal_rerank(_unit(3, 4, 0), _unit(30, 5, 0))
    with pytest.raises(ValueError, match="k1=40"):
        pp.k_reciprocal_rerank(_unit(3, 4, 0), _unit(30, 4, 0), k1=40)
    with pytest.raises(ValueError, match="lambda_value"):
        pp.k_reciprocal_rerank(_unit(3, 4, 0), _unit(30, 4, 0), k1=3, lambda_value=1.5)
    with pytest.raises(ValueError, match="query_features"):
        pp.k_reciprocal_rerank(torch.zeros(0, 4), _unit(30, 4, 0))


# ----------------------------------------------------------------------------- flip / IPG / ID² / representative


def test_flip_average():
    f, g = torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 4.0], [0.0, 2.0]])
    expected = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert torch.allclose(pp.flip_average(f, g), expected)
    with pytest.raises(ValueError, match="flipped_features"):
        pp.flip_average(f, torch.zeros(3, 2))


def test_aggregate_generated():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gen = torch.tensor([[[0.0, 1.0], [0.0, 3.0]], [[1.0, 0.0], [-1.0, 0.0]]])  # means (0, 2) and (0, 0)
    out = pp.aggregate_generated(f, gen, eta=0.5)
    expected = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=1)
    assert torch.allclose(out, expected)
    with pytest.raises(ValueError, match="generated_features"):
        pp.aggregate_generated(f, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="generated_features"):
        pp.aggregate_generated(f, torch.zeros(2, 2))


def test_id2_hand_computed():
    features = torch.tensor([[1.0, 0.0], [0.0, 5.0], [2.0, 0.0], [7.0, 7.0]])
    pids = [4, 4, 9, -1]
    # id 4: normalised (1,0),(0,1); centre (0.5,0.5); both at sqrt(0.5).  id 9: one sample, distance 0.
    assert pp.id2(features, pids) == pytest.approx(np.sqrt(0.5) / 2, abs=1e-6)
    # re-normalised centre (1,1)/sqrt(2): distance sqrt(2 - sqrt(2)) for both samples of id 4.
    assert pp.id2(features, pids, normalise_centres=True) == pytest.approx(np.sqrt(2 - np.sqrt(2)) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="pids"):
        pp.id2(features, [1, 2])
    with pytest.raises(ValueError, match="pid >= 0"):
        pp.id2(features, [-1] * 4)


def test_representative_indices():
    features = torch.tensor([[0.0, 0.0], [9.0, 9.0], [1.0, 0.0], [10.0, 0.0], [5.0, 5.0], [4.0, 4.0], [6.0, 6.0]])
    pids = torch.tensor([5, 2, 5, 5, 7, 7, 7])
    # id 5: mean (11/3, 0) -> (1, 0) is nearest; id 2: single image; id 7: (5, 5) is the mean itself.
    assert pp.representative_indices(features, pids) == {2: 1, 5: 2, 7: 4}
    # tie: both images equidistant from their mean -> lowest index
    assert pp.representative_indices(torch.tensor([[0.0], [2.0]]), [3, 3]) == {3: 0}


# ----------------------------------------------------------------------------- generated images


def test_group_generated_images(tmp_path):
    for name in ["a_gen0.jpg", "a_gen10.jpg", "a_gen2.png", "b_gen0.jpg", "other_gen0.jpg", "a_gen1.txt"]:
        (tmp_path / name).write_bytes(b"")
    groups = pp.group_generated_images(tmp_path, ["query/a.jpg", "b.jpg"])
    assert [[p.name for p in g] for g in groups] == [["a_gen0.jpg", "a_gen2.png", "a_gen10.jpg"], ["b_gen0.jpg"]]
    with pytest.raises(ValueError, match="1 of 2 sources, e.g. c"):
        pp.group_generated_images(tmp_path, ["a.jpg", "c.jpg"])
    with pytest.raises(ValueError, match="not unique"):
        pp.group_generated_images(tmp_path, ["x/a.jpg", "y/a.jpg"])
    with pytest.raises(FileNotFoundError):
        pp.group_generated_images(tmp_path / "missing", ["a.jpg"])


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_load_generated_features(tmp_path, suffix):
    files = ["gen/b_gen1.jpg", "gen/a_gen0.jpg", "gen/b_gen0.jpg", "gen/a_gen1.jpg"]
    feats = np.arange(8, dtype=np.float32).reshape(4, 2)
    path = tmp_path / f"feats{suffix}"
    if suffix == ".npz":
        np.savez(path, files=np.array(files), features=feats)
    else:
        torch.save({"files": files, "features": torch.from_numpy(feats)}, path)
    out = pp.load_generated_features(path, ["a.jpg", "b.jpg"])
    assert out.shape == (2, 2, 2)
    assert torch.equal(out, torch.from_numpy(feats[[[1, 3], [2, 0]]]))
    with pytest.raises(ValueError, match="no generated images"):
        pp.load_generated_features(path, ["a.jpg", "z.jpg"])


def test_load_generated_features_errors(tmp_path):
    path = tmp_path / "uneven.npz"
    np.savez(path, files=np.array(["a_gen0.jpg", "a_gen1.jpg", "b_gen0.jpg"]), features=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="different numbers"):
        pp.load_generated_features(path, ["a.jpg", "b.jpg"])
    with pytest.raises(FileNotFoundError):
        pp.load_generated_features(tmp_path / "nope.npz", ["a.jpg"])
    np.savez(tmp_path / "nokeys.npz", names=np.array(["a_gen0.jpg"]))
    with pytest.raises(ValueError, match="'files' and 'features'"):
        pp.load_generated_features(tmp_path / "nokeys.npz", ["a.jpg"])
    (tmp_path / "f.csv").write_text("x")
    with pytest.raises(ValueError, match=r"\.npz or \.pt"):
        pp.load_generated_features(tmp_path / "f.csv", ["a.jpg"])
