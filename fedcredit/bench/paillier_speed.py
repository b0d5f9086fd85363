"""``fedcredit bench paillier``: encrypting debt profiles with slot packing and all cores.

What a platform does per query: pack each asked-about token's ``(debt_fen, active_loans,
has_active_loan)`` with ``DEBT_PROFILE_LAYOUT`` and encrypt the packed plaintexts on every
core (``protocols.paillier.encrypt_plaintexts``). The result is decrypted and unpacked in the
same run and compared with the input, so a fast but wrong configuration cannot pass.

Baseline (same run): plain ``phe`` as one would use it without this layer, ``pk.encrypt`` of
each value separately (one ciphertext per field per token), on one core, timed on a small
sample (half before, half after the packed run, so load drift hits both alike) and
extrapolated per value. ``ratio`` is packed-and-parallel tokens per second over baseline
tokens per second; it is about ``values_per_ciphertext`` (the packing gain, 87 at 2048 bits)
times the parallel speed-up. Wire size counts raw fixed-width ciphertexts for both (phe's own
serialisations are larger still).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from protocols.packing import DEBT_PROFILE_LAYOUT
from protocols.paillier import (
    PaillierPublicKey,
    available_cpus,
    ciphertext_width,
    decrypt_plaintexts,
    encrypt_plaintexts,
    generate_keypair,
)

log = logging.getLogger(__name__)

# Values the baseline encrypts: enough for a stable per-value time, few enough to stay ~1 s.
BASELINE_SAMPLE_VALUES = 60


def _profiles(tokens: int, seed: int = 0) -> np.ndarray:
    """Random in-bound profiles (the cost of encryption does not depend on the values)."""
    rng = np.random.default_rng(seed)
    out = np.empty((tokens, len(DEBT_PROFILE_LAYOUT.fields)), dtype=np.int64)
    out[:, 0] = rng.integers(0, 2**36, size=tokens)
    out[:, 1] = rng.integers(0, 2**12, size=tokens)
    out[:, 2] = rng.integers(0, 2, size=tokens)
    return out


def _phe_encrypt_seconds(pk: PaillierPublicKey, sample: list[int]) -> float:
    """The baseline: phe's own ``encrypt`` of each value, in this thread."""
    t0 = time.perf_counter()
    for v in sample:
        pk.encrypt(v)  # phe's EncodedNumber path, exponent 0 for ints
    return time.perf_counter() - t0


def run(key_bits: int = 2048, tokens: int = 3000, workers: int | None = None) -> dict[str, object]:
    """Time pack + parallel encryption of ``tokens`` profiles against plain phe; JSON-able."""
    if tokens < 1:
        raise ValueError("tokens must be at least 1")
    layout = DEBT_PROFILE_LAYOUT
    n_fields = len(layout.fields)
    workers = workers or available_cpus()

    t0 = time.perf_counter()
    pk, sk = generate_keypair(key_bits)
    keygen_s = time.perf_counter() - t0

    values = _profiles(tokens)
    sample = [int(v) for v in values.ravel()[:BASELINE_SAMPLE_VALUES]]
    half = len(sample) // 2
    # Half the baseline before and half after the packed run, so that load from other
    # processes drifting during the run affects both sides alike.
    baseline_s = _phe_encrypt_seconds(pk, sample[:half])

    t0 = time.perf_counter()
    plaintexts = layout.pack(values, key_bits)
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cts = encrypt_plaintexts(pk, plaintexts, workers=workers)
    encrypt_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    decrypted = decrypt_plaintexts(sk, cts, workers=workers)
    back = layout.unpack(decrypted, tokens, key_bits)
    decrypt_s = time.perf_counter() - t0
    correct = bool(np.array_equal(back, values))
    if not correct:
        raise AssertionError("packed ciphertexts did not decrypt to the input profiles")

    baseline_s += _phe_encrypt_seconds(pk, sample[half:])
    baseline_s_per_value = baseline_s / len(sample)
    baseline_tokens_per_s = 1.0 / (baseline_s_per_value * n_fields)

    packed_s = pack_s + encrypt_s
    tokens_per_s = tokens / packed_s
    width = ciphertext_width(pk)
    log.info("paillier bench: %d tokens in %.2f s on %d workers", tokens, packed_s, workers)
    return {
        "benchmark": "paillier",
        "key_bits": key_bits,
        "tokens": tokens,
        "workers": workers,
        "cpus": available_cpus(),
        "layout": {f.name: layout.slot_bits(f) for f in layout.fields},
        "token_bits": layout.token_bits,
        "tokens_per_plaintext": layout.tokens_per_plaintext(key_bits),
        "ciphertexts": len(cts),
        "seconds": {
            "keygen": round(keygen_s, 3),
            "pack": round(pack_s, 4),
            "encrypt": round(encrypt_s, 3),
            "decrypt_and_unpack": round(decrypt_s, 3),
        },
        "tokens_per_s": round(tokens_per_s, 1),
        "ciphertexts_per_s": round(len(cts) / encrypt_s, 1),
        "ciphertexts_per_s_per_worker": round(len(cts) / encrypt_s / workers, 1),
        "baseline": "phe pk.encrypt per value, unpacked, one core (same run, extrapolated)",
        "baseline_sample_values": len(sample),
        "baseline_values_per_s": round(1.0 / baseline_s_per_value, 1),
        "baseline_tokens_per_s": round(baseline_tokens_per_s, 2),
        "baseline_seconds_for_all_tokens": round(tokens / baseline_tokens_per_s, 1),
        "ratio": round(tokens_per_s / baseline_tokens_per_s, 1),
        "values_per_ciphertext": layout.tokens_per_plaintext(key_bits) * n_fields,
        "wire_bytes_per_token": {
            "packed": round(width * len(cts) / tokens, 2),
            "unpacked": width * n_fields,
        },
        "ciphertext_bytes": width,
        "decrypts_correctly": correct,
    }
