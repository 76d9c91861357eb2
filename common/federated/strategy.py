"""Server strategy: FedAvg over cameras on Flower's message API.

Differences from ``flwr.serverapp.strategy.FedAvg`` (which it extends for message construction
and reply logging): clients are sampled deterministically from (seed, round); only replies whose
arrays match the shared keys, shapes and dtypes are averaged; the average is sample-weighted in
float64 in a fixed (camera) order and integer buffers stay integers; a round whose replies fall
short of ``min-train-clients`` leaves the global weights unchanged instead of ending the run.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import Config
from common.federated.arrays import (StateDict, arrays_to_state, conformity_error, signature, state_to_arrays,
                                     weighted_average)
from common.federated.client import ARRAYS, CONFIG, METRICS

LOG = logging.getLogger("flwr.camfed")
WEIGHT_KEY = "num-examples"


class CameraFedAvg(FedAvg):
    """Sample-weighted averaging of the shared state ``template``'s keys over the cameras that replied."""

    def __init__(self, config: Config, template: StateDict, poll_interval: float = 1.0):
        super().__init__(fraction_train=config.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=config.min_train_clients, min_evaluate_nodes=0,
                         min_available_nodes=config.min_available_clients, weighted_by_key=WEIGHT_KEY,
                         arrayrecord_key=ARRAYS, configrecord_key=CONFIG)
        self.seed = config.seed
        self.expected = signature(template)
        self.poll_interval = poll_interval

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """Wait for ``min-available-clients`` nodes, then pick max(fraction·n, min-train-clients) of them."""
        logged = -1
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if len(nodes) != logged:
                LOG.info("waiting for nodes: %d connected, %d required", len(nodes), self.min_available_nodes)
                logged = len(nodes)
            time.sleep(self.poll_interval)
        size = min(len(nodes), max(int(len(nodes) * self.fraction_train), self.min_train_nodes))
        return sorted(random.Random(f"{self.seed}/{server_round}").sample(nodes, size))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return self._construct_messages(record, self.sample(grid, server_round), MessageType.TRAIN)

    def usable_replies(self, replies: Iterable[Message]) -> list[tuple[Message, StateDict]]:
        """(reply, its shared state) for replies without error whose arrays conform and whose weight is
        positive, in camera order."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        usable = []
        for message in valid:
            state, problem = self._decode(message)
            if problem:
                LOG.warning("ignoring the reply of node %d: %s", message.metadata.src_node_id, problem)
            else:
                usable.append((message, state))
        return sorted(usable, key=lambda u: (int(u[0].content[METRICS].get("camera", 0)), u[0].metadata.src_node_id))

    def _decode(self, message: Message) -> tuple[StateDict, str]:
        content = message.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            return {}, f"expected records '{ARRAYS}' and '{METRICS}', got {sorted(content.keys())}"
        weight = content[METRICS].get(WEIGHT_KEY)
        if not isinstance(weight, (int, float)) or weight <= 0:
            return {}, f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
        state = arrays_to_state(content[ARRAYS])
        return state, conformity_error(state, self.expected)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        """(averaged arrays, weighted-mean metrics + ``clients``); (None, metrics) if too few replied."""
        usable = self.usable_replies(replies)
        if not usable or len(usable) < self.min_train_nodes:
            LOG.warning("round %d: %d usable replies < min-train-clients (%d); global weights unchanged",
                        server_round, len(usable), self.min_train_nodes)
            return None, MetricRecord({"clients": len(usable)})
        weights = [float(m.content[METRICS][WEIGHT_KEY]) for m, _ in usable]
        metrics = weighted_metrics([m.content[METRICS] for m, _ in usable], weights)
        metrics["clients"] = len(usable)
        return state_to_arrays(weighted_average([s for _, s in usable], weights)), MetricRecord(metrics)


def weighted_metrics(records: list[MetricRecord], weights: list[float]) -> dict[str, float]:
    """Weighted means of the scalar metrics every record has (without the weight and the camera id)."""
    keys = set.intersection(*(set(r) for r in records)) - {WEIGHT_KEY, "camera"}
    total = sum(weights)
    return {k: sum(float(r[k]) * w for r, w in zip(records, weights)) / total
            for k in sorted(keys) if all(isinstance(r[k], (int, float)) for r in records)}
