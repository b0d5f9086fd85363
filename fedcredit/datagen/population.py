"""The synthetic world: persons, their platforms, their loans, and who defaults.

Every array is drawn in one vectorised pass from one ``numpy.random.Generator`` seeded by
the config, so a seed fixes the population bit for bit. Three levels:

* persons (N): city tier, age, income, latent risk ``z`` shared by every platform, the
  number of platforms ``k`` (1 + Poisson with a rate rising in ``z``);
* pairs (M = sum k): a person on one platform, with what that platform records about
  them (a noisy income proxy, recent applications);
* loans (L): 1 + Poisson repeat loans per pair (independent of risk: repeat borrowing on
  one platform does not predict default), products, limits, balances, rates, terms and
  12 months of PBoC repayment status.

Default within 12 months is drawn from a logistic law driven by ``z`` and by total debt
across all platforms relative to income: the figure no single platform can see.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.platforms import Platform, choose_platforms, make_platforms

HISTORY_MONTHS = 12
TIER_SHARES = np.array([0.12, 0.28, 0.32, 0.28])  # tiers 1..4
MEDIAN_INCOME_BY_TIER = np.array([11_000.0, 7_500.0, 5_500.0, 4_200.0])  # RMB per month
TERMS = np.array([3, 6, 12])
TERM_SHARES = np.array([0.2, 0.3, 0.5])
SETTLED_SHARE = 0.2  # share of cash loans already repaid within the history window
# how strongly what one platform sees of a borrower (delinquency, utilisation, its own
# pricing, applications) reflects the latent risk z; calibrated, see docs/datagen.md
LOCAL_SIGNAL = 0.35
# status code bytes: index 0 = N, 1..7 = overdue buckets
_CODE = np.frombuffer(b"N1234567", dtype=np.uint8)
_NOT_OPEN, _SETTLED = ord("/"), ord("C")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Persons:
    tier: np.ndarray
    age: np.ndarray
    income: np.ndarray  # true monthly income, yuan
    z: np.ndarray  # latent risk
    k: np.ndarray  # number of platforms
    fraud: np.ndarray  # member of the fraud ring

    def __len__(self) -> int:
        return len(self.z)


@dataclass
class Pairs:
    person: np.ndarray
    platform: np.ndarray
    income_proxy: np.ndarray  # yuan; NaN where the platform does not ask
    applications_3m: np.ndarray


@dataclass
class Loans:
    pair: np.ndarray
    person: np.ndarray
    platform: np.ndarray
    revolving: np.ndarray
    months_open: np.ndarray  # months between opening and as_of
    open_day: np.ndarray
    credit_limit: np.ndarray  # yuan, NaN for cash loans
    principal: np.ndarray  # yuan, NaN for revolving
    balance_fen: np.ndarray
    term: np.ndarray  # 0 for revolving
    apr: np.ndarray
    monthly_fen: np.ndarray
    status: np.ndarray  # (L, 12) uint8 status codes, oldest month first
    dpd: np.ndarray
    max_dpd: np.ndarray
    settled: np.ndarray


@dataclass
class Outcome:
    true_pd: np.ndarray
    defaulted: np.ndarray
    total_debt_fen: np.ndarray
    loans: np.ndarray
    active_loans: np.ndarray
    intercept: float


@dataclass
class World:
    config: PopulationConfig
    platforms: list[Platform]
    persons: Persons
    pairs: Pairs
    loans: Loans
    outcome: Outcome


def draw_persons(rng: np.random.Generator, cfg: PopulationConfig) -> Persons:
    n, ring = cfg.borrowers, cfg.fraud_ring
    total = n + ring
    tier = rng.choice(np.arange(1, 5), size=total, p=TIER_SHARES)
    age = np.clip(18 + rng.gamma(3.0, 4.5, size=total), 18, 70).astype(np.int64)
    z = rng.standard_normal(total)
    log_income = (
        np.log(MEDIAN_INCOME_BY_TIER[tier - 1])
        + 0.25 * np.minimum(age - 18, 20) / 20
        - 0.10 * z
        + rng.normal(0.0, 0.55, size=total)
    )
    income = np.exp(log_income)
    beta = cfg.platform_beta
    rate = cfg.lambda0 * np.exp(beta * z - beta**2 / 2)
    k = np.minimum(1 + rng.poisson(rate), cfg.platforms)
    fraud = np.zeros(total, dtype=bool)
    if ring:
        # A bust-out ring: synthetic identities with plausible incomes that borrow from
        # (nearly) every platform at once and then stop paying.
        fraud[n:] = True
        k[n:] = np.maximum(cfg.platforms - rng.integers(0, 2, size=ring), min(2, cfg.platforms))
        z[n:] = rng.normal(0.0, 0.3, size=ring)  # they look average to any one platform
    return Persons(tier, age, income, z, k, fraud)


def draw_pairs(rng: np.random.Generator, persons: Persons, platforms: list[Platform]) -> Pairs:
    person, platform = choose_platforms(rng, persons.z, persons.k, platforms)
    order = np.lexsort((person, platform))  # group by platform, persons in order
    person, platform = person[order], platform[order]
    noise = np.array([p.archetype.income_noise or np.nan for p in platforms])[platform]
    proxy = persons.income[person] * np.exp(rng.standard_normal(len(person)) * np.nan_to_num(noise))
    fraud = persons.fraud[person]
    proxy[fraud] *= 2.0  # the ring claims high incomes
    proxy = np.where(np.isnan(noise), np.nan, np.round(proxy, -2))
    apps_rate = 0.25 * np.exp(LOCAL_SIGNAL * persons.z[person] + 0.2 * (persons.k[person] - 1))
    apps_rate[fraud] = 2.5
    applications = rng.poisson(apps_rate)
    return Pairs(person, platform, proxy, applications)


def draw_loans(
    rng: np.random.Generator,
    cfg: PopulationConfig,
    persons: Persons,
    pairs: Pairs,
    platforms: list[Platform],
) -> Loans:
    n_loans = np.minimum(1 + rng.poisson(0.3, size=len(pairs.person)), 6)
    pair = np.repeat(np.arange(len(pairs.person)), n_loans)
    person, platform = pairs.person[pair], pairs.platform[pair]
    L = len(pair)
    z, income, fraud = persons.z[person], persons.income[person], persons.fraud[person]

    # Repeat borrowing on one platform is mostly a customer who repaid and came back: the
    # earlier loans of a pair are settled cash loans, so they add no debt and no risk.
    first_of_pair = np.ones(L, dtype=bool)
    first_of_pair[1:] = pair[1:] != pair[:-1]
    rev_share = np.array([p.archetype.revolving_share for p in platforms])[platform]
    revolving = (rng.random(L) < rev_share) & first_of_pair
    cash = ~revolving

    # Revolving lines (Huabei/Baitiao-like): RMB 500-50,000, utilisation rising with risk.
    limit = np.clip(
        np.round(income * rng.uniform(0.6, 3.0, L) * np.exp(-0.15 * z), -2), 500, 50_000
    )
    in_use = rng.random(L) > 0.15
    util = sigmoid(-0.7 + LOCAL_SIGNAL * z + 0.9 * rng.standard_normal(L)) * in_use
    rev_balance = limit * util

    # Cash loans (Jiebei/Weilidai-like): RMB 1,000-300,000, mean about 8,200, 3/6/12 months.
    log_p = np.log(6_000) + 0.4 * np.log(income / 6_000) + 0.25 * z + 0.8 * rng.standard_normal(L)
    principal = np.clip(np.round(np.exp(log_p), -2), 1_000, 300_000)
    term = rng.choice(TERMS, size=L, p=TERM_SHARES)
    settled = cash & ((rng.random(L) < SETTLED_SHARE) | ~first_of_pair) & ~fraud

    # Risk-based pricing inside each platform's band, from the platform's own noisy view.
    lo = np.array([p.archetype.apr_low for p in platforms])[platform]
    hi = np.array([p.archetype.apr_high for p in platforms])[platform]
    apr = np.round(lo + (hi - lo) * sigmoid(LOCAL_SIGNAL * z + 0.8 * rng.standard_normal(L)), 4)
    r = apr / 12
    annuity = principal * r / (1 - (1 + r) ** -term)

    months_open = np.where(
        revolving,
        rng.integers(1, 49, size=L),
        np.where(settled, term + rng.integers(0, 9, size=L), rng.integers(0, 12, size=L) % term),
    )
    months_open[fraud] = rng.integers(0, 2, size=int(fraud.sum()))
    open_day = rng.integers(1, 29, size=L)

    # Debt before delinquency, to drive the delinquency hazard.
    scheduled = np.where(revolving, rev_balance, _remaining(principal, r, term, months_open))
    scheduled = np.where(settled, 0.0, scheduled)
    debt_person = np.bincount(person, weights=scheduled, minlength=len(persons))
    dti = debt_person / (12 * persons.income)

    status, dpd, max_dpd, missed = _delinquency(rng, z, dti[person], months_open, settled, term)
    status[fraud] = np.where(status[fraud] == _NOT_OPEN, _NOT_OPEN, ord("N"))
    dpd[fraud] = max_dpd[fraud] = 0
    missed[fraud] = 0

    paid = np.clip(months_open - missed, 0, None)
    cash_balance = _remaining(principal, r, term, np.minimum(paid, term))
    balance = np.where(revolving, rev_balance, np.where(settled, 0.0, cash_balance))
    balance_fen = np.round(balance * 100).astype(np.int64)
    # the contractual instalment (kept on settled loans: their history shows what was due);
    # revolving lines owe a 10 % minimum payment
    monthly = np.where(revolving, np.ceil(0.1 * balance), annuity)
    monthly_fen = np.round(monthly * 100).astype(np.int64)
    return Loans(
        pair=pair,
        person=person,
        platform=platform,
        revolving=revolving,
        months_open=months_open,
        open_day=open_day,
        credit_limit=np.where(revolving, limit, np.nan),
        principal=np.where(cash, principal, np.nan),
        balance_fen=balance_fen,
        term=np.where(revolving, 0, term),
        apr=apr,
        monthly_fen=monthly_fen,
        status=status,
        dpd=dpd,
        max_dpd=max_dpd,
        settled=settled,
    )


def _remaining(
    principal: np.ndarray, r: np.ndarray, term: np.ndarray, paid: np.ndarray
) -> np.ndarray:
    """Outstanding principal of an equal-instalment loan after ``paid`` instalments."""
    growth = (1 + r) ** paid
    annuity = principal * r / (1 - (1 + r) ** -term)
    return np.clip(principal * growth - annuity * (growth - 1) / r, 0, None)


def _delinquency(
    rng: np.random.Generator,
    z: np.ndarray,
    dti: np.ndarray,
    months_open: np.ndarray,
    settled: np.ndarray,
    term: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """12 months of PBoC status per loan: missed payments push a loan up one bucket.

    A loan that is behind misses again far more often (roll rates), and pays up (cures)
    otherwise. Returns (status codes, current DPD, max DPD over 12 months, months missed).
    """
    L = len(z)
    hazard = sigmoid(-4.6 + LOCAL_SIGNAL * z + 0.6 * np.log1p(4 * dti))
    start = HISTORY_MONTHS - 1 - np.minimum(months_open, HISTORY_MONTHS - 1)
    start = np.where(months_open >= HISTORY_MONTHS, 0, start)
    end = np.where(settled, HISTORY_MONTHS - 1 - (months_open - term), HISTORY_MONTHS)
    days_in_bucket = rng.integers(1, 31, size=L)
    status = np.full((L, HISTORY_MONTHS), _NOT_OPEN, dtype=np.uint8)
    bucket = np.zeros(L, dtype=np.int64)
    missed = np.zeros(L, dtype=np.int64)
    max_dpd = np.zeros(L, dtype=np.int64)
    for t in range(HISTORY_MONTHS):
        open_now = (t >= start) & (t < end)
        p_miss = np.where(bucket > 0, 0.55, hazard)
        miss = open_now & (rng.random(L) < p_miss)
        bucket = np.where(open_now, np.where(miss, np.minimum(bucket + 1, 7), 0), bucket)
        missed += miss
        month_dpd = np.where(bucket > 0, 30 * (bucket - 1) + days_in_bucket, 0)
        max_dpd = np.maximum(max_dpd, np.where(open_now, month_dpd, 0))
        status[:, t] = np.where(open_now, _CODE[bucket], np.where(t >= end, _SETTLED, _NOT_OPEN))
    bucket = np.where(settled, 0, bucket)
    dpd = np.where(bucket > 0, 30 * (bucket - 1) + days_in_bucket, 0)
    return status, dpd, max_dpd, missed


def default_logit(cfg: PopulationConfig, persons: Persons, total_debt: np.ndarray) -> np.ndarray:
    """Everything but the intercept: the generator's law of default."""
    dti = total_debt / (12 * persons.income)
    logit = (
        cfg.risk_weight * persons.z
        + cfg.debt_weight * np.log1p(4 * dti)
        + cfg.platforms_weight * (persons.k - 1)
        - 0.012 * (persons.age - 30)
        + 0.08 * (persons.tier - 2)
    )
    return logit


