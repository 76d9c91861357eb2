"""A ``Grid`` that runs the ClientApp on simulated nodes inside this process: tests, experiments, debugging.

Not part of the Flower app: this package is outside ``fab-include``, so ``flwr run`` never ships it.

Node ``i`` (id ``FIRST_NODE_ID + i``) has node config ``partition-id=i num-partitions=n`` (plus
``node_overrides[i]``) and its own ``Context``.  Every message is deflated to bytes and inflated again
both ways, as on the wire.  The rest follows the SuperLink's rules:

- a client that raises yields an error reply with Flower's code for a raising ClientApp;
- a client callable returning ``None`` simulates a node that vanished: the reply is the error the
  SuperLink sends for an unavailable node;
- a reply that took longer than its message's TTL (``round-timeout``) is discarded.  Nodes work in
  parallel in a real federation but one after another here, so each reply's own processing time counts.

A ServerApp process gets its task identity (run, node, task ids, which ``Message(...)`` reads) from
Flower's runtime; this grid sets it through ``flwr.supercore.task_identity`` and assigns message ids as the
SuperLink does: the Flower internals this test harness needs, kept out of the app bundle.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Iterable, Mapping

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

LOG = logging.getLogger("flwr.camfed")
FIRST_NODE_ID = 1001
ClientCallable = Callable[[Message, Context], "Message | None"]


class InProcessGrid(Grid):
    """Runs ``client`` (e.g. ``client.app.app``) for each message, sequentially, in this process."""

    def __init__(self, client: ClientCallable, num_nodes: int, run_config: Mapping[str, Any],
                 node_overrides: Mapping[int, Mapping[str, Any]] | None = None, run_id: int = 1):
        self.client = client
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_NODE_ID + i,
                                       node_config={"partition-id": i, "num-partitions": num_nodes,
                                                    **(node_overrides or {}).get(i, {})},
                                       state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)
        }
        self._run = None
        self._replies: dict[str, Message] = {}
        self._ids = (f"m{i}" for i in itertools.count(1))
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 0

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its reply waits for ``pull_messages``."""
        ids = []
        for message in messages:
            message_id = next(self._ids)
            reply = self._deliver(message, message_id)
            if reply is not None:
                self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message, message_id: str) -> Message | None:
        """The reply to ``message`` as the server would pull it, or None when it came after the TTL."""
        node_id = message.metadata.dst_node_id
        received = _with_id(wire_copy(message), message_id)
        began = time.monotonic()
        try:
            reply = self.client(received, self.contexts[node_id])
        except Exception as err:  # a raising ClientApp: error reply, as Flower's runtimes send
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"),
                            reply_to=received)
        if reply is None:
            reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "the node vanished"), reply_to=received)
        if time.monotonic() - began > received.metadata.ttl:
            LOG.warning("node %d replied after the message's TTL (%.0f s): reply discarded", node_id,
                        received.metadata.ttl)
            return None
        return wire_copy(reply)


def wire_copy(obj):
    """``obj`` (a ``Message`` or one of its records) deflated to bytes and inflated again, children first."""
    children = {object_id: wire_copy(child) for object_id, child in (obj.children or {}).items()}
    return type(obj).inflate(obj.deflate(), children)


def _with_id(message: Message, message_id: str) -> Message:
    """``message`` with the id the SuperLink would assign (replies refer to it)."""
    m = message.metadata
    metadata = Metadata(run_id=m.run_id, message_id=message_id, src_node_id=m.src_node_id,
                        dst_node_id=m.dst_node_id, reply_to_message_id=m.reply_to_message_id, group_id=m.group_id,
                        created_at=m.created_at, ttl=m.ttl, message_type=m.message_type,
                        src_task_id=m.src_task_id, dst_task_id=m.dst_task_id)
    return Message(content=message.content, metadata=metadata)
