"""Importing a platform's extract (CSV or Parquet) into its ledger: all of it, or nothing.

Why validate everything before writing anything: a half-imported extract is worse than a
rejected one, because every later answer to the bureau (debt sums, model updates) would be
silently wrong. So the whole file is read and checked first, every problem is collected
(the first ``MAX_ISSUES`` are listed, each naming file, row, CSV line and column), and only
a clean file is written, in one transaction that rolls back on any database error.

Why the stdlib ``csv`` module over a dataframe library: exact line numbers in errors, no
type guessing (a column of IDs with leading zeros stays text), and predictable failure on
hostile input (ragged rows, NUL bytes, stray quotes, bad encodings). Lines are split on the
newline byte and decoded one at a time, so even an encoding error names its line.

Raw national IDs are turned into tokens (``protocols.tokens``) as each row is read, and are
never stored, logged, or echoed in an error message.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel
from sqlalchemy import bindparam, func, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from clients.ledger import schema
from clients.ledger.mapping import (
    BORROWER_FIELDS,
    DPD_WINDOW_MONTHS,
    MAX_ISSUES,
    MISSING_LEVEL,
    OTHER_LEVEL,
    BoundField,
    Cell,
    CellError,
    ImportIssue,
    ImportValidationError,
    Mapping,
    MappingError,
    check_mapping,
    dpd_for_code,
    history_amount_parser,
    level_slug,
    load_mapping,
    to_integer,
)
from clients.ledger.store import Ledger, LedgerError, bulk_insert, ledger_url, open_ledger
from protocols import tokens
from protocols.identity import PLATFORM_NAME_PATTERN

log = logging.getLogger(__name__)

#: A physical line longer than this is refused (a file with no newlines is not a CSV).
MAX_LINE_BYTES = 1 << 20
#: Values per ``IN (...)`` query when checking against the ledger (SQLite's limit is 999+).
_IN_CHUNK = 500
_TOKEN = re.compile(r"[0-9a-fA-F]{64}")
_LOOKS_NUMERIC = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")

_BORROWER_COLUMNS = ("token", *(info.column for info in BORROWER_FIELDS.values()))
_LOAN_COLUMNS = schema.LOAN_COLUMNS
_LOAN_FIELD_ORDER = (
    "product",
    "open_date",
    "credit_limit",
    "principal",
    "balance",
    "term_months",
    "annual_rate",
    "monthly_repayment",
    "days_past_due",
    "max_dpd_12m",
    "repayment_status",
)
_HISTORY_COLUMNS = schema.HISTORY_COLUMNS
_FEATURE_COLUMNS = ("token", "name", "value")

__all__ = [
    "ImportIssue",
    "ImportReport",
    "ImportValidationError",
    "LedgerError",
    "MappingError",
    "import_file",
]


class ImportReport(BaseModel):
    """What an import did; ``model_dump(mode="json")`` is the CLI's ``--json`` output."""

    source: str
    ledger: str
    partition: str | None
    platform: str | None
    rows: int
    rows_read: int
    borrowers: int
    borrowers_new: int
    borrowers_updated: int
    loans: int
    history_rows: int
    features: int
    features_missing: int
    seconds: float


# -- problems ---------------------------------------------------------------------------


class _Issues:
    """Collects problems: keeps the first MAX_ISSUES, counts the rest."""

    def __init__(self) -> None:
        self.kept: list[ImportIssue] = []
        self.more = 0

    def add(self, issue: ImportIssue) -> None:
        if len(self.kept) < MAX_ISSUES:
            self.kept.append(issue)
        else:
            self.more += 1

    def __bool__(self) -> bool:
        return bool(self.kept)

    def raise_if_any(self) -> None:
        if self.kept:
            raise ImportValidationError(self.kept, self.more)


