"""The ledger importer: the UCI mapping end to end, every class of bad input, atomicity.

Fixtures are small files generated in tmp_path; only the UCI test reads the shared data.
Every bad-input test checks that the error names the file, the row (and CSV line) and the
column, because an error that does not say where is an error nobody can fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.ledger import schema
from clients.ledger.importer import (
    ImportReport,
    ImportValidationError,
    LedgerError,
    MappingError,
    import_file,
)
from clients.ledger.mapping import ImportIssue, load_mapping, parse_mapping
from protocols.tokens import check_digit, generate_federation_key, token_for_national_id
from tests.conftest import UCI_CSV

ROOT = Path(__file__).resolve().parents[1]
UCI_MAPPING = ROOT / "mappings" / "uci_credit_card.toml"

LOANS_TOML = """
version = 1
[source]
money_scale = 100
as_of = "2024-06-30"
ignore = ["note"]

[borrower]
id = { column = "national_id", kind = "national_id" }
age = "age"
city_tier = "city_tier"
income_proxy = "income"
applications_3m = "apps"
label = "defaulted"

[borrower.features]
score = "score"

[loan]
loan_id = { column = "loan_id", prefix = "L-" }
product = "product"
open_date = "open_date"
credit_limit = "credit_limit"
principal = "principal"
balance = "balance"
term_months = "term"
annual_rate = "rate"
monthly_repayment = "monthly"
days_past_due = "dpd"
max_dpd_12m = "max_dpd"
repayment_status = "status"
"""

HEADER = [
    "national_id",
    "age",
    "city_tier",
    "income",
    "apps",
    "defaulted",
    "score",
    "loan_id",
    "product",
    "open_date",
    "credit_limit",
    "principal",
    "balance",
    "term",
    "rate",
    "monthly",
    "dpd",
    "max_dpd",
    "status",
    "note",
]


def national_id(seq: int) -> str:
    """A valid 18-character ID (Beijing Dongcheng, born 1990-03-07, sequence ``seq``)."""
    body = f"11010119900307{seq:03d}"
    return body + check_digit(body)


def good_row(i: int, **changes: str) -> dict[str, str]:
    row = {
        "national_id": national_id(i),
        "age": str(25 + i % 40),
        "city_tier": str(1 + i % 5),
        "income": "8500.50",
        "apps": str(i % 4),
        "defaulted": str(i % 2),
        "score": "0.25",
        "loan_id": f"{1000 + i}",
        "product": "cash_loan" if i % 2 else "revolving",
        "open_date": "2023-01-15",
        "credit_limit": "20000",
        "principal": "12000",
        "balance": "6000.25",
        "term": "12",
        "rate": "0.18",
        "monthly": "1100",
        "dpd": "0",
        "max_dpd": "31",
        "status": "NNN1NN",
        "note": "free text",
    }
    row.update(changes)
    return row


def write_csv(path: Path, rows: Iterable[dict[str, str]], header: list[str] = HEADER) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(h, "") for h in header])
    return path


@pytest.fixture(scope="module")
def key() -> bytes:
    return generate_federation_key()


@pytest.fixture
def mapping_path(tmp_path: Path) -> Path:
    path = tmp_path / "loans.toml"
    path.write_text(LOANS_TOML, encoding="utf-8")
    return path


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every ledger table, in a stable order."""
    with sqlite3.connect(db) as conn:
        return {
            t.name: sorted(conn.execute(f"SELECT * FROM {t.name}").fetchall(), key=repr)
            for t in schema.TABLES
        }


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_bad(source: Path, mapping: Path, ledger: Path, key: bytes, **kw: Any) -> list[ImportIssue]:
    with pytest.raises(ImportValidationError) as info:
        import_file(source, mapping, ledger, key=key, **kw)
    return info.value.errors


def find(issues: list[ImportIssue], column: str | None, fragment: str) -> ImportIssue:
    """The issue at ``column`` whose message contains ``fragment``; fails with the list."""
    for issue in issues:
        if issue.column == column and fragment in issue.message:
            return issue
    raise AssertionError(
        f"no issue at {column!r} with {fragment!r} in:\n" + "\n".join(map(str, issues))
    )


