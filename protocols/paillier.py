"""Paillier encryption for the debt-profile query: raw integer plaintexts, parallel, validated.

Guarantees
    * Standard Paillier (Paillier 1999) with ``g = n + 1``: ``c = (1 + m*n) * s mod n**2``
      where the obfuscator ``s`` is a fresh random ``n``-th residue for every ciphertext, so
      equal plaintexts give unrelated ciphertexts. Two ways to draw ``s`` (the *obfuscation*
      switch, see "DJN obfuscators" below): ``"plain"``, the textbook ``s = r**n`` for a
      uniformly random unit ``r`` (security rests on the decisional composite residuosity
      assumption, DCRA, alone), and ``"djn"`` (default), ``s = h_s**alpha`` with a short
      random ``alpha`` evaluated from a fixed-base table (DCRA plus a short-exponent
      assumption), about 13 times faster per core at 2048 bits and 15 at 3072. Both produce
      ordinary Paillier ciphertexts: the key holder decrypts them the same way, and they add
      homomorphically with each other.
      Keys are 2048 bits (about 112-bit security, NIST SP 800-57) or 3072 bits (about
      128-bit); 1024 bits only for tests.
    * Plaintexts are raw integers ``0 <= m < n``; ``phe``'s float/exponent encoding is never
      used (it would treat packed values above ``n/3`` as negative or overflowed). Slot bounds
      are the job of ``protocols.packing``.
    * Everything that crosses a trust boundary is validated on the way in: a public key must
      be an odd, composite, non-square modulus of an allowed size with no small factors; a
      ciphertext blob must have exactly the expected length and every ciphertext must be a
      unit mod ``n**2`` (``0 < c < n**2`` and ``gcd(c, n) = 1``). Failures name the index and
      the reason (``InvalidCiphertext``).
    * Encryption (and decryption) runs on a thread pool: ``gmpy2`` releases the GIL inside
      ``powmod`` and (gmpy2 >= 2.2) inside big-number ``*`` and ``%`` when the thread's
      context has ``allow_release_gil``; ``powmod_base_list`` (used for decryption) always
      releases it. Measured on 2 cores at 2048 bits: plain 2.0x, DJN 1.6-1.9x. Threads need
      no pickling and no ``fork``, so this is safe inside a Ray actor (Flower's simulation
      engine) and inside the ``flwr-clientapp`` subprocess; releasing the GIL also keeps
      Flower's gRPC threads responsive during a long encryption.

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

DJN obfuscators (``obfuscation="djn"``, the default)
    Damgard, Jurik and Nielsen ("A generalization of Paillier's public-key system with
    applications to electronic voting", IJIS 2010, the short-exponent variant; also SecretFlow
    HEU's ``paillier_zahlen``) replace ``r**n`` by ``h_s**alpha mod n**2`` where
    ``h = -x**2 mod n`` for a random unit ``x``, ``h_s = h**n mod n**2`` (an ``n``-th residue),
    and ``alpha`` is uniform in ``[0, 2**(k/2))`` for a ``k``-bit ``n`` (1024 bits at 2048-bit
    keys, 1536 at 3072), as in HEU and the DJN paper. With ``h_s`` fixed, ``h_s**alpha`` is a
    fixed-base exponentiation: a table ``T[i][d] = h_s**(d * 2**(8*i))`` (window 8 bits, one
    row per byte of ``alpha``) turns it into ``k/16`` multiplications mod ``n**2`` with no
    squarings: measured 1,520 ciphertexts/s per core at 2048 bits (0.66 ms) against 112/s for
    ``r**n``, and 500/s against 33/s at 3072 bits.

    The encryptor (a platform) draws ``x`` itself, from the OS CSPRNG, once per public key
    per process, so the key holder's key format does not change. Nothing about ``x`` needs to
    stay secret for the scheme's security (HEU publishes ``h_s`` in its public key); it is
    simply never exported.

    Assumption (the DJN / short-exponent assumption), stated because it is *extra*: a
    ciphertext is indistinguishable from an encryption of any other plaintext if (a) DCRA
    holds and (b) ``h_s**alpha`` with a ``k/2``-bit ``alpha`` is indistinguishable from a
    uniform element of the subgroup generated by ``h_s`` (equivalently, from ``h_s`` raised to
    a full-length exponent). The ``k/2`` length is HEU's and DJN's choice; the usual rationale
    is Hastad-Schrift-Shamir's result that exponentiation modulo a composite hides about half
    of the exponent's bits if factoring is hard, which DJN use for a modulus and ``h`` of
    their own construction (HEU generates admissible moduli, ``p = q = 3 mod 4``). ``phe``
    keys are not generated that way and here ``h`` is drawn by the platform, so for us (b) is
    an assumption in that family, not a theorem. Generic attacks on an ``l``-bit exponent
    (Pollard's lambda) cost about ``2**(l/2)`` operations, so ``l = 1024`` leaves a wide
    margin over the 224 bits needed at 112-bit security. A deployment that does not want (b)
    switches back to textbook obfuscators, per call (``obfuscation="plain"``), per process
    (``set_default_obfuscation("plain")``) or per deployment (environment variable
    ``FEDCREDIT_PAILLIER_OBFUSCATION=plain``, read at each call).

    Cost: the table is built once per public key per process (about 0.2 s and 18 MB at 2048
    bits, 0.5 s and 40 MB at 3072) and kept in a small LRU cache (``DJN_TABLE_CACHE_SIZE``
    keys); ``ObfuscatorPool`` can precompute obfuscators before a query arrives.
"""

