"""Hostile input against every wire decoder (hypothesis, 1,000 examples per property).

The property, decoder by decoder: the input is either accepted as a value that satisfies every
documented invariant (and round-trips), or refused with the decoder's documented error whose
message names the input; never another exception, never a hang, never an invalid value
accepted. Where an independent oracle is cheap (group elements, ciphertexts, public keys,
packed sums, sealed rows) the decoder must also agree with it exactly: no false rejections.

Strategies mix arbitrary garbage with near-valid input (a valid message built with the model
constructors, then one field changed), so most examples get past the outer checks. Run with
``--hypothesis-show-statistics`` to see the share of accepted examples per property (events
``accepted`` / ``rejected``).

Known bugs (each has a ``strict=True`` xfail reproducer below, ``test_bug_*``) are tolerated
inside the properties by exact signature only (``KNOWN_BUGS``), so the properties keep guarding
everything else. Whoever fixes one deletes its xfail marker and its ``KNOWN_BUGS`` entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nacl import bindings as nacl
from nacl.exceptions import CryptoError

from protocols import delivery, identity
from protocols import messages as m
from protocols.blinding import (
    ELEMENT_BYTES,
    SMALL_ORDER_U,
    InvalidGroupElement,
    P,
    elements_from_bytes,
    hash_many,
)
from protocols.packing import (
    DEBT_PROFILE_LAYOUT,
    SlotLayout,
    SlotOverflowError,
    debt_profile_layout,
)
from protocols.paillier import (
    InvalidCiphertext,
    InvalidPublicKey,
    ciphertext_width,
    ciphertexts_from_bytes,
    decrypt_plaintexts,
    encrypt_plaintexts,
    generate_keypair,
    public_key_from_bytes,
    public_key_to_bytes,
)
from tests.strategies import (
    HOSTILE_KEY_HEX,
    config_values,
    json_values,
    mutate_json,
)

PROPERTY = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FEATURE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

# ------------------------------------------------------------------------------ known bugs

# id -> (where, predicate on the exception). Tolerated in the properties; reproduced by
# the strict xfail tests at the end of this file.
_PARSE_MESSAGES = (
    "unexpected binary fields",
    "payload is not JSON",
    "payload is not a JSON object",
    "binary field ",
)
# Decoder bugs found by these properties are fixed; a new one is tolerated here only by its
# exact signature while it is being fixed (with a strict-xfail reproducer below).
KNOWN_BUGS: dict[str, Callable[[BaseException], bool]] = {}


MESSAGE_BUGS: frozenset[str] = frozenset()


def _known(exc: object, known: frozenset[str]) -> str | None:
    """The known bug (among ``known``) that ``exc`` is an instance of, if any."""
    if not isinstance(exc, BaseException):
        return None
    for bug in sorted(known):
        if KNOWN_BUGS[bug](exc):
            return bug
    return None


def _refused(
    fn: Callable[[], Any],
    errors: tuple[type[BaseException], ...],
    label: str | None = None,
    known: frozenset[str] = frozenset(),
) -> tuple[bool, Any]:
    """Run a decoder: (True, value) if accepted, (False, error) if refused as documented.

    Anything else (another exception type, or a documented error whose message does not
    start with ``label``) fails the property, unless it is one of the ``known`` bugs.
    """
    try:
        value = fn()
    except errors as exc:
        if label is None or str(exc).startswith(label):
            event("rejected")
            return False, exc
        bug = _known(exc, known)
        if bug is None:
            raise AssertionError(f"error without the label {label!r}: {exc}") from exc
        event(f"known bug: {bug}")
        return False, exc
    except Exception as exc:
        bug = _known(exc, known)
        if bug is None:
            raise
        event(f"known bug: {bug}")
        return False, exc
    event("accepted")
    return True, value


# ------------------------------------------------------------------------------ messages

hex32 = st.binary(min_size=16, max_size=16).map(bytes.hex)
hex16 = st.binary(min_size=8, max_size=8).map(bytes.hex)
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
names = st.text(alphabet=_NAME_CHARS, min_size=1, max_size=10)
participants = st.lists(names, min_size=2, max_size=5, unique=True).map(tuple)
features = st.text(alphabet=_NAME_CHARS + ":", min_size=1, max_size=10)
finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
share = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)
counts = st.integers(min_value=0, max_value=4)


def _blob(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


@st.composite
def _feature_lists(draw: st.DrawFn) -> tuple[list[str], list[float], list[float]]:
    k = draw(st.integers(1, 4))
    feats = draw(st.lists(features, min_size=k, max_size=k))
    mean = draw(st.lists(finite, min_size=k, max_size=k))
    std = draw(st.lists(st.floats(1e-6, 1e6), min_size=k, max_size=k))
    return feats, mean, std


@st.composite
def _model_instructions(draw: st.DrawFn) -> m.ModelInstructions:
    feats, mean, std = draw(_feature_lists())
    return m.ModelInstructions(
        feature_set=draw(st.sampled_from(["local", "cross"])),
        features=feats,
        test_share=draw(share),
        model=draw(st.sampled_from(["lr", "mlp"])),
        mean=mean,
        std=std,
        epochs=draw(st.integers(1, 100)),
        learning_rate=draw(st.floats(1e-6, 1.0)),
        batch_size=draw(st.integers(1, 65_536)),
        seed=draw(st.integers(0, 2**40)),
        server_round=draw(st.integers(0, 1000)),
        total_rounds=draw(st.integers(1, 10_000)),
        lr_schedule=draw(st.sampled_from(["constant", "cosine"])),
        validation_share=draw(st.floats(0.0, 0.9)),
        local_steps=draw(st.integers(0, 100_000)),
        eval_split=draw(st.sampled_from(["test", "validation"])),
    )


@st.composite
def _robust_spec(draw: st.DrawFn, k: int) -> m.RobustSpec:
    lo = draw(st.lists(finite, min_size=k, max_size=k))
    return m.RobustSpec(
        center=draw(st.lists(finite, min_size=k, max_size=k)),
        scale=draw(st.lists(st.floats(1e-6, 1e6), min_size=k, max_size=k)),
        log=draw(st.lists(st.booleans(), min_size=k, max_size=k)),
        lo=lo,
        hi=[v + draw(st.floats(0.0, 10.0)) for v in lo],
        flags=[-1] * k,
    )


@st.composite
def _feature_sketch_request(draw: st.DrawFn) -> m.FeatureSketchRequest:
    feats, mean, std = draw(_feature_lists())
    return m.FeatureSketchRequest(
        feature_set=draw(st.sampled_from(["local", "cross"])),
        features=feats,
        test_share=draw(share),
        validation_share=draw(st.floats(0.0, 0.9)),
        mean=mean,
        std=std,
    )


@st.composite
def _feature_sketch(draw: st.DrawFn) -> m.FeatureSketch:
    k, bins = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    cells = draw(st.lists(st.integers(0, 10**9), min_size=k * bins, max_size=k * bins))
    return m.FeatureSketch(width=k, bins=bins, counts=m.ints_to_bytes(np.array(cells)))


@st.composite
def _feature_stats(draw: st.DrawFn) -> m.FeatureStats:
    k = draw(st.integers(0, 4))
    return m.FeatureStats(
        n=draw(st.integers(0, 10**6)),
        sums=draw(st.lists(finite, min_size=k, max_size=k)),
        sumsq=draw(st.lists(finite, min_size=k, max_size=k)),
    )


@st.composite
def _match_elements(draw: st.DrawFn, cls: type[m.MatchElements]) -> m.MatchElements:
    n = draw(counts)
    extra = {"step": draw(st.integers(1, m.MAX_PARTICIPANTS))} if cls is m.MatchBlind else {}
    return cls(
        session_id=draw(hex32),
        origin=draw(names),
        count=n,
        elements=draw(_blob(n * m.ELEMENT_BYTES)),
        **extra,
    )


@st.composite
def _match_done(draw: st.DrawFn) -> m.MatchDone:
    n = draw(counts)
    return m.MatchDone(session_id=draw(hex32), count=n, elements=draw(_blob(n * 32)))


@st.composite
def _debt_request(draw: st.DrawFn) -> m.DebtProfileRequest:
    n = draw(st.integers(1, 4))
    return m.DebtProfileRequest(
        query_id=draw(hex32),
        session_id=draw(hex32),
        key_id=draw(hex16),
        participants=draw(participants),
        count=n,
        announcement=draw(st.binary(min_size=1, max_size=40)),
        elements=draw(_blob(n * 32)),
    )


@st.composite
def _debt_reply(draw: st.DrawFn) -> m.DebtProfileReply:
    return m.DebtProfileReply(
        query_id=draw(hex32),
        key_id=draw(hex16),
        count=draw(st.integers(1, 5)),
        ciphertexts=draw(st.binary(max_size=100)),
    )


delivery_batches = st.builds(m.DeliveryBatch, query_id=hex32, size=st.integers(1, 50_000))


@st.composite
def _totals(draw: st.DrawFn) -> m.TotalsDelivery:
    n = draw(counts)
    return m.TotalsDelivery(
        session_id=draw(hex32),
        key_id=draw(hex16),
        count=n,
        contributors=draw(participants),
        batches=draw(st.lists(delivery_batches, max_size=3)),
        announcement=draw(st.binary(min_size=1, max_size=40)),
        rows=draw(_blob(n * 8)),
        sealed=draw(_blob(n * 24)),
    )


VALID: dict[type[m.Payload], st.SearchStrategy[m.Payload]] = {
    m.MatchStart: st.builds(m.MatchStart, session_id=hex32, participants=participants),
    m.MatchElements: _match_elements(m.MatchElements),
    m.MatchBlind: _match_elements(m.MatchBlind),
    m.MatchDone: _match_done(),
    m.DebtProfileRequest: _debt_request(),
    m.DebtProfileReply: _debt_reply(),
    m.DeliveryBatch: delivery_batches,
    m.TotalsDelivery: _totals(),
    m.DescribeRequest: st.builds(m.DescribeRequest, test_share=share),
    m.PlatformDescription: st.builds(
        m.PlatformDescription,
        platform=st.text(max_size=10),
        key_id=st.text(max_size=20),
        borrowers=st.integers(0, 10**9),
        labelled=st.integers(0, 10**9),
        train_rows=st.integers(0, 10**9),
        test_rows=st.integers(0, 10**9),
        features=st.lists(features, max_size=5),
        fingerprint=_blob(32).map(bytes.hex),
    ),
    m.FeatureStatsRequest: _feature_lists().flatmap(
        lambda f: st.builds(
            m.FeatureStatsRequest,
            feature_set=st.sampled_from(["local", "cross"]),
            features=st.just(f[0]),
            test_share=share,
            robust=st.one_of(st.none(), _robust_spec(len(f[0]))),
        )
    ),
    m.FeatureStats: _feature_stats(),
    m.FeatureSketchRequest: _feature_sketch_request(),
    m.FeatureSketch: _feature_sketch(),
    m.ModelInstructions: _model_instructions(),
    m.Ack: st.builds(m.Ack, stored=st.integers(0, 10**9)),
}
MESSAGE_CLASSES = list(VALID)

labels = st.one_of(
    st.sampled_from(["query.debt_profile", "debt_profile reply from p1", "query.totals"]),
    st.text(max_size=12),
)


def _content(payload: Any, binary: dict[str, Any]) -> RecordDict:
    record = ConfigRecord({m.PAYLOAD_KEY: payload})
    for k, v in binary.items():
        record[k] = v
    return RecordDict({m.PAYLOAD_KEY: record})


def _split(msg: m.Payload) -> tuple[dict[str, Any], dict[str, Any]]:
    record = msg.to_content().config_records[m.PAYLOAD_KEY]
    fields = json.loads(record[m.PAYLOAD_KEY])
    return fields, {k: v for k, v in record.items() if k != m.PAYLOAD_KEY}


_NEAR_KINDS = st.sampled_from(
    ["none"] * 3 + ["json"] * 4 + ["binary"] * 2 + ["stray", "round", "text", "oversize"]
)
_BINARY_HOW = st.sampled_from(["drop", "short", "long", "replace", "type"])
_STRAY_KEYS = st.one_of(
    st.sampled_from(["elements", "ciphertexts", "rows", "x"]), st.text(min_size=1, max_size=8)
)
_ROUNDS = st.one_of(st.integers(-5, 2**63 - 1), config_values)
_TEXT_HOW = st.sampled_from(["flip", "cut", "insert", "type"])
_NOT_BYTES = st.one_of(st.text(max_size=20), st.integers(), st.floats())
_OVERSIZE = st.sampled_from([m.MAX_TOKENS_PER_BATCH, m.MAX_TOKENS_PER_BATCH + 1])


@st.composite
def near_valid(draw: st.DrawFn, cls: type[m.Payload]) -> RecordDict:
    """A valid message of ``cls`` built with its constructor, then (mostly) one change."""
    fields, binary = _split(draw(VALID[cls]))
    kind = draw(_NEAR_KINDS)
    payload: Any = None
    if kind == "json":
        fields = draw(mutate_json(fields, extra_keys=[*cls.model_fields, "extra"]))
    elif kind == "binary" and binary:
        name = draw(st.sampled_from(sorted(binary)))
        blob = binary[name]
        how = draw(_BINARY_HOW)
        if how == "drop":
            del binary[name]
        elif how == "short":
            binary[name] = blob[: max(0, len(blob) - draw(st.integers(1, 40)))]
        elif how == "long":
            binary[name] = blob + draw(st.binary(min_size=1, max_size=40))
        elif how == "replace":
            binary[name] = draw(st.binary(max_size=200))
        else:
            binary[name] = draw(config_values)
    elif kind == "stray":
        key = draw(_STRAY_KEYS)
        if key != m.PAYLOAD_KEY:
            binary[key] = draw(config_values)
    elif kind == "round":
        binary[m.SERVER_ROUND] = draw(_ROUNDS)
    elif kind == "text":
        raw = json.dumps(fields).encode()
        how = draw(_TEXT_HOW)
        if how == "flip":
            i = draw(st.integers(0, len(raw) - 1))
            payload = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1 :]
        elif how == "cut":
            payload = raw[: draw(st.integers(0, len(raw) - 1))]
        elif how == "insert":
            i = draw(st.integers(0, len(raw)))
            payload = raw[:i] + draw(st.binary(min_size=1, max_size=8)) + raw[i:]
        else:
            payload = draw(_NOT_BYTES)
    elif kind == "oversize" and "count" in fields and "elements" in binary:
        n = draw(_OVERSIZE)
        fields["count"] = n
        binary["elements"] = b"\x09" * (n * m.ELEMENT_BYTES)
    if payload is None:
        payload = json.dumps(fields).encode()
    return _content(payload, binary)


_ARBITRARY_KINDS = st.sampled_from(["empty", "metric", "array", "nokey", "record", "record"])
_ARBITRARY_BINARY = st.dictionaries(
    st.one_of(
        st.sampled_from(
            ["elements", "ciphertexts", "rows", "sealed", "announcement", m.SERVER_ROUND]
        ),
        st.text(min_size=1, max_size=6),
    ).filter(lambda k: k != m.PAYLOAD_KEY),
    config_values,
    max_size=4,
)


@functools.cache
def _arbitrary_payloads(cls: type[m.Payload]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.binary(max_size=60),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.one_of(st.sampled_from(sorted(cls.model_fields)), st.text(max_size=6)),
            json_values,
            max_size=8,
        ).map(lambda v: json.dumps(v).encode()),
        config_values,
    )


@st.composite
def arbitrary_content(draw: st.DrawFn, cls: type[m.Payload]) -> RecordDict:
    """Garbage of every shape: no record, wrong record type, non-JSON, JSON of the wrong shape."""
    kind = draw(_ARBITRARY_KINDS)
    if kind == "empty":
        return RecordDict({})
    if kind == "metric":
        return RecordDict({m.PAYLOAD_KEY: MetricRecord({"payload": draw(st.integers(0, 9))})})
    if kind == "array":
        return RecordDict({m.PAYLOAD_KEY: ArrayRecord()})
    binary = draw(_ARBITRARY_BINARY)
    if kind == "nokey":
        return RecordDict({m.PAYLOAD_KEY: ConfigRecord(binary)})
    return _content(draw(_arbitrary_payloads(cls)), binary)


def _same_json_type(sent: Any, parsed: Any) -> bool:
    """Whether the JSON value ``sent`` already had the type of the parsed field value."""
    if isinstance(parsed, bool):
        return isinstance(sent, bool)
    if isinstance(parsed, int):
        return type(sent) is int
    if isinstance(parsed, float):
        return type(sent) in (int, float)
    if isinstance(parsed, str):
        return isinstance(sent, str)
    if isinstance(parsed, tuple | list):
        return (
            isinstance(sent, list)
            and len(sent) == len(parsed)
            and all(_same_json_type(a, b) for a, b in zip(sent, parsed, strict=True))
        )
    if isinstance(parsed, m.Payload):
        return isinstance(sent, dict) and all(
            _same_json_type(v, getattr(parsed, k)) for k, v in sent.items()
        )
    return True


def _check_accepted(cls: type[m.Payload], msg: m.Payload, content: RecordDict, what: str) -> None:
    """Every invariant an accepted message must satisfy (and a round trip through the wire)."""
    assert type(msg) is cls
    record = content.config_records[m.PAYLOAD_KEY]
    doc = json.loads(record[m.PAYLOAD_KEY])
    assert isinstance(doc, dict) and set(doc) <= set(cls.model_fields), doc
    binary_fields = getattr(cls, "BINARY_FIELDS", ())
    assert set(record) <= {m.PAYLOAD_KEY, m.SERVER_ROUND, *binary_fields}
    for name in binary_fields:
        assert isinstance(getattr(msg, name), bytes)
    assert cls.from_content(msg.to_content(), what) == msg
    if not all(_same_json_type(v, getattr(msg, k)) for k, v in doc.items()):
        # KNOWN BUG "lax-type-coercion": pydantic's lax mode turns "3", 3.0, true into 3.
        event("known bug: lax-type-coercion")
    values = dict(msg)
    for key in ("query_id", "session_id"):
        if key in values:
            assert HEX32.fullmatch(values[key])
    if "key_id" in values and cls is not m.PlatformDescription:
        assert HEX16.fullmatch(values["key_id"])
    for key in ("participants", "contributors"):
        if key in values:
            group = values[key]
            assert 2 <= len(group) <= m.MAX_PARTICIPANTS and len(set(group)) == len(group)
            assert all(NAME.fullmatch(p) for p in group)
    if "origin" in values:
        assert NAME.fullmatch(values["origin"])
    if "elements" in values:
        limit = m.MAX_TOKENS_PER_BATCH if cls is m.DebtProfileRequest else m.MAX_ELEMENTS_PER_LIST
        assert 0 <= values["count"] <= limit
        assert len(values["elements"]) == values["count"] * m.ELEMENT_BYTES
    if cls is m.DebtProfileRequest:
        assert values["count"] >= 1 and values["layout"] == m.DEBT_PROFILE_LAYOUT_ID
        assert 1 <= len(values["announcement"]) <= 8192
    if cls is m.DebtProfileReply:
        assert values["count"] >= 1
    if cls is m.TotalsDelivery:
        assert 0 <= values["count"] <= m.MAX_ELEMENTS_PER_LIST
        assert len(values["rows"]) == 8 * values["count"]
        assert len(values["sealed"]) == 8 * m.PROFILE_FIELDS * values["count"]
        for b in values["batches"]:
            assert HEX32.fullmatch(b.query_id) and 1 <= b.size <= m.MAX_TOKENS_PER_BATCH
    if cls is m.DeliveryBatch:
        assert 1 <= values["size"] <= m.MAX_TOKENS_PER_BATCH
    if "test_share" in values:
        assert 0.0 < values["test_share"] < 1.0
    if "features" in values:
        assert all(FEATURE.fullmatch(f) for f in values["features"])
    if cls is m.FeatureStats:
        assert len(msg.sums) == len(msg.sumsq)
        assert all(math.isfinite(v) for v in (*msg.sums, *msg.sumsq)) and msg.n >= 0
    if cls is m.ModelInstructions:
        assert len(msg.features) == len(msg.mean) == len(msg.std) >= 1
        assert all(math.isfinite(v) for v in msg.mean)
        assert all(math.isfinite(s) and s > 0 for s in msg.std)
        assert 1 <= msg.epochs <= 100 and 0 < msg.learning_rate <= 1
        assert msg.server_round >= 0 and msg.seed >= 0
    if cls is m.PlatformDescription:
        assert re.fullmatch(r"[0-9a-f]{64}", msg.fingerprint)
        assert min(msg.borrowers, msg.labelled, msg.train_rows, msg.test_rows) >= 0
    if cls is m.Ack:
        assert msg.stored >= 0


MESSAGE_INPUTS = {cls: st.one_of(near_valid(cls), arbitrary_content(cls)) for cls in VALID}


def _decode_message(cls: type[m.Payload], content: RecordDict, what: str) -> None:
    ok, value = _refused(
        lambda: cls.from_content(content, what), (m.ProtocolError,), f"{what}:", MESSAGE_BUGS
    )
    if ok:
        _check_accepted(cls, value, content, what)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
@PROPERTY
@given(data=st.data(), what=labels)
def test_message_decoders_on_hostile_content(
    cls: type[m.Payload], data: st.DataObject, what: str
) -> None:
    content = data.draw(MESSAGE_INPUTS[cls], label="content")
    _decode_message(cls, content, what)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_valid_messages_round_trip(cls: type[m.Payload]) -> None:
    """The near-valid strategy's starting points are valid: every one is accepted."""

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(msg=VALID[cls])
    def run(msg: m.Payload) -> None:
        assert cls.from_content(msg.to_content(), "x") == msg

    run()


