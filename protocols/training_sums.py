"""The named sums training needs, their shapes and public bounds, shared by both sides.

The coordinator builds a ``SecureSumSpec`` from these fields; a platform fills the same names
from its own training or evaluation and masks them (``protocols.secure_sum``). Bounds are on
one platform's entry, chosen for ledgers of up to ``2**24`` (16.7 million) training rows:

==================  =========  ============================================================
field               bound      why
==================  =========  ============================================================
``n``               2**40      row count (integer, exact)
``loss``            2**44      mean loss times rows
``w:<name>``        2**44      rows times one model weight: weights up to 2**20 in size
``sums``            2**50      per-feature sum of x (two limbs: 32 more fraction bits)
``sumsq``           2**56      per-feature sum of x squared (two limbs)
``hist-*``          2**40      score histogram counts (integer, exact)
==================  =========  ============================================================

With P platforms a field with bound ``2**b`` keeps ``62 - b - ceil(log2 P)`` fraction bits:
for 3 platforms a FedAvg numerator entry is exact to ``3 * 2**-17`` (about 2.3e-5) before it
is divided by the total row count, so the averaged weights differ from plain FedAvg by less
than ``2.3e-5 / N``. A platform whose value exceeds a bound refuses (the error names the
field) rather than clipping.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocols.metrics import BINS
from protocols.secure_sum import SumField

COUNT_BITS = 40
LOSS_BITS = 44
WEIGHT_BITS = 44
SUM_BITS = 50
SUMSQ_BITS = 56
WEIGHT_PREFIX = "w:"
HISTOGRAMS = ("hist-pos", "hist-neg", "train-hist-pos", "train-hist-neg")


def feature_stats_fields(features: int) -> list[SumField]:
    return [
        SumField(name="n", shape=(), bound_bits=COUNT_BITS, integer=True),
        SumField(name="sums", shape=(features,), bound_bits=SUM_BITS, limbs=2),
        SumField(name="sumsq", shape=(features,), bound_bits=SUMSQ_BITS, limbs=2),
    ]


def train_fields(shapes: Mapping[str, tuple[int, ...]]) -> list[SumField]:
    """FedAvg's numerator per weight array, its denominator and the summed training loss."""
    return [
        SumField(name="n", shape=(), bound_bits=COUNT_BITS, integer=True),
        SumField(name="loss", shape=(), bound_bits=LOSS_BITS),
        *(
            SumField(name=WEIGHT_PREFIX + key, shape=tuple(shape), bound_bits=WEIGHT_BITS)
            for key, shape in shapes.items()
        ),
    ]


def train_values(arrays: Mapping[str, np.ndarray], n: int, loss: float) -> dict[str, np.ndarray]:
    """One platform's FedAvg contribution: ``n * weights``, ``n`` and ``n * loss``."""
    out = {
        "n": np.asarray(float(n)),
        "loss": np.asarray(float(loss) * n),
    }
    for key, value in arrays.items():
        out[WEIGHT_PREFIX + key] = np.asarray(value, dtype=np.float64) * n
    return out


def evaluate_fields() -> list[SumField]:
    return [
        SumField(name="n", shape=(), bound_bits=COUNT_BITS, integer=True),
        SumField(name="loss", shape=(), bound_bits=LOSS_BITS),
        *(
            SumField(name=name, shape=(BINS,), bound_bits=COUNT_BITS, integer=True)
            for name in HISTOGRAMS
        ),
    ]
