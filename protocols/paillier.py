"""Paillier encryption for the debt-profile query: raw integer plaintexts, parallel, validated.

Guarantees
    * Standard Paillier (Paillier 1999) with ``g = n + 1``: ``c = (1 + m*n) * r**n mod n**2``
      with a fresh uniformly random unit ``r`` from the OS CSPRNG (``secrets``) for every
      ciphertext, so equal plaintexts give unrelated ciphertexts. Semantic security (IND-CPA)
      rests on the decisional composite residuosity assumption. Keys are 2048 bits (about
      112-bit security, NIST SP 800-57) or 3072 bits (about 128-bit); 1024 bits only for tests.
    * Plaintexts are raw integers ``0 <= m < n``; ``phe``'s float/exponent encoding is never
      used (it would treat packed values above ``n/3`` as negative or overflowed). Slot bounds
      are the job of ``protocols.packing``.
    * Everything that crosses a trust boundary is validated on the way in: a public key must
      be an odd, composite, non-square modulus of an allowed size with no small factors; a
      ciphertext blob must have exactly the expected length and every ciphertext must be a
      unit mod ``n**2`` (``0 < c < n**2`` and ``gcd(c, n) = 1``). Failures name the index and
      the reason (``InvalidCiphertext``).
    * Encryption (and decryption) runs on a thread pool: ``gmpy2`` releases the GIL inside
      ``powmod`` when the thread's context has ``allow_release_gil``, which measured 2.0x on
      2 cores at 2048 bits. Threads need no pickling and no ``fork``, so this is safe inside a
      Ray actor (Flower's simulation engine) and inside the ``flwr-clientapp`` subprocess;
      releasing the GIL also keeps Flower's gRPC threads responsive during a long encryption.

Assumes
    * The decryption-key holder generated ``n = p*q`` honestly (``generate_keypair``). Nothing
      here proves that a received ``n`` is well formed; the checks only reject garbage.
    * The platform's OS random source is sound.
    * Honest-but-curious parties, as in MISSION.md: the key holder decrypts only sums, whose
      individual terms are hidden by additive masks (a later protocol step, applied to the
      whole packed plaintext mod n).

Does not protect
    * Integrity: Paillier is malleable. Anyone with the public key can add to, scale or
      replace ciphertexts; authenticity comes from TLS and node authentication, not from here.
    * Truthfulness: a lying platform can encrypt any plaintext below n and so shift any total
      by any amount. ``SlotLayout.unpack`` catches only sums impossible for honest inputs;
      preventing it would need zero-knowledge range proofs.
    * Chosen-ciphertext attacks (Paillier is not IND-CCA): the key holder must not act as a
      decryption oracle for arbitrary ciphertexts.
    * Side channels: GMP's ``mpz_powm`` is not constant-time; timing on the encrypting or
      decrypting machine is out of scope.
    * Metadata: the number of ciphertexts reveals the number of tokens asked about (to within
      one plaintext's worth), and a message's size reveals the key size.

Not used, deliberately: the Damgard-Jurik-Nielsen short-exponent variant (``(h**n)**x`` with
a short ``x``) would be several times faster but rests on an additional assumption about
short exponents; plain standard encryption, parallelised, is the safe default.
"""

from __future__ import annotations

import atexit
import logging
import math
import operator
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import gmpy2
from phe import paillier
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

__all__ = [
    "ALLOWED_KEY_BITS",
    "INSECURE_TEST_KEY_BITS",
    "InvalidCiphertext",
    "InvalidPublicKey",
    "PaillierPrivateKey",
    "PaillierPublicKey",
    "add_ciphertexts",
    "ciphertext_width",
    "ciphertexts_from_bytes",
    "ciphertexts_to_bytes",
    "decrypt_plaintexts",
    "encrypt_plaintexts",
    "generate_keypair",
    "public_key_from_bytes",
    "public_key_to_bytes",
]

log = logging.getLogger(__name__)

ALLOWED_KEY_BITS = (2048, 3072)
INSECURE_TEST_KEY_BITS = 1024

# Public-key wire format: magic, format version, length of n in bytes, n big-endian. Only n is
# carried: g is always n + 1 (as phe constructs it), so a hostile g cannot even be expressed.
_PK_MAGIC = b"FCPK"
_PK_VERSION = 1
_PK_HEADER = struct.Struct(">4sBH")

