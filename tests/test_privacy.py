"""Privacy: a client's replies hold only the shared weights and scalar metrics.

No classifier, no features, no images, no identity labels: every array in a reply has a key and
shape of the shared model (backbone + BNNeck), and every metric is one number with a known name.
The one declared exception: with ``calr-share-centroids = true`` a CALR reply also carries its local
cluster centroids, and exactly those.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from camfed.inprocess import InProcessGrid
from client.app import app as client_app
from common.config import load_config
from common.federated.arrays import state_to_arrays
from common.federated.data import camera_partition, load_node_dataset
from common.federated.server import run_federation
from common.federated.state import PrivateStateStore, state_dir
from common.methods import get_method

ALLOWED_METRICS = {"loss", "ce", "triplet", "accuracy", "prox", "local-seconds", "num-examples", "camera"}
# CALR: number of local clusters, outlier share; with calr-share-centroids the cross-camera memory loss
ALLOWED_METRICS |= {"calr_clusters", "calr_outlier_fraction", "calr_cross_camera"}
ALLOWED_METRICS |= {"seconds_local", "moon"}  # seconds of the local training stage; MOON's contrastive term
# PEM: its two losses, their gradient ratio, the attention's spread, the seconds of stages 1 and 2
ALLOWED_METRICS |= {"pem_pose", "pem_cycle", "pem_grad_ratio", "pem_attention_std", "pem_attention_image_std",
                    "seconds_expert", "seconds_pem_maps", "seconds_pem"}
ALLOWED_METRICS |= {"ffm", "far", "fire2_fine_ids"}  # FIRe²: its two losses, the camera's number of fine-grained ids
# the update's L2 norm before DP clipping, and whether it was clipped (report-update-norm; docs/federation.md)
ALLOWED_METRICS |= {"update-norm", "update-clipped"}


def assert_only_shared_weights_and_scalars(reply: Message, shared: dict[str, torch.Tensor],
                                           upload: frozenset[str] = frozenset()) -> None:
    """The check applied to every reply; ``upload``: the extra arrays the method declares (none by default)."""
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    records = {"arrays", "upload"} if upload else {"arrays"}
    assert set(content.keys()) == records | {"metrics"}
    assert set(content.array_records) == records and set(content.metric_records) == {"metrics"}
    if upload:
        assert set(content["upload"]) == upload
    assert not content.config_records
    arrays: ArrayRecord = content["arrays"]
    assert list(arrays) == list(shared)  # exactly the shared keys: no classifier.*, nothing extra
    assert not any(key.startswith("classifier") for key in arrays)
    for key, array in arrays.items():
        assert tuple(array.shape) == tuple(shared[key].shape), key
        assert array.dtype == str(shared[key].numpy().dtype), key
    assert sum(a.numpy().size for a in arrays.values()) == sum(t.numel() for t in shared.values())
    metrics: MetricRecord = content["metrics"]
    assert set(metrics) <= ALLOWED_METRICS, set(metrics) - ALLOWED_METRICS
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())


def _train_message(shared: dict[str, torch.Tensor], server_round: int = 1) -> Message:
    config = ConfigRecord({"server-round": server_round, "lr": 3.5e-4, "run-tag": "0123abcd"})
    return Message(RecordDict({"arrays": state_to_arrays(shared), "config": config}), dst_node_id=1001,
                   message_type=MessageType.TRAIN)


def test_train_handler_reply_holds_only_shared_weights_and_scalars(tiny_run_config, tiny_config):
    InProcessGrid(client_app, 3, tiny_run_config)  # sets Flower's task identity for building messages
    shared = get_method("fedavg").initial_shared_state(tiny_config)
    context = Context(run_id=1, node_id=1001, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=tiny_run_config)
    reply = client_app(_train_message(shared), context)
    assert_only_shared_weights_and_scalars(reply, shared)
    partition = camera_partition(load_node_dataset(tiny_config), 0, 3)
    assert reply.content["metrics"]["num-examples"] == len(partition.records)
    # the classifier was trained, and stayed on the client
    private = PrivateStateStore(state_dir(tiny_config, partition.camid)).load("0123abcd", before_round=2)
    assert private["classifier"]["weight"].shape == (partition.num_ids, 512)


def test_every_reply_of_a_federated_run_is_clean(tiny_run_config):
    run_config = {**tiny_run_config, "method": "fedprox", "num-server-rounds": 1}
    config = load_config(run_config)
    shared = get_method("fedprox").initial_shared_state(config)
    seen = []

    def inspecting(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        assert_only_shared_weights_and_scalars(reply, shared)
        seen.append(reply)
        return reply

    run_federation(InProcessGrid(inspecting, 3, run_config), config)
    assert len(seen) == 3


@pytest.mark.parametrize("share", [False, True])
def test_calr_reply_holds_only_shared_weights_and_cluster_counts(tiny_run_config, share):
    """Federated CALR replies with the shared weights (backbone, GeM, BNNeck) and scalars; pseudo-labels,
    features and centroids stay on the camera.  With ``calr-share-centroids``, the reply also holds the
    camera's L2-normalised centroids (one per local cluster) and nothing else; its pseudo-labels stay."""
    run_config = {**tiny_run_config, "method": "calr", "calr-share-centroids": share}
    config = load_config(run_config)
    InProcessGrid(client_app, 3, run_config)
    shared = get_method("calr").initial_shared_state(config)
    assert "gem.p" in shared
    context = Context(run_id=1, node_id=1001, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=run_config)
    reply = client_app(_train_message(shared), context)
    assert_only_shared_weights_and_scalars(reply, shared, frozenset({"centroids"}) if share else frozenset())
    assert {"calr_clusters", "calr_outlier_fraction"} <= set(reply.content["metrics"])
    partition = camera_partition(load_node_dataset(config), 0, 3)
    private = PrivateStateStore(state_dir(config, partition.camid)).load("0123abcd", before_round=2)
    if not share:
        assert private == {}
        return
    centres = torch.from_numpy(reply.content["upload"]["centroids"].numpy())
    assert centres.shape == (reply.content["metrics"]["calr_clusters"], shared["bottleneck.weight"].shape[0])
    assert torch.allclose(centres.norm(dim=1), torch.ones(len(centres)), atol=1e-5)
    assert set(private) == {"labels"} and private["labels"].max() + 1 == len(centres)


