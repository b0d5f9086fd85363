"""Commutative blinding for private matching: group, hashing, validation, wire format."""

from __future__ import annotations

import hashlib
import itertools
import secrets

import gmpy2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl import bindings as nb

from protocols import blinding as bl
from protocols.blinding import (
    ELEMENT_BYTES,
    InvalidGroupElement,
    L,
    P,
    blind,
    check_element,
    elements_from_bytes,
    elements_to_bytes,
    hash_many,
    hash_to_group,
    new_secret,
)


def _ladder(k: int, u: int) -> int | None:
    """Unclamped Montgomery ladder (RFC 7748) returning u([k]P), or None for the identity."""
    a24 = 121665
    x1, x2, z2, x3, z3 = u, 1, 0, u, 1
    swap = 0
    for t in reversed(range(k.bit_length())):
        kt = (k >> t) & 1
        swap ^= kt
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = kt
        a, b = (x2 + z2) % P, (x2 - z2) % P
        aa, bb = a * a % P, b * b % P
        e = (aa - bb) % P
        c, d = (x3 + z3) % P, (x3 - z3) % P
        da, cb = d * a % P, c * b % P
        x3 = (da + cb) ** 2 % P
        z3 = x1 * (da - cb) ** 2 % P
        x2 = aa * bb % P
        z2 = e * (aa + a24 * e) % P
    if swap:
        x2, z2 = x3, z3
    if z2 == 0:
        return None
    return x2 * pow(z2, P - 2, P) % P


def _u(element: bytes) -> int:
    return int.from_bytes(element, "little")


def _enc(u: int) -> bytes:
    return u.to_bytes(32, "little")


def test_hash_matches_libsodium_edwards_to_montgomery() -> None:
    for i in range(50):
        digest = hashlib.sha512(i.to_bytes(4, "big")).digest()
        point = nb.crypto_core_ed25519_add(
            nb.crypto_core_ed25519_from_uniform(digest[:32]),
            nb.crypto_core_ed25519_from_uniform(digest[32:]),
        )
        assert bl._edwards_to_montgomery(point) == nb.crypto_sign_ed25519_pk_to_curve25519(point)
    # and hash_to_group itself is exactly that construction
    d = hashlib.sha512(b"fedcredit/match/v1" + b"abc").digest()
    point = nb.crypto_core_ed25519_add(
        nb.crypto_core_ed25519_from_uniform(d[:32]), nb.crypto_core_ed25519_from_uniform(d[32:])
    )
    assert hash_to_group(b"abc") == nb.crypto_sign_ed25519_pk_to_curve25519(point)


def test_hash_outputs_are_in_prime_order_subgroup() -> None:
    outs = hash_many([f"token-{i}".encode() for i in range(20)], workers=1)
    assert len(set(outs)) == 20
    for e in outs:
        check_element(0, e)
        assert _ladder(L, _u(e)) is None  # [L]P is the identity
        assert _ladder(L - 1, _u(e)) == _u(e)  # [L-1]P = -P has the same u


def test_hash_is_deterministic_and_domain_separated() -> None:
    assert hash_to_group(b"x") == hash_to_group(b"x")
    assert hash_to_group(b"x") != hash_to_group(b"y")
    items = [secrets.token_bytes(20) for _ in range(700)]
    assert hash_many(items, workers=2) == hash_many(items, workers=1)


def test_commutativity_over_three_secrets_in_all_orders() -> None:
    secrets3 = [new_secret() for _ in range(3)]
    h = hash_many([b"alice", b"bob", b"carol"])
    results = set()
    for order in itertools.permutations(secrets3):
        cur = h
        for s in order:
            cur = blind(s, cur)
        results.add(tuple(cur))
    assert len(results) == 1
    # equals the product of clamped scalars applied at once
    k = 1
    for s in secrets3:
        k = k * bl.clamp(s) % L
    assert [_enc(_ladder(k, _u(e))) for e in h] == list(next(iter(results)))


def _session(ids: list[bytes], platforms: int = 3) -> list[bytes]:
    keys = [new_secret() for _ in range(platforms)]
    cur = hash_many(ids)
    for k in keys:
        cur = blind(k, cur)
    return cur


def test_same_input_same_session_equal_different_sessions_unrelated() -> None:
    ids = [b"p1", b"p2", b"p3"]
    keys = [new_secret() for _ in range(3)]
    # two platforms holding the same id, each starting the chain with its own copy
    a = hash_many([b"p2", b"zz"])
    b = hash_many([b"qq", b"p2"])
    for k in keys:
        a, b = blind(k, a), blind(k, b)
    assert a[0] == b[1]
    assert a[1] != b[0]
    s1, s2 = _session(ids), _session(ids)
    assert not set(s1) & set(s2)


