"""The bureau's standing serving session: lenders' questions answered from a matched union.

Design and threat model: docs/lender-query.md. In short, ``open_serving_session`` runs the
private matching once (platforms keep their secrets for the session's lifetime) and the
masked debt query once over the union of the platforms' lists, keeping each batch's summed
ciphertexts undecrypted. ``ServingSession.ask`` answers lender questions: the lender's blinded
elements travel through every platform in ring order (each checks consent and its policy),
the key holder turns the result into the session pseudonym, the coordinator finds its row,
and the key holder decrypts that one sum and seals the applicant's totals for the lender.

Concurrent questions are answered together: one message per (lender, purpose) group per
platform hop, and one key-holder call per step for all of them.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.app.error import Error
from flwr.serverapp import Grid

from protocols import lender_messages as lm
from protocols import messages as m
from protocols.consent import SignedConsent
from protocols.packing import debt_profile_layout
from protocols.paillier import add_ciphertexts
from server.debt_query import QueryKey, _ciphertexts
from server.keyholder_client import KeyHolderAPI
from server.keyholder_lender import AnswerItem
from server.matching import PlatformsFailed, exchange, run_matching
from server.platform_channel import LeaseKeeper
from server.transport import send_and_collect

log = logging.getLogger(__name__)

INQUIRY_WINDOW_S = 30 * 24 * 3600


@dataclass(frozen=True)
class Applicant:
    """One applicant as the lender sends it: blinded element, signed consent, sealed secret."""

    element: bytes
    consent: SignedConsent
    sealed: bytes


@dataclass
class Question:
    """One lender request (one API call): its id, lender, purpose and applicants."""

    query_id: str
    lender: str
    purpose: str
    applicants: list[Applicant]


@dataclass
class ApplicantAnswer:
    """``sealed`` totals for the lender (None when refused), refusals by platform."""

    status: str  # "answered" | "refused"
    sealed: bytes | None
    refusals: dict[str, str] = field(default_factory=dict)
    recent_inquiries: int = 0


@dataclass
class QuestionAnswer:
    query_id: str
    lender: str
    purpose: str
    contributors: tuple[str, ...]
    missing: dict[str, str]
    answers: list[ApplicantAnswer]
    seconds: dict[str, float] = field(default_factory=dict)
    hops_via: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Row:
    batch: int
    plaintext: int
    rows: int  # rows packed in that plaintext
    slot: int


@dataclass
class ServingSession:
    """A matched union with its summed ciphertexts; lives until ``expires_at``."""

    session_id: str
    participants: tuple[str, ...]
    nodes: dict[str, int]
    key: QueryKey
    sums: list[list[int]]
    table: dict[bytes, _Row]
    expires_at: float
    timeout: float
    channel: LeaseKeeper | None = None  # the platform channel, when the service has one
    counter_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    inquiries: dict[bytes, list[float]] = field(default_factory=dict)
    stats: dict[str, object] = field(default_factory=dict)

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    def ask(
        self, grid: Grid, questions: Sequence[Question], keyholder: KeyHolderAPI
    ) -> list[QuestionAnswer]:
        """Answer concurrent questions together (see the module docstring)."""
        t0 = time.perf_counter()
        flat = [(q, k) for q in questions for k in range(len(q.applicants))]
        current = {(id(q), k): q.applicants[k].element for q, k in flat}
        refusals: dict[tuple[int, int], dict[str, str]] = {key: {} for key in current}
        missing: dict[str, str] = {}
        hop_seconds: list[float] = []
        via: dict[str, str] = {}
        for step, platform in enumerate(self.participants, start=1):
            th = time.perf_counter()
            failed = self._hop(grid, step, platform, questions, flat, current, refusals, via)
            if failed:
                missing[platform] = failed
                for key in refusals:
                    refusals[key][platform] = failed
            hop_seconds.append(time.perf_counter() - th)
            log.info(
                "hop %d (%s): %.3f s%s",
                step,
                platform,
                hop_seconds[-1],
                f", {failed}" if failed else "",
            )
        tk = time.perf_counter()
        ok = [(q, k) for q, k in flat if not refusals[(id(q), k)]]
        pseudonyms = (
            keyholder.lender_unblind(
                self.key.key_id,
                [current[(id(q), k)] for q, k in ok],
                [q.applicants[k].sealed for q, k in ok],
            )
            if ok
            else []
        )
        items: list[AnswerItem] = []
        answered: list[tuple[Question, int, bytes]] = []
        for (q, k), pseudonym in zip(ok, pseudonyms, strict=True):
            if pseudonym is None:
                refusals[(id(q), k)]["key holder"] = "the sealed blinding secret does not open"
                continue
            row = self.table.get(pseudonym)
            sealed = q.applicants[k].sealed
            items.append(
                AnswerItem(sealed=sealed)
                if row is None
                else AnswerItem(
                    sealed=sealed,
                    ciphertext=self.sums[row.batch][row.plaintext],
                    rows=row.rows,
                    slot=row.slot,
                )
            )
            answered.append((q, k, pseudonym))
        boxes = keyholder.lender_answer(self.key.key_id, self.participants, items) if items else []
        keyholder_s = time.perf_counter() - tk
        sealed_by = {(id(q), k): box for (q, k, _), box in zip(answered, boxes, strict=True)}
        counts = {(id(q), k): self._count(pseudonym) for q, k, pseudonym in answered}
        out = []
        for q in questions:
            answers = []
            for k in range(len(q.applicants)):
                key = (id(q), k)
                box = sealed_by.get(key)
                answers.append(
                    ApplicantAnswer(
                        status="answered" if box is not None else "refused",
                        sealed=box,
                        refusals=dict(refusals[key]),
                        recent_inquiries=counts.get(key, 0),
                    )
                )
            out.append(
                QuestionAnswer(
                    query_id=q.query_id,
                    lender=q.lender,
                    purpose=q.purpose,
                    contributors=self.participants,
                    missing=dict(missing),
                    answers=answers,
                    hops_via=dict(via),
                    seconds={
                        **{f"hop_{i}": round(h, 4) for i, h in enumerate(hop_seconds, 1)},
                        "platform_hops": round(sum(hop_seconds), 4),
                        "keyholder": round(keyholder_s, 4),
                        "total": round(time.perf_counter() - t0, 4),
                    },
                )
            )
        return out

    def _hop(
        self,
        grid: Grid,
        step: int,
        platform: str,
        questions: Sequence[Question],
        flat: list[tuple[Question, int]],
        current: dict[tuple[int, int], bytes],
        refusals: dict[tuple[int, int], dict[str, str]],
        via: dict[str, str],
    ) -> str | None:
        """One message with every question of the round to ``platform``; a reason if it
        failed. Records refused earlier still travel (their result is discarded), so every
        platform states its own decision on every applicant.

        The message goes over the platform channel when the platform's worker is attached
        (``server/platform_channel.py``), else as a Flower message."""
        request = lm.LenderBlind(
            request_id=uuid.uuid4().hex,
            session_id=self.session_id,
            step=step,
            questions=tuple(
                lm.QuestionSpan(lender=q.lender, purpose=q.purpose, count=len(q.applicants))
                for q in questions
            ),
            count=len(flat),
            consents=tuple(q.applicants[k].consent for q, k in flat),
            elements=b"".join(current[(id(q), k)] for q, k in flat),
        )
        content = request.to_content()
        route = (
            self.channel.route(grid, self, platform, self.timeout)
            if self.channel is not None
            else "flower message"
        )
        via[platform] = route
        if route == "timeout":
            return f"no reply within {self.timeout:.0f} s (no channel worker attached)"
        if route == "channel":
            try:
                answer = self.channel.broker.call(  # type: ignore[union-attr]
                    platform, "query.lender_blind", content, self.timeout
                )
            except TimeoutError:
                return f"no reply within {self.timeout:.0f} s"
        else:
            msg = Message(
                content, dst_node_id=self.nodes[platform], message_type="query.lender_blind"
            )
            replies = send_and_collect(grid, [msg], self.timeout)
            if not replies:
                return f"no reply within {self.timeout:.0f} s"
            answer = replies[0].error if replies[0].has_error() else replies[0].content
        if isinstance(answer, Error):
            return str(answer.reason)[:300]
        try:
            body = lm.LenderBlindReply.from_content(answer, f"reply from {platform}")
        except m.ProtocolError as exc:
            return str(exc)[:300]
        if body.request_id != request.request_id or body.count != len(flat):
            return "answered another request"
        by_index = {r.index: r.reason for r in body.refused}
        width = m.ELEMENT_BYTES
        for j, (q, k) in enumerate(flat):
            reason = by_index.get(j)
            if reason is not None:
                refusals[(id(q), k)][platform] = reason
            else:
                current[(id(q), k)] = body.elements[j * width : (j + 1) * width]
        return None

    def _count(self, pseudonym: bytes) -> int:
        """Earlier inquiries about this pseudonym in the window; records this one."""
        tag = hmac.digest(self.counter_key, pseudonym, "sha256")
        now = time.time()
        times = [t for t in self.inquiries.get(tag, []) if now - t < INQUIRY_WINDOW_S]
        self.inquiries[tag] = [*times, now]
        return len(times)


def open_serving_session(
    grid: Grid,
    nodes: Mapping[str, int],
    keyholder: KeyHolderAPI,
    *,
    timeout: float,
    lifetime_s: int = 24 * 3600,
    batch_size: int = 5000,
) -> ServingSession:
    """Matching with retained secrets, then the masked debt query over the union, kept summed.

    Raises ``PlatformsFailed`` naming platforms that failed; the caller opens a new session
    over the others (as for the batch query).
    """
    t0 = time.perf_counter()
    match = run_matching(grid, nodes, timeout, serving_lifetime_s=lifetime_s)
    t_match = time.perf_counter() - t0
    union = match.union()
    key = QueryKey.from_keyholder(keyholder)
    key_bits = key.public_key.n.bit_length()
    layout = debt_profile_layout(len(match.participants))
    per_plain = layout.tokens_per_plaintext(key_bits)
    sums: list[list[int]] = []
    table: dict[bytes, _Row] = {}
    for b, lo in enumerate(range(0, len(union), batch_size)):
        batch = union[lo : lo + batch_size]
        expected = layout.plaintexts_for(len(batch), key_bits)
        query_id = uuid.uuid4().hex
        request = m.DebtProfileRequest(
            query_id=query_id,
            session_id=match.session_id,
            key_id=key.key_id,
            participants=match.participants,
            count=len(batch),
            announcement=key.announcement,
            elements=b"".join(batch),
        )
        replies = exchange(
            grid,
            {p: ("query.debt_profile", request) for p in match.participants},
            match.nodes,
            timeout,
        )
        per_platform, bad = [], {}
        for name in match.participants:
            try:
                per_platform.append(
                    _ciphertexts(replies[name].content, name, query_id, key, expected)
                )
            except m.ProtocolError as exc:
                bad[name] = str(exc)
        if bad:
            raise PlatformsFailed("query.debt_profile", bad)
        sums.append(add_ciphertexts(key.public_key, per_platform))
        for j, element in enumerate(batch):
            p, slot = divmod(j, per_plain)
            rows = min(per_plain, len(batch) - p * per_plain)
            table[element] = _Row(b, p, rows, slot)
    session = ServingSession(
        session_id=match.session_id,
        participants=match.participants,
        nodes=dict(match.nodes),
        key=key,
        sums=sums,
        table=table,
        expires_at=time.time() + lifetime_s,
        timeout=timeout,
    )
    session.stats = {
        "session_id": match.session_id,
        "participants": list(match.participants),
        "union": len(union),
        "batches": len(sums),
        "matching_s": round(t_match, 2),
        "open_s": round(time.perf_counter() - t0, 2),
    }
    log.info("serving session open: %s", session.stats)
    return session
