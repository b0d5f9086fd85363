"""The coordinator's side of the encrypted debt-profile query over blinded identifiers.

For a batch of fully blinded identifiers (from private matching), every participant returns
Paillier ciphertexts of its packed (debt in fen, active loans, has-active-loan) slots, zero
slots for identifiers it does not hold, and a mask added to every plaintext; the masks
cancel modulo n only in the sum over the query's whole participant set. The coordinator
checks each reply (query id, key id, ciphertext count, every ciphertext a unit below n²),
multiplies the ciphertexts (adds the plaintexts) and asks the key holder, a separate
service, to decrypt the sums. It never holds a private key, and a single reply, or any sum
over a strict subset of the participants, decrypts to uniform noise.

Dropouts: the participant set is fixed per query (the matching session's). A platform that
fails or does not answer within the query timeout raises ``PlatformsFailed`` naming it; the
caller (``server.federation.private_query``) drops it and starts again from a fresh
matching session over the platforms still alive, as long as at least ``min-participants``
remain. A total is therefore never a mix of two participant sets, two answers over different
sets can never be lined up, and every answer names the platforms whose figures it includes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from protocols import messages as m
from protocols.packing import SlotOverflowError, debt_profile_layout
from protocols.paillier import (
    InvalidCiphertext,
    PaillierPublicKey,
    add_ciphertexts,
    ciphertext_width,
    ciphertexts_from_bytes,
    public_key_from_bytes,
)
from server import progress
from server.keyholder_client import KeyHolderAPI, KeyHolderRefusal
from server.matching import MatchResult, PlatformsFailed, exchange

log = logging.getLogger(__name__)


class QueryFailed(RuntimeError):
    """The query could not be answered; no partial or mixed totals are released."""


@dataclass
class QueryStats:
    tokens: int = 0
    batches: int = 0
    ciphertexts: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    attempts: int = 0
    batch_seconds: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"platforms": 0.0, "aggregation": 0.0, "decryption": 0.0}
    )

    def to_dict(self) -> dict[str, object]:
        return {
            "count": self.tokens,
            "batches": self.batches,
            "attempts": self.attempts,
            "ciphertexts": self.ciphertexts,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "median_batch_seconds": round(float(np.median(self.batch_seconds)), 3)
            if self.batch_seconds
            else None,
        }


@dataclass
class QueryAnswer:
    """The answer over ``elements``: clear totals, or totals sealed for each contributor.

    ``sealed[name]`` is, in element order, 24 bytes per element that only platform ``name``
    (and the key holder) can open; ``batches`` lists each batch's query id and size, which a
    platform needs to open its rows.
    """

    totals: np.ndarray | None  # (elements, 3): total debt fen, active loans, lenders
    sealed: dict[str, bytes]
    batches: list[tuple[str, int]]
    contributors: tuple[str, ...]
    dropped: dict[str, str]
    key: QueryKey
    stats: QueryStats
    elements: list[bytes]


@dataclass
class QueryKey:
    """The Paillier key of a query: the key holder's signed announcement, checked once."""

    key_id: str
    announcement: bytes
    public_key: PaillierPublicKey

    @classmethod
    def from_keyholder(cls, keyholder: KeyHolderAPI) -> QueryKey:
        ann = keyholder.announcement()
        return cls(ann.key_id, ann.to_bytes(), public_key_from_bytes(ann.public_key))


def _ciphertexts(
    reply_content: RecordDict, name: str, query_id: str, key: QueryKey, expected: int
) -> list[int]:
    what = f"debt_profile reply from {name}"
    body = m.DebtProfileReply.from_content(reply_content, what)
    if body.query_id != query_id:
        raise m.ProtocolError(f"{what}: answered query {body.query_id}, expected {query_id}")
    if body.key_id != key.key_id:
        raise m.ProtocolError(f"{what}: used key {body.key_id}, expected {key.key_id}")
    if body.count != expected:
        raise m.ProtocolError(f"{what}: {body.count} ciphertexts, expected {expected}")
    try:
        return ciphertexts_from_bytes(key.public_key, body.ciphertexts, expected)
    except InvalidCiphertext as exc:
        raise m.ProtocolError(f"{what}: {exc}") from exc


