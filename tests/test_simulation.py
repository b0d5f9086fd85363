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
        *("--borrowers", "4000", "--rounds", "3", "--model", "lr", "--out", str(out)),
        *("--dp-epsilons", "1"),
        cwd=tmp_path,
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
    # Training reports why it stopped (server/convergence.py), for every model it trained.
    for key in ("federated", "federated_cross_platform"):
        entry = report["convergence"]["lr"][key]
        assert 1 <= entry["best_round"] <= entry["rounds_run"] <= 3
        assert entry["stopped_because"] and entry["local_steps"] >= 20
    # Every platform checked the totals it received for each of its own borrowers.
    assert queries["checked"] >= queries["count"] > 0
    assert queries["contributors"] == ["platform-01", "platform-02", "platform-03"]
    assert {"datagen", "federation", "baselines", "total"} <= set(report["seconds"])
    for name in ("report.md", "roc.png", "scores.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "federation" / "model-lr-cross.pt").exists()
    # DP-SGD through Flower's runtime: each round a platform's accountant resumes from the
    # earlier rounds' steps, and the run ends within its budget.
    dp = report["dp"]
    assert dp["epsilon"] == 1.0 and dp["delta"] == 1e-5 and 0.0 <= dp["auc"] <= 1.0
    assert 0.95 <= dp["epsilon_spent"] <= 1.0 and "DP-SGD" in dp["mechanism"]
    meta = json.loads((out / "federation" / "dp" / "epsilon-1" / "model-lr-local.json").read_text())
    assert meta["privacy"]["epsilon_spent"] == dp["epsilon_spent"]
    # Every model with and without DP: the DP cross-platform federation reused the totals the
    # bureau's run left in each node's state; the DP centralized model is pooled DP-SGD.
    attacked = {
        *("centralized", "federated", "federated_cross_platform"),
        *("centralized_dp_epsilon_1", "federated_dp_epsilon_1"),
        "federated_cross_platform_dp_epsilon_1",
    }
    assert set(report["membership_inference"]) == attacked
    cross_meta = out / "federation" / "dp" / "epsilon-1" / "model-lr-cross.json"
    assert json.loads(cross_meta.read_text())["privacy"]["epsilon_spent"] <= 1.0
    for key in ("centralized_dp", "federated_cross_platform_dp"):
        entry = report[key]
        assert entry["epsilon"] == 1.0 and 0.0 < entry["epsilon_spent"] <= 1.0
        assert (
            report["membership_inference"][f"{key[:-3]}_dp_epsilon_1"]["model_auc"] == entry["auc"]
        )
    for result in report["membership_inference"].values():
        assert 0.0 <= result["attack_auc"] <= 1.0 and 0.0 <= result["tpr_at_1pct_fpr"] <= 1.0
    assert report["secure_aggregation"] is True  # the demo's default: DP under secure sums
    assert (out / "privacy.png").stat().st_size > 0
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
        *("--dp-epsilons", ""),
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
    assert report["dp"] is None and report["dp_sweep"] == []  # --dp-epsilons "": none trained
    assert "federated" in report["membership_inference"]


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
        (["--dp-epsilons", "one"], "--dp-epsilons"),
    ]
    for extra, message in cases:
        proc = demo("--out", str(tmp_path / "o"), *extra, cwd=REPO, timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr


class CrashAfter:
    """A Flower mod: the platform of ``partition`` crashes after ``answers`` query batches.

    Its ClientApp raises on every later message, as a platform whose process died would:
    Flower's runtime turns that into an error reply. Picklable (Ray runs ClientApps in worker
    processes), and it counts through a file, since successive messages may run in
    different workers.
    """

    def __init__(self, partition: int, answers: int, counter: Path) -> None:
        self.partition, self.answers, self.counter = partition, answers, str(counter)

    def __call__(self, msg, context, call_next):  # type: ignore[no-untyped-def]
        if context.node_config.get("partition-id") != self.partition:
            return call_next(msg, context)
        path = Path(self.counter)
        seen = int(path.read_text()) if path.exists() else 0
        if seen >= self.answers:
            raise RuntimeError("platform crashed (fault injected by the test)")
        if msg.metadata.message_type == "query.debt_profile":
            path.write_text(str(seen + 1))
        return call_next(msg, context)


def test_platform_crashing_mid_query_on_simulation_engine(tmp_path: Path) -> None:
    """Four platforms on Ray; one crashes after answering part of the query. The query
    restarts over the other three, whose delivered totals equal their own figures summed."""
    from flwr.simulation import run_simulation

    from clients.app import build_client_app
    from clients.platform_data import load_platform_data
    from clients.received_totals import read_received_totals
    from fedcredit.datagen.config import PopulationConfig
    from fedcredit.datagen.generate import generate
    from fedcredit.local_federation import start_local_federation
    from server.app import build_server_app

    data = generate(PopulationConfig(platforms=4, borrowers=2000, seed=9), tmp_path / "data")
    ledgers = [str(p.ledger) for p in data.platforms]
    out = tmp_path / "run"
    counter = tmp_path / "answered"
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with start_local_federation(ledgers, tmp_path / "parties") as parties:
        overrides = {
            **parties.overrides(),
            "out-dir": str(out),
            "stages": "query",
            "min-nodes": 4,
            "query-batch": 400,
            "query-timeout": 120,
        }
        run_simulation(
            server_app=build_server_app(overrides),
            client_app=build_client_app(
                ledgers,
                parties.enrolment.identities,
                parties.enrolment.roster,
                [CrashAfter(3, 1, counter)],
            ),
            num_supernodes=4,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    summary = json.loads((out / "federation.json").read_text())
    assert summary["status"] == "ok", summary.get("error")
    names = [load_platform_data(loc).platform for loc in ledgers]
    queries = summary["queries"]
    assert int(counter.read_text()) == 1  # it did answer part of the query first
    assert names[3] in queries["dropped"] and "crashed" in queries["dropped"][names[3]]
    assert queries["contributors"] == sorted(names[:3])
    expected: dict[str, list[int]] = {}
    for location in ledgers[:3]:
        own = load_platform_data(location)
        for token, row in zip(own.features.tokens, own.profiles.tolist(), strict=True):
            acc = expected.setdefault(token, [0, 0, 0])
            for i in range(3):
                acc[i] += row[i]
    for location in ledgers[:3]:
        got = read_received_totals(location)
        tokens = load_platform_data(location).features.tokens
        assert len(got) == len(tokens)
        assert all(list(got[t]) == expected[t] for t in tokens), location
    assert not read_received_totals(ledgers[3])
