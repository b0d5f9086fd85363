"""Column mappings: how one platform's extract (CSV or Parquet) becomes ledger rows.

A platform's export never matches the ledger schema: column names differ, money comes in
yuan or dollars rather than fen, status codes follow the platform's own convention. A
mapping file (TOML, see docs/import-mapping.md) states the translation once, so the
importer itself stays generic and the translation can be reviewed like code.

The models are strict (unknown keys are errors) because a misspelt key that is silently
ignored would import a column as NULL, and nobody would notice until a model trained on it.
Every problem names the mapping file and the key path (``uci.toml: loan.balance.negative:
must be "error" or "zero"``).

This module also defines what each *kind* of field means (money, count, date, status...)
as cell converters, because the same rules check a mapping's constants at load time and
every source cell at import time.
"""

from __future__ import annotations

import codecs
import math
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Context, Decimal, localcontext
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from clients.ledger import schema
from protocols.identity import PLATFORM_NAME_PATTERN

#: How many problems an ImportValidationError lists before summarising the rest.
MAX_ISSUES = 50
#: Largest integer the ledger stores (SQLite INTEGER is a signed 64-bit value).
MAX_INTEGER = 2**63 - 1
#: repayment_status holds at most this many codes (schema: String(24)).
MAX_STATUS_CODES = 24
MAX_LOAN_ID_CHARS = 128
#: Months of history that count towards a derived max_dpd_12m.
DPD_WINDOW_MONTHS = 12

Cell = str | date
"""One source value: text (CSV, most Parquet types) or a date (Parquet date columns)."""


# -- problems ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportIssue:
    """One problem with an import: where it is (file, row, line, column or key) and why."""

    file: str
    message: str
    row: int | None = None
    line: int | None = None
    column: str | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            line = f" (line {self.line})" if self.line is not None else ""
            where.append(f"row {self.row}{line}")
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        head = self.file + (": " + ", ".join(where) if where else "")
        if self.key is not None:
            head += f": {self.key}"
        return f"{head}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (for ``--json`` output)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


class ImportValidationError(ValueError):
    """The input cannot be imported; ``errors`` lists why, and nothing was written."""

    def __init__(self, errors: list[ImportIssue], more: int = 0) -> None:
        self.errors = errors
        self.more = more
        super().__init__(self._render())

    def _render(self) -> str:
        total = len(self.errors) + self.more
        lines = [f"{total} problem{'s' if total != 1 else ''} found; nothing was imported"]
        lines += [f"  {issue}" for issue in self.errors]
        if self.more:
            lines.append(f"  ... and {self.more} more")
        return "\n".join(lines)


class MappingError(ImportValidationError):
    """The mapping file itself is invalid (its issues carry the key path)."""


def _mapping_error(origin: str, problems: Iterable[tuple[str | None, str]]) -> MappingError:
    issues = [ImportIssue(file=origin, key=key, message=msg) for key, msg in problems]
    return MappingError(issues[:MAX_ISSUES], max(0, len(issues) - MAX_ISSUES))


class CellError(ValueError):
    """One cell's value is not acceptable; the message says why, for the issue list."""


# -- what each field means --------------------------------------------------------------

FieldKind = Literal[
    "money",
    "count",
    "int",
    "fraction",
    "date",
    "text",
    "product",
    "status",
    "feature",
    "category",
]


@dataclass(frozen=True)
class FieldInfo:
    """The meaning of one mappable field: its kind, ledger column and bounds."""

    kind: FieldKind
    column: str
    required: bool = False
    derivable: bool = False
    low: int | None = None
    high: int | None = None


BORROWER_FIELDS: dict[str, FieldInfo] = {
    "age": FieldInfo("int", "age", low=16, high=100),
    "city_tier": FieldInfo("int", "city_tier", low=1, high=5),
    "income_proxy": FieldInfo("money", "income_proxy_fen"),
    "applications_3m": FieldInfo("count", "applications_3m", low=0),
    "label": FieldInfo("int", "defaulted", low=0, high=1),
}