def assert_cell_issue(
    issues: list[ImportIssue], file: str, row: int, column: str, fragment: str
) -> None:
    issue = find(issues, column, fragment)
    assert issue.file == file
    assert issue.row == row
    assert issue.line == row + 1  # header on line 1, one line per record
    assert str(issue).startswith(f"{file}: row {row} (line {row + 1}), column {column!r}: ")


# -- the UCI data set --------------------------------------------------------------------


@pytest.fixture(scope="module")
def uci_ledgers(tmp_path_factory: pytest.TempPathFactory, key: bytes) -> dict[str, Path]:
    if not UCI_CSV.exists():
        pytest.fail(f"shared UCI data not found at {UCI_CSV}")
    folder = tmp_path_factory.mktemp("uci")
    ledgers = {}
    for name in ("uci-a", "uci-b", "uci-c"):
        ledgers[name] = folder / f"{name}.db"
        report = import_file(UCI_CSV, UCI_MAPPING, ledgers[name], key=key, partition=name)
        assert report.rows == 10_000
        assert report.rows_read == 30_000
        assert report.loans == 10_000 and report.borrowers == 10_000
        assert report.history_rows == 60_000
    return ledgers


def test_uci_mapping_imports_three_disjoint_platforms(uci_ledgers: dict[str, Path]) -> None:
    tokens: list[set[str]] = []
    defaults = rows = 0
    for name, db in uci_ledgers.items():
        with sqlite3.connect(db) as conn:
            count, labelled, defaulted = conn.execute(
                "SELECT count(*), count(defaulted), sum(defaulted) FROM borrowers"
            ).fetchone()
            assert count == labelled == 10_000
            rows += count
            defaults += defaulted
            tokens.append({t for (t,) in conn.execute("SELECT token FROM borrowers")})
            min_balance, zeros = conn.execute(
                "SELECT min(balance_fen), sum(balance_fen = 0) FROM loans"
            ).fetchone()
            assert min_balance >= 0 and zeros > 0
            per_loan = conn.execute(
                "SELECT DISTINCT count(*) FROM repayment_history GROUP BY loan_id"
            ).fetchall()
            assert per_loan == [(6,)]
            meta = dict(conn.execute("SELECT key, value FROM ledger_meta"))
            assert meta["platform"] == name and meta["as_of"] == "2005-09-30"
            assert meta["source"] == "import" and len(meta["key_id"]) == 16
            features = conn.execute("SELECT count(DISTINCT name) FROM borrower_features")
            assert features.fetchone() == (22,)
    assert rows == 30_000
    assert not (tokens[0] & tokens[1] or tokens[0] & tokens[2] or tokens[1] & tokens[2])
    assert 0.21 < defaults / rows < 0.23


def test_uci_first_holder_is_derived_from_history(uci_ledgers: dict[str, Path]) -> None:
    # ID 1: PAY_6..PAY_0 = -2,-2,-1,-1,2,2; BILL_AMT1 3913; LIMIT_BAL 20000; defaulted.
    with sqlite3.connect(uci_ledgers["uci-b"]) as conn:
        loan = conn.execute(
            "SELECT product, credit_limit_fen, balance_fen, days_past_due, max_dpd_12m, "
            "repayment_status, token FROM loans WHERE loan_id = 'card-1'"
        ).fetchone()
        assert loan[:6] == ("revolving", 2_000_000, 391_300, 31, 31, "**NN22")
        borrower = conn.execute(
            "SELECT age, defaulted FROM borrowers WHERE token = ?", (loan[6],)
        ).fetchone()
        assert borrower == (24, 1)
        history = conn.execute(
            "SELECT month, status, amount_due_fen, amount_paid_fen FROM repayment_history "
            "WHERE loan_id = 'card-1' ORDER BY month"
        ).fetchall()
        assert history[0] == ("2005-04", "*", 0, 0)
        assert history[-1] == ("2005-09", "2", 391_300, 0)


def test_uci_mapping_needs_a_partition(tmp_path: Path, key: bytes) -> None:
    issues = run_bad(UCI_CSV, UCI_MAPPING, tmp_path / "l.db", key)
    assert "uci-a, uci-b, uci-c" in find(issues, None, "choose one").message
    issues = run_bad(UCI_CSV, UCI_MAPPING, tmp_path / "l.db", key, partition="uci-z")
    assert str(issues[0]).startswith("uci_credit_card.toml: partition.names: unknown partition")