class _SourceFatal(Exception):
    """A structural problem after which the rest of the file cannot be read reliably."""

    def __init__(self, message: str, *, row: int | None = None, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.row = row
        self.line = line


def _where(row: int, line: int | None) -> str:
    return f"row {row}" + (f" (line {line})" if line is not None else "")


def _show(text: Cell, limit: int = 40) -> str:
    text = text.isoformat() if isinstance(text, date) else text
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- the plan: mapping, key, partition, format -----------------------------------------


@dataclass
class _Plan:
    """Everything decided before the source is opened."""

    source: Path
    name: str
    mapping: Mapping
    fields: dict[str, BoundField]
    fmt: str
    key: bytes | None
    partition: str | None
    tokenize: Callable[[str], str]


def _make_plan(
    source: Path,
    mapping: Path | str | Mapping,
    key: bytes | None,
    partition: str | None,
    platform: str | None = None,
) -> _Plan:
    if isinstance(mapping, Mapping):
        fields = check_mapping(mapping)
    else:
        mapping = load_mapping(Path(mapping))
        fields = check_mapping(mapping)
    issues = _Issues()
    fmt = _source_format(source, mapping, issues)
    _check_key(key, source, mapping, issues)
    _check_partition(partition, mapping, issues)
    if platform is not None and not re.fullmatch(PLATFORM_NAME_PATTERN, platform):
        message = f"platform name {platform!r} must match {PLATFORM_NAME_PATTERN}"
        issues.add(ImportIssue(file=source.name, key="platform", message=message))
    issues.raise_if_any()
    assert fmt is not None
    return _Plan(
        source=source,
        name=source.name,
        mapping=mapping,
        fields=fields,
        fmt=fmt,
        key=bytes(key) if key is not None else None,
        partition=partition,
        tokenize=_tokenizer(mapping, key),
    )


def _source_format(source: Path, mapping: Mapping, issues: _Issues) -> str | None:
    if mapping.source.format is not None:
        return mapping.source.format
    suffix = source.suffix.lower()
    if suffix in (".csv", ".txt", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    issues.add(
        ImportIssue(
            file=source.name,
            message=f"cannot tell the format from extension {suffix!r}; set source.format",
        )
    )
    return None


def _check_key(key: bytes | None, source: Path, mapping: Mapping, issues: _Issues) -> None:
    kind = mapping.borrower.id.kind
    if key is None:
        if kind != "token":
            issues.add(
                ImportIssue(
                    file=source.name,
                    message=f"a federation key is needed to turn {kind} values into tokens",
                )
            )
        return
    try:
        tokens.key_id(key)
    except tokens.InvalidFederationKey as exc:
        issues.add(ImportIssue(file=source.name, message=str(exc)))


def _check_partition(partition: str | None, mapping: Mapping, issues: _Issues) -> None:
    spec = mapping.partition
    if spec is None and partition is not None:
        message = f"partition {partition!r} requested, but the mapping has no [partition]"
        issues.add(ImportIssue(file=mapping.origin, key="partition", message=message))
    elif spec is not None and partition is None:
        names = ", ".join(spec.names)
        message = f"the mapping splits the file across platforms; choose one of: {names}"
        issues.add(ImportIssue(file=mapping.origin, key="partition", message=message))
    elif spec is not None and partition not in spec.names:
        names = ", ".join(spec.names)
        message = f"unknown partition {partition!r}; the mapping names: {names}"
        issues.add(ImportIssue(file=mapping.origin, key="partition.names", message=message))


def _tokenizer(mapping: Mapping, key: bytes | None) -> Callable[[str], str]:
    """Raw borrower id -> token; raises ValueError whose message never contains the raw id."""
    kind = mapping.borrower.id.kind
    if kind == "token":

        def from_token(raw: str) -> str:
            if not _TOKEN.fullmatch(raw):
                raise ValueError("a token must be 64 hexadecimal characters")
            return raw.lower()

        return from_token
    assert key is not None
    if kind == "customer_number":
        namespace = mapping.borrower.namespace or ""
        return lambda raw: tokens.token_for_customer_number(key, namespace, raw)
    return lambda raw: tokens.token_for_normalised(key, tokens.normalise_national_id(raw))


# -- reading the source ------------------------------------------------------------------


@dataclass
class _Record:
    row: int
    line: int | None
    cells: Sequence[Cell]


class _LineSource:
    """Physical lines of a file, decoded one at a time so each problem has its line number."""

    def __init__(self, fh: BinaryIO, encoding: str, on_bytes: Callable[[int], None]) -> None:
        self.fh = fh
        self.encoding = encoding
        self.on_bytes = on_bytes
        self.line = 0

    def __iter__(self) -> _LineSource:
        return self

    def __next__(self) -> str:
        raw = self.fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            raise StopIteration
        self.line += 1
        self.on_bytes(len(raw))
        if len(raw) > MAX_LINE_BYTES:
            raise _SourceFatal(f"line longer than {MAX_LINE_BYTES} bytes", line=self.line)
        try:
            text = raw.decode(self.encoding)
        except UnicodeDecodeError as exc:
            message = (
                f"not valid {self.encoding}: byte 0x{raw[exc.start]:02x} "
                f"at byte {exc.start + 1} of the line"
            )
            raise _SourceFatal(message, line=self.line) from None
        if self.line == 1 and text.startswith("\ufeff"):
            text = text[1:]
        if "\x00" in text:
            raise _SourceFatal("NUL byte in the line (is this a binary file?)", line=self.line)
        return text


@contextmanager
def _open_csv(
    plan: _Plan, on_bytes: Callable[[int], None]
) -> Iterator[tuple[list[str], int, Iterator[_Record]]]:
    """(header, header line, records) of a CSV file."""
    src = plan.mapping.source
    try:
        fh = plan.source.open("rb")
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise _SourceFatal(
            f"cannot open the file: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    with fh:
        lines = _LineSource(fh, src.encoding, on_bytes)
        reader = csv.reader(lines, delimiter=src.delimiter, quotechar='"', strict=True)
        header, header_line = _csv_header(reader, lines)
        yield header, header_line, _csv_records(reader, lines)


def _csv_header(reader: Iterator[list[str]], lines: _LineSource) -> tuple[list[str], int]:
    while True:
        start = lines.line + 1
        try:
            cells = next(reader)
        except StopIteration:
            raise _SourceFatal("the file is empty: no header line") from None
        except csv.Error as exc:
            raise _SourceFatal(f"unreadable header: {_csv_hint(exc)}", line=start) from None
        except OSError as exc:
            raise _SourceFatal(f"read error: {exc}", line=start) from None
        if cells:
            return [c.strip() for c in cells], start


def _csv_records(reader: Iterator[list[str]], lines: _LineSource) -> Iterator[_Record]:
    row = 0
    while True:
        start = lines.line + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            message = f"{_csv_hint(exc)} (reading stopped at line {lines.line})"
            raise _SourceFatal(message, row=row + 1, line=start) from None
        except OSError as exc:
            raise _SourceFatal(f"read error: {exc}", line=start) from None
        if not cells:
            continue  # a blank line: not a row
        row += 1
        yield _Record(row, start, [c.strip() for c in cells])


def _csv_hint(exc: csv.Error) -> str:
    """The csv module's message, with the likely cause where it is not obvious."""
    text = str(exc)
    if "new-line character" in text:
        return "carriage return inside an unquoted field (old Mac line endings?)"
    return text


@contextmanager
def _open_parquet(
    plan: _Plan, on_rows: Callable[[int], None]
) -> Iterator[tuple[list[str], int | None, Iterator[_Record]]]:
    """(header, None, records) of a Parquet file; only mapped columns are converted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(plan.source)
        arrow_schema = pfile.schema_arrow
    except (pa.ArrowException, OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise _SourceFatal(f"not a readable Parquet file: {exc}") from None
    header = [str(n).strip() for n in arrow_schema.names]
    used = plan.mapping.used_columns()
    wanted = [n for n in dict.fromkeys(header) if n in used and header.count(n) == 1]
    unsupported = [n for n in wanted if not _supported_arrow(arrow_schema.field(n).type)]
    if unsupported:
        detail = ", ".join(f"{n!r} ({arrow_schema.field(n).type})" for n in unsupported)
        raise _SourceFatal(f"unsupported column types: {detail}")
    try:
        yield header, None, _parquet_records(pfile, header, wanted, on_rows)
    finally:
        pfile.close()


def _supported_arrow(kind: Any) -> bool:
    import pyarrow as pa

    t = pa.types
    if t.is_dictionary(kind):
        return _supported_arrow(kind.value_type)
    checks = (
        t.is_integer,
        t.is_floating,
        t.is_decimal,
        t.is_string,
        t.is_large_string,
        t.is_boolean,
        t.is_date,
        t.is_timestamp,
        t.is_null,
        getattr(t, "is_string_view", lambda _k: False),
    )
    return any(check(kind) for check in checks)


def _parquet_records(
    pfile: Any, header: list[str], wanted: list[str], on_rows: Callable[[int], None]
) -> Iterator[_Record]:
    import pyarrow as pa

    position = {name: header.index(name) for name in wanted}
    row = 0
    batches = pfile.iter_batches(batch_size=65_536, columns=wanted) if wanted else None
    try:
        if batches is None:  # no mapped column is present: rows are all empty
            for _ in range(pfile.metadata.num_rows):
                row += 1
                yield _Record(row, None, [""] * len(header))
            return
        for batch in batches:
            columns = {
                name: [_arrow_cell(v) for v in batch.column(i).to_pylist()]
                for i, name in enumerate(batch.schema.names)
            }
            for i in range(batch.num_rows):
                cells: list[Cell] = [""] * len(header)
                for name, values in columns.items():
                    cells[position[name]] = values[i]
                row += 1
                yield _Record(row, None, cells)
            on_rows(batch.num_rows)
    except (pa.ArrowException, OSError, ValueError, TypeError, OverflowError) as exc:
        raise _SourceFatal(f"unreadable Parquet data: {exc}", row=row + 1) from None


def _arrow_cell(value: Any) -> Cell:
    """A Parquet value as the text a CSV would have held (dates stay dates)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) < 1e18:
            return str(int(value))
        return repr(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return str(value)


# -- checking the header -----------------------------------------------------------------


def _check_header(
    header: list[str], line: int | None, plan: _Plan, issues: _Issues, is_csv: bool
) -> tuple[dict[str, int], bool]:
    """(column name -> position, whether every mapped column is there exactly once).

    Reports unnamed, duplicate, missing and unknown columns.
    """
    name = plan.name
    if is_csv and all(h and _LOOKS_NUMERIC.fullmatch(h) for h in header):
        raise _SourceFatal(
            "the first line holds numbers, not column names: the file has no header line",
            line=line,
        )
    position: dict[str, int] = {}
    doubled: set[str] = set()
    for i, column in enumerate(header):
        if not column:
            message = f"column {i + 1} of the header has no name"
            issues.add(ImportIssue(file=name, line=line, message=message))
        elif column in position:
            doubled.add(column)
            message = f"appears twice in the header (columns {position[column] + 1} and {i + 1})"
            issues.add(ImportIssue(file=name, line=line, column=column, message=message))
        else:
            position[column] = i
    used = plan.mapping.used_columns()
    ignore = set(plan.mapping.source.ignore)
    for column, keys in used.items():
        if column not in position:
            message = f"mapped column is missing from the file (used by {', '.join(keys)})"
            issues.add(ImportIssue(file=name, line=line, column=column, message=message))
    for column in position:
        if column and column not in used and column not in ignore:
            message = "column is neither mapped nor listed in source.ignore"
            issues.add(ImportIssue(file=name, line=line, column=column, message=message))
    for column in sorted(ignore - set(position)):
        log.warning("%s: ignored column %r is not in the file", name, column)
    complete = all(c in position and c not in doubled for c in used)
    return position, complete


# -- turning rows into ledger rows -------------------------------------------------------


@dataclass
class _Slot:
    """One mapped field as read from one file: its position (None: constant) and converter."""

    name: str
    index: int | None
    bound: BoundField

    def value(self, cells: Sequence[Cell]) -> Any:
        if self.index is None:
            return self.bound.constant
        return self.bound.convert(cells[self.index])


@dataclass
class _Batch:
    """Everything read from the source, validated, ready to write."""

    issues: _Issues = field(default_factory=_Issues)
    rows_read: int = 0
    rows: int = 0
    borrowers: dict[str, list[Any]] = field(default_factory=dict)
    borrower_rows: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    features: dict[str, dict[str, float | None]] = field(default_factory=dict)
    loans: list[tuple[Any, ...]] = field(default_factory=list)
    loan_rows: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    history: list[tuple[Any, ...]] = field(default_factory=list)


class _RowReader:
    """Validates rows one at a time and accumulates the ledger rows they become."""

    def __init__(
        self, plan: _Plan, position: dict[str, int], width: int, batch: _Batch, complete: bool
    ) -> None:
        self.plan = plan
        self.complete = complete
        self.name = plan.name
        self.width = width
        self.batch = batch
        mapping = plan.mapping
        self.row_number = mapping.borrower.id.row_number
        self.id_index = (
            position.get(mapping.borrower.id.column) if mapping.borrower.id.column else None
        )
        self.scoring_only = mapping.loan.scoring_only
        self.missing = frozenset(mapping.source.missing) - {""}
        self.reported: set[str | None] = set()
        self.id_column = mapping.borrower.id.column
        self.id_kind = mapping.borrower.id.kind.replace("_", " ")
        self.borrower_slots = self._slots("borrower.", position, BORROWER_FIELDS)
        self.feature_slots = self._slots("borrower.features.", position, None)
        self.loan_slots = {s.name: s for s in self._slots("loan.", position, None)}
        self.partition_index: int | None = None
        if mapping.partition is not None:
            self.partition_index = position.get(mapping.partition.column)
        self._init_history(position)

    def _slots(
        self, prefix: str, position: dict[str, int], only: dict[str, Any] | None
    ) -> list[_Slot]:
        slots = []
        for key, bound in self.plan.fields.items():
            rest = key.removeprefix(prefix)
            if rest == key or "." in rest or (only is not None and rest not in only):
                continue
            if bound.column is None:
                slots.append(_Slot(rest, None, bound))
            elif bound.column in position:
                slots.append(_Slot(rest, position[bound.column], bound))
        return slots

    def _init_history(self, position: dict[str, int]) -> None:
        history = self.plan.mapping.history
        self.history = history
        if history is None:
            return
        source = self.plan.mapping.source
        self.months = history.months()
        self.status_map = history.map
        self.amounts: list[tuple[list[int | None], Callable[[Cell], int | None], list[str]]] = []
        self.history_index = [position.get(c) for c in history.columns]
        for part in ("amount_due", "amount_paid"):
            spec = getattr(history, part)
            if spec is None:
                self.amounts.append(([None] * len(history.columns), lambda _c: None, []))
                continue
            parser = history_amount_parser(spec, source, part)
            self.amounts.append(([position.get(c) for c in spec.columns], parser, spec.columns))

    # -- one row ----------------------------------------------------------------------------

    def issue(self, rec: _Record, column: str | None, message: str) -> None:
        self.batch.issues.add(
            ImportIssue(file=self.name, row=rec.row, line=rec.line, column=column, message=message)
        )

    def cell_issue(self, rec: _Record, column: str | None, message: str) -> None:
        """A bad cell, reported once even when several fields read its column."""
        if column is not None and column in self.reported:
            return
        self.reported.add(column)
        self.issue(rec, column, message)

    def add(self, rec: _Record) -> None:
        """Validate one record; on success add its borrower, loan and history rows."""
        if len(rec.cells) != self.width:
            message = f"has {len(rec.cells)} fields, the header has {self.width}"
            self.issue(rec, None, message)
            return
        self.batch.rows_read += 1
        if not self.complete:  # mapped columns are missing: reported once, at the header
            return
        if self.missing:
            missing = self.missing
            rec.cells = ["" if c in missing else c for c in rec.cells]
        self.reported = set()
        if not self._in_partition(rec):
            return
        self.batch.rows += 1
        token = self._token(rec)
        borrower = self._values(rec, self.borrower_slots)
        features = self._values(rec, self.feature_slots)
        loan = self._values(rec, list(self.loan_slots.values()))
        history = self._history(rec) if self.history is not None else None
        if token is None or borrower is None or features is None or loan is None:
            return
        if self.history is not None and history is None:
            return
        if history is not None:
            self._derive(loan, history[0])
        if not self._check_dpd(rec, loan):
            return
        self._add_borrower(rec, token, borrower, features)
        if not self.scoring_only:
            self._add_loan(rec, token, loan, history)

    def _in_partition(self, rec: _Record) -> bool:
        spec = self.plan.mapping.partition
        if spec is None or self.partition_index is None:
            return spec is None
        try:
            value = to_integer(rec.cells[self.partition_index])
        except CellError as exc:
            self.cell_issue(rec, spec.column, f"partition column: {exc}")
            return False
        return spec.names[value % len(spec.names)] == self.plan.partition

    def _token(self, rec: _Record) -> str | None:
        if self.row_number:
            return self.plan.tokenize(str(rec.row))
        if self.id_index is None:
            return None
        raw = rec.cells[self.id_index]
        if raw == "" or isinstance(raw, date):
            self.issue(rec, self.id_column, f"empty or non-text borrower id ({self.id_kind})")
            return None
        try:
            return self.plan.tokenize(raw)
        except ValueError as exc:  # InvalidNationalID; its message never holds the raw id
            self.cell_issue(rec, self.id_column, f"invalid {self.id_kind}: {exc}")
            return None

    def _values(self, rec: _Record, slots: list[_Slot]) -> dict[str, Any] | None:
        values: dict[str, Any] = {}
        ok = True
        for slot in slots:
            try:
                values[slot.name] = slot.value(rec.cells)
            except CellError as exc:
                self.cell_issue(rec, slot.bound.column, str(exc))
                ok = False
        return values if ok else None

    def _history(self, rec: _Record) -> tuple[list[str], list[list[int | None]]] | None:
        assert self.history is not None
        if None in self.history_index:
            return None
        ok = True
        codes: list[str] = []
        for index, column in zip(self.history_index, self.history.columns, strict=True):
            assert index is not None
            cell = rec.cells[index]
            text = cell.isoformat() if isinstance(cell, date) else cell
            code = self.status_map.get(text)
            if code is None:
                what = "empty history status" if text == "" else f"value {_show(text)}"
                self.cell_issue(rec, column, f"{what} is not in [history].map")
                ok = False
            codes.append(code or "")
        amounts: list[list[int | None]] = []
        for indexes, parse, columns in self.amounts:
            values: list[int | None] = []
            for i, index in enumerate(indexes):
                if index is None:
                    if columns:  # a mapped amount column is missing (reported at the header)
                        ok = False
                    values.append(None)
                    continue
                try:
                    values.append(parse(rec.cells[index]))
                except CellError as exc:
                    self.cell_issue(rec, columns[i], str(exc))
                    ok = False
            amounts.append(values)
        return (codes, amounts) if ok else None

    def _derive(self, loan: dict[str, Any], codes: list[str]) -> None:
        """Fill unmapped status fields from the history codes (see docs/import-mapping.md)."""
        if "repayment_status" not in self.loan_slots:
            loan["repayment_status"] = "".join(codes)
        if "days_past_due" not in self.loan_slots:
            loan["days_past_due"] = dpd_for_code(codes[-1])
        if "max_dpd_12m" not in self.loan_slots:
            loan["max_dpd_12m"] = max(dpd_for_code(c) for c in codes[-DPD_WINDOW_MONTHS:])

    def _check_dpd(self, rec: _Record, loan: dict[str, Any]) -> bool:
        current, worst = loan.get("days_past_due"), loan.get("max_dpd_12m")
        if current is None or worst is None or worst >= current:
            return True
        slot = self.loan_slots.get("max_dpd_12m") or self.loan_slots.get("days_past_due")
        column = slot.bound.column if slot else None
        self.issue(rec, column, f"max_dpd_12m {worst} is below days_past_due {current}")
        return False

    def _add_borrower(
        self, rec: _Record, token: str, values: dict[str, Any], features: dict[str, Any]
    ) -> None:
        batch = self.batch
        new = [values.get(name) for name in BORROWER_FIELDS]
        if token not in batch.borrowers:
            batch.borrowers[token] = new
            batch.borrower_rows[token] = (rec.row, rec.line)
            batch.features[token] = dict(features)
            return
        first = _where(*batch.borrower_rows[token])
        old = batch.borrowers[token]
        for i, slot_name in enumerate(BORROWER_FIELDS):
            old[i] = self._merge(rec, first, slot_name, old[i], new[i], self.borrower_slots)
        old_features = batch.features[token]
        for name, value in features.items():
            old_features[name] = self._merge(
                rec, first, name, old_features.get(name), value, self.feature_slots
            )

    def _merge(
        self, rec: _Record, first: str, name: str, old: Any, new: Any, slots: list[_Slot]
    ) -> Any:
        """One borrower attribute seen on two rows: unknown yields to known; else must agree."""
        if old is None or new is None or old == new:
            return new if old is None else old
        column = next((s.bound.column for s in slots if s.name == name), None)
        message = f"the same borrower has {name} {old} on {first} but {new} here"
        self.issue(rec, column, message)
        return old

    def _add_loan(
        self,
        rec: _Record,
        token: str,
        loan: dict[str, Any],
        history: tuple[list[str], list[list[int | None]]] | None,
    ) -> None:
        batch = self.batch
        loan_id = loan["loan_id"]
        if loan_id in batch.loan_rows:
            first = _where(*batch.loan_rows[loan_id])
            column = self.loan_slots["loan_id"].bound.column
            self.issue(rec, column, f"duplicate loan id {_show(loan_id)} (first on {first})")
            return
        batch.loan_rows[loan_id] = (rec.row, rec.line)
        batch.loans.append((loan_id, token, *(loan.get(f) for f in _LOAN_FIELD_ORDER)))
        if history is None:
            return
        codes, (due, paid) = history
        for i, month in enumerate(self.months):
            batch.history.append((loan_id, month, codes[i], due[i], paid[i]))


# -- the ledger --------------------------------------------------------------------------


@contextmanager
def _database_errors(ledger: Ledger, action: str) -> Iterator[None]:
    """Turn SQLAlchemy and driver errors into LedgerError, so callers handle one type.

    The driver's own exceptions matter because ``bulk_insert`` writes through the raw
    DBAPI cursor, where SQLAlchemy does not wrap them.
    """
    dbapi = getattr(ledger.engine.dialect, "loaded_dbapi", None)
    driver_error: type[BaseException] = getattr(dbapi, "Error", SQLAlchemyError)
    try:
        yield
    except LedgerError:
        raise
    except (SQLAlchemyError, driver_error) as exc:
        detail = getattr(exc, "orig", None) or exc
        raise LedgerError(f"{ledger.location}: {action} failed: {detail}") from None
    except (OSError, ValueError) as exc:  # e.g. sqlite3 refusing a path with a NUL byte
        raise LedgerError(f"{ledger.location}: {action} failed: {exc}") from None


def _open(target: str | Path) -> Ledger:
    """open_ledger, with a parent folder that cannot be created reported as LedgerError."""
    try:
        return open_ledger(target, create=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise LedgerError(f"{target}: cannot create the ledger: {exc}") from None


def _ledger_state(ledger: Ledger, target: str | Path) -> dict[str, str] | None:
    """Metadata of an existing fedcredit ledger, or None when the ledger is new or empty."""
    url = make_url(ledger_url(target))
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database)
        try:
            if not path.exists() or (path.is_file() and path.stat().st_size == 0):
                return None
        except (OSError, ValueError) as exc:
            raise LedgerError(f"{ledger.location}: cannot read the ledger: {exc}") from None
    with _database_errors(ledger, "reading the ledger"):
        names = set(inspect(ledger.engine).get_table_names())
        if "ledger_meta" not in names:
            if names:
                raise LedgerError(
                    f"{ledger.location}: not a fedcredit ledger (has tables "
                    f"{', '.join(sorted(names))} but no ledger_meta)"
                )
            return None
        return ledger.check_schema()


def _ledger_meta(
    plan: _Plan,
    state: dict[str, str] | None,
    platform: str | None,
    location: str,
    require_platform: bool = False,
) -> dict[str, str]:
    """The metadata this import records; refuses a ledger of another key or platform.

    The platform name is ``platform`` (``--platform``), else the mapping's ``platform``,
    else the partition name, else what the ledger records. With ``require_platform`` (the
    CLI) an import that leaves the ledger without a name is refused: a nameless ledger
    joins a federation as "unnamed" and fails there, far from the cause.
    """
    state = state or {}
    meta = {"source": "import"}
    if plan.key is not None:
        meta["key_id"] = tokens.key_id(plan.key)
        recorded = state.get("key_id")
        if recorded is not None and recorded != meta["key_id"]:
            raise LedgerError(
                f"{location}: the ledger holds tokens made under federation key {recorded}, "
                f"this import uses key {meta['key_id']}; refusing to mix them"
            )
    wanted = platform or plan.mapping.platform or plan.partition
    recorded_platform = state.get("platform")
    if require_platform and not (wanted or recorded_platform):
        message = (
            'no platform name: give --platform NAME (or platform = "NAME" in the mapping); '
            "a federation needs every ledger to name its platform"
        )
        raise ImportValidationError([ImportIssue(file=plan.name, key="platform", message=message)])
    if wanted and recorded_platform and wanted != recorded_platform:
        raise LedgerError(
            f"{location}: the ledger belongs to platform {recorded_platform!r}, "
            f"this import is for {wanted!r}"
        )
    if wanted or recorded_platform:
        meta["platform"] = wanted or recorded_platform or ""
    else:
        log.warning(
            "%s: the ledger records no platform name; a federation will refuse it "
            "(fedcredit ledger rename %s --platform NAME)",
            location,
            location,
        )
    as_of = plan.mapping.source.as_of
    if as_of is not None:
        meta["as_of"] = as_of.isoformat()
    return meta


def _existing(ledger: Ledger, column: Any, values: Iterable[str]) -> set[str]:
    """Which of ``values`` the ledger already holds in ``column``."""
    found: set[str] = set()
    pending = sorted(values)
    with ledger.engine.connect() as conn:
        for start in range(0, len(pending), _IN_CHUNK):
            chunk = pending[start : start + _IN_CHUNK]
            found.update(conn.execute(select(column).where(column.in_(chunk))).scalars())
    return found


def _check_against_ledger(ledger: Ledger, plan: _Plan, batch: _Batch) -> set[str]:
    """Report loan ids the ledger already holds; return the tokens it already holds."""
    with _database_errors(ledger, "reading the ledger"):
        clashes = _existing(ledger, schema.loans.c.loan_id, batch.loan_rows)
        known = _existing(ledger, schema.borrowers.c.token, batch.borrowers)
    for loan_id in sorted(clashes, key=lambda x: batch.loan_rows[x]):
        loan_field = plan.fields["loan.loan_id"]
        row, line = batch.loan_rows[loan_id]
        batch.issues.add(
            ImportIssue(
                file=plan.name,
                row=row,
                line=line,
                column=loan_field.column,
                message=f"loan id {_show(loan_id)} is already in the ledger",
            )
        )
    return known


# -- progress ------------------------------------------------------------------------------


class _Progress:
    """A rich progress display when asked for, otherwise nothing (and no overhead)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.pending = 0
        self.task: Any = None

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            self.bar = bar
            yield self
        self.bar = None

    def start(self, description: str, total: int | None) -> None:
        self.flush()
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self.bar is None:
            return
        self.pending += amount
        if self.pending >= 1 << 16:
            self.flush()

    def flush(self) -> None:
        if self.bar is not None and self.task is not None and self.pending:
            self.bar.advance(self.task, self.pending)
        self.pending = 0


# -- reading, then writing -----------------------------------------------------------------


def _read_source(plan: _Plan, progress: _Progress) -> _Batch:
    """Read and validate the whole source; every problem lands in ``batch.issues``."""
    batch = _Batch()
    is_csv = plan.fmt == "csv"
    try:
        size = plan.source.stat().st_size if is_csv else None
    except (OSError, ValueError):
        size = None
    progress.start(f"reading {plan.name}", size)
    opener = _open_csv if is_csv else _open_parquet
    try:
        with opener(plan, progress.advance) as (header, line, records):
            position, complete = _check_header(header, line, plan, batch.issues, is_csv)
            reader = _RowReader(plan, position, len(header), batch, complete)
            for record in records:
                reader.add(record)
        _expand_categories(plan, batch)
    except _SourceFatal as fatal:
        batch.issues.add(
            ImportIssue(file=plan.name, row=fatal.row, line=fatal.line, message=fatal.message)
        )
    except MemoryError:
        batch.issues.add(ImportIssue(file=plan.name, message="too large to validate in memory"))
    progress.flush()
    if not batch.issues and batch.rows == 0:
        where = f" for partition {plan.partition!r}" if plan.partition else ""
        batch.issues.add(ImportIssue(file=plan.name, message=f"no data rows{where}"))
    return batch


def _expand_categories(plan: _Plan, batch: _Batch) -> None:
    """One-hot encode every categorical feature: one 0/1 feature per level.

    Rows were read into level names (declared levels) or raw values (levels taken from the
    file); here the raw values become levels (the ``max_levels`` most frequent, the rest
    "other"), and every borrower gets every level's feature, so the columns do not depend
    on which borrower holds which value. A missing cell sets the "missing" level.
    """
    names = set(plan.mapping.borrower.features)
    for feature, spec in plan.mapping.borrower.features.items():
        if spec.kind != "categorical":
            continue
        declared = spec.level_names()
        if declared is None:
            to_level = _levels_from_file(plan, batch, feature, names)
            if to_level is None:
                continue
            levels = list(dict.fromkeys(to_level.values()))
        else:
            to_level = None
            levels = list(dict.fromkeys(declared.values()))
        if spec.other and OTHER_LEVEL not in levels:
            levels.append(OTHER_LEVEL)
        levels.append(MISSING_LEVEL)
        for values in batch.features.values():
            value = values.pop(feature, None)
            if value is None:
                level = MISSING_LEVEL
            elif to_level is not None:
                level = to_level.get(value, OTHER_LEVEL)
            else:
                level = value
            for name in levels:
                values[f"{feature}_{name}"] = 1.0 if name == level else 0.0


def _levels_from_file(
    plan: _Plan, batch: _Batch, feature: str, names: set[str]
) -> dict[str, str] | None:
    """Source value -> level name for a categorical feature without declared levels."""
    spec = plan.mapping.borrower.features[feature]
    counts: dict[str, int] = {}
    for values in batch.features.values():
        value = values.get(feature)
        if value is not None:
            counts[value] = counts.get(value, 0) + 1
    ranked = sorted(counts, key=lambda v: (-counts[v], v))
    if len(ranked) > spec.max_levels and not spec.other:
        message = (
            f"categorical feature {feature} has {len(ranked)} distinct values, more than "
            f"max_levels = {spec.max_levels}; declare its levels or allow other = true"
        )
        batch.issues.add(ImportIssue(file=plan.name, column=spec.column, message=message))
        return None
    room = 64 - len(feature) - 1
    taken = {OTHER_LEVEL, MISSING_LEVEL}
    to_level: dict[str, str] = {}
    for value in sorted(ranked[: spec.max_levels]):
        base = level_slug(value)[:room] or "blank"
        level, n = base, 1
        while level in taken or f"{feature}_{level}" in names:
            n += 1
            level = f"{base[: room - len(str(n)) - 1]}_{n}"
        taken.add(level)
        to_level[value] = level
    if len(ranked) > spec.max_levels:
        log.warning(
            "%s: feature %s: %d values beyond max_levels = %d go to level %r",
            plan.name,
            feature,
            len(ranked) - spec.max_levels,
            spec.max_levels,
            OTHER_LEVEL,
        )
    return to_level


def _write(
    ledger: Ledger,
    fresh: bool,
    meta: dict[str, str],
    batch: _Batch,
    known: set[str],
    progress: _Progress,
) -> dict[str, int]:
    """Write the batch in one transaction; any failure rolls all of it back."""
    new = [[token, *values] for token, values in batch.borrowers.items() if token not in known]
    updated = [(token, values) for token, values in batch.borrowers.items() if token in known]
    features = [
        (token, name, value)
        for token, values in batch.features.items()
        for name, value in values.items()
        if value is not None
    ]
    missing = sum(len(values) for values in batch.features.values()) - len(features)
    total = len(batch.borrowers) + len(features) + len(batch.loans) + len(batch.history)
    progress.start(f"writing {ledger.location}", total)
    with _database_errors(ledger, "writing the import (rolled back)"):
        if fresh:
            # Tables and schema_version only; all content goes in the one transaction below.
            ledger.create_schema()
        with ledger.transaction() as conn:
            ledger.set_meta(conn, **meta)
            bulk_insert(conn, schema.borrowers, _BORROWER_COLUMNS, _counted(new, progress))
            _update_borrowers(conn, updated)
            progress.advance(len(updated))
            _replace_features(conn, {t for t, _ in updated}, features)
            bulk_insert(
                conn, schema.borrower_features, _FEATURE_COLUMNS, _counted(features, progress)
            )
            bulk_insert(conn, schema.loans, _LOAN_COLUMNS, _counted(batch.loans, progress))
            rows = _counted(batch.history, progress)
            bulk_insert(conn, schema.repayment_history, _HISTORY_COLUMNS, rows)
    progress.flush()
    return {
        "borrowers_new": len(new),
        "borrowers_updated": len(updated),
        "features": len(features),
        "features_missing": missing,
    }


def _counted(rows: Sequence[Sequence[Any]], progress: _Progress) -> Iterator[Sequence[Any]]:
    for row in rows:
        progress.advance(1)
        yield row


def _update_borrowers(conn: Any, updated: list[tuple[str, list[Any]]]) -> None:
    """Existing borrowers: a value this import knows replaces the stored one; NULL keeps it."""
    if not updated:
        return
    table = schema.borrowers
    names = [info.column for info in BORROWER_FIELDS.values()]
    stmt = (
        update(table)
        .where(table.c.token == bindparam("b_token"))
        .values({n: func.coalesce(bindparam(f"b_{n}"), table.c[n]) for n in names})
    )
    params = [
        {"b_token": token, **{f"b_{n}": v for n, v in zip(names, values, strict=True)}}
        for token, values in updated
    ]
    conn.execute(stmt, params)


def _replace_features(conn: Any, tokens_: set[str], features: list[tuple[str, str, float]]) -> None:
    """Drop the stored values of the features this import brings for existing borrowers."""
    params = [{"f_token": t, "f_name": n} for t, n, _v in features if t in tokens_]
    if not params:
        return
    table = schema.borrower_features
    stmt = table.delete().where(
        (table.c.token == bindparam("f_token")) & (table.c.name == bindparam("f_name"))
    )
    conn.execute(stmt, params)


# -- the entry point -----------------------------------------------------------------------


def import_file(
    source: Path | str,
    mapping: Path | str | Mapping,
    ledger: str | Path,
    *,
    key: bytes | None,
    partition: str | None = None,
    progress: bool = False,
    platform: str | None = None,
    require_platform: bool = False,
) -> ImportReport:
    """Import one extract into a ledger (created if missing), all or nothing.

    ``key`` is the federation key (needed unless the id column already holds tokens);
    ``partition`` picks one platform's share when the mapping has [partition] (required
    then, refused otherwise); ``platform`` is recorded in ledger_meta (default: the
    partition name, else what the ledger already records); ``require_platform`` refuses an
    import that leaves the ledger without a platform name (the CLI always sets it).

    Raises ImportValidationError (bad mapping, source, key or partition; ``.errors`` lists
    the problems) or LedgerError (ledger unreadable, of another key or platform, or a
    refused write). In both cases the ledger's content is unchanged.
    """
    started = time.perf_counter()
    source = Path(source)
    plan = _make_plan(source, mapping, key, partition, platform)
    bar = _Progress(progress)
    with _open(ledger) as led, bar.running():
        state = _ledger_state(led, ledger)
        meta = _ledger_meta(plan, state, platform, led.location, require_platform)
        batch = _read_source(plan, bar)
        known: set[str] = set()
        if state is not None:
            known = _check_against_ledger(led, plan, batch)
        batch.issues.raise_if_any()
        counts = _write(led, state is None, meta, batch, known, bar)
    report = ImportReport(
        source=str(source),
        ledger=str(ledger),
        partition=partition,
        platform=meta.get("platform"),
        rows=batch.rows,
        rows_read=batch.rows_read,
        borrowers=len(batch.borrowers),
        borrowers_new=counts["borrowers_new"],
        borrowers_updated=counts["borrowers_updated"],
        loans=len(batch.loans),
        history_rows=len(batch.history),
        features=counts["features"],
        features_missing=counts["features_missing"],
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info(
        "%s -> %s%s: %d rows, %d borrowers (%d new), %d loans, %d history rows in %.1fs",
        plan.name,
        led.location,
        f" [{partition}]" if partition else "",
        report.rows,
        report.borrowers,
        report.borrowers_new,
        report.loans,
        report.history_rows,
        report.seconds,
    )
    return report
