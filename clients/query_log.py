"""The platform's own record of every query it answered or refused: hash-chained, append-only.

Each entry's hash covers the previous entry's hash and the entry itself, so deleting or editing
an entry breaks every hash after it (``verify`` finds the first broken link). The log lives in
the platform's ledger database (table ``query_log``), beside the data it accounts for; it holds
what was asked (a digest of the tokens, never the tokens) and what was answered (a digest of
the reply), so an auditor can match it against the bureau's records without seeing anyone's
figures.

Query ids make replay detectable: a ``query.debt_profile`` whose id this platform has already
answered is refused and the refusal logged; the bureau must issue a fresh id per batch.

Durability: on SQLite the log runs in WAL mode with ``synchronous=NORMAL``. A commit is then an
append to the write-ahead log without an fsync (the WAL is synced at each checkpoint), where
the default rollback journal cost two or three fsyncs per entry (1 to 15 ms on a shared disk,
for every secure-sum reply: 15 a boosted tree). What that keeps: every committed entry survives
the node's process crashing or being killed (the write is in the operating system before the
reply leaves), and the chain is never half-written (a WAL transaction is atomic). What it
gives up: an operating-system crash or power loss may roll the log back to its last
checkpoint, losing the newest entries *whole* (the chain stays valid; the bureau's records of
those replies, and the anchors each side keeps, still show them). A replayed nonce after such
a loss would be answered again, which needs the coordinator to cut the platform's power
between two messages; the other defences (fresh nonces per round, strict-subset re-runs held
in node state) do not depend on the log. WAL keeps recent entries in ``<ledger>-wal`` until a
checkpoint (SQLite checkpoints every 1,000 pages and when the last connection closes): copy
the ledger with ``sqlite3 ledger.db ".backup copy.db"`` or together with its ``-wal`` file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    event,
    select,
)

from clients.ledger.store import open_ledger
from protocols.audit_chain import GENESIS, chain_hash, query_log_entry, verify_chain

log = logging.getLogger(__name__)

_metadata = MetaData()
query_log = Table(
    "query_log",
    _metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("query_id", String(64), nullable=False, index=True),
    Column("kind", String(64), nullable=False),
    Column("outcome", String(16), nullable=False, comment="answered | refused"),
    Column("detail", Text, nullable=False),
    Column("received_at", String(32), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
)

_lock = threading.Lock()


class ReplayedQuery(ValueError):
    """A query id this platform has already answered."""


def _entry_hash(prev_hash: str, entry: dict[str, object]) -> str:
    return chain_hash(prev_hash, entry)


_open_logs: dict[str, QueryLog] = {}


def query_log_for(location: str) -> QueryLog:
    """The node's query log for ``location``, opened once per process.

    A query answers dozens of batches; opening the ledger and checking the table for every
    message cost more than encrypting the batch.
    """
    with _lock:
        found = _open_logs.get(location)
        if found is None:
            found = _open_logs[location] = QueryLog(location)
        return found


_LAST = select(query_log.c.seq, query_log.c.entry_hash).order_by(query_log.c.seq.desc()).limit(1)
_ANSWERED = (
    select(query_log.c.seq)
    .where((query_log.c.query_id == bindparam("query_id")) & (query_log.c.outcome == "answered"))
    .limit(1)
)


_SQL_ANSWERED = "SELECT 1 FROM query_log WHERE query_id = ? AND outcome = 'answered' LIMIT 1"
_SQL_LAST = "SELECT seq, entry_hash FROM query_log ORDER BY seq DESC LIMIT 1"
_SQL_INSERT = (
    "INSERT INTO query_log (seq, query_id, kind, outcome, detail, received_at, prev_hash, "
    "entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def last_hash(last: Any) -> str:
    """The hash the next entry chains to: the last entry's, or ``GENESIS`` for the first."""
    return str(last[1]) if last else GENESIS