# -- a clean import, and what it writes ---------------------------------------------------


def test_clean_import_writes_every_table(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(i) for i in range(1, 6)])
    report = import_file(source, mapping_path, tmp_path / "l.db", key=key, platform="p1")
    assert isinstance(report, ImportReport)
    assert (report.rows, report.loans, report.borrowers, report.history_rows) == (5, 5, 5, 0)
    assert report.model_dump(mode="json")["platform"] == "p1"
    with sqlite3.connect(tmp_path / "l.db") as conn:
        loan = conn.execute("SELECT * FROM loans WHERE loan_id = 'L-1001'").fetchone()
        token = token_for_national_id(key, national_id(1))
        assert loan == (
            "L-1001",
            token,
            "cash_loan",
            "2023-01-15",
            2_000_000,
            1_200_000,
            600_025,
            12,
            0.18,
            110_000,
            0,
            31,
            "NNN1NN",
        )
        borrower = conn.execute("SELECT * FROM borrowers WHERE token = ?", (token,)).fetchone()
        assert borrower == (token, 26, 2, 850_050, 1, 1)
        assert conn.execute("SELECT count(*) FROM borrower_features").fetchone() == (5,)


def test_sqlalchemy_url_works_in_place_of_a_path(
    tmp_path: Path, mapping_path: Path, key: bytes
) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1), good_row(2)])
    url = f"sqlite:///{tmp_path / 'via-url.db'}"
    report = import_file(source, mapping_path, url, key=key)
    assert report.ledger == url and report.loans == 2
    assert snapshot(tmp_path / "via-url.db")["loans"][0][0] == "L-1001"


def test_existing_borrowers_are_updated_not_duplicated(
    tmp_path: Path, mapping_path: Path, key: bytes
) -> None:
    db = tmp_path / "l.db"
    import_file(write_csv(tmp_path / "a.csv", [good_row(1)]), mapping_path, db, key=key)
    # Same person, new loan, one year older, another spelling of the ID, age only known now.
    spelled = national_id(1)[:6] + " " + national_id(1)[6:14] + "-" + national_id(1)[14:].lower()
    second = good_row(1, national_id=spelled, age="27", loan_id="2001", income="", score="0.5")
    report = import_file(write_csv(tmp_path / "b.csv", [second]), mapping_path, db, key=key)
    assert (report.borrowers_new, report.borrowers_updated) == (0, 1)
    with sqlite3.connect(db) as conn:
        assert conn.execute(
            "SELECT count(*), max(age), max(income_proxy_fen) FROM borrowers"
        ).fetchone() == (
            1,
            27,
            850_050,  # empty income in the second file keeps the stored value
        )
        assert conn.execute("SELECT value FROM borrower_features").fetchall() == [(0.5,)]
        assert conn.execute("SELECT count(DISTINCT token), count(*) FROM loans").fetchone() == (
            1,
            2,
        )


