"""Every message the bureau and a platform exchange: names, payloads, limits.

Each payload is a frozen pydantic model carried in one Flower ``ConfigRecord`` (key
``payload``), so a malformed or hostile message is rejected by validation with a message that
names the field, before any handler touches the ledger or the key. Large binary fields
(tokens, ciphertexts, totals) are raw bytes: Flower ConfigRecord integers are 64-bit, and
a 4096-bit ciphertext is not; bytes also keep the wire size exact and independent of values.

Message types (Flower routes ``train``, ``evaluate`` and ``query.<name>``):

=========================  ==================================================================
``query.describe``         platform name, token-pepper fingerprint, row counts, feature names
                           and a fingerprint of the data (no rows, no tokens)
``query.feature_stats``    count and per-feature sums of x and x² over the training rows
``query.feature_sketch``   per-feature row counts on agreed bins (robust transforms' quantiles)
``train``                  FedAvg local step (model weights in an ``ArrayRecord``)
``evaluate``               held-out score histograms (sums; AUC and KS are read off the sum)
``query.match_start``      opens a private-matching session; the platform answers with its own
                           borrowers as blinded group elements, in a fresh random order
``query.match_blind``      another platform's blinded list; answered re-blinded
``query.match_done``       the platform's own list, blinded by every participant
``query.debt_profile``     a batch of fully blinded ids; answered with Paillier ciphertexts of
                           masked packed (debt, active loans, has-active) slots, zero slots
                           for ids the platform does not hold
``query.totals``           the platform's own borrowers' totals, sealed by the key holder
=========================  ==================================================================

Federated gradient boosting's messages (``query.gbdt_sketch``, ``query.gbdt_level``,
``query.gbdt_evaluate``) are defined beside the boosting, in ``protocols/gbdt.py``.

The protocol, and what each message reveals to whom, is docs/protocol.md.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, ClassVar, Literal, Self

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

TOKEN_BYTES = 32
MAX_TOKENS_PER_BATCH = 50_000
MAX_ELEMENTS_PER_LIST = 5_000_000
MAX_PARTICIPANTS = 64
ELEMENT_BYTES = 32
MAX_FEATURES = 512
PAYLOAD_KEY = "payload"
SERVER_ROUND = "server-round"
PROFILE_FIELDS = 3  # total debt (fen), active loans, platforms with an active loan
DEBT_PROFILE_LAYOUT_ID = "debt-profile/v2"
QUERY_ID = re.compile(r"^[0-9a-f]{32}$")

FeatureName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


def config_record(content: RecordDict, key: str) -> ConfigRecord | None:
    """``content.config_records.get(key)`` without Flower's view of every config record.

    ``RecordDict.config_records`` builds a new synced dict of all the content's config
    records, type-checking each, on every access (tens of microseconds; a boosting level
    message read it seven times); this reads the one record asked for.
    """
    found = content.get(key)
    return found if isinstance(found, ConfigRecord) else None


class ProtocolError(ValueError):
    """A message that this side refuses to act on (malformed, hostile, replayed)."""


class Payload(BaseModel):
    # Strict: a JSON true, "1" or 1.0 is not a count. Unknown fields are refused.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def to_content(self) -> RecordDict:
        record = ConfigRecord({PAYLOAD_KEY: self.model_dump_json().encode()})
        for name, blob in self._binary().items():
            record[name] = blob
        return RecordDict({PAYLOAD_KEY: record})

    def _binary(self) -> dict[str, bytes]:
        return {}

    @classmethod
    def from_content(cls, content: RecordDict, what: str) -> Self:
        """Parse and validate; every failure becomes a ProtocolError naming the message."""
        record = config_record(content, PAYLOAD_KEY)
        raw = record.get(PAYLOAD_KEY) if record is not None else None
        if record is None or PAYLOAD_KEY not in record:
            raise ProtocolError(f"{what}: no {PAYLOAD_KEY!r} record in the message")
        if not isinstance(raw, bytes):
            raise ProtocolError(f"{what}: payload is {type(raw).__name__}, expected bytes")
        # Flower's strategies inject "server-round" into the config record they send.
        binary = {k: v for k, v in record.items() if k not in (PAYLOAD_KEY, SERVER_ROUND)}
        try:
            parsed = cls._parse(raw, binary)
            server_round = record.get(SERVER_ROUND)
            if isinstance(server_round, int) and "server_round" in cls.model_fields:
                parsed = cls.model_validate({**parsed.model_dump(), "server_round": server_round})
            return parsed
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ProtocolError(f"{what}: {problems}") from exc
        except ProtocolError as exc:
            raise ProtocolError(f"{what}: {exc}") from exc
        except (ValueError, RecursionError) as exc:
            # Not UTF-8, an integer literal beyond Python's digit limit, nesting too deep:
            # hostile JSON is refused like any other malformed payload.
            raise ProtocolError(f"{what}: payload is not acceptable JSON: {exc}") from exc

    @classmethod
    def _parse(cls, raw: bytes, binary: dict[str, object]) -> Self:
        if binary:
            raise ProtocolError(f"unexpected binary fields {sorted(binary)}")
        return cls.model_validate_json(raw)


class BinaryPayload(Payload):
    """A payload with raw byte fields carried beside the JSON (never inside it)."""

    BINARY_FIELDS: ClassVar[tuple[str, ...]] = ()

    def _binary(self) -> dict[str, bytes]:
        return {name: getattr(self, name) for name in self.BINARY_FIELDS}

    def model_dump_json(self, **kwargs: object) -> str:  # type: ignore[override]
        return super().model_dump_json(exclude=set(self.BINARY_FIELDS), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def _parse(cls, raw: bytes, binary: dict[str, object]) -> Self:
        import json

        try:
            fields = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"payload is not JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise ProtocolError("payload is not a JSON object")
        for name in cls.BINARY_FIELDS:
            value = binary.get(name)
            if not isinstance(value, bytes):
                raise ProtocolError(f"binary field {name!r} missing or not bytes")
            fields[name] = value
        extra = set(binary) - set(cls.BINARY_FIELDS)
        if extra:
            raise ProtocolError(f"unexpected binary fields {sorted(extra)}")
        return cls.model_validate(fields)


# -- encodings ------------------------------------------------------------------------------


def tokens_to_bytes(tokens: list[str]) -> bytes:
    return b"".join(bytes.fromhex(t) for t in tokens)


def tokens_from_bytes(blob: bytes) -> list[str]:
    if len(blob) % TOKEN_BYTES:
        raise ProtocolError(f"token block of {len(blob)} bytes is not a multiple of {TOKEN_BYTES}")
    return [blob[i : i + TOKEN_BYTES].hex() for i in range(0, len(blob), TOKEN_BYTES)]


def ints_to_bytes(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<i8").tobytes()


def ints_from_bytes(blob: bytes, rows: int, cols: int) -> np.ndarray:
    if rows < 0 or cols < 0:
        raise ProtocolError(f"integer block of {rows} x {cols}: negative shape")
    if len(blob) != rows * cols * 8:
        raise ProtocolError(f"integer block of {len(blob)} bytes, expected {rows * cols * 8}")
    return np.frombuffer(blob, dtype="<i8").reshape(rows, cols).astype(np.int64)


# -- payloads -------------------------------------------------------------------------------


class DescribeRequest(Payload):
    test_share: float = Field(gt=0.0, lt=1.0)


class PlatformDescription(Payload):
    platform: str
    key_id: str
    borrowers: int = Field(ge=0)
    labelled: int = Field(ge=0)
    train_rows: int = Field(ge=0)
    test_rows: int = Field(ge=0)
    features: list[FeatureName] = Field(max_length=MAX_FEATURES)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")


class RobustSpec(Payload):
    """A fitted robust feature transform (``protocols.robust_features``), per feature."""

    center: list[float]
    scale: list[float]
    log: list[bool]
    lo: list[float]
    hi: list[float]
    flags: list[int]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        width = len(self.center)
        if not all(len(v) == width for v in (self.scale, self.log, self.lo, self.hi, self.flags)):
            raise ValueError("robust transform fields differ in length")
        values = (*self.center, *self.scale, *self.lo, *self.hi)
        if not all(math.isfinite(v) for v in values) or not all(s > 0 for s in self.scale):
            raise ValueError("robust transform must be finite with positive scales")
        if any(a > b for a, b in zip(self.lo, self.hi, strict=True)):
            raise ValueError("robust transform clip bounds are inverted")
        if any(not -1 <= k < width or k == j for j, k in enumerate(self.flags)):
            raise ValueError("robust transform names a missing flag that is not a feature")
        return self


class _FeatureSpec(Payload):
    feature_set: Literal["local", "cross"]
    features: list[FeatureName] = Field(min_length=1, max_length=MAX_FEATURES)
    test_share: float = Field(gt=0.0, lt=1.0)
    # Share of the non-test people kept apart to decide when training stops (0: none).
    validation_share: float = Field(default=0.0, ge=0.0, lt=1.0)
    robust: RobustSpec | None = None

    @model_validator(mode="after")
    def _robust_width(self) -> Self:
        if self.robust is not None and len(self.robust.center) != len(self.features):
            raise ValueError("robust transform and features differ in length")
        return self


class FeatureStatsRequest(_FeatureSpec):
    """Sums over the training rows, after the robust transform where one is given."""


class FeatureSketchRequest(_FeatureSpec):
    """Per-feature histograms of the training rows on bins fixed by this mean and std."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.features) == len(self.mean) == len(self.std):
            raise ValueError("features, mean and std differ in length")
        if not all(math.isfinite(v) for v in self.mean) or not all(
            math.isfinite(s) and s > 0 for s in self.std
        ):
            raise ValueError("mean and std must be finite with positive standard deviations")
        return self


