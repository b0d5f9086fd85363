"""The yardsticks a federation is measured against: pooled raw data, and each platform alone.

``centralized`` pools every platform's raw ledger in one place (what the platforms refuse to
allow) and joins borrowers across platforms by token, so it computes the cross-platform totals
directly. It exists only to show what federation costs. ``local_only`` is what each platform
can do without anyone: its own features, its own borrowers. Both use the same model code,
scaling rule, split and number of passes over the data as the federated models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clients.features import with_cross_platform
from clients.platform_data import PlatformData
from protocols.features import CROSS_PLATFORM_FEATURES
from protocols.gbdt import BoostParams, pooled_fit, pooled_scores
from protocols.metrics import ScoreHistogram, exact_auc_ks
from protocols.model import (
    TREE_KINDS,
    TrainConfig,
    build_model,
    predict_proba,
    scheduled_lr,
    train_local,
)
from protocols.scaling import FeatureSums, combine


@dataclass
class Fit:
    metrics: dict[str, float]
    histogram: ScoreHistogram
    scores: np.ndarray
    labels: np.ndarray
    # Raw (unscaled) rows -> default probabilities: what a membership attack queries.
    predict: Callable[[np.ndarray], np.ndarray] | None = None


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
) -> Fit:
    if kind in TREE_KINDS:
        return _boosted_fit(X_train, y_train, X_test, y_test, boost)
    predict = train_pooled(kind, X_train, y_train, passes, cfg)
    scores = predict(X_test)
    return Fit(
        exact_auc_ks(y_test, scores), ScoreHistogram.of(scores, y_test), scores, y_test, predict
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
    data: PlatformData, X: np.ndarray, test_share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    test = data.test_mask(test_share)
    labelled = data.labelled
    y = data.features.y
    tr, te = labelled & ~test, labelled & test
    return X[tr], y[tr], X[te], y[te]


def pooled_rows(
    platforms: list[PlatformData], features: list[str], cross: bool, test_share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test) of every platform's rows pooled; ``cross`` adds the
    cross-platform totals joined by token (``features`` are then the local ones)."""
    totals = pooled_totals(platforms) if cross else {}
    parts = []
    for data in platforms:
        feats = data.features
        if cross:
            feats = with_cross_platform(feats, np.array([totals[t] for t in feats.tokens]))
        names = [*features, *CROSS_PLATFORM_FEATURES] if cross else features
        X = feats.X[:, [feats.names.index(n) for n in names]]
        parts.append(_split(data, X, test_share))
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
) -> Fit:
    """One model on every platform's rows pooled; ``cross`` adds totals joined by token."""
    X_tr, y_tr, X_te, y_te = pooled_rows(platforms, features, cross, test_share)
    return fit_and_score(kind, X_tr, y_tr, X_te, y_te, passes, cfg, boost)


def local_only(
    data: PlatformData,
    kind: str,
    test_share: float,
    passes: int,
    cfg: TrainConfig,
    boost: BoostParams | None = None,
    features: list[str] | None = None,
) -> Fit:
    """The platform alone: its own borrowers, and every feature its own ledger has unless
    ``features`` names the columns (the federated model's, for a like-for-like check)."""
    X = data.features.X
    if features is not None:
        X = X[:, [data.features.names.index(n) for n in features]]
    return fit_and_score(kind, *_split(data, X, test_share), passes, cfg, boost)
