"""The coordinator's side of private matching: relay blinded lists around the ring.

Protocol (ECDH private set matching for m platforms, as in SecretFlow's and FATE's ECDH-PSI,
with the coordinator as the only relay):

1. ``query.match_start`` to every participant: each draws a fresh secret ``a_i`` and returns
   its own borrowers as ``H(token)^a_i`` in a random order.
2. ``m - 1`` rounds of ``query.match_blind``: in round ``s`` the list that started at
   platform ``i`` goes to platform ``i + s`` (mod m), which applies its own secret. Every
   platform blinds exactly one list per round, so the work is spread evenly.
3. ``query.match_done``: each platform gets its own list back, now ``H(token)^(a_1...a_m)``
   for every element, in the order it sent it; it can recognise its own borrowers in a query.

What the coordinator learns: each platform's list size, and which fully blinded elements
appear in which platforms' lists (the pseudonymous overlap pattern). It cannot compute the
fully blinded form of any identifier it knows (that needs every platform's secret), and the
forms change with every session. What a platform learns: the sizes of the lists it re-blinds
(it cannot tell whose borrowers they are, nor link them to its own).

Any failure (a platform that errs, refuses or does not answer in time) stops the session and
names the platforms at fault; the caller starts a new session over those still alive.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from protocols import messages as m
from server import progress
from server.transport import by_destination, collect_replies

log = logging.getLogger(__name__)


class PlatformsFailed(RuntimeError):
    """Some platforms failed a step; ``failed`` maps each one's name to its reason."""

    def __init__(self, what: str, failed: Mapping[str, str]) -> None:
        self.failed = dict(failed)
        listing = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.failed.items()))
        super().__init__(f"{what}: {listing}")


