"""CALR: refinement by hand, its networks, centralized training without labels, federated by camera."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.calr import drop_probability, refine
from common.config import ConfigError, load_config
from common.data.records import ImageRecord
from common.models.calr import CameraClassifier, GeM, reverse_gradient

TINY_CALR = {"method": "calr", "calr-intra-epochs": 1, "epochs": 2, "calr-align-epochs": 1}


def test_refine_drops_pivot_camera_members_outside_the_pivot_s_local_cluster():
    #                    0   1   2   3   4   5   6   7
    global_ = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    camids = np.array([1, 1, 1, 2, 2, 1, 2, 2])
    local = np.array([4, 4, 5, 9, -1, 7, 8, 8])  # per-camera label spaces
    density = np.array([1.0, 3.0, 2.0, 9.0, 0.5, 1.0, 2.0, 1.0])
    # cluster 0: pivot = 3 (densest with a local cluster, camera 2, local 9); camera-2 member 4 is a local
    # outlier, so outside the pivot's local cluster -> dropped; camera-1 members are kept.
    # cluster 1: pivot = 6 (camera 2, local 8); 7 shares it -> kept; 5 is from camera 1 -> kept.
    labels, dropped = refine(global_, density, local, camids, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, -1, 1, 1, 1])
    assert dropped == 1
    # with probability 0 nothing is dropped
    labels, dropped = refine(global_, density, local, camids, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(labels, global_) and dropped == 0


def test_refine_with_a_split_pivot_camera():
    global_ = np.array([0, 0, 0, 0, -1])
    camids = np.array([1, 1, 1, 2, 1])
    local = np.array([2, 3, 2, 0, 2])
    density = np.array([5.0, 1.0, 1.0, 1.0, 9.0])
    labels, dropped = refine(global_, density, local, camids, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(labels, [0, -1, 0, 0, -1])  # 1 is in camera 1 but in local cluster 3
    assert dropped == 1


def test_self_paced_drop_probability():
    assert drop_probability(0, 50, "cosine") == 1.0
    assert drop_probability(49, 50, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 150)))
    assert drop_probability(10, 50, "constant") == 1.0


def test_gem_and_gradient_reversal():
    x = torch.rand(2, 3, 4, 2) + 0.1
    assert torch.allclose(GeM(1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(GeM(3.0)(x), x.pow(3).mean(dim=(2, 3)).pow(1 / 3), atol=1e-6)
    y = torch.ones(3, requires_grad=True)
    (reverse_gradient(y, 2.0) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(y.grad, torch.tensor([-2.0, -4.0, -6.0]))
    head = CameraClassifier(8, 5, hidden=100)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [100, 100, 5]


def test_bad_calr_keys_name_the_key():
    with pytest.raises(ConfigError, match="calr-intra-eps"):
        load_config({"calr-intra-eps": 1.5})
    with pytest.raises(ConfigError, match="calr-refine-schedule"):
        load_config({"calr-refine-schedule": "linear"})
    with pytest.raises(ConfigError, match="calr-max-distance"):  # Infomap needs edge weights 1 − d >= 0
        load_config({"calr-max-distance": 1.5})


def shuffled_identities(dataset):
    rng = np.random.default_rng(7)
    pids = rng.permutation([r.pid for r in dataset.train])
    train = [ImageRecord(r.path, int(p), r.camid) for r, p in zip(dataset.train, pids)]
    assert any(a.pid != b.pid for a, b in zip(train, dataset.train))
    return dataclasses.replace(dataset, train=train)


def test_centralized_calr_never_reads_identity_labels(tiny_run_config, tmp_path, monkeypatch):
    """Training twice, the second time with the training identities shuffled, gives bit-identical weights;
    only the clustering report (which compares pseudo-labels with true identities) changes."""
    import common.calr as calr
    from common.centralized import train_centralized

    runs = {}
    for name in ("plain", "shuffled"):
        if name == "shuffled":
            original = calr.load_dataset
            monkeypatch.setattr(calr, "load_dataset",
                                lambda config, original=original: shuffled_identities(original(config)))
        out = tmp_path / name
        records = train_centralized(load_config({**tiny_run_config, **TINY_CALR, "output-dir": str(out)}))
        assert [r["epoch"] for r in records] == [1, 2] and all(0 <= r["mAP"] <= 1 for r in records)
        runs[name] = (torch.load(out / "checkpoint.pt", weights_only=False),
                      [json.loads(line) for line in (out / "clustering.jsonl").read_text().splitlines()])
    (plain, plain_log), (shuffled, shuffled_log) = runs["plain"], runs["shuffled"]
    assert plain["model"].keys() == shuffled["model"].keys() and "gem.p" in plain["model"]
    for key in plain["model"]:
        assert torch.equal(plain["model"][key], shuffled["model"][key]), key
    assert torch.equal(plain["local_labels"], shuffled["local_labels"])
    stages = [r["stage"] for r in plain_log]
    assert stages == ["intra", "local"] * 3 + ["global", "refined"] * 2
    assert [r["clusters"] for r in plain_log] == [r["clusters"] for r in shuffled_log]
    assert [r["precision"] for r in plain_log] != [r["precision"] for r in shuffled_log]


def test_centralized_calr_ablations_and_resume(tiny_run_config, tmp_path):
    from common.centralized import train_centralized

    out = tmp_path / "ablation"
    base = {**tiny_run_config, **TINY_CALR, "calr-refine": False, "calr-align-epochs": 0, "epochs": 1,
            "output-dir": str(out)}
    train_centralized(load_config(base))
    log = [json.loads(line) for line in (out / "clustering.jsonl").read_text().splitlines()]
    assert "refined" not in [r["stage"] for r in log]
    first = torch.load(out / "checkpoint.pt", weights_only=False)
    assert first["epoch"] == 1 and first["method"] == "calr"
    records = train_centralized(load_config({**base, "epochs": 2, "resume": True}))
    assert [r["epoch"] for r in records] == [2]
    log = [json.loads(line) for line in (out / "clustering.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in log if r["stage"] == "global"] == [1, 2]  # stage 1 not rerun on resume
    assert len([r for r in log if r["stage"] == "local"]) == 3


def _job(config, shared, camera=0):
    from common.data.loading import load_dataset
    from common.data.partition import partition_by_camera
    from common.engine import resolve_device
    from common.methods.base import LocalJob

    dataset = load_dataset(config)
    return LocalJob(config=config, partition=partition_by_camera(dataset.train)[camera], shared=shared, private={},
                    server_round=1, lr=config.lr, seed=5, device=resolve_device("cpu"), data_root=dataset.root)


def test_federated_calr_local_round_trains_on_pseudo_labels_and_keeps_nothing_private(tiny_run_config):
    from common.methods import get_method

    config = load_config({**tiny_run_config, "method": "calr"})
    method = get_method("calr")
    shared = method.initial_shared_state(config)
    assert "gem.p" in shared and not any(k.startswith("classifier") for k in shared)
    result = method.local_round(_job(config, shared))
    assert set(result.shared) == set(shared) and result.private == {}
    assert not torch.equal(result.shared["backbone.stem.0.weight"], shared["backbone.stem.0.weight"])
    assert result.metrics["calr_clusters"] >= 1 and result.metrics["loss"] > 0
    assert 0.0 <= result.metrics["calr_outlier_fraction"] <= 1.0
    assert result.num_examples == len(_job(config, shared).partition.records)


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_cross_camera_clusters_of_centroids_by_hand(tiny_config):
    """Server side of calr-share-centroids: Infomap on the centroids, pivot refinement (the pivot's camera
    keeps only the pivot), clusters within one camera dropped."""
    from common.methods.calr import cross_camera_clusters

    a, b, c, lone = torch.eye(8)[:4]
    noise = torch.eye(8)[4:]
    centres = torch.nn.functional.normalize(torch.stack([
        a + 0.05 * noise[0], a + 0.05 * noise[1],  # person A twice in camera 1: the densest pair
        a + 0.3 * noise[2], a + 0.3 * noise[3],  # A in cameras 2 and 3
        b, b + 0.1 * noise[0],  # B in cameras 1 and 2
        c, c + 0.1 * noise[1],  # C twice in camera 3 only
        lone]), dim=1)
    camids = np.array([1, 1, 2, 3, 1, 2, 3, 3, 2])
    config = dataclasses.replace(tiny_config, num_server_rounds=4)
    labels, dropped = cross_camera_clusters(centres, camids, 1, config)  # round 1: drop probability 1
    assert dropped == 2  # one of A's camera-1 centroids, one of C's
    assert labels[0] != labels[1] and max(labels[0], labels[1]) >= 0 and min(labels[0], labels[1]) == -1
    a_label = max(labels[0], labels[1])
    assert labels[2] == labels[3] == a_label and labels[4] == labels[5] != a_label
    assert list(labels[6:]) == [-1, -1, -1] and labels.max() == 1  # C in one camera, the lone centroid
    unrefined, dropped = cross_camera_clusters(centres, camids, 1, dataclasses.replace(config, calr_refine=False))
    assert dropped == 0 and len(set(unrefined[:4].tolist())) == 1 and list(unrefined[6:]) == [-1, -1, -1]


def test_centroid_download_maps_a_camera_s_previous_clusters(tiny_run_config):
    from common.methods.calr import (
        CENTROID_CAMERA,
        CENTROID_CLUSTER,
        CROSS_CENTROIDS,
        LOCAL_LABELS,
        cross_camera_targets,
    )

    config = load_config({**tiny_run_config, "method": "calr", "calr-share-centroids": True})
    download = {CROSS_CENTROIDS: _unit([1.0, 0.0], [0.0, 1.0]), CENTROID_CAMERA: torch.tensor([1, 1, 2, 2, 2]),
                CENTROID_CLUSTER: torch.tensor([-1, 0, 1, -1, 0])}
    job = _job(config, {}, camera=1)  # camera 2: uploaded 3 centroids, its clusters 0, 1, 2 → 1, none, 0
    camid = job.partition.camid
    assert camid == 2
    n = len(job.partition.records)
    previous = np.array([0, 1, 2, -1] * (n // 4) + [0] * (n % 4))
    job = dataclasses.replace(job, download=download, private={LOCAL_LABELS: torch.from_numpy(previous)})
    targets = cross_camera_targets(job, config)
    np.testing.assert_array_equal(targets.labels[:4], [1, -1, 0, -1])
    assert torch.equal(targets.memory.features, download[CROSS_CENTROIDS])
    # a camera whose last upload is not in the download (other count) or without one gets nothing
    stale = dataclasses.replace(job, private={LOCAL_LABELS: torch.from_numpy(np.minimum(previous, 1))})
    assert cross_camera_targets(stale, config) is None
    assert cross_camera_targets(dataclasses.replace(job, private={}), config) is None


def test_calr_federation_sharing_centroids_trains_across_cameras(tiny_run_config):
    """Two rounds of federated CALR: round 1 uploads centroids, the server clusters them across cameras, round 2
    trains against them.  Every reply holds the shared weights, scalars and the declared centroids, nothing
    else.  (The tiny features are far apart: every kNN edge of similarity >= 0 is kept so that centroids merge.)"""
    from test_privacy import assert_only_shared_weights_and_scalars

    from camfed.inprocess import InProcessGrid
    from client.app import app as client_app
    from common.federated.server import run_federation
    from common.methods import get_method

    run_config = {**tiny_run_config, "method": "calr", "calr-share-centroids": True, "num-server-rounds": 2,
                  "calr-max-distance": 1.0}
    config = load_config(run_config)
    shared, replies = get_method("calr").initial_shared_state(config), []

    def inspecting(message, context):
        reply = client_app(message, context)
        assert_only_shared_weights_and_scalars(reply, shared, frozenset({"centroids"}))
        replies.append(reply)
        return reply

    evaluations = run_federation(InProcessGrid(inspecting, 3, run_config), config)
    assert [e["round"] for e in evaluations] == [1, 2] and len(replies) == 6
    out = Path(tiny_run_config["output-dir"])
    first, second = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert first["calr_shared_centroids"] >= 3 and first["calr_cross_camera_clusters"] >= 1
    assert first["calr_cross_camera"] == 0 and second["calr_cross_camera"] > 0
    assert second["bytes_down_per_client"] > first["bytes_down_per_client"]  # the cross-camera centroids
    assert all(r["clients"] == 3 and r["calr_clusters"] >= 1 for r in (first, second))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["method"] == "calr" and "gem.p" in checkpoint["model"]
