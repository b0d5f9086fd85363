"""DJN short-exponent obfuscators: correct, interchangeable with plain ones, switchable, cached."""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Iterator

import gmpy2
import pytest
from phe.paillier import EncryptedNumber, PaillierPrivateKey, PaillierPublicKey

from protocols import paillier as P


@pytest.fixture(scope="module")
def keys1024() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    return P.generate_keypair(1024, allow_insecure_test_size=True)


@pytest.fixture(scope="module")
def other_keys1024() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    return P.generate_keypair(1024, allow_insecure_test_size=True)


@pytest.fixture(autouse=True)
def _default_switch_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends with the shipped default, whatever the environment says."""
    monkeypatch.delenv(P.OBFUSCATION_ENV, raising=False)
    P.set_default_obfuscation(None)
    yield
    P.set_default_obfuscation(None)


def _extremes(pk: PaillierPublicKey, k: int = 20) -> list[int]:
    return [0, 1, pk.n - 1, pk.n // 2, *(secrets.randbelow(pk.n) for _ in range(k))]


@pytest.mark.parametrize("mode", ["djn", "plain"])
@pytest.mark.parametrize("workers", [1, 2])
def test_both_obfuscations_round_trip(keys1024, mode, workers) -> None:
    pk, sk = keys1024
    ms = _extremes(pk, 40)
    cts = P.encrypt_plaintexts(pk, ms, workers=workers, obfuscation=mode)
    assert P.decrypt_plaintexts(sk, cts, workers=1) == ms
    assert P.decrypt_plaintexts(sk, cts, workers=2) == ms
    # Ordinary Paillier ciphertexts: phe decrypts them too (raw: phe's decoder would call
    # values above n/3 overflows; small ones go through its full decrypt).
    assert [sk.raw_decrypt(c) for c in cts] == ms
    (c,) = P.encrypt_plaintexts(pk, [123_456], workers=1, obfuscation=mode)
    assert sk.decrypt(EncryptedNumber(pk, c, 0)) == 123_456


def test_djn_ciphertexts_are_units_and_randomised(keys1024) -> None:
    pk, sk = keys1024
    cts = P.encrypt_plaintexts(pk, [7] * 50, workers=2, obfuscation="djn")
    assert len(set(cts)) == 50
    for c in cts:
        assert 0 < c < pk.nsquare and math.gcd(c, pk.n) == 1
    # They pass the wire validation both ways.
    blob = P.ciphertexts_to_bytes(pk, cts)
    assert P.ciphertexts_from_bytes(pk, blob, 50) == cts
    assert set(P.decrypt_plaintexts(sk, cts)) == {7}


def test_homomorphic_sum_across_djn_plain_and_pool(keys1024) -> None:
    pk, sk = keys1024
    k = 9
    inputs = [[secrets.randbelow(pk.n) for _ in range(k)] for _ in range(4)]
    pool = P.ObfuscatorPool(pk, obfuscation="djn")
    pool.fill(5, workers=1)
    per_platform = [
        P.encrypt_plaintexts(pk, inputs[0], workers=1, obfuscation="djn"),
        P.encrypt_plaintexts(pk, inputs[1], workers=2, obfuscation="plain"),
        pool.encrypt(inputs[2], workers=1),  # 5 precomputed, 4 computed on the spot
        P.ObfuscatorPool(pk, obfuscation="plain").encrypt(inputs[3], workers=1),
    ]
    total = P.decrypt_plaintexts(sk, P.add_ciphertexts(pk, per_platform))
    assert total == [sum(col) % pk.n for col in zip(*inputs, strict=True)]


def test_table_power_matches_powmod(keys1024) -> None:
    pk, _ = keys1024
    table = P.djn_table(pk)
    assert table.alpha_bits == 512 and table.window_bits == P.DJN_WINDOW_BITS == 8
    assert table.digits == 64 and len(table.rows) == 64
    nsq = int(pk.nsquare)
    w = table.window_bits
    for alpha in (0, 1, 255, 256, (1 << 512) - 1, secrets.randbits(512)):
        digits = [(alpha >> (w * i)) & ((1 << w) - 1) for i in range(table.digits)]
        assert table.power(digits) == gmpy2.powmod(table.h_s, alpha, nsq)
    # 64 rows of 256 entries of 128 bytes (n**2 is 2048 bits) at least.
    assert table.build_seconds > 0 and table.nbytes > 64 * 256 * 128


def test_other_window_sizes(keys1024) -> None:
    pk, sk = keys1024
    table = P.DJNTable(int(pk.n), window_bits=5)
    assert table.digits == math.ceil(512 / 5)
    alpha = secrets.randbits(512)
    digits = [(alpha >> (5 * i)) & 31 for i in range(table.digits)]
    assert table.power(digits) == gmpy2.powmod(table.h_s, alpha, int(pk.nsquare))
    with P._release_gil():
        obfs = [int(s) for s in table.obfuscators(5)]
    assert P.decrypt_plaintexts(sk, [int(table.h_s), *obfs]) == [0] * 6
    with pytest.raises(ValueError, match="window_bits"):
        P.DJNTable(int(pk.n), window_bits=0)


def test_table_cache_per_key_and_lru(keys1024, other_keys1024, monkeypatch) -> None:
    (pk_a, sk_a), (pk_b, sk_b) = keys1024, other_keys1024
    ta, tb = P.djn_table(pk_a), P.djn_table(pk_b)
    assert ta is not tb and ta.n == pk_a.n and tb.n == pk_b.n
    assert P.djn_table(pk_a) is ta  # cached
    for pk, sk in ((pk_a, sk_a), (pk_b, sk_b)):
        ms = _extremes(pk, 5)
        assert P.decrypt_plaintexts(sk, P.encrypt_plaintexts(pk, ms, obfuscation="djn")) == ms
    # The cache is an LRU: with room for one key, switching keys rebuilds.
    monkeypatch.setattr(P, "DJN_TABLE_CACHE_SIZE", 1)
    assert P.djn_table(pk_a) is ta
    assert P.djn_table(pk_b) is not tb  # tb was evicted by the touch of pk_a above
    assert P.djn_table(pk_a) is not ta


def test_concurrent_first_use_builds_one_table(monkeypatch) -> None:
    pk, _ = P.generate_keypair(1024, allow_insecure_test_size=True)
    built: list[int] = []
    real = P.DJNTable

    def counting(n: int, **kw: int) -> P.DJNTable:
        built.append(n)
        return real(n, **kw)

    monkeypatch.setattr(P, "DJNTable", counting)
    got: list[P.DJNTable] = []
    threads = [threading.Thread(target=lambda: got.append(P.djn_table(pk))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len({id(t) for t in got}) == 1


def test_switch_per_call_per_process_and_env(keys1024, monkeypatch) -> None:
    pk, sk = keys1024
    used: list[str] = []
    real_table = P.djn_table

    def spy(pk_: PaillierPublicKey, **kw: int) -> P.DJNTable:
        used.append("djn")
        return real_table(pk_, **kw)

    monkeypatch.setattr(P, "djn_table", spy)
    assert P.DEFAULT_OBFUSCATION == "djn" == P.get_default_obfuscation()
    P.encrypt_plaintexts(pk, [1], workers=1)
    assert used == ["djn"]
    P.encrypt_plaintexts(pk, [1], workers=1, obfuscation="plain")
    assert used == ["djn"]

    P.set_default_obfuscation("plain")
    assert P.get_default_obfuscation() == "plain"
    cts = P.encrypt_plaintexts(pk, [3, 4], workers=1)
    assert used == ["djn"] and P.decrypt_plaintexts(sk, cts) == [3, 4]
    P.encrypt_plaintexts(pk, [1], workers=1, obfuscation="djn")  # explicit beats default
    assert used == ["djn", "djn"]
    assert P.ObfuscatorPool(pk).obfuscation == "plain"
    P.set_default_obfuscation(None)

    monkeypatch.setenv(P.OBFUSCATION_ENV, "PLAIN")
    assert P.get_default_obfuscation() == "plain"
    P.set_default_obfuscation("djn")  # the in-process switch beats the environment
    assert P.get_default_obfuscation() == "djn"
    P.set_default_obfuscation(None)
    monkeypatch.setenv(P.OBFUSCATION_ENV, "fast")
    with pytest.raises(ValueError, match=P.OBFUSCATION_ENV):
        P.encrypt_plaintexts(pk, [1], workers=1)
    monkeypatch.delenv(P.OBFUSCATION_ENV)

    for bad in ("DJN", "", None.__class__.__name__, 1):
        with pytest.raises(ValueError, match="obfuscation must be one of"):
            P.encrypt_plaintexts(pk, [1], workers=1, obfuscation=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="obfuscation must be one of"):
        P.set_default_obfuscation("rsa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plaintext 0"):
        P.encrypt_plaintexts(pk, [pk.n], workers=1, obfuscation="djn")


def test_obfuscator_pool_hands_out_each_once(keys1024) -> None:
    pk, sk = keys1024
    pool = P.ObfuscatorPool(pk, obfuscation="djn")
    assert len(pool) == 0
    pool.fill(40, workers=2)
    assert len(pool) == 40
    taken: list[list[int]] = []
    lock = threading.Lock()

    def grab() -> None:
        got = pool.take(7, workers=1)
        with lock:
            taken.append(got)

    threads = [threading.Thread(target=grab) for _ in range(6)]  # 42 > 40: 2 made fresh
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [s for got in taken for s in got]
    assert len(flat) == 42 and len(set(flat)) == 42 and len(pool) == 0
    # Obfuscators are encryptions of zero with no plaintext term.
    assert set(P.decrypt_plaintexts(sk, flat)) == {0}
    pool.fill(3, workers=1)
    seen: list[int] = []
    ms = _extremes(pk, 30)
    cts = pool.encrypt(ms, workers=2, progress=seen.append)
    assert P.decrypt_plaintexts(sk, cts) == ms and sum(seen) == len(ms) and len(pool) == 0
    with pytest.raises(ValueError):
        pool.fill(-1)
    with pytest.raises(ValueError, match="plaintext 1"):
        pool.encrypt([1, -1])


def test_decryption_identical_to_phe_on_arbitrary_units(keys1024) -> None:
    """Our CRT decryption returns exactly what phe's raw_decrypt returns, for any unit."""
    pk, sk = keys1024
    cts = []
    while len(cts) < 30:
        c = secrets.randbelow(pk.nsquare)
        if c and math.gcd(c, pk.n) == 1:
            cts.append(c)
    assert P.decrypt_plaintexts(sk, cts, workers=2) == [sk.raw_decrypt(c) for c in cts]
    assert P.decrypt_plaintexts(sk, []) == []
    for call in (
        lambda: P.decrypt_plaintexts(sk, [], workers=0),
        lambda: P.encrypt_plaintexts(pk, [], workers=0),
    ):
        with pytest.raises(ValueError, match="workers"):
            call()