# Product of the primes below 10,000: one gcd rejects any modulus with a small factor.
_SMALL_PRIMES_PRODUCT = math.prod(p for p in range(2, 10_000) if gmpy2.is_prime(p))

# Ciphertexts per task handed to the pool: small enough for smooth progress and load balance,
# large enough that task overhead (microseconds) is nothing next to one powmod (~12 ms).
_CHUNK = 16


class InvalidCiphertext(ValueError):
    """A ciphertext (or blob of them) that must not be used: names the index and reason."""


class InvalidPublicKey(ValueError):
    """Bytes that do not encode an acceptable Paillier public key."""


# ---------------------------------------------------------------------------------- keys


def generate_keypair(
    bits: int = 2048, *, allow_insecure_test_size: bool = False
) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """A fresh key pair with an ``n`` of exactly ``bits`` bits (2048 or 3072).

    1024 bits is accepted only with ``allow_insecure_test_size`` so that tests run fast
    without any production path being able to ask for a breakable key.
    """
    if bits not in ALLOWED_KEY_BITS and not (
        allow_insecure_test_size and bits == INSECURE_TEST_KEY_BITS
    ):
        raise ValueError(
            f"key size {bits} not allowed: use one of {ALLOWED_KEY_BITS} "
            f"({INSECURE_TEST_KEY_BITS} only with allow_insecure_test_size=True, for tests)"
        )
    t0 = time.perf_counter()
    pk, sk = paillier.generate_paillier_keypair(n_length=bits)
    log.info("generated a %d-bit Paillier key in %.2f s", bits, time.perf_counter() - t0)
    return pk, sk


def public_key_to_bytes(pk: PaillierPublicKey) -> bytes:
    """Self-describing bytes of a public key (``n`` only; ``g = n + 1`` is implied)."""
    n = int(pk.n)
    nbytes = (n.bit_length() + 7) // 8
    return _PK_HEADER.pack(_PK_MAGIC, _PK_VERSION, nbytes) + n.to_bytes(nbytes, "big")


def public_key_from_bytes(
    data: bytes, *, allow_insecure_test_size: bool = True
) -> PaillierPublicKey:
    """Parse and validate a public key received from another party.

    Rejected (``InvalidPublicKey``): wrong magic, version or length; a non-canonical
    encoding; an even, prime, square or small-factored ``n``; a size outside 2048/3072 bits
    (1024 is accepted, with a warning, unless ``allow_insecure_test_size=False``: production
    callers should pass False).
    """
    data = bytes(data)
    if len(data) < _PK_HEADER.size:
        raise InvalidPublicKey(f"public key is {len(data)} bytes, shorter than its header")
    magic, version, nbytes = _PK_HEADER.unpack_from(data)
    if magic != _PK_MAGIC:
        raise InvalidPublicKey(f"not a fedcredit Paillier public key (magic {magic!r})")
    if version != _PK_VERSION:
        raise InvalidPublicKey(f"unsupported public key format version {version}")
    body = data[_PK_HEADER.size :]
    if len(body) != nbytes:
        raise InvalidPublicKey(f"public key declares {nbytes} bytes of n but carries {len(body)}")
    if nbytes == 0 or body[0] == 0:
        raise InvalidPublicKey("public key modulus is not canonically encoded (leading zero)")
    n = int.from_bytes(body, "big")
    bits = n.bit_length()
    allowed = ALLOWED_KEY_BITS + ((INSECURE_TEST_KEY_BITS,) if allow_insecure_test_size else ())
    if bits not in allowed:
        raise InvalidPublicKey(f"modulus has {bits} bits; allowed sizes are {allowed}")
    if n % 2 == 0:
        raise InvalidPublicKey("modulus is even")
    if math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
        raise InvalidPublicKey("modulus has a small prime factor")
    if gmpy2.is_square(n):
        raise InvalidPublicKey("modulus is a perfect square")
    if gmpy2.is_prime(n, 30):
        raise InvalidPublicKey("modulus is prime (anyone could decrypt)")
    if bits == INSECURE_TEST_KEY_BITS:
        log.warning("accepted an insecure %d-bit test public key", bits)
    pk = PaillierPublicKey(n)
    assert pk.g == n + 1  # phe's construction; the encryption below relies on it
    return pk


