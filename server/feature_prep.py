"""The bureau's side of robust features: sketches summed over platforms, one transform for all.

Three rounds of sums, none of them a row:

1. ``query.feature_stats``: count, sums of x and x² (the existing federated scaler) give each
   feature's mean and standard deviation, which fix the sketch's bins;
2. ``query.feature_sketch``: each platform's per-feature histogram on those bins, added up
   (``sum_named_arrays``); the robust transform (``protocols.robust_features``) is fitted on
   the sum: median, spread, log where the tail is heavy, clip bounds;
3. ``query.feature_stats`` again, over the transformed values: the mean and standard
   deviation the model's inputs are finally standardised with.

Every reply is a vector of sums: with secure aggregation (the default) all three are secure
sums (``server.secure_aggregation``), and without it they are added in the clear
(``federated_scaler``, ``sum_named_arrays``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from flwr.serverapp import Grid

from protocols import messages as m
from protocols import robust_features
from protocols.robust_features import RobustTransform
from protocols.scaling import Scaler
from server.settings import FederationSettings

if TYPE_CHECKING:
    from server.secure_aggregation import SecureRounds

log = logging.getLogger(__name__)


def sum_named_arrays(parts: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Add every platform's named arrays; all must send the same names and shapes."""
    if not parts:
        raise ValueError("no arrays to sum")
    names = {tuple(sorted(p)) for p in parts.values()}
    if len(names) != 1:
        raise ValueError(f"platforms sent different arrays: {sorted(names)}")
    total: dict[str, np.ndarray] = {}
    for node, arrays in parts.items():
        for name, value in arrays.items():
            value = np.asarray(value, dtype=np.float64)
            if name in total and total[name].shape != value.shape:
                raise ValueError(f"node {node}: {name} of shape {value.shape}")
            total[name] = total[name] + value if name in total else value.copy()
    return total


def sketch_request(
    feature_set: str, features: list[str], scaler: Scaler, settings: FederationSettings
) -> m.FeatureSketchRequest:
    return m.FeatureSketchRequest(
        feature_set=feature_set,  # type: ignore[arg-type]
        features=features,
        test_share=settings.test_share,
        validation_share=settings.validation_share,
        mean=scaler.mean.tolist(),
        std=scaler.std.tolist(),
    )


def federated_sketch(
    grid: Grid,
    nodes: Sequence[int],
    feature_set: str,
    features: list[str],
    scaler: Scaler,
    settings: FederationSettings,
) -> np.ndarray:
    """Per-feature histograms of every platform's training rows, summed (plain replies)."""
    from server.training import FederationError, ask_all

    request = sketch_request(feature_set, features, scaler, settings)
    replies = ask_all(grid, nodes, "query.feature_sketch", request.to_content(), settings.timeout)
    parts: dict[int, dict[str, np.ndarray]] = {}
    for node, content in replies.items():
        sketch = m.FeatureSketch.from_content(content, f"feature_sketch reply from {node}")
        if (sketch.width, sketch.bins) != (len(features), robust_features.BINS):
            raise FederationError(
                f"node {node} sent a {sketch.width} x {sketch.bins} sketch, expected "
                f"{len(features)} x {robust_features.BINS}"
            )
        parts[node] = {"sketch": sketch.matrix()}
    return sum_named_arrays(parts)["sketch"]


def prepare_features(
    grid: Grid,
    nodes: Sequence[int],
    feature_set: str,
    features: list[str],
    settings: FederationSettings,
    rounds: SecureRounds | None = None,
    label: str = "",
) -> tuple[RobustTransform | None, Scaler]:
    """The robust transform (None when ``robust-features`` is off) and the final scaler.

    With ``rounds`` (secure aggregation) every sum is a secure sum: the coordinator holds
    only the totals over all platforms, never one platform's sums or sketch.
    """
    from server.training import feature_stats_request, federated_scaler

    def scaler_of(robust: RobustTransform | None, step: str) -> Scaler:
        if rounds is None:
            return federated_scaler(grid, nodes, feature_set, features, settings, robust)
        from server import secure_aggregation as sa

        request = feature_stats_request(feature_set, features, settings, robust)
        return sa.secure_scaler(rounds, f"{label}{step}", request)

    scaler = scaler_of(None, "")
    if not settings.robust_features:
        return None, scaler
    if rounds is None:
        counts = federated_sketch(grid, nodes, feature_set, features, scaler, settings)
    else:
        from protocols.secure_sum import SumField
        from protocols.training_sums import COUNT_BITS

        request = sketch_request(feature_set, features, scaler, settings)
        field = SumField(
            name="sketch",
            shape=(len(features), robust_features.BINS),
            bound_bits=COUNT_BITS,
            integer=True,
        )
        sums = rounds.run(f"{label}/sketch", "query.feature_sketch", [field], request.to_content)
        counts = np.rint(sums["sketch"]).astype(np.int64)
    robust = robust_features.fit(counts, scaler.mean, scaler.std, features)
    logged = robust.describe(features)["log_transformed"]
    log.info("robust features (%s): log-transformed %s", feature_set, logged or "none")
    return robust, scaler_of(robust, "/robust")