LOAN_FIELDS: dict[str, FieldInfo] = {
    "loan_id": FieldInfo("text", "loan_id", required=True),
    "product": FieldInfo("product", "product", required=True),
    "open_date": FieldInfo("date", "open_date"),
    "credit_limit": FieldInfo("money", "credit_limit_fen"),
    "principal": FieldInfo("money", "principal_fen"),
    "balance": FieldInfo("money", "balance_fen", required=True),
    "term_months": FieldInfo("count", "term_months", low=1),
    "annual_rate": FieldInfo("fraction", "annual_rate"),
    "monthly_repayment": FieldInfo("money", "monthly_repayment_fen"),
    "days_past_due": FieldInfo("count", "days_past_due", required=True, derivable=True, low=0),
    "max_dpd_12m": FieldInfo("count", "max_dpd_12m", required=True, derivable=True, low=0),
    "repayment_status": FieldInfo("status", "repayment_status", required=True, derivable=True),
}

FEATURE_INFO = FieldInfo("feature", "value")
CATEGORY_INFO = FieldInfo("category", "value")
#: Levels a categorical feature takes from the file when none are declared (the most
#: frequent ones; the rest go to the "other" level).
DEFAULT_MAX_LEVELS = 20
MAX_LEVELS_CAP = 200
#: Level names every categorical feature may get: unseen values, and missing cells.
OTHER_LEVEL = "other"
MISSING_LEVEL = "missing"
RESERVED_LEVELS = (OTHER_LEVEL, MISSING_LEVEL)
_LEVEL_NAME = re.compile(r"[A-Za-z0-9_]+")
_FEATURE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_MONTH = re.compile(r"(\d{4})-(\d{2})")


def level_slug(value: str) -> str:
    """A level name from a source value: lower case, runs of other characters as '_'.

    ``"... < 0 DM"`` becomes ``"0_dm"``; an empty slug becomes ``"blank"``.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", value.strip().lower()).strip("_")
    return slug or "blank"


def dpd_for_code(code: str) -> int:
    """Days past due implied by one PBoC status code: a bucket's lower bound.

    Bucket b (1..7) means 30*(b-1)+1 .. 30*b days overdue; the lower bound is the only
    figure the code proves, so a derived DPD never overstates delinquency.
    """
    return 30 * (int(code) - 1) + 1 if code.isdigit() else 0


# -- the mapping file -------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _as_column_table(data: Any) -> Any:
    return {"column": data} if isinstance(data, str) else data


class FieldSpec(_Strict):
    """Where one field's value comes from: a source column (optionally mapped) or a constant."""

    column: str | None = None
    constant: str | int | float | bool | date | None = None
    map: dict[str, str | int | float] | None = None
    negative: Literal["error", "zero"] | None = None
    prefix: str | None = None
    kind: Literal["numeric", "categorical"] | None = None
    levels: list[str] | dict[str, str] | None = None
    other: bool = True
    max_levels: int = DEFAULT_MAX_LEVELS

    @model_validator(mode="before")
    @classmethod
    def _column_shorthand(cls, data: Any) -> Any:
        return _as_column_table(data)

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        if (self.column is None) == (self.constant is None):
            raise ValueError('give exactly one of "column" or "constant"')
        if self.column is not None and not self.column.strip():
            raise ValueError("column name is empty")
        if self.map is not None and self.column is None:
            raise ValueError('"map" translates column values; it needs "column"')
        categorical = self.kind == "categorical"
        if categorical and (self.column is None or self.map is not None):
            raise ValueError(
                'a categorical feature reads a column and takes "levels", not "map" or "constant"'
            )
        touched = self.model_fields_set & {"levels", "other", "max_levels"}
        if touched and not categorical:
            raise ValueError(f'{", ".join(sorted(touched))}: only with kind = "categorical"')
        if not 1 <= self.max_levels <= MAX_LEVELS_CAP:
            raise ValueError(f"max_levels must be 1..{MAX_LEVELS_CAP}")
        return self

    def level_names(self) -> dict[str, str] | None:
        """Declared source value -> level name (None: levels are taken from the file)."""
        if self.levels is None:
            return None
        if isinstance(self.levels, list):
            return {v.strip(): level_slug(v) for v in self.levels}
        return {k.strip(): v for k, v in self.levels.items()}


