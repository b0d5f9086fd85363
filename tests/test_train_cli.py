"""``fedcredit train`` through Flower's simulation engine, and secure aggregation's dropout
re-run through the same runtime (Ray actors, Flower serialisation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from fedcredit.train_cli import federation_run_config, flwr_run_command
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("train-data")
    population = generate(PopulationConfig(platforms=3, borrowers=1500, seed=3), out)
    return [str(p.ledger) for p in population.platforms]


def test_train_on_ledgers_writes_models_metadata_and_report(
    ledgers: list[str], tmp_path: Path
) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedcredit",
            "train",
            "--ledgers",
            *ledgers,
            "--model",
            "lr",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["secure_aggregation"] is True
    for key in ("federated", "federated_cross_platform"):
        assert 0.0 <= report[key]["auc"] <= 1.0 and report[key]["n"] > 0
    assert report["calibration"] and {"brier", "psi"} <= set(report["calibration"])
    assert [h["round"] for h in report["training"]["federated"]] == [1, 2]
    meta = json.loads((out / "federation" / "model-lr-cross.json").read_text())
    assert meta["secure_aggregation"] is True and meta["rounds"] == 2
    assert (out / "federation" / meta["weights_file"]).stat().st_size > 0
    for name in ("report.md", "roc.png", "training.png", "calibration.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "report.md").read_text().startswith("# fedcredit train report")
    settings = json.loads((out / "federation" / "federation.json").read_text())["settings"]
    assert settings["secure-aggregation"] is True and "dp-epsilon" not in settings


def test_train_refuses_two_ledgers_with_the_query(ledgers: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedcredit",
            "train",
            "--ledgers",
            *ledgers[:2],
            "--stages",
            "train,query",
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "at least three platforms" in proc.stderr


def test_federation_run_config_forwards_dp_only_when_given(tmp_path: Path) -> None:
    base = tmp_path / "deploy.toml"
    base.write_text('keyholder-url = "https://kh:8443"\nnum-rounds = 99\n')
    plain = federation_run_config(tmp_path, "lr", 5, False, None, {}, base)
    assert plain["keyholder-url"] == "https://kh:8443" and plain["num-rounds"] == 5
    assert plain["secure-aggregation"] is False
    assert "dp-epsilon" not in plain and "dp-delta" not in plain and "stages" not in plain
    dp = federation_run_config(tmp_path, "lr", 5, True, "train", {"dp-epsilon": 1.0}, None)
    assert dp["dp-epsilon"] == 1.0 and "dp-delta" not in dp and dp["stages"] == "train"
    command = flwr_run_command(REPO, "bureau", tmp_path / "rc.toml")
    assert command[1:] == [
        "run",
        str(REPO),
        "bureau",
        "--stream",
        "--run-config",
        str(tmp_path / "rc.toml"),
    ]


def test_dropout_on_the_simulation_engine(ledgers: list[str], tmp_path: Path) -> None:
    """One platform fails every train message from round 2: the round is re-run over the
    other two with fresh masks, and the run says who dropped and why."""
    from fedcredit.demo.run import DemoOptions, _run_simulation
    from tests.test_secure_training import _FailsInRound

    opts = DemoOptions(ledgers=ledgers, out=tmp_path, model="lr", rounds=2, stages="train")
    with pytest.MonkeyPatch.context() as mp:
        # Ray workers unpickle the mod by reference: they must import this checkout.
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        summary = _run_simulation(opts, ledgers, tmp_path / "fed", mods=[_FailsInRound(1, 2)])
    entry = summary["models"]["lr"]["local"]
    assert summary["status"] == "ok"
    assert (
        list(entry["dropped"]) == ["platform-02"]
        and "disk is full" in entry["dropped"]["platform-02"]
    )
    rows = {p["platform"]: p["test_rows"] for p in summary["platform_details"]}
    assert entry["n"] == rows["platform-01"] + rows["platform-03"]
