"""The coordinator's one-message-per-platform exchange: who answered, who failed and why."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from protocols import messages as m
from server.matching import PlatformsFailed, exchange


class _SuperLinkLike:
    """Answers like Flower's SuperLink: live nodes reply from their own node id; for a node
    marked offline the SuperLink writes the error reply itself (Flower's own constructor)."""

    def __init__(self, offline: set[int], silent: set[int] = frozenset()) -> None:
        # What a ServerApp process has set before it builds a Message (as in fedcredit.inprocess)
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.offline = offline
        self.silent = set(silent)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for k, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"msg-{k}"
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.offline:
                replies.append(
                    create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
                )
            else:
                reply = Message(RecordDict(), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = node
                replies.append(reply)
        return replies


NODES = {"platform-01": 11, "platform-02": 12, "platform-03": 13}


def _requests() -> dict[str, tuple[str, m.Payload]]:
    return {name: ("query.describe", m.DescribeRequest(test_share=0.2)) for name in NODES}


def test_every_live_platform_answers() -> None:
    replies = exchange(_SuperLinkLike(offline=set()), _requests(), NODES, timeout=5)  # type: ignore[arg-type]
    assert sorted(replies) == sorted(NODES)
    assert all(r.metadata.src_node_id == NODES[n] for n, r in replies.items())


def test_an_offline_node_is_named_with_flowers_reason_not_as_a_timeout() -> None:
    """The SuperLink's error reply comes from its own node id; it must still drop exactly
    the dead platform, with the SuperLink's reason, and nobody else."""
    grid = _SuperLinkLike(offline={12}, silent={13})
    with pytest.raises(PlatformsFailed) as info:
        exchange(grid, _requests(), NODES, timeout=5)  # type: ignore[arg-type]
    failed = info.value.failed
    assert set(failed) == {"platform-02", "platform-03"}
    assert "heartbeat" in failed["platform-02"]
    assert failed["platform-03"] == "no reply within 5 s"
