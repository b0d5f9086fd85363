"""Secure sums of named float vectors: quantise, mask, sum, dequantise (training's SecAgg).

Every training quantity the coordinator needs is a sum over platforms: FedAvg's numerator
(``n_i * weights_i``) and denominator (``n_i``), the feature sums and sums of squares behind
the federated scaler, score histograms and loss sums. Each platform sends its vector
quantised to fixed point in ``Z_{2^64}`` plus a mask; the masks cancel only in the sum over
the round's whole participant set, so the coordinator learns the sum and nothing about any
single platform's vector (each reply alone is uniform on ``Z_{2^64}``).

Construction (the debt query's pairwise masking, ``protocols.masking``, on ``Z_{2^64}``)
    * Pair secrets: X25519 agreement between the platforms' enrolment keys pinned in the
      roster (``pairwise_secret``, shared and cached with the debt query).
    * Pair seed: ``HKDF-SHA256(secret, salt=nonce, info="fedcredit/secure-sum/v1" || spec ||
      low || high)`` where ``spec`` is the canonical encoding of ``SecureSumSpec`` (session,
      round, message kind, fresh nonce, sorted participant set, every field's name, shape and
      bound). Any disagreement gives unrelated masks and the sum fails its check.
    * Mask stream: ChaCha20 keyed by the seed (all-zero nonce: the key is unique per spec and
      pair), read as little-endian ``uint64``. Every 64-bit word is exactly uniform, so no
      reduction is needed; numpy's ``uint64`` arithmetic wraps, which is the group law.
    * A platform adds ``+pair`` for peers above it and ``-pair`` for peers below it; over the
      full set every pair term appears once with each sign.

Quantisation
    Each field has a public bound ``2**bound_bits`` on the absolute value of one platform's
    entries. With ``P`` participants the fraction bits are ``f = 62 - bound_bits -
    ceil(log2 P)``, so the sum of ``P`` quantised entries stays below ``2**62`` in absolute
    value and is recovered exactly as a signed 64-bit integer. A field may take two limbs (a
    high word as above and a low word holding a 32-bit digit; P digits sum without overflow),
    which adds 32 fraction bits: sums of squares need the range and the precision. An entry is
    ``round(x * 2**f)``:
    the rounding error is at most ``2**-(f+1)`` per platform, so a summed entry is within
    ``P * 2**-(f+1)`` of the exact float sum (``SecureSumSpec.error_bound``). A value beyond
    its bound is refused, never clipped: a clipped sum would be a silently wrong average.
    Integer fields (counts) have ``f >= 0`` and are summed exactly.

    A hidden check field holds 1 on every platform; the unmasked sum must equal ``P``
    exactly, so masks that did not cancel (a missing reply, a platform that answered a
    different spec) are detected with probability ``1 - 2**-64`` instead of decoding garbage.

Dropouts: there is no mask recovery. A round with a missing reply is re-run over the rest
with a new nonce (fresh masks); a nonce is never answered twice (two answers under one mask
would leak their difference). What a coordinator that *fakes* a dropout could learn is in
docs/protocol.md.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Annotated, Literal

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import ConfigRecord, RecordDict
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from protocols.identity import PLATFORM_NAME_PATTERN
from protocols.masking import MaskError, pairwise_secret, public_bytes
from protocols.messages import config_record

INFO_TAG = b"fedcredit/secure-sum/v1"
SPEC_KEY = "secure-sum"  # config record of a request (the spec) and of a reply (the vector)
CHECK_FIELD = "__participants__"
WORD_BYTES = 8
LIMB_BITS = 32
PACKED_BITS = 32  # a packed field's half word
HEADROOM_BITS = 62  # |sum| < 2**62 < 2**63: a signed 64-bit integer recovers it exactly
MAX_BOUND_BITS = 60
MAX_ENTRIES = 4_000_000  # 32 MB of masked words per reply
MAX_FIELDS = 256
MAX_PARTICIPANTS = 64
MAX_SPEC_BYTES = 64_000

PlatformName = Annotated[StrictStr, Field(pattern=PLATFORM_NAME_PATTERN)]
FieldName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")]


class SecureSumError(ValueError):
    """A vector cannot be masked or a sum cannot be recovered as asked; says why."""


class SumField(BaseModel):
    """One named array of the sum: its shape and the public bound on one platform's entries."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: FieldName
    shape: tuple[StrictInt, ...] = Field(max_length=8)
    bound_bits: StrictInt = Field(ge=0, le=MAX_BOUND_BITS)
    integer: bool = False
    # Two limbs carry 32 more fraction bits: the high word as usual, the low word a 32-bit
    # digit (P such digits sum without overflow), for fields with a wide dynamic range.
    limbs: Literal[1, 2] = 1
    # Two entries per word (the first in the low 32 bits): for non-negative counts whose
    # sum over every participant stays below 2**32, so no carry crosses the halves. Halves
    # the words (masks, digests, messages) of a count histogram; the masks still cover whole
    # words, so each reply word stays uniform.
    packed: bool = False

    @model_validator(mode="after")
    def _packing(self) -> SumField:
        if self.packed and (not self.integer or self.limbs != 1):
            raise ValueError("only one-limb integer fields can be packed")
        return self

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in value):
            raise ValueError("negative dimension")
        return value

    @cached_property
    def size(self) -> int:
        return math.prod(self.shape)

    @cached_property
    def words(self) -> int:
        return (self.size + 1) // 2 if self.packed else self.size * self.limbs


