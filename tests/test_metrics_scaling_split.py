"""The shared building blocks that make federated figures equal to pooled ones."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from protocols.metrics import ScoreHistogram, exact_auc_ks
from protocols.scaling import FeatureSums, combine
from protocols.split import in_test_set


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.04).astype(int)
    logit = -3.5 + 1.2 * y + rng.standard_normal(n)
    return 1 / (1 + np.exp(-logit)), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_and_ks_match_exact(seed: int) -> None:
    p, y = _scores(50_000, seed)
    hist = ScoreHistogram.of(p, y)
    fpr, tpr, _ = roc_curve(y, p)
    assert abs(hist.auc() - roc_auc_score(y, p)) < 1e-3
    assert abs(hist.ks() - float(np.max(tpr - fpr))) < 2e-3
    assert hist.count == len(y)


def test_summed_histograms_equal_pooled_histogram_not_averaged_aucs() -> None:
    parts = [_scores(20_000, s) for s in range(3)]
    # Platforms with different base rates: averaging AUCs would be wrong, summing is exact.
    parts[2] = (np.clip(parts[2][0] * 3, 0, 1), parts[2][1])
    total = sum((ScoreHistogram.of(p, y) for p, y in parts), ScoreHistogram.empty())
    pooled = ScoreHistogram.of(
        np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])
    )
    assert np.array_equal(total.positives, pooled.positives)
    assert total.auc() == pooled.auc()
    exact = exact_auc_ks(
        np.concatenate([y for _, y in parts]), np.concatenate([p for p, _ in parts])
    )
    assert abs(total.auc() - exact["auc"]) < 1e-3


def test_ties_count_half_and_degenerate_cases() -> None:
    hist = ScoreHistogram.of(np.full(10, 0.2), np.array([1] * 5 + [0] * 5))
    assert hist.auc() == pytest.approx(0.5)
    assert np.isnan(ScoreHistogram.of(np.full(3, 0.2), np.zeros(3)).auc())


def test_federated_scaler_equals_pooled_statistics() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc=i, scale=1 + i, size=(1000 * (i + 1), 4)) for i in range(3)]
    scaler = combine(FeatureSums.of(x) for x in parts)
    pooled = np.vstack(parts)
    assert np.allclose(scaler.mean, pooled.mean(axis=0))
    assert np.allclose(scaler.std, pooled.std(axis=0))
    constant = combine([FeatureSums.of(np.ones((5, 2)))])
    assert np.all(constant.std > 0)  # a constant feature does not divide by zero
    with pytest.raises(ValueError, match="different widths"):
        combine([FeatureSums.of(np.ones((2, 2))), FeatureSums.of(np.ones((2, 3)))])


def test_split_is_by_token_and_shared() -> None:
    tokens = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    mask = in_test_set(tokens, 0.3)
    assert mask.tolist() == in_test_set(tokens, 0.3).tolist()
    assert 0.25 < mask.mean() < 0.35
    with pytest.raises(ValueError):
        in_test_set(tokens, 1.0)
