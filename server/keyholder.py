"""The decryption-key holder's policy: what it decrypts, for whom, and what it refuses.

Why a separate party: the coordinator (the bureau's aggregator) sees every platform's
ciphertext. If it also held the Paillier private key it could decrypt each platform's figures
one by one. So the private key lives in a separate process and service (``fedcredit
keyholder serve``, ``server/keyholder_service.py``) run by a different operator; the
coordinator sends it homomorphic *sums* and gets plaintext sums back, and on its own can
decrypt nothing.

The key holder decrypts whatever sum it is given
    It cannot tell a sum over three platforms from one platform's ciphertext relabelled as a
    "sum": its checks (authenticated caller, at least ``min_participants`` distinct platform
    names, a fresh query id, every ciphertext a unit mod n**2, sizes within bounds) are
    hygiene and audit, not the protection of individual figures. That protection comes from
    the platforms: each adds an additive mask to its plaintext, the masks of all
    participants cancel only in the full sum, so any single platform's decrypted ciphertext
    (or any partial sum) is uniform noise mod n.

If the coordinator and the key holder collude
    (outside MISSION.md's assumption of non-colluding honest-but-curious parties) they can
    decrypt every ciphertext the coordinator received, so they see each platform's *masked*
    value ``x_i + sum_j +-PRG(s_ij)``. The masks come from pairwise seeds ``s_ij`` agreed
    between platforms, which neither coordinator nor key holder knows. Colluding, they learn:
    the total over the participant set (which the coordinator learns anyway), and nothing
    about any single honest platform's contribution as long as at least two participating
    platforms are honest (keep their pairwise seeds to themselves). Platforms that join the
    collusion reveal their seeds and their own values, so the colluders learn the *sum* of the
    honest platforms' contributions; with only one honest participant left, that sum is its
    contribution. Also lost under collusion: the key holder's refusals (replay, too few
    participants) no longer bind, since the coordinator can ask for anything; and if masking
    is ever skipped (a bug, or a mask-free protocol step) collusion reveals every individual
    figure. Platforms must verify the key holder's signed announcement
    (``protocols.key_announcement``) so that a coordinator alone cannot substitute a key pair
    of its own.

Does not protect (even without collusion)
    Differencing across participant sets: a coordinator that obtains the sum for the same
    borrowers over {A, B, C} and then over {B, C} learns A's figure by subtraction. The key
    holder cannot see which borrowers a sum covers, so it cannot stop this; platforms must
    answer only queries over the full enrolled platform set (or otherwise bound repeats).
    ``min_participants`` (default 3, never below 2) only stops the crudest case.

Sealed delivery (``seal_rows``)
    The coordinator knows which platforms hold each blinded identifier, so for a borrower on
    one platform a clear total would be that platform's own figure. On request the key holder
    therefore unpacks the sums into debt-profile totals and seals them for each participant
    (``protocols.delivery``: X25519 between this key's delivery key, announced and signed with
    it, and the participant's agreement key from the key holder's own copy of the roster).
    The coordinator forwards sealed rows it cannot read. The key holder itself sees the
    totals, but not which identifier or platform a row belongs to.

Refusals carry an HTTP-style status and a one-line reason (``KeyHolderRefusal``) and are
logged; every decryption and every refusal of an authenticated request goes to a
hash-chained JSON-lines audit file (``AuditLog``), and decrypted query ids are kept in
SQLite (``ReplayGuard``) so a replay is refused even after a restart.

``KeyHolder`` at the bottom is the old in-process class, kept only until the coordinator
(``server/federation.py``, ``server/debt_query.py``) moves to ``KeyHolderAPI``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols import delivery
from protocols.audit_chain import keyholder_entries, verify_chain
from protocols.identity import PLATFORM_NAME_PATTERN
from protocols.key_announcement import KeyAnnouncement
from protocols.masking import MaskError, pairwise_secret
from protocols.packing import (
    DEBT_PROFILE_LAYOUT,
    SlotOverflowError,
    debt_profile_layout,
)
from protocols.paillier import (
    InvalidCiphertext,
    ciphertext_width,
    ciphertexts_from_bytes,
    decrypt_plaintexts,
)
from server.keystore import KeyRecord, Keystore

log = logging.getLogger(__name__)

DEFAULT_MIN_PARTICIPANTS = 3
DEFAULT_MAX_COUNT = 100_000
# A sum of more contributions than the slot layout's headroom may carry between slots.
DEFAULT_MAX_PARTICIPANTS = DEBT_PROFILE_LAYOUT.max_contributors

# The service's routes, named once for the service and its client.
ROUTE_HEALTH = "/v1/health"
ROUTE_KEY = "/v1/key"
ROUTE_KEYS = "/v1/keys"
ROUTE_DECRYPT = "/v1/decrypt"
PLATFORM_NAME = PLATFORM_NAME_PATTERN  # the roster's rule for platform names
_PLATFORM_RE = re.compile(PLATFORM_NAME)
MAX_SEAL_ROWS = 10_000_000

__all__ = [
    "AuditLog",
    "DecodedRequest",
    "DecryptRequest",
    "DecryptResponse",
    "KeyHolderCore",
    "KeyHolderRefusal",
    "ReplayGuard",
    "decode_decrypt_body",
    "decode_decrypt_request",
    "verify_audit_log",
]


class KeyHolderRefusal(PermissionError):
    """The key holder will not do what was asked; ``reason`` says why in one line.

    ``status`` is the HTTP status the service answers with, ``code`` a stable machine name.
    """

    def __init__(self, reason: str, status: int = 403, code: str = "refused") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code


# ------------------------------------------------------------------------- request decoding


class DecryptRequest(BaseModel):
    """``POST /v1/decrypt`` body. Unknown fields are refused; no type is coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    query_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    participants: Annotated[list[str], Field(max_length=1024)]
    count: Annotated[int, Field(ge=1, le=2**31)]
    ciphertexts: str = Field(description="base64 of `count` fixed-width big-endian ciphertexts")
    seal_rows: Annotated[int | None, Field(ge=1, le=MAX_SEAL_ROWS)] = Field(
        default=None,
        description="if given: unpack the sums into this many debt-profile rows and seal "
        "them for every participant (protocols.delivery) instead of answering in clear",
    )


