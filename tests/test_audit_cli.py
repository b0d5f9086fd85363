"""``fedcredit audit verify`` / ``show`` against real logs tampered with in every way.

Each tamper case checks the exit status and that the entry named is the *first* bad one:
an auditor who is told "line 7" when line 3 was edited looks in the wrong place.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import uuid
from pathlib import Path

import pytest

from clients.query_log import QueryLog
from fedcredit.cli import main
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from protocols.audit_chain import GENESIS, chain_hash
from server.keyholder import AuditLog, verify_audit_log

ENTRIES = 6


@pytest.fixture(scope="module")
def base_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated ledger with a query log of ENTRIES entries (copied per test)."""
    out = tmp_path_factory.mktemp("audit-pop")
    summary = generate(PopulationConfig(platforms=3, borrowers=200, seed=5), out, workers=1)
    ledger = Path(summary.platforms[0].ledger)
    qlog = QueryLog(str(ledger))
    try:
        for i in range(ENTRIES):
            kind = "match_start" if i % 3 == 0 else "debt_profile"
            qlog.append(
                uuid.uuid4().hex,
                kind,
                "refused" if i == 4 else "answered",
                {
                    "participants": ["platform-01", "platform-02", "platform-03"],
                    "elements": 10 + i,
                    "elements_sha256": f"{i:064x}",
                    "lender": "bank-a" if i % 2 else "bank-b",
                    "secret_field": "not for display",
                },
            )
    finally:
        qlog.close()
    return ledger


