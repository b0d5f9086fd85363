"""Pairwise additive masks that cancel only in the full sum (SecAgg-style), for Paillier replies.

Each platform adds a mask to every packed Paillier plaintext before encrypting it. The masks
come from pairwise X25519 key agreement between platforms, are fresh for every query, and
cancel modulo ``n`` only in the sum over the query's whole participant set. So the key holder,
who decrypts, learns the sum and nothing about any single platform's plaintext: one platform's
decrypted ciphertext is ``m_i + mask_i mod n``, and ``mask_i`` is uniform to anyone lacking
one of that platform's pairwise secrets.

Construction (Bonawitz et al., CCS 2017, without the dropout recovery)
    * For every pair ``low < high`` (platform names compared as strings) both sides compute
      ``s = X25519(own_private, peer_public)`` against the peer key pinned in the roster
      (``protocols.identity``). ``pair_mask`` derives a 32-byte seed
      ``HKDF-SHA256(s, salt=query_id, info="fedcredit/mask/v1" || ctx || low || high)`` where
      ``ctx`` is the canonical encoding of ``MaskContext`` (session, query, the sorted
      participant set, Paillier key id, count, modulus). Any difference in what two platforms
      believe about the query gives unrelated masks, so the sum fails loudly (the layout check
      on the decrypted sum rejects it) instead of silently mixing queries.
    * The seed keys ChaCha20 with an all-zero 16-byte nonce (counter and nonce): safe because
      the key is unique per (query, pair, context), so a (key, nonce) pair is never reused.
      The keystream is cut into ``count`` chunks of ``len(n) + 16`` bytes, each reduced mod
      ``n``; the 128 extra bits make each value's statistical distance from uniform below
      ``2**-128``.
    * ``platform_mask`` is ``sum(+pair_mask if own < peer else -pair_mask) mod n`` over every
      other participant; every pair term appears once with each sign across the set, so the
      masks of all participants sum to 0 mod n, and the sum over any strict subset is a sum of
      pair masks crossing the cut, uniform to anyone without those pairwise secrets.

Assumes
    * Honest-but-curious parties that do not collude (MISSION.md): the key holder sees the
      decrypted masked values, the coordinator sees ciphertexts. Each pairwise secret is known
      to its two platforms only, so hiding one platform's value needs just one other honest
      participant in the query.
    * The roster's agreement keys are authentic (pinned at enrolment, distributed out of band).
      A substituted key breaks cancellation (the sum becomes garbage). Whoever substitutes
      every peer key a victim uses, and also sees the decryptions, can strip the victim's
      mask and read its value; pinning the roster is the defence.
    * The participant set is fixed before masks are computed. There is no dropout recovery:
      if a participant's reply is missing, the sum is unusable and the query must be re-run
      with a new query id (never re-use a query id with a smaller set: the two sums' masks
      would then be related).

Does not protect
    * Truthfulness: a platform can add any value, so the sum can be shifted arbitrarily.
    * A colluding key holder and platform(s): the masks of the colluders are known to them, so
      with all but one participant colluding the last one's value is exposed (as with any sum).
    * Differencing across queries: masks hide individual terms of one sum; what repeated sums
      over different sets reveal is the job of the query policy, not of this module.
    * Memory hygiene: pairwise secrets are cached per (own, peer) public-key pair for the
      process lifetime (``clear_secret_cache`` drops them); Python cannot wipe memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Annotated

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from protocols.identity import PLATFORM_NAME_PATTERN

log = logging.getLogger(__name__)

MASK_INFO_TAG = b"fedcredit/mask/v1"
KEY_BYTES = 32
# Extra keystream bits per value: statistical distance from uniform mod n below 2**-128.
EXTRA_BYTES = 16
MAX_COUNT = 1_000_000
MAX_MODULUS_BITS = 16_384
MAX_PARTICIPANTS = 1_000

PlatformName = Annotated[StrictStr, Field(pattern=PLATFORM_NAME_PATTERN)]


class MaskError(ValueError):
    """Masks cannot be computed as asked (unknown or missing participant, bad key, ...)."""


class MaskContext(BaseModel):
    """Everything two platforms must agree on for their pair masks to match.

    ``participants`` is the query's fixed set; its order does not matter (the canonical
    encoding sorts it), its members must be unique platform names.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    session_id: StrictStr = Field(min_length=1, max_length=256)
    query_id: StrictStr = Field(pattern=r"^[0-9a-f]{32}$")
    participants: tuple[PlatformName, ...] = Field(min_length=2, max_length=MAX_PARTICIPANTS)
    key_id: StrictStr = Field(min_length=1, max_length=256)
    count: StrictInt = Field(ge=1, le=MAX_COUNT)
    modulus: StrictInt = Field(gt=1)

    @field_validator("participants")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for name in value:
            if name in seen:
                raise ValueError(f"duplicate participant {name!r}")
            seen.add(name)
        return value

    @field_validator("modulus")
    @classmethod
    def _modulus_size(cls, value: int) -> int:
        if value.bit_length() > MAX_MODULUS_BITS:
            raise ValueError(f"modulus larger than {MAX_MODULUS_BITS} bits")
        return value

    def canonical_bytes(self) -> bytes:
        """Deterministic encoding for the HKDF info: sorted-key compact ASCII JSON, the
        participant set sorted, the modulus in lowercase hex."""
        doc = {
            "count": self.count,
            "key_id": self.key_id,
            "modulus": format(self.modulus, "x"),
            "participants": sorted(self.participants),
            "query_id": self.query_id,
            "session_id": self.session_id,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---------------------------------------------------------------------------- key agreement

_cache: dict[tuple[bytes, bytes], bytes] = {}
_cache_lock = threading.Lock()
_CACHE_MAX = 4096


# id(private key) -> (the key, its raw public bytes). The entry holds the key itself, so its
# id cannot be reused by another object while the entry exists.
_public: dict[int, tuple[X25519PrivateKey, bytes]] = {}
_PUBLIC_MAX = 64


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The key's raw public bytes, computed once per key object.

    Deriving the public key is a scalar multiplication (about 7 us); a secure-sum reply
    needed it three times (the roster check and the cache key of each pairwise secret).
    """
    with _cache_lock:
        hit = _public.get(id(private))
    if hit is not None and hit[0] is private:
        return hit[1]
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with _cache_lock:
        if len(_public) >= _PUBLIC_MAX:
            _public.clear()
        _public[id(private)] = (private, raw)
    return raw


def pairwise_secret(own_private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret with a peer, cached per (own public, peer public) pair.

    Raises ``MaskError`` for a malformed peer key or an all-zero shared secret (a small-order
    peer key, which would make the "secret" public).
    """
    if not isinstance(peer_public, bytes | bytearray) or len(peer_public) != KEY_BYTES:
        raise MaskError(f"peer agreement key must be {KEY_BYTES} bytes")
    key = (public_bytes(own_private), bytes(peer_public))
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    try:
        shared = own_private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError:
        raise MaskError(
            "key agreement failed: peer agreement key has small order (all-zero secret)"
        ) from None
    if not any(shared):  # cryptography already refuses this; belt and braces
        raise MaskError("key agreement produced an all-zero shared secret")
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[key] = shared
    return shared


def clear_secret_cache() -> None:
    """Forget every cached pairwise secret (e.g. after rotating the identity)."""
    with _cache_lock:
        _cache.clear()
        _public.clear()


# ---------------------------------------------------------------------------- masks


def pair_mask(shared: bytes, ctx: MaskContext, low: str, high: str) -> list[int]:
    """The ``ctx.count`` mask values of pair ``(low, high)``, each uniform mod ``ctx.modulus``.

    ``low < high`` must hold and both must be participants; ``low`` adds these values and
    ``high`` subtracts them.
    """
    if not isinstance(shared, bytes | bytearray) or len(shared) != KEY_BYTES:
        raise MaskError(f"shared secret must be {KEY_BYTES} bytes")
    if not low < high:
        raise MaskError(f"pair must be ordered: {low!r} < {high!r} does not hold")
    for name in (low, high):
        if name not in ctx.participants:
            raise MaskError(f"{name!r} is not a participant of query {ctx.query_id}")
    info = (
        MASK_INFO_TAG
        + ctx.canonical_bytes()
        + b"\x00"
        + low.encode("ascii")
        + b"\x00"
        + high.encode("ascii")
    )
    seed = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(ctx.query_id), info=info
    ).derive(bytes(shared))
    n = ctx.modulus
    width = (n.bit_length() + 7) // 8 + EXTRA_BYTES
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    out: list[int] = []
    # Keystream in blocks of up to 1 MiB: bounded memory for large counts.
    per_block = max(1, (1 << 20) // width)
    remaining = ctx.count
    while remaining:
        k = min(per_block, remaining)
        block = stream.update(bytes(k * width))
        out.extend(
            int.from_bytes(block[i : i + width], "big") % n for i in range(0, k * width, width)
        )
        remaining -= k
    return out


def platform_mask(
    own_name: str,
    own_private: X25519PrivateKey,
    roster_keys: Mapping[str, bytes],
    ctx: MaskContext,
) -> list[int]:
    """This platform's mask: ``sum(+pair if own < peer else -pair) mod n`` over all peers.

    ``roster_keys`` maps platform names to pinned X25519 public keys (``Roster.agreement_keys``).
    Errors (``MaskError``): own name not a participant, a participant missing from the roster
    (named), own pinned key not matching ``own_private``, duplicates, fewer than 2 participants.
    """
    parts = ctx.participants
    if len(set(parts)) != len(parts):
        raise MaskError("participants must be unique")
    if len(parts) < 2:
        raise MaskError("masking needs at least 2 participants")
    if own_name not in parts:
        raise MaskError(f"{own_name!r} is not a participant of query {ctx.query_id}")
    missing = [p for p in parts if p not in roster_keys]
    if missing:
        raise MaskError(f"participant(s) not in the pinned roster: {', '.join(missing)}")
    if bytes(roster_keys[own_name]) != public_bytes(own_private):
        raise MaskError(f"the roster's agreement key for {own_name!r} is not this platform's key")
    n = ctx.modulus
    total = [0] * ctx.count
    for peer in parts:
        if peer == own_name:
            continue
        shared = pairwise_secret(own_private, roster_keys[peer])
        if own_name < peer:
            values = pair_mask(shared, ctx, own_name, peer)
            total = [(t + v) % n for t, v in zip(total, values, strict=True)]
        else:
            values = pair_mask(shared, ctx, peer, own_name)
            total = [(t - v) % n for t, v in zip(total, values, strict=True)]
    return total


def add_masks(plaintexts: Sequence[int], masks: Sequence[int], modulus: int) -> list[int]:
    """``(m + mask) mod n`` elementwise; lengths must match and plaintexts be in ``[0, n)``."""
    if len(plaintexts) != len(masks):
        raise MaskError(f"{len(plaintexts)} plaintexts but {len(masks)} masks")
    out = []
    for i, (m, k) in enumerate(zip(plaintexts, masks, strict=True)):
        if not 0 <= m < modulus:
            raise MaskError(f"plaintext {i} is outside [0, n)")
        out.append((m + k) % modulus)
    return out


def context_digest(ctx: MaskContext) -> str:
    """A short public fingerprint of a context, for logs and cross-checks."""
    return hashlib.sha256(ctx.canonical_bytes()).hexdigest()[:16]
