"""Feature scaling without pooling raw data.

Each platform sends, over its own training rows, the count and the per-feature sums of x and
x squared; the coordinator adds them and derives the federation-wide mean and standard
deviation. Only sums cross the wire, which is what secure aggregation (a later issue) can
protect: the same three vectors can be masked and summed without changing this module.

The values are log-transformed counts and ratios (see clients/features.py), so float64 sums
of squares over millions of rows lose nothing that matters for standardisation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

MIN_STD = 1e-6


@dataclass(frozen=True)
class FeatureSums:
    """One party's contribution: row count and per-feature sums of x and x**2."""

    n: int
    sums: np.ndarray
    sumsq: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray) -> FeatureSums:
        X = np.asarray(X, dtype=np.float64)
        return cls(int(X.shape[0]), X.sum(axis=0), np.square(X).sum(axis=0))


@dataclass(frozen=True)
class Scaler:
    """Standardisation shared by every party: z = (x - mean) / std."""

    mean: np.ndarray
    std: np.ndarray
    n: int = 0  # training rows the sums came from (sizes the local work per round)

    def transform(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


def combine(parts: Iterable[FeatureSums]) -> Scaler:
    """Federation-wide mean and standard deviation from every party's sums."""
    parts = list(parts)
    if not parts:
        raise ValueError("no feature sums to combine")
    width = {p.sums.shape for p in parts} | {p.sumsq.shape for p in parts}
    if len(width) != 1:
        raise ValueError(f"feature sums of different widths: {sorted(width)}")
    n = sum(p.n for p in parts)
    if n <= 0:
        raise ValueError("no training rows in any party")
    mean = sum(p.sums for p in parts) / n
    var = np.maximum(sum(p.sumsq for p in parts) / n - np.square(mean), 0.0)
    return Scaler(mean, np.maximum(np.sqrt(var), MIN_STD), n)
