"""Sealed delivery of decrypted totals: from the key holder to each platform, past the bureau.

Why the coordinator must not read the totals it delivers
    The coordinator knows which platforms' lists hold each blinded identifier (it relays
    them). For a borrower on one platform only (two thirds of all borrowers), the total *is*
    that platform's own figure, so a coordinator that saw totals would read most of each
    platform's loan book, pseudonymously but attributed. So the key holder, which sees totals
    but neither identifiers nor who holds them, seals every total of a query batch for every
    platform that contributed, under a key only that platform and the key holder share
    (static X25519 between the key holder's delivery key, announced with its signed Paillier
    key, and the platform's agreement key pinned in the key holder's roster; HKDF-SHA256 per
    query and platform; a ChaCha20 keystream). The coordinator routes to each platform only
    the sealed rows of that platform's own borrowers, which it can do because it knows the
    overlap pattern, and cannot open any of them.

What this does not do
    Integrity: a keystream is malleable. A coordinator that flips bits changes a total; the
    platform's check that a total is never below its own figures catches only some of that.
    The coordinator is honest-but-curious here (it relays; TLS protects the wire).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.messages import PROFILE_FIELDS

ROW_BYTES = PROFILE_FIELDS * 8
DELIVERY_INFO = b"fedcredit/deliver/v1"


class DeliveryError(ValueError):
    pass


def delivery_stream(shared: bytes, query_id: str, key_id: str, platform: str, rows: int) -> bytes:
    """The keystream that seals ``rows`` totals of one query batch for one platform."""
    if len(shared) != 32 or not any(shared):
        raise DeliveryError("delivery secret must be 32 bytes and not all zero")
    try:
        salt = bytes.fromhex(query_id)
    except ValueError:
        raise DeliveryError(f"query id {query_id!r} is not hex") from None
    try:
        info = b"|".join((DELIVERY_INFO, key_id.encode(), platform.encode()))
    except UnicodeEncodeError:
        raise DeliveryError("key id and platform name must be encodable text") from None
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)
    # One key per (query, key id, platform): a zero nonce is never reused under a key.
    encryptor = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    return encryptor.update(b"\0" * (rows * ROW_BYTES))


def seal(totals: np.ndarray, stream: bytes) -> bytes:
    """Totals (rows, 3) as little-endian int64, XORed with the keystream."""
    plain = np.ascontiguousarray(totals, dtype="<i8").tobytes()
    if len(stream) != len(plain):
        raise DeliveryError(f"keystream of {len(stream)} bytes for {len(plain)} bytes of totals")
    return (np.frombuffer(plain, dtype=np.uint8) ^ np.frombuffer(stream, dtype=np.uint8)).tobytes()


def open_rows(sealed_rows: bytes, positions: Sequence[int], stream: bytes) -> np.ndarray:
    """Open sealed rows that sit at ``positions`` of a batch sealed with ``stream``."""
    count = len(positions)
    if len(sealed_rows) != count * ROW_BYTES:
        raise DeliveryError(f"{len(sealed_rows)} sealed bytes for {count} rows")
    if len(stream) % ROW_BYTES:
        raise DeliveryError(f"a keystream of {len(stream)} bytes is not whole rows")
    limit = len(stream) // ROW_BYTES
    if any(not 0 <= int(p) < limit for p in positions):
        raise DeliveryError(f"a row position is outside the batch of {limit} rows")
    pos = np.asarray(positions, dtype=np.int64)
    ks = np.frombuffer(stream, dtype=np.uint8).reshape(-1, ROW_BYTES)[pos]
    rows = np.frombuffer(sealed_rows, dtype=np.uint8).reshape(-1, ROW_BYTES) ^ ks
    return rows.view("<i8").reshape(count, PROFILE_FIELDS).astype(np.int64)
