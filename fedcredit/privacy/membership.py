"""Membership inference: can an attacker tell a model's training rows from other borrowers?

Two attacks, both standard in the literature and both black-box (they need only the model's
predicted default probability for a row and that row's label):

* **loss threshold** (Yeom et al., 2018): a row the model was trained on tends to have a lower
  loss; the attack's score is minus the row's log-loss.
* **shadow model** (Shokri et al., 2017): the attacker trains a model of its own the same
  way on borrowers it knows ("in"), keeps others out, and fits a classifier that tells its
  shadow's "in" rows from its "out" rows by (loss, log-odds, label); that classifier then
  scores the target model's rows.

Each attack is scored on members (the target's training rows) against non-members (held-out
borrowers of the same platforms, never trained on), in equal numbers, as the attack's ROC
AUC (0.5: the model reveals nothing about membership) and its TPR at 1% FPR (how many
members it exposes while wrongly accusing only 1% of non-members; the figure that matters
when an attacker wants a few confident hits, Carlini et al., 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score, roc_curve
from threadpoolctl import threadpool_limits

Predict = Callable[[np.ndarray], np.ndarray]
# Trains a shadow model the way the target was trained; returns its predict function.
Fit = Callable[[np.ndarray, np.ndarray], Predict]

LOW_FPR = 0.01
EPS = 1e-7


@dataclass(frozen=True)
class AttackResult:
    attack_auc: float
    tpr_at_1pct_fpr: float
    members: int
    non_members: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_attack(member_scores: np.ndarray, non_member_scores: np.ndarray) -> AttackResult:
    """AUC and TPR at 1% FPR of scores where higher means "member"."""
    m, n = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    if not len(m) or not len(n):
        raise ValueError("an attack needs members and non-members to score")
    labels = np.r_[np.ones(len(m)), np.zeros(len(n))]
    scores = np.r_[m, n]
    fpr, tpr, _ = roc_curve(labels, scores)
    return AttackResult(
        attack_auc=round(float(roc_auc_score(labels, scores)), 4),
        tpr_at_1pct_fpr=round(float(tpr[fpr <= LOW_FPR].max()), 4),
        members=len(m),
        non_members=len(n),
    )


def row_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's log-loss under the predicted default probability ``p``."""
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    y = np.asarray(y, float)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def loss_threshold_attack(
    p_members: np.ndarray, y_members: np.ndarray, p_non: np.ndarray, y_non: np.ndarray
) -> AttackResult:
    return score_attack(-row_loss(p_members, y_members), -row_loss(p_non, y_non))


def _attack_features(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return np.c_[row_loss(p, y), np.log(p / (1 - p)), y]


def shadow_model_attack(
    target: Predict,
    members: tuple[np.ndarray, np.ndarray],
    non_members: tuple[np.ndarray, np.ndarray],
    shadow_pool: tuple[np.ndarray, np.ndarray],
    fit: Fit,
    seed: int = 0,
) -> AttackResult:
    """Train a shadow on half of ``shadow_pool`` (rows the target never saw), learn "in" vs
    "out" on its predictions, and score the target's members against its non-members."""
    X, y = shadow_pool
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    inside, outside = order[: len(y) // 2], order[len(y) // 2 :]
    shadow = fit(X[inside], y[inside])
    features = np.r_[
        _attack_features(shadow(X[inside]), y[inside]),
        _attack_features(shadow(X[outside]), y[outside]),
    ]
    labels = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    classifier = HistGradientBoostingClassifier(max_iter=100, random_state=seed)
    # One thread: on a shared 2-core machine OpenMP's default oversubscribes it badly.
    with threadpool_limits(limits=1):
        classifier.fit(features, labels)

        def member_score(rows: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            return classifier.predict_proba(_attack_features(target(rows[0]), rows[1]))[:, 1]

        return score_attack(member_score(members), member_score(non_members))


def membership_inference(
    target: Predict,
    train: tuple[np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray],
    fit: Fit,
    max_rows: int = 20_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Both attacks against ``target``, trained on ``train``; ``held_out`` never trained on.

    The held-out borrowers are split: half are the non-members the attacks are scored on,
    half the attacker's own data for its shadow model. Members are drawn from ``train`` in
    the same number as the non-members (at most ``max_rows`` each), so 0.5 is chance.
    The headline (``attack_auc``, ``tpr_at_1pct_fpr``) is the stronger attack's.
    """
    rng = np.random.default_rng(seed)
    Xh, yh = held_out
    order = rng.permutation(len(yh))
    half = len(order) // 2
    scored, pool = order[:half][:max_rows], order[half:]
    Xt, yt = train
    n = min(len(scored), len(yt))
    if n < 2:
        raise ValueError("membership inference needs at least two members and two non-members")
    picked = rng.choice(len(yt), size=n, replace=False)
    scored = scored[:n]
    members, non = (Xt[picked], yt[picked]), (Xh[scored], yh[scored])
    loss = loss_threshold_attack(target(members[0]), members[1], target(non[0]), non[1])
    shadow = shadow_model_attack(target, members, non, (Xh[pool], yh[pool]), fit, seed)
    best_name, best = max(
        (("loss_threshold", loss), ("shadow_model", shadow)), key=lambda kv: kv[1].attack_auc
    )
    return {
        "attack_auc": best.attack_auc,
        "tpr_at_1pct_fpr": best.tpr_at_1pct_fpr,
        "strongest": best_name,
        "loss_threshold": loss.to_dict(),
        "shadow_model": shadow.to_dict(),
    }
