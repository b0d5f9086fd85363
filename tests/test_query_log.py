"""The query log's one-transaction answer (``QueryLog.answer_once``) and its WAL mode."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.query_log import QueryLog, ReplayedQuery


@pytest.fixture
def log(tmp_path: Path) -> Iterator[QueryLog]:
    path = tmp_path / "ledger.sqlite"
    sqlite3.connect(path).close()  # an (empty) ledger file: the log creates its table
    opened = QueryLog(str(path))
    yield opened
    opened.close()


def test_answer_once_logs_the_answer_then_refuses_the_replay(log: QueryLog) -> None:
    log.append("first", "debt_profile", "answered", {"rows": 3})
    head = log.answer_once("nonce-1", "secure_sum.gbdt_level", {"words": 10}, {"reason": "x"})
    with pytest.raises(ReplayedQuery):
        log.answer_once("nonce-1", "secure_sum.gbdt_level", {"words": 10}, {"reason": "replay"})
    entries = log.entries()
    assert [(e["query_id"], e["outcome"]) for e in entries] == [
        ("first", "answered"),
        ("nonce-1", "answered"),
        ("nonce-1", "refused"),
    ]
    assert entries[1]["entry_hash"] == head and entries[2]["prev_hash"] == head
    assert json.loads(entries[2]["detail"]) == {"reason": "replay"}
    assert log.answered("nonce-1") and not log.answered("nonce-2")
    assert log.verify() == 3  # the chain the audit command checks


def test_a_refused_id_can_still_be_answered_once(log: QueryLog) -> None:
    """Only an *answered* id is a replay: a refusal logged for another reason is not."""
    log.append("nonce-3", "secure_sum.train", "refused", {"reason": "not a participant"})
    log.answer_once("nonce-3", "secure_sum.train", {"words": 4}, {"reason": "replay"})
    assert [e["outcome"] for e in log.entries()] == ["refused", "answered"]


def test_the_log_runs_in_wal_mode_and_a_reopened_log_continues_the_chain(
    log: QueryLog, tmp_path: Path
) -> None:
    log.answer_once("a", "secure_sum.train", {}, {})
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = QueryLog(str(tmp_path / "ledger.sqlite"))
    try:
        again.answer_once("b", "secure_sum.train", {}, {})
        assert again.verify() == 2
    finally:
        again.close()