class SecureSumSpec(BaseModel):
    """Everything the participants of one secure sum must agree on (it keys their masks).

    ``nonce`` is fresh for every attempt: a re-run after a dropout gets a new one, so its
    masks are unrelated to the failed attempt's.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    session_id: StrictStr = Field(min_length=1, max_length=128)
    round_id: StrictStr = Field(pattern=r"^[A-Za-z0-9_.:/-]{1,200}$")
    kind: StrictStr = Field(pattern=r"^[a-z_.]{1,64}$")
    nonce: StrictStr = Field(pattern=r"^[0-9a-f]{32}$")
    participants: tuple[PlatformName, ...] = Field(min_length=2, max_length=MAX_PARTICIPANTS)
    fields: tuple[SumField, ...] = Field(min_length=1, max_length=MAX_FIELDS)

    @model_validator(mode="after")
    def _consistent(self) -> SecureSumSpec:
        if len(set(self.participants)) != len(self.participants):
            raise ValueError("duplicate participant")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names) or CHECK_FIELD in names:
            raise ValueError("field names must be unique (and not the check field)")
        if self.count > MAX_ENTRIES:  # before anything allocates it
            raise ValueError(f"{self.count} entries exceed the limit of {MAX_ENTRIES}")
        for f in self.fields:
            if f.packed and f.bound_bits + self._participant_bits > PACKED_BITS:
                raise ValueError(
                    f"field {f.name}: {len(self.participants)} sums of entries up to "
                    f"2**{f.bound_bits} do not fit the {PACKED_BITS} bits of a packed half"
                )
            if self.frac_bits(f) < 0:
                raise ValueError(
                    f"field {f.name}: bound 2**{f.bound_bits} leaves no room for "
                    f"{len(self.participants)} participants in 64 bits"
                )
        return self

    @classmethod
    def fresh(
        cls,
        session_id: str,
        round_id: str,
        kind: str,
        participants: Sequence[str],
        fields: Sequence[SumField],
    ) -> SecureSumSpec:
        """A spec with a new random nonce (every attempt, including re-runs)."""
        return cls(
            session_id=session_id,
            round_id=round_id,
            kind=kind,
            nonce=secrets.token_hex(16),
            participants=tuple(sorted(participants)),
            fields=tuple(fields),
        )

    @cached_property
    def count(self) -> int:
        """Words in one masked vector: every field's entries plus the check word."""
        return sum(f.words for f in self.fields) + 1

    @property
    def _participant_bits(self) -> int:
        return math.ceil(math.log2(len(self.participants)))

    def frac_bits(self, f: SumField) -> int:
        if f.packed:
            return 0  # whole counts, two to a word
        room = HEADROOM_BITS - f.bound_bits - self._participant_bits
        return room + LIMB_BITS * (f.limbs - 1)

    def error_bound(self, name: str) -> float:
        """Largest absolute error of a summed entry of ``name`` (0 for integer fields)."""
        f = self.field(name)
        return 0.0 if f.integer else len(self.participants) * 2.0 ** -(self.frac_bits(f) + 1)

    def field(self, name: str) -> SumField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def canonical_bytes(self) -> bytes:
        return self.canonical_json

    @cached_property
    def canonical_json(self) -> bytes:
        """Once per spec (frozen): each pair's mask seed and the reply's checks read it."""
        doc = {
            "fields": [
                [f.name, list(f.shape), f.bound_bits, f.integer, f.limbs]
                + (["packed"] if f.packed else [])
                for f in self.fields
            ],
            "kind": self.kind,
            "nonce": self.nonce,
            "participants": sorted(self.participants),
            "round_id": self.round_id,
            "session_id": self.session_id,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---------------------------------------------------------------------------- fixed point


def quantise(values: Mapping[str, np.ndarray], spec: SecureSumSpec) -> np.ndarray:
    """One platform's values as a flat ``uint64`` vector (two's complement fixed point).

    Refuses (``SecureSumError``) a missing or extra field, a wrong shape, a non-finite value,
    a non-integer in an integer field, or a value beyond its field's bound.
    """
    expected = {f.name for f in spec.fields}
    if set(values) != expected:
        raise SecureSumError(
            f"fields {sorted(values)} do not match the requested {sorted(expected)}"
        )
    if all(f.limbs == 1 for f in spec.fields):
        fast = _quantise_at_once(values, spec)
        if fast is not None:
            return fast
    return _quantise_by_field(values, spec)


def _quantise_at_once(values: Mapping[str, np.ndarray], spec: SecureSumSpec) -> np.ndarray | None:
    """``quantise`` of one-limb fields written straight into the output, each unpacked field
    in a few array passes (its largest magnitude, an integer field's whole-number check,
    the scaled and rounded values): the same checks and the same words as
    ``_quantise_by_field``, without its temporaries. None if a check fails: the
    field-by-field path then names it."""
    out = np.empty(spec.count, dtype=np.uint64)
    signed = out.view(np.int64)
    at = 0
    for f in spec.fields:
        x = np.asarray(values[f.name], dtype=np.float64)
        if x.shape != f.shape:
            return None
        if f.packed:
            out[at : at + f.words] = _packed_words(x, f)
            at += f.words
            continue
        x = x.ravel()
        if x.size and not float(np.abs(x).max()) <= 2.0**f.bound_bits:  # NaN fails too
            return None
        if f.integer and not np.array_equal(x, np.rint(x)):
            return None
        scaled = np.ldexp(x, spec.frac_bits(f))  # exact: a power of two
        signed[at : at + f.size] = np.rint(scaled, out=scaled)  # whole, below 2**62: exact
        at += f.words
    out[at] = 1  # the check word
    return out


def _quantise_by_field(values: Mapping[str, np.ndarray], spec: SecureSumSpec) -> np.ndarray:
    out = np.empty(spec.count, dtype=np.uint64)
    at = 0
    for f in spec.fields:
        if f.packed:
            out[at : at + f.words] = _packed_words(values[f.name], f)
            at += f.words
            continue
        x = np.asarray(values[f.name], dtype=np.float64)
        if x.shape != f.shape:
            raise SecureSumError(f"field {f.name}: shape {x.shape}, expected {f.shape}")
        if not np.isfinite(x).all():
            raise SecureSumError(f"field {f.name}: non-finite value")
        if f.integer and not np.array_equal(x, np.rint(x)):
            raise SecureSumError(f"field {f.name}: non-integer value in an integer field")
        bound = 2.0**f.bound_bits
        if x.size and float(np.abs(x).max()) > bound:
            raise SecureSumError(
                f"field {f.name}: a value of magnitude {float(np.abs(x).max()):.4g} exceeds "
                f"the secure-sum bound 2**{f.bound_bits}"
            )
        # Scaling by a power of two and rounding are exact in float64; so is the split.
        q = np.rint(np.ldexp(x.ravel(), spec.frac_bits(f)))
        if f.limbs == 1:
            out[at : at + f.size] = q.astype(np.int64).view(np.uint64)
        else:
            high = np.floor(np.ldexp(q, -LIMB_BITS))
            low = q - np.ldexp(high, LIMB_BITS)
            out[at : at + f.size] = high.astype(np.int64).view(np.uint64)
            out[at + f.size : at + 2 * f.size] = low.astype(np.uint64)
        at += f.words
    out[at] = 1  # the check word
    return out


def _packed_words(value: np.ndarray, f: SumField) -> np.ndarray:
    """A packed field's words: entry ``2i`` in the low half of word ``i``, ``2i + 1`` in the
    high half. Refuses what ``quantise`` refuses, and negative entries."""
    x = np.asarray(value, dtype=np.float64)
    if x.shape != f.shape:
        raise SecureSumError(f"field {f.name}: shape {x.shape}, expected {f.shape}")
    x = x.ravel()
    in_range = x >= 0
    in_range &= x <= 2.0**f.bound_bits  # False for NaN too
    if not in_range.all():
        if not np.isfinite(x).all():
            raise SecureSumError(f"field {f.name}: non-finite value")
        if float(x.min()) < 0:
            raise SecureSumError(f"field {f.name}: a negative value in a packed count field")
        raise SecureSumError(
            f"field {f.name}: a value of magnitude {float(np.abs(x).max()):.4g} exceeds "
            f"the secure-sum bound 2**{f.bound_bits}"
        )
    # Little-endian 32-bit halves read as 64-bit words: entry 2i low, 2i + 1 high.
    halves = np.zeros(2 * f.words, dtype="<u4")
    halves[: x.size] = x  # whole numbers below 2**32 (the bound): exact
    if not np.array_equal(halves[: x.size], x):
        raise SecureSumError(f"field {f.name}: non-integer value in an integer field")
    return halves.view("<u8").astype(np.uint64, copy=False)


def _unpacked(words: np.ndarray, f: SumField) -> np.ndarray:
    """A packed field's summed entries (each half summed without carry: see SumField)."""
    halves = np.ascontiguousarray(words, dtype="<u8").view("<u4")
    return halves[: f.size].astype(np.float64).reshape(f.shape)


def dequantise(total: np.ndarray, spec: SecureSumSpec) -> dict[str, np.ndarray]:
    """The float sums from the wrapped ``uint64`` sum; refuses if the check word is not P."""
    total = np.asarray(total, dtype=np.uint64)
    if total.shape != (spec.count,):
        raise SecureSumError(f"sum has {total.size} words, expected {spec.count}")
    if int(total[-1]) != len(spec.participants):
        raise SecureSumError(
            "the masks did not cancel (check word is not the participant count): a reply "
            "is missing or a platform answered a different spec"
        )
    signed = total.view(np.int64)
    out: dict[str, np.ndarray] = {}
    at = 0
    for f in spec.fields:
        if f.packed:
            out[f.name] = _unpacked(total[at : at + f.words], f)
            at += f.words
            continue
        value = signed[at : at + f.size].astype(np.float64)
        if f.limbs == 2:
            # The low digits sum to less than P * 2**32: no carry was lost in 64 bits.
            low = total[at + f.size : at + 2 * f.size].astype(np.float64)
            value = np.ldexp(value, LIMB_BITS) + low
        out[f.name] = np.ldexp(value, -spec.frac_bits(f)).reshape(f.shape)
        at += f.words
    return out


# ---------------------------------------------------------------------------- masks


def _keystream(shared: bytes, spec: SecureSumSpec, low: str, high: str) -> np.ndarray:
    """The pair's ``spec.count`` mask words, read-only (a view of the ChaCha20 output)."""
    info = INFO_TAG + spec.canonical_bytes() + b"\x00" + low.encode() + b"\x00" + high.encode()
    seed = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(spec.nonce), info=info
    ).derive(bytes(shared))
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(spec.count * WORD_BYTES)), dtype="<u8")


