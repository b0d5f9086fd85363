"""Send messages and collect the replies, pulling often at first and less as time goes on.

Flower 1.41's ``Grid.send_and_receive`` on the deployment engine sleeps 3 s between pulls
(``flwr/superlink/grid/http_grid.py``). A reply that lands just after a pull waits out the
rest of the 3 s, so every exchange costs on average 1.5 s more than its slowest platform,
and a boosted tree (one exchange per level) or a lender question (one per platform hop)
pays it again and again. Flower's push/pull API is there for exactly this: push once, then
pull on our own schedule.

The schedule backs off from ``interval`` to ``max_interval``: a reply that is a few
milliseconds away (the in-process grid, a lender hop over the platform channel) is picked
up almost at once, while a minute-long exchange costs a pull every ``max_interval``, not
fifty a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

BACKOFF = 1.5


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    interval: float = 0.02,
    max_interval: float | None = None,
) -> list[Message]:
    """``push_messages``, then ``pull_messages`` until every message has its reply or
    ``timeout`` seconds have passed; returns the replies that came (the caller decides what
    a missing one means). Waits ``interval`` after the first empty pull, growing by
    ``BACKOFF`` up to ``max_interval`` (default: ``interval``, a constant pace).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    ceiling = interval if max_interval is None else max(max_interval, interval)
    ids = set(grid.push_messages(list(messages)))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = interval
    while ids:
        got = list(grid.pull_messages(list(ids)))
        replies.extend(got)
        ids.difference_update(r.metadata.reply_to_message_id for r in got)
        left = deadline - time.monotonic()
        if not ids or left <= 0:
            break
        if got:
            wait = interval  # replies are arriving: the rest are likely close behind
        time.sleep(min(wait, left))
        wait = min(wait * BACKOFF, ceiling)
    return replies


def collect_replies(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """``send_and_collect`` at the pace for platform work (training rounds, query batches,
    tree levels): from 20 ms up to half a second between pulls."""
    return send_and_collect(grid, messages, timeout, interval=0.02, max_interval=0.5)


def by_destination(messages: Iterable[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """Each reply keyed by the node its message was sent to, matched on the message it
    answers (``reply_to_message_id``), not on its sender.

    Why not the sender: Flower's SuperLink answers for a node it has marked offline (no
    heartbeat within its patience: a SuperNode that died) with an error reply from the
    SuperLink's own node id. Keyed by destination, that error names the dead node, with
    Flower's reason, as soon as the SuperLink knows, instead of the caller waiting out its
    timeout and calling it silence. ``messages`` must have been pushed (they carry their
    ids then). A reply to none of them is left out.
    """
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    keyed: dict[int, Message] = {}
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id)
        if node is not None:
            keyed[node] = reply
    return keyed
