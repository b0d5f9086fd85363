"""The bureau's side of robust features: sketches summed over platforms, one transform for all.

Three rounds of sums, none of them a row:

1. ``query.feature_stats``: count, sums of x and x² (the existing federated scaler) give each
   feature's mean and standard deviation, which fix the sketch's bins;
2. ``query.feature_sketch``: each platform's per-feature histogram on those bins, added up
   (``sum_named_arrays``); the robust transform (``protocols.robust_features``) is fitted on
   the sum: median, spread, log where the tail is heavy, clip bounds;
3. ``query.feature_stats`` again, over the transformed values: the mean and standard
   deviation the model's inputs are finally standardised with.

Every reply is a vector of sums, so each can go through secure aggregation: the sketch sums
are added in ``sum_named_arrays``, the single place to swap for a secure sum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.serverapp import Grid

from protocols import messages as m
from protocols import robust_features
from protocols.robust_features import RobustTransform
from protocols.scaling import Scaler
from server.settings import FederationSettings

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


def federated_sketch(
    grid: Grid,
    nodes: Sequence[int],
    feature_set: str,
    features: list[str],
    scaler: Scaler,
    settings: FederationSettings,
) -> np.ndarray:
    """Per-feature histograms of every platform's training rows, summed."""
    from server.training import FederationError, ask_all

    request = m.FeatureSketchRequest(
        feature_set=feature_set,  # type: ignore[arg-type]
        features=features,
        test_share=settings.test_share,
        validation_share=settings.validation_share,
        mean=scaler.mean.tolist(),
        std=scaler.std.tolist(),
    )
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
) -> tuple[RobustTransform | None, Scaler]:
    """The robust transform (None when ``robust-features`` is off) and the final scaler."""
    from server.training import federated_scaler

    scaler = federated_scaler(grid, nodes, feature_set, features, settings)
    if not settings.robust_features:
        return None, scaler
    counts = federated_sketch(grid, nodes, feature_set, features, scaler, settings)
    robust = robust_features.fit(counts, scaler.mean, scaler.std, features)
    logged = robust.describe(features)["log_transformed"]
    log.info("robust features (%s): log-transformed %s", feature_set, logged or "none")
    return robust, federated_scaler(grid, nodes, feature_set, features, settings, robust)
