"""The bureau's pipeline and the platform's ClientApp, driven in-process (no Flower runtime).

Fast tests of every message: the real ServerApp pipeline, real ledgers, real 2048-bit
Paillier keys; only the transport is replaced (tests/inprocess.py). The same pipeline runs
through Flower's simulation engine in test_simulation.py and its deployment engine in
test_deployment.py.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clients.app import build_client_app
from clients.query_log import QueryLog
from clients.received_totals import read_received_totals
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from protocols import messages as m
from protocols.metrics import ScoreHistogram, calibration_summary
from protocols.model import build_model
from server.federation import load_histograms, run_federation
from server.settings import FederationSettings
from server.training import FederationError
from tests.inprocess import InProcessGrid
from tests.parties import Parties, enrol


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("population")
    return generate(PopulationConfig(platforms=3, borrowers=3000, seed=11), out)


@pytest.fixture(scope="module")
def ledgers(population) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(p.ledger) for p in population.platforms]


@pytest.fixture(scope="module")
def truth(population) -> dict[str, tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    t = pq.read_table(population.truth).to_pydict()
    return {
        tok: (d, a, n)
        for tok, d, a, n in zip(
            t["token"], t["total_debt_fen"], t["active_loans"], t["lenders"], strict=True
        )
    }


@pytest.fixture(scope="module")
def parties(ledgers, tmp_path_factory) -> Parties:  # type: ignore[no-untyped-def]
    return enrol(ledgers, tmp_path_factory.mktemp("parties"))


@pytest.fixture(scope="module")
def federation(ledgers, parties, tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("federation")
    grid = InProcessGrid(parties.client_app(), len(ledgers))
    settings = FederationSettings.model_validate(
        {"out-dir": str(out), "num-rounds": 3, "model": "lr,mlp", "query-batch": 1000}
    )
    summary = run_federation(grid, settings, parties.keyholder)
    return summary, out, grid


def _send(grid: InProcessGrid, node: int, message_type: str, content: RecordDict) -> Message:
    msg = Message(content, dst_node_id=node, message_type=message_type)
    return next(iter(grid.send_and_receive([msg])))


def test_pipeline_outputs(federation, truth, ledgers) -> None:  # type: ignore[no-untyped-def]
    summary, out, _ = federation
    assert summary["status"] == "ok"
    assert summary["platforms"] == ["platform-01", "platform-02", "platform-03"]
    on_disk = json.loads((out / "federation.json").read_text())
    assert on_disk["status"] == "ok"
    for key in ("federated", "federated_cross_platform"):
        assert 0.0 <= summary[key]["auc"] <= 1.0  # tiny data: quality is tested elsewhere
        assert summary[key]["n"] == sum(p["test_rows"] for p in summary["platform_details"])
    # Every borrower of every platform was profiled, and every platform received exact totals
    # for each of its own borrowers (and for nobody else).
    assert summary["queries"]["count"] == len(truth)
    assert summary["queries"]["contributors"] == summary["platforms"]
    received = 0
    for location in ledgers:
        got = read_received_totals(location)
        assert got and all(got[tok] == truth[tok] for tok in got)
        received += len(got)
    assert received == sum(summary["matching"]["list_sizes"].values())
    assert not (out / "query-totals.parquet").exists()
    # Per-round histories and per-platform figures for each model.
    for kind in ("lr", "mlp"):
        for feature_set in ("local", "cross"):
            entry = summary["models"][kind][feature_set]
            assert [h["round"] for h in entry["history"]] == [1, 2, 3]
            # Secure aggregation (the default): the bureau holds only sums, never one
            # platform's figures (tests/test_secure_training.py covers the mechanism).
            assert entry["per_platform"] == {} and entry["secure_aggregation"] is True
            # Calibration from the summed histograms (3 rounds on tiny data: not calibrated
            # yet, so only the shape is checked here; the numbers in test_metrics_*).
            cal = entry["calibration"]
            assert 0.0 < cal["brier"] < 1.0 and 0.0 <= cal["psi"] < 10.0
            assert sum(r["count"] for r in cal["reliability"]) == entry["n"]
            assert all({"brier", "psi"} <= set(h) for h in entry["history"])
    hists = load_histograms(out / "evaluation-histograms.npz")
    assert set(hists) == {"lr-local", "lr-cross", "mlp-local", "mlp-cross"}
    summed = sum(hists["mlp-cross"].values(), ScoreHistogram.empty())
    cal = summary["models"]["mlp"]["cross"]["calibration"]
    assert cal["brier"] == pytest.approx(summed.brier(), abs=1e-6)
    assert cal["reliability"] == calibration_summary(summed)["reliability"]


def test_saved_model_metadata_and_weights(federation) -> None:  # type: ignore[no-untyped-def]
    summary, out, _ = federation
    meta = json.loads((out / "model-mlp-cross.json").read_text())
    assert meta["features"] == summary["features"]["cross"]
    assert len(meta["scaler"]["mean"]) == len(meta["features"]) == len(meta["scaler"]["std"])
    assert meta["rounds"] == 3
    fingerprints = {p["platform"]: p["fingerprint"] for p in meta["platforms"]}
    assert fingerprints == {p["platform"]: p["fingerprint"] for p in summary["platform_details"]}
    assert all(len(f) == 64 for f in fingerprints.values())
    model = build_model("mlp", len(meta["features"]))
    model.load_state_dict(torch.load(out / meta["weights_file"]))
    assert not list(out.glob("*.partial"))


def test_no_raw_rows_cross_the_wire(federation, ledgers) -> None:  # type: ignore[no-untyped-def]
    """Replies carry masked sums, tokens and ciphertexts; never ledger rows.

    Training is securely aggregated by default: train, evaluate and feature_stats replies are
    one masked vector each (``secure-sum``), no weights, no histograms.
    """
    _, _, grid = federation
    allowed = {
        "query.describe": ({"payload"}, set()),
        "query.feature_stats": ({"secure-sum"}, set()),
        "train": ({"secure-sum"}, set()),
        "evaluate": ({"secure-sum"}, set()),
        "query.feature_sketch": ({"secure-sum"}, set()),
        "query.match_start": ({"payload"}, set()),
        "query.match_blind": ({"payload"}, set()),
        "query.match_done": ({"payload"}, set()),
        "query.debt_profile": ({"payload"}, set()),
        "query.totals": ({"payload"}, set()),
    }
    for reply in grid.received:
        assert not reply.has_error(), reply.error.reason
        kind = reply.metadata.message_type
        records, arrays = allowed[kind]
        content = reply.content
        assert set(content.config_records) | set(content.metric_records) <= records
        assert set(content.array_records) == arrays
        if kind in ("train", "evaluate", "query.feature_stats"):
            assert set(content.config_records["secure-sum"]) == {"nonce", "masked", "count"}


def test_debt_profile_replies_do_not_reveal_holdings(federation) -> None:  # type: ignore[no-untyped-def]
    """Every platform's reply to one batch has the same size, whoever holds whom."""
    _, _, grid = federation
    sizes: dict[str, set[int]] = {}
    for reply in grid.received:
        if reply.metadata.message_type == "query.debt_profile":
            body = m.DebtProfileReply.from_content(reply.content, "reply")
            sizes.setdefault(body.query_id, set()).add(len(body.ciphertexts))
    assert sizes and all(len(s) == 1 for s in sizes.values())