class IdField(_Strict):
    """The borrower identifier column and what it holds, or the row number as identifier.

    ``row_number = true`` is for files without any identifier (a scoring data set): each
    data row is its own borrower, hashed like a customer number, so tokens link rows
    within that one file only.
    """

    column: str | None = None
    kind: Literal["national_id", "customer_number", "token"] = "national_id"
    row_number: bool = False

    @model_validator(mode="before")
    @classmethod
    def _column_shorthand(cls, data: Any) -> Any:
        return _as_column_table(data)

    @field_validator("column")
    @classmethod
    def _non_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("column name is empty")
        return value.strip() if value is not None else None

    @model_validator(mode="after")
    def _column_or_row_number(self) -> IdField:
        if (self.column is not None) != self.row_number:
            return self._row_number_kind()
        raise ValueError('give exactly one of "column" or "row_number = true"')

    def _row_number_kind(self) -> IdField:
        if self.row_number:
            if "kind" in self.model_fields_set and self.kind != "customer_number":
                raise ValueError('row numbers are hashed as kind = "customer_number"')
            self.kind = "customer_number"
        return self


def _parse_iso_date(value: Any) -> Any:
    """Accept TOML dates and ISO date strings alike for as_of."""
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"must be an ISO date like 2005-09-30, got {value!r}") from None
    return value


class SourceSection(_Strict):
    """How to read the source file."""

    format: Literal["csv", "parquet"] | None = None
    delimiter: str = ","
    encoding: str = "utf-8"
    date_format: str = "%Y-%m-%d"
    money_scale: int | float = 100
    as_of: date | None = None
    ignore: list[str] = []
    missing: list[str] = []

    _check_as_of = field_validator("as_of", mode="before")(_parse_iso_date)

    @field_validator("missing")
    @classmethod
    def _trimmed(cls, value: list[str]) -> list[str]:
        return [v.strip() for v in value]  # cells are compared after trimming

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, value: str) -> str:
        if len(value) != 1 or value in '"\r\n':
            raise ValueError("must be one character (not a quote or newline)")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            name = codecs.lookup(value).name
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        # Lines are split on the newline byte before decoding (exact line numbers in
        # errors), which is only sound when ASCII characters are single ASCII bytes.
        if '\n,"\tA'.encode(name, errors="replace") != b'\n,"\tA' or name.startswith("utf-16"):
            raise ValueError(f"{value!r} is not ASCII-compatible (use utf-8, gb18030, big5...)")
        return value

    @field_validator("date_format")
    @classmethod
    def _has_directive(cls, value: str) -> str:
        if "%" not in value:
            raise ValueError("must be a strptime format such as %Y-%m-%d")
        return value

    @field_validator("money_scale")
    @classmethod
    def _positive_scale(cls, value: float) -> float:
        if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError("must be a positive number")
        return value

    @property
    def scale(self) -> Decimal:
        """money_scale as an exact Decimal (0.01 stays 0.01, not its binary neighbour)."""
        return Decimal(str(self.money_scale))


class BorrowerSection(_Strict):
    """Borrower fields; everything but ``id`` is optional (NULL when unmapped)."""

    id: IdField
    namespace: str | None = None
    age: FieldSpec | None = None
    city_tier: FieldSpec | None = None
    income_proxy: FieldSpec | None = None
    applications_3m: FieldSpec | None = None
    label: FieldSpec | None = None
    features: dict[str, FieldSpec] = {}


class LoanSection(_Strict):
    """Loan fields; which are required is checked by ``Mapping.problems``."""

    loan_id: FieldSpec | None = None
    product: FieldSpec | None = None
    open_date: FieldSpec | None = None
    credit_limit: FieldSpec | None = None
    principal: FieldSpec | None = None
    balance: FieldSpec | None = None
    term_months: FieldSpec | None = None
    annual_rate: FieldSpec | None = None
    monthly_repayment: FieldSpec | None = None
    days_past_due: FieldSpec | None = None
    max_dpd_12m: FieldSpec | None = None
    repayment_status: FieldSpec | None = None
    scoring_only: bool = False


