"""``fedcredit demo`` end to end on Flower's simulation engine (Ray): the real runtime.

Small data and few rounds keep it to about a minute; the figures that matter (AUC targets,
wall time) are measured by the demo at its defaults and recorded in the README, not asserted
here. This test checks that the whole pipeline runs through Flower's serialisation and Ray
actors, that report.json keeps its contract, and that every decrypted total is right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

REPORT_KEYS = {
    "bayes_auc",
    "centralized",
    "federated",
    "federated_cross_platform",
    "local_only",
    "queries",
    "seconds",
}


def demo(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``fedcredit demo ARGS`` in a child process, as a user runs it (telemetry off)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fedcredit", "demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_on_simulation_engine(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = demo(
        *("--borrowers", "4000", "--rounds", "3", "--model", "lr", "--out", str(out)), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    for key in ("centralized", "federated", "federated_cross_platform"):
        assert set(report[key]) >= {"auc", "ks"}
        assert 0.0 <= report[key]["auc"] <= 1.0
    assert set(report["local_only"]) == {"platform-01", "platform-02", "platform-03"}
    assert 0.6 < report["bayes_auc"] < 0.9
    queries = report["queries"]
    assert queries["all_totals_match"] is True and queries["mismatches"] == 0
    # Every platform checked the totals it received for each of its own borrowers.
    assert queries["checked"] >= queries["count"] > 0
    assert queries["contributors"] == ["platform-01", "platform-02", "platform-03"]
    assert {"datagen", "federation", "baselines", "total"} <= set(report["seconds"])
    for name in ("report.md", "roc.png", "scores.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "federation" / "model-lr-cross.pt").exists()
    assert "fedcredit demo" in proc.stdout
    # The run's own log stays quiet: Flower's per-round INFO lines are off without -v.
    assert "[ROUND" not in proc.stderr


def test_demo_on_existing_ledgers_reports_unavailable_not_invented(tmp_path: Path) -> None:
    """--ledgers: no truth file, so no Bayes bound and no total check; everything else runs."""
    from fedcredit.datagen.config import PopulationConfig
    from fedcredit.datagen.generate import generate

    data = generate(PopulationConfig(platforms=3, borrowers=3000, seed=4), tmp_path / "data")
    (tmp_path / "data" / "evaluation" / "truth.parquet").unlink()  # as with real ledgers
    ledgers = ",".join(str(p.ledger) for p in data.platforms)
    out = tmp_path / "demo"
    proc = demo(
        *("--ledgers", ledgers, "--rounds", "2", "--model", "lr", "--out", str(out), "--json"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["bayes_auc"] is None
    assert report["queries"]["all_totals_match"] is None
    assert {"bayes_auc", "all_totals_match"} <= set(report["unavailable"])
    assert report["data"]["source"] == "ledgers"
    assert set(report["local_only"]) == {"platform-01", "platform-02", "platform-03"}
    assert report["queries"]["count"] > 0
    assert "unavailable" in (out / "report.md").read_text()


def test_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    cases = [
        (["--borrowers", "10"], "--borrowers"),
        (["--ledgers", str(tmp_path / "missing.sqlite") + ",x,y"], "no such ledger"),
        (["--ledgers", "only-one"], "at least three"),
        (["--ledgers", "a,b"], "at least three"),
        (["--platforms", "2"], "--platforms"),
        (
            ["--ledgers", f"{REPO / 'README.md'},{REPO / 'Makefile'},{REPO / 'README.md'}"],
            "not a fedcredit ledger",
        ),
        (["--key-bits", "1024"], "--key-bits"),
        (["--model", "svm"], "model"),
    ]
    for extra, message in cases:
        proc = demo("--out", str(tmp_path / "o"), *extra, cwd=REPO, timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