@pytest.mark.parametrize(
    ("message_type", "content", "reason"),
    [
        ("query.debt_profile", RecordDict(), "no 'payload' record"),
        (
            "query.debt_profile",
            RecordDict({"payload": ConfigRecord({"payload": b"{not json"})}),
            "not JSON",
        ),
        (
            "query.match_blind",
            RecordDict(
                {
                    "payload": ConfigRecord(
                        {
                            "payload": json.dumps(
                                {"session_id": "0" * 32, "origin": "x", "count": 1, "step": 1}
                            ).encode(),
                            "elements": b"y" * 33,
                        }
                    )
                }
            ),
            "element block of 33 bytes",
        ),
        (
            "query.match_blind",
            m.MatchBlind(
                session_id="1" * 32, origin="platform-02", step=1, count=0, elements=b""
            ).to_content(),
            "unknown matching session",
        ),
        (
            "query.match_start",
            m.MatchStart(
                session_id="2" * 32, participants=("platform-02", "platform-03")
            ).to_content(),
            "is not a participant",
        ),
        (
            "query.match_start",
            m.MatchStart(session_id="3" * 32, participants=("platform-01", "mallory")).to_content(),
            "not enrolled",
        ),
        (
            "query.feature_stats",
            m.FeatureStatsRequest(
                feature_set="local", features=["no_such_feature"], test_share=0.3
            ).to_content(),
            "not available",
        ),
        (
            "query.feature_stats",
            m.FeatureStatsRequest(
                feature_set="cross", features=["age"], test_share=0.3
            ).to_content(),
            "before this platform received its totals",
        ),
        ("query.describe", m.Ack(stored=1).to_content(), "test_share"),
    ],
)
def test_hostile_or_malformed_messages_are_refused(
    parties: Parties, message_type: str, content: RecordDict, reason: str, caplog
) -> None:  # type: ignore[no-untyped-def]
    grid = InProcessGrid(parties.client_app(), len(parties.ledgers))
    node = next(iter(grid.get_node_ids()))
    reply = _send(grid, node, message_type, content)
    assert reply.has_error()
    assert reason in reply.error.reason
    assert any(message_type in r.getMessage() for r in caplog.records)
    # The node keeps serving afterwards.
    ok = _send(grid, node, "query.describe", m.DescribeRequest(test_share=0.3).to_content())
    assert not ok.has_error()