def test_negative_zero_clamps_money(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    mapping_path.write_text(
        LOANS_TOML.replace(
            'balance = "balance"', 'balance = { column = "balance", negative = "zero" }'
        )
    )
    source = write_csv(tmp_path / "loans.csv", [good_row(1, balance="-23")])
    import_file(source, mapping_path, tmp_path / "l.db", key=key)
    assert snapshot(tmp_path / "l.db")["loans"][0][6] == 0


def test_history_derives_status_and_days_past_due(tmp_path: Path, key: bytes) -> None:
    mapping = tmp_path / "h.toml"
    mapping.write_text(
        """
version = 1
[source]
as_of = "2024-06-30"
[borrower]
id = { column = "cust", kind = "customer_number" }
namespace = "test"
[loan]
loan_id = "cust"
product = { constant = "cash_loan" }
balance = "bal"
[history]
columns = ["m1", "m2", "m3"]
last_month = "2024-06"
map = { "ok" = "N", "late1" = "1", "late3" = "3", "none" = "*" }
amount_paid = ["p1", "p2", "p3"]
""",
        encoding="utf-8",
    )
    source = tmp_path / "h.csv"
    source.write_text("cust,bal,m1,m2,m3,p1,p2,p3\n7,10,ok,late3,late1,1,,2\n", encoding="utf-8")
    report = import_file(source, mapping, tmp_path / "l.db", key=key)
    assert report.history_rows == 3
    rows = snapshot(tmp_path / "l.db")
    loan = rows["loans"][0]
    assert loan[0] == "7" and loan[6] == 1000
    assert (loan[10], loan[11], loan[12]) == (1, 61, "N31")
    assert rows["repayment_history"] == [
        ("7", "2024-04", "N", None, 100),
        ("7", "2024-05", "3", None, None),
        ("7", "2024-06", "1", None, 200),
    ]


def test_parquet_source_works(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [good_row(i) for i in range(1, 4)]
    columns: dict[str, Any] = {h: [r[h] for r in rows] for h in HEADER}
    columns["age"] = pa.array([int(r["age"]) for r in rows], pa.int32())
    columns["income"] = pa.array([8500.5, None, 100.0])
    columns["balance"] = pa.array([6000.25, 0.0, 12.0])
    columns["open_date"] = pa.array([date(2023, 1, 15)] * 3, pa.date32())
    columns["defaulted"] = pa.array([True, False, None])
    source = tmp_path / "loans.parquet"
    pq.write_table(pa.table(columns), source)
    report = import_file(source, mapping_path, tmp_path / "l.db", key=key)
    assert report.loans == 3
    with sqlite3.connect(tmp_path / "l.db") as conn:
        got = conn.execute(
            "SELECT b.age, b.income_proxy_fen, b.defaulted, l.open_date, l.balance_fen "
            "FROM loans l JOIN borrowers b USING (token) ORDER BY l.loan_id"
        ).fetchall()
    assert got == [
        (26, 850_050, 1, "2023-01-15", 600_025),
        (27, None, 0, "2023-01-15", 0),
        (28, 10_000, None, "2023-01-15", 1_200),
    ]


def test_parquet_errors_name_row_and_column(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [good_row(1), good_row(2, age="abc")]
    source = tmp_path / "loans.parquet"
    pq.write_table(pa.table({h: [r[h] for r in rows] for h in HEADER}), source)
    issues = run_bad(source, mapping_path, tmp_path / "l.db", key)
    issue = find(issues, "age", "not a number")
    assert (issue.file, issue.row, issue.line) == ("loans.parquet", 2, None)
    assert str(issue) == "loans.parquet: row 2, column 'age': not a number: 'abc'"
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    issues = run_bad(tmp_path / "junk.parquet", mapping_path, tmp_path / "l.db", key)
    assert "not a readable Parquet file" in issues[0].message


# -- bad cells: one test per class -----------------------------------------------------------

BAD_CELLS = [
    ("balance", "", "empty value for required field balance"),
    ("loan_id", "", "empty value for required field loan_id"),
    ("balance", "abc", "not a number: 'abc'"),
    ("balance", "1,000", "not a number"),
    ("age", "30.5", "not a whole number"),
    ("term", "1.5", "not a whole number"),
    ("rate", "nan", "is not a finite number"),
    ("balance", "inf", "is not a finite number"),
    ("score", "-Infinity", "is not a finite number"),
    ("balance", "-23", "negative balance -23"),
    ("apps", "-1", "negative applications_3m -1"),
    ("balance", "0.001", "not a whole number of minor units"),
    ("balance", "1e30", "number out of range"),
    ("age", "150", "age 150 out of range (16..100)"),
    ("city_tier", "9", "city_tier 9 out of range (1..5)"),
    ("rate", "1.5", "annual_rate 1.5 out of range 0..1"),
    ("defaulted", "2", "label 2 out of range (0..1)"),
    ("term", "0", "term_months 0 out of range (at least 1)"),
    ("open_date", "2023-02-30", "invalid date '2023-02-30'"),
    ("open_date", "15/01/2023", "invalid date"),
    ("open_date", "2024-07-01", "after the extract's as_of date 2024-06-30"),
    ("status", "NNZ", "unknown status code(s) 'Z'"),
    ("product", "mortgage", "unknown product 'mortgage'"),
    ("national_id", "110101199003070010", "check digit does not match"),
    ("national_id", "12345", "must have 15 or 18 characters"),
    ("max_dpd", "0", "max_dpd_12m 0 is below days_past_due 31"),
]


@pytest.mark.parametrize(("column", "value", "fragment"), BAD_CELLS)
def test_bad_cell_is_reported_with_file_row_line_and_column(
    tmp_path: Path, mapping_path: Path, key: bytes, column: str, value: str, fragment: str
) -> None:
    changes = {column: value}
    if column == "max_dpd":
        changes["dpd"] = "31"
    rows = [good_row(1), good_row(2), good_row(3, **changes)]
    source = write_csv(tmp_path / "loans.csv", rows)
    ledger = tmp_path / "l.db"
    issues = run_bad(source, mapping_path, ledger, key)
    assert_cell_issue(issues, "loans.csv", 3, column, fragment)
    assert not ledger.exists()  # a failed import into a new ledger creates nothing


def test_invalid_national_id_is_never_echoed(
    tmp_path: Path, mapping_path: Path, key: bytes
) -> None:
    bad = "110101199003070010"
    source = write_csv(tmp_path / "loans.csv", [good_row(1, national_id=bad)])
    with pytest.raises(ImportValidationError) as info:
        import_file(source, mapping_path, tmp_path / "l.db", key=key)
    assert bad not in str(info.value)
    assert_cell_issue(info.value.errors, "loans.csv", 1, "national_id", "invalid national id")


def test_duplicate_loan_id_within_the_file(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    rows = [good_row(1), good_row(2, loan_id="1001")]
    issues = run_bad(write_csv(tmp_path / "loans.csv", rows), mapping_path, tmp_path / "l.db", key)
    assert_cell_issue(
        issues, "loans.csv", 2, "loan_id", "duplicate loan id 'L-1001' (first on row 1 (line 2))"
    )


def test_duplicate_loan_id_against_the_ledger(
    tmp_path: Path, mapping_path: Path, key: bytes
) -> None:
    db = tmp_path / "l.db"
    import_file(write_csv(tmp_path / "a.csv", [good_row(1)]), mapping_path, db, key=key)
    before = file_hash(db)
    rows = [good_row(2), good_row(3, loan_id="1001")]
    issues = run_bad(write_csv(tmp_path / "loans.csv", rows), mapping_path, db, key)
    assert_cell_issue(issues, "loans.csv", 2, "loan_id", "'L-1001' is already in the ledger")
    assert file_hash(db) == before


def test_conflicting_borrower_attributes(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    rows = [good_row(1), good_row(2), good_row(1, loan_id="3001", age="60")]
    issues = run_bad(write_csv(tmp_path / "loans.csv", rows), mapping_path, tmp_path / "l.db", key)
    assert_cell_issue(
        issues, "loans.csv", 3, "age", "the same borrower has age 26 on row 1 (line 2) but 60 here"
    )


def test_one_borrower_with_several_loans_is_fine(
    tmp_path: Path, mapping_path: Path, key: bytes
) -> None:
    rows = [good_row(1), good_row(1, loan_id="3001", income="")]
    report = import_file(
        write_csv(tmp_path / "loans.csv", rows), mapping_path, tmp_path / "l.db", key=key
    )
    assert (report.borrowers, report.loans) == (1, 2)


# -- bad structure ----------------------------------------------------------------------------


def test_missing_mapped_column(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    header = [h for h in HEADER if h != "balance"]
    source = write_csv(tmp_path / "loans.csv", [good_row(1)], header)
    issue = find(run_bad(source, mapping_path, tmp_path / "l.db", key), "balance", "missing")
    assert str(issue) == (
        "loans.csv: line 1, column 'balance': mapped column is missing from the file "
        "(used by loan.balance)"
    )


def test_unknown_source_column(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1)], [*HEADER, "SEX"])
    issue = find(run_bad(source, mapping_path, tmp_path / "l.db", key), "SEX", "neither mapped")
    assert (issue.file, issue.line) == ("loans.csv", 1)


def test_duplicate_header_names(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1)], [*HEADER, "age"])
    issue = find(run_bad(source, mapping_path, tmp_path / "l.db", key), "age", "appears twice")
    assert "columns 2 and 21" in str(issue)


def test_ragged_rows(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1), good_row(2)])
    with source.open("a", encoding="utf-8") as fh:
        fh.write("1,2,3\n")
    issue = find(run_bad(source, mapping_path, tmp_path / "l.db", key), None, "has 3 fields")
    assert str(issue) == "loans.csv: row 3 (line 4): has 3 fields, the header has 20"