class FeatureSketch(BinaryPayload):
    """(features, bins) row counts as little-endian int64, features-major."""

    BINARY_FIELDS = ("counts",)
    width: int = Field(ge=1, le=MAX_FEATURES)  # features
    bins: int = Field(ge=1, le=4096)
    counts: bytes

    @model_validator(mode="after")
    def _size(self) -> Self:
        if len(self.counts) != self.width * self.bins * 8:
            raise ValueError(f"counts of {len(self.counts)} bytes for {self.width} x {self.bins}")
        if (np.frombuffer(self.counts, dtype="<i8") < 0).any():
            raise ValueError("negative histogram counts")
        return self

    def matrix(self) -> np.ndarray:
        return ints_from_bytes(self.counts, self.width, self.bins)


class FeatureStats(Payload):
    n: int = Field(ge=0)
    sums: list[float]
    sumsq: list[float]

    @model_validator(mode="after")
    def _finite(self) -> Self:
        if len(self.sums) != len(self.sumsq):
            raise ValueError("sums and sumsq differ in length")
        if not all(math.isfinite(v) for v in (*self.sums, *self.sumsq)):
            raise ValueError("non-finite feature sums")
        return self


class ModelInstructions(_FeatureSpec):
    """What a train or evaluate message asks for (the weights travel in an ArrayRecord)."""

    model: Literal["lr", "mlp"]
    mean: list[float]
    std: list[float]
    epochs: int = Field(default=1, ge=1, le=100)
    learning_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    batch_size: int = Field(default=256, ge=1, le=65_536)
    seed: int = Field(default=0, ge=0)
    server_round: int = Field(default=0, ge=0)
    total_rounds: int = Field(default=1, ge=1, le=10_000)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    # Sample-level DP-SGD (protocols/dp.py); epsilon 0 is off. The platform derives its own
    # noise from these and the schedule above, so every round of it adds the same noise.
    dp_epsilon: float = Field(default=0.0, ge=0.0, le=1000.0)
    dp_delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    dp_clip_norm: float = Field(default=3.0, gt=0.0, le=1000.0)
    # Local SGD steps per round at least (whole epochs, so every row is seen): a platform of
    # 300 rows would otherwise take one step a round (``server/convergence.py``).
    local_steps: int = Field(default=0, ge=0, le=100_000)
    # Which held-out rows an evaluate message scores: the validation people during training
    # (they decide when to stop), the test people once, at the end.
    eval_split: Literal["test", "validation"] = "test"

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.features) == len(self.mean) == len(self.std):
            raise ValueError("features, mean and std differ in length")
        if not all(math.isfinite(v) for v in self.mean) or not all(
            math.isfinite(s) and s > 0 for s in self.std
        ):
            raise ValueError("scaler must be finite with positive standard deviations")
        return self