def pair_stream(shared: bytes, spec: SecureSumSpec, low: str, high: str) -> np.ndarray:
    """The pair ``(low, high)``'s mask words: ``spec.count`` uniform ``uint64`` values."""
    if not low < high:
        raise MaskError(f"pair must be ordered: {low!r} < {high!r} does not hold")
    if low not in spec.participants or high not in spec.participants:
        raise MaskError(f"pair ({low}, {high}) is not within the participant set")
    return _keystream(shared, spec, low, high).copy()


def _add_mask(
    out: np.ndarray,
    own_name: str,
    own_private: X25519PrivateKey,
    roster_keys: Mapping[str, bytes],
    spec: SecureSumSpec,
) -> np.ndarray:
    """``out`` plus this platform's mask, in place (``uint64`` wraps: the group law)."""
    if own_name not in spec.participants:
        raise MaskError(f"{own_name!r} is not a participant of this secure sum")
    missing = [p for p in spec.participants if p not in roster_keys]
    if missing:
        raise MaskError(f"participant(s) not in the pinned roster: {', '.join(missing)}")
    if bytes(roster_keys[own_name]) != public_bytes(own_private):
        raise MaskError(f"the roster's agreement key for {own_name!r} is not this platform's key")
    for peer in spec.participants:
        if peer == own_name:
            continue
        shared = pairwise_secret(own_private, roster_keys[peer])
        if own_name < peer:
            out += _keystream(shared, spec, own_name, peer)
        else:
            out -= _keystream(shared, spec, peer, own_name)
    return out


