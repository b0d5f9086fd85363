"""How much a platform trains per round: at least a given number of SGD steps.

With FedAvg's usual "one local epoch per round", the work a platform does per round is its
row count divided by the batch size: a platform of 300 training rows with batches of 256
takes a single SGD step a round and, over 20 rounds, hardly moves from its random start
(the German credit data split three ways sat at 0.48 AUC). The bureau therefore asks for a
number of local steps per round (``server/convergence.py`` derives it from the platforms'
sizes) and each platform runs as many whole epochs as reach it: every row is still seen
equally often, and a large platform, whose one epoch already exceeds the target, is
unchanged.
"""

from __future__ import annotations

import math


def local_epochs(epochs: int, local_steps: int, rows: int, batch_size: int) -> int:
    """Epochs to run this round: ``epochs``, or more to make at least ``local_steps`` steps."""
    if rows <= 0 or local_steps <= 0:
        return epochs
    steps_per_epoch = math.ceil(rows / batch_size)
    return max(epochs, math.ceil(local_steps / steps_per_epoch))


# A round of fewer steps than this barely moves a model, however small the data: with 300
# training rows and batches of 256, even a pooled "epoch" is two steps.
MIN_LOCAL_STEPS = 20


def auto_local_steps(train_rows: int, batch_size: int) -> int:
    """Steps per round: one epoch over all ``train_rows`` (the federation's, or the pooled
    yardstick's), and at least ``MIN_LOCAL_STEPS``."""
    return max(MIN_LOCAL_STEPS, math.ceil(max(train_rows, 1) / batch_size))