def test_nul_byte(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1), good_row(2, note="a\x00b")])
    issue = find(run_bad(source, mapping_path, tmp_path / "l.db", key), None, "NUL byte")
    assert (issue.file, issue.line) == ("loans.csv", 3)


def test_bad_encoding(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1), good_row(2)])
    data = source.read_bytes().replace(b"free text", b"caf\xe9", 2)
    source.write_bytes(data)
    issue = find(run_bad(source, mapping_path, tmp_path / "l.db", key), None, "not valid utf-8")
    assert (issue.file, issue.line) == ("loans.csv", 2)
    assert "0xe9" in issue.message


def test_declared_encoding_is_used(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    mapping_path.write_text(LOANS_TOML.replace("money_scale", 'encoding = "gb18030"\nmoney_scale'))
    source = write_csv(tmp_path / "loans.csv", [good_row(1, note="借呗")])
    source.write_bytes(source.read_text(encoding="utf-8").encode("gb18030"))
    assert import_file(source, mapping_path, tmp_path / "l.db", key=key).loans == 1


def test_empty_file(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    (tmp_path / "loans.csv").write_bytes(b"")
    issues = run_bad(tmp_path / "loans.csv", mapping_path, tmp_path / "l.db", key)
    assert str(issues[0]) == "loans.csv: the file is empty: no header line"


def test_header_without_rows(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = write_csv(tmp_path / "loans.csv", [])
    assert "no data rows" in str(run_bad(source, mapping_path, tmp_path / "l.db", key)[0])


def test_missing_header(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = tmp_path / "loans.csv"
    source.write_text("1,25,2,8500,0,0\n2,30,1,9000,1,1\n", encoding="utf-8")
    issues = run_bad(source, mapping_path, tmp_path / "l.db", key)
    assert len(issues) == 1 and issues[0].line == 1 and "no header line" in issues[0].message


def test_oversize_field(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    big = "x" * (csv.field_size_limit() + 10)
    source = write_csv(tmp_path / "loans.csv", [good_row(1), good_row(2, note=big)])
    issue = find(run_bad(source, mapping_path, tmp_path / "l.db", key), None, "field larger than")
    assert (issue.row, issue.line) == (2, 3)


def test_unterminated_quote(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1)])
    with source.open("a", encoding="utf-8") as fh:
        fh.write('"oops,1,2\nmore\n')
    issue = find(run_bad(source, mapping_path, tmp_path / "l.db", key), None, "unexpected end")
    assert (issue.row, issue.line) == (2, 3)


def test_missing_source_file(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    issues = run_bad(tmp_path / "nope.csv", mapping_path, tmp_path / "l.db", key)
    assert issues[0].file == "nope.csv" and "cannot open" in issues[0].message


def test_errors_are_capped_with_a_count(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    rows = [good_row(i, age="x") for i in range(1, 81)]
    with pytest.raises(ImportValidationError) as info:
        import_file(
            write_csv(tmp_path / "loans.csv", rows), mapping_path, tmp_path / "l.db", key=key
        )
    assert len(info.value.errors) == 50 and info.value.more == 30
    assert str(info.value).splitlines()[0] == "80 problems found; nothing was imported"
    assert str(info.value).endswith("... and 30 more")


# -- bad mappings, keys, partitions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('balance = "balance"', 'balance = { column = "balance", negative = "never" }'),
            'loans.toml: loan.balance.negative: must be "error" or "zero"',
        ),
        (('balance = "balance"', 'balanse = "balance"'), "loans.toml: loan.balanse: unknown key"),
        (
            ('days_past_due = "dpd"', ""),
            "loans.toml: loan.days_past_due: required: map a column or a constant "
            "(or add [history] to derive it)",
        ),
        (
            ('product = "product"', 'product = { constant = "mortgage" }'),
            "loans.toml: loan.product.constant: unknown product 'mortgage'",
        ),
        (('age = "age"', "age = 5"), "loans.toml: borrower.age: must be a column name"),
        (
            ('age = "age"', 'age = { column = "age", prefix = "x" }'),
            "loans.toml: borrower.age.prefix: only text fields",
        ),
        (("version = 1", "version = 2"), "loans.toml: version: must be 1"),
        (('ignore = ["note"]', 'ignore = ["note", "age"]'), "loans.toml: source.ignore: 'age'"),
        (("money_scale = 100", "money_scale = 0"), "loans.toml: source.money_scale: must be"),
        (("money_scale = 100", 'encoding = "utf-16"'), "loans.toml: source.encoding: 'utf-16'"),
        (("[loan]", "[loan\n"), "loans.toml: not valid TOML"),
        (('score = "score"', '"a.b" = "score"'), "loans.toml: borrower.features.a.b: feature"),
        (
            (
                'label = "defaulted"',
                'label = { column = "defaulted", map = { "y" = 1 }, constant = 1 }',
            ),
            'loans.toml: borrower.label: give exactly one of "column" or "constant"',
        ),
    ],
)
def test_mapping_errors_name_file_and_key(
    tmp_path: Path, key: bytes, change: tuple[str, str], expected: str
) -> None:
    path = tmp_path / "loans.toml"
    assert change[0] in LOANS_TOML
    path.write_text(LOANS_TOML.replace(change[0], change[1], 1), encoding="utf-8")
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert any(str(issue).startswith(expected) for issue in info.value.errors), info.value
    source = write_csv(tmp_path / "loans.csv", [good_row(1)])
    with pytest.raises(ImportValidationError):
        import_file(source, path, tmp_path / "l.db", key=key)


def test_customer_number_needs_a_namespace() -> None:
    text = LOANS_TOML.replace('kind = "national_id"', 'kind = "customer_number"')
    with pytest.raises(MappingError) as info:
        parse_mapping(text, "m.toml")
    assert str(info.value.errors[0]).startswith("m.toml: borrower.namespace: required")


def test_partition_given_without_partition_section(
    tmp_path: Path, mapping_path: Path, key: bytes
) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1)])
    issues = run_bad(source, mapping_path, tmp_path / "l.db", key, partition="a")
    assert str(issues[0]).startswith("loans.toml: partition: partition 'a' requested")