def test_no_clamped_scalar_is_a_multiple_of_the_order() -> None:
    lo, hi = 2**254, 2**255
    for m in range(1, 9):
        v = m * L
        assert not (lo <= v < hi and v % 8 == 0)
    assert bl.clamp(b"\x00" * 32) == 2**254
    assert bl.clamp(b"\xff" * 32) == 2**255 - 8


def _twist_u() -> int:
    u = 2
    while True:
        rhs = (u**3 + 486662 * u * u + u) % P
        if gmpy2.legendre(rhs, P) == -1:
            return u
        u += 1


@pytest.mark.parametrize(
    ("element", "reason"),
    [
        (b"\x00" * 31, "must be 32 bytes"),
        (b"\x00" * 33, "must be 32 bytes"),
        (_enc(9)[:31] + b"\x80", "top bit set"),
        (_enc(P), "u >= p"),
        (_enc(P + 1), "u >= p"),
        (_enc(2**255 - 1), "u >= p"),
        (_enc(_twist_u()), "twist"),
        (b"\x00" * 32, "small-order"),
    ]
    + [(_enc(u), "small-order") for u in sorted(bl.SMALL_ORDER_U)],
)
def test_check_element_rejects(element: bytes, reason: str) -> None:
    with pytest.raises(InvalidGroupElement, match=reason) as info:
        check_element(7, element)
    assert "element 7" in str(info.value)
    with pytest.raises(InvalidGroupElement, match="element 1"):
        blind(new_secret(), [hash_to_group(b"ok"), element])


def test_small_order_points_really_have_small_order() -> None:
    for u in bl.SMALL_ORDER_U:
        assert _ladder(8, u) is None


def test_blind_without_validation_still_rejects_zero_output() -> None:
    with pytest.raises(InvalidGroupElement, match="element 0"):
        blind(new_secret(), [b"\x00" * 32], validate=False)
    with pytest.raises(InvalidGroupElement, match="element 0"):
        blind(new_secret(), [_enc(bl._ORDER8_A)], validate=False)


def test_blind_parallel_matches_serial_and_preserves_order() -> None:
    s = new_secret()
    h = hash_many([i.to_bytes(4, "big") for i in range(1500)])
    assert blind(s, h, workers=2) == blind(s, h, workers=1)
    bad = list(h)
    bad[1200] = _enc(P)
    bad[1400] = b"\x00" * 32
    with pytest.raises(InvalidGroupElement, match="element 1200"):
        blind(s, bad, workers=2)


def test_wire_format_roundtrip_and_errors() -> None:
    h = hash_many([b"a", b"b", b"c"])
    blob = elements_to_bytes(h)
    assert len(blob) == 3 * ELEMENT_BYTES
    assert elements_from_bytes(blob, max_count=3, what="reply") == h
    with pytest.raises(InvalidGroupElement, match="reply: length 95"):
        elements_from_bytes(blob[:-1], max_count=3, what="reply")
    with pytest.raises(InvalidGroupElement, match="reply: 3 elements, at most 2"):
        elements_from_bytes(blob, max_count=2, what="reply")
    bad = blob[:32] + _enc(1) + blob[64:]
    with pytest.raises(InvalidGroupElement, match="reply: element 1: small-order"):
        elements_from_bytes(bad, max_count=3, what="reply")
    assert elements_from_bytes(bad, max_count=3, what="reply", validate=False)[1] == _enc(1)
    assert elements_from_bytes(b"", max_count=0, what="reply") == []
    with pytest.raises(InvalidGroupElement, match="element 0"):
        elements_to_bytes([b"short"])


_SECRET = new_secret()
_VALID = hash_many([bytes([i]) for i in range(8)])


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.one_of(
        st.binary(max_size=ELEMENT_BYTES * 6 + 3),
        st.lists(
            st.one_of(st.sampled_from(_VALID), st.binary(min_size=32, max_size=32)), max_size=6
        ).map(b"".join),
    )
)
def test_arbitrary_blobs_either_blind_or_raise_invalid(blob: bytes) -> None:
    try:
        elements = elements_from_bytes(blob, max_count=5, what="blob")
        out = blind(_SECRET, elements)
    except InvalidGroupElement:
        return
    assert len(out) == len(elements)
    for i, e in enumerate(out):
        check_element(i, e)
