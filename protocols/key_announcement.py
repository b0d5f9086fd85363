"""Signed announcements of the key holder's Paillier public keys, verified by the platforms.

Why this exists: the coordinator carries the Paillier public key to the platforms with every
query. Were the key unauthenticated, a coordinator could substitute a key pair of its own and
decrypt every platform's ciphertext itself. So the decryption-key holder signs each public key
with its Ed25519 signing key, and each platform pins the key holder's Ed25519 *verify* key at
enrolment (out of band) and checks every query's announcement with it before encrypting.

What a valid announcement proves: the key holder vouched for this Paillier key (``key_id``
bound to the exact key bytes) for the window ``[issued_at, expires_at]``. The key holder
issues short windows (its rotation grace period), so a rotated-out key stops being accepted
by platforms soon after rotation, while every ciphertext made under a valid announcement can
still be decrypted within the grace period.

What it does not prove: that ``n`` was generated honestly (only the key holder knows), or
anything about the coordinator's honesty beyond the key it presents.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from protocols.paillier import InvalidPublicKey, PaillierPublicKey, public_key_from_bytes

__all__ = [
    "ANNOUNCEMENT_FORMAT",
    "AnnouncementError",
    "KeyAnnouncement",
    "key_id_for",
    "sign_announcement",
    "verify_announcement",
]

ANNOUNCEMENT_FORMAT = "fedcredit-key-announcement/v1"
# Clocks of key holder and platform disagree a little; an announcement "issued" slightly in
# the future is accepted within this much, no more.
MAX_CLOCK_SKEW = dt.timedelta(minutes=5)

KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class AnnouncementError(ValueError):
    """An announcement that must not be trusted; the message says why."""


def key_id_for(public_key_bytes: bytes) -> str:
    """The key id: first 16 hex chars of SHA-256 over ``public_key_to_bytes(pk)``."""
    return hashlib.sha256(bytes(public_key_bytes)).hexdigest()[:16]


def _utc_text(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds")


class KeyAnnouncement(BaseModel):
    """One Paillier public key, vouched for by the key holder's Ed25519 signature."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    key_id: KeyId
    public_key: bytes = Field(max_length=1024)
    bits: int = Field(ge=1, le=16384)
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    signature: bytes = Field(min_length=64, max_length=64)
    # The key holder's X25519 delivery key for this Paillier key: platforms open the totals
    # sealed for them with it (``protocols.delivery``). Signed like everything else.
    delivery_key: bytes | None = Field(default=None, min_length=32, max_length=32)

    def signed_bytes(self) -> bytes:
        """The canonical encoding the signature covers (everything but the signature)."""
        return _canonical(
            self.key_id,
            self.public_key,
            self.bits,
            self.issued_at,
            self.expires_at,
            self.delivery_key,
        )

    def to_bytes(self) -> bytes:
        """JSON (bytes fields in base64) for carrying the announcement inside messages."""
        return json.dumps(
            {
                "format": ANNOUNCEMENT_FORMAT,
                "key_id": self.key_id,
                "public_key": base64.b64encode(self.public_key).decode(),
                "bits": self.bits,
                "issued_at": _utc_text(self.issued_at),
                "expires_at": _utc_text(self.expires_at),
                "signature": base64.b64encode(self.signature).decode(),
                "delivery_key": None
                if self.delivery_key is None
                else base64.b64encode(self.delivery_key).decode(),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAnnouncement:
        """Parse ``to_bytes`` output; anything malformed raises ``AnnouncementError``."""
        try:
            obj = json.loads(bytes(data))
        except (ValueError, RecursionError, TypeError) as exc:
            raise AnnouncementError(f"announcement is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise AnnouncementError("announcement is not a JSON object")
        if obj.pop("format", None) != ANNOUNCEMENT_FORMAT:
            raise AnnouncementError(f"announcement format is not {ANNOUNCEMENT_FORMAT}")
        try:
            for name in ("public_key", "signature", "delivery_key"):
                if name == "delivery_key" and obj.get(name) is None:
                    continue
                if not isinstance(obj.get(name), str):
                    raise AnnouncementError(f"announcement field {name} is not base64 text")
                obj[name] = base64.b64decode(obj[name], validate=True)
            for name in ("issued_at", "expires_at"):
                if not isinstance(obj.get(name), str):
                    raise AnnouncementError(f"announcement field {name} is not a timestamp")
                obj[name] = dt.datetime.fromisoformat(obj[name])
            return cls(**obj)
        except (binascii.Error, ValueError) as exc:
            if isinstance(exc, AnnouncementError):
                raise
            if isinstance(exc, ValidationError):
                raise AnnouncementError(f"malformed announcement: {_first_error(exc)}") from None
            raise AnnouncementError(f"malformed announcement: {exc}") from None
        except TypeError as exc:
            raise AnnouncementError(f"malformed announcement: {exc}") from None


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return f"{'.'.join(str(x) for x in e['loc']) or 'value'}: {e['msg']}"


def _canonical(
    key_id: str,
    public_key: bytes,
    bits: int,
    issued_at: dt.datetime,
    expires_at: dt.datetime,
    delivery_key: bytes | None,
) -> bytes:
    # Domain-separated, sorted-key JSON with UTC microsecond timestamps: one byte string per
    # meaning, so a re-encoded announcement verifies and a changed one does not.
    body = json.dumps(
        {
            "bits": bits,
            "delivery_key": None
            if delivery_key is None
            else base64.b64encode(delivery_key).decode(),
            "expires_at": _utc_text(expires_at),
            "issued_at": _utc_text(issued_at),
            "key_id": key_id,
            "public_key": base64.b64encode(public_key).decode(),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return f"{ANNOUNCEMENT_FORMAT}\n{body}".encode()


def sign_announcement(
    signing_key: Ed25519PrivateKey,
    public_key_bytes: bytes,
    *,
    bits: int,
    issued_at: dt.datetime,
    expires_at: dt.datetime,
    delivery_key: bytes | None = None,
) -> KeyAnnouncement:
    """Sign a Paillier public key (``public_key_to_bytes`` form) for a validity window.

    ``delivery_key``: the raw X25519 public key that seals totals for platforms under this
    Paillier key (optional for callers that deliver no sealed totals).
    """
    public_key_bytes = bytes(public_key_bytes)
    delivery_key = None if delivery_key is None else bytes(delivery_key)
    key_id = key_id_for(public_key_bytes)
    signature = signing_key.sign(
        _canonical(key_id, public_key_bytes, bits, issued_at, expires_at, delivery_key)
    )
    return KeyAnnouncement(
        key_id=key_id,
        public_key=public_key_bytes,
        bits=bits,
        issued_at=issued_at,
        expires_at=expires_at,
        signature=signature,
        delivery_key=delivery_key,
    )


def verify_announcement(
    ann: KeyAnnouncement,
    keyholder_verify_key: bytes,
    *,
    allow_insecure_test_size: bool = False,
    now: dt.datetime | None = None,
) -> PaillierPublicKey:
    """The announced Paillier key, if the pinned key holder signed it and it is current.

    Checks, in order: the pinned verify key is a raw 32-byte Ed25519 key; the signature over
    the canonical encoding; the window (``issued_at`` not beyond ``now`` + 5 min skew,
    ``now`` before ``expires_at``); ``key_id`` is the hash of the key bytes; the key parses
    and passes ``public_key_from_bytes`` (1024-bit keys only with
    ``allow_insecure_test_size``, for tests); ``bits`` matches the modulus. Any failure raises
    ``AnnouncementError`` naming the reason.
    """
    if not isinstance(ann, KeyAnnouncement):
        raise AnnouncementError(f"not a KeyAnnouncement: {type(ann).__name__}")
    try:
        verifier = Ed25519PublicKey.from_public_bytes(bytes(keyholder_verify_key))
    except ValueError:
        raise AnnouncementError(
            "pinned key-holder verify key is not a 32-byte Ed25519 key"
        ) from None
    try:
        verifier.verify(ann.signature, ann.signed_bytes())
    except InvalidSignature:
        raise AnnouncementError(
            f"announcement for key {ann.key_id}: signature does not verify with the pinned "
            "key-holder key (tampered, or not issued by our key holder)"
        ) from None
    now = now or dt.datetime.now(dt.UTC)
    if ann.expires_at <= ann.issued_at:
        raise AnnouncementError(f"announcement for key {ann.key_id}: expires before it is issued")
    if ann.issued_at > now + MAX_CLOCK_SKEW:
        raise AnnouncementError(
            f"announcement for key {ann.key_id}: issued in the future ({_utc_text(ann.issued_at)})"
        )
    if now >= ann.expires_at:
        raise AnnouncementError(
            f"announcement for key {ann.key_id}: expired at {_utc_text(ann.expires_at)}"
        )
    if key_id_for(ann.public_key) != ann.key_id:
        raise AnnouncementError(f"announcement key id {ann.key_id} does not match its key")
    try:
        pk = public_key_from_bytes(
            ann.public_key, allow_insecure_test_size=allow_insecure_test_size
        )
    except InvalidPublicKey as exc:
        raise AnnouncementError(f"announcement for key {ann.key_id}: {exc}") from None
    if int(pk.n).bit_length() != ann.bits:
        raise AnnouncementError(
            f"announcement for key {ann.key_id}: says {ann.bits} bits, modulus has "
            f"{int(pk.n).bit_length()}"
        )
    return pk