PlatformName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
# JSON has arrays, not tuples: a list of names is the one conversion strict mode allows here.
Participants = Annotated[
    tuple[PlatformName, ...],
    BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v),
    Field(min_length=2, max_length=MAX_PARTICIPANTS),
]


def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(names)) != len(names):
        raise ValueError(f"participants are not unique: {sorted(names)}")
    return names


def _whole_elements(blob: bytes, count: int, limit: int) -> None:
    if count > limit:
        raise ValueError(f"{count} elements exceed the limit of {limit}")
    if len(blob) != count * ELEMENT_BYTES:
        raise ValueError(
            f"element block of {len(blob)} bytes does not hold {count} elements of "
            f"{ELEMENT_BYTES} bytes"
        )


class MatchStart(Payload):
    """Opens a private-matching session over a fixed participant set."""

    session_id: str = Field(pattern=QUERY_ID.pattern)
    participants: Participants

    @model_validator(mode="after")
    def _check(self) -> Self:
        _unique(self.participants)
        return self


class _ElementList(BinaryPayload):
    """A session's list of blinded identifiers: ``count`` elements of 32 bytes."""

    BINARY_FIELDS = ("elements",)
    session_id: str = Field(pattern=QUERY_ID.pattern)
    count: int = Field(ge=0)
    elements: bytes

    @model_validator(mode="after")
    def _check(self) -> Self:
        _whole_elements(self.elements, self.count, MAX_ELEMENTS_PER_LIST)
        return self