def test_batch_limit_boundary() -> None:
    def request(n: int) -> RecordDict:
        fields, binary = _split(
            m.DebtProfileRequest(
                query_id="0" * 32,
                session_id="1" * 32,
                key_id="2" * 16,
                participants=("a", "b"),
                count=1,
                announcement=b"x",
                elements=b"\x09" * 32,
            )
        )
        fields["count"] = n
        binary["elements"] = b"\x09" * (n * m.ELEMENT_BYTES)
        return _content(json.dumps(fields).encode(), binary)

    assert m.DebtProfileRequest.from_content(request(m.MAX_TOKENS_PER_BATCH), "q").count == (
        m.MAX_TOKENS_PER_BATCH
    )
    with pytest.raises(m.ProtocolError, match=r"^q: "):
        m.DebtProfileRequest.from_content(request(m.MAX_TOKENS_PER_BATCH + 1), "q")


# ------------------------------------------------------------------------------ token / int blocks


@PROPERTY
@given(blob=st.one_of(st.binary(max_size=200), st.lists(_blob(32), max_size=5).map(b"".join)))
def test_tokens_from_bytes(blob: bytes) -> None:
    ok, tokens = _refused(lambda: m.tokens_from_bytes(blob), (m.ProtocolError,))
    assert ok == (len(blob) % m.TOKEN_BYTES == 0)
    if ok:
        assert all(re.fullmatch(r"[0-9a-f]{64}", t) for t in tokens)
        assert m.tokens_to_bytes(tokens) == blob