# ---------------------------------------------------------------------------- ciphertexts


def ciphertext_width(pk: PaillierPublicKey) -> int:
    """Bytes of one ciphertext on the wire: the byte length of ``n**2``."""
    return (int(pk.nsquare).bit_length() + 7) // 8


def _as_int(value: object, what: str, error: type[ValueError]) -> int:
    """A true integer (not bool, not float): the one coercion every wire value goes through."""
    if isinstance(value, bool):
        raise error(f"{what}: bool is not an integer")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise error(
            f"{what}: not an integer ({type(value).__name__}); floats are never encoded"
        ) from None


def _check_ciphertext(index: int, c: object, n: int, nsquare: int) -> int:
    c = _as_int(c, f"ciphertext {index}", InvalidCiphertext)
    if c <= 0:
        raise InvalidCiphertext(f"ciphertext {index}: zero or negative")
    if c >= nsquare:
        raise InvalidCiphertext(f"ciphertext {index}: not below n**2")
    if math.gcd(c, n) != 1:
        raise InvalidCiphertext(f"ciphertext {index}: shares a factor with n (not a unit)")
    return c


def ciphertexts_to_bytes(pk: PaillierPublicKey, ints: Sequence[int]) -> bytes:
    """Concatenate fixed-width big-endian ciphertexts (each checked to be a unit mod n**2)."""
    n, nsquare, width = int(pk.n), int(pk.nsquare), ciphertext_width(pk)
    return b"".join(
        _check_ciphertext(i, c, n, nsquare).to_bytes(width, "big") for i, c in enumerate(ints)
    )


def ciphertexts_from_bytes(pk: PaillierPublicKey, blob: bytes, expected: int) -> list[int]:
    """Parse exactly ``expected`` ciphertexts, rejecting anything that is not a unit mod n**2.

    Zero, values ``>= n**2`` and values sharing a factor with ``n`` (which would reveal a
    factor of n to whoever decrypts, and decrypt to garbage) raise ``InvalidCiphertext``.
    """
    n, nsquare, width = int(pk.n), int(pk.nsquare), ciphertext_width(pk)
    blob = bytes(blob)
    if expected < 0:
        raise ValueError(f"expected must be >= 0, got {expected}")
    if len(blob) != expected * width:
        raise InvalidCiphertext(
            f"blob is {len(blob)} bytes; {expected} ciphertexts of {width} bytes need "
            f"{expected * width}"
        )
    return [
        _check_ciphertext(i, int.from_bytes(blob[i * width : (i + 1) * width], "big"), n, nsquare)
        for i in range(expected)
    ]


# ----------------------------------------------------------------------- encrypt / decrypt


