"""The Bayes bound: how well anyone could rank borrowers who knew the true default odds.

No model can beat ranking by the true probability p, so its AUC is the ceiling against which
federated and local models are judged. Two figures:

* ``expected_auc(p)``: the AUC of ranking by p averaged over the label draw, in closed form
  (a ratio of expectations: exact as the population grows, independent of the seed that
  drew the labels):

      E[concordant] / E[positives x negatives]
      = sum_{i != j} p_i (1 - p_j) [p_i > p_j] (+ 1/2 on ties)
        / (sum p)(sum (1 - p)) - sum p (1 - p)

  computed in O(n log n) by sorting p and cumulating (1 - p) over smaller values;
* ``sample_auc(p, y)``: scikit-learn's AUC of p against the labels actually drawn, which
  is what a model evaluated on the same sample should be compared with.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def expected_auc(p: np.ndarray) -> float:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or len(p) < 2:
        raise ValueError("expected_auc needs a 1-d array of at least two probabilities")
    if np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise ValueError("probabilities must lie in [0, 1]")
    values, inverse = np.unique(p, return_inverse=True)
    pos = np.bincount(inverse, weights=p)  # expected positives at each distinct value
    neg = np.bincount(inverse, weights=1 - p)  # expected negatives at each distinct value
    neg_below = np.cumsum(neg) - neg  # negatives strictly below each value
    concordant = np.sum(pos * neg_below)
    # ties (same value, different persons): half credit; remove self-pairs i == j
    same = np.bincount(inverse, weights=p * (1 - p))
    ties = 0.5 * np.sum(pos * neg - same)
    denominator = p.sum() * (1 - p).sum() - np.sum(p * (1 - p))
    if denominator <= 0:
        raise ValueError("expected_auc is undefined when every p is 0 or every p is 1")
    del values
    return float((concordant + ties) / denominator)


def sample_auc(p: np.ndarray, labels: np.ndarray) -> float:
    return float(roc_auc_score(np.asarray(labels, dtype=np.int8), p))
