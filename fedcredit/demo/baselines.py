"""The yardsticks a federation is measured against: pooled raw data, and each platform alone.

``centralized`` pools every platform's raw ledger in one place (what the platforms refuse to
allow) and joins borrowers across platforms by token, so it computes the cross-platform totals
directly. It exists only to show what federation costs. ``local_only`` is what each platform
can do without anyone: its own features, its own borrowers. Both use the same model code,
split (train, validation and test people), robust feature transform, scaling rule and
stopping rule as the federated models: one pass over the pooled rows per round, at most
``passes`` of them, stopping once the validation loss has not improved for ``patience``
passes and keeping the best pass (``server/convergence.py`` for the federated twin).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clients.features import select_columns, with_cross_platform
from clients.platform_data import PlatformData
from protocols import robust_features
from protocols.features import CROSS_PLATFORM_FEATURES
from protocols.gbdt import BoostParams, pooled_fit, pooled_scores
from protocols.local_work import auto_local_steps, local_epochs
from protocols.metrics import ScoreHistogram, exact_auc_ks
from protocols.model import (
    TREE_KINDS,
    TrainConfig,
    build_model,
    log_loss,
    predict_proba,
    scheduled_lr,
    train_local,
)
from protocols.scaling import FeatureSums, combine
from server.convergence import EarlyStopping
from server.settings import FederationSettings

_DEFAULTS = FederationSettings()


@dataclass(frozen=True)
class PooledTraining:
    """The federation's split, feature and stopping settings, for a like-for-like yardstick."""

    validation_share: float = _DEFAULTS.validation_share
    patience: int = _DEFAULTS.patience
    robust: bool = _DEFAULTS.robust_features
    local_steps: int = _DEFAULTS.local_steps  # 0: auto, as in the federation

    @classmethod
    def of(cls, settings: FederationSettings) -> PooledTraining:
        return cls(
            settings.validation_share,
            settings.patience,
            settings.robust_features,
            settings.local_steps,
        )


Rows = tuple[np.ndarray, np.ndarray]


@dataclass
class Fit:
    metrics: dict[str, float]
    histogram: ScoreHistogram
    scores: np.ndarray
    labels: np.ndarray
    passes_run: int = 0
    best_pass: int = 0
    # Raw (unscaled) rows -> default probabilities: what a membership attack queries.
    predict: Callable[[np.ndarray], np.ndarray] | None = None
    # With DP-SGD: the budget, the noise and what the accountant says was spent.
    privacy: dict[str, object] | None = None


@dataclass(frozen=True)
class PooledDP:
    """DP-SGD for a pooled model: the demo's DP federations' budget and clipping norm."""

    epsilon: float
    delta: float
    clip_norm: float


def train_pooled(
    kind: str, X_train: np.ndarray, y_train: np.ndarray, passes: int, cfg: TrainConfig
) -> Callable[[np.ndarray], np.ndarray]:
    """A model trained on rows held in one place; returns raw rows -> probabilities."""
    scaler = combine([FeatureSums.of(X_train)])
    model = build_model(kind, X_train.shape[1], seed=cfg.seed)
    Xs = scaler.transform(X_train)
    for p in range(passes):
        lr = scheduled_lr(cfg.learning_rate, "cosine", p + 1, passes)
        train_local(
            model,
            Xs,
            y_train,
            TrainConfig(**{**cfg.__dict__, "seed": cfg.seed + p, "learning_rate": lr}),
        )
    return lambda X: predict_proba(model, scaler.transform(X))


