"""Synthetic national IDs, only ever held in memory long enough to be hashed into tokens.

Real-looking IDs (region code of the person's city tier, birth date consistent with the
age, sequence number, GB 11643 check digit) make the generated data exercise the same
normalisation and hashing path that a platform's real import does.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from protocols.tokens import tokens_for_normalised

# Region codes (district level) of cities by tier: tier 1 Beijing/Shanghai/Guangzhou/
# Shenzhen, tier 2 provincial capitals, tiers 3-4 prefecture-level cities.
REGIONS_BY_TIER = {
    1: (110101, 310101, 440106, 440305),
    2: (330106, 320102, 510104, 420102, 610103, 370102),
    3: (130102, 350203, 450103, 530102, 360102, 220102),
    4: (411302, 431102, 522601, 341502, 622901, 513401),
}
_WEIGHTS = np.array([7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2], dtype=np.int64)
_CHECK = np.frombuffer(b"10X98765432", dtype=np.uint8)


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) matrix of the decimal digits of non-negative integers."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers[None, :]) % 10


def national_ids(
    rng: np.random.Generator, tier: np.ndarray, age: np.ndarray, as_of: dt.date
) -> np.ndarray:
    """Unique, valid 18-character IDs (numpy bytes array, dtype S18)."""
    n = len(tier)
    region = np.empty(n, dtype=np.int64)
    for t, codes in REGIONS_BY_TIER.items():
        mask = tier == t
        region[mask] = rng.choice(np.array(codes), size=int(mask.sum()))
    days_old = (age * 365.25 + rng.integers(0, 365, size=n)).astype("timedelta64[D]")
    birth = np.datetime64(as_of, "D") - days_old
    years = birth.astype("datetime64[Y]").astype(np.int64) + 1970
    months = birth.astype("datetime64[M]").astype(np.int64) % 12 + 1
    days = (birth - birth.astype("datetime64[M]").astype("datetime64[D]")).astype(np.int64) + 1
    date_num = years * 10_000 + months * 100 + days
    seq = rng.integers(0, 1000, size=n)
    # Draws collide now and then (same region, birthday and sequence): redraw the sequence.
    # The 17-digit body fits in an int64, so uniqueness is checked on integers.
    for _ in range(100):
        body = (region * 100_000_000 + date_num) * 1000 + seq
        _, first = np.unique(body, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        if not dup.any():
            return _assemble(region, date_num, seq)
        seq[dup] = rng.integers(0, 1000, size=int(dup.sum()))
    raise RuntimeError("could not draw unique national IDs; population too dense")


def _assemble(region: np.ndarray, date_num: np.ndarray, seq: np.ndarray) -> np.ndarray:
    body = np.concatenate([_digits(region, 6), _digits(date_num, 8), _digits(seq, 3)], axis=1)
    check = _CHECK[(body * _WEIGHTS[None, :]).sum(axis=1) % 11]
    chars = np.concatenate([(body + ord("0")).astype(np.uint8), check[:, None]], axis=1)
    return np.ascontiguousarray(chars).view("S18").ravel().copy()


def tokens_for_ids(key: bytes, ids: np.ndarray) -> np.ndarray:
    """Tokens (object array of hex strings) for an S18 array of normalised IDs."""
    return np.array(tokens_for_normalised(key, (b.decode("ascii") for b in ids)), dtype=object)