@PROPERTY
@given(
    rows=st.one_of(st.integers(0, 6), st.integers(-3, 2**40)),
    cols=st.one_of(st.integers(0, 4), st.integers(-3, 2**40)),
    data=st.data(),
)
def test_ints_from_bytes(rows: int, cols: int, data: st.DataObject) -> None:
    size = rows * cols * 8
    blob = data.draw(
        st.one_of(st.binary(max_size=200), _blob(size) if 0 <= size <= 400 else st.just(b""))
    )
    ok, out = _refused(
        lambda: m.ints_from_bytes(blob, rows, cols),
        (m.ProtocolError,),
    )
    if ok:
        assert out.shape == (rows, cols) and out.dtype == np.int64
        assert m.ints_to_bytes(out) == blob
    elif rows >= 0 and cols >= 0:
        assert len(blob) != size


# ------------------------------------------------------------------------------ group elements

_SECRET = hashlib.sha256(b"props-secret").digest()
_VALID_ELEMENTS = hash_many([b"props-%d" % i for i in range(32)])
_EULER = (P - 1) // 2


def _twist_points(k: int) -> list[bytes]:
    out, u = [], 2
    while len(out) < k:
        rhs = (u * u * u + 486662 * u * u + u) % P
        if rhs and pow(rhs, _EULER, P) == P - 1:
            out.append(u.to_bytes(32, "little"))
        u += 1
    return out