@pytest.fixture
def ledger(base_ledger: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ledger.sqlite"
    shutil.copy(base_ledger, copy)
    return copy


@pytest.fixture
def audit_file(tmp_path: Path) -> Path:
    path = tmp_path / "kh.audit.jsonl"
    audit = AuditLog(path)
    for i in range(ENTRIES):
        audit.append(
            {
                "event": "decrypt" if i != 2 else "refused",
                "at": f"2026-11-26T01:0{i}:00+00:00",
                "query_id": f"{i:032x}",
                "key_id": "0123456789abcdef",
                "participants": ["platform-01", "platform-02", "platform-03"],
                "count": 37 + i,
            }
        )
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["audit", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _verify(capsys: pytest.CaptureFixture[str], target: Path, *extra: str) -> tuple[int, dict]:
    code, out = _run(capsys, "verify", str(target), "--json", *extra)
    return code, json.loads(out)


def _sql(ledger: Path, *statements: tuple[str, tuple]) -> None:
    db = sqlite3.connect(ledger)
    with db:
        for sql, params in statements:
            db.execute(sql, params)
    db.close()


def _rows(ledger: Path) -> list[dict]:
    db = sqlite3.connect(ledger)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM query_log ORDER BY seq")]
    db.close()
    return rows


def _anchor(capsys: pytest.CaptureFixture[str], target: Path) -> tuple[int, str]:
    code, report = _verify(capsys, target)
    assert code == 0 and report["ok"], report
    return report["count"], report["head"]


# ------------------------------------------------------------------------- query log


def test_intact_ledger_reports_count_and_head(
    capsys: pytest.CaptureFixture[str], ledger: Path
) -> None:
    code, out = _run(capsys, "verify", str(ledger))
    assert code == 0
    head = _rows(ledger)[-1]["entry_hash"]
    assert f"{ENTRIES} entries" in out and f"head {head}" in out
    code, report = _verify(capsys, ledger, "--expect-count", str(ENTRIES), "--expect-head", head)
    assert code == 0 and report["anchor"]["ok"] and report["kind"] == "query_log"
    # The anchor is a prefix: entries appended later are legitimate and counted.
    qlog = QueryLog(str(ledger))
    qlog.append(uuid.uuid4().hex, "debt_profile", "answered", {"elements": 1})
    qlog.close()
    code, report = _verify(capsys, ledger, "--expect-count", str(ENTRIES), "--expect-head", head)
    assert code == 0 and report["anchor"]["appended_since"] == 1
    code, report = _verify(capsys, ledger, "--expect-head", head)
    assert code == 0 and report["anchor"]["position"] == ENTRIES


def test_edited_detail_names_that_entry(capsys: pytest.CaptureFixture[str], ledger: Path) -> None:
    _sql(ledger, ("UPDATE query_log SET detail = ? WHERE seq = 3", ('{"elements": 999}',)))
    code, report = _verify(capsys, ledger)
    assert code == 1
    assert report["first_bad"]["seq"] == 3 and report["first_bad"]["check"] == "content"
    code, out = _run(capsys, "verify", str(ledger))
    assert code == 1 and "entry seq 3" in out and "TAMPERED" in out


def test_deleted_middle_entry(capsys: pytest.CaptureFixture[str], ledger: Path) -> None:
    _sql(ledger, ("DELETE FROM query_log WHERE seq = 3", ()))
    code, report = _verify(capsys, ledger)
    assert code == 1
    bad = report["first_bad"]
    assert bad["check"] == "deleted" and bad["seq"] == 4 and "entry 3 deleted" in bad["reason"]


def test_deleted_last_entry_needs_the_anchor(
    capsys: pytest.CaptureFixture[str], ledger: Path
) -> None:
    count, head = _anchor(capsys, ledger)
    _sql(ledger, ("DELETE FROM query_log WHERE seq = ?", (count,)))
    code, report = _verify(capsys, ledger)
    assert code == 0 and report["count"] == count - 1  # the chain alone cannot tell
    code, report = _verify(capsys, ledger, "--expect-count", str(count))
    assert code == 1 and report["first_bad"]["check"] == "truncated"
    assert report["first_bad"]["seq"] == count
    code, report = _verify(capsys, ledger, "--expect-head", head)
    assert code == 1 and report["first_bad"]["check"] == "anchor"
    code, report = _verify(capsys, ledger, "--expect-count", str(count), "--expect-head", head)
    assert code == 1 and report["first_bad"]["check"] == "truncated"


def test_rewritten_tail_is_caught_by_the_anchor(
    capsys: pytest.CaptureFixture[str], ledger: Path
) -> None:
    count, head = _anchor(capsys, ledger)
    rows = _rows(ledger)
    prev = rows[1]["entry_hash"]
    for row in rows[2:]:  # edit entry 3 and recompute every later hash: a valid chain
        if row["seq"] == 3:
            row["detail"] = '{"elements": 0}'
        body = {k: row[k] for k in ("seq", "query_id", "kind", "outcome", "detail", "received_at")}
        digest = chain_hash(prev, body)
        _sql(
            ledger,
            (
                "UPDATE query_log SET detail = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
                (row["detail"], prev, digest, row["seq"]),
            ),
        )
        prev = digest
    assert _verify(capsys, ledger)[0] == 0
    code, report = _verify(capsys, ledger, "--expect-count", str(count), "--expect-head", head)
    assert code == 1 and report["first_bad"]["check"] == "anchor"
    assert report["first_bad"]["seq"] == count


def test_inserted_entry_with_valid_hash(capsys: pytest.CaptureFixture[str], ledger: Path) -> None:
    rows = _rows(ledger)
    # Make room at seq 3 (renumber 3.. upwards), insert a well-formed entry chained to seq 2.
    statements: list[tuple[str, tuple]] = [
        ("UPDATE query_log SET seq = seq + 100 WHERE seq >= 3", ()),
        ("UPDATE query_log SET seq = seq - 99 WHERE seq >= 103", ()),
    ]
    forged = {
        "seq": 3,
        "query_id": uuid.uuid4().hex,
        "kind": "debt_profile",
        "outcome": "answered",
        "detail": json.dumps({"elements": 5}),
        "received_at": rows[1]["received_at"],
    }
    digest = chain_hash(rows[1]["entry_hash"], forged)
    statements.append(
        (
            "INSERT INTO query_log (seq, query_id, kind, outcome, detail, received_at, "
            "prev_hash, entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (*forged.values(), rows[1]["entry_hash"], digest),
        )
    )
    _sql(ledger, *statements)
    code, report = _verify(capsys, ledger)
    assert code == 1
    assert report["first_bad"]["check"] == "inserted" and report["first_bad"]["seq"] == 3


def test_reordered_entries(capsys: pytest.CaptureFixture[str], ledger: Path) -> None:
    _sql(
        ledger,
        ("UPDATE query_log SET seq = 100 WHERE seq = 3", ()),
        ("UPDATE query_log SET seq = 3 WHERE seq = 4", ()),
        ("UPDATE query_log SET seq = 4 WHERE seq = 100", ()),
    )
    code, report = _verify(capsys, ledger)
    assert code == 1
    bad = report["first_bad"]
    assert bad["check"] == "reordered" and bad["seq"] == 3 and "seq 4" in bad["reason"]


def test_query_log_verify_method_uses_the_same_checks(ledger: Path) -> None:
    _sql(ledger, ("DELETE FROM query_log WHERE seq = 2", ()))
    qlog = QueryLog(str(ledger))
    try:
        with pytest.raises(ValueError, match=r"broken at entry 3: .*entry 2 deleted"):
            qlog.verify()
    finally:
        qlog.close()


# ------------------------------------------------------------------ key-holder audit file


def test_keyholder_file_intact_and_anchored(
    capsys: pytest.CaptureFixture[str], audit_file: Path
) -> None:
    count, head = _anchor(capsys, audit_file)
    assert count == ENTRIES
    code, report = _verify(capsys, audit_file, "--expect-count", str(count), "--expect-head", head)
    assert code == 0 and report["kind"] == "keyholder" and not report["warnings"]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize(
    ("case", "line", "check"),
    [("edit", 3, "content"), ("delete", 3, "deleted"), ("insert", 3, "inserted"),
     ("reorder", 3, "reordered"), ("duplicate", 4, "inserted"), ("garbage", 3, "unreadable")],
)  # fmt: skip
def test_keyholder_file_tampering(
    capsys: pytest.CaptureFixture[str], audit_file: Path, case: str, line: int, check: str
) -> None:
    lines = _lines(audit_file)
    if case == "edit":
        lines[2] = lines[2].replace('"count":39', '"count":40')
    elif case == "delete":
        del lines[2]
    elif case == "insert":
        prev = json.loads(lines[1])["hash"]
        event = {"prev": prev, "event": "decrypt", "at": "2026-11-26T01:01:30+00:00", "count": 1}
        forged = {**event, "hash": chain_hash(prev, event)}
        lines.insert(2, json.dumps(forged, sort_keys=True, separators=(",", ":")))
    elif case == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
    elif case == "duplicate":
        lines.insert(3, lines[2])
    else:
        lines[2] = "not json"
    _write(audit_file, lines)
    code, report = _verify(capsys, audit_file)
    assert code == 1, report
    assert report["first_bad"]["position"] == line and report["first_bad"]["check"] == check
    with pytest.raises(ValueError, match=f"line {line}"):
        verify_audit_log(audit_file)


def test_keyholder_file_truncated_and_clock_warning(
    capsys: pytest.CaptureFixture[str], audit_file: Path
) -> None:
    count, head = _anchor(capsys, audit_file)
    _write(audit_file, _lines(audit_file)[:-1])
    assert _verify(capsys, audit_file)[0] == 0
    code, report = _verify(capsys, audit_file, "--expect-count", str(count))
    assert code == 1 and report["first_bad"]["position"] == count
    code, report = _verify(capsys, audit_file, "--expect-head", head)
    assert code == 1 and report["first_bad"]["check"] == "anchor"
    # Time going backwards is a warning, not a failure (the chain fixes the order).
    audit = AuditLog(audit_file)
    audit.append({"event": "decrypt", "at": "2026-11-26T00:00:00+00:00", "count": 1})
    code, report = _verify(capsys, audit_file)
    assert code == 0 and any("earlier than" in w for w in report["warnings"])


# ------------------------------------------------------------------------ unusable input


def test_unusable_input_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    for target, words in [
        (tmp_path / "missing.sqlite", "no such file"),
        (text, "not a ledger"),
        (other, "without a query_log table"),
        (binary, "not UTF-8"),
        (tmp_path, "not a file"),
    ]:
        code, out = _run(capsys, "verify", str(target))
        assert code == 2 and words in out, (target, out)
    code, out = _run(capsys, "verify", str(text), "--json")
    assert code == 2 and json.loads(out)["ok"] is False
    code, out = _run(capsys, "verify", str(text), "--expect-head", "xyz")
    assert code == 2 and "64 hex" in out


def test_sqlalchemy_url_is_accepted(capsys: pytest.CaptureFixture[str], ledger: Path) -> None:
    code, out = _run(capsys, "verify", f"sqlite:///{ledger}", "--json")
    assert code == 0 and json.loads(out)["count"] == ENTRIES


# ---------------------------------------------------------------------------------- show


def test_show_lists_safe_fields_and_filters(
    capsys: pytest.CaptureFixture[str], ledger: Path, audit_file: Path
) -> None:
    code, out = _run(capsys, "show", str(ledger), "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == ENTRIES
    assert all("secret_field" not in r["detail"] and r["hidden"] == 1 for r in rows)
    assert rows[0]["detail"]["participants"] == ["platform-01", "platform-02", "platform-03"]
    code, out = _run(capsys, "show", str(ledger), "--json", "--kind", "match_start")
    assert [r["seq"] for r in json.loads(out)] == [1, 4]
    code, out = _run(capsys, "show", str(ledger), "--json", "--lender", "bank-a")
    assert [r["seq"] for r in json.loads(out)] == [2, 4, 6]
    code, out = _run(capsys, "show", str(ledger), "--json", "--since", "2999-01-01")
    assert json.loads(out) == []
    code, out = _run(capsys, "show", str(ledger))
    assert code == 0 and "not for display" not in out and "debt_profile" in out
    code, out = _run(capsys, "show", str(audit_file), "--json", "--kind", "refused")
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["outcome"] == "refused" and rows[0]["detail"]["count"] == 39
    code, out = _run(capsys, "show", str(audit_file), "--since", "2026-11-26T01:04:00Z")
    assert code == 0 and len(out.strip().splitlines()) == 2
    code, out = _run(capsys, "show", str(ledger), "--since", "yesterday")
    assert code == 2


def test_show_never_prints_a_borrower_token(
    capsys: pytest.CaptureFixture[str], ledger: Path
) -> None:
    db = sqlite3.connect(ledger)
    tokens = [t for (t,) in db.execute("SELECT token FROM borrowers LIMIT 3")]
    db.close()
    assert tokens and all(re.fullmatch(r"[0-9a-f]{64}", t) for t in tokens)
    # A careless writer puts tokens where digests, ids and reasons go.
    qlog = QueryLog(str(ledger))
    qlog.append(
        tokens[0],
        "debt_profile",
        "refused",
        {"elements_sha256": tokens[1], "reason": f"unknown borrower {tokens[2]}", "count": 1},
    )
    qlog.close()
    for extra in ([], ["--json"]):
        code, out = _run(capsys, "show", str(ledger), *extra)
        assert code == 0 and "[redacted]" in out
        found = set(re.findall(r"[0-9a-fA-F]{64}", out))
        assert not found & {t.lower() for t in tokens}
    db = sqlite3.connect(ledger)
    every = {t for (t,) in db.execute("SELECT token FROM borrowers")}
    db.close()
    code, out = _run(capsys, "show", str(ledger), "--json")
    assert not set(re.findall(r"[0-9a-f]{64}", out)) & every


def test_empty_logs(capsys: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path) -> None:
    _sql(ledger, ("DROP TABLE query_log", ()))
    code, report = _verify(capsys, ledger)
    assert code == 0 and report["count"] == 0 and report["head"] == GENESIS
    code, report = _verify(capsys, ledger, "--expect-count", "2")
    assert code == 1 and report["first_bad"]["check"] == "truncated"
