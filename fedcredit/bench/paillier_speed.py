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

Obfuscation modes (same run): ``encryption_rates`` times both ways of drawing the obfuscator
(``"djn"``: short exponent from a fixed-base table, the default; ``"plain"``: textbook
``r**n``) on one thread (``ciphertexts_per_s_per_core``) and on all workers
(``ciphertexts_per_s``), alternating modes and taking the best of ``RATE_REPEATS`` rounds
because other processes share the machine. ``cpu_utilisation`` (process CPU seconds over wall
seconds) says how many cores a measurement really got: a 2-worker figure with utilisation near
1.0 means the other core was busy elsewhere, not that threads do not scale. DJN's one-off table
build is reported separately (``table_build_s``), as is decryption per core.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import numpy as np

from protocols.packing import DEBT_PROFILE_LAYOUT
from protocols.paillier import (
    OBFUSCATIONS,
    Obfuscation,
    PaillierPrivateKey,
    PaillierPublicKey,
    available_cpus,
    ciphertext_width,
    decrypt_plaintexts,
    djn_table,
    encrypt_plaintexts,
    generate_keypair,
    get_default_obfuscation,
)

log = logging.getLogger(__name__)

# Values the baseline encrypts: enough for a stable per-value time, few enough to stay ~1 s.
BASELINE_SAMPLE_VALUES = 60
# Rate measurements aim at about this many seconds each (per mode, per worker count, per round).
RATE_SECONDS = 0.6
RATE_REPEATS = 2
# Ciphertexts decrypted per worker for the decryption rates (about 0.6 s per core).
DECRYPT_SAMPLE_PER_WORKER = 200


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


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``fn(*args, **kwargs)``, its wall seconds and process CPU seconds (all threads)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _encryption_sample(
    pk: PaillierPublicKey, count: int, obfuscation: Obfuscation | None, workers: int
) -> tuple[float, float]:
    """(ciphertexts per second, CPU utilisation) for ``count`` random plaintexts."""
    ms = [secrets.randbelow(pk.n) for _ in range(count)]
    _, wall, cpu = _timed(encrypt_plaintexts, pk, ms, workers=workers, obfuscation=obfuscation)
    return count / wall, cpu / wall


def measure_encryption_rate(
    pk: PaillierPublicKey,
    count: int = 500,
    *,
    obfuscation: Obfuscation | None = None,
    workers: int = 1,
) -> float:
    """Ciphertexts per second encrypting ``count`` random plaintexts (for ``bench query``).

    The DJN table is built first and not counted (it is a once-per-key, per-process cost:
    see ``djn_table(pk).build_seconds``). ``workers=1`` gives the per-core rate.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    mode = get_default_obfuscation() if obfuscation is None else obfuscation
    if mode == "djn":
        djn_table(pk)
    return _encryption_sample(pk, count, mode, workers)[0]


def _rates(pk: PaillierPublicKey, workers: int) -> dict[str, dict[str, object]]:
    """Both obfuscation modes, one thread and ``workers`` threads, best of RATE_REPEATS."""
    table = djn_table(pk)  # cached per process: built by now if the main run used DJN
    # Size each sample from a quick probe so every measurement lasts about RATE_SECONDS.
    counts: dict[str, int] = {}
    for mode in OBFUSCATIONS:
        probe, _ = _encryption_sample(pk, 8, mode, 1)
        counts[mode] = max(8, int(probe * RATE_SECONDS))
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for _ in range(RATE_REPEATS):
        for w in sorted({1, workers}):
            for mode in OBFUSCATIONS:  # alternate so load drift hits both modes alike
                rate, util = _encryption_sample(pk, counts[mode] * w, mode, w)
                if rate > best.get((mode, w), (0.0, 0.0))[0]:
                    best[(mode, w)] = (rate, util)
    out: dict[str, dict[str, object]] = {}
    for mode in OBFUSCATIONS:
        one, many = best[(mode, 1)], best[(mode, workers)]
        out[mode] = {
            "ciphertexts_per_s_per_core": round(one[0], 1),
            "ciphertexts_per_s": round(many[0], 1),
            "workers": workers,
            "parallel_speedup": round(many[0] / one[0], 2),
            "cpu_utilisation": {"one_worker": round(one[1], 2), "all_workers": round(many[1], 2)},
            "sample_ciphertexts_per_core": counts[mode],
        }
    out["djn"].update(
        {
            "table_build_s": round(table.build_seconds, 3),
            "table_mb": round(table.nbytes / 1e6, 1),
            "alpha_bits": table.alpha_bits,
            "window_bits": table.window_bits,
        }
    )
    out["djn_over_plain_per_core"] = {
        "ratio": round(
            float(out["djn"]["ciphertexts_per_s_per_core"])  # type: ignore[arg-type]
            / float(out["plain"]["ciphertexts_per_s_per_core"]),  # type: ignore[arg-type]
            1,
        )
    }
    return out


def _decryption_rates(sk: PaillierPrivateKey, workers: int) -> dict[str, object]:
    """Key-holder decryption: ours on one and on all workers, and phe's raw_decrypt on one."""
    pk = sk.public_key
    count = DECRYPT_SAMPLE_PER_WORKER * workers
    cts = encrypt_plaintexts(
        pk, [secrets.randbelow(pk.n) for _ in range(count)], workers=workers, obfuscation="djn"
    )
    one_sample = cts[:DECRYPT_SAMPLE_PER_WORKER]
    _, one_s, _ = _timed(decrypt_plaintexts, sk, one_sample, workers=1)
    _, many_s, many_cpu = _timed(decrypt_plaintexts, sk, cts, workers=workers)
    phe_sample = cts[: DECRYPT_SAMPLE_PER_WORKER // 2]
    _, phe_s, _ = _timed(lambda: [sk.raw_decrypt(c) for c in phe_sample])
    return {
        "plaintexts_per_s_per_core": round(len(one_sample) / one_s, 1),
        "plaintexts_per_s": round(len(cts) / many_s, 1),
        "workers": workers,
        "parallel_speedup": round(len(cts) / many_s / (len(one_sample) / one_s), 2),
        "cpu_utilisation_all_workers": round(many_cpu / many_s, 2),
        "phe_raw_decrypt_per_s_per_core": round(len(phe_sample) / phe_s, 1),
    }


def run(
    key_bits: int = 2048,
    tokens: int = 3000,
    workers: int | None = None,
    obfuscation: Obfuscation | None = None,
) -> dict[str, object]:
    """Time pack + parallel encryption of ``tokens`` profiles against plain phe; JSON-able.

    ``obfuscation`` picks the mode of the main packed run (None: the process default);
    ``encryption_rates`` always measures both modes.
    """
    if tokens < 1:
        raise ValueError("tokens must be at least 1")
    mode = get_default_obfuscation() if obfuscation is None else obfuscation
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
    # The packed run includes DJN's one-off table build: a first query pays it.
    t0 = time.perf_counter()
    cts = encrypt_plaintexts(pk, plaintexts, workers=workers, obfuscation=mode)
    encrypt_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    decrypted = decrypt_plaintexts(sk, cts, workers=workers)
    back = layout.unpack(decrypted, tokens, key_bits)
    decrypt_s = time.perf_counter() - t0
    correct = bool(np.array_equal(back, values))
    if not correct:
        raise AssertionError("packed ciphertexts did not decrypt to the input profiles")

    baseline_s += _phe_encrypt_seconds(pk, sample[half:])
    rates = _rates(pk, workers)
    decryption = _decryption_rates(sk, workers)
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
        "obfuscation": mode,
        "encryption_rates": rates,
        "decryption": decryption,
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