_TWIST = _twist_points(16)


def _element_ok(e: bytes) -> bool:
    """Independent oracle: canonical, on the curve (Euler's criterion), not of small order
    (libsodium's X25519 with a clamped scalar, a multiple of 8, refuses exactly those)."""
    if len(e) != 32 or e[31] & 0x80:
        return False
    u = int.from_bytes(e, "little")
    if u >= P:
        return False
    rhs = (u * u * u + 486662 * u * u + u) % P
    if rhs == 0 or pow(rhs, _EULER, P) != 1:
        return False
    try:
        nacl.crypto_scalarmult(_SECRET, e)
    except CryptoError:
        return False
    return True


@st.composite
def _element(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "valid",
                "valid",
                "flip",
                "high",
                "ge_p",
                "twist",
                "small",
                "small_nc",
                "identity",
                "random",
                "short",
            ]
        )
    )
    good = draw(st.sampled_from(_VALID_ELEMENTS))
    if kind == "valid":
        return good
    if kind == "flip":
        i, bit = draw(st.integers(0, 31)), draw(st.integers(0, 7))
        return good[:i] + bytes([good[i] ^ (1 << bit)]) + good[i + 1 :]
    if kind == "high":
        return good[:31] + bytes([good[31] | 0x80])
    if kind == "ge_p":
        return draw(st.integers(P, 2**255 - 1)).to_bytes(32, "little")
    if kind == "twist":
        return draw(st.sampled_from(_TWIST))
    if kind == "small":
        return draw(st.sampled_from(sorted(SMALL_ORDER_U))).to_bytes(32, "little")
    if kind == "small_nc":  # a small-order u written non-canonically as u + p
        return (draw(st.sampled_from([0, 1])) + P).to_bytes(32, "little")
    if kind == "identity":
        return bytes(32)
    if kind == "random":
        return draw(_blob(32))
    return draw(st.binary(max_size=40))


