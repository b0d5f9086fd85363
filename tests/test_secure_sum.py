"""Secure sums of named vectors: exact to the stated bound, uniform alone, full sums only."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from protocols import secure_sum as ss
from protocols import training_sums as ts
from protocols.masking import MaskError


def _key(seed: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest())


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


NAMES = ["bank-a", "bank-b", "bank-c"]
KEYS = {n: _key(n) for n in NAMES}
ROSTER = {n: _pub(k) for n, k in KEYS.items()}
FIELDS = [
    ss.SumField(name="n", shape=(), bound_bits=40, integer=True),
    ss.SumField(name="w", shape=(4, 3), bound_bits=44),
    ss.SumField(name="sumsq", shape=(5,), bound_bits=56, limbs=2),
]


def _spec(names=NAMES, fields=FIELDS, round_id="lr-local/train/1") -> ss.SecureSumSpec:  # type: ignore[no-untyped-def]
    return ss.SecureSumSpec.fresh("session", round_id, "train", names, fields)


def _values(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "n": np.asarray(float(rng.integers(1, 100_000))),
        "w": rng.normal(0, 1e4, size=(4, 3)),
        "sumsq": rng.uniform(0, 1e15, size=5),
    }


def _masked(spec: ss.SecureSumSpec, values: dict[str, dict[str, np.ndarray]]) -> dict[str, bytes]:
    return {n: ss.mask_values(values[n], n, KEYS[n], ROSTER, spec) for n in spec.participants}


def test_sum_equals_float_sum_within_the_stated_bound() -> None:
    rng = np.random.default_rng(1)
    spec = _spec()
    values = {n: _values(rng) for n in NAMES}
    total = ss.unmask_sum(list(_masked(spec, values).values()), spec)
    for f in FIELDS:
        exact = sum(values[n][f.name] for n in NAMES)
        bound = spec.error_bound(f.name)
        # float64's own rounding of the exact sum on top of the quantisation bound
        slack = bound + 4 * np.finfo(np.float64).eps * np.abs(exact)
        assert np.all(np.abs(total[f.name] - exact) <= slack), f.name
    assert total["n"] == sum(values[n]["n"] for n in NAMES)  # integer fields are exact
    assert spec.error_bound("w") == 3 * 2.0 ** -(62 - 44 - 2 + 1)
    assert spec.error_bound("sumsq") < 1e-10  # two limbs: 32 more fraction bits


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        (3, 6),
        elements=st.floats(-(2.0**44), 2.0**44, allow_nan=False, allow_infinity=False),
    )
)
def test_any_values_within_the_bound_sum_correctly(x: np.ndarray) -> None:
    fields = [ss.SumField(name="v", shape=(6,), bound_bits=44)]
    spec = _spec(fields=fields)
    masked = _masked(spec, {n: {"v": x[i]} for i, n in enumerate(NAMES)})
    got = ss.unmask_sum(list(masked.values()), spec)["v"]
    exact = x.sum(axis=0)
    assert np.all(np.abs(got - exact) <= spec.error_bound("v") + 1e-15 * np.abs(x).sum(axis=0))


def test_one_reply_alone_is_uniform_and_partial_sums_fail() -> None:
    """All-zero values: anything non-uniform in a reply would be the platform's data."""
    big = [ss.SumField(name="v", shape=(20_000,), bound_bits=40)]
    spec = _spec(fields=big)
    zeros = {n: {"v": np.zeros(20_000)} for n in NAMES}
    masked = _masked(spec, zeros)
    for blob in masked.values():
        words = np.frombuffer(blob, dtype="<u8")
        bits = np.unpackbits(words.view(np.uint8))
        # 1.28 million bits: a fair coin's share of ones is 0.5 +- 0.0005 (1 sd)
        assert abs(bits.mean() - 0.5) < 0.003
        top = (words >> np.uint64(56)).astype(np.int64)  # the byte the sign would sit in
        counts = np.bincount(top, minlength=256)
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
        assert chi2 < 400  # 255 degrees of freedom; 400 is far in the tail
    with pytest.raises(ss.SecureSumError, match="participants"):
        ss.unmask_sum(list(masked.values())[:2], spec)
    # Two replies added as if they were everything: the check word is not 3.
    pair_spec = spec.model_copy()
    with pytest.raises(ss.SecureSumError, match="did not cancel"):
        total = sum(ss.words_of(b, spec) for b in list(masked.values())[:2])
        ss.dequantise(np.asarray(total, dtype=np.uint64), pair_spec)