def shock_term(cfg: PopulationConfig, persons: Persons) -> np.ndarray:
    """A macro shock (2020-style) that hits lower-tier cities and young borrowers hardest."""
    weight = (0.5 + 0.5 * (persons.tier >= 3)) * (1 + 0.5 * (persons.age < 30))
    return cfg.shock * weight


def solve_intercept(logit: np.ndarray, target: float) -> float:
    """Intercept whose mean default probability equals the target (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if sigmoid(logit + mid).mean() < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def draw_outcome(
    rng: np.random.Generator, cfg: PopulationConfig, persons: Persons, loans: Loans
) -> Outcome:
    n = len(persons)
    total_debt_fen = np.bincount(loans.person, weights=loans.balance_fen, minlength=n).astype(
        np.int64
    )
    n_loans = np.bincount(loans.person, minlength=n)
    active = np.bincount(loans.person, weights=~loans.settled, minlength=n).astype(np.int64)
    logit = default_logit(cfg, persons, total_debt_fen / 100)
    genuine = ~persons.fraud
    intercept = solve_intercept(logit[genuine], cfg.default_rate)
    true_pd = sigmoid(logit + intercept + shock_term(cfg, persons))
    true_pd[persons.fraud] = 0.85
    defaulted = rng.random(n) < true_pd
    return Outcome(true_pd, defaulted, total_debt_fen, n_loans, active, intercept)


def generate_world(cfg: PopulationConfig) -> World:
    rng = np.random.default_rng(cfg.seed)
    platforms = make_platforms(cfg.platforms)
    persons = draw_persons(rng, cfg)
    pairs = draw_pairs(rng, persons, platforms)
    loans = draw_loans(rng, cfg, persons, pairs, platforms)
    outcome = draw_outcome(rng, cfg, persons, loans)
    return World(cfg, platforms, persons, pairs, loans, outcome)


def open_dates(as_of: dt.date, months_open: np.ndarray, day: np.ndarray) -> np.ndarray:
    """ISO open dates ``months_open`` months before as_of (object array of str)."""
    base = as_of.year * 12 + as_of.month - 1 - months_open
    years, months = base // 12, base % 12 + 1
    day = np.where((months_open == 0) & (day > as_of.day), as_of.day, day)
    return np.array(
        [
            f"{y:04d}-{m:02d}-{d:02d}"
            for y, m, d in zip(years.tolist(), months.tolist(), day.tolist(), strict=True)
        ],
        dtype=object,
    )
