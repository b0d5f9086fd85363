"""Paillier layer: correct, randomised, parallel, and hostile input refused at the boundary."""

from __future__ import annotations

import secrets

import gmpy2
import numpy as np
import pytest
from phe.paillier import EncryptedNumber, PaillierPrivateKey, PaillierPublicKey

from protocols import paillier as P
from protocols.packing import DEBT_PROFILE_LAYOUT as L


@pytest.fixture(scope="module")
def keys1024() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    return P.generate_keypair(1024, allow_insecure_test_size=True)


@pytest.fixture(scope="module")
def keys2048() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    return P.generate_keypair(2048)


def test_key_sizes() -> None:
    for bits in (512, 1024, 1536, 4096):
        with pytest.raises(ValueError, match="not allowed"):
            P.generate_keypair(bits)
    with pytest.raises(ValueError):
        P.generate_keypair(512, allow_insecure_test_size=True)


def test_round_trip_and_extremes(keys1024) -> None:
    pk, sk = keys1024
    ms = [0, 1, 2**64, pk.n - 1, *(secrets.randbelow(pk.n) for _ in range(20))]
    cts = P.encrypt_plaintexts(pk, ms, workers=1)
    assert P.decrypt_plaintexts(sk, cts, workers=1) == ms
    assert P.decrypt_plaintexts(sk, cts, workers=2) == ms


def test_compatible_with_phe(keys1024) -> None:
    """Our ciphertexts are phe's: phe decrypts ours, and ours decrypt phe's (exponent 0)."""
    pk, sk = keys1024
    (c,) = P.encrypt_plaintexts(pk, [123_456_789], workers=1)
    assert sk.decrypt(EncryptedNumber(pk, c, 0)) == 123_456_789
    enc = pk.encrypt(987_654)
    assert enc.exponent == 0
    assert P.decrypt_plaintexts(sk, [enc.ciphertext(be_secure=False)]) == [987_654]


@pytest.mark.parametrize("bad", [-1, "n", 1.0, 2.5, True, None])
def test_plaintext_must_be_an_integer_in_range(keys1024, bad) -> None:
    pk, _ = keys1024
    value = pk.n if bad == "n" else bad
    with pytest.raises(ValueError, match="plaintext 1"):
        P.encrypt_plaintexts(pk, [5, value], workers=1)


def test_equal_plaintexts_give_different_ciphertexts(keys1024) -> None:
    pk, sk = keys1024
    cts = P.encrypt_plaintexts(pk, [42] * 40, workers=2)
    assert len(set(cts)) == 40
    assert set(P.decrypt_plaintexts(sk, cts)) == {42}


def test_parallel_and_inline_agree_and_report_progress(keys1024) -> None:
    pk, sk = keys1024
    ms = [secrets.randbelow(pk.n) for _ in range(70)]
    seen: list[int] = []
    par = P.encrypt_plaintexts(pk, ms, workers=2, progress=seen.append)
    assert sum(seen) == 70 and len(seen) > 1
    seen.clear()
    inline = P.encrypt_plaintexts(pk, ms, workers=1, progress=seen.append)
    assert sum(seen) == 70
    assert P.decrypt_plaintexts(sk, par) == P.decrypt_plaintexts(sk, inline, workers=1) == ms
    assert par != inline  # fresh randomness each time
    assert P.encrypt_plaintexts(pk, [], workers=2) == []
    with pytest.raises(ValueError, match="workers"):
        P.encrypt_plaintexts(pk, [1], workers=0)
    # The pool is created once and reused.
    pool = P._POOL
    P.encrypt_plaintexts(pk, ms[:40], workers=2)
    assert P._POOL is pool is not None


def test_2048_bit_64_contributors_at_max_decrypt_exactly(keys2048) -> None:
    """The no-overflow proof end to end, with a real key: every slot of 64 platforms at max."""
    pk, sk = keys2048
    tokens = L.tokens_per_plaintext(2048) + 1  # two plaintexts, the second padded
    full = np.tile(
        np.array([(1 << f.contributor_bits) - 1 for f in L.fields], dtype=np.int64), (tokens, 1)
    )
    packed = L.pack(full, 2048)
    assert len(packed) == 2
    per_platform = P.encrypt_plaintexts(pk, packed * L.max_contributors)
    per_platform_lists = [per_platform[i : i + 2] for i in range(0, len(per_platform), 2)]
    assert len(per_platform_lists) == 64
    total = P.add_ciphertexts(pk, per_platform_lists)
    back = L.unpack(P.decrypt_plaintexts(sk, total), tokens, 2048)
    expected = np.array([L.max_sum(f) for f in L.fields], dtype=np.int64)
    np.testing.assert_array_equal(back, np.tile(expected, (tokens, 1)))
    assert int(back[0, 0]) == 64 * (2**36 - 1)


def test_packed_sum_over_platforms_and_masks_cancel(keys1024) -> None:
    """Masks added to the whole packed plaintext mod n cancel in the sum (the later protocol)."""
    pk, sk = keys1024
    n = pk.n
    rng = np.random.default_rng(3)
    tokens, platforms = 40, 5
    values = [
        np.stack(
            [
                rng.integers(0, 2**36, tokens),
                rng.integers(0, 2**12, tokens),
                rng.integers(0, 2, tokens),
            ],
            axis=1,
        )
        for _ in range(platforms)
    ]
    packed = [L.pack(v, 1024) for v in values]
    k = len(packed[0])
    masks = [[secrets.randbelow(n) for _ in range(k)] for _ in range(platforms - 1)]
    masks.append([(-sum(col)) % n for col in zip(*masks, strict=True)])
    masked = [
        [(p + m) % n for p, m in zip(ps, ms, strict=True)]
        for ps, ms in zip(packed, masks, strict=True)
    ]
    cts = [P.encrypt_plaintexts(pk, m, workers=2) for m in masked]
    total = P.decrypt_plaintexts(sk, P.add_ciphertexts(pk, cts))
    np.testing.assert_array_equal(L.unpack(total, tokens, 1024), np.sum(values, axis=0))
    # One platform's masked plaintext alone is noise: it does not unpack.
    with pytest.raises(ValueError):
        L.unpack(P.decrypt_plaintexts(sk, cts[0]), tokens, 1024)