def test_missing_or_malformed_key(tmp_path: Path, mapping_path: Path) -> None:
    source = write_csv(tmp_path / "loans.csv", [good_row(1)])
    with pytest.raises(ImportValidationError, match="federation key is needed"):
        import_file(source, mapping_path, tmp_path / "l.db", key=None)
    with pytest.raises(ImportValidationError, match="32 bytes"):
        import_file(source, mapping_path, tmp_path / "l.db", key=b"short")


def test_ledger_of_another_key_is_refused(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    db = tmp_path / "l.db"
    import_file(
        write_csv(tmp_path / "a.csv", [good_row(1)]), mapping_path, db, key=key, platform="x"
    )
    before = snapshot(db)
    other = write_csv(tmp_path / "b.csv", [good_row(2)])
    with pytest.raises(LedgerError, match="refusing to mix"):
        import_file(other, mapping_path, db, key=generate_federation_key())
    with pytest.raises(LedgerError, match="belongs to platform 'x', this import is for 'y'"):
        import_file(other, mapping_path, db, key=key, platform="y")
    assert snapshot(db) == before


def test_not_a_ledger_is_refused(tmp_path: Path, mapping_path: Path, key: bytes) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError):
        import_file(write_csv(tmp_path / "a.csv", [good_row(1)]), mapping_path, junk, key=key)