class DecryptResponse(BaseModel):
    """``POST /v1/decrypt`` answer.

    Clear: ``plaintexts``, fixed-width (byte length of n) big-endian, base64. Sealed
    (``seal_rows`` asked): ``sealed``, per participant the base64 of its sealed rows.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str
    query_id: str
    plaintexts: str | None = None
    sealed: dict[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class DecodedRequest:
    """A request that passed every check: ready to decrypt."""

    key: KeyRecord
    query_id: str
    participants: tuple[str, ...]
    ciphertexts: list[int]
    seal_rows: int | None = None


def _pydantic_reason(exc: ValidationError) -> str:
    parts = []
    # Unknown and missing fields first: they say most plainly what is wrong with the body.
    rank = {"extra_forbidden": 0, "missing": 1}
    for e in sorted(exc.errors(), key=lambda e: rank.get(e["type"], 2))[:5]:
        where = ".".join(str(x) for x in e["loc"]) or "body"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif e["type"] == "missing":
            parts.append(f"missing field {where!r}")
        else:
            parts.append(f"{where}: {e['msg']}"[:200])
    return "invalid request: " + "; ".join(parts)


def decode_decrypt_request(
    raw: object,
    keystore: Keystore,
    *,
    min_participants: int = DEFAULT_MIN_PARTICIPANTS,
    max_count: int = DEFAULT_MAX_COUNT,
    max_participants: int = DEFAULT_MAX_PARTICIPANTS,
    now: dt.datetime | None = None,
) -> DecodedRequest:
    """Check a parsed JSON body completely; every failure is a ``KeyHolderRefusal``.

    Order: shape (422), key id (404 unknown / 409 beyond grace), participants (403 too few,
    422 duplicates, bad names or slot overflow), count (413 over the maximum), ciphertext blob
    (422 bad base64 or wrong length, 422 naming the index of a ciphertext outside Z*_{n^2}).
    The replay check needs the persistent store and happens in ``KeyHolderCore``.
    """
    if not isinstance(raw, dict):
        raise KeyHolderRefusal("invalid request: the body must be a JSON object", 422, "invalid")
    try:
        req = DecryptRequest.model_validate(raw)
    except ValidationError as exc:
        raise KeyHolderRefusal(_pydantic_reason(exc), 422, "invalid") from None
    now = now or dt.datetime.now(dt.UTC)
    key = keystore.get(req.key_id)
    if key is None:
        raise KeyHolderRefusal(f"unknown key id {req.key_id}", 404, "unknown_key")
    if not key.can_decrypt(now):
        raise KeyHolderRefusal(
            f"key {req.key_id} is retired and past its grace period: it no longer decrypts",
            409,
            "key_retired",
        )
    names = req.participants
    if len(set(names)) != len(names):
        raise KeyHolderRefusal("participants must be unique platform names", 422, "invalid")
    for name in names:
        if not _PLATFORM_RE.fullmatch(name):
            raise KeyHolderRefusal(
                f"participant name {name[:70]!r} is not a platform name ({PLATFORM_NAME})",
                422,
                "invalid",
            )
    if len(names) < min_participants:
        raise KeyHolderRefusal(
            f"refusing to decrypt a sum of {len(names)} participant(s): at least "
            f"{min_participants} are required (fewer could reveal one platform's own figures)",
            403,
            "too_few_participants",
        )
    if len(names) > max_participants:
        raise KeyHolderRefusal(
            f"{len(names)} participants: a sum of more than {max_participants} may overflow "
            "its slots",
            422,
            "too_many_participants",
        )
    if req.count > max_count:
        raise KeyHolderRefusal(
            f"count {req.count} exceeds the maximum batch of {max_count} ciphertexts",
            413,
            "too_large",
        )
    if req.seal_rows is not None:
        key_bits = int(key.public_key.n).bit_length()
        needed = debt_profile_layout(len(names)).plaintexts_for(req.seal_rows, key_bits)
        if needed != req.count:
            raise KeyHolderRefusal(
                f"count mismatch: {req.seal_rows} rows over {len(names)} participants pack "
                f"into {needed} plaintexts, not {req.count}",
                422,
                "count_mismatch",
            )
    width = ciphertext_width(key.public_key)
    expected_chars = 4 * ((req.count * width + 2) // 3)
    if len(req.ciphertexts) != expected_chars:
        raise KeyHolderRefusal(
            f"count mismatch: {req.count} ciphertexts of {width} bytes need {expected_chars} "
            f"base64 characters, got {len(req.ciphertexts)}",
            422,
            "count_mismatch",
        )
    try:
        blob = base64.b64decode(req.ciphertexts, validate=True)
    except (binascii.Error, ValueError):
        raise KeyHolderRefusal("ciphertexts: not valid base64", 422, "invalid") from None
    try:
        cts = ciphertexts_from_bytes(key.public_key, blob, req.count)
    except InvalidCiphertext as exc:  # names the index: "ciphertext 3: not below n**2"
        raise KeyHolderRefusal(f"{exc} (outside Z*_{{n^2}})", 422, "bad_ciphertext") from None
    return DecodedRequest(
        key=key,
        query_id=req.query_id,
        participants=tuple(names),
        ciphertexts=cts,
        seal_rows=req.seal_rows,
    )


def decode_decrypt_body(body: bytes, keystore: Keystore, **limits: Any) -> DecodedRequest:
    """``decode_decrypt_request`` on raw bytes: JSON errors become clean 422 refusals too."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError, TypeError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and over-long integer literals.
        raise KeyHolderRefusal(
            f"invalid request: body is not JSON ({str(exc)[:120]})", 422, "invalid"
        ) from None
    return decode_decrypt_request(raw, keystore, **limits)


