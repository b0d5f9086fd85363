"""``fedcredit bench datagen-quality``: does the generated data make the mission visible?

Per platform, a logistic regression on what that platform's own ledger holds (the *baseline*,
measured in the same run) against the same model plus the cross-platform figures the
encrypted debt query will deliver (total debt, number of lenders, active loans), both
against the Bayes bound on the same held-out borrowers. MISSION.md expects about 0.62-0.65
local, about 0.72 with cross-platform totals, about 0.74 Bayes.

The cross-platform figures are read from the truth file here, because this benchmark
measures the *data*; the federation obtains the same figures through the encrypted query.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clients.features import local_features
from clients.ledger.store import open_ledger
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate, seeded_federation_key
from protocols.tokens import write_federation_key

TEST_SHARE = 0.3


def in_test_set(tokens: list[str]) -> np.ndarray:
    """The same borrowers are held out on every platform: a split by token, not by row."""
    return np.array([int(t[:8], 16) % 1000 < TEST_SHARE * 1000 for t in tokens])


def _auc_of_fit(X: np.ndarray, y: np.ndarray, test: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    model.fit(X[~test], y[~test])
    return float(roc_auc_score(y[test], model.predict_proba(X[test])[:, 1]))


def run(borrowers: int, platforms: int, seed: int) -> dict[str, object]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedcredit-quality-") as tmp:
        key_file = Path(tmp) / "federation.key"
        write_federation_key(key_file, seeded_federation_key(seed))  # reproducible split
        summary = generate(
            PopulationConfig(borrowers=borrowers, platforms=platforms, seed=seed),
            Path(tmp),
            key_file=key_file,
        )
        truth = pq.read_table(
            summary.truth, columns=["token", "true_pd", "total_debt_fen", "lenders", "active_loans"]
        ).to_pydict()
        index = {t: i for i, t in enumerate(truth["token"])}
        cols = {k: np.asarray(v) for k, v in truth.items() if k != "token"}
        rows = []
        pooled_local, pooled_cross, pooled_y, pooled_test, pooled_p = [], [], [], [], []
        for p in summary.platforms:
            with open_ledger(p.ledger) as ledger:
                feats = local_features(ledger)
            at = np.array([index[t] for t in feats.tokens])
            income_col = feats.names.index("log_income_proxy")
            log_debt = np.log1p(cols["total_debt_fen"][at] / 100)
            cross = np.column_stack(
                [
                    feats.X,
                    log_debt,
                    cols["lenders"][at],
                    cols["active_loans"][at],
                    log_debt - feats.X[:, income_col],
                ]
            )
            y = feats.y.astype(int)
            test = in_test_set(feats.tokens)
            local_auc = _auc_of_fit(feats.X, y, test)
            cross_auc = _auc_of_fit(cross, y, test)
            bayes = float(roc_auc_score(y[test], cols["true_pd"][at][test]))
            rows.append(
                {
                    "platform": p.name,
                    "kind": p.kind,
                    "borrowers": p.borrowers,
                    "local_auc": round(local_auc, 4),
                    "cross_platform_auc": round(cross_auc, 4),
                    "bayes_auc": round(bayes, 4),
                    "lift": round(cross_auc - local_auc, 4),
                }
            )
            pooled_local.append(feats.X)
            pooled_cross.append(cross)
            pooled_y.append(y)
            pooled_test.append(test)
            pooled_p.append(cols["true_pd"][at])
    X_l, X_c = np.vstack(pooled_local), np.vstack(pooled_cross)
    y_all, test_all, p_all = map(np.concatenate, (pooled_y, pooled_test, pooled_p))
    local_all = _auc_of_fit(X_l, y_all, test_all)
    cross_all = _auc_of_fit(X_c, y_all, test_all)
    bayes_all = float(roc_auc_score(y_all[test_all], p_all[test_all]))
    return {
        "benchmark": "datagen-quality",
        "borrowers": borrowers,
        "platforms": platforms,
        "seed": seed,
        "bayes_auc_expected": round(summary.bayes_auc, 4),
        "per_platform": rows,
        "pooled": {
            "local_auc": round(local_all, 4),
            "cross_platform_auc": round(cross_all, 4),
            "bayes_auc": round(bayes_all, 4),
        },
        "baseline": "local-only logistic regression on each platform's own ledger",
        "ratio_cross_over_local_gini": round((2 * cross_all - 1) / (2 * local_all - 1), 3),
        "share_of_bayes_gini_reached": round((2 * cross_all - 1) / (2 * bayes_all - 1), 3),
        "seconds": round(time.perf_counter() - t0, 2),
    }