class AmountColumns(_Strict):
    """Monthly money columns of [history], oldest first; a plain list is accepted too."""

    columns: list[str]
    negative: Literal["error", "zero"] = "error"

    @model_validator(mode="before")
    @classmethod
    def _list_shorthand(cls, data: Any) -> Any:
        return {"columns": data} if isinstance(data, list) else data


class HistorySection(_Strict):
    """Monthly repayment status columns, oldest first, ending in ``last_month``."""

    columns: list[str]
    last_month: str
    map: dict[str, str]
    amount_due: AmountColumns | None = None
    amount_paid: AmountColumns | None = None

    @field_validator("columns")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one column")
        return value

    @field_validator("last_month")
    @classmethod
    def _year_month(cls, value: str) -> str:
        match = _MONTH.fullmatch(value)
        if not match or not 1 <= int(match.group(2)) <= 12:
            raise ValueError(f'must be a month like "2005-09", got {value!r}')
        return value

    @field_validator("map")
    @classmethod
    def _codes(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(v for v in value.values() if v not in schema.STATUS_CODES)
        if bad:
            codes = "".join(sorted(schema.STATUS_CODES))
            raise ValueError(f"values must be single status codes from {codes!r}, got {bad}")
        return {k.strip(): v for k, v in value.items()}

    def months(self) -> list[str]:
        """The month (YYYY-MM) of each column, oldest first."""
        year, month = (int(x) for x in self.last_month.split("-"))
        index = year * 12 + month - 1
        count = len(self.columns)
        return [f"{i // 12:04d}-{i % 12 + 1:02d}" for i in range(index - count + 1, index + 1)]


class PartitionSection(_Strict):
    """Split one source file across platforms: row goes to names[int(column) % len(names)]."""

    column: str
    method: Literal["modulo"] = "modulo"
    names: list[str]

    @field_validator("names")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if not value or any(not n.strip() for n in value):
            raise ValueError("must be a non-empty list of non-empty names")
        if len(set(value)) != len(value):
            raise ValueError("names must be unique")
        return value


@dataclass(frozen=True)
class BoundField:
    """A mapped field ready for rows: where it reads from and how it converts a cell."""

    key: str
    name: str
    info: FieldInfo
    column: str | None
    constant: Any
    convert: Callable[[Cell], Any]


class Mapping(_Strict):
    """A whole mapping file. Build with ``load_mapping`` / ``parse_mapping``."""

    version: Literal[1]
    platform: str | None = None
    source: SourceSection = SourceSection()
    borrower: BorrowerSection
    loan: LoanSection
    history: HistorySection | None = None
    partition: PartitionSection | None = None

    _origin: str = PrivateAttr(default="mapping")

    @field_validator("platform")
    @classmethod
    def _platform_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(PLATFORM_NAME_PATTERN, value):
            raise ValueError(f"must match {PLATFORM_NAME_PATTERN} (letters, digits, _ . -)")
        return value

    @property
    def origin(self) -> str:
        """The mapping's file name, for error messages."""
        return self._origin

    # -- fields ---------------------------------------------------------------------------

    def specs(self) -> Iterable[tuple[str, str, FieldInfo, FieldSpec]]:
        """(key path, name, meaning, spec) of every mapped borrower, feature and loan field."""
        for name, info in BORROWER_FIELDS.items():
            spec = getattr(self.borrower, name)
            if spec is not None:
                yield f"borrower.{name}", name, info, spec
        for name, spec in self.borrower.features.items():
            info = CATEGORY_INFO if spec.kind == "categorical" else FEATURE_INFO
            yield f"borrower.features.{name}", name, info, spec
        for name, info in LOAN_FIELDS.items():
            spec = getattr(self.loan, name)
            if spec is not None:
                yield f"loan.{name}", name, info, spec

    def bind(self) -> dict[str, BoundField]:
        """Every mapped field keyed by its key path, with converters; raises MappingError."""
        bound: dict[str, BoundField] = {}
        problems: list[tuple[str | None, str]] = []
        for key, name, info, spec in self.specs():
            convert = make_converter(info, spec, self.source, name)
            constant = None
            if spec.constant is not None:
                try:
                    constant = convert(_scalar_text(spec.constant))
                except CellError as exc:
                    problems.append((f"{key}.constant", str(exc)))
                    continue
            bound[key] = BoundField(key, name, info, spec.column, constant, convert)
        if problems:
            raise _mapping_error(self.origin, problems)
        return bound

    def used_columns(self) -> dict[str, list[str]]:
        """Source column -> the keys that read it (for missing/unknown column checks)."""
        used: dict[str, list[str]] = {}

        def use(column: str | None, key: str) -> None:
            if column is not None:
                used.setdefault(column, []).append(key)

        use(self.borrower.id.column, "borrower.id")  # None (row numbers) is skipped
        for key, _name, _info, spec in self.specs():
            use(spec.column, key)
        if self.history is not None:
            for i, column in enumerate(self.history.columns):
                use(column, f"history.columns[{i}]")
            for part in ("amount_due", "amount_paid"):
                amounts = getattr(self.history, part)
                for i, column in enumerate(amounts.columns if amounts else []):
                    use(column, f"history.{part}[{i}]")
        if self.partition is not None:
            use(self.partition.column, "partition.column")
        return used

    # -- semantic checks ------------------------------------------------------------------

    def problems(self) -> list[tuple[str, str]]:
        """Rules that span keys (required fields, list lengths...); empty when valid."""
        found: list[tuple[str, str]] = []
        found += self._borrower_problems()
        found += self._field_option_problems()
        found += self._required_problems()
        found += self._history_problems()
        found += self._scoring_only_problems()
        found += self._categorical_problems()
        if self.platform is not None and self.partition is not None:
            found.append(
                ("platform", "[partition] names the platforms already; drop one of the two")
            )
        used = self.used_columns()
        for column in self.source.ignore:
            if column in used:
                found.append(("source.ignore", f"{column!r} is ignored but also mapped"))
        return found

    def _scoring_only_problems(self) -> list[tuple[str, str]]:
        if not self.loan.scoring_only:
            return []
        found = []
        for name in LOAN_FIELDS:
            if getattr(self.loan, name) is not None:
                found.append((f"loan.{name}", "a scoring_only source has no loans to map"))
        if self.history is not None:
            found.append(("history", "a scoring_only source has no loans, so no history"))
        return found

    def _categorical_problems(self) -> list[tuple[str, str]]:
        found = []
        names = set(self.borrower.features)
        for feature, spec in self.borrower.features.items():
            if spec.kind != "categorical":
                continue
            key = f"borrower.features.{feature}"
            declared = spec.level_names()
            if declared is not None and not declared:
                found.append((f"{key}.levels", "declare at least one level (or omit levels)"))
            if declared is not None and "" in declared:
                found.append((f"{key}.levels", 'an empty cell is the "missing" level already'))
            if isinstance(spec.levels, list):
                slugs: dict[str, str] = {}
                for value in spec.levels:
                    first = slugs.setdefault(level_slug(value), value)
                    if first != value:
                        found.append(
                            (
                                f"{key}.levels",
                                f"{first!r} and {value!r} both become level "
                                f"{level_slug(value)!r}; name the levels with a table",
                            )
                        )
            levels = set((declared or {}).values())
            for level in sorted(levels):
                if level in RESERVED_LEVELS:
                    found.append((f"{key}.levels", f"{level!r} is a reserved level name"))
                elif not _LEVEL_NAME.fullmatch(level):
                    found.append(
                        (f"{key}.levels", f"level name {level!r}: letters, digits and '_' only")
                    )
            for level in [*levels, *RESERVED_LEVELS]:
                full = f"{feature}_{level}"
                if not _FEATURE_NAME.fullmatch(full):
                    found.append((key, f"feature name {full!r} is longer than 64 characters"))
                elif full in names:
                    found.append((key, f"level feature {full!r} clashes with a feature"))
        return found

    def _borrower_problems(self) -> list[tuple[str, str]]:
        found = []
        if self.borrower.id.kind == "customer_number" and not (self.borrower.namespace or ""):
            what = (
                "row_number = true"
                if self.borrower.id.row_number
                else ('kind is "customer_number"')
            )
            found.append(("borrower.namespace", f"required when borrower.id {what}"))
        for name in self.borrower.features:
            if not _FEATURE_NAME.fullmatch(name):
                found.append(
                    (
                        f"borrower.features.{name}",
                        "feature names are a letter then letters, digits or '_', "
                        "at most 64 characters",
                    )
                )
        return found

    def _field_option_problems(self) -> list[tuple[str, str]]:
        found = []
        for key, _name, info, spec in self.specs():
            if spec.negative is not None and not (info.kind == "money" or info.low == 0):
                found.append((f"{key}.negative", "only money and count fields take 'negative'"))
            if spec.prefix is not None and info.kind != "text":
                found.append((f"{key}.prefix", "only text fields (loan_id) take 'prefix'"))
            if spec.kind is not None and info.kind not in ("feature", "category"):
                found.append((f"{key}.kind", "only borrower.features take 'kind'"))
        return found

    def _required_problems(self) -> list[tuple[str, str]]:
        found = []
        if self.loan.scoring_only:
            return found
        for name, info in LOAN_FIELDS.items():
            if not info.required or getattr(self.loan, name) is not None:
                continue
            if info.derivable and self.history is not None:
                continue
            hint = " (or add [history] to derive it)" if info.derivable else ""
            found.append((f"loan.{name}", f"required: map a column or a constant{hint}"))
        return found

    def _history_problems(self) -> list[tuple[str, str]]:
        history = self.history
        if history is None:
            return []
        found = []
        if len(set(history.columns)) != len(history.columns):
            found.append(("history.columns", "a column appears twice"))
        derived = self.loan.repayment_status is None
        if derived and len(history.columns) > MAX_STATUS_CODES:
            found.append(
                (
                    "history.columns",
                    f"at most {MAX_STATUS_CODES} months when repayment_status is derived",
                )
            )
        for part in ("amount_due", "amount_paid"):
            amounts = getattr(history, part)
            if amounts is not None and len(amounts.columns) != len(history.columns):
                found.append(
                    (
                        f"history.{part}",
                        f"has {len(amounts.columns)} columns, history.columns has "
                        f"{len(history.columns)}",
                    )
                )
        as_of = self.source.as_of
        if as_of is not None and history.last_month > as_of.isoformat()[:7]:
            found.append(("history.last_month", f"is after source.as_of {as_of}"))
        return found


def parse_mapping(text: str, origin: str = "mapping") -> Mapping:
    """Parse and check a mapping from TOML text; ``origin`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _mapping_error(origin, [(None, f"not valid TOML: {exc}")]) from None
    return mapping_from_dict(data, origin)


def mapping_from_dict(data: dict[str, Any], origin: str = "mapping") -> Mapping:
    """Check an already parsed mapping (a dict as tomllib gives it)."""
    try:
        mapping = Mapping.model_validate(data)
    except ValidationError as exc:
        raise _mapping_error(origin, _pydantic_problems(exc)) from None
    mapping._origin = origin
    check_mapping(mapping)
    return mapping


def check_mapping(mapping: Mapping) -> dict[str, BoundField]:
    """Run the cross-key rules and bind the fields; raises MappingError."""
    problems = mapping.problems()
    if problems:
        raise _mapping_error(mapping.origin, problems)
    return mapping.bind()


def load_mapping(path: Path | str) -> Mapping:
    """Read a mapping file; every problem names the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: undecodable, or a NUL in the path
        raise _mapping_error(path.name, [(None, f"cannot read mapping file: {exc}")]) from None
    return parse_mapping(text, path.name)


def _pydantic_problems(exc: ValidationError) -> list[tuple[str | None, str]]:
    """Pydantic's errors reworded for people who write TOML, not Python."""
    problems: list[tuple[str | None, str]] = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or None
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "literal_error":
            message = "must be " + str(err.get("ctx", {}).get("expected", "")).replace("'", '"')
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = _shape_hint(key)
        elif kind == "value_error":
            message = err["msg"].removeprefix("Value error, ")
        else:
            message = err["msg"]
        problems.append((key, message))
    return problems


def _shape_hint(key: str | None) -> str:
    """What a key should have been, when it got a value of the wrong shape."""
    if key is None or key in ("source", "borrower", "loan", "history", "partition"):
        return "must be a table"
    if key.endswith(("amount_due", "amount_paid")):
        return "must be a list of column names or a table {columns = [...], negative = ...}"
    return "must be a column name (string) or a table {column = ...} / {constant = ...}"


# -- cell conversion ---------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,6})?")
_NON_FINITE = {"nan", "snan", "inf", "infinity"}
_EXACT = Context(prec=80)


def _show(text: str, limit: int = 40) -> str:
    """A cell value quoted for a message, cut short so one huge cell cannot flood a log."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _scalar_text(value: Any) -> Cell:
    """A TOML constant or mapped value as the cell text a source would have held."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
        return str(int(value))
    return str(value).strip()


def to_decimal(cell: Cell) -> Decimal:
    """A number from text, exactly; NaN, infinity, '1,000' and '1_000' are refused."""
    text = cell.isoformat() if isinstance(cell, date) else cell
    if len(text) <= 18 and text.isascii() and text.isdigit():
        return Decimal(text)  # the common case, without the regex
    if not _NUMBER.fullmatch(text):
        if text.lower().lstrip("+-") in _NON_FINITE:
            raise CellError(f"{_show(text)} is not a finite number")
        raise CellError(f"not a number: {_show(text)}")
    value = Decimal(text)
    if value and not -30 <= value.adjusted() <= 18:
        raise CellError(f"number out of range: {_show(text)}")
    return value


def to_integer(cell: Cell) -> int:
    """A whole number ('30' and '30.0' alike; '30.5' is an error)."""
    value = to_decimal(cell)
    if value != value.to_integral_value():
        raise CellError(f"not a whole number: {_show(str(cell))}")
    return int(value)


def make_converter(
    info: FieldInfo, spec: FieldSpec, source: SourceSection, name: str
) -> Callable[[Cell], Any]:
    """The function that turns one cell of this field into its ledger value.

    Applies the field's ``map`` first, then treats an empty cell as NULL (or an error for
    a required field), then parses by kind. Raises CellError with a message for people.
    """
    parse = _kind_parser(info, spec, source, name)
    table = {k.strip(): v for k, v in spec.map.items()} if spec.map is not None else None
    required = info.required

    def convert(cell: Cell) -> Any:
        if table is not None:
            key = cell.isoformat() if isinstance(cell, date) else cell
            if key not in table:
                raise CellError(f"value {_show(key)} is not in the map of {name}")
            cell = _scalar_text(table[key])
        if cell == "":
            if required:
                raise CellError(f"empty value for required field {name}")
            return None
        return parse(cell)

    return convert


def _kind_parser(
    info: FieldInfo, spec: FieldSpec, source: SourceSection, name: str
) -> Callable[[Cell], Any]:
    kind = info.kind
    if kind == "money":
        return _money_parser(source.scale, spec.negative == "zero", name)
    if kind in ("count", "int"):
        return _integer_parser(info, spec.negative == "zero", name)
    if kind == "fraction":
        return lambda cell: _fraction(cell, name)
    if kind == "date":
        return _date_parser(source.date_format, source.as_of, name)
    if kind == "text":
        return _text_parser(spec.prefix or "", name)
    if kind == "product":
        return _product
    if kind == "status":
        return _status
    if kind == "category":
        return _category_parser(spec, name)
    return _feature


def _money_parser(scale: Decimal, clamp: bool, name: str) -> Callable[[Cell], int]:
    def parse(cell: Cell) -> int:
        value = to_decimal(cell)
        with localcontext(_EXACT):
            fen = value * scale
        if fen != fen.to_integral_value():
            raise CellError(
                f"{name} {_show(str(cell))} is not a whole number of minor units "
                f"at money_scale {scale}"
            )
        if fen < 0:
            if clamp:
                return 0
            raise CellError(f"negative {name} {cell}")
        if fen > MAX_INTEGER:
            raise CellError(f"{name} {_show(str(cell))} is too large")
        return int(fen)

    return parse


def _integer_parser(info: FieldInfo, clamp: bool, name: str) -> Callable[[Cell], int]:
    low, high = info.low, info.high
    count = info.kind == "count"

    def parse(cell: Cell) -> int:
        value = to_integer(cell)
        if count and value < 0:
            if clamp and low == 0:
                return 0
            raise CellError(f"negative {name} {value}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f"at least {low}"
            raise CellError(f"{name} {value} out of range ({bounds})")
        if value > MAX_INTEGER:
            raise CellError(f"{name} {value} is too large")
        return value

    return parse


def _fraction(cell: Cell, name: str) -> float:
    value = to_decimal(cell)
    if not 0 <= value <= 1:
        raise CellError(f"{name} {value} out of range 0..1 (a fraction: 18% is 0.18)")
    return float(value)


def _date_parser(fmt: str, as_of: date | None, name: str) -> Callable[[Cell], str]:
    def parse(cell: Cell) -> str:
        if isinstance(cell, date):
            day = cell
        else:
            try:
                day = datetime.strptime(cell, fmt).date()
            except ValueError as exc:
                raise CellError(f"invalid date {_show(cell)} (format {fmt}): {exc}") from None
        if as_of is not None and day > as_of:
            raise CellError(f"{name} {day} is after the extract's as_of date {as_of}")
        return day.isoformat()

    return parse


def _text_parser(prefix: str, name: str) -> Callable[[Cell], str]:
    def parse(cell: Cell) -> str:
        text = prefix + (cell.isoformat() if isinstance(cell, date) else cell)
        if len(text) > MAX_LOAN_ID_CHARS:
            raise CellError(f"{name} longer than {MAX_LOAN_ID_CHARS} characters")
        return text

    return parse


def _product(cell: Cell) -> str:
    if cell not in schema.PRODUCTS:
        expected = ", ".join(schema.PRODUCTS)
        raise CellError(f"unknown product {_show(str(cell))} (expected one of {expected})")
    return str(cell)


def _status(cell: Cell) -> str:
    text = str(cell)
    bad = sorted({c for c in text if c not in schema.STATUS_CODES})
    if bad:
        raise CellError(f"unknown status code(s) {''.join(bad)!r} in {_show(text)}")
    if len(text) > MAX_STATUS_CODES:
        raise CellError(f"repayment_status longer than {MAX_STATUS_CODES} codes")
    return text


def _feature(cell: Cell) -> float:
    value = float(to_decimal(cell))
    if not math.isfinite(value):
        raise CellError(f"feature value {_show(str(cell))} is too large")
    return value


def _category_parser(spec: FieldSpec, name: str) -> Callable[[Cell], str]:
    """A categorical cell -> its level name (declared levels) or its text (levels from the file).

    Values not among declared levels go to the "other" level, or are errors when the
    feature has ``other = false``.
    """
    declared = spec.level_names()
    if declared is None:
        return lambda cell: cell.isoformat() if isinstance(cell, date) else cell
    allow_other = spec.other

    def parse(cell: Cell) -> str:
        text = cell.isoformat() if isinstance(cell, date) else cell
        level = declared.get(text)
        if level is not None:
            return level
        if allow_other:
            return OTHER_LEVEL
        raise CellError(f"value {_show(text)} is not a declared level of {name}")

    return parse


def history_amount_parser(
    amounts: AmountColumns, source: SourceSection, name: str
) -> Callable[[Cell], int | None]:
    """Converter for one [history] money column (empty cells are NULL)."""
    parse = _money_parser(source.scale, amounts.negative == "zero", name)
    return lambda cell: None if cell == "" else parse(cell)


__all__ = [
    "BORROWER_FIELDS",
    "LOAN_FIELDS",
    "MAX_ISSUES",
    "BoundField",
    "CellError",
    "FieldInfo",
    "FieldSpec",
    "ImportIssue",
    "ImportValidationError",
    "Mapping",
    "MappingError",
    "check_mapping",
    "dpd_for_code",
    "load_mapping",
    "mapping_from_dict",
    "parse_mapping",
    "to_decimal",
    "to_integer",
]
