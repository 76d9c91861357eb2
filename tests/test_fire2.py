"""FIRe²: per-identity fine-grained clustering, the attribute-aware target, FAR's recomposition by hand, the cosine
classifier's initialisation, the unchanged test-time model, centralized and federated training, PEM with FAR."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import Config, ConfigError, load_config
from common.data.loading import load_dataset
from common.data.partition import partition_by_camera
from common.engine import resolve_device
from common.fire2 import attribute_aware_loss, attribute_soft_target, far_partners, mine_fine_ids, recompose
from common.methods import get_method
from common.methods.base import LocalJob
from common.models.fire2 import FineGrainedClassifier


def _two_looks(look_a: torch.Tensor, look_b: torch.Tensor, per_look: int = 6) -> torch.Tensor:
    """``per_look`` noisy copies of each of two looks (2·per_look, D)."""
    torch.manual_seed(0)
    rows = [look_a] * per_look + [look_b] * per_look
    return torch.stack(rows) + 0.01 * torch.randn(2 * per_look, len(look_a))


def test_per_identity_clustering_splits_looks_and_never_merges_two_people(tiny_config):
    eye = torch.eye(8)
    person = _two_looks(eye[0], eye[1])
    # identity 7 looks exactly like identity 3: one clustering of all features would merge them
    features = torch.cat([person, person, eye[2:3]])
    identities = np.array([3] * 12 + [7] * 12 + [9])
    fine = mine_fine_ids(features, identities, tiny_config)
    assert fine.count == 5  # two looks for each twin, one cluster for the single image
    for fine_id in range(fine.count):
        members = identities[fine.fine_ids.numpy() == fine_id]
        assert len(set(members)) == 1 and members[0] == fine.owner[fine_id]
    assert fine.fine_ids.tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6 + [4]
    assert fine.owner.tolist() == [3, 3, 7, 7, 9]


def test_dbscan_outliers_become_fine_ids_of_their_own(tiny_run_config):
    # small k1: a loner is in no one's k-reciprocal set, so DBSCAN leaves it unclustered
    config = load_config({**tiny_run_config, "fire2-min-samples": 2, "fire2-k1": 3, "fire2-k2": 1})
    eye = torch.eye(8)
    features = torch.cat([_two_looks(eye[0], eye[0], per_look=2), eye[5:6], eye[6:7]])  # a look of 4, two loners
    fine = mine_fine_ids(features, np.zeros(6, dtype=np.int64), config)
    assert fine.fine_ids.tolist() == [0, 0, 0, 0, 1, 2]


def _looks_per_identity(sizes, seed, dim=16):
    """Random features (N, dim) and identity labels (N,): identity g has sizes[g] images drawn around 1–4 random
    looks with a random spread each, so its Jaccard distances fall on both sides of eps (several fine ids, some
    DBSCAN outliers when min_samples > 1)."""
    rng = np.random.default_rng(seed)
    rows, identities = [], []
    for identity, size in enumerate(sizes):
        looks = rng.normal(size=(rng.integers(1, 5), dim))
        pick = rng.integers(0, len(looks), size=size)
        rows.append(looks[pick] + rng.uniform(0.1, 1.0) * rng.normal(size=(size, dim)))
        identities += [identity * 3 + 1] * size  # identity labels need not be 0..G−1
    order = rng.permutation(sum(sizes))  # an identity's images are not contiguous
    return torch.tensor(np.concatenate(rows)[order], dtype=torch.float32), np.array(identities)[order]


def _fine_ids_by_sklearn(features, identities, k1, k2, eps, min_samples):
    """``mine_fine_ids``' labels as first written: per identity, the sparse ``jaccard_distance`` and scikit-learn's
    DBSCAN, each outlier a cluster of its own, fine ids numbered by identity, then by first member.  (Since then
    small sets take the dense Jaccard path and DBSCAN runs as connected components where it can.)"""
    from sklearn.cluster import DBSCAN

    from common.clustering import jaccard_distance, relabel

    x = F.normalize(features, dim=1)
    fine_ids, count = np.empty(len(identities), dtype=np.int64), 0
    for identity in np.unique(identities):
        rows = np.flatnonzero(identities == identity)
        n = len(rows)
        labels = np.zeros(1, dtype=np.int64)
        if n > 1:
            distance = jaccard_distance(x[rows], min(k1, n - 1), min(k2, n), dense=False)
            labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distance)
            labels[labels == -1] = labels.max() + 1 + np.arange((labels == -1).sum())
        labels = relabel(labels)
        fine_ids[rows] = labels + count
        count += labels.max() + 1
    return fine_ids


# (8, 3, 0.5): distances of exactly 0.5 in exact arithmetic are common there (query-expanded rows of thirds), so
# the labels match only because the dense and sparse paths give bitwise the same float32 distances
@pytest.mark.parametrize("k1,k2,eps,min_samples,seed", [(20, 6, 0.4, 1, 0), (20, 6, 0.4, 1, 1), (8, 3, 0.5, 1, 2),
                                                        (20, 6, 0.3, 2, 3), (5, 1, 0.6, 3, 4)])
def test_fine_ids_equal_the_sparse_jaccard_and_sklearn_dbscan_path(k1, k2, eps, min_samples, seed):
    sizes = [1, 2, 3, 5, 7, 12, 17, 21, 22, 35, 60, 90] + list(np.random.default_rng(seed).integers(1, 70, size=20))
    features, identities = _looks_per_identity(sizes, seed)
    config = Config(fire2_k1=k1, fire2_k2=k2, fire2_eps=eps, fire2_min_samples=min_samples)
    threads = torch.get_num_threads()
    fine = mine_fine_ids(features, identities, config)
    assert torch.get_num_threads() == threads  # the per-identity loop's one thread is restored
    expected = _fine_ids_by_sklearn(features, identities, k1, k2, eps, min_samples)
    np.testing.assert_array_equal(fine.fine_ids.numpy(), expected)
    assert fine.count > 2 * len(sizes)  # the data gives several fine ids per identity, not one each
    first = [np.flatnonzero(expected == f)[0] for f in range(fine.count)]
    np.testing.assert_array_equal(fine.owner.numpy(), identities[first])


def test_cosine_classifier_starts_at_the_cluster_centres(tiny_config):
    eye = torch.eye(8)
    features = 3.0 * _two_looks(eye[0] + eye[3], eye[1])  # not normalised: centres are means of normalised rows
    fine = mine_fine_ids(features, np.zeros(12, dtype=np.int64), tiny_config)
    assert fine.count == 2
    normalised = F.normalize(features, dim=1)
    expected = torch.stack([F.normalize(normalised[fine.fine_ids == f].mean(0), dim=0) for f in range(fine.count)])
    classifier = FineGrainedClassifier(fine.centres)
    assert torch.allclose(classifier.weight.data, expected, atol=1e-6)
    # each centre's own logit is the cosine of a feature with its centre
    assert torch.allclose(classifier(expected), expected @ expected.T, atol=1e-6)


def test_attribute_aware_target_puts_epsilon_on_the_identity_s_other_fine_ids():
    owner = torch.tensor([0, 0, 0, 1, 1, 2])  # identity 0: fine ids 0-2, identity 1: 3-4, identity 2: 5 alone
    target = attribute_soft_target(torch.tensor([1, 3, 5]), owner, epsilon=0.1)
    expected = torch.tensor([[0.05, 0.9, 0.05, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.9, 0.1, 0.0],
                             [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # no other fine id: the one-hot target
    assert torch.allclose(target, expected) and torch.allclose(target.sum(1), torch.ones(3))
    cosine = torch.tensor([[0.2, 0.9, -0.1, 0.3, 0.0, 0.1], [0.1, 0.0, 0.2, 0.8, 0.5, 0.0],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    loss = attribute_aware_loss(cosine, torch.tensor([1, 3, 5]), owner, scale=16.0, epsilon=0.1)
    assert torch.isclose(loss, -(expected * torch.log_softmax(16.0 * cosine, dim=1)).sum(1).mean())


def test_attribute_aware_target_spread_over_all_fine_ids_as_the_released_code():
    owner = torch.tensor([0, 0, 0, 1, 1])
    target = attribute_soft_target(torch.tensor([1, 3]), owner, epsilon=0.1, spread="all")
    expected = torch.tensor([[0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.9 + 0.05, 0.05]])
    assert torch.allclose(target, expected) and torch.allclose(target.sum(1), torch.ones(2))


def test_far_restyles_a_part_with_the_partner_s_statistics_by_hand():
    # two images, one channel, a 4×2 map cut into 2 parts of 2×2
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [2.0, 2.0]]],
                         [[[10.0, 10.0], [14.0, 14.0], [5.0, 7.0], [5.0, 7.0]]]], requires_grad=True)
    out = recompose(maps, torch.tensor([0]), torch.tensor([[1], [1]]))
    # part 0 of image 0: mean 2.5, std √1.25 → content (x − 2.5)/√1.25; image 1's part 0: mean 12, std 2
    content = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / (1.25 + 1e-6) ** 0.5
    assert torch.allclose(out[0, 0, :2].flatten(), content * (4.0 + 1e-6) ** 0.5 + 12.0, atol=1e-5)
    # part 1 of image 0: values 0, 0, 2, 2 (mean 1, std 1); image 1's part 1: mean 6, std 1
    assert torch.allclose(out[0, 0, 2:].flatten(), torch.tensor([5.0, 5.0, 7.0, 7.0]), atol=1e-5)
    part = out[0, 0, :2]
    assert torch.isclose(part.mean(), torch.tensor(12.0)) and torch.isclose(part.std(correction=0),
                                                                             torch.tensor(2.0), atol=1e-5)
    # the partner's statistics are detached: no gradient reaches image 1
    out.sum().backward()
    assert torch.count_nonzero(maps.grad[1]) == 0


def test_far_partners_have_another_fine_id():
    fine_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    anchors, partners, valid = far_partners(fine_ids, parts=2, copies=2, generator=torch.Generator().manual_seed(0))
    assert anchors.tolist() == list(range(6)) * 2 and partners.shape == (2, 12) and valid.all()
    assert (fine_ids[partners] != fine_ids[anchors]).all()
    assert (partners[:, :6] != partners[:, 6:]).all()  # the two copies of an image draw distinct partners
    # fine id 1's image has 5 candidates, fine id 2's three have 3 each: 4 copies leave them without a 4th partner
    _, _, valid = far_partners(fine_ids, parts=1, copies=4, generator=torch.Generator().manual_seed(0))
    assert valid.reshape(4, 6)[3].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("pooling,factor", [("avg", 1), ("max+avg", 2)])
def test_test_time_model_is_the_plain_backbone_and_bnneck(tiny_run_config, pooling, factor):
    """FFM's classifier and FAR's head never reach the shared or test-time model: with average pooling FIRe²'s
    global model is FedAvg's (same keys, shapes and test features); max + average pooling doubles the feature."""
    config = load_config({**tiny_run_config, "method": "fire2", "fire2-pooling": pooling})
    fire2, fedavg = get_method("fire2"), get_method("fedavg")
    shared = fire2.initial_shared_state(config)
    plain = fedavg.initial_shared_state(load_config({**tiny_run_config, "method": "fedavg"}))
    assert set(shared) == set(plain) and not any("far" in k or "fine" in k for k in shared)
    images = torch.rand(3, 3, 32, 16)
    model = fire2.global_model(config, shared).eval()
    features = model(images)
    assert features.shape == (3, 512 * factor)
    if pooling == "avg":
        assert all(shared[k].shape == plain[k].shape for k in shared)
        reference = fedavg.global_model(config, shared).eval()
        assert torch.equal(features, reference(images))