def _entry(
    last: Any, query_id: str, kind: str, outcome: str, detail: dict[str, object]
) -> tuple[dict[str, object], str]:
    """The next entry (columns in ``QUERY_LOG_FIELDS`` order) after ``last`` and its hash."""
    entry: dict[str, object] = {
        "seq": int(last[0]) + 1 if last else 1,
        "query_id": query_id,
        "kind": kind,
        "outcome": outcome,
        "detail": json.dumps(detail, sort_keys=True),
        "received_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return entry, _entry_hash(last_hash(last), entry)


def _wal_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Every connection of the log: commits append to the WAL without an fsync (see above)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class QueryLog:
    """Append-only, hash-chained query log in a ledger database."""

    def __init__(self, location: str) -> None:
        self.location = location
        self._ledger = open_ledger(location)
        engine = self._ledger.engine
        self._file = engine.dialect.name == "sqlite" and engine.url.database not in (
            None,
            "",
            ":memory:",
        )
        if self._file:
            event.listen(engine, "connect", _wal_pragmas)
            with engine.connect() as conn:
                # Persistent in the database file; readers of the ledger are unaffected.
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        _metadata.create_all(engine)
        self._held: Any = None  # (pid, pool connection) for ``answer_once``
        self._held_pid = 0

    def close(self) -> None:
        with _lock:
            if self._held is not None:
                self._held.close()  # back to the pool
                self._held = None
        self._ledger.close()

    def _driver(self) -> Any:
        """The sqlite3 connection ``answer_once`` writes with, held for this process.

        Checking a connection out of SQLAlchemy's pool and back for every entry (events,
        reset on return) cost more than the entry itself. The connection is the pool's own
        (WAL pragmas applied on connect) and is used under ``_lock`` only; a forked child
        opens its own instead of sharing the parent's.
        """
        if self._held is None or self._held_pid != os.getpid():
            self._held = self._ledger.engine.raw_connection()
            self._held_pid = os.getpid()
        return self._held.driver_connection

    def answered(self, query_id: str) -> bool:
        with self._ledger.engine.connect() as conn:
            row = conn.execute(_ANSWERED, {"query_id": query_id}).first()
        return row is not None

    def append(self, query_id: str, kind: str, outcome: str, detail: dict[str, object]) -> str:
        """Add one entry (one transaction); returns its hash."""
        with _lock, self._ledger.transaction() as conn:
            return self._insert(conn, query_id, kind, outcome, detail)

    def answer_once(
        self, query_id: str, kind: str, detail: dict[str, object], refused: dict[str, object]
    ) -> str:
        """Log ``query_id`` as answered, unless it already was: then log the refusal (with
        ``refused`` as its detail) and raise ``ReplayedQuery``.

        The check and the entry are one transaction and one commit. On SQLite it is taken
        with ``BEGIN IMMEDIATE`` on the driver's connection (three prepared statements, no
        SQL compilation): two processes of one node cannot both pass the check, and a reply
        costs about a tenth of a millisecond here instead of three transactions.
        """
        if not self._file:
            with _lock, self._ledger.transaction() as conn:
                replay = conn.execute(_ANSWERED, {"query_id": query_id}).first() is not None
                outcome = "refused" if replay else "answered"
                digest = self._insert(conn, query_id, kind, outcome, refused if replay else detail)
        else:
            with _lock:
                raw = self._driver()
                cursor = raw.cursor()
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    found = cursor.execute(_SQL_ANSWERED, (query_id,)).fetchone()
                    replay = found is not None
                    last = cursor.execute(_SQL_LAST).fetchone()
                    outcome = "refused" if replay else "answered"
                    entry, digest = _entry(
                        last, query_id, kind, outcome, refused if replay else detail
                    )
                    cursor.execute(_SQL_INSERT, (*entry.values(), last_hash(last), digest))
                    raw.commit()
                except BaseException:
                    raw.rollback()
                    raise
                finally:
                    cursor.close()
        if replay:
            raise ReplayedQuery(query_id)
        return digest

    @staticmethod
    def _insert(
        conn: Connection, query_id: str, kind: str, outcome: str, detail: dict[str, object]
    ) -> str:
        last = conn.execute(_LAST).first()
        entry, digest = _entry(last, query_id, kind, outcome, detail)
        conn.execute(
            query_log.insert(), {**entry, "prev_hash": last_hash(last), "entry_hash": digest}
        )
        return digest

    def verify(self) -> int:
        """Number of entries; raises ValueError at the first bad entry.

        The checks (``protocols.audit_chain``) are the ones ``fedcredit audit verify`` runs;
        without an anchor they cannot see entries cut from the end.
        """
        entries = [query_log_entry(i + 1, row) for i, row in enumerate(self.entries())]
        report = verify_chain(entries)
        if report.first_bad is not None:
            bad = report.first_bad
            raise ValueError(
                f"{self.location}: query log broken at entry {bad.seq or bad.position}: "
                f"{bad.reason}"
            )
        return report.count

    def entries(self) -> list[dict[str, object]]:
        with self._ledger.engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(select(query_log).order_by(query_log.c.seq)).mappings()
            ]