def test_fire2_reply_holds_only_shared_weights_and_scalars(tiny_run_config):
    """Federated FIRe² (active from its first round): fine-grained ids, their centres and classifier never leave
    the camera nor stay in its state; the identity classifier and FAR's head stay on it."""
    run_config = {**tiny_run_config, "method": "fire2", "fire2-start-epoch": 0}
    config = load_config(run_config)
    InProcessGrid(client_app, 3, run_config)
    shared = get_method("fire2").initial_shared_state(config)
    context = Context(run_id=1, node_id=1001, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=run_config)
    reply = client_app(_train_message(shared), context)
    assert_only_shared_weights_and_scalars(reply, shared)
    assert {"ffm", "far", "fire2_fine_ids"} <= set(reply.content["metrics"])
    partition = camera_partition(load_node_dataset(config), 0, 3)
    private = PrivateStateStore(state_dir(config, partition.camid)).load("0123abcd", before_round=2)
    assert set(private) == {"classifier", "far-head"}


def test_query_reply_holds_only_the_partition_id(tiny_run_config):
    InProcessGrid(client_app, 3, tiny_run_config)  # sets Flower's task identity for building messages
    context = Context(run_id=1, node_id=1001, node_config={"partition-id": 2, "num-partitions": 3},
                      state=RecordDict(), run_config=tiny_run_config)
    query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1001, message_type=MessageType.QUERY)
    reply = client_app(query, context)
    assert not reply.has_error() and set(reply.content.keys()) == {"metrics"}
    assert dict(reply.content["metrics"]) == {"partition-id": 2}
