"""The shared building blocks that make federated figures equal to pooled ones."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from protocols.metrics import (
    BINS,
    LOGIT_RANGE,
    PSI_EPSILON,
    ScoreHistogram,
    calibration_summary,
    exact_auc_ks,
    psi,
    psi_verdict,
    quantile_groups,
    score_bins,
)
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


# ------------------------------------------------------------------ calibration and stability


def _calibrated(n: int, seed: int, base: float, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores that are true default probabilities: labels drawn from the scores themselves."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-(base + spread * rng.standard_normal(n))))
    return p, (rng.random(n) < p).astype(int)


CASES = [  # (base log-odds, spread): credit-like (a few percent default), and balanced
    (-3.5, 1.2),
    (0.0, 2.0),
]


@pytest.mark.parametrize(("base", "spread"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("miscalibrated", [False, True])
def test_brier_from_histogram_matches_scikit_learn(
    base: float, spread: float, seed: int, miscalibrated: bool
) -> None:
    p, y = _calibrated(50_000, seed, base, spread)
    if miscalibrated:  # the model overstates risk: log-odds doubled and shifted up
        p = 1 / (1 + np.exp(-(2 * np.log(p / (1 - p)) + 1)))
    hist = ScoreHistogram.of(p, y)
    exact = brier_score_loss(y, p)
    error = abs(hist.brier() - exact)
    assert error <= hist.brier_error_bound()  # the guarantee
    assert error < 1e-4  # the claim in the module docstring (about 1e-6 here)
    if base < -1:  # credit-like scores: even the worst case is below 1e-4
        assert hist.brier_error_bound() < 1e-4


def test_brier_error_bound_holds_at_the_worst_end_of_bins() -> None:
    """Rows put at bin edges (the worst place for the centre approximation)."""
    logit_lo = -LOGIT_RANGE + np.arange(BINS) * (2 * LOGIT_RANGE / BINS) + 1e-9
    picked = np.random.default_rng(0).choice(BINS, 20_000)
    p = 1 / (1 + np.exp(-logit_lo[picked]))
    y = (p > 0.5).astype(int)  # labels that make each row's error as large as it gets
    hist = ScoreHistogram.of(p, y)
    assert abs(hist.brier() - brier_score_loss(y, p)) <= hist.brier_error_bound()


def test_summed_calibration_equals_pooled() -> None:
    """Calibration is read off summed counts, so the federation's figure is the pooled one."""
    parts = [_calibrated(20_000, s, -3.0 + 0.3 * s, 1.0) for s in range(3)]
    total = sum((ScoreHistogram.of(p, y) for p, y in parts), ScoreHistogram.empty())
    p, y = (np.concatenate(x) for x in zip(*parts, strict=True))
    assert total.brier() == pytest.approx(ScoreHistogram.of(p, y).brier(), abs=1e-15)
    assert abs(total.brier() - brier_score_loss(y, p)) < 1e-5
    assert total.reliability() == ScoreHistogram.of(p, y).reliability()


@pytest.mark.parametrize(("base", "spread"), CASES)
@pytest.mark.parametrize("miscalibrated", [False, True])
def test_reliability_by_decile_matches_direct_computation(
    base: float, spread: float, miscalibrated: bool
) -> None:
    p, y = _calibrated(50_000, 3, base, spread)
    if miscalibrated:  # the model understates risk by a factor of about e
        p = 1 / (1 + np.exp(-(np.log(p / (1 - p)) - 1)))
    hist = ScoreHistogram.of(p, y)
    rows = hist.reliability()
    assert [r["decile"] for r in rows] == list(range(1, 11))
    # Directly on the rows, grouped as the histogram groups them: counts and defaults exact,
    # the mean predicted probability to the bin-centre approximation.
    group = quantile_groups(hist.totals)[score_bins(p)]
    for r in rows:
        mine = group == r["decile"] - 1
        assert r["count"] == mine.sum() and r["defaults"] == y[mine].sum()
        assert r["observed_rate"] == pytest.approx(y[mine].mean(), abs=1e-12)
        assert r["mean_predicted"] == pytest.approx(p[mine].mean(), abs=5e-4)
        assert abs(r["count"] - len(y) / 10) < len(y) / 100  # deciles up to a bin's rows
    # scikit-learn's quantile reliability curve, which cuts at exact row quantiles.
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    assert np.allclose([r["observed_rate"] for r in rows], observed, atol=3e-3)
    assert np.allclose([r["mean_predicted"] for r in rows], predicted, atol=1e-3)
    # Calibrated scores: predicted and observed agree in every decile (within sampling
    # noise); understated ones: every decile's observed rate is above its prediction.
    gaps = np.array([r["observed_rate"] - r["mean_predicted"] for r in rows])
    noise = np.array(
        [3 * np.sqrt(r["mean_predicted"] * (1 - r["mean_predicted"]) / r["count"]) for r in rows]
    )
    if miscalibrated:
        assert (gaps > 0).all()
    else:
        assert (np.abs(gaps) < noise + 1e-3).all()