# ------------------------------------------------------------------------- replay and audit


class ReplayGuard:
    """Query ids already decrypted, kept in SQLite so a restart still refuses replays.

    ``path=None`` keeps them in memory (``LocalKeyHolder``). ``claim`` is atomic (a primary
    key insert), so two concurrent requests with one query id cannot both pass.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._memory: set[str] = set()
        self._lock = threading.Lock()
        if self.path is not None:
            with self._connect() as db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS decrypted_queries ("
                    "query_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, at TEXT NOT NULL)"
                )
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        assert self.path is not None
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def seen(self, query_id: str) -> bool:
        if self.path is None:
            with self._lock:
                return query_id in self._memory
        db = self._connect()
        try:
            row = db.execute(
                "SELECT 1 FROM decrypted_queries WHERE query_id = ?", (query_id,)
            ).fetchone()
        finally:
            db.close()
        return row is not None

    def claim(self, query_id: str, key_id: str, now: dt.datetime) -> bool:
        """Record ``query_id``; False if it was recorded before (a replay)."""
        if self.path is None:
            with self._lock:
                if query_id in self._memory:
                    return False
                self._memory.add(query_id)
                return True
        db = self._connect()
        try:
            db.execute(
                "INSERT INTO decrypted_queries (query_id, key_id, at) VALUES (?, ?, ?)",
                (query_id, key_id, now.isoformat()),
            )
            return True
        except sqlite3.IntegrityError:
            return False
        finally:
            db.close()


_GENESIS = "0" * 64


class AuditLog:
    """Append-only JSON lines, each hash-chained to the previous one (tamper-evident).

    Each line is ``{"prev": <hash of previous line>, ...event..., "hash": h}`` where
    ``h = sha256(prev_hash + canonical JSON of the line without "hash")``. Editing, deleting
    or reordering any line breaks the chain from there on (``verify_audit_log``); truncating
    the tail is detectable only against an externally kept last hash. ``path=None`` keeps the
    lines in memory (tests).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._prev = _GENESIS
        if self.path is not None and self.path.exists():
            last = _last_line(self.path)
            if last:
                try:
                    self._prev = json.loads(last)["hash"]
                except (ValueError, KeyError, TypeError):
                    log.error("audit log %s: last line unreadable; chaining from it", self.path)
                    self._prev = hashlib.sha256(last.encode()).hexdigest()

    def append(self, event: dict[str, Any]) -> str:
        with self._lock:
            entry = {"prev": self._prev, **event}
            body = json.dumps(entry, sort_keys=True, separators=(",", ":"))
            digest = hashlib.sha256((self._prev + body).encode()).hexdigest()
            line = json.dumps({**entry, "hash": digest}, sort_keys=True, separators=(",", ":"))
            if self.path is None:
                self.lines.append(line)
            else:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, (line + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._prev = digest
            return digest


def _last_line(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 65536))
        tail = fh.read().decode(errors="replace").strip().splitlines()
    return tail[-1] if tail else ""


