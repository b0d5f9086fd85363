"""Platform archetypes: why the platforms are non-IID.

Platforms differ in size, in product mix (revolving credit vs cash loans), in pricing, in
which borrowers they attract (subprime lenders draw riskier people) and in what they know
about a borrower (some never ask for income, one does not record the city). The first three
archetypes are the three a default federation of 3 gets, so even the smallest federation
shows every kind of heterogeneity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Archetype:
    kind: str
    revolving_share: float  # share of its loans that are revolving credit lines
    apr_low: float  # annual rate range of its pricing
    apr_high: float
    risk_tilt: float  # log-weight per unit latent risk when borrowers choose platforms
    size: float  # relative size before the Zipf decay
    income_noise: float | None  # sigma of its log income proxy; None: it does not ask
    sees_city: bool


ARCHETYPES = (
    Archetype("super-app revolving", 0.85, 0.073, 0.15, 0.0, 1.0, 0.35, True),
    Archetype("bank-backed cash loans", 0.10, 0.073, 0.1825, -0.25, 0.8, 0.45, True),
    Archetype("subprime cash lender", 0.0, 0.24, 0.36, 0.7, 0.45, 0.60, False),
    Archetype("e-commerce credit", 0.75, 0.073, 0.1825, 0.1, 0.7, None, True),
)


@dataclass(frozen=True)
class Platform:
    index: int
    name: str
    archetype: Archetype
    weight: float


def platform_name(index: int) -> str:
    return f"platform-{index + 1:02d}"


def make_platforms(count: int) -> list[Platform]:
    """Deterministic platform profiles: archetypes cycle, sizes decay like a Zipf law."""
    platforms = []
    for i in range(count):
        archetype = ARCHETYPES[i % len(ARCHETYPES)]
        weight = archetype.size / (1 + i // len(ARCHETYPES)) ** 0.7
        platforms.append(Platform(i, platform_name(i), archetype, weight))
    return platforms


def choose_platforms(
    rng: np.random.Generator, z: np.ndarray, k: np.ndarray, platforms: list[Platform]
) -> tuple[np.ndarray, np.ndarray]:
    """Pick k distinct platforms per person, weighted by size and risk appetite.

    Gumbel-top-k: adding Gumbel noise to log-weights and keeping the k largest draws k
    items without replacement with the right probabilities, in one vectorised pass.
    Returns (person index, platform index) of every borrower-platform pair.
    """
    log_w = np.log(np.array([p.weight for p in platforms], dtype=np.float64))
    tilt = np.array([p.archetype.risk_tilt for p in platforms], dtype=np.float64)
    persons, platform_idx = [], []
    chunk = max(1, 4_000_000 // len(platforms))
    for start in range(0, len(z), chunk):
        zc, kc = z[start : start + chunk], k[start : start + chunk]
        keys = (
            log_w[None, :]
            + tilt[None, :] * zc[:, None]
            + rng.gumbel(size=(len(zc), len(platforms)))
        )
        order = np.argsort(-keys, axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(len(platforms))[None, :], axis=1)
        rows, cols = np.nonzero(rank < kc[:, None])
        persons.append(rows + start)
        platform_idx.append(cols)
    return np.concatenate(persons), np.concatenate(platform_idx)
