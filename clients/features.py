"""Per-borrower features that a platform computes from its own ledger, and nothing else.

This is the platform's whole view of a borrower: its own loans, its own repayment record,
its own noisy income estimate, plus any extra numeric attributes an import declared. The
cross-platform figures (total debt, number of lenders) are deliberately absent: they come
only from the encrypted debt query.

Missing values (a platform that does not record the city, an imported ledger without
income) are imputed with a neutral value and flagged by a ``*_missing`` column, so a
federated model can share one feature list across platforms that record different things.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from sqlalchemy import case, func, select

from clients.ledger import schema
from clients.ledger.store import Ledger
from protocols.features import CROSS_PLATFORM_FEATURES

BASE_FEATURES = (
    "log_balance",
    "loans",
    "active_loans",
    "has_revolving",
    "revolving_utilisation",
    "log_credit_limit",
    "mean_annual_rate",
    "log_monthly_repayment",
    "days_past_due",
    "log_max_dpd_12m",
    "overdue_months_12m",
    "months_since_first_open",
    "applications_3m",
    "age",
    "age_missing",
    "city_tier",
    "city_tier_missing",
    "log_income_proxy",
    "income_proxy_missing",
    "log_balance_to_income",
)


@dataclass
class LocalFeatures:
    tokens: list[str]
    names: list[str]
    X: np.ndarray  # (borrowers, features) float64
    y: np.ndarray  # observed default, NaN where unknown


def _months_between(as_of: dt.date, iso: str | None) -> float:
    if not iso:
        return np.nan
    d = dt.date.fromisoformat(iso)
    return (as_of.year - d.year) * 12 + (as_of.month - d.month)


def local_features(ledger: Ledger) -> LocalFeatures:
    """Feature matrix of every borrower in the ledger, in token order."""
    meta = ledger.meta()
    as_of = dt.date.fromisoformat(meta["as_of"]) if "as_of" in meta else dt.date.today()
    b, lo, h = schema.borrowers, schema.loans, schema.repayment_history
    active = case((func.substr(lo.c.repayment_status, -1, 1) == "C", 0), else_=1)
    revolving = case((lo.c.product == "revolving", 1), else_=0)
    loan_q = (
        select(
            lo.c.token,
            func.sum(lo.c.balance_fen),
            func.count(),
            func.sum(active),
            func.max(revolving),
            func.sum(case((lo.c.product == "revolving", lo.c.balance_fen), else_=0)),
            func.sum(func.coalesce(lo.c.credit_limit_fen, 0)),
            func.avg(lo.c.annual_rate),
            func.sum(func.coalesce(lo.c.monthly_repayment_fen, 0)),
            func.max(lo.c.days_past_due),
            func.max(lo.c.max_dpd_12m),
            func.min(lo.c.open_date),
        )
        .group_by(lo.c.token)
        .order_by(lo.c.token)
    )
    overdue_q = (
        select(lo.c.token, func.count())
        .select_from(h.join(lo, h.c.loan_id == lo.c.loan_id))
        .where(h.c.status.in_(list("1234567")))
        .group_by(lo.c.token)
    )
    borrower_q = select(
        b.c.token, b.c.age, b.c.city_tier, b.c.income_proxy_fen, b.c.applications_3m, b.c.defaulted
    ).order_by(b.c.token)
    extra_q = select(
        schema.borrower_features.c.token,
        schema.borrower_features.c.name,
        schema.borrower_features.c.value,
    )
    with ledger.engine.connect() as conn:
        borrowers = conn.execute(borrower_q).all()
        loans = {row[0]: row[1:] for row in conn.execute(loan_q)}
        overdue = dict(conn.execute(overdue_q).all())
        extras: dict[str, dict[str, float]] = {}
        for token, name, value in conn.execute(extra_q):
            extras.setdefault(name, {})[token] = value
    n = len(borrowers)
    tokens = [row[0] for row in borrowers]
    cols: dict[str, np.ndarray] = {name: np.zeros(n) for name in BASE_FEATURES}
    y = np.full(n, np.nan)
    for i, (token, age, tier, income, apps, defaulted) in enumerate(borrowers):
        (bal, count, act, has_rev, rev_bal, limit, rate, monthly, dpd, max_dpd, first_open) = (
            loans.get(token, (0, 0, 0, 0, 0, 0, None, 0, 0, 0, None))
        )
        cols["log_balance"][i] = np.log1p(bal / 100)
        cols["loans"][i] = count
        cols["active_loans"][i] = act
        cols["has_revolving"][i] = has_rev
        cols["revolving_utilisation"][i] = rev_bal / limit if limit else 0.0
        cols["log_credit_limit"][i] = np.log1p(limit / 100)
        cols["mean_annual_rate"][i] = rate if rate is not None else np.nan
        cols["log_monthly_repayment"][i] = np.log1p(monthly / 100)
        cols["days_past_due"][i] = dpd
        cols["log_max_dpd_12m"][i] = np.log1p(max_dpd)
        cols["overdue_months_12m"][i] = overdue.get(token, 0)
        cols["months_since_first_open"][i] = _months_between(as_of, first_open)
        cols["applications_3m"][i] = apps if apps is not None else np.nan
        cols["age"][i] = age if age is not None else np.nan
        cols["city_tier"][i] = tier if tier is not None else np.nan
        cols["log_income_proxy"][i] = np.log1p(income / 100) if income is not None else np.nan
        if defaulted is not None:
            y[i] = defaulted
    cols["log_balance_to_income"] = cols["log_balance"] - cols["log_income_proxy"]
    for name in ("age", "city_tier", "income_proxy"):
        col = "log_income_proxy" if name == "income_proxy" else name
        cols[f"{name}_missing"] = np.isnan(cols[col]).astype(float)
    # Neutral imputation; the *_missing flags carry the fact that a value was absent.
    neutral = {"age": 30.0, "city_tier": 2.5, "log_income_proxy": np.log1p(6_000.0)}
    for name, value in neutral.items():
        cols[name] = np.where(np.isnan(cols[name]), value, cols[name])
    cols["log_balance_to_income"] = cols["log_balance"] - cols["log_income_proxy"]
    for name in ("mean_annual_rate", "months_since_first_open", "applications_3m"):
        cols[name] = np.nan_to_num(cols[name], nan=0.0)
    names = list(BASE_FEATURES)
    for name in sorted(extras):
        values = extras[name]
        raw = np.array([values.get(t, np.nan) for t in tokens], dtype=np.float64)
        missing = np.isnan(raw)
        # An imported feature without a value (an empty or NA cell: no borrower_features
        # row) is missing, not zero: imputed with 0 and flagged, so the model input and the
        # federated scaler's sums stay finite while the model can still tell "0" from
        # "unknown". The flag exists only where something is missing; the federation
        # trains on the features every platform has.
        cols[f"x_{name}"] = np.where(missing, 0.0, raw)
        names.append(f"x_{name}")
        flag = f"x_{name}_missing"
        if missing.any() and f"{name}_missing" not in extras:
            cols[flag] = missing.astype(np.float64)
            names.append(flag)
    X = np.column_stack([cols[c] for c in names]) if n else np.zeros((0, len(names)))
    if not np.isfinite(X).all():
        raise ValueError("non-finite feature value: the scaler must never see NaN or inf")
    return LocalFeatures(tokens, names, X, y)


def with_cross_platform(local: LocalFeatures, totals: np.ndarray) -> LocalFeatures:
    """Local features plus the cross-platform figures delivered by the encrypted query.

    ``totals`` is (borrowers, 3) in ``local.tokens`` order: total outstanding debt in fen
    across every platform, total active loans, number of platforms with an active loan. The
    "other platforms" columns subtract this platform's own share, which it knows anyway; the
    debt-to-income ratio uses the platform's own income estimate (annualised), the standard
    underwriting ratio that no single platform could compute before.
    """
    totals = np.asarray(totals, dtype=np.float64)
    if totals.shape != (len(local.tokens), 3):
        raise ValueError(
            f"cross-platform totals have shape {totals.shape}, expected ({len(local.tokens)}, 3)"
        )
    col = {name: local.X[:, i] for i, name in enumerate(local.names)}
    debt_yuan = totals[:, 0] / 100
    own_debt_yuan = np.expm1(col["log_balance"])
    own_active = (col["active_loans"] > 0).astype(float)
    monthly_income = np.expm1(col["log_income_proxy"])
    extra = {
        "log_total_debt": np.log1p(debt_yuan),
        "total_active_loans": totals[:, 1],
        "lenders": totals[:, 2],
        "log_other_platforms_debt": np.log1p(np.maximum(debt_yuan - own_debt_yuan, 0.0)),
        "other_lenders": np.maximum(totals[:, 2] - own_active, 0.0),
        "log_total_debt_to_income": np.log1p(debt_yuan / np.maximum(12 * monthly_income, 1.0)),
    }
    X = np.column_stack([local.X, *(extra[name] for name in CROSS_PLATFORM_FEATURES)])
    return LocalFeatures(local.tokens, [*local.names, *CROSS_PLATFORM_FEATURES], X, local.y)


def select_columns(feats: LocalFeatures, names: list[str]) -> np.ndarray:
    """The columns ``names`` of ``feats.X``, in that order.

    A platform adds an imported feature's ``x_<name>_missing`` flag only where one of its own
    cells is empty; where another platform has gaps, the federation asks everyone for the
    flag, and a platform without it has nothing missing: its flag column is zeros. Any other
    absent feature is an error.
    """
    index = {n: i for i, n in enumerate(feats.names)}
    absent = [
        n for n in names if n not in index and not (n.endswith("_missing") and n[:-8] in index)
    ]
    if absent:
        raise LookupError(f"features not available on this platform: {', '.join(absent)}")
    out = np.zeros((feats.X.shape[0], len(names)))
    for j, name in enumerate(names):
        if name in index:
            out[:, j] = feats.X[:, index[name]]
    return out