def test_2048_bit_djn_round_trip() -> None:
    pk, sk = P.generate_keypair(2048)
    table = P.djn_table(pk)
    assert (table.alpha_bits, table.digits, table.key_bits) == (1024, 128, 2048)
    ms = _extremes(pk, 10)
    cts = P.encrypt_plaintexts(pk, ms, workers=2, obfuscation="djn")
    assert P.decrypt_plaintexts(sk, cts) == ms
    assert len(set(P.encrypt_plaintexts(pk, [0, 0], workers=1))) == 2


def test_bench_reports_both_modes_and_decryption(monkeypatch) -> None:
    """The benchmark's JSON carries both modes and decryption; sizes shrunk to stay fast."""
    from fedcredit.bench import paillier_speed as B

    monkeypatch.setattr(B, "RATE_SECONDS", 0.01)
    monkeypatch.setattr(B, "RATE_REPEATS", 1)
    monkeypatch.setattr(B, "DECRYPT_SAMPLE_PER_WORKER", 4)
    monkeypatch.setattr(B, "BASELINE_SAMPLE_VALUES", 4)
    out = B.run(2048, tokens=40, workers=2)
    assert out["decrypts_correctly"] is True and out["obfuscation"] == "djn"
    for key in ("ciphertexts_per_s", "ciphertexts_per_s_per_worker", "tokens_per_s", "ratio"):
        assert out[key] > 0  # the keys that existed before the modes were added
    rates = out["encryption_rates"]
    for mode in ("djn", "plain"):
        assert rates[mode]["ciphertexts_per_s_per_core"] > 0
        assert rates[mode]["ciphertexts_per_s"] > 0 and rates[mode]["workers"] == 2
    assert rates["djn"]["alpha_bits"] == 1024 and rates["djn"]["window_bits"] == 8
    assert rates["djn"]["table_build_s"] > 0 and rates["djn"]["table_mb"] > 0
    assert out["decryption"]["plaintexts_per_s_per_core"] > 0
    assert B.run(2048, tokens=40, workers=1, obfuscation="plain")["obfuscation"] == "plain"


def test_measure_encryption_rate(keys1024) -> None:
    from fedcredit.bench.paillier_speed import measure_encryption_rate

    pk, _ = keys1024
    for mode in ("djn", "plain"):
        assert measure_encryption_rate(pk, 5, obfuscation=mode, workers=1) > 0
    with pytest.raises(ValueError, match="count"):
        measure_encryption_rate(pk, 0)
