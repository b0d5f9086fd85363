"""Credit-model metrics that can be computed from sums, so a federation can compute them.

MISSION.md: averaging per-platform AUCs is wrong. A federated AUC or KS must come from
aggregated score histograms: each platform bins its held-out scores separately for
defaulters and non-defaulters; the bins are counts, so the coordinator adds them (today in the
clear, later under secure aggregation) and reads AUC, KS and ROC curves off the sum.

Bins are uniform on the logit scale, because default probabilities crowd into a few percent:
uniform probability bins would put most borrowers into the first handful of bins. With
``BINS = 4000`` over logits in [-12, 12] a bin is 0.006 wide in log-odds; scores tied within
a bin count half, as ties do in the exact AUC, so the histogram AUC differs from the exact
AUC by well under 0.001 on the data sets here (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

BINS = 4000
LOGIT_RANGE = 12.0


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Bin index of each probability score (uniform bins on the clipped logit scale)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    logit = np.clip(np.log(p) - np.log1p(-p), -LOGIT_RANGE, LOGIT_RANGE)
    idx = np.floor((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * BINS).astype(np.int64)
    return np.clip(idx, 0, BINS - 1)


def bin_centres() -> np.ndarray:
    """Probability at the centre of each bin (for plots)."""
    logit = -LOGIT_RANGE + (np.arange(BINS) + 0.5) * (2 * LOGIT_RANGE / BINS)
    return 1.0 / (1.0 + np.exp(-logit))


@dataclass
class ScoreHistogram:
    """Counts of held-out scores per bin, split by the observed label. Addable."""

    positives: np.ndarray  # defaulters, int64 (BINS,)
    negatives: np.ndarray  # non-defaulters, int64 (BINS,)

    @classmethod
    def empty(cls) -> ScoreHistogram:
        return cls(np.zeros(BINS, dtype=np.int64), np.zeros(BINS, dtype=np.int64))

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray) -> ScoreHistogram:
        labels = np.asarray(labels)
        bins = score_bins(scores)
        pos = np.bincount(bins[labels == 1], minlength=BINS).astype(np.int64)
        neg = np.bincount(bins[labels == 0], minlength=BINS).astype(np.int64)
        return cls(pos, neg)

    def __add__(self, other: ScoreHistogram) -> ScoreHistogram:
        return ScoreHistogram(self.positives + other.positives, self.negatives + other.negatives)

    @property
    def count(self) -> int:
        return int(self.positives.sum() + self.negatives.sum())

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(false positive rate, true positive rate), thresholds from high score to low."""
        pos, neg = self.positives[::-1], self.negatives[::-1]
        tpr = np.concatenate([[0.0], np.cumsum(pos) / max(pos.sum(), 1)])
        fpr = np.concatenate([[0.0], np.cumsum(neg) / max(neg.sum(), 1)])
        return fpr, tpr

    def auc(self) -> float:
        """Probability a defaulter scores above a non-defaulter; ties within a bin count half."""
        n_pos, n_neg = self.positives.sum(), self.negatives.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self.negatives) - self.negatives
        wins = (self.positives * neg_below).sum() + 0.5 * (self.positives * self.negatives).sum()
        return float(wins / (n_pos * n_neg))

    def ks(self) -> float:
        fpr, tpr = self.roc()
        return float(np.max(tpr - fpr))

    def summary(self) -> dict[str, float]:
        return {"auc": round(self.auc(), 4), "ks": round(self.ks(), 4), "n": self.count}


def exact_auc_ks(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC and KS from the scores themselves (scikit-learn), where one party holds them all."""
    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        return {"auc": float("nan"), "ks": float("nan"), "n": len(labels)}
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auc": round(float(roc_auc_score(labels, scores)), 4),
        "ks": round(float(np.max(tpr - fpr)), 4),
        "n": len(labels),
    }
