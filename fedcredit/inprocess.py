"""An in-process Flower Grid: messages go straight to ClientApp objects (tests, benchmarks).

It skips Flower's serialisation and runtime (about 3 s instead of 40 s through Ray), so every
capability also has a test through the real simulation or deployment engine.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Collection, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """``background``: message types handled in a thread of their own, as a SuperNode would
    while the ServerApp goes on (the platform channel's long-lived ``query.lender_listen``)."""

    def __init__(
        self,
        client_app: ClientApp,
        nodes: int,
        node_configs: list[dict] | None = None,
        background: Collection[str] = (),
    ):
        self.client_app = client_app
        self.background = set(background)
        self.threads: list[threading.Thread] = []
        # What Flower's runtime sets before it runs a ServerApp (messages read it).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts: dict[int, Context] = {}
        for i in range(nodes):
            node_id = 1000 + i
            config = (node_configs or [{}] * nodes)[i] or {
                "partition-id": i,
                "num-partitions": nodes,
            }
            self.contexts[node_id] = Context(
                run_id=1, node_id=node_id, node_config=config, state=RecordDict(), run_config={}
            )
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def set_run(self, run):  # type: ignore[no-untyped-def]
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            if msg.metadata.message_type in self.background:
                thread = threading.Thread(target=self._answer, args=(msg,), daemon=True)
                thread.start()
                self.threads.append(thread)
                ids.append(msg.metadata.message_id)
                continue
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            self.received.append(reply)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def _answer(self, msg: Message) -> None:
        reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        self.received.append(reply)
        self._replies[msg.metadata.message_id] = reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
