"""The platform's side of private matching: blind its own borrowers, re-blind others' lists.

Why a session lives in Flower's node state
    A matching session spans several messages (start, one re-blinding per other
    participant, done, then the query batches), and a simulated node may run each message in
    a different worker process. Its secret exponent, the order in which the platform sent its
    own list and the fully blinded list it got back therefore live in the node's context
    state (``context.state``), which Flower keeps on the platform's side only. A process-level
    cache saves rebuilding the lookup table for every query batch.

What the platform guarantees to the others
    * A fresh secret per session, so fully blinded forms from two sessions cannot be linked.
    * Its own list is sent in a random order (a fresh permutation), so the position of an
      element says nothing about the platform's ledger order.
    * It re-blinds each other participant's list at most once per session and never its own:
      a coordinator cannot use it as an oracle to blind chosen points repeatedly.
    * It forgets the session secret as soon as it receives its fully blinded list back: no
      later compromise of the node's state can re-create the session's pseudonyms.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context

from protocols import blinding
from protocols import messages as m

STATE_PREFIX = "fedcredit.match."
MAX_SESSIONS = 4  # sessions kept in node state; the oldest is forgotten first


@dataclass
class Session:
    """One matching session as this platform sees it."""

    session_id: str
    participants: tuple[str, ...]
    secret: bytes
    perm: np.ndarray  # perm[k] = ledger row of the k-th element this platform sent
    reblinded: list[str]
    fully: bytes  # own list, blinded by every participant, in sent order ("" until done)
    # A serving session (docs/lender-query.md) keeps its secret until this Unix time, to
    # re-blind lenders' applicants; 0 for an ordinary matching session.
    serving_until: int = 0

    def record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "participants": json.dumps(list(self.participants)),
                "secret": self.secret,
                "perm": self.perm.astype("<i4").tobytes(),
                "reblinded": json.dumps(self.reblinded),
                "fully": self.fully,
                "serving-until": self.serving_until,
            }
        )

    @classmethod
    def from_record(cls, session_id: str, record: ConfigRecord) -> Session:
        return cls(
            session_id=session_id,
            participants=tuple(json.loads(str(record["participants"]))),
            secret=bytes(record["secret"]),  # type: ignore[arg-type]
            perm=np.frombuffer(bytes(record["perm"]), dtype="<i4").astype(np.int64),  # type: ignore[arg-type]
            reblinded=list(json.loads(str(record["reblinded"]))),
            fully=bytes(record["fully"]),  # type: ignore[arg-type]
            serving_until=int(record.get("serving-until", 0)),  # type: ignore[arg-type]
        )


def _key(session_id: str) -> str:
    return STATE_PREFIX + session_id


def load_session(context: Context, session_id: str, what: str) -> Session:
    record = context.state.config_records.get(_key(session_id))
    if record is None:
        raise m.ProtocolError(f"{what}: unknown matching session {session_id}")
    return Session.from_record(session_id, record)


def save_session(context: Context, session: Session) -> None:
    records = context.state.config_records
    records[_key(session.session_id)] = session.record()
    ours = [k for k in list(records.keys()) if k.startswith(STATE_PREFIX)]
    for stale in ours[:-MAX_SESSIONS]:
        del records[stale]


def start_session(
    context: Context,
    session_id: str,
    participants: tuple[str, ...],
    tokens: list[str],
    serving_until: int = 0,
) -> tuple[Session, bytes]:
    """A fresh secret and permutation; returns the session and this platform's blinded list."""
    if context.state.config_records.get(_key(session_id)) is not None:
        raise m.ProtocolError(f"query.match_start: session {session_id} already started")
    secret = blinding.new_secret()
    order = list(range(len(tokens)))
    secrets.SystemRandom().shuffle(order)  # the OS CSPRNG: numpy's generators are not for secrets
    perm = np.asarray(order, dtype=np.int64)
    hashed = blinding.hash_many([bytes.fromhex(tokens[i]) for i in perm])
    own = blinding.blind(secret, hashed, validate=False)
    session = Session(session_id, participants, secret, perm, [], b"", serving_until)
    save_session(context, session)
    return session, blinding.elements_to_bytes(own)


_lookup_lock = threading.Lock()
_lookups: OrderedDict[tuple[int, str], dict[bytes, int]] = OrderedDict()


def accept_fully_blinded(session: Session, req: m.MatchDone, what: str) -> None:
    """Check the platform's own list coming back fully blinded, and keep it in ``session``.

    One check for both ends of matching (a query's and a lender serving session's): finished
    once, the count sent, valid subgroup elements, and no repeats (a repeat would mean the
    ring collapsed two borrowers, or a hostile coordinator tried to).
    """
    if session.fully:
        raise m.ProtocolError(f"{what}: session {req.session_id} is already finished")
    if req.count != len(session.perm):
        raise m.ProtocolError(f"{what}: {req.count} elements for a list of {len(session.perm)}")
    try:
        elements = blinding.elements_from_bytes(
            req.elements, max_count=m.MAX_ELEMENTS_PER_LIST, what=what
        )
    except blinding.InvalidGroupElement as exc:
        raise m.ProtocolError(f"{what}: {exc}") from exc
    if len(set(elements)) != len(elements):
        raise m.ProtocolError(f"{what}: the fully blinded list has repeated elements")
    session.fully = req.elements


def own_rows(context: Context, session: Session) -> dict[bytes, int]:
    """Fully blinded element -> this platform's ledger row, for a finished session."""
    if not session.fully:
        raise m.ProtocolError(f"matching session {session.session_id} is not finished")
    key = (context.node_id, session.session_id)
    with _lookup_lock:
        found = _lookups.get(key)
        if found is not None:
            return found
    blob, width = session.fully, m.ELEMENT_BYTES
    table = {
        blob[k * width : (k + 1) * width]: int(row) for k, row in enumerate(session.perm.tolist())
    }
    with _lookup_lock:
        _lookups[key] = table
        while len(_lookups) > MAX_SESSIONS:
            _lookups.popitem(last=False)
    return table
