"""One platform's view of its own ledger, as the ClientApp uses it: features, split, profiles.

Loaded once per node process and ledger (reading a ledger of a few hundred thousand borrowers
takes seconds; a federation sends dozens of messages), and only ever from the ledger this node
was configured with. Nothing here talks to the network.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import case, func, select

from clients.features import LocalFeatures, local_features, select_columns, with_cross_platform
from clients.ledger import schema
from clients.ledger.store import open_ledger
from protocols.messages import PROFILE_FIELDS, ints_from_bytes, tokens_from_bytes
from protocols.split import in_test_set, in_validation_set

log = logging.getLogger(__name__)


@dataclass
class PlatformData:
    """Features, labels, held-out mask and debt profiles of one platform's borrowers."""

    location: str
    platform: str
    key_id: str
    features: LocalFeatures
    profiles: np.ndarray  # (borrowers, 3) int64 in token order: debt fen, active loans, 0/1
    index: dict[str, int] = field(repr=False)
    _cross: dict[str, LocalFeatures] = field(default_factory=dict, repr=False)

    @property
    def labelled(self) -> np.ndarray:
        return ~np.isnan(self.features.y)

    def test_mask(self, test_share: float) -> np.ndarray:
        return in_test_set(self.features.tokens, test_share)

    def rows(
        self,
        feature_set: str,
        names: list[str],
        split: str,
        test_share: float,
        totals: tuple[bytes, bytes] | None = None,
        validation_share: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of the labelled train, validation or test rows, columns in the order asked.

        With a ``validation_share``, that share of the non-test people is kept out of
        ``train`` and forms ``validation`` (early stopping reads it; ``protocols.split``).
        Cross-platform rows need the totals this node received (``query.totals``), which
        Flower keeps in the node's context state: a simulated node may run in a different
        worker process from one message to the next, so nothing may rely on process memory.
        """
        if feature_set == "local":
            feats = self.features
        elif totals is None:
            raise LookupError(
                "cross-platform features requested before this platform received its totals"
            )
        else:
            feats = self.cross_features(*totals)
        mask = self.labelled & self.split_mask(split, test_share, validation_share)
        return select_columns(feats, names)[mask], feats.y[mask].astype(np.float64)

    def split_mask(self, split: str, test_share: float, validation_share: float) -> np.ndarray:
        """Rows of one split; train, validation and test never share a person."""
        test = self.test_mask(test_share)
        if split == "test":
            return test
        validation = ~test & in_validation_set(self.features.tokens, validation_share)
        if split == "validation":
            return validation
        if split == "train":
            return ~test & ~validation
        raise ValueError(f"unknown split {split!r}")

    def fingerprint(self) -> str:
        """SHA-256 over tokens, labels and feature values: names the data a model saw."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.features.names).encode())
        digest.update("".join(self.features.tokens).encode())
        digest.update(np.nan_to_num(self.features.y, nan=-1).astype("<f8").tobytes())
        digest.update(np.ascontiguousarray(self.features.X, dtype="<f8").tobytes())
        return digest.hexdigest()

    def cross_features(self, token_blob: bytes, totals_blob: bytes) -> LocalFeatures:
        """Local features plus delivered totals (cached by the delivery's digest)."""
        digest = hashlib.sha256(token_blob + totals_blob).hexdigest()
        if digest not in self._cross:
            tokens = tokens_from_bytes(token_blob)
            totals = ints_from_bytes(totals_blob, len(tokens), PROFILE_FIELDS)
            self._cross[digest] = self.check_totals(tokens, totals)
        return self._cross[digest]

    def check_totals(self, tokens: list[str], totals: np.ndarray) -> LocalFeatures:
        """Cross-platform features from totals for this platform's own borrowers."""
        full = np.zeros((len(self.features.tokens), 3), dtype=np.int64)
        have = np.zeros(len(self.features.tokens), dtype=bool)
        for token, row in zip(tokens, totals, strict=True):
            i = self.index.get(token)
            if i is None:
                raise LookupError("totals delivered for a token this platform does not hold")
            full[i] = row
            have[i] = True
        if not have.all():
            raise LookupError(
                f"totals missing for {int((~have).sum())} of this platform's borrowers"
            )
        own = self.profiles
        if (full < own).any():
            raise ValueError("delivered totals are below this platform's own figures")
        return with_cross_platform(self.features, full)

    def profile_rows(self, rows: list[int]) -> np.ndarray:
        """Own (debt, active loans, has-active) per ledger row; zeros where the row is -1."""
        idx = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(idx), 3), dtype=np.int64)
        held = idx >= 0
        out[held] = self.profiles[idx[held]]
        return out

    def profile_matrix(self, tokens: list[str]) -> np.ndarray:
        """Own (debt, active loans, has-active) per asked token; zeros where not held."""
        out = np.zeros((len(tokens), 3), dtype=np.int64)
        for row, token in enumerate(tokens):
            i = self.index.get(token)
            if i is not None:
                out[row] = self.profiles[i]
        return out


def _profiles(ledger, tokens: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Outstanding balance and number of loans not settled (last status code not C)."""
    lo = schema.loans
    active = case((func.substr(lo.c.repayment_status, -1, 1) == "C", 0), else_=1)
    q = select(
        lo.c.token,
        func.sum(lo.c.balance_fen * active),
        func.sum(active),
    ).group_by(lo.c.token)
    index = {t: i for i, t in enumerate(tokens)}
    out = np.zeros((len(tokens), 3), dtype=np.int64)
    with ledger.engine.connect() as conn:
        for token, debt, n_active in conn.execute(q):
            i = index.get(token)
            if i is not None:
                out[i] = (int(debt or 0), int(n_active or 0), 1 if n_active else 0)
    return out


_cache: dict[str, PlatformData] = {}
_lock = threading.Lock()


def load_platform_data(location: str) -> PlatformData:
    """The platform's data, read once per process (the ledger is the only thing opened)."""
    key = location
    with _lock:
        if key in _cache:
            return _cache[key]
        with open_ledger(location) as ledger:
            ledger.check_schema()
            meta = ledger.meta()
            feats = local_features(ledger)
            profiles = _profiles(ledger, feats.tokens)
        data = PlatformData(
            location=location,
            platform=meta.get("platform", "unnamed"),
            key_id=meta.get("key_id", ""),
            features=feats,
            profiles=profiles,
            index={t: i for i, t in enumerate(feats.tokens)},
        )
        log.info(
            "platform %s: %d borrowers, %d features loaded from its ledger",
            data.platform,
            len(feats.tokens),
            len(feats.names),
        )
        _cache[key] = data
        return data
