"""Pairwise additive masks: cancellation in the full sum only, uniformity, context binding."""

from __future__ import annotations

import hashlib
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocols.masking import (
    MaskContext,
    MaskError,
    add_masks,
    pair_mask,
    pairwise_secret,
    platform_mask,
)

# A fixed 2048-bit odd modulus: masking needs no factorisation, only n.
N = int.from_bytes(hashlib.sha512(b"n1").digest() * 4, "big") | 1 | (1 << 2047)
QUERY = "0123456789abcdef0123456789abcdef"


def _key(seed: str) -> X25519PrivateKey:
    """Deterministic keys, so the statistical checks below are reproducible, never flaky."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest())


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _federation(k: int, tag: str = "") -> tuple[list[str], dict[str, X25519PrivateKey]]:
    names = [f"p{i:02d}" for i in range(k)]
    return names, {n: _key(tag + n) for n in names}


def _ctx(names: list[str], count: int = 5, query: str = QUERY, modulus: int = N) -> MaskContext:
    return MaskContext(
        session_id="s1",
        query_id=query,
        participants=tuple(names),
        key_id="k1",
        count=count,
        modulus=modulus,
    )


def _masks(names, keys, ctx, roster=None) -> dict[str, list[int]]:
    roster = roster or {n: _pub(k) for n, k in keys.items()}
    return {n: platform_mask(n, keys[n], roster, ctx) for n in ctx.participants}


def _sum(vectors) -> list[int]:
    vectors = list(vectors)
    return [sum(col) % N for col in zip(*vectors, strict=True)]


@pytest.mark.parametrize("k", [3, 4, 7])
def test_masks_of_all_participants_cancel(k: int) -> None:
    names, keys = _federation(k)
    ctx = _ctx(names)
    masks = _masks(names, keys, ctx)
    assert _sum(masks.values()) == [0] * ctx.count
    for m in masks.values():
        assert all(0 <= v < N for v in m) and all(v != 0 for v in m)
    # and the masked plaintexts sum to the plaintext sum
    plain = {n: [i * 1000 + j for j in range(ctx.count)] for i, n in enumerate(names)}
    masked = [add_masks(plain[n], masks[n], N) for n in names]
    assert _sum(masked) == _sum(plain.values())


def test_participant_order_does_not_matter() -> None:
    names, keys = _federation(4)
    a = _masks(names, keys, _ctx(names))
    b = _masks(names, keys, _ctx(list(reversed(names))))
    assert a == b


def test_strict_subsets_do_not_cancel() -> None:
    names, keys = _federation(4)
    masks = _masks(names, keys, _ctx(names))
    for drop in names:
        assert all(v != 0 for v in _sum(m for n, m in masks.items() if n != drop))
    assert all(v != 0 for v in _sum([masks["p00"], masks["p01"]]))


def _chi_square_top_bits(values: list[int], buckets: int = 16) -> float:
    counts = [0] * buckets
    for v in values:
        counts[v * buckets // N] += 1
    expected = len(values) / buckets
    return sum((c - expected) ** 2 / expected for c in counts)


def test_subset_sums_and_single_masks_look_uniform() -> None:
    # Keys and query are fixed, so this is deterministic; a correct construction passes with a
    # huge margin (chi-square, 15 degrees of freedom: 99.99th percentile about 44), a broken
    # one (e.g. a missing reduction or a zero pair mask) fails completely.
    names, keys = _federation(4, tag="uniform")
    ctx = _ctx(names, count=4000)
    masks = _masks(names, keys, ctx)
    subset = _sum(masks[n] for n in names[:3])
    single = masks["p01"]
    for values in (subset, single):
        assert _chi_square_top_bits(values) < 60
        assert len(set(values)) == len(values)
        low_bits = sum(v & 1 for v in values)
        assert 1700 < low_bits < 2300
    # and a plaintext of all zeros masked by one platform is indistinguishable in these terms
    masked = add_masks([0] * ctx.count, single, N)
    assert _chi_square_top_bits(masked) < 60


def test_masks_depend_on_query_participants_and_context() -> None:
    names, keys = _federation(4)
    base = _masks(names, keys, _ctx(names))
    other_query = _masks(names, keys, _ctx(names, query="f" * 32))
    assert all(base[n] != other_query[n] for n in names)
    smaller = _masks(names[:3], keys, _ctx(names[:3]))
    assert all(base[n] != smaller[n] for n in names[:3])
    other_n = _masks(names, keys, _ctx(names, modulus=N - 2))
    assert all(base[n] != other_n[n] for n in names)
    shared = pairwise_secret(keys["p00"], _pub(keys["p01"]))
    ctx = _ctx(names)
    assert pair_mask(shared, ctx, "p00", "p01") != pair_mask(shared, ctx, "p00", "p02")
    # both sides of a pair derive the same values
    assert pairwise_secret(keys["p01"], _pub(keys["p00"])) == shared


def test_context_mismatch_between_platforms_breaks_cancellation() -> None:
    names, keys = _federation(3)
    masks = _masks(names, keys, _ctx(names))
    masks["p02"] = _masks(names, keys, _ctx(names, query="e" * 32))["p02"]
    assert all(v != 0 for v in _sum(masks.values()))


def test_substituted_peer_key_breaks_cancellation() -> None:
    names, keys = _federation(3)
    roster = {n: _pub(k) for n, k in keys.items()}
    ctx = _ctx(names)
    masks = _masks(names, keys, ctx)
    evil = dict(roster, p01=_pub(_key("mallory")))
    masks["p00"] = platform_mask("p00", keys["p00"], evil, ctx)
    assert all(v != 0 for v in _sum(masks.values()))


def test_platform_mask_errors() -> None:
    names, keys = _federation(3)
    roster = {n: _pub(k) for n, k in keys.items()}
    ctx = _ctx(names)
    with pytest.raises(MaskError, match="'zz' is not a participant"):
        platform_mask("zz", keys["p00"], roster, ctx)
    with pytest.raises(MaskError, match="not in the pinned roster: p02"):
        platform_mask("p00", keys["p00"], {k: v for k, v in roster.items() if k != "p02"}, ctx)
    with pytest.raises(MaskError, match="not this platform's key"):
        platform_mask("p00", keys["p01"], roster, ctx)
    with pytest.raises(MaskError, match="small order"):
        platform_mask("p00", keys["p00"], dict(roster, p01=bytes(32)), ctx)
    with pytest.raises(MaskError, match="32 bytes"):
        pairwise_secret(keys["p00"], b"short")
    with pytest.raises(MaskError, match="ordered"):
        pair_mask(b"\x01" * 32, ctx, "p01", "p00")
    with pytest.raises(MaskError, match="not a participant"):
        pair_mask(b"\x01" * 32, ctx, "p00", "zz")
    with pytest.raises(ValidationError, match="duplicate participant"):
        _ctx(["a", "b", "a"])
    with pytest.raises(ValidationError):
        _ctx(["a"])
    with pytest.raises(MaskError, match="3 plaintexts but 2 masks"):
        add_masks([1, 2, 3], [1, 2], N)
    with pytest.raises(MaskError, match="plaintext 0"):
        add_masks([N], [1], N)


def test_canonical_bytes_are_deterministic() -> None:
    a = _ctx(["b", "a"]).canonical_bytes()
    assert a == _ctx(["a", "b"]).canonical_bytes()
    assert b'"participants":["a","b"]' in a


_FIELDS = ["session_id", "query_id", "participants", "key_id", "count", "modulus"]
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**64), max_value=2**3000),
    st.text(max_size=40),
    st.from_regex(r"\A[0-9a-f]{32}\Z"),
    st.lists(st.text(max_size=8), max_size=5),
    st.lists(st.from_regex(r"\A[a-c]{1,2}\Z"), max_size=5).map(tuple),
    st.floats(allow_nan=True),
)


def _mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """The valid strategy three times in four, anything else otherwise."""
    return st.integers(0, 3).flatmap(lambda i: _values if i == 0 else valid)


_near_valid = st.fixed_dictionaries(
    {
        "session_id": _mostly(st.text(min_size=1, max_size=20)),
        "query_id": _mostly(st.from_regex(r"\A[0-9a-f]{32}\Z")),
        "participants": _mostly(
            st.lists(st.from_regex(r"\A[A-Za-z0-9_.-]{1,4}\Z"), min_size=2, max_size=6)
        ),
        "key_id": _mostly(st.text(min_size=1, max_size=20)),
        "count": _mostly(st.integers(min_value=-1, max_value=2_000_000)),
        "modulus": _mostly(st.integers(min_value=-1, max_value=2**2100)),
    },
    optional={"extra": _values},
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.dictionaries(
            st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6)), _values, max_size=8
        ),
        _near_valid,
    )
)
def test_mask_context_validation_from_arbitrary_dicts(doc: dict) -> None:
    try:
        ctx = MaskContext.model_validate(doc)
    except ValidationError:
        return
    assert set(doc) == set(_FIELDS)
    assert re.fullmatch(r"[0-9a-f]{32}", ctx.query_id)
    assert len(ctx.participants) >= 2 and len(set(ctx.participants)) == len(ctx.participants)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", p) for p in ctx.participants)
    assert isinstance(ctx.count, int) and ctx.count >= 1
    assert isinstance(ctx.modulus, int) and ctx.modulus > 1
    assert ctx.session_id and ctx.key_id
    ctx.canonical_bytes()