def fit_and_score(
    kind: str,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    passes: int,
    cfg: TrainConfig,
    boost: BoostParams | None = None,
    *,
    validation: Rows | None = None,
    names: list[str] | None = None,
    training: PooledTraining = PooledTraining(),
    dp: PooledDP | None = None,
) -> Fit:
    """Train on ``X_train`` and score ``X_test``; ``validation`` rows (when given) stop
    training by the federation's rule, ``names`` tell the robust transform which columns are
    missing-value flags. ``dp`` trains with DP-SGD (``protocols.dp``), its noise planned for
    every pass, as a DP federation plans it for every round."""
    if kind in TREE_KINDS:
        if validation is not None:  # boosting has no early stopping: it trains on both
            X_train = np.concatenate([X_train, validation[0]])
            y_train = np.concatenate([y_train, validation[1]])
        return _boosted_fit(X_train, y_train, X_test, y_test, boost)
    names = names or [f"f{j}" for j in range(X_train.shape[1])]
    if validation is None:
        validation = (X_train[:0], y_train[:0])
    scaler = combine([FeatureSums.of(X_train)])
    robust = (
        robust_features.fit_pooled(X_train, scaler.mean, scaler.std, names)
        if training.robust
        else None
    )
    if robust is not None:
        scaler = combine([FeatureSums.of(robust.transform(X_train))])

    def prepare(X: np.ndarray) -> np.ndarray:
        return scaler.transform(X if robust is None else robust.transform(X))

    model = build_model(kind, X_train.shape[1], seed=cfg.seed)
    Xs, Xv = prepare(X_train), prepare(validation[0])
    # A pass does what a federated round does: the same number of SGD steps.
    epochs = local_epochs(
        cfg.epochs,
        training.local_steps or auto_local_steps(len(y_train), cfg.batch_size),
        len(y_train),
        cfg.batch_size,
    )
    budget = None
    if dp is not None:
        from protocols.dp import DPSGD, plan

        budget = plan(
            dp.epsilon, dp.delta, dp.clip_norm, len(y_train), cfg.batch_size, epochs, passes
        )
    stop_early = training.validation_share > 0 and len(validation[1]) > 0
    stopper = EarlyStopping(patience=training.patience if stop_early else 0)
    passes_run = 0
    for p in range(passes):
        lr = scheduled_lr(cfg.learning_rate * stopper.lr_scale, "cosine", p + 1, passes)
        dp_pass = None if budget is None else DPSGD(budget, steps_before=p * budget.steps_per_round)
        train_local(
            model,
            Xs,
            y_train,
            TrainConfig(
                **{**cfg.__dict__, "seed": cfg.seed + p, "learning_rate": lr, "epochs": epochs}
            ),
            dp_pass,
        )
        passes_run = p + 1
        if stop_early:
            loss = log_loss(model, Xv, validation[1])
            if stopper.update(passes_run, loss, copy.deepcopy(model.state_dict())):
                break
    best_pass = passes_run
    if stop_early and stopper.best_arrays is not None:
        model.load_state_dict(stopper.best_arrays)
        best_pass = stopper.best_round

    def predict(X: np.ndarray) -> np.ndarray:
        return predict_proba(model, prepare(X))

    scores = predict(X_test)
    privacy = None
    if budget is not None:
        from protocols.dp import ACCOUNTANT, MECHANISM

        privacy = {
            "epsilon": budget.epsilon,
            "delta": budget.delta,
            "mechanism": MECHANISM,
            "accountant": ACCOUNTANT,
            "clipping_norm": budget.clip_norm,
            "noise_multiplier": round(budget.noise_multiplier, 4),
            # The passes stopped early spend nothing: the accountant counts the steps taken.
            "epsilon_spent": round(budget.spent(passes_run * budget.steps_per_round), 4),
        }
    return Fit(
        exact_auc_ks(y_test, scores),
        ScoreHistogram.of(scores, y_test),
        scores,
        y_test,
        passes_run,
        best_pass,
        predict,
        privacy,
    )


def _boosted_fit(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    boost: BoostParams | None,
) -> Fit:
    """scikit-learn's HistGradientBoosting on the bins the federation would agree on."""
    model, edges, _ = pooled_fit(X_train, y_train, boost or BoostParams())
    scores = pooled_scores(model, X_test, edges)
    return Fit(exact_auc_ks(y_test, scores), ScoreHistogram.of(scores, y_test), scores, y_test)


