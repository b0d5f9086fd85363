"""Opening a ledger from a path or any SQLAlchemy URL, and writing rows to it in bulk.

SQLite is the embedded default (one file per platform, nothing to run); any database that
SQLAlchemy speaks works by passing its URL instead of a path. SQLAlchemy Core rather than
raw sqlite3 for exactly that reason; the bulk path drops to the DBAPI cursor because
building a dict per row costs more than the insert itself at millions of rows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from clients.ledger import schema
from protocols.identity import PLATFORM_NAME_PATTERN

log = logging.getLogger(__name__)


class LedgerError(RuntimeError):
    """A ledger that cannot be opened, has the wrong schema, or refused a write."""


def ledger_url(target: str | Path) -> str:
    """A SQLAlchemy URL for a path or URL (anything with '://' is taken as a URL)."""
    text = str(target)
    if "://" in text:
        try:
            make_url(text)
        except ArgumentError as exc:
            raise LedgerError(f"not a valid database URL: {text!r} ({exc})") from None
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@dataclass
class Ledger:
    """An open ledger. Cheap to create; close it (or use it as a context manager)."""

    engine: Engine
    location: str

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- schema and metadata -------------------------------------------------------------

    def create_schema(self, **meta: str) -> None:
        """Create the tables (idempotent) and record schema version and metadata."""
        try:
            self._create_schema(meta)
        except SQLAlchemyError as exc:
            raise LedgerError(f"{self.location}: cannot create the ledger schema: {exc}") from None

    def _create_schema(self, meta: dict[str, str]) -> None:
        schema.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            current = self._meta(conn)
            version = current.get("schema_version")
            if version is not None and version != str(schema.SCHEMA_VERSION):
                raise LedgerError(
                    f"{self.location}: ledger schema version {version}, "
                    f"this fedcredit writes version {schema.SCHEMA_VERSION}"
                )
            self._set_meta(conn, {"schema_version": str(schema.SCHEMA_VERSION), **meta})

    def check_schema(self) -> dict[str, str]:
        """Metadata of an existing ledger; raises if it is not a fedcredit ledger."""
        try:
            with self.engine.connect() as conn:
                meta = self._meta(conn)
        except SQLAlchemyError as exc:
            raise LedgerError(
                f"{self.location}: not a fedcredit ledger ({exc.__class__.__name__})"
            ) from None
        if meta.get("schema_version") != str(schema.SCHEMA_VERSION):
            raise LedgerError(
                f"{self.location}: ledger schema version {meta.get('schema_version')!r}, "
                f"expected {schema.SCHEMA_VERSION}"
            )
        return meta

    def meta(self) -> dict[str, str]:
        try:
            with self.engine.connect() as conn:
                return self._meta(conn)
        except SQLAlchemyError as exc:
            raise LedgerError(f"{self.location}: cannot read ledger metadata: {exc}") from None

    @staticmethod
    def _meta(conn: Connection) -> dict[str, str]:
        rows = conn.execute(select(schema.ledger_meta.c.key, schema.ledger_meta.c.value))
        return {k: v for k, v in rows}

    @staticmethod
    def _set_meta(conn: Connection, values: dict[str, str]) -> None:
        table = schema.ledger_meta
        existing = {k for (k,) in conn.execute(select(table.c.key))}
        for key, value in values.items():
            if key in existing:
                conn.execute(table.update().where(table.c.key == key).values(value=value))
            else:
                conn.execute(table.insert().values(key=key, value=value))

    def set_meta(self, conn: Connection | None = None, **values: str) -> None:
        if conn is not None:
            self._set_meta(conn, values)
            return
        with self.engine.begin() as own:
            self._set_meta(own, values)

    def rename_platform(self, new: str, *, force: bool = False) -> dict[str, str | None]:
        """Record a new platform name, in one transaction; returns what changed.

        Why refuse by default once the ledger has taken part in a federation (a non-empty
        ``query_log`` or ``received_totals``): the old name is then in the hash-chained query
        log's history, in the roster this platform enrolled under and in other platforms'
        received totals, so a silent rename would make the audit trail name a platform that
        no longer exists. ``force`` renames anyway (re-enrol afterwards). The previous name
        is kept as ``platform_renamed_from``. Raises LedgerError (the ledger is unchanged).
        """
        if not re.fullmatch(PLATFORM_NAME_PATTERN, new):
            raise LedgerError(f"platform name {new!r} must match {PLATFORM_NAME_PATTERN}")
        try:
            with self.engine.begin() as conn:
                meta = self._meta(conn)
                if meta.get("schema_version") != str(schema.SCHEMA_VERSION):
                    raise LedgerError(f"{self.location}: not a fedcredit ledger of this version")
                old = meta.get("platform")
                used = self._federation_rows(conn)
                if used and not force and old != new:
                    detail = ", ".join(f"{t}: {n} rows" for t, n in used.items())
                    raise LedgerError(
                        f"{self.location}: platform {old!r} has already taken part in a "
                        f"federation ({detail}); renaming breaks its audit trail and enrolment "
                        "(pass --force to rename anyway, then re-enrol)"
                    )
                changed: dict[str, str | None] = {"platform": new, "previous": old}
                if old != new:
                    values = {"platform": new}
                    if old:
                        values["platform_renamed_from"] = old
                    self._set_meta(conn, values)
        except SQLAlchemyError as exc:
            raise LedgerError(f"{self.location}: rename failed (nothing changed): {exc}") from None
        log.info("%s: platform %r renamed to %r", self.location, old, new)
        return changed

    @staticmethod
    def _federation_rows(conn: Connection) -> dict[str, int]:
        """Rows in the tables a federation writes (query log, received totals), if any."""
        present = set(inspect(conn).get_table_names())
        found = {}
        for name in ("query_log", "received_totals"):
            if name in present:
                count = conn.execute(text(f"SELECT COUNT(*) FROM {name}")).scalar_one()
                if count:
                    found[name] = int(count)
        return found

    # -- reading and writing -------------------------------------------------------------

    def count(self, table: Table) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction: everything inside commits together or not at all."""
        with self.engine.begin() as conn:
            yield conn


