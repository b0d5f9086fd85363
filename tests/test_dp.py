"""DP-SGD on a platform: the noise is fixed by the whole schedule, the accountant ends at the
budget, clipping bounds what one batch can do, the noise is secret, and a federation with
``dp-epsilon`` records its budget in the model's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message

from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from protocols import messages as m
from protocols.dp import DPSGD, DPPlan, plan
from protocols.model import TrainConfig, build_model, train_local
from server.federation import run_federation
from server.settings import FederationSettings
from tests.inprocess import InProcessGrid
from tests.parties import enrol


def _rows(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)).astype(np.float32)
    return X, (rng.random(n) < 1 / (1 + np.exp(-X[:, 0]))).astype(np.float64)


def _weights(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def test_plan_spends_the_budget_over_the_whole_schedule() -> None:
    p = plan(1.0, 1e-5, 1.0, rows=30_000, batch_size=512, epochs=1, rounds=20)
    assert p.steps_per_round == 59 and p.total_steps == 20 * 59
    assert p.sample_rate == pytest.approx(1 / 59)
    assert 0.99 <= p.spent(p.total_steps) <= 1.0
    assert p.spent(p.steps_per_round) < 0.5  # the first round alone spends far less
    looser = plan(4.0, 1e-5, 1.0, rows=30_000, batch_size=512, epochs=1, rounds=20)
    bigger = plan(1.0, 1e-5, 1.0, rows=300_000, batch_size=512, epochs=1, rounds=20)
    assert looser.noise_multiplier < p.noise_multiplier
    assert bigger.noise_multiplier < p.noise_multiplier  # more rows: more amplification
    with pytest.raises(ValueError, match="epsilon > 0"):
        plan(0.0, 1e-5, 1.0, rows=100, batch_size=10, epochs=1, rounds=1)


def test_rounds_in_fresh_processes_add_up_to_the_budget() -> None:
    """Round r's accountant starts from the steps of rounds 1..r-1, as on a SuperNode."""
    X, y = _rows()
    budget = plan(2.0, 1e-5, 1.0, rows=len(y), batch_size=100, epochs=1, rounds=3)
    model = build_model("lr", X.shape[1])
    spent = []
    for r in range(1, 4):
        dp = DPSGD(budget, steps_before=(r - 1) * budget.steps_per_round)
        train_local(model, X, y, TrainConfig(batch_size=100, seed=r), dp)
        assert dp.steps_taken == budget.steps_per_round
        spent.append(dp.spent_epsilon)
        assert dp.metrics()["dp-steps"] == r * budget.steps_per_round
    assert spent == sorted(spent) and spent[-1] == pytest.approx(2.0, abs=0.01)
    assert spent[-1] <= 2.0
    assert "_forward_counter" not in dict(model.named_buffers())  # Opacus' hooks removed
    assert set(model.state_dict()) == {"0.weight", "0.bias"}


def test_noise_is_secret_not_from_the_run_seed() -> None:
    """The bureau knows the seed; noise it could regenerate it could subtract."""
    X, y = _rows()
    budget = plan(1.0, 1e-5, 1.0, rows=len(y), batch_size=100, epochs=1, rounds=1)
    out = []
    for _ in range(2):
        model = build_model("lr", X.shape[1], seed=0)
        train_local(model, X, y, TrainConfig(batch_size=100, seed=0), DPSGD(budget))
        out.append(_weights(model))
    assert not np.allclose(out[0], out[1])


def test_clipping_bounds_each_rows_influence() -> None:
    """No noise, a tiny clipping norm: the weights can move at most lr x norm per step (x10
    for momentum 0.9), whatever the gradients, where plain SGD moves them far more."""
    X, y = _rows()
    X = X * 100  # huge gradients
    clip, lr, steps = 1e-4, 0.1, 6
    tiny = DPPlan(1.0, 1e-5, clip, 0.0, 1 / steps, steps, steps)
    before = _weights(build_model("lr", X.shape[1], seed=0))
    model = build_model("lr", X.shape[1], seed=0)
    train_local(model, X, y, TrainConfig(batch_size=100, learning_rate=lr), DPSGD(tiny))
    moved = np.linalg.norm(_weights(model) - before)
    assert moved <= steps * lr * clip * 10 * 1.5  # Poisson batches vary around their mean
    plain = build_model("lr", X.shape[1], seed=0)
    train_local(plain, X, y, TrainConfig(batch_size=100, learning_rate=lr))
    assert np.linalg.norm(_weights(plain) - before) > 100 * moved