def test_add_ciphertexts_checks_lengths(keys1024) -> None:
    pk, _ = keys1024
    a = P.encrypt_plaintexts(pk, [1, 2], workers=1)
    b = P.encrypt_plaintexts(pk, [3], workers=1)
    with pytest.raises(ValueError, match="differ in length"):
        P.add_ciphertexts(pk, [a, b])
    with pytest.raises(ValueError, match="no ciphertext"):
        P.add_ciphertexts(pk, [])
    with pytest.raises(P.InvalidCiphertext, match="ciphertext 1"):
        P.add_ciphertexts(pk, [a, [a[0], 0]])


def test_ciphertext_bytes_round_trip(keys1024) -> None:
    pk, _ = keys1024
    width = P.ciphertext_width(pk)
    assert width == 256
    cts = P.encrypt_plaintexts(pk, [0, 7, 99], workers=1)
    blob = P.ciphertexts_to_bytes(pk, cts)
    assert len(blob) == 3 * width
    assert P.ciphertexts_from_bytes(pk, blob, 3) == cts
    assert P.ciphertexts_from_bytes(pk, b"", 0) == []


def test_hostile_ciphertext_blobs_are_rejected(keys1024) -> None:
    pk, sk = keys1024
    n, nsq, width = pk.n, pk.nsquare, P.ciphertext_width(pk)
    good = P.encrypt_plaintexts(pk, [1, 2], workers=1)
    blob = P.ciphertexts_to_bytes(pk, good)

    def with_second(c: int) -> bytes:
        return blob[:width] + c.to_bytes(width, "big")

    for bad_len in (blob[:-1], blob + b"\0", blob[:width]):
        with pytest.raises(P.InvalidCiphertext, match="bytes"):
            P.ciphertexts_from_bytes(pk, bad_len, 2)
    cases = {
        0: "zero",
        nsq: "not below n",
        (1 << (8 * width)) - 1: "not below n",
        sk.p: "shares a factor",
        sk.q * 12345: "shares a factor",
        n: "shares a factor",
    }
    for c, reason in cases.items():
        with pytest.raises(P.InvalidCiphertext, match=f"ciphertext 1: {reason}"):
            P.ciphertexts_from_bytes(pk, with_second(c), 2)
    with pytest.raises(P.InvalidCiphertext, match="ciphertext 0"):
        P.ciphertexts_to_bytes(pk, [0])
    with pytest.raises(P.InvalidCiphertext, match="ciphertext 2: shares a factor"):
        P.decrypt_plaintexts(sk, [*good, sk.p])
    with pytest.raises(P.InvalidCiphertext, match="not an integer"):
        P.decrypt_plaintexts(sk, [1.5])


def test_public_key_bytes_round_trip(keys1024, keys2048) -> None:
    for pk, _ in (keys1024, keys2048):
        data = P.public_key_to_bytes(pk)
        back = P.public_key_from_bytes(data)
        assert back == pk and back.g == pk.n + 1
    with pytest.raises(P.InvalidPublicKey, match="allowed sizes"):
        P.public_key_from_bytes(P.public_key_to_bytes(keys1024[0]), allow_insecure_test_size=False)
    P.public_key_from_bytes(P.public_key_to_bytes(keys2048[0]), allow_insecure_test_size=False)


def _pk_bytes(n: int, *, version: int = 1, magic: bytes = b"FCPK", declared: int | None = None):
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    length = len(body) if declared is None else declared
    return magic + bytes([version]) + length.to_bytes(2, "big") + body


def test_malformed_public_keys_are_rejected(keys1024) -> None:
    pk, sk = keys1024
    good = P.public_key_to_bytes(pk)
    big_prime = int(gmpy2.next_prime(2**1023 + 2**1000))
    half = int(gmpy2.next_prime(2**511 + 2**510))
    cases = [
        (b"", "shorter than its header"),
        (good[:5], "shorter than its header"),
        (b"XXXX" + good[4:], "magic"),
        (good[:4] + b"\x02" + good[5:], "version"),
        (good[:-1], "declares"),
        (good + b"\x01", "declares"),
        (_pk_bytes(pk.n + 1), "even"),
        (_pk_bytes(pk.n * 3), "allowed sizes"),  # 1025 or 1026 bits
        (_pk_bytes(3 * int(gmpy2.next_prime(2**1022 + 2**1000))), "small prime factor"),
        (_pk_bytes(big_prime), "prime"),
        (_pk_bytes(half * half), "square"),
        (_pk_bytes(2**1500 + 1), "allowed sizes"),
        (good[:7] + b"\x00" + good[7:-1], "leading zero"),
    ]
    for data, reason in cases:
        with pytest.raises(P.InvalidPublicKey, match=reason):
            P.public_key_from_bytes(data)
    assert issubclass(P.InvalidPublicKey, ValueError)
    assert sk.p * sk.q == pk.n
