"""A ``Grid`` that runs the ClientApp on simulated nodes inside this process (tests, debugging).

Node ``i`` (id ``FIRST_NODE_ID + i``) has node config ``partition-id=i num-partitions=n`` and its own
``Context``.  Messages pass through Flower's protobuf serialisation both ways, as on the wire.  A
client that raises yields an error reply (as Flower's runtimes do); a client callable returning
``None`` simulates a node that vanished (no reply at all).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

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
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self._counter = 0
        self.wire_bytes: list[tuple[int, int, int]] = []  # (node id, bytes to the node, bytes back)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self._counter += 1
            message.metadata.__dict__["_message_id"] = f"m{self._counter}"
            reply = self._deliver(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message | None:
        node_id = message.metadata.dst_node_id
        outgoing = message_to_proto(message)
        received = message_from_proto(outgoing)
        try:
            reply = self.client(received, self.contexts[node_id])
        except Exception as err:  # a raising ClientApp: error reply, as Flower's runtimes send
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"),
                            reply_to=received)
        if reply is None:
            return None
        sent = message_to_proto(reply)
        self.wire_bytes.append((node_id, outgoing.ByteSize(), sent.ByteSize()))
        return message_from_proto(sent)
