"""The coordinator's one-message-per-platform exchange: who answered, who failed and why."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from protocols import messages as m
from server.matching import PlatformsFailed, exchange
from server.transport import send_and_collect


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
        self.pending: dict[str, Message] = {}
        self.pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"msg-{len(self.pending)}"
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.offline:
                reply = create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
            else:
                reply = Message(RecordDict(), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = node
            self.pending[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        return [self.pending.pop(i) for i in message_ids if i in self.pending]


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
        exchange(grid, _requests(), NODES, timeout=1)  # type: ignore[arg-type]
    failed = info.value.failed
    assert set(failed) == {"platform-02", "platform-03"}
    assert "heartbeat" in failed["platform-02"]
    assert failed["platform-03"] == "no reply within 1 s"


def test_collecting_waits_for_late_replies_and_stops_at_the_timeout() -> None:
    """Replies that come in later pulls are all collected; a silent node costs the timeout
    (not more), paced by the back-off rather than a pull every few milliseconds."""
    grid = _SuperLinkLike(offline=set(), silent={13})
    real_pull = grid.pull_messages

    def slow_pull(message_ids: Iterable[str]) -> list[Message]:
        if grid.pulls < 3:  # nothing for the first three pulls
            grid.pulls += 1
            return []
        return real_pull(message_ids)

    grid.pull_messages = slow_pull  # type: ignore[method-assign]
    start = time.monotonic()
    with pytest.raises(PlatformsFailed) as info:
        exchange(grid, _requests(), NODES, timeout=1.0)  # type: ignore[arg-type]
    elapsed = time.monotonic() - start
    assert set(info.value.failed) == {"platform-03"}
    assert 1.0 <= elapsed < 3.0
    assert grid.pulls < 20  # 20 ms growing by 1.5x to 0.5 s: about ten pulls in a second


def test_send_and_collect_refuses_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="timeout"):
        send_and_collect(_SuperLinkLike(offline=set()), [], 0)  # type: ignore[arg-type]


def test_replies_are_keyed_by_destination_for_every_caller() -> None:
    """``by_destination`` (used by ``exchange``, ``ask_all`` and secure-aggregation rounds)
    keys the SuperLink's error reply by the dead node and leaves out a reply to a message
    it never sent."""
    from server.training import FederationError, ask_all
    from server.transport import by_destination

    grid = _SuperLinkLike(offline={12})
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type="query.describe") for n in NODES.values()
    ]
    replies = [grid.pending.pop(i) for i in grid.push_messages(messages)]
    elsewhere = Message(RecordDict(), dst_node_id=99, message_type="query.describe")
    elsewhere.metadata.__dict__["_message_id"] = "not-ours"
    stray = Message(RecordDict(), reply_to=elsewhere)
    keyed = by_destination(messages, [*replies, stray])
    assert sorted(keyed) == [11, 12, 13]
    assert keyed[12].has_error() and "heartbeat" in keyed[12].error.reason
    nodes = list(NODES.values())
    with pytest.raises(FederationError, match=r"node 12: .*heartbeat"):
        ask_all(_SuperLinkLike(offline={12}), nodes, "query.describe", RecordDict(), 1)  # type: ignore[arg-type]
