"""``fedcredit bench query``: the whole private debt query, timed stage by stage.

What runs (the real protocol code, on one machine, on the cores this process may use):
a synthetic population; every platform enrolled (identity, pinned roster); the key holder as
its own process (``fedcredit keyholder serve``, reached over HTTP); then, on the platforms'
ClientApps driven in-process (no Flower transport, whose cost is the deployment benchmark's
business): private matching over blinded identifiers, the masked encrypted query for every
distinct borrower (pack, mask, DJN-obfuscated Paillier encryption), aggregation at the
coordinator, decryption and sealing at the key holder, and delivery of every platform's
sealed totals, which each platform opens and checks. Every delivered total is then compared
with the generator's truth file: a fast but wrong run fails.

Units. A *token* is one platform's answer for one queried borrower: the query over
``applicants`` borrowers and ``platforms`` platforms answers ``applicants * platforms``
tokens, and ``tokens_per_s`` divides that by the wall time of the whole query (matching
included). The baseline, ``naive_tokens_per_s``, is the same unit done the way one would
without this layer: ``phe``'s own ``encrypt`` of each of the three values of a token, one
ciphertext each, on the same number of cores (measured on a sample in the same run, half
before and half after, and scaled by the cores). ``speedup`` is their ratio, core for core.
``applicants_per_s`` is also given: distinct borrowers answered per second.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from clients.received_totals import read_received_totals
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from fedcredit.inprocess import InProcessGrid
from fedcredit.local_federation import start_local_federation
from protocols.packing import debt_profile_layout
from protocols.paillier import available_cpus, public_key_from_bytes
from server.debt_query import run_debt_query
from server.federation import deliver_totals
from server.keyholder_client import KeyHolderClient
from server.matching import run_matching
from server.settings import FederationSettings

log = logging.getLogger(__name__)

BASELINE_SAMPLE_VALUES = 40


def _phe_seconds_per_value(public_key_bytes: bytes, values: int) -> float:
    """phe's own per-value encryption (EncodedNumber path), one core."""
    pk = public_key_from_bytes(public_key_bytes)
    rng = np.random.default_rng(1)
    sample = [int(v) for v in rng.integers(0, 2**36, size=values)]
    t0 = time.perf_counter()
    for v in sample:
        pk.encrypt(v)
    return (time.perf_counter() - t0) / values


def _check(ledgers: list[str], truth_path: Path) -> tuple[int, int]:
    truth = pq.read_table(
        truth_path, columns=["token", "total_debt_fen", "active_loans", "lenders"]
    ).to_pydict()
    index = {t: i for i, t in enumerate(truth["token"])}
    checked = wrong = 0
    for location in ledgers:
        for token, got in read_received_totals(location).items():
            checked += 1
            j = index[token]
            if got != (truth["total_debt_fen"][j], truth["active_loans"][j], truth["lenders"][j]):
                wrong += 1
    return checked, wrong


class _EncryptionClock:
    """Times the platforms' calls of ``encrypt_plaintexts`` (DJN obfuscators included)."""

    def __init__(self) -> None:
        import clients.app as client_app

        self.module = client_app
        self.real = client_app.encrypt_plaintexts
        self.seconds = 0.0
        self.ciphertexts = 0

    def __enter__(self) -> _EncryptionClock:
        def timed(*args: Any, **kwargs: Any) -> list[int]:
            t = time.perf_counter()
            out = self.real(*args, **kwargs)
            self.seconds += time.perf_counter() - t
            self.ciphertexts += len(out)
            return out

        self.module.encrypt_plaintexts = timed  # type: ignore[assignment]
        return self

    def __exit__(self, *_exc: object) -> None:
        self.module.encrypt_plaintexts = self.real  # type: ignore[assignment]


