"""Server strategy: FedAvg over cameras on Flower's public ``Strategy`` API.

A round (``common.federated.server``): ``sample`` cameras → ``train_messages`` → ``collect`` replies
until all arrived or ``round-timeout`` expires → ``screen`` them → ``average``.

- **Sampling** is keyed on (seed, round, partition-id): each candidate camera gets a score from a hash
  of the three and the lowest scores are picked, so the same cameras train in the same round in every
  deployment and after a restart, whatever node ids Flower assigned.  Nodes report their partition-id
  (the camera's index in sorted camera-id order) in reply to a ``query`` message, asked once per node
  and only when ``fraction-train`` < 1.
- **Timeout**: messages carry ``ttl = round-timeout``, so the SuperLink refuses a reply that comes
  later; the round closes with the replies it has and names the cameras whose replies are discarded
  (``no-reply``).  In deployment the SuperLink answers a message whose TTL has passed with an error
  (``MESSAGE_EXPIRED_CODE``) in place of the reply; that answer counts as no reply, not as a failure of its own.
- **Screening**: a reply is averaged only if it has no error, holds exactly the shared keys, shapes
  and dtypes, finite floating values and a positive weight.  Every other sampled camera is a
  ``Failure``, logged with its reason; ``recurring`` failures (the ClientApp raised or replied with
  unusable weights: the same message fails the same way again) are told apart from transient ones
  (node unavailable, ClientApp crashed, no reply in time).
- **Transport**: the global weights go out and replies must come back in ``transport-dtype``
  (``common.federated.arrays``); a reply in another dtype is rejected.  Replies are widened to float32.
- **Averaging**: by ``aggregation`` (``common.federated.aggregation``: sample-weighted mean, median or
  trimmed mean), in float64, in camera order, stored in float32, integer buffers stay integers; a round
  with fewer than ``min-train-clients`` usable replies leaves the global weights unchanged.
- **Round metrics**: image-weighted means of the cameras' scalar metrics, ``clients``, and from the cameras'
  pre-clip update norms (``report-update-norm``) their median and maximum and the share of cameras whose
  update ``dp-clip-norm`` clipped (unweighted: one value per camera).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.config import Config
from common.federated.aggregation import aggregate, trimmed_count
from common.federated.arrays import StateDict, arrays_to_state, conformity_error, signature, state_to_arrays, widened
from common.federated.client import ARRAYS, CONFIG, METRICS, PARTITION_KEY

LOG = logging.getLogger("flwr.camfed")
WEIGHT_KEY = "num-examples"
NORM_KEY, CLIPPED_KEY = "update-norm", "update-clipped"  # a camera's pre-clip update norm, 1.0 if it was clipped

# Codes of Flower's ``Error`` (``flwr.common.constant.ErrorCode``, which flwr does not export publicly; the
# values are pinned by tests/test_faults.py) that mean the app itself failed on the node: the same
# message would fail again.  Every other code (node unavailable, ClientApp crashed, reply unavailable,
# unknown) is treated as transient.
APP_FAILURE_CODES = {1: "the ClientApp could not be loaded", 2: "the ClientApp raised an exception",
                     6: "a ClientApp mod refused the message", 7: "the app bundle is invalid"}
# ErrorCode.MESSAGE_UNAVAILABLE: the SuperLink's answer for a message it no longer holds; once the message's TTL
# (round-timeout) has passed, that means the node did not reply in time.
MESSAGE_EXPIRED_CODE = 3
RECURRING = ("raised", "rejected")  # Failure kinds that recur when the round is repeated


@dataclass(frozen=True)
class Failure:
    """A sampled node that contributed nothing to a round.

    ``kind``: ``raised`` (the ClientApp failed), ``rejected`` (its reply was unusable), ``unavailable``
    (node or ClientApp gone) or ``no-reply`` (nothing before ``round-timeout``); ``camera`` when known.
    """

    node_id: int
    camera: int | None
    kind: str
    reason: str

    @property
    def recurs(self) -> bool:
        return self.kind in RECURRING

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Screening:
    """A round's replies sorted out: ``usable`` (reply, its shared state) in camera order, and ``failures``."""

    usable: list[tuple[Message, StateDict]]
    failures: list[Failure]


