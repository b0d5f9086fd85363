"""Writing the synthetic world out: one ledger per platform, one truth file for evaluation.

A platform's ledger receives only what that platform would know: its own borrowers (by
token), its own loans and their repayment history, its own noisy income proxy, and the
observed outcome of its own borrowers. The truth file (true default probabilities, debt
across all platforms, the latent risk) goes elsewhere and no platform node ever reads it.

SQLite ledgers are written to a temporary file and renamed into place, so an interrupted
run never leaves a half-written ledger; other databases get one transaction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from clients.ledger import schema
from clients.ledger.store import bulk_insert, ledger_url, open_ledger, prepare_bulk_load
from fedcredit.datagen.population import HISTORY_MONTHS, World, open_dates


@dataclass(frozen=True)
class LedgerCounts:
    borrowers: int
    loans: int
    history_rows: int


def history_months(world: World) -> list[str]:
    as_of = world.config.as_of
    base = as_of.year * 12 + as_of.month - 1
    return [
        f"{(base - k) // 12:04d}-{(base - k) % 12 + 1:02d}"
        for k in range(HISTORY_MONTHS - 1, -1, -1)
    ]


def expand_history(conn: Connection, months: list[str]) -> int:
    """Derive the repayment_history rows from the loans' status strings, inside the database.

    A history row is a function of its loan's status string (one PBoC code a month) and
    monthly repayment: amount due is the instalment in every month the loan was open and not
    settled, amount paid equals it when the code is N. Deriving the rows in one INSERT ...
    SELECT keeps ~10 rows per loan out of Python, which is most of the write time at a
    million borrowers. Standard SQL (VALUES, substr, CASE), so any database runs it.
    """
    months_q = " UNION ALL ".join(
        f"SELECT {i + 1} AS idx, '{m}' AS month" for i, m in enumerate(months)
    )
    code = "substr(l.repayment_status, m.idx, 1)"
    due = f"CASE WHEN {code} IN ('/', 'C') THEN 0 ELSE l.monthly_repayment_fen END"
    # loans is written in loan_id order and CROSS JOIN keeps it the outer loop, so rows
    # arrive in primary-key order without a sort
    sql = f"""
        INSERT INTO repayment_history
            (loan_id, month, status, amount_due_fen, amount_paid_fen)
        SELECT l.loan_id, m.month, {code}, {due},
               CASE WHEN {code} = 'N' THEN l.monthly_repayment_fen ELSE 0 END
        FROM loans AS l CROSS JOIN ({months_q}) AS m
        WHERE {code} <> '/'
    """
    return int(conn.exec_driver_sql(sql).rowcount)


def _none_where(values: np.ndarray, missing: np.ndarray) -> list[object]:
    out: list[object] = values.tolist()
    for i in np.flatnonzero(missing).tolist():
        out[i] = None
    return out


def write_platform_ledger(
    world: World, platform: int, target: str, tokens: np.ndarray, key_id: str
) -> LedgerCounts:
    """Write platform ``platform``'s ledger to ``target`` (a path or SQLAlchemy URL)."""
    url = ledger_url(target)
    parsed = make_url(url)
    is_sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (
        None,
        "",
        ":memory:",
    )
    final_path = Path(parsed.database) if is_sqlite_file else None
    if final_path is not None:
        tmp = final_path.with_name(final_path.name + ".partial")
        tmp.unlink(missing_ok=True)
        write_target: str = str(tmp)
    else:
        write_target = target
    try:
        counts = _write(world, platform, write_target, tokens, key_id)
        if final_path is not None:
            # The query log puts a ledger in WAL mode: a write-ahead log left beside the old
            # file (a node still running, or killed) must not be read as the new file's.
            for suffix in ("-wal", "-shm"):
                final_path.with_name(final_path.name + suffix).unlink(missing_ok=True)
            os.replace(tmp, final_path)
    finally:
        if final_path is not None:
            tmp.unlink(missing_ok=True)
    return counts