# -- atomicity and privacy --------------------------------------------------------------------


def test_failed_import_leaves_existing_ledger_unchanged(
    tmp_path: Path, mapping_path: Path, key: bytes
) -> None:
    db = tmp_path / "l.db"
    import_file(
        write_csv(tmp_path / "a.csv", [good_row(i) for i in range(1, 4)]), mapping_path, db, key=key
    )
    before, before_hash = snapshot(db), file_hash(db)
    rows = [good_row(1, age="40", loan_id="5001"), good_row(7), good_row(8, balance="-5")]
    run_bad(write_csv(tmp_path / "b.csv", rows), mapping_path, db, key)
    assert snapshot(db) == before
    assert file_hash(db) == before_hash


def test_database_error_rolls_everything_back(
    tmp_path: Path, mapping_path: Path, key: bytes
) -> None:
    db = tmp_path / "l.db"
    import_file(write_csv(tmp_path / "a.csv", [good_row(1)]), mapping_path, db, key=key)
    with sqlite3.connect(db) as conn:  # loans go in after borrowers, features and meta
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON loans WHEN NEW.loan_id = 'L-1003' "
            "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
        )
    before = snapshot(db)
    rows = [good_row(1, age="30", loan_id="9001"), good_row(2), good_row(3)]
    with pytest.raises(LedgerError, match="refused by trigger"):
        import_file(write_csv(tmp_path / "b.csv", rows), mapping_path, db, key=key, platform="p")
    assert snapshot(db) == before  # borrowers, updates, features and meta all rolled back