def prepare_bulk_load(conn: Connection) -> None:
    """Trade durability for speed on a connection that writes a brand-new SQLite file.

    Only for files that are renamed into place when complete (the generator's, the
    benchmark's): journal and fsync off, foreign-key checks off (callers write consistent
    rows and the tests run ``PRAGMA foreign_key_check``), 256 MiB of page cache.
    A no-op on other databases. Must run outside a transaction.
    """
    if conn.dialect.name != "sqlite":
        return
    for pragma in (
        "journal_mode=OFF",
        "synchronous=OFF",
        "foreign_keys=OFF",
        "cache_size=-262144",
    ):
        conn.exec_driver_sql(f"PRAGMA {pragma}")
    conn.commit()


def bulk_insert(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    chunk: int = 50_000,
) -> int:
    """Insert positional rows; returns the number written.

    On drivers with positional parameters (sqlite3, most others) the rows go straight to
    the DBAPI ``executemany`` in chunks; elsewhere they become dicts for SQLAlchemy.
    Runs inside the caller's transaction, so a failure part-way rolls everything back.
    """
    stmt = table.insert().compile(dialect=conn.dialect, column_keys=list(columns))
    written = 0
    iterator = iter(rows)
    if conn.dialect.positional and list(stmt.positiontup or []) == list(columns):
        sql = str(stmt)
        cursor = conn.connection.cursor()
        try:
            while batch := list(islice(iterator, chunk)):
                cursor.executemany(sql, batch)
                written += len(batch)
        finally:
            cursor.close()
        return written
    insert = table.insert()
    while batch_rows := list(islice(iterator, chunk)):
        conn.execute(insert, [dict(zip(columns, row, strict=True)) for row in batch_rows])
        written += len(batch_rows)
    return written


def open_ledger(target: str | Path, *, create: bool = False) -> Ledger:
    """Open a ledger by path or SQLAlchemy URL.

    With ``create=False`` a SQLite path must already exist: a typo should not silently
    create an empty ledger that then answers every query with zero.
    """
    url = ledger_url(target)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not create and not path.exists():
            raise LedgerError(f"{target}: ledger not found")
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(f"{target}: cannot create the ledger's folder: {exc}") from None
    try:
        engine = create_engine(url)
    except (ArgumentError, SQLAlchemyError, ImportError) as exc:
        raise LedgerError(f"{target}: cannot open ledger: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return Ledger(engine=engine, location=str(target))