def _write(world: World, j: int, target: str, tokens: np.ndarray, key_id: str) -> LedgerCounts:
    cfg, plat = world.config, world.platforms[j]
    pairs, loans, persons, outcome = world.pairs, world.loans, world.persons, world.outcome
    on = np.flatnonzero(pairs.platform == j)
    # Insert borrowers in token order: tokens are random, and appending to the primary-key
    # B-tree in order avoids a random page write per row at millions of rows.
    on = on[np.argsort(tokens[pairs.person[on]].astype("U64"), kind="stable")]
    person = pairs.person[on]
    ages = persons.age[person]
    tiers = persons.tier[person]
    proxy = pairs.income_proxy[on]
    borrower_rows = zip(
        tokens[person].tolist(),
        ages.tolist(),
        _none_where(tiers, np.full(len(on), not plat.archetype.sees_city)),
        _none_where(np.nan_to_num(proxy * 100).astype(np.int64), np.isnan(proxy)),
        pairs.applications_3m[on].tolist(),
        outcome.defaulted[person].astype(np.int64).tolist(),
        strict=True,
    )

    li = np.flatnonzero(loans.platform == j)
    loan_ids = np.array([f"{plat.name}-L{i:09d}" for i in range(len(li))], dtype=object)
    status = np.ascontiguousarray(loans.status[li])
    status_text = [s.decode("ascii") for s in status.view(f"S{HISTORY_MONTHS}").ravel().tolist()]
    revolving = loans.revolving[li]
    loan_rows = zip(
        loan_ids.tolist(),
        tokens[loans.person[li]].tolist(),
        np.where(revolving, "revolving", "cash_loan").tolist(),
        open_dates(cfg.as_of, loans.months_open[li], loans.open_day[li]).tolist(),
        _none_where(np.nan_to_num(loans.credit_limit[li] * 100).astype(np.int64), ~revolving),
        _none_where(np.nan_to_num(loans.principal[li] * 100).astype(np.int64), revolving),
        loans.balance_fen[li].tolist(),
        _none_where(loans.term[li], revolving),
        loans.apr[li].tolist(),
        loans.monthly_fen[li].tolist(),
        loans.dpd[li].tolist(),
        loans.max_dpd[li].tolist(),
        status_text,
        strict=True,
    )

    with open_ledger(target, create=True) as ledger:
        ledger.create_schema(
            platform=plat.name,
            platform_kind=plat.archetype.kind,
            key_id=key_id,
            as_of=cfg.as_of.isoformat(),
            currency="CNY",
            source=f"fedcredit datagen seed={cfg.seed}",
        )
        with ledger.engine.connect() as conn:
            prepare_bulk_load(conn)
            with conn.begin():
                schema.loans_token_index.drop(conn)
                b = bulk_insert(
                    conn,
                    schema.borrowers,
                    schema.BORROWER_COLUMNS,
                    borrower_rows,
                )
                n_loans = bulk_insert(
                    conn,
                    schema.loans,
                    schema.LOAN_COLUMNS,
                    loan_rows,
                )
                h = expand_history(conn, history_months(world))
                # rebuilt by one sort instead of a random B-tree insert per loan
                schema.loans_token_index.create(conn)
    return LedgerCounts(b, n_loans, h)


def lenders_with_active_loans(world: World) -> np.ndarray:
    """Per person, how many platforms hold an active (not settled) loan of theirs."""
    loans, pairs = world.loans, world.pairs
    pair_active = np.bincount(loans.pair, weights=~loans.settled, minlength=len(pairs.person)) > 0
    return np.bincount(pairs.person, weights=pair_active, minlength=len(world.persons)).astype(
        np.int64
    )


def write_truth(
    world: World, path: Path, tokens: np.ndarray, extra_meta: dict[str, object]
) -> None:
    """The evaluation file: per person, what only the generator knows."""
    persons, outcome, pairs = world.persons, world.outcome, world.pairs
    names = np.array([p.name for p in world.platforms], dtype=object)
    held_by: list[list[str]] = [[] for _ in range(len(persons))]
    for person, platform in zip(pairs.person.tolist(), names[pairs.platform].tolist(), strict=True):
        held_by[person].append(platform)
    table = pa.table(
        {
            "token": pa.array(tokens.tolist(), pa.string()),
            "true_pd": outcome.true_pd,
            "defaulted": outcome.defaulted,
            "total_debt_fen": outcome.total_debt_fen,
            "loans": outcome.loans.astype(np.int64),
            "active_loans": outcome.active_loans,
            "lenders": lenders_with_active_loans(world),
            "platforms_borrowed_from": persons.k.astype(np.int64),
            "platforms": pa.array(held_by, pa.list_(pa.string())),
            "income_fen": np.round(persons.income * 100).astype(np.int64),
            "latent_risk": persons.z,
            "age": persons.age,
            "city_tier": persons.tier,
            "fraud_ring": persons.fraud,
        }
    )
    table = table.replace_schema_metadata({"fedcredit": json.dumps(extra_meta, default=str)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