@dataclass
class MatchResult:
    """A finished session: each platform's fully blinded list, in the order it sent it."""

    session_id: str
    participants: tuple[str, ...]
    nodes: dict[str, int]
    lists: dict[str, list[bytes]]
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    steps: list[float] = field(default_factory=list)

    def union(self, names: list[str] | None = None) -> list[bytes]:
        """Every distinct element held by the named platforms (all by default), sorted."""
        chosen = names if names is not None else list(self.participants)
        return sorted(set().union(*(self.lists[n] for n in chosen)))

    def stats(self) -> dict[str, object]:
        return {
            "session_id": self.session_id,
            "participants": list(self.participants),
            "list_sizes": {n: len(v) for n, v in self.lists.items()},
            "distinct": len(self.union()),
            "seconds": round(self.seconds, 2),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


def exchange(
    grid: Grid,
    requests: Mapping[str, tuple[str, m.Payload]],
    nodes: Mapping[str, int],
    timeout: float,
) -> dict[str, Message]:
    """Send one message to each named platform at once; every one must answer without error.

    Raises ``PlatformsFailed`` naming every platform that did not answer in time or answered
    with an error, so the caller can go on without exactly those.
    """
    by_node = {nodes[name]: name for name in requests}
    sent = {
        name: Message(payload.to_content(), dst_node_id=nodes[name], message_type=message_type)
        for name, (message_type, payload) in requests.items()
    }
    start = time.perf_counter()
    replies: dict[str, Message] = {}
    got = collect_replies(grid, sent.values(), timeout)
    for node, reply in by_destination(sent.values(), got).items():
        replies[by_node[node]] = reply
    log.debug(
        "%s: %d of %d replies in %.1f s",
        ", ".join(sorted({t for t, _ in requests.values()})),
        len(replies),
        len(requests),
        time.perf_counter() - start,
    )
    failed = {name: f"no reply within {timeout:.0f} s" for name in requests if name not in replies}
    failed.update({n: r.error.reason for n, r in replies.items() if r.has_error()})
    if failed:
        kinds = sorted({t for t, _ in requests.values()})
        raise PlatformsFailed(", ".join(kinds), failed)
    return replies


def _elements(reply: Message, name: str, session_id: str, origin: str, count: int | None) -> bytes:
    what = f"match reply from {name}"
    try:
        body = m.MatchElements.from_content(reply.content, what)
    except m.ProtocolError as exc:
        raise PlatformsFailed("query.match", {name: str(exc)}) from exc
    if body.session_id != session_id or body.origin != origin:
        raise PlatformsFailed(
            "query.match", {name: f"answered for {body.session_id}/{body.origin}"}
        )
    if count is not None and body.count != count:
        raise PlatformsFailed(
            "query.match", {name: f"returned {body.count} elements for {count} sent"}
        )
    return body.elements


def _split(blob: bytes) -> list[bytes]:
    w = m.ELEMENT_BYTES
    return [blob[i : i + w] for i in range(0, len(blob), w)]


def run_matching(
    grid: Grid,
    nodes: Mapping[str, int],
    timeout: float,
    session_id: str | None = None,
    *,
    serving_lifetime_s: int | None = None,
) -> MatchResult:
    """One private-matching session over every platform in ``nodes`` (name -> node id).

    ``serving_lifetime_s`` opens a serving session instead (``query.serve_start`` and
    ``query.serve_done``; platforms keep their secrets that long for lender questions, see
    docs/lender-query.md).
    """
    t0 = time.perf_counter()
    ring = tuple(sorted(nodes))
    count = len(ring)
    if count < 2:
        raise ValueError("private matching needs at least two platforms")
    session_id = session_id or uuid.uuid4().hex
    result = MatchResult(session_id, ring, dict(nodes), {})
    progress.report("private matching", 0, count + 1, "blinding own borrowers")

    start: m.Payload = m.MatchStart(session_id=session_id, participants=ring)
    start_type, done_type = "query.match_start", "query.match_done"
    if serving_lifetime_s is not None:
        from protocols.lender_messages import ServeStart

        start = ServeStart(session_id=session_id, participants=ring, lifetime_s=serving_lifetime_s)
        start_type, done_type = "query.serve_start", "query.serve_done"
    replies = exchange(grid, {n: (start_type, start) for n in ring}, nodes, timeout)
    current = {n: _elements(replies[n], n, session_id, n, None) for n in ring}
    sizes = {n: len(blob) // m.ELEMENT_BYTES for n, blob in current.items()}
    result.bytes_received += sum(len(b) for b in current.values())
    result.steps.append(time.perf_counter() - t0)

    for step in range(1, count):
        t = time.perf_counter()
        requests: dict[str, tuple[str, m.Payload]] = {}
        origin_at: dict[str, str] = {}
        for i, origin in enumerate(ring):
            target = ring[(i + step) % count]
            origin_at[target] = origin
            requests[target] = (
                "query.match_blind",
                m.MatchBlind(
                    session_id=session_id,
                    origin=origin,
                    step=step,
                    count=sizes[origin],
                    elements=current[origin],
                ),
            )
        result.bytes_sent += sum(len(current[o]) for o in ring)
        replies = exchange(grid, requests, nodes, timeout)
        for target, origin in origin_at.items():
            current[origin] = _elements(replies[target], target, session_id, origin, sizes[origin])
        result.bytes_received += sum(len(b) for b in current.values())
        result.steps.append(time.perf_counter() - t)
        progress.report("private matching", step, count + 1, f"re-blinding round {step}")

    done = {
        n: (
            done_type,
            m.MatchDone(session_id=session_id, count=sizes[n], elements=current[n]),
        )
        for n in ring
    }
    result.bytes_sent += sum(len(b) for b in current.values())
    exchange(grid, done, nodes, timeout)
    result.lists = {n: _split(current[n]) for n in ring}
    result.seconds = time.perf_counter() - t0
    progress.report("private matching", count + 1, count + 1, f"{len(result.union()):,} distinct")
    log.info("matching session %s: %s", session_id, result.stats())
    return result
