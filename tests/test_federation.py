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

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clients.app import build_client_app
from clients.query_log import QueryLog
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from protocols import messages as m
from protocols.model import build_model
from protocols.packing import DEBT_PROFILE_LAYOUT
from protocols.paillier import (
    ciphertexts_from_bytes,
    decrypt_plaintexts,
    generate_keypair,
    public_key_to_bytes,
)
from server.debt_query import QueryFailed, run_debt_query
from server.federation import load_histograms, run_federation
from server.keyholder import KeyHolder, KeyHolderRefusal
from server.settings import FederationSettings
from server.training import FederationError
from tests.inprocess import InProcessGrid


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
def federation(ledgers, tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("federation")
    grid = InProcessGrid(build_client_app(ledgers), len(ledgers))
    settings = FederationSettings.model_validate(
        {"out-dir": str(out), "num-rounds": 3, "model": "lr,mlp", "query-batch": 1000}
    )
    summary = run_federation(grid, settings)
    return summary, out, grid


def _send(grid: InProcessGrid, node: int, message_type: str, content: RecordDict) -> Message:
    msg = Message(content, dst_node_id=node, message_type=message_type)
    return next(iter(grid.send_and_receive([msg])))


def test_pipeline_outputs(federation, truth) -> None:  # type: ignore[no-untyped-def]
    summary, out, _ = federation
    assert summary["status"] == "ok"
    assert summary["platforms"] == ["platform-01", "platform-02", "platform-03"]
    on_disk = json.loads((out / "federation.json").read_text())
    assert on_disk["status"] == "ok"
    for key in ("federated", "federated_cross_platform"):
        assert 0.0 <= summary[key]["auc"] <= 1.0  # tiny data: quality is tested elsewhere
        assert summary[key]["n"] == sum(p["test_rows"] for p in summary["platform_details"])
    # Every borrower of every platform was profiled, and every decrypted total is exact.
    totals = pq.read_table(out / "query-totals.parquet").to_pydict()
    assert summary["queries"]["count"] == len(truth) == len(totals["token"])
    for i, tok in enumerate(totals["token"]):
        got = (totals["total_debt_fen"][i], totals["active_loans"][i], totals["lenders"][i])
        assert got == truth[tok]
    # Per-round histories and per-platform figures for each model.
    for kind in ("lr", "mlp"):
        for feature_set in ("local", "cross"):
            entry = summary["models"][kind][feature_set]
            assert [h["round"] for h in entry["history"]] == [1, 2, 3]
            assert set(entry["per_platform"]) == set(summary["platforms"])
    hists = load_histograms(out / "evaluation-histograms.npz")
    assert set(hists) == {"lr-local", "lr-cross", "mlp-local", "mlp-cross"}


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
    """Replies carry weights, sums, histograms, tokens and ciphertexts; never ledger rows."""
    _, _, grid = federation
    allowed = {
        "query.describe": ({"payload"}, set()),
        "query.feature_stats": ({"payload"}, set()),
        "train": ({"metrics"}, {"arrays"}),
        "evaluate": ({"metrics"}, set()),
        "query.applicants": ({"payload"}, set()),
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
        if kind == "evaluate":
            metrics = content.metric_records["metrics"]
            assert set(metrics) == {"num-examples", "loss", "hist-pos", "hist-neg"}


def test_debt_profile_replies_do_not_reveal_holdings(federation) -> None:  # type: ignore[no-untyped-def]
    """Every platform's reply to one batch has the same size, whoever holds whom."""
    _, _, grid = federation
    sizes: dict[str, set[int]] = {}
    for reply in grid.received:
        if reply.metadata.message_type == "query.debt_profile":
            body = m.DebtProfileReply.from_content(reply.content, "reply")
            sizes.setdefault(body.query_id, set()).add(len(body.ciphertexts))
    assert sizes and all(len(s) == 1 for s in sizes.values())


def _profile_request(tokens: list[str], pk_bytes: bytes, query_id: str | None = None):  # type: ignore[no-untyped-def]
    return m.DebtProfileRequest(
        query_id=query_id or uuid.uuid4().hex, public_key=pk_bytes, tokens=m.tokens_to_bytes(tokens)
    )


def test_platform_encrypts_zero_for_strangers_and_refuses_replays(ledgers) -> None:  # type: ignore[no-untyped-def]
    grid = InProcessGrid(build_client_app(ledgers), len(ledgers))
    node = next(iter(grid.get_node_ids()))
    pk, sk = generate_keypair(2048)
    stranger = "ab" * 32
    request = _profile_request([stranger] * 5, public_key_to_bytes(pk))
    reply = _send(grid, node, "query.debt_profile", request.to_content())
    body = m.DebtProfileReply.from_content(reply.content, "reply")
    cts = ciphertexts_from_bytes(pk, body.ciphertexts, body.count)
    assert decrypt_plaintexts(sk, cts) == [0]
    again = _send(grid, node, "query.debt_profile", request.to_content())
    assert again.has_error() and "already answered" in again.error.reason
    log = QueryLog(ledgers[0])
    try:
        entries = [e for e in log.entries() if e["query_id"] == request.query_id]
        assert [e["outcome"] for e in entries] == ["answered", "refused"]
        assert log.verify() >= 2
    finally:
        log.close()


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
            "query.debt_profile",
            RecordDict(
                {
                    "payload": ConfigRecord(
                        {
                            "payload": json.dumps({"query_id": "0" * 32}).encode(),
                            "public_key": b"x" * 300,
                            "tokens": b"y" * 33,
                        }
                    )
                }
            ),
            "multiple of 32",
        ),
        (
            "query.debt_profile",
            RecordDict(
                {
                    "payload": ConfigRecord(
                        {
                            "payload": json.dumps({"query_id": "1" * 32}).encode(),
                            "public_key": b"x" * 300,
                            "tokens": b"y" * 32,
                        }
                    )
                }
            ),
            "public key refused",
        ),
        (
            "query.totals",
            m.TotalsDelivery(tokens=b"z" * 32, totals=b"\0" * 24).to_content(),
            "does not hold",
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
        ("query.describe", m.ApplicantsRequest().to_content(), "test_share"),
    ],
)
def test_hostile_or_malformed_messages_are_refused(
    ledgers: list[str], message_type: str, content: RecordDict, reason: str, caplog
) -> None:  # type: ignore[no-untyped-def]
    grid = InProcessGrid(build_client_app(ledgers), len(ledgers))
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


