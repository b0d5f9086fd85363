"""A lender's applicant in blinded form, and the key holder's unblinding.

The lender turns a national ID into ``x = r·H(t)`` (``t`` the pseudonymous token under the
platforms' token pepper, ``H`` the matching hash of ``protocols.blinding``, ``r`` a fresh
clamped X25519 scalar). ``x`` is a uniformly random element of the prime-order subgroup,
independent of ``t``: the platforms that re-blind it (``y = a_m ··· a_1 · x``) cannot tell
whose it is, nor link two questions about one person. The lender seals ``r`` and a fresh
X25519 answer key to the key holder's delivery key (PyNaCl ``SealedBox``, anonymous
sender), so only the key holder can compute the pseudonym ``F = r^-1·y = K·H(t)`` and only the
lender can open the totals the key holder seals for it.

Why plain X25519 for ``r^-1``: X25519 clamps every scalar, but for any ``s`` mod ``L`` the
integer ``c`` with ``c ≡ s (mod L)`` and ``c ≡ 0 (mod 8)`` is unique below ``8L``; when it
lies in ``[2^254, 2^255)`` it is its own clamp and ``X25519(c, u) = s·u``. Otherwise ``-s``
qualifies (``c(-s) = 8L - c(s)``), and ``-s`` gives the same u-coordinate, since a
u-coordinate names the pair ``±P``. So no edwards25519 conversion is needed and the
constant-time Montgomery ladder does the work (about 0.1 ms).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nacl import bindings as _nacl
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from protocols import blinding
from protocols.tokens import token_for_national_id

SECRET_BLOB = 32 + 32  # r, answer public key
ANSWER_FIELDS = 3  # total debt (fen), active loans, lenders
ANSWER_PLAIN = struct.calcsize("<QQQ")


class UnblindError(ValueError):
    """A sealed secret that does not open, or an element that cannot be unblinded."""


def _clamped_for(scalar: int) -> bytes | None:
    """The clamped 32-byte scalar equal to ``scalar`` mod L, or None if there is none."""
    s = scalar % blinding.L
    if s == 0:
        return None
    for k in range(8):
        c = s + k * blinding.L
        if c % 8 == 0:
            break
    if (1 << 254) <= c < (1 << 255):
        return c.to_bytes(32, "little")
    return None


def multiply(scalar: int, element: bytes) -> bytes:
    """``scalar·element`` for any scalar not 0 mod L, on X25519 (see the module docstring)."""
    s = scalar % blinding.L
    for candidate in (s, blinding.L - s):
        clamped = _clamped_for(candidate)
        if clamped is not None:
            try:
                return _nacl.crypto_scalarmult(clamped, bytes(element))
            except (CryptoError, ValueError, TypeError) as exc:
                raise UnblindError(f"X25519 failed: {exc}") from None
    raise UnblindError("scalar is 0 mod the group order")


@dataclass(frozen=True)
class BlindedApplicant:
    """What the lender keeps (``r``, ``answer_key``) and what it sends (``element``, ``sealed``)."""

    element: bytes
    sealed: bytes
    secret: bytes
    answer_key: PrivateKey


def blind_token(token_hex: str, delivery_key: bytes) -> BlindedApplicant:
    """Blind a token and seal the blinding secret to the key holder's delivery key."""
    h = blinding.hash_to_group(bytes.fromhex(token_hex))
    r = blinding.new_secret()
    x = blinding.blind(r, [h], validate=False)[0]
    answer_key = PrivateKey.generate()
    sealed = SealedBox(PublicKey(bytes(delivery_key))).encrypt(r + bytes(answer_key.public_key))
    return BlindedApplicant(element=x, sealed=sealed, secret=r, answer_key=answer_key)


def blind_national_id(pepper: bytes, national_id: str, delivery_key: bytes) -> BlindedApplicant:
    """The lender's whole step: normalise and tokenise the ID, then ``blind_token``."""
    return blind_token(token_for_national_id(pepper, national_id), delivery_key)


def open_sealed_secret(delivery_private: bytes, sealed: bytes) -> tuple[bytes, bytes]:
    """The key holder's side: ``(r, answer public key)`` from a lender's sealed blob."""
    try:
        box = SealedBox(PrivateKey(bytes(delivery_private)))
        blob = box.decrypt(bytes(sealed))
    except (CryptoError, ValueError, TypeError):
        raise UnblindError("the sealed blinding secret does not open with this key") from None
    if len(blob) != SECRET_BLOB:
        raise UnblindError(f"the sealed blinding secret has {len(blob)} bytes, not {SECRET_BLOB}")
    return blob[:32], blob[32:]


def unblind(secret: bytes, element: bytes) -> bytes:
    """``r^-1·element``: the pseudonym ``F`` from the fully re-blinded lender element."""
    blinding.check_element(0, element)
    inverse = pow(blinding.clamp(secret), -1, blinding.L)
    return multiply(inverse, element)


def seal_answer(answer_public: bytes, totals: tuple[int, int, int]) -> bytes:
    """The key holder seals one applicant's totals for the lender's answer key."""
    plain = struct.pack("<QQQ", *(int(v) for v in totals))
    return SealedBox(PublicKey(bytes(answer_public))).encrypt(plain)


def open_answer(answer_key: PrivateKey, sealed: bytes) -> tuple[int, int, int]:
    """The lender opens its totals: (total debt in fen, active loans, lenders)."""
    try:
        plain = SealedBox(answer_key).decrypt(bytes(sealed))
    except (CryptoError, ValueError, TypeError):
        raise UnblindError("the sealed answer does not open with this answer key") from None
    if len(plain) != ANSWER_PLAIN:
        raise UnblindError("the sealed answer has the wrong length")
    debt, loans, lenders = struct.unpack("<QQQ", plain)
    return debt, loans, lenders