def run(
    borrowers: int = 100_000,
    platforms: int = 3,
    key_bits: int = 2048,
    seed: int = 0,
    batch: int = 3000,
) -> dict[str, Any]:
    """Run the private query once over a fresh population; JSON-able figures."""
    from clients.app import build_client_app

    cores = available_cpus()
    with tempfile.TemporaryDirectory(prefix="fedcredit-bench-query-") as tmp:
        t0 = time.perf_counter()
        data = generate(
            PopulationConfig(platforms=platforms, borrowers=borrowers, seed=seed),
            Path(tmp) / "data",
        )
        ledgers = [str(p.ledger) for p in data.platforms]
        datagen_s = time.perf_counter() - t0
        with start_local_federation(ledgers, Path(tmp) / "parties", key_bits=key_bits) as local:
            keyholder = KeyHolderClient(local.keyholder.url, local.keyholder.token)
            announcement = keyholder.announcement()
            naive_before = _phe_seconds_per_value(
                announcement.public_key, BASELINE_SAMPLE_VALUES // 2
            )
            grid = InProcessGrid(
                build_client_app(ledgers, local.enrolment.identities, local.enrolment.roster),
                len(ledgers),
            )
            names = {}
            for node, location in zip(sorted(grid.get_node_ids()), ledgers, strict=True):
                from clients.platform_data import load_platform_data

                names[load_platform_data(location).platform] = node  # ledgers load here
            start = time.perf_counter()
            match = run_matching(grid, names, timeout=3600)
            elements = match.union()
            with _EncryptionClock() as clock:
                answer = run_debt_query(grid, match, elements, keyholder, batch, 3600)
            t = time.perf_counter()
            settings = FederationSettings.model_validate({"query-timeout": 3600})
            deliver_totals(grid, match, answer, settings)
            delivery_s = time.perf_counter() - t
            seconds = time.perf_counter() - start
            naive_after = _phe_seconds_per_value(
                announcement.public_key, BASELINE_SAMPLE_VALUES // 2
            )
            keyholder.close()
        checked, wrong = _check(ledgers, Path(data.truth))
    if wrong or checked == 0:
        raise RuntimeError(f"bench query: {wrong} of {checked} delivered totals are wrong")
    stages = answer.stats.stage_seconds
    applicants = len(elements)
    tokens = applicants * platforms
    per_value = (naive_before + naive_after) / 2
    naive_tokens_per_s = cores / (3 * per_value)
    tokens_per_s = tokens / seconds
    cts = answer.stats.ciphertexts
    return {
        "benchmark": "query",
        "borrowers": borrowers,
        "platforms": platforms,
        "key_bits": key_bits,
        "cores": cores,
        "applicants": applicants,
        "tokens": tokens,
        "ciphertexts": cts,
        "tokens_per_ciphertext": debt_profile_layout(platforms).tokens_per_plaintext(key_bits),
        "seconds": {
            "total": round(seconds, 2),
            "matching": round(match.seconds, 2),
            "encryption": round(stages["platforms"], 2),  # platform side: pack, mask, encrypt
            "aggregation": round(stages["aggregation"], 2),
            "decryption": round(stages["decryption"], 2),
            "delivery": round(delivery_s, 2),
        },
        "tokens_per_s": round(tokens_per_s, 1),
        "applicants_per_s": round(applicants / seconds, 1),
        "naive_tokens_per_s": round(naive_tokens_per_s, 1),
        "speedup": round(tokens_per_s / naive_tokens_per_s, 1),
        # Encryption proper (packing, masks and message handling excluded), DJN obfuscators
        # included; the platform stage as a whole is "encryption" in "seconds".
        "ciphertexts_per_s_per_core": round(clock.ciphertexts / clock.seconds / cores, 1),
        "platform_stage_ciphertexts_per_s_per_core": round(cts / stages["platforms"] / cores, 1),
        "encryption_only_seconds": round(clock.seconds, 2),
        "baseline": "phe per-value encrypt of each token's 3 values, same cores, same run",
        "totals_checked": checked,
        "totals_wrong": wrong,
        "datagen_seconds": round(datagen_s, 2),
        "bytes_per_platform": round(
            (
                answer.stats.bytes_sent
                + answer.stats.bytes_received
                + match.bytes_sent
                + match.bytes_received
            )
            / platforms
        ),
    }