def platform_mask(
    own_name: str,
    own_private: X25519PrivateKey,
    roster_keys: Mapping[str, bytes],
    spec: SecureSumSpec,
) -> np.ndarray:
    """``sum(+pair if own < peer else -pair)`` over every other participant, in ``Z_{2^64}``."""
    return _add_mask(
        np.zeros(spec.count, dtype=np.uint64), own_name, own_private, roster_keys, spec
    )


def mask_values(
    values: Mapping[str, np.ndarray],
    own_name: str,
    own_private: X25519PrivateKey,
    roster_keys: Mapping[str, bytes],
    spec: SecureSumSpec,
) -> bytes:
    """One platform's reply: its quantised values plus its mask, little-endian bytes."""
    masked = _add_mask(quantise(values, spec), own_name, own_private, roster_keys, spec)
    return masked.astype("<u8", copy=False).tobytes()


def unmask_sum(replies: Sequence[bytes], spec: SecureSumSpec) -> dict[str, np.ndarray]:
    """Add every participant's reply and decode; needs exactly one reply per participant."""
    if len(replies) != len(spec.participants):
        raise SecureSumError(
            f"{len(replies)} replies for {len(spec.participants)} participants: the masks "
            "cancel only over the full set"
        )
    total = np.zeros(spec.count, dtype=np.uint64)
    for blob in replies:
        total += words_of(blob, spec)
    return dequantise(total, spec)