class CameraFedAvg(Strategy):
    """Aggregation (``aggregation``) of the shared state ``template``'s keys over the cameras that replied."""

    def __init__(self, config: Config, template: StateDict, poll_interval: float = 1.0):
        self.seed, self.fraction_train = config.seed, config.fraction_train
        self.min_train_nodes, self.min_available_nodes = config.min_train_clients, config.min_available_clients
        self.timeout = config.round_timeout or None  # seconds; None: wait for every reply
        self.transport, self.aggregation, self.trim_fraction = (config.transport_dtype, config.aggregation,
                                                                config.trim_fraction)
        self.expected = signature(template, self.transport)  # what a reply's arrays hold on the wire
        self.poll_interval = poll_interval
        self.partitions: dict[int, int] = {}  # node id → partition-id (asked when sampling needs it)
        self.cameras: dict[int, int] = {}  # node id → camera id (from its replies), to name failures

    # ------------------------------------------------------------------------------------- sampling
    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """Wait for ``min-available-clients`` nodes, then pick max(fraction·n, min-train-clients) of them
        by their (seed, round, partition-id) score."""
        nodes = self.wait_for_nodes(grid)
        size = min(len(nodes), max(int(len(nodes) * self.fraction_train), self.min_train_nodes))
        if size == len(nodes):
            return nodes
        known = self.learn_partitions(grid, nodes)
        ranked = sorted(known, key=lambda node: (sample_score(self.seed, server_round, self.partitions[node]), node))
        return sorted(ranked[:size])

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Sorted node ids once at least ``min-available-clients`` are connected."""
        logged = -1
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if len(nodes) != logged:
                LOG.info("waiting for nodes: %d connected, %d required", len(nodes), self.min_available_nodes)
                logged = len(nodes)
            time.sleep(self.poll_interval)
        return nodes

    def learn_partitions(self, grid: Grid, nodes: list[int]) -> list[int]:
        """Ask nodes not asked before for their partition-id; returns the nodes whose partition is known."""
        unknown = [node for node in nodes if node not in self.partitions]
        if unknown:
            messages = [Message(RecordDict({CONFIG: ConfigRecord()}), node, MessageType.QUERY, ttl=self.timeout)
                        for node in unknown]
            replies, missing = self.collect(grid, messages)
            for node, reply in replies.items():
                if reply.has_error() or METRICS not in reply.content.metric_records:
                    LOG.warning("node %d did not tell its partition-id (%s); not sampled", node,
                                reply.error.reason if reply.has_error() else "no metrics")
                else:
                    self.partitions[node] = int(reply.content[METRICS][PARTITION_KEY])
            for node in missing:
                LOG.warning("node %d did not tell its partition-id in time; not sampled", node)
        return [node for node in nodes if node in self.partitions]

    # ------------------------------------------------------------------------------ messages, replies
    def train_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       node_ids: Iterable[int]) -> list[Message]:
        """One ``train`` message per node: the global ``arrays`` (in ``transport-dtype``) and ``config`` (plus
        ``server-round``)."""
        config["server-round"] = server_round
        if self.transport != "float32":
            arrays = state_to_arrays(arrays_to_state(arrays), self.transport)
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [Message(record, node, MessageType.TRAIN, ttl=self.timeout, group_id=str(server_round))
                for node in node_ids]

    def collect(self, grid: Grid, messages: list[Message]) -> tuple[dict[int, Message], list[int]]:
        """Push ``messages`` and pull replies until every node replied or ``round-timeout`` expired.

        Returns (node id → reply, node ids without a reply).  Only replies to these messages are pulled.
        """
        pushed = list(grid.push_messages(messages))
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(pushed, messages) if mid}
        expires = {mid: m.metadata.created_at + m.metadata.ttl for mid, m in zip(pushed, messages) if mid}
        not_pushed = [m.metadata.dst_node_id for mid, m in zip(pushed, messages) if not mid]
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        replies: dict[int, Message] = {}
        while pending:
            for reply in grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in pending or (self.timeout and expired_in_place_of_reply(reply, expires[mid])):
                    continue  # a camera whose message expired stays pending: no reply within round-timeout
                replies[pending.pop(mid)] = reply
            left = None if deadline is None else deadline - time.monotonic()
            if not pending or (left is not None and left <= 0):
                break
            time.sleep(self.poll_interval if left is None else min(self.poll_interval, left))
        return replies, sorted(not_pushed + list(pending.values()))

    def screen(self, server_round: int, replies: dict[int, Message], missing: Iterable[int]) -> Screening:
        """Usable replies and failures of a round (see the module docstring); every failure is logged."""
        usable, failures = [], []
        for node in missing:
            failures.append(Failure(node, self.cameras.get(node), "no-reply",
                                    f"no reply within round-timeout = {self.timeout:g} s; a later reply is discarded"
                                    if self.timeout else "no reply"))
        for node, reply in sorted(replies.items()):
            if reply.has_error():
                code, reason = reply.error.code, reply.error.reason or ""
                kind = "raised" if code in APP_FAILURE_CODES else "unavailable"
                failures.append(Failure(node, self.cameras.get(node), kind,
                                        f"{APP_FAILURE_CODES.get(code, f'error code {code}')}: {reason}"))
                continue
            state, problem = self.decode(reply)
            if problem:
                failures.append(Failure(node, self.cameras.get(node), "rejected", f"reply ignored: {problem}"))
                continue
            self.cameras[node] = int(reply.content[METRICS].get("camera", 0))
            usable.append((reply, state))
        for failure in failures:
            (LOG.error if failure.recurs else LOG.warning)(
                "round %d: node %d (camera %s) %s: %s", server_round, failure.node_id,
                "?" if failure.camera is None else failure.camera, failure.kind, failure.reason)
        usable.sort(key=lambda u: (int(u[0].content[METRICS].get("camera", 0)), u[0].metadata.src_node_id))
        return Screening(usable, failures)

    def decode(self, message: Message) -> tuple[StateDict, str]:
        """(shared state widened to float32, "") of a conforming reply, else ({} or the state, what is wrong)."""
        content = message.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            return {}, f"expected records '{ARRAYS}' and '{METRICS}', got {sorted(content.keys())}"
        weight = content[METRICS].get(WEIGHT_KEY)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            return {}, f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
        try:
            state = arrays_to_state(content[ARRAYS])
        except (TypeError, ValueError, RuntimeError) as err:
            return {}, f"arrays cannot be read: {err}"
        problem = conformity_error(state, self.expected)
        state = widened(state)
        if not problem:
            problem = next((f"'{k}' holds non-finite values" for k, v in state.items()
                            if v.is_floating_point() and not bool(torch.isfinite(v).all())), "")
        return state, problem

    def cannot_train(self, screening: Screening) -> bool:
        """True when the round averaged nothing and would not even if every transient failure had replied:
        the remaining failures repeat every round, so the run cannot train."""
        transient = sum(not f.recurs for f in screening.failures)
        return len(screening.usable) < self.min_train_nodes and len(screening.usable) + transient < self.min_train_nodes

    # -------------------------------------------------------------------------------------- average
    def average(self, server_round: int,
                usable: list[tuple[Message, StateDict]]) -> tuple[ArrayRecord | None, MetricRecord]:
        """(aggregated arrays in float32, weighted-mean metrics + ``clients``); (None, metrics) if too few replied."""
        if not usable or len(usable) < self.min_train_nodes:
            LOG.warning("round %d: %d usable replies < min-train-clients (%d); global weights unchanged",
                        server_round, len(usable), self.min_train_nodes)
            return None, MetricRecord({"clients": len(usable)})
        weights = [float(m.content[METRICS][WEIGHT_KEY]) for m, _ in usable]
        metrics = weighted_metrics([m.content[METRICS] for m, _ in usable], weights)
        metrics.update(update_norm_stats([m.content[METRICS] for m, _ in usable]))
        metrics["clients"] = len(usable)
        if self.aggregation == "trimmed-mean" and trimmed_count(len(usable), self.trim_fraction) == 0:
            LOG.warning("round %d: trim-fraction %g of %d cameras trims none: a plain (unweighted) mean",
                        server_round, self.trim_fraction, len(usable))
        state = aggregate([s for _, s in usable], weights, self.aggregation, self.trim_fraction)
        return state_to_arrays(state), MetricRecord(metrics)

    # ----------------------------------------------------- flwr.serverapp.strategy.Strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.train_messages(server_round, arrays, config, self.sample(grid, server_round))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        screening = self.screen(server_round, {m.metadata.src_node_id: m for m in replies}, [])
        return self.average(server_round, screening.usable)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the global model on the test split itself

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        LOG.info("CameraFedAvg: fraction-train %g, min-train-clients %d, min-available-clients %d, "
                 "round-timeout %s, aggregation %s, transport %s", self.fraction_train, self.min_train_nodes,
                 self.min_available_nodes, f"{self.timeout:g} s" if self.timeout else "none", self.aggregation,
                 self.transport)


def expired_in_place_of_reply(reply: Message, expires_at: float) -> bool:
    """True for the SuperLink's error answer to a message whose TTL (unix time ``expires_at``) has passed."""
    return reply.has_error() and reply.error.code == MESSAGE_EXPIRED_CODE and time.time() >= expires_at