def test_reliability_when_one_bin_holds_most_rows() -> None:
    p = np.concatenate([np.full(900, 0.05), np.linspace(0.1, 0.9, 100)])
    y = (np.arange(1000) % 10 == 0).astype(int)
    rows = ScoreHistogram.of(p, y).reliability()
    assert sum(r["count"] for r in rows) == 1000
    assert rows[0]["count"] == 900 and rows[0]["mean_predicted"] == pytest.approx(0.05, abs=1e-4)
    assert ScoreHistogram.empty().reliability() == []


def _direct_psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Textbook PSI on the raw scores: deciles of expected, shares floored at PSI_EPSILON."""
    cuts = np.quantile(expected, np.linspace(0, 1, 11)[1:-1])
    e = np.bincount(np.searchsorted(cuts, expected), minlength=10) / len(expected)
    a = np.bincount(np.searchsorted(cuts, actual), minlength=10) / len(actual)
    e, a = np.maximum(e, PSI_EPSILON), np.maximum(a, PSI_EPSILON)
    return float(((a - e) * np.log(a / e)).sum())


def test_psi_of_a_histogram_with_itself_is_zero() -> None:
    p, y = _calibrated(30_000, 0, -3.5, 1.2)
    hist = ScoreHistogram.of(p, y)
    assert psi(hist, hist) == 0.0
    # and of two samples of one population, close to zero ("stable")
    q, z = _calibrated(30_000, 1, -3.5, 1.2)
    assert psi(hist, ScoreHistogram.of(q, z)) < 0.01
    assert psi_verdict(psi(hist, ScoreHistogram.of(q, z))) == "stable"
    assert np.isnan(psi(hist, ScoreHistogram.empty()))


@pytest.mark.parametrize("seed", [0, 1])
def test_psi_matches_direct_computation_and_grows_with_the_shift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    train = rng.normal(-3.5, 1.2, 40_000)
    expected = ScoreHistogram.of(1 / (1 + np.exp(-train)), np.zeros(len(train), dtype=int))
    values = []
    for shift in (0.0, 0.1, 0.25, 0.5, 1.0, 2.0):
        test = rng.normal(-3.5 + shift, 1.2 * (1 + shift / 4), 20_000)
        actual = ScoreHistogram.of(1 / (1 + np.exp(-test)), (rng.random(20_000) < 0.05))
        value = psi(expected, actual)
        assert value == pytest.approx(_direct_psi(train, test), abs=2e-3)
        values.append(value)
    assert values == sorted(values) and values[0] < 0.01
    assert [psi_verdict(v) for v in (values[0], values[3], values[-1])] == [
        "stable",
        "moderate shift",
        "significant shift",
    ]


def test_psi_floors_empty_deciles() -> None:
    """Held-out scores all below the training range: finite, and a significant shift."""
    low = ScoreHistogram.of(np.full(100, 0.001), np.zeros(100, dtype=int))
    train = ScoreHistogram.of(np.linspace(0.01, 0.5, 1000), np.zeros(1000, dtype=int))
    value = psi(train, low)
    assert np.isfinite(value) and psi_verdict(value) == "significant shift"


def test_calibration_summary() -> None:
    p, y = _calibrated(20_000, 5, -3.0, 1.0)
    q, z = _calibrated(40_000, 6, -3.0, 1.0)
    held_out, train = ScoreHistogram.of(p, y), ScoreHistogram.of(q, z)
    summary = calibration_summary(held_out, train)
    assert summary["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-5)
    assert summary["brier"] < summary["brier_reference"]  # better than the base rate alone
    assert summary["psi"] == pytest.approx(psi(train, held_out), abs=1e-6)
    assert summary["psi_verdict"] == "stable"
    assert summary["observed_rate"] == pytest.approx(y.mean())
    assert summary["mean_predicted"] == pytest.approx(p.mean(), abs=1e-4)
    assert len(summary["reliability"]) == 10
    no_train = calibration_summary(held_out)
    assert no_train["psi"] is None and no_train["psi_verdict"] == "not measured"