def pooled_totals(platforms: list[PlatformData]) -> dict[str, np.ndarray]:
    """Cross-platform totals by joining raw ledgers on the token (the centralised shortcut)."""
    totals: dict[str, np.ndarray] = {}
    for data in platforms:
        for token, row in zip(data.features.tokens, data.profiles, strict=True):
            if token in totals:
                totals[token] = totals[token] + row
            else:
                totals[token] = row.copy()
    return totals


def _split(
    data: PlatformData, X: np.ndarray, test_share: float, validation_share: float
) -> tuple[Rows, Rows, Rows]:
    labelled = data.labelled
    y = data.features.y
    out = []
    for split in ("train", "validation", "test"):
        mask = labelled & data.split_mask(split, test_share, validation_share)
        out.append((X[mask], y[mask]))
    return out[0], out[1], out[2]


def pooled_rows(
    platforms: list[PlatformData],
    features: list[str],
    cross: bool,
    test_share: float,
    validation_share: float = _DEFAULTS.validation_share,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test) of every platform's rows pooled; ``cross`` adds the
    cross-platform totals joined by token (``features`` are then the local ones). The
    validation people are left out: the membership attacks compare training rows (members)
    with test rows (never seen by training, nor used to stop it)."""
    totals = pooled_totals(platforms) if cross else {}
    parts = []
    for data in platforms:
        feats = data.features
        if cross:
            feats = with_cross_platform(feats, np.array([totals[t] for t in feats.tokens]))
        names = [*features, *CROSS_PLATFORM_FEATURES] if cross else features
        X = feats.X[:, [feats.names.index(n) for n in names]]
        (X_tr, y_tr), _, (X_te, y_te) = _split(data, X, test_share, validation_share)
        parts.append((X_tr, y_tr, X_te, y_te))
    X_tr, y_tr, X_te, y_te = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return X_tr, y_tr, X_te, y_te


def centralized(
    platforms: list[PlatformData],
    kind: str,
    features: list[str],
    cross: bool,
    test_share: float,
    passes: int,
    cfg: TrainConfig,
    boost: BoostParams | None = None,
    training: PooledTraining = PooledTraining(),
    dp: PooledDP | None = None,
) -> Fit:
    """One model on every platform's rows pooled; ``cross`` adds totals joined by token;
    ``dp`` trains it with DP-SGD."""
    totals = pooled_totals(platforms) if cross else {}
    names = [*features, *CROSS_PLATFORM_FEATURES] if cross else features
    parts = []
    for data in platforms:
        feats = data.features
        if cross:
            feats = with_cross_platform(feats, np.array([totals[t] for t in feats.tokens]))
        parts.append(
            _split(data, select_columns(feats, names), test_share, training.validation_share)
        )
    (X_tr, y_tr), validation, (X_te, y_te) = [
        (np.concatenate([p[s][0] for p in parts]), np.concatenate([p[s][1] for p in parts]))
        for s in range(3)
    ]
    return fit_and_score(
        kind,
        X_tr,
        y_tr,
        X_te,
        y_te,
        passes,
        cfg,
        boost,
        validation=validation,
        names=names,
        training=training,
        dp=dp,
    )


def local_only(
    data: PlatformData,
    kind: str,
    test_share: float,
    passes: int,
    cfg: TrainConfig,
    boost: BoostParams | None = None,
    features: list[str] | None = None,
    training: PooledTraining = PooledTraining(),
) -> Fit:
    """The platform alone: its own borrowers, and every feature its own ledger has unless
    ``features`` names the columns (the federated model's, for a like-for-like check)."""
    names = features if features is not None else data.features.names
    X = select_columns(data.features, names)
    (X_tr, y_tr), validation, (X_te, y_te) = _split(data, X, test_share, training.validation_share)
    return fit_and_score(
        kind,
        X_tr,
        y_tr,
        X_te,
        y_te,
        passes,
        cfg,
        boost,
        validation=validation,
        names=list(names),
        training=training,
    )