@pytest.fixture(scope="module")
def dp_federation(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    population = generate(
        PopulationConfig(platforms=3, borrowers=2000, seed=5), tmp_path_factory.mktemp("pop")
    )
    ledgers = [str(p.ledger) for p in population.platforms]
    parties = enrol(ledgers, tmp_path_factory.mktemp("parties"))
    out = tmp_path_factory.mktemp("dp-run")
    grid = InProcessGrid(parties.client_app(), len(ledgers))
    settings = FederationSettings.model_validate(
        {
            "out-dir": str(out),
            "stages": "train",
            "num-rounds": 2,
            "model": "lr",
            "dp-epsilon": 2.0,
            "dp-clip-norm": 0.5,
        }
    )
    return run_federation(grid, settings), out, grid


def test_federation_records_the_budget_in_the_model_metadata(dp_federation) -> None:  # type: ignore[no-untyped-def]
    summary, out, _ = dp_federation
    assert summary["status"] == "ok"
    privacy = summary["models"]["lr"]["local"]["privacy"]
    assert privacy["epsilon"] == 2.0 and privacy["delta"] == 1e-5
    assert privacy["clipping_norm"] == 0.5 and privacy["accountant"] == "opacus RDP"
    assert "DP-SGD" in privacy["mechanism"]
    assert 1.9 <= privacy["epsilon_spent"] <= 2.0
    assert 0 < privacy["noise_multiplier"]["min"] <= privacy["noise_multiplier"]["max"]
    meta = json.loads((Path(out) / "model-lr-local.json").read_text())
    assert meta["privacy"] == privacy
    # Under secure aggregation: the accounting travels in clear beside the masked vector.
    assert meta["secure_aggregation"] is True


def test_platform_refuses_rounds_beyond_the_announced_budget(dp_federation) -> None:  # type: ignore[no-untyped-def]
    _, out, grid = dp_federation
    meta = json.loads((Path(out) / "model-lr-local.json").read_text())
    request = m.ModelInstructions(
        model="lr",
        feature_set="local",
        features=meta["features"],
        test_share=0.3,
        mean=meta["scaler"]["mean"],
        std=meta["scaler"]["std"],
        total_rounds=2,
        server_round=3,
        dp_epsilon=2.0,
    )
    content = request.to_content()
    weights = build_model("lr", len(meta["features"])).state_dict()
    content.array_records["arrays"] = ArrayRecord(weights)
    node = next(iter(grid.contexts))
    msg = Message(content, dst_node_id=node, message_type="train")
    reply = next(iter(grid.send_and_receive([msg])))
    assert reply.has_error()
    assert "more than the announced privacy budget" in reply.error.reason


def test_a_rerun_round_counts_against_the_budget(dp_federation) -> None:  # type: ignore[no-untyped-def]
    """A round trained again (secure aggregation re-runs a round after a dropout) spends
    again: the node's context state carries the steps taken, and the spent epsilon says so."""
    summary, out, grid = dp_federation
    meta = json.loads((Path(out) / "model-lr-local.json").read_text())
    steps = summary["models"]["lr"]["local"]["privacy"]["steps"]  # after both rounds
    request = m.ModelInstructions(
        model="lr",
        feature_set="local",
        features=meta["features"],
        test_share=0.3,
        mean=meta["scaler"]["mean"],
        std=meta["scaler"]["std"],
        total_rounds=2,
        server_round=2,
        dp_epsilon=2.0,
        dp_clip_norm=0.5,
    )
    content = request.to_content()
    content.array_records["arrays"] = ArrayRecord(
        build_model("lr", len(meta["features"])).state_dict()
    )
    node = next(iter(grid.contexts))
    msg = Message(content, dst_node_id=node, message_type="train")
    reply = next(iter(grid.send_and_receive([msg])))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content.metric_records["metrics"]
    # This request asks for no minimum of local steps: one epoch, 1 / q batches. The
    # federation's two rounds took ``steps`` (at least two epochs: the bureau's local-steps
    # minimum can make a round several epochs); the re-run counts on from there.
    per_round = round(1 / metrics["dp-sample-rate"])
    assert metrics["dp-steps"] == steps + per_round  # both rounds, then this re-run
    assert steps >= 2 * per_round
    assert metrics["dp-epsilon-spent"] > 2.0  # over budget, and reported as such


def test_pooled_dp_model_spends_its_budget_over_every_pass() -> None:
    """The demo's DP centralized model: DP-SGD planned over all passes, as a DP federation
    plans it over all rounds, and the accountant ends at the budget."""
    from fedcredit.demo.baselines import PooledDP, fit_and_score

    X, y = _rows()
    X_test, y_test = _rows(300, seed=1)
    cfg = TrainConfig(learning_rate=0.2, batch_size=100, seed=3)
    fit = fit_and_score("lr", X, y, X_test, y_test, passes=3, cfg=cfg, dp=PooledDP(1.0, 1e-5, 3.0))
    assert fit.privacy is not None and fit.passes_run == 3
    assert fit.privacy["epsilon"] == 1.0 and 0.95 <= fit.privacy["epsilon_spent"] <= 1.0
    assert fit.privacy["noise_multiplier"] > 0 and 0.0 <= fit.metrics["auc"] <= 1.0
    plain = fit_and_score("lr", X, y, X_test, y_test, passes=3, cfg=cfg)
    assert plain.privacy is None