def query_batch(
    grid: Grid,
    match: MatchResult,
    participants: tuple[str, ...],
    elements: Sequence[bytes],
    key: QueryKey,
    keyholder: KeyHolderAPI,
    timeout: float,
    stats: QueryStats,
    sealed: bool,
) -> tuple[np.ndarray | None, dict[str, bytes], str]:
    """One batch over exactly ``participants``: clear totals, or totals sealed for each.

    Raises PlatformsFailed naming the platforms that did not answer properly.
    """
    key_bits = key.public_key.n.bit_length()
    layout = debt_profile_layout(len(participants))
    expected = layout.plaintexts_for(len(elements), key_bits)
    query_id = uuid.uuid4().hex
    request = m.DebtProfileRequest(
        query_id=query_id,
        session_id=match.session_id,
        key_id=key.key_id,
        participants=participants,
        count=len(elements),
        announcement=key.announcement,
        elements=b"".join(elements),
    )
    t = time.perf_counter()
    replies = exchange(
        grid, {p: ("query.debt_profile", request) for p in participants}, match.nodes, timeout
    )
    stats.stage_seconds["platforms"] += time.perf_counter() - t
    per_platform: list[list[int]] = []
    bad: dict[str, str] = {}
    for name in participants:
        try:
            per_platform.append(_ciphertexts(replies[name].content, name, query_id, key, expected))
        except m.ProtocolError as exc:
            bad[name] = str(exc)
    if bad:
        raise PlatformsFailed("query.debt_profile", bad)
    t = time.perf_counter()
    sums = add_ciphertexts(key.public_key, per_platform)
    stats.stage_seconds["aggregation"] += time.perf_counter() - t
    t = time.perf_counter()
    totals: np.ndarray | None = None
    boxes: dict[str, bytes] = {}
    try:
        if sealed:
            boxes = keyholder.decrypt_and_seal(
                key.key_id, query_id, participants, sums, len(elements)
            )
        else:
            plain = keyholder.decrypt_sums(key.key_id, query_id, participants, sums)
            # Masks that do not cancel, or a platform that packed out of bounds, give sums
            # that are not valid totals: nothing is released.
            totals = layout.unpack(plain, len(elements), key_bits)
    except (KeyHolderRefusal, SlotOverflowError) as exc:
        raise QueryFailed(f"query {query_id}: no valid totals: {exc}") from exc
    stats.stage_seconds["decryption"] += time.perf_counter() - t
    stats.ciphertexts += expected * len(participants)
    stats.bytes_sent += len(participants) * (len(request.elements) + len(request.announcement))
    stats.bytes_received += expected * len(participants) * ciphertext_width(key.public_key)
    return totals, boxes, query_id


def run_debt_query(
    grid: Grid,
    match: MatchResult,
    elements: Sequence[bytes],
    keyholder: KeyHolderAPI,
    batch_size: int,
    timeout: float,
    sealed: bool = True,
) -> QueryAnswer:
    """Totals for every element over the session's whole participant set.

    ``sealed`` (the default) has the key holder seal every total for each contributing
    platform, so the coordinator, which knows who holds each blinded identifier, never reads
    a total; clear totals are for answers the bureau itself must give (a lender's query).
    A platform that fails raises ``PlatformsFailed``: the caller starts a new matching
    session over the others (platforms refuse a query over a strict subset of a session's
    participants, so totals over two participant sets can never be differenced).
    """
    participants = match.participants
    key = QueryKey.from_keyholder(keyholder)
    stats = QueryStats(attempts=1)
    start = time.perf_counter()
    out = None if sealed else np.zeros((len(elements), m.PROFILE_FIELDS), dtype=np.int64)
    boxes: dict[str, list[bytes]] = {name: [] for name in participants}
    batches: list[tuple[str, int]] = []
    for lo in range(0, len(elements), batch_size):
        t0 = time.perf_counter()
        batch = elements[lo : lo + batch_size]
        totals, sealed_rows, query_id = query_batch(
            grid, match, participants, batch, key, keyholder, timeout, stats, sealed
        )
        if out is not None and totals is not None:
            out[lo : lo + len(batch)] = totals
        if sealed:
            for name in participants:
                boxes[name].append(sealed_rows[name])
        batches.append((query_id, len(batch)))
        stats.batches += 1
        stats.batch_seconds.append(time.perf_counter() - t0)
        progress.report("encrypted debt query", lo + len(batch), len(elements), "ids")
    stats.tokens = len(elements)
    stats.seconds = time.perf_counter() - start
    return QueryAnswer(
        totals=out,
        sealed={name: b"".join(parts) for name, parts in boxes.items()} if sealed else {},
        batches=batches,
        contributors=participants,
        dropped={},
        key=key,
        stats=stats,
        elements=list(elements),
    )