def sample_score(seed: int, server_round: int, partition_id: int) -> int:
    """A 64-bit score that depends only on (seed, round, partition-id): the lowest scores are sampled."""
    digest = hashlib.sha256(f"camfed-sample/{seed}/{server_round}/{partition_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def weighted_metrics(records: list[MetricRecord], weights: list[float]) -> dict[str, float]:
    """Weighted means of the scalar metrics every record has (without the weight, the camera id and the update
    norms, which ``update_norm_stats`` summarises)."""
    keys = set.intersection(*(set(r) for r in records)) - {WEIGHT_KEY, "camera", NORM_KEY, CLIPPED_KEY}
    total = sum(weights)
    return {k: sum(float(r[k]) * w for r, w in zip(records, weights)) / total
            for k in sorted(keys) if all(isinstance(r[k], (int, float)) for r in records)}


def update_norm_stats(records: list[MetricRecord]) -> dict[str, float]:
    """``update_norm_median`` and ``update_norm_max`` over the records with a pre-clip update norm, and
    ``clipped_fraction`` over those that say whether it was clipped; {} for keys no record has."""
    norms = sorted(float(r[NORM_KEY]) for r in records if NORM_KEY in r)
    clipped = [float(r[CLIPPED_KEY]) for r in records if CLIPPED_KEY in r]
    stats = {}
    if norms:
        stats["update_norm_median"], stats["update_norm_max"] = statistics.median(norms), norms[-1]
    if clipped:
        stats["clipped_fraction"] = sum(clipped) / len(clipped)
    return stats
