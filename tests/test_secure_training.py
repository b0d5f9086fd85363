"""Secure aggregation of training, driven in-process: same model as plain FedAvg, nothing
per-platform at the coordinator, dropouts re-run over the rest, platforms refuse misuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Error, Message

from clients.query_log import QueryLog
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from protocols import messages as m
from protocols import secure_sum as ss
from protocols import training_sums as ts
from server.federation import load_histograms, run_federation
from server.settings import FederationSettings
from tests.inprocess import InProcessGrid
from tests.parties import Parties, enrol
from tests.wire_audit import uniformity

SECURE_KINDS = ("train", "evaluate", "query.feature_stats", "query.feature_sketch")


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> Parties:
    out = tmp_path_factory.mktemp("population")
    population = generate(PopulationConfig(platforms=3, borrowers=2500, seed=5), out)
    ledgers = [str(p.ledger) for p in population.platforms]
    return enrol(ledgers, tmp_path_factory.mktemp("parties"))


def _run(parties: Parties, out: Path, secure: bool, mods=()):  # type: ignore[no-untyped-def]
    grid = InProcessGrid(parties.client_app(mods), len(parties.ledgers))
    settings = FederationSettings.model_validate(
        {
            "out-dir": str(out),
            "stages": "train",
            "model": "mlp",
            "num-rounds": 3,
            "secure-aggregation": secure,
        }
    )
    return run_federation(grid, settings), grid


@pytest.fixture(scope="module")
def runs(parties: Parties, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("runs")
    return {
        secure: (*_run(parties, base / str(secure), secure), base / str(secure))
        for secure in (False, True)
    }


def test_secure_model_equals_plain_fedavg(runs) -> None:  # type: ignore[no-untyped-def]
    (plain, _, plain_out), (secure, _, secure_out) = runs[False], runs[True]
    assert secure["secure_aggregation"] is True and plain["secure_aggregation"] is False
    a = torch.load(plain_out / "model-mlp-local.pt")
    b = torch.load(secure_out / "model-mlp-local.pt")
    for key in a:
        # Three rounds of training amplify the sum's error (below 1e-9 per aggregate) to a
        # few float32 ulps at most.
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    meta_a = json.loads((plain_out / "model-mlp-local.json").read_text())
    meta_b = json.loads((secure_out / "model-mlp-local.json").read_text())
    np.testing.assert_allclose(meta_a["scaler"]["mean"], meta_b["scaler"]["mean"], rtol=1e-9)
    np.testing.assert_allclose(meta_a["scaler"]["std"], meta_b["scaler"]["std"], rtol=1e-9)
    assert meta_b["secure_aggregation"] is True
    fa, fb = plain["models"]["mlp"]["local"], secure["models"]["mlp"]["local"]
    assert fb["n"] == fa["n"]
    assert fb["auc"] == pytest.approx(fa["auc"], abs=1e-3)
    assert [h["round"] for h in fb["history"]] == [1, 2, 3]


def test_coordinator_holds_no_single_platform_vector(runs) -> None:  # type: ignore[no-untyped-def]
    summary, grid, out = runs[True]
    replies = [r for r in grid.received if r.metadata.message_type in SECURE_KINDS]
    # scaler, feature sketch, scaler of the robust features, 3 train, 3 evaluate, final evaluate
    assert len(replies) == 3 * (3 + 3 + 3 + 1)
    for reply in replies:
        content = reply.content
        assert not content.array_records and not content.metric_records
        assert set(content.config_records) == {ss.SPEC_KEY}
        # A masked vector: its words look like uniform 64-bit values (a quantised count, a
        # small weight or a histogram bin would have a top byte of 0x00 or 0xff).
        plain_like, _ = uniformity([content.config_records[ss.SPEC_KEY]["masked"]])
        assert plain_like < 0.25
    # Only the sums are kept: no per-platform figures in the summary or the histograms file.
    assert summary["models"]["mlp"]["local"]["per_platform"] == {}
    assert set(load_histograms(out / "evaluation-histograms.npz")["mlp-local"]) == {"all"}


class _FailsInRound:
    """A Flower mod: one platform fails every train message from ``round`` on."""

    def __init__(self, partition: int, round_: int) -> None:
        self.partition, self.round = partition, round_

    def __call__(self, msg: Message, context, call_next):  # type: ignore[no-untyped-def]
        if (
            context.node_config.get("partition-id") == self.partition
            and msg.metadata.message_type == "train"
            and msg.content.config_records[m.PAYLOAD_KEY].get(m.SERVER_ROUND, 0) >= self.round
        ):
            return Message(Error(2, "train failed: the platform's disk is full"), reply_to=msg)
        return call_next(msg, context)


def test_dropout_reruns_the_round_over_the_rest(parties: Parties, tmp_path: Path) -> None:
    summary, grid = _run(parties, tmp_path, True, mods=[_FailsInRound(2, 2)])
    assert summary["status"] == "ok"
    entry = summary["models"]["mlp"]["local"]
    assert list(entry["dropped"]) == ["platform-03"]
    assert "disk is full" in entry["dropped"]["platform-03"]
    # Held-out rows of the two remaining platforms only: the sums never mix sets.
    details = {p["platform"]: p for p in summary["platform_details"]}
    assert entry["n"] == details["platform-01"]["test_rows"] + details["platform-02"]["test_rows"]
    # Round 2 was sent twice: first to all three, then to the two others with a fresh nonce.
    specs = [
        ss.spec_of(msg.content, "train")
        for msg in grid.sent
        if msg.metadata.message_type == "train"
    ]
    round2 = [s for s in specs if s is not None and s.round_id == "mlp-local/train/2"]
    attempts = {(s.nonce, s.participants) for s in round2}
    assert len(attempts) == 2
    sets = sorted(len(p) for _, p in attempts)
    assert sets == [2, 3]
    # The model's metadata names the drop.
    meta = json.loads((tmp_path / "model-mlp-local.json").read_text())
    assert meta["dropped_platforms"] == entry["dropped"]


def test_platform_refuses_replayed_nonce_and_growing_rerun(parties: Parties) -> None:
    grid = InProcessGrid(parties.client_app(), len(parties.ledgers))
    node = 1000
    names = ["platform-01", "platform-02", "platform-03"]
    request = m.FeatureStatsRequest(feature_set="local", features=["age"], test_share=0.3)
    fields = ts.feature_stats_fields(1)

    def ask(spec: ss.SecureSumSpec) -> Message:
        content = ss.attach_spec(request.to_content(), spec)
        msg = Message(content, dst_node_id=node, message_type="query.feature_stats")
        return next(iter(grid.send_and_receive([msg])))

    first = ss.SecureSumSpec.fresh("s", "r/scaler", "feature_stats", names[:2], fields)
    assert not ask(first).has_error()
    again = ask(first)
    assert again.has_error() and "replay" in again.error.reason
    grown = ss.SecureSumSpec.fresh("s", "r/scaler", "feature_stats", names, fields)
    refused = ask(grown)
    assert refused.has_error() and "strict subset" in refused.error.reason
    stranger = ss.SecureSumSpec.fresh("s", "r2", "feature_stats", ["platform-01", "zz"], fields)
    refused = ask(stranger)
    assert refused.has_error() and "not enrolled" in refused.error.reason
    log = QueryLog(parties.ledgers[0])
    try:
        kinds = [(e["kind"], e["outcome"]) for e in log.entries()]
    finally:
        log.close()
    assert ("secure_sum.feature_stats", "answered") in kinds
    assert ("secure_sum.feature_stats", "refused") in kinds


def test_no_platform_vector_without_identity(parties: Parties, tmp_path: Path) -> None:
    """A node without an enrolled identity cannot mask: the run stops and says why."""
    from clients.app import build_client_app
    from server.training import FederationError

    grid = InProcessGrid(build_client_app(parties.ledgers), 3)
    settings = FederationSettings.model_validate(
        {"out-dir": str(tmp_path), "stages": "train", "model": "lr", "num-rounds": 1}
    )
    with pytest.raises(FederationError, match="no identity or roster"):
        run_federation(grid, settings)