def _job(config, shared, private=None, server_round=1):
    dataset = load_dataset(config)
    return LocalJob(config=config, partition=partition_by_camera(dataset.train)[0], shared=shared,
                    private=private or {}, server_round=server_round, lr=config.lr, seed=5,
                    device=resolve_device("cpu"), data_root=dataset.root)


def test_federated_round_keeps_fine_ids_and_far_head_on_the_camera(tiny_run_config):
    config = load_config({**tiny_run_config, "method": "fire2", "fire2-start-epoch": 1})
    method = get_method("fire2")
    shared = method.initial_shared_state(config)
    first = method.local_round(_job(config, shared))  # round 1 is before the start round: identity CE alone
    assert {"ce", "accuracy"} <= set(first.metrics) and not {"triplet", "ffm", "far"} & set(first.metrics)
    second = method.local_round(_job(config, first.shared, first.private, server_round=2))
    assert {"ce", "triplet", "ffm", "far", "fire2_fine_ids"} <= set(second.metrics)
    assert second.metrics["fire2_fine_ids"] >= _job(config, shared).partition.num_ids
    assert set(second.shared) == set(shared) and set(second.private) == {"classifier", "far-head"}
    # the FAR head came back from round 1's private state and trained on
    key = "classifier.weight"
    assert not torch.equal(second.private["far-head"][key], first.private["far-head"][key])


