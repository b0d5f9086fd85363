"""Cross-platform totals a platform received for its own borrowers, kept in its own ledger.

Why keep them
    They are the platform's to use (the cross-platform model's features, its own underwriting),
    and an auditor checks the query against them: a total is never below the platform's own
    figures, and which platforms contributed is recorded beside every row. The bureau keeps
    no token-keyed copy: it only ever saw blinded identifiers, so this table, inside the
    platform, is the one place where a total meets a borrower's token.

One delivery replaces the previous one in a single transaction: a reader sees the old totals
or the new, never a mix.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text, delete, select

from clients.ledger.store import open_ledger
from clients.platform_data import PlatformData

_metadata = MetaData()
received_totals = Table(
    "received_totals",
    _metadata,
    Column("token", String(64), primary_key=True),
    Column("total_debt_fen", BigInteger, nullable=False),
    Column("active_loans", Integer, nullable=False),
    Column("lenders", Integer, nullable=False),
    Column("session_id", String(32), nullable=False),
    Column("contributors", Text, nullable=False, comment="JSON list of platform names"),
    Column("received_at", String(32), nullable=False),
)


def store_received_totals(
    data: PlatformData, session_id: str, contributors: list[str], totals: np.ndarray
) -> None:
    """Replace the stored totals with ``totals`` (rows in the ledger's token order)."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    names = json.dumps(sorted(contributors))
    rows = [
        {
            "token": token,
            "total_debt_fen": int(debt),
            "active_loans": int(loans),
            "lenders": int(lenders),
            "session_id": session_id,
            "contributors": names,
            "received_at": now,
        }
        for token, (debt, loans, lenders) in zip(data.features.tokens, totals.tolist(), strict=True)
    ]
    with open_ledger(data.location) as ledger:
        _metadata.create_all(ledger.engine)
        with ledger.transaction() as conn:
            conn.execute(delete(received_totals))
            if rows:
                conn.execute(received_totals.insert(), rows)


def read_received_totals(location: str) -> dict[str, tuple[int, int, int]]:
    """token -> (total debt in fen, active loans, lenders), as last delivered."""
    with open_ledger(location) as ledger:
        _metadata.create_all(ledger.engine)
        with ledger.engine.connect() as conn:
            result = conn.execute(
                select(
                    received_totals.c.token,
                    received_totals.c.total_debt_fen,
                    received_totals.c.active_loans,
                    received_totals.c.lenders,
                )
            )
            return {t: (int(d), int(a), int(n)) for t, d, a, n in result}