from __future__ import annotations

import atexit
import logging
import math
import operator
import os
import secrets
import struct
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Literal, TypeVar, cast

import gmpy2
from phe import paillier
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

__all__ = [
    "ALLOWED_KEY_BITS",
    "DEFAULT_OBFUSCATION",
    "DJN_TABLE_CACHE_SIZE",
    "DJN_WINDOW_BITS",
    "INSECURE_TEST_KEY_BITS",
    "OBFUSCATIONS",
    "OBFUSCATION_ENV",
    "DJNTable",
    "InvalidCiphertext",
    "InvalidPublicKey",
    "Obfuscation",
    "ObfuscatorPool",
    "PaillierPrivateKey",
    "PaillierPublicKey",
    "add_ciphertexts",
    "ciphertext_width",
    "ciphertexts_from_bytes",
    "ciphertexts_to_bytes",
    "decrypt_plaintexts",
    "djn_table",
    "encrypt_plaintexts",
    "generate_keypair",
    "get_default_obfuscation",
    "public_key_from_bytes",
    "public_key_to_bytes",
    "set_default_obfuscation",
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
# large enough that task overhead (microseconds) is nothing next to one ciphertext (0.7-10 ms).
_CHUNK = 16

Obfuscation = Literal["djn", "plain"]
OBFUSCATIONS: tuple[Obfuscation, ...] = ("djn", "plain")
# The shipped default; a deployment overrides it with set_default_obfuscation or OBFUSCATION_ENV.
DEFAULT_OBFUSCATION: Obfuscation = "djn"
OBFUSCATION_ENV = "FEDCREDIT_PAILLIER_OBFUSCATION"
# Fixed-base window: 8 bits makes a digit a byte of os.urandom output and was the fastest
# window measured (2048 bits: w=5 ~980/s, w=6 ~1,180/s, w=8 ~1,500/s obfuscators per core;
# 3.5, 6 and 18 MB of table). Larger windows double memory per extra bit for ~10% speed.
DJN_WINDOW_BITS = 8
# Public keys whose tables stay cached per process: a platform normally serves one key holder.
DJN_TABLE_CACHE_SIZE = 4


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


# ----------------------------------------------------------------- obfuscation switch

_default_override: Obfuscation | None = None


def _checked_obfuscation(mode: object, where: str) -> Obfuscation:
    if mode not in OBFUSCATIONS:
        raise ValueError(f"{where}: obfuscation must be one of {OBFUSCATIONS}, got {mode!r}")
    return cast(Obfuscation, mode)


def set_default_obfuscation(mode: Obfuscation | None) -> None:
    """Switch this process's default obfuscation (``None``: back to env var / shipped default).

    For a deployment that does not accept the short-exponent assumption: call
    ``set_default_obfuscation("plain")`` at start-up, or set ``FEDCREDIT_PAILLIER_OBFUSCATION``
    in the environment of every process that encrypts (Ray workers and ``flwr-clientapp``
    subprocesses do not share Python state, so the environment variable is the robust switch).
    """
    global _default_override
    _default_override = None if mode is None else _checked_obfuscation(mode, "default")
    log.info("Paillier default obfuscation set to %s", get_default_obfuscation())


def get_default_obfuscation() -> Obfuscation:
    """The obfuscation ``encrypt_plaintexts`` uses when the caller names none.

    Precedence: ``set_default_obfuscation``, then the environment variable
    ``FEDCREDIT_PAILLIER_OBFUSCATION`` (a bad value raises rather than silently falling back),
    then ``DEFAULT_OBFUSCATION``.
    """
    if _default_override is not None:
        return _default_override
    env = os.environ.get(OBFUSCATION_ENV)
    if env:
        return _checked_obfuscation(env.strip().lower(), OBFUSCATION_ENV)
    return DEFAULT_OBFUSCATION


# ------------------------------------------------------------------ obfuscator sources


def _random_unit(n: int) -> gmpy2.mpz:
    """Uniform r in [1, n) with gcd(r, n) = 1 (a non-unit appears with negligible odds)."""
    while True:
        r = gmpy2.mpz(secrets.randbelow(n - 1) + 1)
        if gmpy2.gcd(r, n) == 1:
            return r


def _release_gil() -> gmpy2.context:
    # Contexts are per thread: allow_release_gil lets powmod, * and % run on every core.
    return gmpy2.context(gmpy2.get_context(), allow_release_gil=True)


class _PlainObfuscators:
    """Textbook obfuscators ``r**n mod n**2``: one full-size powmod each, DCRA only."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._n = gmpy2.mpz(n)
        self.nsquare = self._n * self._n

    def obfuscators(self, count: int) -> list[gmpy2.mpz]:
        """``count`` fresh obfuscators; call inside ``_release_gil()`` to run in parallel."""
        return [gmpy2.powmod(_random_unit(self.n), self._n, self.nsquare) for _ in range(count)]


class DJNTable:
    """Fixed-base table for DJN obfuscators ``h_s**alpha mod n**2`` of one public key.

    ``rows[i][d] = h_s**(d * 2**(w*i))`` for every ``w``-bit digit ``d``, so ``h_s**alpha`` is
    the product of one entry per digit of ``alpha``: ``ceil(alpha_bits / w)`` multiplications
    mod ``n**2`` and no squarings. Read-only after construction, hence shared by all threads.
    Get one with ``djn_table(pk)`` (cached) rather than constructing it directly.
    """

    def __init__(self, n: int, *, window_bits: int = DJN_WINDOW_BITS) -> None:
        if not 1 <= window_bits <= 12:
            raise ValueError(f"window_bits must be in 1..12, got {window_bits}")
        t0 = time.perf_counter()
        self.n = n
        self.key_bits = n.bit_length()
        # HEU / DJN: alpha uniform below 2**(k/2) for a k-bit modulus.
        self.alpha_bits = self.key_bits // 2
        self.window_bits = window_bits
        self.digits = -(-self.alpha_bits // window_bits)
        self._n = gmpy2.mpz(n)
        self.nsquare = self._n * self._n
        with _release_gil():
            x = _random_unit(n)
            h = (-x * x) % self._n
            hs = gmpy2.powmod(h, self._n, self.nsquare)
            self.rows: list[list[gmpy2.mpz]] = []
            base = hs
            for _ in range(self.digits):
                row = [gmpy2.mpz(1), base]
                for _ in range(2, 1 << window_bits):
                    row.append(row[-1] * base % self.nsquare)
                self.rows.append(row)
                base = row[-1] * base % self.nsquare  # h_s**(2**(w*(i+1)))
        self.h_s = hs
        self.nbytes = sum(sys.getsizeof(v) for row in self.rows for v in row) + sum(
            sys.getsizeof(row) for row in self.rows
        )
        self.build_seconds = time.perf_counter() - t0
        log.info(
            "DJN table for a %d-bit key: %d rows x %d entries, %.1f MB, built in %.3f s",
            self.key_bits,
            self.digits,
            1 << window_bits,
            self.nbytes / 1e6,
            self.build_seconds,
        )

    def _random_digits(self) -> Sequence[int]:
        """Digits of a fresh uniform ``alpha < 2**alpha_bits``, least significant first."""
        if self.window_bits == 8 and self.alpha_bits % 8 == 0:
            return os.urandom(self.digits)  # each byte is a digit: no big-int arithmetic
        alpha = secrets.randbits(self.alpha_bits)
        mask = (1 << self.window_bits) - 1
        return [(alpha >> (self.window_bits * i)) & mask for i in range(self.digits)]

    def power(self, digits: Sequence[int]) -> gmpy2.mpz:
        """``h_s**alpha mod n**2`` for ``alpha``'s digits (base ``2**window_bits``, LSB first)."""
        acc = None
        nsq = self.nsquare
        for row, d in zip(self.rows, digits, strict=True):
            if d:
                acc = row[d] if acc is None else acc * row[d] % nsq
        return gmpy2.mpz(1) if acc is None else acc

    def obfuscators(self, count: int) -> list[gmpy2.mpz]:
        """``count`` fresh obfuscators; call inside ``_release_gil()`` to run in parallel."""
        return [self.power(self._random_digits()) for _ in range(count)]


_TABLES: OrderedDict[tuple[int, int], DJNTable] = OrderedDict()
_TABLES_LOCK = threading.Lock()


def djn_table(pk: PaillierPublicKey, *, window_bits: int = DJN_WINDOW_BITS) -> DJNTable:
    """The cached DJN table for ``pk`` (built on first use; LRU of ``DJN_TABLE_CACHE_SIZE``).

    The build runs under a lock so that concurrent first encryptions build it once; it takes
    about 0.2 s at 2048 bits, which the first query pays (or ``ObfuscatorPool`` / a warm-up
    call pays before the query).
    """
    key = (int(pk.n), window_bits)
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is None:
            table = _TABLES[key] = DJNTable(key[0], window_bits=window_bits)
        else:
            _TABLES.move_to_end(key)
        while len(_TABLES) > max(1, DJN_TABLE_CACHE_SIZE):
            _TABLES.popitem(last=False)
        return table


def _source(pk: PaillierPublicKey, mode: Obfuscation) -> DJNTable | _PlainObfuscators:
    return djn_table(pk) if mode == "djn" else _PlainObfuscators(int(pk.n))


def _obfuscator_chunk(source: DJNTable | _PlainObfuscators, count_list: list[int]) -> list[int]:
    with _release_gil():
        return [int(s) for s in source.obfuscators(len(count_list))]


# ----------------------------------------------------------------------- encrypt / decrypt


def _check_workers(workers: int | None) -> None:
    # Checked before any early return, so that a bad value fails even on empty input.
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def _checked_plaintexts(n: int, plaintexts: Sequence[int]) -> list[int]:
    ms: list[int] = []
    for i, value in enumerate(plaintexts):
        m = _as_int(value, f"plaintext {i}", ValueError)
        if not 0 <= m < n:
            raise ValueError(f"plaintext {i}: outside [0, n)")
        ms.append(m)
    return ms


def encrypt_plaintexts(
    pk: PaillierPublicKey,
    plaintexts: Sequence[int],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    obfuscation: Obfuscation | None = None,
) -> list[int]:
    """Encrypt integer plaintexts ``0 <= m < n``; returns raw ciphertext ints in order.

    ``workers``: threads to use (None: the CPUs this process may run on; 1: inline, no
    pool). Several encrypting clients in one machine (a Flower simulation) should each pass
    their share of the cores. ``progress`` is called in the calling thread with the number
    of ciphertexts just finished (increments, summing to ``len(plaintexts)``).
    ``obfuscation``: ``"djn"`` (short exponent, fixed-base table, about 13x faster) or
    ``"plain"`` (textbook ``r**n``, DCRA only); None means ``get_default_obfuscation()``.
    See the module docstring for the assumption each rests on.
    """
    mode = get_default_obfuscation() if obfuscation is None else obfuscation
    mode = _checked_obfuscation(mode, "encrypt_plaintexts")
    _check_workers(workers)
    n = int(pk.n)
    ms = _checked_plaintexts(n, plaintexts)
    if not ms:
        return []  # and no DJN table built for nothing
    return _map_chunks(_encrypt_chunk, _source(pk, mode), ms, workers, progress)


def _encrypt_chunk(source: DJNTable | _PlainObfuscators, ms: list[int]) -> list[int]:
    with _release_gil():
        n, nsquare = source._n, source.nsquare
        obfs = source.obfuscators(len(ms))
        return [int((1 + m * n) * s % nsquare) for m, s in zip(ms, obfs, strict=True)]


class ObfuscatorPool:
    """Obfuscators computed ahead of a query, each handed out exactly once; thread-safe.

    A platform can ``fill`` the pool while idle (or while the query's tokens are being
    matched) so that the online part of an encryption is one multiplication per ciphertext.
    Obfuscators are random ``n``-th residues that carry no plaintext; using one twice would
    link two ciphertexts (their quotient reveals the plaintext difference), so ``take`` pops
    them. When the pool runs dry, ``take`` and ``encrypt`` compute the shortfall on the spot,
    so a query never fails for want of precomputation. Benchmarks must count ``fill`` time.
    """

    def __init__(self, pk: PaillierPublicKey, *, obfuscation: Obfuscation | None = None) -> None:
        self.pk = pk
        mode = get_default_obfuscation() if obfuscation is None else obfuscation
        self.obfuscation: Obfuscation = _checked_obfuscation(mode, "ObfuscatorPool")
        self._stock: deque[int] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._stock)

    def _compute(self, count: int, workers: int | None) -> list[int]:
        if count <= 0:
            return []
        return _map_chunks(
            _obfuscator_chunk, _source(self.pk, self.obfuscation), [0] * count, workers, None
        )

    def fill(self, count: int, *, workers: int | None = None) -> None:
        """Add ``count`` fresh obfuscators (computed on ``workers`` threads)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        fresh = self._compute(count, workers)
        with self._lock:
            self._stock.extend(fresh)

    def take(self, count: int, *, workers: int | None = None) -> list[int]:
        """``count`` obfuscators, removed from the pool; any shortfall is computed fresh."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._lock:
            got = [self._stock.popleft() for _ in range(min(count, len(self._stock)))]
        return got + self._compute(count - len(got), workers)

    def encrypt(
        self,
        plaintexts: Sequence[int],
        *,
        workers: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[int]:
        """``encrypt_plaintexts`` with this pool's obfuscators (validated the same way)."""
        n = int(self.pk.n)
        ms = _checked_plaintexts(n, plaintexts)
        obfs = self.take(len(ms), workers=workers)
        nn, nsquare = gmpy2.mpz(n), gmpy2.mpz(self.pk.nsquare)
        out = []
        with _release_gil():
            for k in range(0, len(ms), _CHUNK):
                out.extend(
                    int((1 + m * nn) * s % nsquare)
                    for m, s in zip(ms[k : k + _CHUNK], obfs[k : k + _CHUNK], strict=True)
                )
                if progress is not None:
                    progress(len(ms[k : k + _CHUNK]))
        return out


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


class _CRTKey:
    """Decryption constants as ``mpz``: Paillier CRT decryption as in ``phe.raw_decrypt``."""

    def __init__(self, sk: PaillierPrivateKey) -> None:
        mpz = gmpy2.mpz
        self.p, self.q = mpz(sk.p), mpz(sk.q)
        self.psquare, self.qsquare = mpz(sk.psquare), mpz(sk.qsquare)
        self.p_minus_1, self.q_minus_1 = self.p - 1, self.q - 1
        self.hp, self.hq = mpz(sk.hp), mpz(sk.hq)
        self.p_inverse = mpz(sk.p_inverse)

    def decrypt(self, cts: list[gmpy2.mpz]) -> list[int]:
        # powmod_base_list always releases the GIL: the two big exponentiations per
        # ciphertext run in parallel across threads without any context switch.
        cps = gmpy2.powmod_base_list(cts, self.p_minus_1, self.psquare)
        cqs = gmpy2.powmod_base_list(cts, self.q_minus_1, self.qsquare)
        p, q, hp, hq, pinv = self.p, self.q, self.hp, self.hq, self.p_inverse
        out = []
        for cp, cq in zip(cps, cqs, strict=True):
            mp = (cp - 1) // p * hp % p
            mq = (cq - 1) // q * hq % q
            out.append(int(mp + (mq - mp) * pinv % q * p))
        return out


_CRT_KEYS: OrderedDict[tuple[int, int], _CRTKey] = OrderedDict()
_CRT_LOCK = threading.Lock()


def _crt_key(sk: PaillierPrivateKey) -> _CRTKey:
    key = (int(sk.p), int(sk.q))
    with _CRT_LOCK:
        crt = _CRT_KEYS.get(key)
        if crt is None:
            crt = _CRT_KEYS[key] = _CRTKey(sk)
            while len(_CRT_KEYS) > DJN_TABLE_CACHE_SIZE:
                _CRT_KEYS.popitem(last=False)
        else:
            _CRT_KEYS.move_to_end(key)
        return crt


def decrypt_plaintexts(
    sk: PaillierPrivateKey, cts: Sequence[int], workers: int | None = None
) -> list[int]:
    """Decrypt raw ciphertexts to integers in ``[0, n)`` (CRT, same output as ``phe``).

    Every ciphertext is validated first (``InvalidCiphertext``). The arithmetic is phe's
    ``raw_decrypt`` with its constants held as ``mpz`` and the two half-size exponentiations
    batched through ``gmpy2.powmod_base_list``, which releases the GIL.
    """
    n, nsquare = int(sk.public_key.n), int(sk.public_key.nsquare)
    _check_workers(workers)
    checked = [_check_ciphertext(i, c, n, nsquare) for i, c in enumerate(cts)]
    if not checked:
        return []
    return _map_chunks(_decrypt_chunk, _crt_key(sk), checked, workers, None)


def _decrypt_chunk(crt: _CRTKey, cts: list[int]) -> list[int]:
    with _release_gil():
        return crt.decrypt([gmpy2.mpz(c) for c in cts])


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
    # A forked child inherits the pool object but none of its threads: start afresh. The
    # caches' locks may have been held by a thread that does not exist in the child.
    global _POOL, _POOL_SIZE, _POOL_LOCK, _TABLES_LOCK, _CRT_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()
    _TABLES_LOCK, _CRT_LOCK = threading.Lock(), threading.Lock()


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