@PROPERTY
@given(
    pieces=st.lists(_element(), max_size=6),
    max_count=st.integers(0, 8),
    validate=st.booleans(),
    what=labels,
)
def test_elements_from_bytes_near_valid(
    pieces: list[bytes], max_count: int, validate: bool, what: str
) -> None:
    blob = b"".join(pieces)
    ok, out = _refused(
        lambda: elements_from_bytes(blob, max_count=max_count, what=what, validate=validate),
        (InvalidGroupElement,),
        f"{what}:",
    )
    whole = len(blob) % ELEMENT_BYTES == 0 and len(blob) // ELEMENT_BYTES <= max_count
    chunks = [blob[i : i + 32] for i in range(0, len(blob), 32)]
    expected = whole and (not validate or all(_element_ok(c) for c in chunks))
    assert ok == expected, (ok, out)
    if ok:
        assert out == chunks
    elif whole and validate:
        first = next(i for i, c in enumerate(chunks) if not _element_ok(c))
        assert f"element {first}:" in str(out)


# ------------------------------------------------------------------------------ Paillier


@functools.cache
def _paillier() -> tuple[Any, Any, dict[int, int]]:
    pk, sk = generate_keypair(1024, allow_insecure_test_size=True)
    plain = [0, 1, 2, 12345, int(pk.n) - 1, 2**500]
    cts = encrypt_plaintexts(pk, plain, workers=1)
    return pk, sk, dict(zip(cts, plain, strict=True))


_SMALL_PRIMES = [p for p in range(3, 10_000, 2) if gmpy2.is_prime(p)]


def _pk_ok(data: bytes, allow: bool) -> bool:
    """Independent oracle for a public-key encoding."""
    if len(data) < 7 or data[:4] != b"FCPK" or data[4] != 1:
        return False
    nbytes = int.from_bytes(data[5:7], "big")
    body = data[7:]
    if len(body) != nbytes or nbytes == 0 or body[0] == 0:
        return False
    n = int.from_bytes(body, "big")
    if n.bit_length() not in ((1024, 2048, 3072) if allow else (2048, 3072)):
        return False
    if n % 2 == 0 or any(n % p == 0 for p in _SMALL_PRIMES):
        return False
    return not gmpy2.is_square(n) and not gmpy2.is_prime(n, 40)


# A 1024-bit prime, a 2048-bit prime and a 1024-bit square without small factors: each
# passes every check before the one it is meant to fail.
_BAD_MODULI = [
    int(gmpy2.next_prime(2**1023 + 2**1022)),
    int(gmpy2.next_prime(2**2047 + 2**2046)),
    int(gmpy2.next_prime(2**511 + 2**510)) ** 2,
]


def _prime(bits: int, seed: int) -> int:
    start = int.from_bytes(hashlib.sha512(b"props-prime-%d" % seed).digest() * 7, "big")
    start = start % 2 ** (bits - 2) + 2 ** (bits - 1) + 2 ** (bits - 2)  # top two bits set
    return int(gmpy2.next_prime(start))


# Genuine moduli (products of two primes with their top two bits set) of 1024 and 2048 bits.
_P512 = [_prime(512, i) for i in range(4)]
_P1024 = [_prime(1024, 10 + i) for i in range(3)]
_GOOD_MODULI = [a * b for ps in (_P512, _P1024) for i, a in enumerate(ps) for b in ps[i + 1 :]]


def _pk_encoding(n: int, nbytes: int | None = None) -> bytes:
    size = (n.bit_length() + 7) // 8 if nbytes is None else nbytes
    return b"FCPK\x01" + size.to_bytes(2, "big") + n.to_bytes(size, "big")


@st.composite
def _public_key_bytes(draw: st.DrawFn) -> bytes:
    pk, sk, _ = _paillier()
    n, p = int(pk.n), int(sk.p)
    good = public_key_to_bytes(pk)
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "flip",
                "cut",
                "append",
                "header",
                "n_variant",
                "random_n",
                "garbage",
                "leading_zero",
                "other",
                "other",
            ]
        )
    )
    if kind == "valid":
        return good
    if kind == "other":
        return _pk_encoding(draw(st.sampled_from(_GOOD_MODULI)))
    if kind == "flip":
        i = draw(st.integers(0, len(good) - 1))
        return good[:i] + bytes([good[i] ^ (1 << draw(st.integers(0, 7)))]) + good[i + 1 :]
    if kind == "cut":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "append":
        return good + draw(st.binary(min_size=1, max_size=8))
    if kind == "header":
        return (
            draw(st.sampled_from([b"FCPK", b"FCPk", b"\0\0\0\0"]))
            + bytes([draw(st.sampled_from([0, 1, 2, 255]))])
            + draw(st.integers(0, 65535)).to_bytes(2, "big")
            + good[7:]
        )
    if kind == "leading_zero":
        return _pk_encoding(n, len(good) - 7 + 1)
    if kind == "n_variant":
        variants = [n + 1, n - 1, n + 2, n * 3, p, p * p, *_BAD_MODULI, n * n, n >> 1, 1]
        return _pk_encoding(draw(st.sampled_from(variants)))
    if kind == "random_n":
        bits = draw(st.sampled_from([1023, 1024, 2048, 3072]))
        return _pk_encoding(draw(st.integers(2 ** (bits - 1), 2**bits - 1)) | 1)
    return draw(st.binary(max_size=300))


@PROPERTY
@given(data=_public_key_bytes(), allow=st.booleans())
def test_public_key_from_bytes(data: bytes, allow: bool) -> None:
    ok, pk = _refused(
        lambda: public_key_from_bytes(data, allow_insecure_test_size=allow), (InvalidPublicKey,)
    )
    assert ok == _pk_ok(data, allow)
    if ok:
        assert public_key_to_bytes(pk) == data and pk.g == pk.n + 1


