"""The synthetic population: schema, determinism, the documented distributions, the truth."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clients.ledger import STATUS_CODES
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate, platform_count_shares
from fedcredit.datagen.population import generate_world
from protocols.tokens import generate_federation_key, write_federation_key

LEDGER_TABLES = {"ledger_meta", "borrowers", "borrower_features", "loans", "repayment_history"}
TRUTH_ONLY = ("true_pd", "latent_risk", "total_debt_fen", "fraud_ring")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("datagen")
    summary = generate(PopulationConfig(borrowers=20_000, seed=3), out, workers=2)
    return out, summary


@pytest.fixture(scope="module")
def world():
    """A large in-memory world (no I/O) for the distribution checks."""
    return generate_world(PopulationConfig(borrowers=300_000, platforms=10, seed=11))


def table_dump(path: str) -> str:
    """A digest of every row of every table, in a canonical order."""
    con = sqlite3.connect(path)
    digest = hashlib.sha256()
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"):
        for row in con.execute(f"SELECT * FROM {name} ORDER BY 1, 2"):
            digest.update(repr(row).encode())
    con.close()
    return digest.hexdigest()


# ------------------------------------------------------------------------------ schema


def test_ledgers_have_the_documented_schema(small_run):
    _, summary = small_run
    for p in summary.platforms:
        con = sqlite3.connect(p.ledger)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == LEDGER_TABLES
        meta = dict(con.execute("SELECT key, value FROM ledger_meta"))
        assert meta["schema_version"] == "1" and meta["platform"] == p.name
        assert meta["as_of"] == "2026-06-30" and len(meta["key_id"]) == 16
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT count(*) FROM borrowers").fetchone()[0] == p.borrowers
        assert con.execute("SELECT count(*) FROM loans").fetchone()[0] == p.loans


def test_ledgers_hold_tokens_and_own_data_only(small_run):
    _, summary = small_run
    for p in summary.platforms:
        con = sqlite3.connect(p.ledger)
        columns = {row[1] for t in LEDGER_TABLES for row in con.execute(f"PRAGMA table_info({t})")}
        assert not columns & set(TRUTH_ONLY), "truth leaked into a platform ledger"
        tokens = [r[0] for r in con.execute("SELECT token FROM borrowers")]
        assert all(len(t) == 64 and int(t, 16) >= 0 for t in tokens)
    # the truth file lives outside every platform's folder
    truth = Path(summary.truth)
    assert truth.exists()
    for p in summary.platforms:
        assert truth.parent != Path(p.ledger).parent


def test_loan_fields_are_consistent(small_run):
    _, summary = small_run
    for p in summary.platforms:
        con = sqlite3.connect(p.ledger)
        rows = con.execute(
            "SELECT product, credit_limit_fen, principal_fen, balance_fen, term_months, "
            "annual_rate, days_past_due, max_dpd_12m, repayment_status, open_date FROM loans"
        ).fetchall()
        for product, limit, principal, bal, term, apr, dpd, max_dpd, status, opened in rows:
            assert bal >= 0 and 0 <= dpd <= max_dpd
            assert len(status) == 12 and set(status) <= STATUS_CODES
            assert opened <= "2026-06-30"
            if product == "revolving":
                assert 500_00 <= limit <= 50_000_00 and principal is None and term is None
                assert bal <= limit
            else:
                assert 1_000_00 <= principal <= 300_000_00 and term in (3, 6, 12)
                assert bal <= principal
            if status.endswith("C"):
                assert bal == 0 and dpd == 0
            assert 0.07 <= apr <= 0.36
        codes = {r[0] for r in con.execute("SELECT DISTINCT status FROM repayment_history")}
        assert codes <= STATUS_CODES
        # each history row agrees with the loan's status string
        sample = con.execute(
            "SELECT l.repayment_status, group_concat(h.status, '') FROM loans l "
            "JOIN repayment_history h USING (loan_id) GROUP BY l.loan_id LIMIT 2000"
        ).fetchall()
        for status, history in sample:
            assert status.lstrip("/") == history


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_population(tmp_path):
    key = tmp_path / "federation.key"
    write_federation_key(key, generate_federation_key())
    cfg = PopulationConfig(borrowers=3_000, seed=5)
    a = generate(cfg, tmp_path / "a", key_file=key, workers=2)
    b = generate(cfg, tmp_path / "b", key_file=key, workers=1)
    for pa, pb in zip(a.platforms, b.platforms, strict=True):
        assert table_dump(pa.ledger) == table_dump(pb.ledger)
    ta, tb = pq.read_table(a.truth), pq.read_table(b.truth)
    assert ta.drop(["platforms"]).equals(tb.drop(["platforms"]))
    assert a.bayes_auc == b.bayes_auc
    c = generate(cfg.model_copy(update={"seed": 6}), tmp_path / "c", key_file=key, workers=2)
    assert table_dump(c.platforms[0].ledger) != table_dump(a.platforms[0].ledger)


# ------------------------------------------------------------------------- distributions


def test_platform_counts_follow_the_mission(world):
    shares = platform_count_shares(world.persons.k[~world.persons.fraud])
    # MISSION.md: about 67/25/6/2 % on 1/2/3/4+ platforms
    assert 0.64 <= shares["1"] <= 0.70
    assert 0.22 <= shares["2"] <= 0.28
    assert 0.045 <= shares["3"] <= 0.075
    assert 0.01 <= shares["4+"] <= 0.03


def test_with_three_platforms_the_tail_folds_into_three():
    w = generate_world(PopulationConfig(borrowers=100_000, seed=1))
    shares = platform_count_shares(w.persons.k)
    assert shares["4+"] == 0.0 and 0.065 <= shares["3"] <= 0.095


def test_default_rates_in_stated_bands(world):
    y = world.outcome.defaulted
    assert 0.025 <= y.mean() <= 0.035  # person level, target 3 %
    k = world.persons.k
    rate_by_k = [y[k == i].mean() for i in (1, 2, 3)]
    assert rate_by_k[0] < rate_by_k[1] < rate_by_k[2]  # risk rises with platforms
    # the subprime archetype (index 2) runs several times the prime default rate
    pairs = world.pairs
    per_platform = [y[pairs.person[pairs.platform == j]].mean() for j in range(4)]
    assert per_platform[2] > 1.3 * per_platform[1]
    assert all(0.02 <= r <= 0.08 for r in per_platform)


def test_repeat_borrowing_on_one_platform_does_not_predict_default(world):
    loans_per_pair = np.bincount(world.loans.pair)
    y = world.outcome.defaulted[world.pairs.person]
    one, many = y[loans_per_pair == 1].mean(), y[loans_per_pair >= 2].mean()
    assert abs(one - many) < 0.004


def test_amounts_are_realistic(world):
    L = world.loans
    principal = L.principal[~L.revolving]
    assert 7_000 <= principal.mean() <= 11_000  # WeBank's average loan: RMB 8,200
    assert principal.min() >= 1_000 and principal.max() <= 300_000
    limits = L.credit_limit[L.revolving]
    assert limits.min() >= 500 and limits.max() <= 50_000
    prime = np.isin(L.platform, [0, 1, 3])
    assert L.apr[prime].min() >= 0.073 and L.apr[prime].max() <= 0.1825
    assert L.apr[L.platform == 2].min() >= 0.24 and L.apr[L.platform == 2].max() <= 0.36
    assert set(np.unique(L.term[~L.revolving])) == {3, 6, 12}
    income = world.persons.income
    medians = [np.median(income[world.persons.tier == t]) for t in (1, 2, 3, 4)]
    assert medians == sorted(medians, reverse=True)


def test_total_debt_relative_to_income_drives_default(world):
    p, o = world.persons, world.outcome
    dti = o.total_debt_fen / 100 / (12 * p.income)
    high, low = dti > np.quantile(dti, 0.9), dti < np.quantile(dti, 0.5)
    assert o.defaulted[high].mean() > 2.5 * o.defaulted[low].mean()


def test_shock_and_fraud_ring_knobs():
    base = generate_world(PopulationConfig(borrowers=50_000, seed=2))
    shocked = generate_world(PopulationConfig(borrowers=50_000, seed=2, shock=1.0))
    assert shocked.outcome.defaulted.mean() > 1.5 * base.outcome.defaulted.mean()
    tier34 = shocked.persons.tier >= 3
    assert shocked.outcome.true_pd[tier34].mean() / base.outcome.true_pd[tier34].mean() > (
        shocked.outcome.true_pd[~tier34].mean() / base.outcome.true_pd[~tier34].mean()
    )
    ring = generate_world(PopulationConfig(borrowers=50_000, seed=2, platforms=6, fraud_ring=200))
    members = ring.persons.fraud
    assert members.sum() == 200 and len(ring.persons) == 50_200
    assert (ring.persons.k[members] >= 5).all()
    assert ring.outcome.defaulted[members].mean() > 0.7
    opened_recently = ring.loans.months_open[members[ring.loans.person]]
    assert (opened_recently <= 1).all()


def test_config_is_validated():
    with pytest.raises(ValueError, match="platforms"):
        PopulationConfig(platforms=1)
    with pytest.raises(ValueError, match="platforms"):
        PopulationConfig(platforms=51)
    with pytest.raises(ValueError, match="unknown"):
        PopulationConfig(unknown=1)


# -------------------------------------------------------------------------- robustness


def test_a_failed_write_leaves_no_ledger(tmp_path, monkeypatch):
    from fedcredit.datagen import writer

    calls = {"n": 0}
    real = writer.bulk_insert

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "bulk_insert", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(PopulationConfig(borrowers=1_000, seed=1), tmp_path, workers=1)
    assert not list((tmp_path / "platforms").glob("*.sqlite"))
    assert not list((tmp_path / "platforms").glob("*.partial"))


def test_ledgers_can_go_to_any_sqlalchemy_url(tmp_path):
    template = f"sqlite:///{tmp_path}/url-{{platform}}.db"
    summary = generate(
        PopulationConfig(borrowers=1_000, seed=1), tmp_path / "out", ledger_template=template
    )
    for p in summary.platforms:
        assert p.ledger.startswith("sqlite:///")
        assert (tmp_path / f"url-{p.name}.db").exists()


# ---------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcredit", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cli_done_when_run(tmp_path):
    """The issue's 'done when' command: 3 platforms, 100,000 borrowers, seed 7."""
    out = tmp_path / "run"
    proc = run_cli(
        "datagen", "--platforms", "3", "--borrowers", "100000", "--seed", "7",
        "--out", str(out), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert isinstance(summary["bayes_auc"], float) and 0.73 <= summary["bayes_auc"] <= 0.75
    assert summary["borrowers"] == 100_000
    assert Path(summary["truth"]).exists()
    assert len(summary["platforms"]) == 3
    for p in summary["platforms"]:
        assert set(p) >= {"name", "ledger", "borrowers", "loans", "multi_platform_share",
                          "default_rate"}  # fmt: skip
        assert Path(p["ledger"]).exists()
        assert 0.40 <= p["multi_platform_share"] <= 0.70
        assert 0.02 <= p["default_rate"] <= 0.07
    assert 0.64 <= summary["platform_count_shares"]["1"] <= 0.70
    truth = pq.read_table(summary["truth"])
    assert truth.num_rows == 100_000
    assert set(TRUTH_ONLY) <= set(truth.column_names)


def test_cli_readable_table_and_errors(tmp_path):
    proc = run_cli("datagen", "--borrowers", "2000", "--seed", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "platform-01" in proc.stdout and "Bayes-bound AUC" in proc.stdout
    bad = run_cli("datagen", "--platforms", "1", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--platforms" in bad.stderr
    bad = run_cli("datagen", "--as-of", "2023-02-30", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "2023-02-30" in bad.stderr
    info = run_cli(
        "ledger", "info", str(tmp_path / "o" / "platforms" / "platform-01.sqlite"), "--json"
    )
    assert info.returncode == 0 and json.loads(info.stdout)["meta"]["platform"] == "platform-01"
    (tmp_path / "a-file").write_text("")
    bad = run_cli("datagen", "--borrowers", "1000", "--out", str(tmp_path / "a-file"))
    assert bad.returncode == 2 and "--out" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("datagen", "--out", str(tmp_path / "y"), "--ledger-template", "sqlite:///x.db")
    assert bad.returncode == 2 and "{platform}" in bad.stderr
    missing = run_cli("ledger", "info", str(tmp_path / "nope.sqlite"))
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_no_national_id_is_written_anywhere(small_run):
    """IDs are drawn in memory and hashed: outside the hex tokens, no output holds a run of
    17+ digits (an ID's body); dates, months and loan ids hold at most 9."""
    import re

    digits = re.compile(r"\d{17,}")
    hex_token = re.compile(r"[0-9a-f]{64}")
    _, summary = small_run
    for p in summary.platforms:
        con = sqlite3.connect(p.ledger)
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            columns = [row[1] for row in con.execute(f"PRAGMA table_info({table})")]
            for row in con.execute(f"SELECT * FROM {table}"):
                for column, value in zip(columns, row, strict=True):
                    if not isinstance(value, str):
                        continue
                    if column == "token":
                        assert hex_token.fullmatch(value)
                    else:
                        assert not digits.search(value), f"{p.name}.{table}.{column}: {value}"
    truth = pq.read_table(summary.truth)
    assert all(hex_token.fullmatch(t) for t in truth.column("token").to_pylist())
    summary_json = json.loads((Path(summary.truth).parents[1] / "summary.json").read_text())

    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    assert not [s for s in strings(summary_json) if digits.search(s)]