def test_two_round_fire2_federation_on_synthetic_cameras(tiny_run_config):
    from camfed.inprocess import InProcessGrid
    from client.app import app as client_app
    from common.federated.server import run_federation

    config = load_config({**tiny_run_config, "method": "fire2", "fire2-start-epoch": 1})
    evaluations = run_federation(InProcessGrid(client_app, 3, config.to_run_config()), config)
    assert [e["round"] for e in evaluations] == [1, 2]
    out = Path(tiny_run_config["output-dir"])
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["clients"] == 3 and rounds[-1]["fire2_fine_ids"] >= 4
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["model"]["bottleneck.weight"].shape == (1024,)  # max + average pooling of ResNet-18


def test_centralized_fire2_trains_from_the_start_epoch(tiny_run_config, capsys):
    from common.centralized import train_centralized

    config = load_config({**tiny_run_config, "method": "fire2", "epochs": 2, "fire2-start-epoch": 1,
                          "eval-every": 2})
    records = train_centralized(config)
    assert [r["epoch"] for r in records] == [2] and 0.0 <= records[0]["mAP"] <= 1.0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert "fire2_fine_ids" not in lines[0] and "fire2_fine_ids" in lines[1]


@pytest.mark.slow
def test_pem_with_far_adds_recomposed_positives(tiny_run_config):
    config = load_config({**tiny_run_config, "method": "pem", "pem-variant": "scm", "fire2-far-with-pem": True,
                          "fire2-start-epoch": 0})
    method = get_method("pem")
    shared = method.initial_shared_state(config)
    assert not any(k.startswith("far_head.") for k in shared)
    result = method.local_round(_job(config, shared))
    assert result.metrics["far"] > 0 and result.metrics["pem_cycle"] > 0
    assert {"classifier", "far-head", "expert"} <= set(result.private) and set(result.shared) == set(shared)


@pytest.mark.parametrize("overrides,key", [
    ({"fire2-eps": 1.0}, "fire2-eps"), ({"fire2-epsilon": -0.1}, "fire2-epsilon"), ({"fire2-parts": 0}, "fire2-parts"),
    ({"fire2-far-with-pem": True, "method": "fedavg"}, "fire2-far-with-pem"),
    ({"fire2-pooling": "gem"}, "fire2-pooling"),
])
def test_bad_fire2_keys_name_the_key(tiny_run_config, overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config({**tiny_run_config, **overrides})


def test_too_many_parts_for_the_feature_map_is_one_clear_error(tiny_run_config):
    config = load_config({**tiny_run_config, "method": "fire2", "fire2-parts": 3, "fire2-start-epoch": 0})
    method = get_method("fire2")
    with pytest.raises(ConfigError, match="fire2-parts"):  # ResNet-18 at 32×16, last stride 1: 2 rows
        method.local_round(_job(config, method.initial_shared_state(config)))