@st.composite
def _ciphertext(draw: st.DrawFn) -> bytes:
    pk, sk, known = _paillier()
    n, p, q = int(pk.n), int(sk.p), int(sk.q)
    width = ciphertext_width(pk)
    kind = draw(st.sampled_from(["valid", "valid", "special", "multiple", "random", "length"]))
    if kind == "valid":
        value = draw(st.sampled_from(sorted(known)))
    elif kind == "special":
        value = draw(st.sampled_from([0, 1, n, n - 1, p, q, n * n - 1, n * n, n * n + 1]))
        value = min(value, 2 ** (8 * width) - 1)
    elif kind == "multiple":
        factor = draw(st.sampled_from([p, q, n]))
        value = factor * draw(st.integers(1, (2 ** (8 * width) - 1) // factor))
    elif kind == "random":
        value = draw(st.integers(0, 2 ** (8 * width) - 1))
    else:
        return draw(st.binary(max_size=width + 8))
    return value.to_bytes(width, "big")


@PROPERTY
@given(pieces=st.lists(_ciphertext(), max_size=4), expected=st.one_of(st.none(), counts))
def test_ciphertexts_from_bytes(pieces: list[bytes], expected: int | None) -> None:
    pk, sk, known = _paillier()
    n, nsquare, width = int(pk.n), int(pk.nsquare), ciphertext_width(pk)
    blob = b"".join(pieces)
    want = len(blob) // width if expected is None else expected
    ok, cts = _refused(lambda: ciphertexts_from_bytes(pk, blob, want), (InvalidCiphertext,))
    values = [int.from_bytes(blob[i : i + width], "big") for i in range(0, len(blob), width)]
    oracle = len(blob) == want * width and all(
        0 < c < nsquare and math.gcd(c, n) == 1 for c in values
    )
    assert ok == oracle
    if ok:
        assert cts == values
        ours = [c for c in cts if c in known]
        assert decrypt_plaintexts(sk, ours, workers=1) == [known[c] for c in ours]


def test_ciphertexts_from_bytes_negative_count() -> None:
    pk, _, _ = _paillier()
    with pytest.raises(ValueError, match="expected must be >= 0"):
        ciphertexts_from_bytes(pk, b"", -1)


# ------------------------------------------------------------------------------ packing

LAYOUTS = [debt_profile_layout(3), DEBT_PROFILE_LAYOUT]


def _place(layout: SlotLayout, rows: list[list[int]], key_bits: int) -> list[int]:
    """Independent packer: slot values (possibly above max_sum) into plaintexts."""
    tpp = (key_bits - 1) // layout.token_bits
    widths = [layout.slot_bits(f) for f in layout.fields]
    out = []
    for start in range(0, len(rows), tpp):
        acc, at = 0, 0
        for row in rows[start : start + tpp]:
            for v, w in zip(row, widths, strict=True):
                acc += v << at
                at += w
        out.append(acc)
    return out


@st.composite
def _unpack_case(draw: st.DrawFn) -> tuple[SlotLayout, list[int], int, int]:
    layout = draw(st.sampled_from(LAYOUTS))
    key_bits = draw(st.one_of(st.sampled_from([1024, 2048, 3072]), st.integers(-10, 4000)))
    tokens = draw(st.integers(0, 120))
    if (key_bits - 1) // layout.token_bits >= 1 and draw(st.booleans()):
        limits = [layout.max_sum(f) for f in layout.fields]
        rng = random.Random(draw(st.integers(0, 2**32 - 1)))
        fill = draw(st.sampled_from(["random", "mixed", "max", "zero"]))

        def value(lim: int) -> int:
            if fill == "max":
                return lim
            if fill == "zero":
                return 0
            if fill == "mixed":
                return rng.choice([0, lim, rng.randint(0, lim)])
            return rng.randint(0, lim)

        rows = [[value(lim) for lim in limits] for _ in range(tokens)]
        plain = _place(layout, rows, key_bits)
        how = draw(st.sampled_from(["none", "none", "bit", "slot", "neg", "drop", "add", "tok"]))
        if how == "bit" and plain:
            i = draw(st.integers(0, len(plain) - 1))
            plain[i] ^= 1 << draw(st.integers(0, key_bits + 8))
        elif how == "slot" and rows:
            r, c = draw(st.integers(0, tokens - 1)), draw(st.integers(0, 2))
            rows[r][c] = limits[c] + draw(st.integers(1, 2**8))
            plain = _place(layout, rows, key_bits)
        elif how == "neg" and plain:
            plain[draw(st.integers(0, len(plain) - 1))] *= -1
        elif how == "drop" and plain:
            plain.pop()
        elif how == "add":
            plain.append(draw(st.integers(0, 2**key_bits)))
        elif how == "tok":
            tokens += draw(st.sampled_from([-1, 1, -tokens - 1, 10**400]))
    else:
        plain = draw(
            st.lists(st.one_of(st.integers(), st.integers(-(2**3100), 2**3100)), max_size=6)
        )
        tokens = draw(st.one_of(st.integers(-5, 200), st.just(tokens)))
    return layout, plain, tokens, key_bits


UNPACK_BUGS: frozenset[str] = frozenset()


@PROPERTY
@given(case=_unpack_case())
def test_slot_layout_unpack(case: tuple[SlotLayout, list[int], int, int]) -> None:
    layout, plain, tokens, key_bits = case
    ok, out = _refused(
        lambda: layout.unpack(plain, tokens, key_bits),
        (SlotOverflowError, ValueError),
        known=UNPACK_BUGS,
    )
    if not ok:
        assert type(out) in (SlotOverflowError, ValueError) or _known(out, UNPACK_BUGS)
    tpp = (key_bits - 1) // layout.token_bits
    limits = [layout.max_sum(f) for f in layout.fields]
    oracle = tpp >= 1 and tokens >= 0 and len(plain) == -(-tokens // tpp)
    if oracle:
        for i, p in enumerate(plain):
            used = min(tpp, tokens - i * tpp)
            if p < 0 or p >> (used * layout.token_bits):
                oracle = False
        if oracle:
            rows = []
            for i, p in enumerate(plain):
                at = 0
                for _ in range(min(tpp, tokens - i * tpp)):
                    row = []
                    for f in layout.fields:
                        w = layout.slot_bits(f)
                        row.append((p >> at) & ((1 << w) - 1))
                        at += w
                    rows.append(row)
            oracle = all(v <= lim for row in rows for v, lim in zip(row, limits, strict=True))
    assert ok == oracle, (ok, out)
    if ok:
        assert out.shape == (tokens, len(layout.fields)) and out.dtype == np.int64
        assert _place(layout, out.tolist(), key_bits) == plain


@PROPERTY
@given(
    layout=st.sampled_from(LAYOUTS),
    key_bits=st.sampled_from([1024, 2048, 3072]),
    tokens=st.integers(0, 80),
    seed=st.integers(0, 2**32 - 1),
    fill=st.sampled_from(["random", "max", "zero"]),
    data=st.data(),
)
def test_pack_unpack_round_trip(
    layout: SlotLayout, key_bits: int, tokens: int, seed: int, fill: str, data: st.DataObject
) -> None:
    contributors = data.draw(
        st.one_of(st.integers(1, min(4, layout.max_contributors)), st.just(layout.max_contributors))
    )
    rng = np.random.default_rng(seed)
    bounds = [1 << f.contributor_bits for f in layout.fields]
    parts = []
    for _ in range(contributors):
        if fill == "max":
            v = np.tile(np.array(bounds, dtype=np.int64) - 1, (tokens, 1))
        elif fill == "zero":
            v = np.zeros((tokens, len(bounds)), dtype=np.int64)
        else:
            v = np.stack([rng.integers(0, b, size=tokens) for b in bounds], axis=1)
        parts.append(v.astype(np.int64).reshape(tokens, len(bounds)))
    packed = [layout.pack(v, key_bits) for v in parts]
    summed = [sum(col) for col in zip(*packed, strict=True)]
    assert all(s < 2 ** (key_bits - 1) for s in summed)
    out = layout.unpack(summed, tokens, key_bits)
    assert np.array_equal(out, sum(parts))


# ------------------------------------------------------------------------------ sealed delivery

_SHARED = hashlib.sha256(b"props-delivery").digest()
_QID = "ab" * 16


@functools.cache
def _stream(rows: int) -> bytes:
    return delivery.delivery_stream(_SHARED, _QID, "0123456789abcdef", "p1", rows)


@st.composite
def _open_case(draw: st.DrawFn) -> tuple[bytes, list[int], bytes, np.ndarray | None]:
    rows = draw(st.integers(0, 6))
    stream = _stream(rows)
    totals = np.array(
        draw(
            st.lists(
                st.lists(st.integers(-(2**63), 2**63 - 1), min_size=3, max_size=3),
                min_size=rows,
                max_size=rows,
            )
        ),
        dtype=np.int64,
    ).reshape(rows, 3)
    sealed_all = delivery.seal(totals, stream)
    positions = draw(st.lists(st.integers(0, rows - 1), max_size=6)) if rows else []
    sealed = b"".join(sealed_all[p * 24 : (p + 1) * 24] for p in positions)
    expect: np.ndarray | None = totals[positions] if positions else totals[:0]
    how = draw(st.sampled_from(["none", "none", "pos", "sealed", "stream", "garbage"]))
    if how == "pos":
        bad = draw(st.sampled_from([-1, rows, rows + 1, -(2**63), 2**63 - 1, 2**70]))
        positions = [*positions, bad]
        expect = None
    elif how == "sealed":
        sealed = draw(
            st.one_of(st.binary(max_size=100), st.just(sealed[:-1]), st.just(sealed + b"\0"))
        )
        expect = None
    elif how == "stream":
        stream = draw(st.sampled_from([stream[:-1], stream + b"\0", b"", stream[:-24]]))
        expect = None
    elif how == "garbage":
        sealed = draw(st.binary(max_size=100))
        positions = draw(st.lists(st.integers(-3, 8), max_size=5))
        expect = None
    return sealed, positions, stream, expect


OPEN_ROWS_BUGS: frozenset[str] = frozenset()


@PROPERTY
@given(case=_open_case())
def test_open_rows(case: tuple[bytes, list[int], bytes, np.ndarray | None]) -> None:
    sealed, positions, stream, expect = case
    ok, out = _refused(
        lambda: delivery.open_rows(sealed, positions, stream),
        (delivery.DeliveryError,),
        known=OPEN_ROWS_BUGS,
    )
    limit = len(stream) // 24
    oracle = (
        len(sealed) == 24 * len(positions)
        and all(0 <= p < limit for p in positions)
        and len(stream) % 24 == 0
    )
    if ok or _known(out, OPEN_ROWS_BUGS) is None:
        assert ok == oracle
    if ok:
        assert out.shape == (len(positions), 3) and out.dtype == np.int64
        plain = bytes(
            s ^ k
            for i, p in enumerate(positions)
            for s, k in zip(sealed[24 * i : 24 * i + 24], stream[24 * p : 24 * p + 24], strict=True)
        )
        assert out.astype("<i8").tobytes() == plain
        if expect is not None:
            assert np.array_equal(out, expect)


@PROPERTY
@given(
    shared=st.one_of(st.just(_SHARED), st.just(bytes(32)), st.binary(max_size=40)),
    query_id=st.one_of(hex32, st.text(max_size=34), st.sampled_from(["", "0", "zz", "0 1"])),
    key_id=st.one_of(hex16, st.text(max_size=20)),
    platform=st.one_of(names, st.text(max_size=20)),
    rows=st.integers(-2, 8),
)
def test_delivery_stream(
    shared: bytes, query_id: str, key_id: str, platform: str, rows: int
) -> None:
    ok, stream = _refused(
        lambda: delivery.delivery_stream(shared, query_id, key_id, platform, rows),
        (delivery.DeliveryError,),
    )
    if ok:
        assert len(shared) == 32 and any(shared)
        assert len(stream) == max(rows, 0) * delivery.ROW_BYTES
        assert stream == delivery.delivery_stream(shared, query_id, key_id, platform, rows)
    elif not isinstance(stream, UnicodeEncodeError):
        try:
            bytes.fromhex(query_id)
            hex_ok = True
        except ValueError:
            hex_ok = False
        assert len(shared) != 32 or not any(shared) or not hex_ok


# ------------------------------------------------------------------------------ identity files

_TMP = tempfile.TemporaryDirectory(prefix="fedcredit-props-")
_IDENTITIES = [identity.PlatformIdentity.generate(f"plat-{i}") for i in range(6)]
_ENTRIES = [ident.public_entry().model_dump() for ident in _IDENTITIES]
_KEYHOLDER_KEY = identity.PlatformIdentity.generate("keyholder").public_entry().signing_key


def _identity_doc(i: int) -> dict[str, Any]:
    path = Path(_TMP.name) / f"identity-{i}.json"
    _IDENTITIES[i].save(path)
    return json.loads(path.read_text())


_IDENTITY_DOCS = [_identity_doc(i) for i in range(len(_IDENTITIES))]


_OTHER_KEYS = sorted(
    {_KEYHOLDER_KEY, *(v for entry in _ENTRIES for v in entry.values())}
    | {doc[k] for doc in _IDENTITY_DOCS for k in ("agreement_private_key", "signing_private_key")}
)


@st.composite
def _roster_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Valid roster documents: a subset of the identities under fresh names, key holder or not."""
    picked = draw(st.lists(st.integers(0, len(_ENTRIES) - 1), unique=True, max_size=4))
    called = draw(st.lists(names, min_size=len(picked), max_size=len(picked), unique=True))
    doc: dict[str, Any] = {
        "format": identity.ROSTER_FORMAT,
        "platforms": {n: dict(_ENTRIES[i]) for n, i in zip(called, picked, strict=True)},
    }
    keyholder = draw(st.sampled_from(["absent", "null", "key", "key"]))
    if keyholder != "absent":
        doc["keyholder_signing_key"] = _KEYHOLDER_KEY if keyholder == "key" else None
    if draw(st.integers(0, 4)) == 0:
        del doc["format"]  # it has a default
    return doc


@st.composite
def _identity_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc = dict(draw(st.sampled_from(_IDENTITY_DOCS)))
    doc["name"] = draw(names)
    return doc


@st.composite
def _file_text(
    draw: st.DrawFn, docs: st.SearchStrategy[dict[str, Any]], extra_keys: list[str]
) -> bytes:
    doc = draw(docs)
    kind = draw(
        st.sampled_from(
            ["none", "none", "none", "json", "json", "json", "hexkey", "raw", "dup", "any"]
        )
    )
    if kind == "json":
        doc = draw(mutate_json(doc, extra_keys=extra_keys))
    elif kind == "hexkey":  # a well-formed hex string that is not the right key
        doc = json.loads(json.dumps(doc))
        paths = [(k,) for k, v in doc.items() if isinstance(v, str)]
        for name, entry in doc.get("platforms", {}).items():
            paths += [("platforms", name, k) for k in entry]
        path = draw(st.sampled_from(paths or [("keyholder_signing_key",)]))
        node = doc
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = draw(
            st.one_of(
                st.sampled_from(HOSTILE_KEY_HEX),
                _blob(32).map(bytes.hex),
                st.sampled_from([v.upper() for v in HOSTILE_KEY_HEX]),
                # another party's genuine key: shared agreement keys, mismatched identities
                st.sampled_from(_OTHER_KEYS),
            )
        )
    elif kind == "dup":
        text = json.dumps(doc)
        key = draw(st.sampled_from(sorted(doc)))
        return ("{" + json.dumps(key) + ": " + json.dumps(doc[key]) + ", " + text[1:]).encode()
    elif kind == "raw":
        text = json.dumps(doc).encode()
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + draw(st.binary(min_size=1, max_size=4)) + text[i + 1 :]
    elif kind == "any":
        return draw(
            st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60))
        )
    return json.dumps(doc).encode()


FILE_BUGS: frozenset[str] = frozenset()


def _write(name: str, data: bytes) -> Path:
    path = Path(_TMP.name) / name
    path.write_bytes(data)
    return path


def _signing_ok(hex_key: str) -> bool:
    return nacl.crypto_core_ed25519_is_valid_point(bytes.fromhex(hex_key))


@PROPERTY
@given(data=_file_text(_roster_docs(), ["format", "platforms", "keyholder_signing_key", "x"]))
def test_load_roster(data: bytes) -> None:
    path = _write("roster.json", data)
    ok, roster = _refused(
        lambda: identity.load_roster(path), (identity.RosterError,), f"{path}:", FILE_BUGS
    )
    if ok:
        doc = json.loads(data)
        assert set(doc) <= {"format", "platforms", "keyholder_signing_key"}
        assert roster.format == identity.ROSTER_FORMAT
        agreement = [e.agreement_key for e in roster.platforms.values()]
        assert len(set(agreement)) == len(agreement)
        for name, entry in roster.platforms.items():
            assert NAME.fullmatch(name)
            assert re.fullmatch(r"[0-9a-f]{64}", entry.agreement_key)
            assert _element_ok(bytes.fromhex(entry.agreement_key))
            assert _signing_ok(entry.signing_key)
        if roster.keyholder_signing_key is not None:
            assert _signing_ok(roster.keyholder_signing_key)
        again = _write("roster-again.json", b"")
        identity.save_roster(again, roster)
        assert identity.load_roster(again).fingerprint() == roster.fingerprint()


@PROPERTY
@given(
    data=_file_text(_identity_docs(), ["name", "signing_key", "x"]),
)
def test_load_identity(data: bytes) -> None:
    path = _write("identity.json", data)
    ok, ident = _refused(
        lambda: identity.load_identity(path), (identity.IdentityError,), f"{path}:", FILE_BUGS
    )
    if ok:
        doc = json.loads(data)
        assert set(doc) == set(identity._IDENTITY_FIELDS)
        assert NAME.fullmatch(ident.name) and ident.name == doc["name"]
        entry = ident.public_entry()
        assert entry.agreement_key == doc["agreement_key"]
        assert entry.signing_key == doc["signing_key"]


# ------------------------------------- reproducers of decoder bugs these properties found


def _bad(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


def _match_done(payload: bytes, **binary: Any) -> RecordDict:
    return _content(payload, {"elements": b"", **binary})


def test_bug_binary_payload_non_utf8() -> None:
    with pytest.raises(m.ProtocolError, match=r"^W: "):
        m.MatchDone.from_content(_match_done(b'"\x80"'), "W")


def test_bug_binary_payload_huge_int() -> None:
    with pytest.raises(m.ProtocolError, match=r"^W: "):
        m.MatchDone.from_content(_match_done(b'{"count": ' + b"1" * 5000 + b"}"), "W")


def test_bug_binary_payload_deep_nesting() -> None:
    with pytest.raises(m.ProtocolError, match=r"^W: "):
        m.MatchDone.from_content(_match_done(b"[" * 100_000 + b"]" * 100_000), "W")


def test_bug_payload_stray_binary_field_unlabelled() -> None:
    content = _content(m.Ack(stored=1).model_dump_json().encode(), {"x": b"1"})
    with pytest.raises(m.ProtocolError, match=r"^W: "):
        m.Ack.from_content(content, "W")


def test_bug_binary_payload_not_json_unlabelled() -> None:
    with pytest.raises(m.ProtocolError, match=r"^W: "):
        m.MatchDone.from_content(_match_done(b"not json"), "W")


def test_bug_binary_payload_missing_field_unlabelled() -> None:
    content = _content(b'{"session_id": "' + b"0" * 32 + b'", "count": 0}', {})
    with pytest.raises(m.ProtocolError, match=r"^W: "):
        m.MatchDone.from_content(content, "W")


def test_bug_load_roster_deep_nesting() -> None:
    path = _write("deep-roster.json", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(identity.RosterError):
        identity.load_roster(path)


def test_bug_load_identity_deep_nesting() -> None:
    path = _write("deep-identity.json", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(identity.IdentityError):
        identity.load_identity(path)


def test_bug_unpack_huge_token_count() -> None:
    with pytest.raises(ValueError):
        DEBT_PROFILE_LAYOUT.unpack([], 10**400, 2048)


def test_bug_open_rows_ragged_stream() -> None:
    with pytest.raises(delivery.DeliveryError):
        delivery.open_rows(b"\0" * 24, [0], b"\0" * 25)


def test_bug_open_rows_huge_position() -> None:
    with pytest.raises(delivery.DeliveryError):
        delivery.open_rows(b"\0" * 24, [2**70], b"\0" * 24)


def test_bug_delivery_stream_surrogate() -> None:
    with pytest.raises(delivery.DeliveryError):
        delivery.delivery_stream(_SHARED, _QID, "\ud800", "p1", 1)


def test_bug_ints_from_bytes_negative_shape() -> None:
    with pytest.raises(m.ProtocolError):
        m.ints_from_bytes(b"\0" * 8, -1, -1)


def test_bug_lax_types_accepted() -> None:
    fields, binary = _split(m.MatchDone(session_id="0" * 32, count=1, elements=b"\x01" * 32))
    for wrong in (True, "1", 1.0):
        with pytest.raises(m.ProtocolError, match=r"^W: "):
            m.MatchDone.from_content(
                _content(json.dumps({**fields, "count": wrong}).encode(), binary), "W"
            )
    with pytest.raises(m.ProtocolError, match=r"^W: "):
        m.Ack.from_content(_content(b'{"stored": "7"}', {}), "W")