def encrypt_plaintexts(
    pk: PaillierPublicKey,
    plaintexts: Sequence[int],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[int]:
    """Encrypt integer plaintexts ``0 <= m < n``; returns raw ciphertext ints in order.

    ``workers``: threads to use (None: the CPUs this process may run on; 1: inline, no
    pool). Several encrypting clients in one machine (a Flower simulation) should each pass
    their share of the cores. ``progress`` is called in the calling thread with the number
    of ciphertexts just finished (increments, summing to ``len(plaintexts)``).
    """
    n = int(pk.n)
    ms: list[int] = []
    for i, value in enumerate(plaintexts):
        m = _as_int(value, f"plaintext {i}", ValueError)
        if not 0 <= m < n:
            raise ValueError(f"plaintext {i}: outside [0, n)")
        ms.append(m)
    return _map_chunks(_encrypt_chunk, n, ms, workers, progress)


def decrypt_plaintexts(
    sk: PaillierPrivateKey, cts: Sequence[int], workers: int | None = None
) -> list[int]:
    """Decrypt raw ciphertexts to integers in ``[0, n)`` with phe's CRT decryption."""
    n, nsquare = int(sk.public_key.n), int(sk.public_key.nsquare)
    checked = [_check_ciphertext(i, c, n, nsquare) for i, c in enumerate(cts)]
    return _map_chunks(_decrypt_chunk, sk, checked, workers, None)


def add_ciphertexts(pk: PaillierPublicKey, per_platform: Sequence[Sequence[int]]) -> list[int]:
    """Elementwise homomorphic sum: ``prod_k c_k[i] mod n**2`` decrypts to ``sum_k m_k[i]``.

    All platforms must send the same number of ciphertexts. The caller must keep the number
    of contributions within the packing layout's ``max_contributors``.
    """
    if not per_platform:
        raise ValueError("no ciphertext lists to add")
    lengths = {len(cts) for cts in per_platform}
    if len(lengths) != 1:
        raise ValueError(f"ciphertext lists differ in length: {sorted(lengths)}")
    n, nsquare = int(pk.n), int(pk.nsquare)
    nsq = gmpy2.mpz(nsquare)
    total = [gmpy2.mpz(_check_ciphertext(i, c, n, nsquare)) for i, c in enumerate(per_platform[0])]
    for cts in per_platform[1:]:
        for i, c in enumerate(cts):
            total[i] = total[i] * _check_ciphertext(i, c, n, nsquare) % nsq
    return [int(c) for c in total]


def _random_unit(n: int) -> gmpy2.mpz:
    """Uniform r in [1, n) with gcd(r, n) = 1 (a non-unit appears with negligible odds)."""
    while True:
        r = gmpy2.mpz(secrets.randbelow(n - 1) + 1)
        if gmpy2.gcd(r, n) == 1:
            return r


def _encrypt_chunk(n_int: int, ms: list[int]) -> list[int]:
    # The context is per thread: allow_release_gil lets powmod run on every core at once.
    with gmpy2.context(gmpy2.get_context(), allow_release_gil=True):
        n = gmpy2.mpz(n_int)
        nsquare = n * n
        out = []
        for m in ms:
            rn = gmpy2.powmod(_random_unit(n_int), n, nsquare)
            out.append(int((1 + m * n) * rn % nsquare))
        return out


def _decrypt_chunk(sk: PaillierPrivateKey, cts: list[int]) -> list[int]:
    # phe's powmod calls gmpy2.powmod, so this thread's context governs it too.
    with gmpy2.context(gmpy2.get_context(), allow_release_gil=True):
        return [int(sk.raw_decrypt(c)) for c in cts]


# -------------------------------------------------------------------------- thread pool

_T = TypeVar("_T")
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks set by Ray or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pool(size: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``size`` threads (and at least one per CPU).

    Callers bound their own concurrency (``_map_chunks`` keeps ``workers`` tasks in flight),
    so one pool serves every ``workers`` value. When a caller asks for more threads than the
    pool has, a larger pool replaces it; the old one is not shut down, because another
    thread may still be submitting to it: it is dropped, and its idle threads exit once it
    is garbage-collected.
    """
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or size > _POOL_SIZE:
            _POOL_SIZE = max(size, _POOL_SIZE, available_cpus())
            _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="paillier")
        return _POOL


def _shutdown_pool() -> None:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        pool, _POOL, _POOL_SIZE = _POOL, None, 0
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _forget_pool_in_child() -> None:
    # A forked child inherits the pool object but none of its threads: start afresh.
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


atexit.register(_shutdown_pool)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _map_chunks(
    fn: Callable[[_T, list[int]], list[int]],
    arg: _T,
    items: list[int],
    workers: int | None,
    progress: Callable[[int], None] | None,
) -> list[int]:
    """Apply ``fn(arg, chunk)`` over chunks, at most ``workers`` at a time, order preserved."""
    if workers is None:
        workers = available_cpus()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    workers = min(workers, len(chunks))
    if workers <= 1:
        out: list[int] = []
        for chunk in chunks:
            out.extend(fn(arg, chunk))
            if progress is not None:
                progress(len(chunk))
        return out
    pool = _pool(workers)
    results: list[list[int] | None] = [None] * len(chunks)
    running: dict[Future[list[int]], int] = {}
    todo = iter(range(len(chunks)))
    try:
        for k in todo:  # a sliding window keeps exactly `workers` chunks in flight
            running[pool.submit(fn, arg, chunks[k])] = k
            if len(running) < workers:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                results[running.pop(fut)] = fut.result()
                if progress is not None:
                    progress(len(fut.result()))
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                results[running.pop(fut)] = fut.result()
                if progress is not None:
                    progress(len(fut.result()))
    finally:
        for fut in running:
            fut.cancel()
    return [x for chunk_result in results for x in (chunk_result or [])]