def words_of(blob: object, spec: SecureSumSpec) -> np.ndarray:
    if not isinstance(blob, bytes) or len(blob) != spec.count * WORD_BYTES:
        size = len(blob) if isinstance(blob, bytes) else type(blob).__name__
        raise SecureSumError(f"a masked vector of {size} bytes, expected {spec.count * 8}")
    return np.frombuffer(blob, dtype="<u8")


# ---------------------------------------------------------------------------- on the wire


def attach_spec(content: RecordDict, spec: SecureSumSpec) -> RecordDict:
    """Put the spec beside a message's own records (a train/evaluate/feature_stats request)."""
    content[SPEC_KEY] = ConfigRecord({"spec": spec.model_dump_json().encode()})
    return content


def spec_of(content: RecordDict, what: str) -> SecureSumSpec | None:
    """The request's spec, None when it asks for plain replies; ``SecureSumError`` if bad."""
    record = config_record(content, SPEC_KEY)
    if record is None:
        return None
    raw = record.get("spec")
    if not isinstance(raw, bytes) or len(raw) > MAX_SPEC_BYTES or set(record) != {"spec"}:
        raise SecureSumError(f"{what}: malformed secure-sum spec record")
    try:
        return SecureSumSpec.model_validate_json(raw)
    except (ValidationError, ValueError) as exc:
        raise SecureSumError(f"{what}: secure-sum spec refused: {exc}") from None


def reply_content(spec: SecureSumSpec, masked: bytes) -> RecordDict:
    return RecordDict(
        {SPEC_KEY: ConfigRecord({"nonce": spec.nonce, "masked": masked, "count": spec.count})}
    )


def masked_of(content: RecordDict, spec: SecureSumSpec) -> bytes:
    """The masked vector of a reply, checked against the spec it answers."""
    record = config_record(content, SPEC_KEY)
    if record is None or record.get("nonce") != spec.nonce:
        raise SecureSumError("the reply does not answer this secure sum (nonce)")
    blob = record.get("masked")
    words_of(blob, spec)
    return blob  # type: ignore[return-value]
