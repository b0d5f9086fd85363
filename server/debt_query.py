"""The coordinator's side of the encrypted debt-profile query.

For a batch of applicant tokens, every platform returns Paillier ciphertexts of packed
(debt in fen, active loans, has-active-loan) slots, with zero slots for tokens it does not
hold; every reply therefore has the same size whoever holds whom. The coordinator checks each
reply (right query id, right number of ciphertexts, every ciphertext a valid element of the
key's ciphertext space), multiplies the ciphertexts (adds the plaintexts), and asks the key
holder to decrypt only the sums. It sees ciphertexts and totals, never one platform's figure.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from protocols import messages as m
from protocols.paillier import (
    InvalidCiphertext,
    add_ciphertexts,
    ciphertext_width,
    ciphertexts_from_bytes,
)
from server import progress
from server.keyholder import KeyHolder

log = logging.getLogger(__name__)


class QueryFailed(RuntimeError):
    """A batch could not be answered by every platform; no partial totals are released."""


@dataclass
class QueryStats:
    tokens: int = 0
    batches: int = 0
    ciphertexts: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    batch_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "count": self.tokens,
            "batches": self.batches,
            "ciphertexts": self.ciphertexts,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "median_batch_seconds": round(float(np.median(self.batch_seconds)), 3)
            if self.batch_seconds
            else None,
        }


def _reply_ciphertexts(
    reply: Message, node: int, query_id: str, expected: int, keyholder: KeyHolder
) -> list[int]:
    if reply.has_error():
        raise QueryFailed(f"platform node {node} did not answer: {reply.error.reason}")
    try:
        body = m.DebtProfileReply.from_content(reply.content, f"debt_profile reply from {node}")
    except m.ProtocolError as exc:
        raise QueryFailed(str(exc)) from exc
    if body.query_id != query_id:
        raise QueryFailed(f"node {node} answered query {body.query_id}, expected {query_id}")
    if body.count != expected:
        raise QueryFailed(f"node {node} sent {body.count} ciphertexts, expected {expected}")
    try:
        return ciphertexts_from_bytes(keyholder.public_key, body.ciphertexts, expected)
    except InvalidCiphertext as exc:
        raise QueryFailed(f"node {node} sent an invalid ciphertext: {exc}") from exc


@dataclass
class BatchResult:
    totals: np.ndarray  # (tokens, 3)
    ciphertexts: int  # received, over all platforms
    bytes_sent: int
    bytes_received: int


def query_batch(
    grid: Grid, nodes: Sequence[int], tokens: list[str], keyholder: KeyHolder, timeout: float
) -> BatchResult:
    """Totals of one batch, and what it cost on the wire."""
    layout = keyholder.layout
    key_bits = keyholder.key_bits
    expected = layout.plaintexts_for(len(tokens), key_bits)
    query_id = uuid.uuid4().hex
    request = m.DebtProfileRequest(
        query_id=query_id, public_key=keyholder.public_key_bytes, tokens=m.tokens_to_bytes(tokens)
    )
    content = request.to_content
    messages = [
        Message(content(), dst_node_id=node, message_type="query.debt_profile") for node in nodes
    ]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=timeout)}
    missing = [n for n in nodes if n not in replies]
    if missing:
        raise QueryFailed(f"no reply within {timeout:.0f} s from nodes {missing}")
    per_node = [_reply_ciphertexts(replies[n], n, query_id, expected, keyholder) for n in nodes]
    sums = add_ciphertexts(keyholder.public_key, per_node)
    plain = keyholder.decrypt_sums(sums, contributors=len(nodes))
    received = sum(len(c) for c in per_node)
    return BatchResult(
        totals=layout.unpack(plain, len(tokens), key_bits),
        ciphertexts=received,
        bytes_sent=len(nodes) * (len(request.tokens) + len(request.public_key)),
        bytes_received=received * ciphertext_width(keyholder.public_key),
    )


def run_debt_query(
    grid: Grid,
    nodes: Sequence[int],
    tokens: list[str],
    keyholder: KeyHolder,
    batch_size: int,
    timeout: float,
) -> tuple[np.ndarray, QueryStats]:
    """Totals for every token, batch by batch; any failed batch fails the whole query."""
    stats = QueryStats()
    out = np.zeros((len(tokens), m.PROFILE_FIELDS), dtype=np.int64)
    start = time.perf_counter()
    for lo in range(0, len(tokens), batch_size):
        t0 = time.perf_counter()
        batch = tokens[lo : lo + batch_size]
        result = query_batch(grid, nodes, batch, keyholder, timeout)
        out[lo : lo + len(batch)] = result.totals
        stats.batches += 1
        stats.tokens += len(batch)
        stats.ciphertexts += result.ciphertexts
        stats.bytes_sent += result.bytes_sent
        stats.bytes_received += result.bytes_received
        stats.batch_seconds.append(time.perf_counter() - t0)
        progress.report("encrypted debt query", stats.tokens, len(tokens), "tokens")
    stats.seconds = time.perf_counter() - start
    return out, stats
