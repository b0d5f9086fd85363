"""Validated settings of the synthetic population (the knobs researchers turn)."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PLATFORMS = 50


class PopulationConfig(BaseModel):
    """Every number that shapes the population, with the defaults that MISSION.md implies.

    Defaults are chosen so that, with 3 platforms, a platform's local-only model reaches an
    AUC of about 0.62-0.65, adding cross-platform debt totals about 0.72, and the true
    default probabilities about 0.74 (see docs/datagen.md for the calibration run).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    platforms: int = Field(3, ge=2, le=MAX_PLATFORMS, description="number of lending platforms")
    borrowers: int = Field(100_000, ge=100, le=20_000_000, description="persons in the population")
    seed: int = Field(0, ge=0, description="everything is a deterministic function of the seed")
    as_of: dt.date = Field(dt.date(2026, 6, 30), description="snapshot date of every ledger")
    default_rate: float = Field(
        0.03, gt=0.001, lt=0.5, description="person-level 12-month default rate before any shock"
    )
    # multi-platform borrowing: k = 1 + Poisson(lambda0 * exp(beta z - beta^2 / 2))
    lambda0: float = Field(0.43, gt=0, le=5)
    platform_beta: float = Field(0.60, ge=0, le=3)
    # what drives default (logit scale)
    risk_weight: float = Field(0.40, ge=0, le=5, description="latent risk z")
    debt_weight: float = Field(2.05, ge=0, le=5, description="log1p(4 x total debt / income)")
    platforms_weight: float = Field(0.12, ge=0, le=2, description="per extra platform")
    # optional stresses
    shock: float = Field(0.0, ge=0, le=3, description="macro shock on tier-3/4 and young borrowers")
    fraud_ring: int = Field(0, ge=0, le=100_000, description="members of a bust-out fraud ring")

    @field_validator("as_of")
    @classmethod
    def _not_too_early(cls, value: dt.date) -> dt.date:
        if value.year < 1990:
            raise ValueError("as_of must be in 1990 or later")
        return value