def test_train_with_wrong_weights_is_refused(ledgers: list[str]) -> None:
    grid = InProcessGrid(build_client_app(ledgers), len(ledgers))
    node = next(iter(grid.get_node_ids()))
    content = m.ModelInstructions(
        model="lr", feature_set="local", features=["age"], test_share=0.3, mean=[0.0], std=[1.0]
    ).to_content()
    content.array_records["arrays"] = ArrayRecord(build_model("lr", 5).state_dict())
    reply = _send(grid, node, "train", content)
    assert reply.has_error() and "do not fit" in reply.error.reason


def test_mismatched_federation_keys_stop_the_run(tmp_path: Path, ledgers: list[str]) -> None:
    other = generate(PopulationConfig(platforms=3, borrowers=1000, seed=3), tmp_path / "other")
    mixed = [ledgers[0], ledgers[1], str(other.platforms[2].ledger)]
    grid = InProcessGrid(build_client_app(mixed), 3)
    settings = FederationSettings.model_validate({"out-dir": str(tmp_path / "run")})
    with pytest.raises(FederationError, match="different federation keys"):
        run_federation(grid, settings)
    summary = json.loads((tmp_path / "run" / "federation.json").read_text())
    assert summary["status"] == "failed" and "different federation keys" in summary["error"]


def test_query_log_detects_tampering(tmp_path: Path, ledgers: list[str]) -> None:
    import shutil

    from sqlalchemy import update

    from clients.query_log import query_log

    copy = tmp_path / "ledger.sqlite"
    shutil.copy(ledgers[1], copy)
    log = QueryLog(str(copy))
    try:
        before = log.verify()
        for i in range(3):
            log.append(uuid.uuid4().hex, "debt_profile", "answered", {"tokens": i})
        assert log.verify() == before + 3
        with log._ledger.transaction() as conn:
            conn.execute(update(query_log).where(query_log.c.seq == before + 2).values(detail="{}"))
        with pytest.raises(ValueError, match=f"broken at entry {before + 2}"):
            log.verify()
    finally:
        log.close()


def test_settings_match_pyproject() -> None:
    import tomllib

    from tests.conftest import REPO

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = FederationSettings().as_run_config()
    assert declared == defaults


def test_settings_reject_bad_values() -> None:
    from server.settings import SettingsError

    with pytest.raises(SettingsError, match="num-rounds"):
        FederationSettings.from_run_config({"num-rounds": 0})
    with pytest.raises(SettingsError, match="unknown stages"):
        FederationSettings.from_run_config({"stages": "train,crosss"})
    with pytest.raises(SettingsError, match="no-such-key"):
        FederationSettings.from_run_config({"no-such-key": 1})


def test_limited_query_skips_cross_model(tmp_path: Path, parties: Parties) -> None:
    grid = InProcessGrid(parties.client_app(), len(parties.ledgers))
    settings = FederationSettings.model_validate(
        {"out-dir": str(tmp_path), "stages": "query,cross", "query-limit": 100, "model": "lr"}
    )
    summary = run_federation(grid, settings, parties.keyholder)
    assert summary["queries"]["count"] == 100
    assert "cross_skipped" in summary


def test_bureau_code_never_imports_platform_code() -> None:
    """The ServerApp cannot open a ledger: nothing in server/ or protocols/ imports clients/."""
    import ast

    from tests.conftest import REPO

    for folder in ("server", "protocols"):
        for path in (REPO / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                assert not any(n == "clients" or n.startswith("clients.") for n in names), (
                    f"{path.relative_to(REPO)} imports {names}"
                )