def test_masks_are_bound_to_the_spec() -> None:
    spec = _spec()
    rng = np.random.default_rng(2)
    values = {n: _values(rng) for n in NAMES}
    masked = _masked(spec, values)
    # One platform answers under a different nonce (another attempt): the sum is refused.
    other = _spec()
    assert other.nonce != spec.nonce
    masked["bank-b"] = ss.mask_values(values["bank-b"], "bank-b", KEYS["bank-b"], ROSTER, other)
    with pytest.raises(ss.SecureSumError, match="did not cancel"):
        ss.unmask_sum(list(masked.values()), spec)


def test_refusals() -> None:
    spec = _spec()
    ok = _values(np.random.default_rng(3))
    with pytest.raises(ss.SecureSumError, match="exceeds the secure-sum bound"):
        ss.quantise({**ok, "w": np.full((4, 3), 2.0**45)}, spec)
    with pytest.raises(ss.SecureSumError, match="non-finite"):
        ss.quantise({**ok, "w": np.full((4, 3), np.nan)}, spec)
    with pytest.raises(ss.SecureSumError, match="shape"):
        ss.quantise({**ok, "w": np.zeros(12)}, spec)
    with pytest.raises(ss.SecureSumError, match="do not match"):
        ss.quantise({"n": ok["n"]}, spec)
    with pytest.raises(ss.SecureSumError, match="non-integer"):
        ss.quantise({**ok, "n": np.asarray(1.5)}, spec)
    with pytest.raises(MaskError, match="not a participant"):
        ss.mask_values(
            ok, "bank-z", _key("z"), {**ROSTER, "bank-z": _pub(_key("z"))}, _spec(names=NAMES)
        )
    with pytest.raises(MaskError, match="not in the pinned roster"):
        ss.mask_values(ok, "bank-a", KEYS["bank-a"], {"bank-a": ROSTER["bank-a"]}, spec)
    with pytest.raises(MaskError, match="not this platform's key"):
        ss.mask_values(ok, "bank-a", _key("other"), ROSTER, spec)
    with pytest.raises(ValidationError, match="no room"):
        _spec(
            names=[*NAMES, "bank-d", "bank-e"],
            fields=[ss.SumField(name="v", shape=(1,), bound_bits=60)],
        )
    with pytest.raises(ValidationError):
        _spec(names=["bank-a"])
    content = RecordDict()
    ss.attach_spec(content, spec)
    assert ss.spec_of(content, "train") == spec
    content.config_records[ss.SPEC_KEY]["spec"] = b'{"session_id": 1}'
    with pytest.raises(ss.SecureSumError, match="spec refused"):
        ss.spec_of(content, "train")


