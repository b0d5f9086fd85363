"""The ledger schema, as a lending platform would hold its book (see docs/ledger.md).

Money is integer fen (1/100 yuan, or the minor unit of whatever currency ``ledger_meta``
names): balances are summed exactly, and later encrypted as integers. Dates are ISO text.
The CHECK constraints repeat the importer's validation inside the database, so a bug in a
writer cannot store a negative balance or an unknown status code either.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 1

#: PBoC repayment status codes: N on time, 1-7 overdue by that many 30-day buckets,
#: C settled (closed), * no repayment due that month, / not yet opened (no record).
STATUS_CODES = frozenset("N1234567C*/")
PRODUCTS = ("revolving", "cash_loan")

metadata = MetaData()

ledger_meta = Table(
    "ledger_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

borrowers = Table(
    "borrowers",
    metadata,
    Column("token", String(64), primary_key=True, comment="HMAC-SHA256 of the national ID"),
    Column("age", Integer, CheckConstraint("age BETWEEN 16 AND 100"), nullable=True),
    Column("city_tier", Integer, CheckConstraint("city_tier BETWEEN 1 AND 5"), nullable=True),
    Column(
        "income_proxy_fen",
        Integer,
        CheckConstraint("income_proxy_fen >= 0"),
        nullable=True,
        comment="the platform's own estimate of monthly income",
    ),
    Column(
        "applications_3m",
        Integer,
        CheckConstraint("applications_3m >= 0"),
        nullable=True,
        comment="loan applications to this platform in the last 3 months",
    ),
    Column(
        "defaulted",
        Integer,
        CheckConstraint("defaulted IN (0, 1)"),
        nullable=True,
        comment="observed outcome: 90+ days past due within 12 months of as_of; NULL unknown",
    ),
)

borrower_features = Table(
    "borrower_features",
    metadata,
    Column("token", String(64), ForeignKey("borrowers.token"), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("value", Float, nullable=False),
    comment="extra numeric borrower attributes declared by an import mapping",
)

loans = Table(
    "loans",
    metadata,
    Column("loan_id", String(128), primary_key=True),
    Column("token", String(64), ForeignKey("borrowers.token"), nullable=False),
    Column("product", String(32), CheckConstraint(f"product IN {PRODUCTS!r}"), nullable=False),
    Column("open_date", String(10), nullable=True, comment="ISO date; NULL when unknown"),
    Column("credit_limit_fen", Integer, CheckConstraint("credit_limit_fen >= 0"), nullable=True),
    Column("principal_fen", Integer, CheckConstraint("principal_fen >= 0"), nullable=True),
    Column("balance_fen", Integer, CheckConstraint("balance_fen >= 0"), nullable=False),
    Column("term_months", Integer, CheckConstraint("term_months > 0"), nullable=True),
    Column("annual_rate", Float, CheckConstraint("annual_rate BETWEEN 0 AND 1"), nullable=True),
    Column(
        "monthly_repayment_fen",
        Integer,
        CheckConstraint("monthly_repayment_fen >= 0"),
        nullable=True,
    ),
    Column("days_past_due", Integer, CheckConstraint("days_past_due >= 0"), nullable=False),
    Column("max_dpd_12m", Integer, CheckConstraint("max_dpd_12m >= 0"), nullable=False),
    Column(
        "repayment_status",
        String(24),
        nullable=False,
        comment="PBoC status codes, oldest month first; last code C means settled",
    ),
)
loans_token_index = Index("ix_loans_token", loans.c.token)

# The largest table (a row per loan per month): no CHECK constraints here, because they
# cost a third of the write time at millions of rows; writers validate status codes.
repayment_history = Table(
    "repayment_history",
    metadata,
    Column("loan_id", String(128), ForeignKey("loans.loan_id"), primary_key=True),
    Column("month", String(7), primary_key=True, comment="YYYY-MM"),
    Column("status", String(1), nullable=False, comment="one PBoC status code"),
    Column("amount_due_fen", Integer, nullable=True),
    Column("amount_paid_fen", Integer, nullable=True),
    sqlite_with_rowid=False,
)

#: Column orders for positional bulk writes (the tables' own order, defined once above).
BORROWER_COLUMNS = tuple(borrowers.columns.keys())
LOAN_COLUMNS = tuple(loans.columns.keys())
HISTORY_COLUMNS = tuple(repayment_history.columns.keys())

TABLES = (ledger_meta, borrowers, borrower_features, loans, repayment_history)