def test_national_ids_never_reach_the_ledger_or_the_log(
    tmp_path: Path, mapping_path: Path, key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    raw = [national_id(i) for i in range(1, 11)]
    old_form = "110101900307011"  # a 15-digit ID, widened to 18 characters when normalised
    rows = [good_row(i, national_id=raw[i - 1]) for i in range(1, 11)]
    rows.append(good_row(11, national_id=old_form))
    db = tmp_path / "l.db"
    with caplog.at_level(logging.DEBUG):
        import_file(write_csv(tmp_path / "loans.csv", rows), mapping_path, db, key=key)
    text = repr(snapshot(db))
    needles = [*raw, old_form, "11010119900307011"]
    assert not [n for n in needles if n in text]
    assert not [n for n in needles if n.encode() in db.read_bytes()]
    assert not [n for n in needles if n in caplog.text]


# -- hostile input ----------------------------------------------------------------------------

_HOSTILE_ALPHABET = st.sampled_from(list("ab1-.,\"'\n\r\x00 \t;é借\ufeff0NCx*9e+"))
_cell = st.text(_HOSTILE_ALPHABET, max_size=8) | st.sampled_from(["", "1", "-1", "nan", "1e999"])


@st.composite
def _garbage_rows(draw: st.DrawFn) -> bytes:
    """A valid header, then rows of garbage cells (ragged too), quoted at random."""
    rows = draw(st.lists(st.lists(_cell, min_size=0, max_size=23), max_size=6))
    buffer = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    writer = csv.writer(buffer, quoting=quoting)
    writer.writerow(HEADER)
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue().encode("utf-8")


_hostile = st.one_of(
    st.binary(max_size=400),
    st.text(_HOSTILE_ALPHABET, max_size=400).map(lambda t: t.encode("utf-8")),
    st.text(_HOSTILE_ALPHABET, max_size=200).map(lambda t: (",".join(HEADER) + "\n" + t).encode()),
    _garbage_rows(),
)


@pytest.fixture(scope="module")
def base_ledger(tmp_path_factory: pytest.TempPathFactory, key: bytes) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    mapping = folder / "loans.toml"
    mapping.write_text(LOANS_TOML, encoding="utf-8")
    db = folder / "base.db"
    import_file(write_csv(folder / "seed.csv", [good_row(1), good_row(2)]), mapping, db, key=key)
    return mapping, db


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=_hostile)
def test_hostile_csv_is_imported_or_refused_cleanly(
    base_ledger: tuple[Path, Path], key: bytes, data: bytes
) -> None:
    mapping, base = base_ledger
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "l.db"
        shutil.copy(base, db)
        source = Path(folder) / "hostile.csv"
        source.write_bytes(data)
        before = snapshot(db)
        try:
            import_file(source, mapping, db, key=key)
        except ImportValidationError as exc:
            assert exc.errors and all(issue.file == "hostile.csv" for issue in exc.errors)
            assert snapshot(db) == before
