"""Which borrowers are held out for testing: one rule that every party applies on its own.

The split is by token, not by row: a person who borrows on three platforms is held out on all
three, so no model (federated, centralised or local) ever trains on a held-out person's row at
another platform. Tokens are HMAC outputs, so their leading bits are uniform and carry no
information about the person; every platform computes the same split without talking to
anyone, and the bureau needs no list of held-out people.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLIT_MODULUS = 10_000


def in_test_set(tokens: Sequence[str], test_share: float) -> np.ndarray:
    """Boolean mask: True for tokens whose person is held out."""
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test share must be strictly between 0 and 1, got {test_share}")
    cut = round(test_share * SPLIT_MODULUS)
    return np.fromiter(
        (int(t[:8], 16) % SPLIT_MODULUS < cut for t in tokens), dtype=bool, count=len(tokens)
    )


def in_validation_set(tokens: Sequence[str], validation_share: float) -> np.ndarray:
    """Boolean mask: True for tokens whose person is kept for validation (early stopping).

    Read off the token's second 8 hex digits, independent of the first 8 that pick the test
    set, so the validation people are a uniform share of every split and the test people
    never decide when training stops. Callers exclude the test set themselves. A share of 0
    keeps nobody (no early stopping).
    """
    if not 0.0 <= validation_share < 1.0:
        raise ValueError(f"validation share must be in [0, 1), got {validation_share}")
    cut = round(validation_share * SPLIT_MODULUS)
    return np.fromiter(
        (int(t[8:16], 16) % SPLIT_MODULUS < cut for t in tokens), dtype=bool, count=len(tokens)
    )
