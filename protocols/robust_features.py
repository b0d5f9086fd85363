"""Robust feature transforms fitted from summed histograms, never from pooled rows.

Real credit data has money columns with heavy tails (a few balances a hundred times the
median), outliers and missing cells. Standardising such a column by its mean and standard
deviation squeezes almost every borrower into a sliver around zero while a handful of rows
dominate the gradient. The transform here, per feature:

1. centre on the median and divide by a robust spread (the inter-quartile range / 1.349,
   which is the standard deviation for normal data; the standard deviation where the IQR
   is zero, as for mostly-zero counts);
2. where the tail is heavy (the 0.1 % or 99.9 % quantile lies more than ``HEAVY_TAIL``
   robust spreads from the median: 3.1 for normal data, 7.6 for an exponential one), a
   signed log, ``sign(u) log(1 + |u|)``: the money transform, applied to whichever column
   needs it, imported or not, and computed without knowing the column's unit;
3. clip (winsorise) to the 0.1 % and 99.9 % quantiles, widened by one spread so that a rare
   but real value (a 0/1 flag set for 0.05 % of borrowers) stays distinct from the bulk;
4. rows whose ``<feature>_missing`` flag is set take the centre (the feature's neutral
   value), so the imputed placeholder never acts as an outlier; the flag itself carries the
   fact that the value was absent.

Every quantile comes from per-feature histograms that the platforms sum (``sketch``): bins
are fixed in advance from the federated mean and standard deviation (``edges``), asinh-
spaced so that they are fine near the centre and still cover a tail thousands of standard
deviations out. A histogram is a vector of counts, so it can be added up under secure
aggregation like every other training sum; the transform's parameters are then public to
the federation, like the scaler's mean and standard deviation.

The pooled yardstick fits the same transform from the histogram of its pooled rows, which
is the sum of the platforms' histograms: federated and pooled models see identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BINS = 400
SPAN = float(np.arcsinh(1e4))  # bins cover +-10,000 standard deviations
HEAVY_TAIL = 6.0
FEW_VALUES = 16  # occupied bins at most: a discrete column, never log-transformed
TAIL_QUANTILE = 0.001
MIN_SPREAD = 1e-6
UNBOUNDED = 1e12  # "no clipping", finite so the bounds travel as JSON


def missing_flag(name: str) -> str:
    """The indicator column that says ``name`` was absent (``clients/features.py``)."""
    if name == "log_income_proxy":
        return "income_proxy_missing"
    return f"{name}_missing"


def flag_columns(names: Sequence[str]) -> list[int]:
    """For each feature, the index of its missing flag among ``names``, or -1."""
    index = {n: i for i, n in enumerate(names)}
    return [index.get(missing_flag(n), -1) for n in names]


def edges() -> np.ndarray:
    """Bin edges on the standardised scale z = (x - mean) / std, asinh-spaced."""
    return np.sinh(np.linspace(-SPAN, SPAN, BINS + 1))


def sketch(X: np.ndarray, mean: np.ndarray, std: np.ndarray, flags: Sequence[int]) -> np.ndarray:
    """(features, BINS) counts of one party's rows; a feature's flagged rows are left out.

    Values beyond the outer edges fall in the outer bins, so every observed row is counted.
    """
    X = np.asarray(X, dtype=np.float64)
    z = (X - np.asarray(mean)) / np.asarray(std)
    grid = edges()
    out = np.zeros((X.shape[1], BINS), dtype=np.int64)
    for j in range(X.shape[1]):
        values = z[:, j]
        if flags[j] >= 0:
            values = values[X[:, flags[j]] < 0.5]
        idx = np.clip(np.searchsorted(grid, values, side="right") - 1, 0, BINS - 1)
        out[j] = np.bincount(idx, minlength=BINS)
    return out


def _quantiles(counts: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles on the asinh(z) scale, linear within a bin; NaN for an empty histogram."""
    total = counts.sum()
    if total <= 0:
        return np.full(len(qs), np.nan)
    cdf = np.concatenate([[0.0], np.cumsum(counts) / total])
    grid = np.linspace(-SPAN, SPAN, BINS + 1)
    # The bin where the cdf reaches q (cdf[i] < q <= cdf[i + 1]), never an empty one.
    i = np.clip(np.searchsorted(cdf, qs, side="left") - 1, 0, BINS - 1)
    frac = (np.asarray(qs) - cdf[i]) / np.maximum(cdf[i + 1] - cdf[i], 1e-300)
    return grid[i] + np.clip(frac, 0.0, 1.0) * (grid[i + 1] - grid[i])


