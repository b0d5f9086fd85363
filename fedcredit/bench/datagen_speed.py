"""``fedcredit bench datagen``: how fast the generator makes a population, against I/O alone.

Baseline (same run): the *SQLite floor*, the time SQLite takes to insert the same number of
borrower, loan and history rows into the same schema from ready-made tuples, on one core,
with no generation at all. ``ratio_vs_sqlite_floor`` below 1 means generation plus writing
on two cores beats bare single-core insertion; the target is 1,000,000 borrowers in < 60 s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from clients.ledger import schema
from clients.ledger.store import bulk_insert, open_ledger, prepare_bulk_load
from fedcredit.bench.resources import peak_rss_mb
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate

TARGET_SECONDS_PER_MILLION = 60.0


def sqlite_floor(path: Path, borrowers: int, loans: int, history: int) -> float:
    """Seconds to insert constant rows of the ledger's shapes, with the writer's pragmas."""
    token = "0" * 64
    t0 = time.perf_counter()
    with open_ledger(path, create=True) as ledger:
        ledger.create_schema(platform="floor")
        with ledger.engine.connect() as conn:
            prepare_bulk_load(conn)
            with conn.begin():
                bulk_insert(
                    conn,
                    schema.borrowers,
                    schema.BORROWER_COLUMNS,
                    ((f"{i:064x}", 30, 2, 600_000, 1, 0) for i in range(borrowers)),
                )
                bulk_insert(
                    conn,
                    schema.loans,
                    schema.LOAN_COLUMNS,
                    (
                        (
                            f"platform-01-L{i:09d}",
                            token,
                            "cash_loan",
                            "2026-01-05",
                            None,
                            800_000,
                            400_000,
                            12,
                            0.12,
                            71_000,
                            0,
                            0,
                            "NNNNNNNNNNNN",
                        )
                        for i in range(loans)
                    ),
                )
                bulk_insert(
                    conn,
                    schema.repayment_history,
                    schema.HISTORY_COLUMNS,
                    (
                        (
                            f"platform-01-L{i // 12:09d}",
                            f"{2000 + i % 12:04d}-01",
                            "N",
                            71_000,
                            71_000,
                        )
                        for i in range(history)
                    ),
                )
    return time.perf_counter() - t0


def run(borrowers: int, platforms: int, seed: int, workers: int) -> dict[str, object]:
    cfg = PopulationConfig(borrowers=borrowers, platforms=platforms, seed=seed)
    with tempfile.TemporaryDirectory(prefix="fedcredit-bench-") as tmp:
        t0 = time.perf_counter()
        summary = generate(cfg, Path(tmp) / "out", workers=workers)
        seconds = time.perf_counter() - t0
        peak = peak_rss_mb()
        n_b = sum(p.borrowers for p in summary.platforms)
        n_l = sum(p.loans for p in summary.platforms)
        n_h = sum(p.history_rows for p in summary.platforms)
        floor = sqlite_floor(Path(tmp) / "floor.sqlite", n_b, n_l, n_h)
    target = TARGET_SECONDS_PER_MILLION * borrowers / 1_000_000
    return {
        "benchmark": "datagen",
        "seconds": round(seconds, 3),
        "borrowers": borrowers,
        "platforms": platforms,
        "borrowers_per_s": round(borrowers / seconds, 1),
        "peak_rss_mb": round(peak, 1),
        "rows_written": {"borrowers": n_b, "loans": n_l, "repayment_history": n_h},
        "stage_seconds": summary.seconds,
        "baseline": "sqlite_floor: same rows, same schema, no generation, one core",
        "baseline_seconds": round(floor, 3),
        "ratio_vs_sqlite_floor": round(seconds / floor, 3),
        "target_seconds": round(target, 1),
        "within_target": seconds < target,
        "bayes_auc": round(summary.bayes_auc, 4),
        "workers": workers,
    }