def verify_audit_log(lines: Sequence[str] | Path) -> int:
    """Check the hash chain; returns the number of lines, raises ``ValueError`` at a break.

    The checks are ``protocols.audit_chain``'s, shared with the platforms' query logs and
    ``fedcredit audit verify`` (which also compares with a published head hash).
    """
    if isinstance(lines, Path):
        lines = lines.read_text().splitlines()
    report = verify_chain(keyholder_entries(lines))
    if report.first_bad is not None:
        raise ValueError(f"audit {report.first_bad.message()}")
    return report.count


# ---------------------------------------------------------------------------------- the core


class KeyHolderCore:
    """Decodes, checks, decrypts and audits: the whole policy, with no transport attached.

    The HTTP service and ``LocalKeyHolder`` both drive this class, so tests of the fast
    in-process path exercise the same checks as the real service.
    """

    def __init__(
        self,
        keystore: Callable[[], Keystore],
        *,
        replay: ReplayGuard,
        audit: AuditLog,
        min_participants: int = DEFAULT_MIN_PARTICIPANTS,
        max_count: int = DEFAULT_MAX_COUNT,
        max_participants: int = DEFAULT_MAX_PARTICIPANTS,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        roster: Callable[[], Mapping[str, bytes]] | None = None,
    ) -> None:
        """``roster``: platform name -> raw X25519 agreement key (needed only to seal)."""
        if min_participants < 2:
            raise ValueError(
                "min_participants must be at least 2 (one would be a platform's own figure)"
            )
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        self._keystore = keystore
        self.replay = replay
        self.audit = audit
        self.min_participants = min_participants
        self.max_count = max_count
        self.max_participants = max_participants
        self.clock = clock
        self._roster = roster

    @property
    def keystore(self) -> Keystore:
        return self._keystore()

    def announcement(self) -> KeyAnnouncement:
        ks = self.keystore
        return ks.announcement(ks.active.key_id, self.clock())

    def announcements(self) -> list[KeyAnnouncement]:
        ks, now = self.keystore, self.clock()
        return [ks.announcement(k.key_id, now) for k in ks.keys]

    def max_body_bytes(self) -> int:
        """The largest acceptable request body: the base64 of a maximal batch plus room."""
        width = max(ciphertext_width(k.public_key) for k in self.keystore.keys)
        return 4 * ((self.max_count * width + 2) // 3) + 128 * 1024

    def decrypt_body(self, body: bytes | object, caller: str = "?") -> DecryptResponse:
        """Decode (bytes or an already-parsed object), check, decrypt, audit, answer.

        With ``seal_rows`` the sums are unpacked into debt-profile totals and sealed for each
        participant under the X25519 secret of this key's delivery key and the participant's
        agreement key from the key holder's roster (``protocols.delivery``); the caller (the
        coordinator) then cannot read them. A sum whose slots are not valid totals (a mask
        that did not cancel, a platform out of bounds) is refused, not sealed.
        """
        now = self.clock()
        limits = {
            "min_participants": self.min_participants,
            "max_count": self.max_count,
            "max_participants": self.max_participants,
            "now": now,
        }
        ks = self.keystore
        try:
            if isinstance(body, bytes | bytearray):
                req = decode_decrypt_body(bytes(body), ks, **limits)
            else:
                req = decode_decrypt_request(body, ks, **limits)
            agreement = self._agreement_keys(req) if req.seal_rows is not None else {}
            if self.replay.seen(req.query_id) or not self.replay.claim(
                req.query_id, req.key.key_id, now
            ):
                raise KeyHolderRefusal(
                    f"query id {req.query_id} was already decrypted (replay)", 409, "replay"
                )
            assert req.key.private_key is not None  # can_decrypt checked it
            plain = decrypt_plaintexts(req.key.private_key, req.ciphertexts)
            if req.seal_rows is None:
                width = (int(req.key.public_key.n).bit_length() + 7) // 8
                blob = b"".join(m.to_bytes(width, "big") for m in plain)
                answer = DecryptResponse(
                    key_id=req.key.key_id,
                    query_id=req.query_id,
                    plaintexts=base64.b64encode(blob).decode(),
                )
            else:
                answer = self._seal(req, plain, agreement)
        except KeyHolderRefusal as exc:
            self._refused(exc, body, caller, now)
            raise
        self.audit.append(
            {
                "event": "decrypt",
                "at": now.isoformat(),
                "query_id": req.query_id,
                "key_id": req.key.key_id,
                "participants": list(req.participants),
                "count": len(plain),
                "sealed_rows": req.seal_rows,
                "caller": caller,
            }
        )
        log.info(
            "decrypted query %s: key %s, %d ciphertexts, participants %s%s",
            req.query_id,
            req.key.key_id,
            len(plain),
            ",".join(req.participants),
            f", sealed {req.seal_rows} rows for each" if req.seal_rows else "",
        )
        return answer

    def _agreement_keys(self, req: DecodedRequest) -> dict[str, bytes]:
        """Each participant's pinned X25519 agreement key, or a refusal naming who is missing."""
        if self._roster is None:
            raise KeyHolderRefusal(
                "this key holder has no roster, so it cannot seal totals (serve with --roster)",
                409,
                "no_roster",
            )
        if req.key.delivery_key is None:
            raise KeyHolderRefusal(
                f"key {req.key.key_id} has no delivery key; it cannot seal totals",
                409,
                "no_delivery_key",
            )
        roster = self._roster()
        missing = [p for p in req.participants if p not in roster]
        if missing:
            raise KeyHolderRefusal(
                f"participants not in the key holder's roster: {', '.join(missing[:10])}",
                403,
                "not_enrolled",
            )
        return {p: roster[p] for p in req.participants}

    def _seal(
        self, req: DecodedRequest, plain: list[int], agreement: dict[str, bytes]
    ) -> DecryptResponse:
        assert req.seal_rows is not None and req.key.delivery_key is not None
        key_bits = int(req.key.public_key.n).bit_length()
        layout = debt_profile_layout(len(req.participants))
        try:
            totals = layout.unpack(plain, req.seal_rows, key_bits)
        except (SlotOverflowError, ValueError) as exc:
            raise KeyHolderRefusal(
                f"the sums are not valid totals (a mask that did not cancel, or a platform "
                f"out of bounds): {exc}",
                422,
                "invalid_sums",
            ) from None
        sealed: dict[str, str] = {}
        for name in req.participants:
            try:
                shared = pairwise_secret(req.key.delivery_key, agreement[name])
                stream = delivery.delivery_stream(
                    shared, req.query_id, req.key.key_id, name, req.seal_rows
                )
            except (MaskError, delivery.DeliveryError) as exc:
                raise KeyHolderRefusal(
                    f"cannot seal for {name}: {exc}", 422, "bad_agreement_key"
                ) from None
            sealed[name] = base64.b64encode(delivery.seal(totals, stream)).decode()
        return DecryptResponse(key_id=req.key.key_id, query_id=req.query_id, sealed=sealed)

    def _refused(self, exc: KeyHolderRefusal, body: object, caller: str, now: dt.datetime) -> None:
        query_id = key_id = None
        obj = body
        if isinstance(body, bytes | bytearray) and len(body) < 10_000_000:
            with contextlib.suppress(ValueError, RecursionError):
                obj = json.loads(body)
        if isinstance(obj, dict):
            q, k = obj.get("query_id"), obj.get("key_id")
            query_id = q[:64] if isinstance(q, str) else None
            key_id = k[:64] if isinstance(k, str) else None
        log.warning(
            "refused decrypt (%d %s) query %s key %s: %s",
            exc.status,
            exc.code,
            query_id,
            key_id,
            exc.reason,
        )
        self.audit.append(
            {
                "event": "refused",
                "at": now.isoformat(),
                "status": exc.status,
                "code": exc.code,
                "reason": exc.reason[:300],
                "query_id": query_id,
                "key_id": key_id,
                "caller": caller,
            }
        )