def test_secure_fedavg_equals_flower_fedavg_within_the_quantisation_error() -> None:
    """The same three platform updates, aggregated by Flower's FedAvg and by secure sums."""
    from fedcredit.inprocess import InProcessGrid
    from server.secure_aggregation import SecureFedAvg, SecureRounds

    InProcessGrid(None, 0)  # type: ignore[arg-type]  # sets the task identity messages need
    rng = np.random.default_rng(4)
    shapes = {"0.weight": (16, 20), "0.bias": (16,), "2.weight": (1, 16), "2.bias": (1,)}
    updates = {
        n: {k: rng.normal(0, 0.5, size=s).astype(np.float32) for k, s in shapes.items()}
        for n in NAMES
    }
    rows = {"bank-a": 40_000, "bank-b": 25_000, "bank-c": 9_000}
    nodes = {1000 + i: n for i, n in enumerate(NAMES)}

    def reply(node: int, content: RecordDict) -> Message:
        msg = Message(content, dst_node_id=node, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    plain_replies = [
        reply(
            node,
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in updates[n].items()}),
                    "metrics": MetricRecord({"num-examples": rows[n], "train-loss": 0.5}),
                }
            ),
        )
        for node, n in nodes.items()
    ]
    plain, _ = FedAvg().aggregate_train(1, plain_replies)

    initial = ArrayRecord({k: Array(np.zeros(s, dtype=np.float32)) for k, s in shapes.items()})
    strategy = SecureFedAvg(SecureRounds(None, nodes, 10.0), "lr-local")  # type: ignore[arg-type]
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), None))  # type: ignore[arg-type]
    spec = ss.spec_of(sent[0].content, "train")
    assert spec is not None and spec.participants == tuple(sorted(NAMES))
    for k, msg in enumerate(sent):  # as a grid's push does: replies are matched on these ids
        msg.metadata.__dict__["_message_id"] = f"train-{k}"
    to = {msg.metadata.dst_node_id: msg for msg in sent}

    def answer(node: int, content: RecordDict) -> Message:
        msg = Message(content, reply_to=to[node])
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    secure_replies = [
        answer(
            node,
            ss.reply_content(
                spec,
                ss.mask_values(ts.train_values(updates[n], rows[n], 0.5), n, KEYS[n], ROSTER, spec),
            ),
        )
        for node, n in nodes.items()
    ]
    secure, metrics = strategy.aggregate_train(1, secure_replies)
    assert metrics["num-examples"] == sum(rows.values())
    n_total = sum(rows.values())
    tolerance = spec.error_bound(ts.WEIGHT_PREFIX + "0.weight") / n_total
    for k in shapes:
        a, b = plain[k].numpy(), secure[k].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape
        # float32 storage dominates: the secure sum's own error is ~1e-10 here
        assert np.max(np.abs(a - b)) <= tolerance + 2 * np.finfo(np.float32).eps * np.abs(a).max()


def test_packed_counts_sum_exactly_in_half_the_words() -> None:
    """Two counts to a word: the halves sum without a carry, so the counts come back exact;
    negative, fractional or too-wide counts are refused, and so is a spec whose summed
    halves could overflow."""
    rng = np.random.default_rng(7)
    packed = [
        ss.SumField(name="g", shape=(2, 5), bound_bits=24),
        ss.SumField(name="count", shape=(2, 5), bound_bits=24, integer=True, packed=True),
        ss.SumField(name="hist", shape=(7,), bound_bits=24, integer=True, packed=True),
    ]
    spec = _spec(fields=packed)
    assert spec.count == 10 + 5 + 4 + 1  # odd sizes take a half word of padding
    values = {
        n: {
            "g": rng.normal(0, 100, (2, 5)),
            "count": rng.integers(0, 2**24, (2, 5)).astype(float),
            "hist": rng.integers(0, 2**24, 7).astype(float),
        }
        for n in NAMES
    }
    masked = _masked(spec, values)
    total = ss.unmask_sum(list(masked.values()), spec)
    for name in ("count", "hist"):
        assert np.array_equal(total[name], sum(values[n][name] for n in NAMES)), name
        assert spec.error_bound(name) == 0.0
    assert np.allclose(total["g"], sum(values[n]["g"] for n in NAMES))
    # The same words whichever way the platform quantises.
    assert np.array_equal(
        ss.quantise(values["bank-a"], spec), ss._quantise_by_field(values["bank-a"], spec)
    )
    for bad, reason in (
        (-values["bank-a"]["count"], "negative"),
        (values["bank-a"]["count"] + 0.5, "non-integer"),
        (values["bank-a"]["count"] * 2**8, "exceeds"),
    ):
        with pytest.raises(ss.SecureSumError, match=reason):
            ss.quantise({**values["bank-a"], "count": bad}, spec)
    with pytest.raises(ValidationError, match="packed half"):
        names = [f"p{i:02d}" for i in range(64)]
        ss.SecureSumSpec.fresh(
            "s", "r", "train", names, [packed[1].model_copy(update={"bound_bits": 27})]
        )
    with pytest.raises(ValidationError, match="integer fields can be packed"):
        ss.SumField(name="g", shape=(2,), bound_bits=24, packed=True)
