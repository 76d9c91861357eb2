"""The ClientApp's work: one camera's local round.

Everything in the reply is checked here before it leaves the node: the shared weights must have
exactly the keys, shapes and dtypes of the global weights that arrived, metrics are scalars, and a
method's extra ``upload`` arrays (none for most methods) have exactly the names it declares.
The classifier and any other private state go to the camera's state directory instead.  With
``dp-clip-norm`` the update is clipped and noised here (``common.federated.privacy``); the shared weights
travel in ``transport-dtype`` both ways and are trained in float32.

``hold_reply`` is a fault-injection hook for tests only (``CAMFED_TEST_HOLD_REPLY``); it does nothing unless
that variable is set in the SuperNode's environment.  ``inject_fault`` is the benchmarks' fault injection
(config key ``fault-injection-scale``, 0 = off): the camera of partition 0 replies its weights scaled.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from common.config import Config, ConfigError, load_config
from common.engine import derived_seed, resolve_device
from common.federated.arrays import StateDict, arrays_to_state, conformity_error, signature, state_to_arrays
from common.federated.data import camera_partition, load_node_dataset, with_absolute_paths
from common.federated.privacy import private_reply
from common.federated.state import PrivateStateStore, state_dir
from common.methods import LocalJob, get_method

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"  # record names in messages
UPLOAD, DOWNLOAD = "upload", "download"  # a method's declared extra arrays: camera → server, server → cameras
PARTITION_KEY = "partition-id"
NODE_KEYS = (PARTITION_KEY, "num-partitions")
HOLD_ENV = "CAMFED_TEST_HOLD_REPLY"  # fault injection in tests/test_faults.py only: see hold_reply
LOG = logging.getLogger("flwr.camfed")


def node_settings(node_config: Mapping[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """(partition-id, num-partitions, config overrides) from a SuperNode's node config.

    Other node-config keys are camfed config keys valid on this node only, e.g.
    ``device='cuda:1'``, ``data-dir='/data/market'`` or ``state-dir``.
    """
    missing = [k for k in NODE_KEYS if k not in node_config]
    if missing:
        raise ConfigError(f"node config lacks {missing}: start the SuperNode with "
                          "--node-config \"partition-id=<i> num-partitions=<n>\"")
    overrides = {k: v for k, v in node_config.items() if k not in NODE_KEYS}
    return int(node_config["partition-id"]), int(node_config["num-partitions"]), overrides


def node_config_for(context: Context) -> tuple[Config, int, int]:
    """(config = run config + this node's overrides with absolute paths, partition-id, num-partitions)."""
    partition_id, num_partitions, overrides = node_settings(context.node_config)
    try:
        config = load_config({**context.run_config, **overrides})
    except ConfigError as err:
        raise ConfigError(f"{err} (run config + node config {sorted(overrides)})") from None
    return with_absolute_paths(config), partition_id, num_partitions


def round_seed(seed: int, server_round: int, camid: int) -> int:
    """A 31-bit seed that depends only on (seed, round, camera)."""
    return derived_seed(seed, server_round, camid)


def train(message: Message, context: Context) -> Message:
    """Handle a ``train`` message: local round of this node's camera; reply shared weights + scalars."""
    config, partition_id, num_partitions = node_config_for(context)
    round_config: ConfigRecord = message.content[CONFIG]
    server_round, run_tag = int(round_config["server-round"]), str(round_config["run-tag"])
    dataset = load_node_dataset(config)
    partition = camera_partition(dataset, partition_id, num_partitions)
    store = PrivateStateStore(state_dir(config, partition.camid))
    shared_in = arrays_to_state(message.content[ARRAYS], widen=True)  # trained in float32 whatever the transport
    job = LocalJob(config=config, partition=partition, shared=shared_in,
                   private=store.load(run_tag, before_round=server_round), server_round=server_round,
                   lr=float(round_config["lr"]), seed=round_seed(config.seed, server_round, partition.camid),
                   device=resolve_device(config.device), data_root=dataset.root,
                   download=arrays_to_state(message.content[DOWNLOAD])
                   if DOWNLOAD in message.content.array_records else {})
    began = time.monotonic()
    method = get_method(config.method)
    result = method.local_round(job)
    local_seconds = time.monotonic() - began
    problem = conformity_error(result.shared, signature(shared_in))
    if problem:
        raise RuntimeError(f"method '{config.method}' returned shared weights that differ from the global ones: "
                           f"{problem}; nothing was sent")
    if set(result.upload) != method.upload_keys(config):
        raise RuntimeError(f"method '{config.method}' would upload {sorted(result.upload)}, but declares "
                           f"{sorted(method.upload_keys(config))}; nothing was sent")
    store.save(result.private, run_tag, server_round)
    shared_out, update_metrics = private_reply(shared_in, result.shared, config)
    metrics = MetricRecord({**{k: float(v) for k, v in result.metrics.items()},
                            "local-seconds": local_seconds, "num-examples": int(result.num_examples),
                            "camera": int(partition.camid), **update_metrics})
    shared_out = state_to_arrays(inject_fault(shared_out, config, partition_id, server_round), config.transport_dtype)
    content = RecordDict({ARRAYS: shared_out, METRICS: metrics})
    if result.upload:
        content[UPLOAD] = state_to_arrays(result.upload)
    hold_reply(partition_id, server_round)
    return Message(content, reply_to=message)


def inject_fault(shared: StateDict, config: Config, partition_id: int, server_round: int) -> StateDict:
    """Fault injection for benchmarks only (``fault-injection-scale`` s ≠ 0): partition 0 replies ``shared`` with
    every floating tensor × s (integer buffers as they are), after DP, so the reply is finite and conforming and
    only the aggregation rule can limit it (benchmarks/bench_robust.py).  Every other partition, and s = 0: as is."""
    scale = config.fault_injection_scale
    if not scale or partition_id != 0:
        return shared
    LOG.warning("fault-injection-scale = %g: FAULT INJECTION (benchmarks only), partition 0 replies its round-%d "
                "shared weights × %g", scale, server_round, scale)
    return {k: v * scale if v.is_floating_point() else v for k, v in shared.items()}


def hold_reply(partition_id: int, server_round: int, poll: float = 0.5) -> None:
    """Fault injection for tests only: a ClientApp that hangs with its reply ready, its node still connected.

    With ``CAMFED_TEST_HOLD_REPLY=<folder>`` in the environment (a SuperNode passes it on to its ClientApps),
    the trained reply of partition-id ``p`` in round ``r`` is held while ``<folder>/partition-<p>-round-<r>``
    exists: this call blocks, while Flower's heartbeat thread keeps the ClientApp alive in the SuperNode's
    eyes, so only ``round-timeout`` ends the round.  Without the variable it returns at once.
    """
    folder = os.environ.get(HOLD_ENV)
    gate = Path(folder) / f"partition-{partition_id}-round-{server_round}" if folder else None
    if gate is None or not gate.exists():
        return
    LOG.warning("%s: holding the round-%d reply of partition %d while %s exists", HOLD_ENV, server_round,
                partition_id, gate)
    began = time.monotonic()
    while gate.exists():
        time.sleep(poll)
    LOG.warning("%s: round-%d reply of partition %d released after %.1f s", HOLD_ENV, server_round, partition_id,
                time.monotonic() - began)


def query(message: Message, context: Context) -> Message:
    """Handle a ``query`` message: reply this node's partition-id (the server samples cameras by it)."""
    partition_id, _, _ = node_settings(context.node_config)
    return Message(RecordDict({METRICS: MetricRecord({PARTITION_KEY: partition_id})}), reply_to=message)