@dataclass(frozen=True)
class RobustTransform:
    """Per-feature centre, spread, log flag and clip bounds, plus missing-flag columns."""

    center: np.ndarray
    scale: np.ndarray
    log: np.ndarray  # bool
    lo: np.ndarray
    hi: np.ndarray
    flags: list[int]

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        u = (X - self.center) / self.scale
        u = np.where(self.log, np.sign(u) * np.log1p(np.abs(u)), u)
        u = np.clip(u, self.lo, self.hi)
        for j, k in enumerate(self.flags):
            if k >= 0:
                u[:, j] = np.where(X[:, k] >= 0.5, 0.0, u[:, j])
        return u

    def to_dict(self) -> dict[str, list[float] | list[bool] | list[int]]:
        return {
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "log": [bool(v) for v in self.log],
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "flags": list(self.flags),
        }

    @classmethod
    def from_dict(cls, spec: dict[str, list]) -> RobustTransform:  # type: ignore[type-arg]
        return cls(
            center=np.asarray(spec["center"], dtype=np.float64),
            scale=np.asarray(spec["scale"], dtype=np.float64),
            log=np.asarray(spec["log"], dtype=bool),
            lo=np.asarray(spec["lo"], dtype=np.float64),
            hi=np.asarray(spec["hi"], dtype=np.float64),
            flags=[int(k) for k in spec["flags"]],
        )

    def describe(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Which features were log-transformed: for the run summary."""
        return {"log_transformed": [n for n, flag in zip(names, self.log, strict=True) if flag]}


def fit(
    counts: np.ndarray, mean: np.ndarray, std: np.ndarray, names: Sequence[str]
) -> RobustTransform:
    """The transform from summed histograms (``sketch`` added over parties)."""
    counts = np.asarray(counts)
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    width = len(names)
    if counts.shape != (width, BINS):
        raise ValueError(f"histograms of shape {counts.shape}, expected ({width}, {BINS})")
    if (counts < 0).any():
        raise ValueError("negative histogram counts")
    center, scale = np.zeros(width), np.ones(width)
    log, lo, hi = np.zeros(width, dtype=bool), np.zeros(width), np.zeros(width)
    for j in range(width):
        q = _quantiles(counts[j], [TAIL_QUANTILE, 0.25, 0.5, 0.75, 1 - TAIL_QUANTILE])
        if np.isnan(q).any():  # nothing observed: leave the column as it is, centred at 0
            center[j], scale[j], lo[j], hi[j] = 0.0, 1.0, -UNBOUNDED, UNBOUNDED
            continue
        x = mean[j] + std[j] * np.sinh(q)  # back to the feature's own units
        center[j] = x[2]
        # Quantiles are interpolated within a bin, so a point mass (a 0 that half the rows
        # hold) looks spread over one bin: an IQR narrower than two bins is no spread at all.
        half = SPAN / BINS
        bin_width = std[j] * (np.sinh(q[2] + half) - np.sinh(q[2] - half))
        iqr = x[3] - x[1]
        scale[j] = max(iqr / 1.349 if iqr > 2 * bin_width else std[j], MIN_SPREAD)
        tail = (x[[0, 4]] - center[j]) / scale[j]
        # A log is for continuous magnitudes; a column with a handful of values (a flag, a
        # count of loans) keeps its spacing.
        many_values = int((counts[j] > 0).sum()) > FEW_VALUES
        log[j] = bool(many_values and np.abs(tail).max() > HEAVY_TAIL)
        if log[j]:
            tail = np.sign(tail) * np.log1p(np.abs(tail))
        lo[j], hi[j] = min(tail[0], 0.0) - 1.0, max(tail[1], 0.0) + 1.0
    return RobustTransform(center, scale, log, lo, hi, flag_columns(names))


def fit_pooled(
    X: np.ndarray, mean: np.ndarray, std: np.ndarray, names: Sequence[str]
) -> RobustTransform:
    """The same transform from one party's rows (the pooled yardstick)."""
    flags = flag_columns(names)
    return fit(sketch(X, mean, std, flags), mean, std, names)