def test_coordinator_rejects_bad_ciphertexts(ledgers: list[str]) -> None:
    """A node replying with a ciphertext outside the key's range fails the batch, by name."""
    honest = build_client_app(ledgers)

    class Tampering(InProcessGrid):
        def push_messages(self, messages):  # type: ignore[no-untyped-def]
            ids = list(super().push_messages(messages))
            victim = self._replies[ids[0]]
            payload = victim.content.config_records["payload"]
            blob = bytearray(payload["ciphertexts"])  # type: ignore[arg-type]
            blob[:8] = b"\xff" * 8  # now >= n**2
            payload["ciphertexts"] = bytes(blob)
            return ids

    grid = Tampering(honest, len(ledgers))
    keyholder = KeyHolder(2048)
    with pytest.raises(QueryFailed, match="invalid ciphertext"):
        run_debt_query(grid, list(grid.get_node_ids()), ["cd" * 32], keyholder, 10, 60)


def test_key_holder_decrypts_only_sums() -> None:
    keyholder = KeyHolder(2048)
    with pytest.raises(KeyHolderRefusal, match="one platform"):
        keyholder.decrypt_sums([1], contributors=1)
    with pytest.raises(KeyHolderRefusal, match="overflow"):
        keyholder.decrypt_sums([1], contributors=DEBT_PROFILE_LAYOUT.max_contributors + 1)


def test_mismatched_federation_keys_stop_the_run(tmp_path: Path, ledgers: list[str]) -> None:
    other = generate(PopulationConfig(platforms=2, borrowers=1000, seed=3), tmp_path / "other")
    mixed = [ledgers[0], str(other.platforms[1].ledger)]
    grid = InProcessGrid(build_client_app(mixed), 2)
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
    with pytest.raises(SettingsError, match="cross stage needs the query"):
        FederationSettings.from_run_config({"stages": "train,cross"})
    with pytest.raises(SettingsError, match="no-such-key"):
        FederationSettings.from_run_config({"no-such-key": 1})


def test_limited_query_skips_cross_model(tmp_path: Path, ledgers: list[str], truth) -> None:  # type: ignore[no-untyped-def]
    grid = InProcessGrid(build_client_app(ledgers), len(ledgers))
    settings = FederationSettings.model_validate(
        {"out-dir": str(tmp_path), "stages": "query,cross", "query-limit": 100, "model": "lr"}
    )
    summary = run_federation(grid, settings)
    assert summary["queries"]["count"] == 100
    assert "cross_skipped" in summary
    totals = pq.read_table(tmp_path / "query-totals.parquet").to_pydict()
    assert all(
        (totals["total_debt_fen"][i], totals["active_loans"][i], totals["lenders"][i]) == truth[tok]
        for i, tok in enumerate(totals["token"])
    )
    assert np.all(np.asarray(totals["lenders"]) <= 3)


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