class MatchElements(_ElementList):
    """A list of blinded identifiers: a platform's own (start) or one it re-blinded."""

    origin: PlatformName


class MatchBlind(MatchElements):
    """Asks a platform to apply its session secret to another platform's blinded list."""

    step: int = Field(ge=1, le=MAX_PARTICIPANTS)


class MatchDone(_ElementList):
    """A platform's own list, now blinded by every participant, in the order it sent it."""


class DebtProfileRequest(BinaryPayload):
    """One batch of the encrypted debt-profile query, over fully blinded identifiers.

    ``participants`` is the query's fixed participant set: every platform masks its
    plaintexts so that the masks cancel only in the sum over exactly this set, and packs
    with headroom for exactly this many contributors. ``announcement`` is the key holder's
    signed statement of the Paillier key (its id, the key, its expiry); platforms verify it
    against the key holder's signing key pinned in their roster.
    """

    BINARY_FIELDS = ("announcement", "elements")
    query_id: str = Field(pattern=QUERY_ID.pattern)
    session_id: str = Field(pattern=QUERY_ID.pattern)
    layout: Literal["debt-profile/v2"] = DEBT_PROFILE_LAYOUT_ID
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    participants: Participants
    count: int = Field(ge=1, le=MAX_TOKENS_PER_BATCH)
    announcement: bytes = Field(min_length=1, max_length=8192)
    elements: bytes

    @model_validator(mode="after")
    def _check(self) -> Self:
        _unique(self.participants)
        _whole_elements(self.elements, self.count, MAX_TOKENS_PER_BATCH)
        return self


class DebtProfileReply(BinaryPayload):
    BINARY_FIELDS = ("ciphertexts",)
    query_id: str = Field(pattern=QUERY_ID.pattern)
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    count: int = Field(ge=1)
    ciphertexts: bytes


class DeliveryBatch(Payload):
    query_id: str = Field(pattern=QUERY_ID.pattern)
    size: int = Field(ge=1, le=MAX_TOKENS_PER_BATCH)


class TotalsDelivery(BinaryPayload):
    """Totals for the receiving platform's own borrowers, sealed by the key holder.

    Row ``i`` belongs to element ``i`` of the list the platform got back in
    ``query.match_done``; no identifier travels with it. ``rows`` gives, per row, the batch
    (index into ``batches``) and the position within that batch, as two little-endian int32;
    ``sealed`` the 24 sealed bytes of the row (``protocols.delivery``), which only this
    platform and the key holder can open. ``contributors`` names the platforms whose figures
    the totals include; ``announcement`` is the key holder's signed key statement, whose
    delivery key the platform needs to open the rows.
    """

    BINARY_FIELDS = ("announcement", "rows", "sealed")
    session_id: str = Field(pattern=QUERY_ID.pattern)
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    count: int = Field(ge=0, le=MAX_ELEMENTS_PER_LIST)
    contributors: Participants
    batches: list[DeliveryBatch] = Field(max_length=MAX_ELEMENTS_PER_LIST)
    announcement: bytes = Field(min_length=1, max_length=8192)
    rows: bytes
    sealed: bytes

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        _unique(self.contributors)
        if len(self.rows) != self.count * 8:
            raise ValueError(f"rows block has {len(self.rows)} bytes for {self.count} rows")
        if len(self.sealed) != self.count * PROFILE_FIELDS * 8:
            raise ValueError(f"sealed block has {len(self.sealed)} bytes for {self.count} rows")
        return self


class Ack(Payload):
    stored: int = Field(ge=0)
