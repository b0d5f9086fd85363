"""The Bayes bound is computed correctly, and the benchmarks keep their JSON contracts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedcredit.bench import datagen_quality
from fedcredit.datagen.bayes import expected_auc, sample_auc


def brute_force_expected_auc(p: np.ndarray) -> float:
    """The defining double sum over ordered pairs i != j, straight from the docstring."""
    num = den = 0.0
    for i in range(len(p)):
        for j in range(len(p)):
            if i == j:
                continue
            w = p[i] * (1 - p[j])
            den += w
            num += w * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_auc_matches_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    p = np.round(rng.uniform(0, 1, 60), 1)  # rounding makes ties
    assert expected_auc(p) == pytest.approx(brute_force_expected_auc(p), abs=1e-12)


def test_expected_auc_two_point_closed_form():
    # half the people at p=0.1, half at p=0.3 (n=1000); see bayes.py's formula
    p = np.array([0.1] * 500 + [0.3] * 500)
    concordant = 150 * 450
    ties = 0.5 * ((50 * 450 - 500 * 0.09) + (150 * 350 - 500 * 0.21))
    denominator = 200 * 800 - (500 * 0.09 + 500 * 0.21)
    assert expected_auc(p) == pytest.approx((concordant + ties) / denominator, abs=1e-12)


def test_expected_auc_agrees_with_label_draws():
    rng = np.random.default_rng(5)
    p = 1 / (1 + np.exp(-rng.normal(-3, 1, 20_000)))
    draws = [sample_auc(p, rng.random(len(p)) < p) for _ in range(100)]
    assert expected_auc(p) == pytest.approx(np.mean(draws), abs=0.003)


def test_constant_probabilities_give_auc_one_half():
    assert expected_auc(np.full(100, 0.2)) == pytest.approx(0.5)


def test_expected_auc_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_auc(np.array([0.2, 1.5]))
    with pytest.raises(ValueError, match="undefined"):
        expected_auc(np.zeros(10))


def test_bench_datagen_json_contract():
    proc = subprocess.run(
        [sys.executable, "-m", "fedcredit", "bench", "datagen", "--borrowers", "2000", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["borrowers"] == 2000
    for key in ("seconds", "borrowers_per_s", "peak_rss_mb", "baseline_seconds"):
        assert isinstance(result[key], float) and result[key] > 0
    assert result["ratio_vs_sqlite_floor"] == pytest.approx(
        result["seconds"] / result["baseline_seconds"], rel=0.01
    )


def test_cross_platform_totals_carry_risk_no_platform_sees():
    """The mission made visible: local-only models are clearly beaten by adding the totals."""
    result = datagen_quality.run(borrowers=40_000, platforms=3, seed=4)
    pooled = result["pooled"]
    assert pooled["cross_platform_auc"] > pooled["local_auc"] + 0.04
    assert pooled["bayes_auc"] > pooled["cross_platform_auc"]
    assert 0.60 <= pooled["local_auc"] <= 0.69
    for row in result["per_platform"]:
        assert row["lift"] > 0.02
