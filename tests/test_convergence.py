"""Training that converges on any platform size, and robust features fitted from sums.

Fast tests: the robust transform's statistics (fitted from summed sketches, identical to the
pooled fit), the local-work and early-stopping rules, the validation split, the messages'
refusals, and one in-process federation of small platforms (about 300 borrowers each, where
one local epoch is a single SGD step) that must now train to its pooled twin. The same code
runs through Flower's simulation engine in test_simulation.py (the report's ``convergence``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from clients.app import build_client_app
from clients.features import LocalFeatures, select_columns
from clients.platform_data import load_platform_data
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate, seeded_federation_key
from fedcredit.demo import baselines
from fedcredit.enrolment import Enrolment, enrol_platforms
from protocols import messages as m
from protocols import robust_features as rf
from protocols.local_work import MIN_LOCAL_STEPS, auto_local_steps, local_epochs
from protocols.model import TrainConfig
from protocols.scaling import FeatureSums, combine
from protocols.split import in_test_set, in_validation_set
from protocols.tokens import write_federation_key
from server.convergence import EarlyStopping
from server.feature_prep import sum_named_arrays
from server.federation import common_features, run_federation
from server.settings import FederationSettings
from tests.inprocess import InProcessGrid

# -- robust features ------------------------------------------------------------------------


def _columns(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    money = rng.lognormal(8.0, 1.5, n)  # heavy right tail
    normal = rng.normal(40.0, 10.0, n)
    rare_flag = (rng.random(n) < 0.002).astype(float)  # a flag set for 0.2 % of rows
    count = rng.integers(0, 5, n).astype(float)
    income = rng.lognormal(9.0, 1.0, n)
    income_missing = (rng.random(n) < 0.1).astype(float)
    income = np.where(income_missing == 1, 0.0, income)  # the importer's placeholder
    X = np.column_stack([money, normal, rare_flag, count, income, income_missing])
    return X, ["x_balance", "age", "x_flag", "loans", "x_income", "x_income_missing"]


def _fit_federated(parts: list[np.ndarray], names: list[str]) -> rf.RobustTransform:
    """What the bureau does: sums of x and x², then summed sketches on bins they fix."""
    scaler = combine(FeatureSums.of(p) for p in parts)
    flags = rf.flag_columns(names)
    summed = sum_named_arrays(
        {i: {"sketch": rf.sketch(p, scaler.mean, scaler.std, flags)} for i, p in enumerate(parts)}
    )
    return rf.fit(summed["sketch"], scaler.mean, scaler.std, names)


def test_federated_sketch_gives_the_pooled_transform() -> None:
    X, names = _columns(9000)
    parts = [X[:1000], X[1000:4000], X[4000:]]
    federated = _fit_federated(parts, names)
    pooled = rf.fit_pooled(X, X.mean(axis=0), X.std(axis=0), names)
    for key, value in federated.to_dict().items():
        np.testing.assert_allclose(value, pooled.to_dict()[key], rtol=1e-9, err_msg=key)


def test_transform_logs_heavy_tails_only_and_keeps_rare_values_and_imputes_missing() -> None:
    X, names = _columns(20000)
    t = rf.fit_pooled(X, X.mean(axis=0), X.std(axis=0), names)
    assert t.describe(names)["log_transformed"] == ["x_balance", "x_income"]
    # The median is read off the sketch to within a bin of the true one.
    assert abs(t.center[1] - np.median(X[:, 1])) < 0.5
    # The income median ignores the placeholder zeros of missing rows.
    observed = X[X[:, 5] == 0, 4]
    assert abs(t.center[4] / np.median(observed) - 1) < 0.05
    U = t.transform(X)
    assert np.isfinite(U).all()
    # Heavy tails are tamed: no transformed value is far out, while raw z-scores were.
    raw_z = (X[:, 0] - X[:, 0].mean()) / X[:, 0].std()
    assert raw_z.max() > 20 and np.abs(U[:, 0]).max() < 6
    # The rare flag survives clipping: set rows stay apart from unset ones.
    assert U[X[:, 2] == 1, 2].min() > U[X[:, 2] == 0, 2].max()
    # Missing incomes sit at the centre, not at the placeholder's extreme.
    assert np.all(U[X[:, 5] == 1, 4] == 0.0)
    spec = m.RobustSpec(**t.to_dict())  # type: ignore[arg-type]
    assert rf.RobustTransform.from_dict(spec.model_dump()).to_dict() == t.to_dict()


def test_robust_spec_and_sketch_messages_refuse_bad_input() -> None:
    X, names = _columns(500)
    good = rf.fit_pooled(X, X.mean(axis=0), X.std(axis=0), names).to_dict()
    with pytest.raises(ValueError, match="inverted"):
        m.RobustSpec(**{**good, "lo": [5.0] * 6, "hi": [0.0] * 6})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing flag"):
        m.RobustSpec(**{**good, "flags": [0, -1, -1, -1, -1, -1]})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        m.RobustSpec(**{**good, "scale": [0.0] * 6})  # type: ignore[arg-type]
    counts = np.ones((2, 4), dtype=np.int64)
    ok = m.FeatureSketch(width=2, bins=4, counts=m.ints_to_bytes(counts))
    assert (ok.matrix() == counts).all()
    with pytest.raises(ValueError, match="negative"):
        m.FeatureSketch(width=2, bins=4, counts=m.ints_to_bytes(-counts))
    with pytest.raises(ValueError, match="bytes"):
        m.FeatureSketch(width=3, bins=4, counts=m.ints_to_bytes(counts))
    content = ok.to_content()
    assert m.FeatureSketch.from_content(content, "test").width == 2


# -- missing-value flags --------------------------------------------------------------------


def test_missing_flags_flow_into_training_from_platforms_that_have_them() -> None:
    def desc(features: list[str]) -> m.PlatformDescription:
        return m.PlatformDescription(
            platform="p",
            key_id="k",
            borrowers=1,
            labelled=1,
            train_rows=1,
            test_rows=0,
            features=features,
            fingerprint="0" * 64,
        )

    descs = {
        1: desc(["age", "x_income", "x_income_missing"]),
        2: desc(["age", "x_income"]),
        3: desc(["age", "x_income", "x_only_here"]),
    }
    assert common_features(descs) == ["age", "x_income", "x_income_missing"]
    feats = LocalFeatures(["t"], ["age", "x_income"], np.array([[30.0, 5.0]]), np.array([0.0]))
    cols = select_columns(feats, ["x_income", "x_income_missing", "age"])
    assert cols.tolist() == [[5.0, 0.0, 30.0]]
    with pytest.raises(LookupError, match="x_other"):
        select_columns(feats, ["x_other"])


# -- local work, validation, early stopping -------------------------------------------------


def test_local_work_scales_with_data_and_never_falls_to_one_step() -> None:
    # 300 rows, batches of 256: two steps an epoch, so ten epochs reach the 20-step floor.
    assert auto_local_steps(300, 256) == MIN_LOCAL_STEPS
    assert local_epochs(1, MIN_LOCAL_STEPS, 300, 256) == 10
    # A big federation: one epoch over all its rows, which a large platform's epoch exceeds.
    assert auto_local_steps(30_000, 256) == 118
    assert local_epochs(1, 118, 10_000, 256) == 3
    assert local_epochs(1, 118, 40_000, 256) == 1
    assert local_epochs(2, 0, 300, 256) == 2


def test_validation_people_are_disjoint_from_test_people() -> None:
    rng = np.random.default_rng(3)
    tokens = [rng.bytes(32).hex() for _ in range(20000)]
    test = in_test_set(tokens, 0.3)
    validation = ~test & in_validation_set(tokens, 0.2)
    assert 0.12 < validation.mean() < 0.16  # 0.2 of the 70 % not held out for testing
    assert not (validation & test).any()
    assert not in_validation_set(tokens, 0.0).any()


def test_early_stopping_keeps_the_best_round() -> None:
    stopper = EarlyStopping(patience=2)
    arrays = [ArrayRecord() for _ in range(6)]
    losses = [0.7, 0.6, 0.55, 0.56, 0.57]
    stops = [stopper.update(r + 1, loss, arrays[r]) for r, loss in enumerate(losses)]
    assert stops == [False, False, False, False, True]
    assert stopper.best_round == 3 and stopper.best_arrays is arrays[2]
    assert "best 0.55000 at round 3" in stopper.reason()


def test_a_plateau_halves_the_learning_rate_before_training_stops() -> None:
    stopper = EarlyStopping(patience=5, halve_after=2)
    losses = [0.7, 0.6, 0.61, 0.62, 0.59, 0.6, 0.6, 0.6, 0.6, 0.6]
    scales, stops = [], []
    for r, loss in enumerate(losses, start=1):
        stops.append(stopper.update(r, loss, r))
        scales.append(stopper.lr_scale)
    # Two stale rounds halve it; an improvement (round 5) resets the count, not the rate.
    assert scales == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    assert stops == [False] * 9 + [True]
    assert stopper.best_round == 5 and "halved 3 times" in stopper.reason()


# -- small platforms train ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ledgers(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("small")
    key = out / "federation.key"
    write_federation_key(key, seeded_federation_key(5))
    data = generate(PopulationConfig(platforms=3, borrowers=1000, seed=5), out, key_file=key)
    ledgers = [str(p.ledger) for p in data.platforms]
    # Enrolled platforms: training sums are securely aggregated, as in a real run.
    _ENROLMENTS[tuple(ledgers)] = enrol_platforms(ledgers, out / "parties")
    return ledgers


_ENROLMENTS: dict[tuple[str, ...], Enrolment] = {}


def _federate(ledgers: list[str], out: Path, **config: object) -> dict:  # type: ignore[type-arg]
    enrolment = _ENROLMENTS[tuple(ledgers)]
    app = build_client_app(ledgers, enrolment.identities, enrolment.roster)
    grid = InProcessGrid(app, len(ledgers))
    settings = FederationSettings.model_validate(
        {"out-dir": str(out), "stages": "train", "model": "lr", "num-rounds": 15, **config}
    )
    return run_federation(grid, settings)


def test_small_platforms_train_to_their_pooled_twin(small_ledgers: list[str], tmp_path: Path):
    platforms = [load_platform_data(loc) for loc in small_ledgers]
    assert max(int((p.labelled & ~p.test_mask(0.3)).sum()) for p in platforms) < 512
    summary = _federate(small_ledgers, tmp_path / "new")
    entry = summary["models"]["lr"]["local"]
    assert entry["local_steps"] == MIN_LOCAL_STEPS
    assert 1 <= entry["best_round"] <= entry["rounds_run"] <= 15
    assert entry["stopped_because"]
    pooled = baselines.centralized(
        platforms, "lr", summary["features"]["local"], False, 0.3, 15, TrainConfig()
    )
    federated = summary["federated"]["auc"]
    assert abs(federated - pooled.metrics["auc"]) < 0.02, (federated, pooled.metrics)
    # The old regime (one epoch a round, fixed rounds, raw standardisation) stays short.
    old = _federate(
        small_ledgers,
        tmp_path / "old",
        **{"local-steps": 1, "validation-share": 0.0, "robust-features": False},
    )
    assert old["models"]["lr"]["local"]["stopped_because"].startswith("reached num-rounds")
    assert federated > old["federated"]["auc"] + 0.02


# -- the benchmark's random split -----------------------------------------------------------

SCORING_MAPPING = """
version = 1
[source]
format = "csv"
[borrower]
id = { row_number = true }
namespace = "bench-test"
age = "age"
label = { column = "bad" }
[borrower.features]
amount = "amount"
months = "months"
[loan]
scoring_only = true
"""


def test_bench_convergence_splits_numbered_rows_without_token_clashes(tmp_path: Path) -> None:
    from fedcredit.bench import convergence

    rng = np.random.default_rng(2)
    n = 600
    amount = rng.lognormal(8, 1, n).round()
    months = rng.integers(6, 60, n)
    bad = (rng.random(n) < 1 / (1 + np.exp(-(months - 30) / 10))).astype(int)
    lines = ["age,amount,months,bad"] + [
        f"{rng.integers(20, 70)},{a:.0f},{mo},{b}"
        for a, mo, b in zip(amount, months, bad, strict=True)
    ]
    csv_path, mapping = tmp_path / "scoring.csv", tmp_path / "scoring.toml"
    csv_path.write_text("\n".join(lines) + "\n")
    mapping.write_text(SCORING_MAPPING)
    ledgers = convergence.split_at_random(csv_path, mapping, tmp_path, seed=1)
    parts = [load_platform_data(loc) for loc in ledgers]
    assert [len(p.features.tokens) for p in parts] == [200, 200, 200]
    tokens = [t for p in parts for t in p.features.tokens]
    assert len(set(tokens)) == n  # row numbers from the whole file, not from each part
    result = convergence.run(csv_path, mapping, rounds=3, regimes=("one_epoch", "fedavg"))
    assert result["labelled_rows"] == {"part-a": 200, "part-b": 200, "part-c": 200}
    fedavg = result["regimes"]["fedavg"]["lr"]
    assert fedavg["local_steps"] == MIN_LOCAL_STEPS and fedavg["stopped_because"]
    assert result["regimes"]["one_epoch"]["lr"]["local_steps"] == 1
    assert 0.0 <= result["sklearn_hgb_auc"] <= 1.0
    assert set(result["seconds_ratio_fedavg_over_one_epoch"]) == {"lr", "mlp"}


def test_server_optimiser_keeps_strict_failure_handling(small_ledgers: list[str], tmp_path: Path):
    from flwr.serverapp.strategy import FedAdam, FedYogi

    from server.convergence import make_strategy
    from server.training import StrictFedAvg

    for name, cls in (("fedadam", FedAdam), ("fedyogi", FedYogi)):
        settings = FederationSettings.model_validate({"server-optimizer": name})
        strategy = make_strategy(StrictFedAvg, settings, min_available_nodes=3)
        assert isinstance(strategy, cls) and isinstance(strategy, StrictFedAvg)
        assert strategy.eta == settings.server_learning_rate  # type: ignore[attr-defined]
    summary = _federate(small_ledgers, tmp_path, **{"server-optimizer": "fedadam", "num-rounds": 3})
    entry = summary["models"]["lr"]["local"]
    assert 1 <= entry["rounds_run"] <= 3 and 0.0 < summary["federated"]["auc"] < 1.0


def test_bench_convergence_command_line_refusals(tmp_path: Path) -> None:
    from fedcredit.cli import main

    csv_path, mapping = tmp_path / "scoring.csv", tmp_path / "scoring.toml"
    mapping.write_text(SCORING_MAPPING)
    base = ["bench", "convergence", "--mapping", str(mapping)]
    assert main(base) != 0  # no --csv
    assert main([*base, "--csv", str(csv_path)]) != 0  # no such file
    csv_path.write_text("age,amount,months,bad\n30,100,12,0\n")
    assert main([*base, "--csv", str(csv_path), "--rounds", "501"]) != 0
