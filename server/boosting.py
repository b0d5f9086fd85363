"""The bureau's side of federated gradient boosting: sums in, splits and trees out.

Own numpy implementation over Flower messages (``protocols.gbdt``), not XGBoost's federated
mode: XGBoost federates through its own gRPC collective (a federated server of its own that
every party dials), which would bypass Flower's SuperLink, its TLS and node authentication,
and the per-message validation every other fedcredit exchange has; and its sums could not go
through the same secure summation as every other sum here. The boosting itself is small:
histograms of gradients, the usual gain, leaf values ``-G / (H + lambda)``.

Every per-platform sum passes through ``aggregate``, one call taking each platform's dict
of named float arrays: the place where secure summation of training sums plugs in. The
bureau sees summed histograms, the splits it chooses and the leaf values; the final
evaluation returns per-platform score histograms exactly as the other models' does.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from protocols import gbdt
from protocols import messages as m
from protocols.metrics import BINS, ScoreHistogram, calibration_summary
from protocols.scaling import Scaler
from server import progress
from server.settings import FederationSettings
from server.training import (
    FederationError,
    ask_all,
    federated_scaler,
    histogram_of,
    train_histogram_of,
)

log = logging.getLogger(__name__)

SUMS_KEY = "sums"


def aggregate(parts: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The sum over platforms of their named float arrays (every name in every part).

    The one aggregation call of federated boosting: a secure summation that takes the same
    dict of named arrays per platform and returns only the sums replaces it unchanged.
    """
    if not parts:
        raise FederationError("no platform sent its sums")
    names = [set(p) for p in parts.values()]
    if any(n != names[0] for n in names):
        raise FederationError("platforms sent different sets of sums")
    total: dict[str, np.ndarray] = {}
    for part in parts.values():
        for name, value in part.items():
            total[name] = (
                total[name] + value if name in total else np.array(value, dtype=np.float64)
            )
    return total


def _sums(
    grid: Grid,
    nodes: Sequence[int],
    message_type: str,
    content: RecordDict,
    expected: dict[str, tuple[int, ...]],
    settings: FederationSettings,
) -> dict[str, np.ndarray]:
    replies = ask_all(grid, nodes, message_type, content, settings.timeout)
    parts = {}
    for node, reply in replies.items():
        record = reply.array_records.get(SUMS_KEY)
        if record is None:
            raise FederationError(f"{message_type}: node {node} sent no {SUMS_KEY!r} record")
        try:
            arrays = gbdt.arrays_from_record(record, f"{message_type} from {node}")
            parts[node] = gbdt.check_named_arrays(
                arrays,
                expected,
                ("counts", "labels", "hess", "count"),
                f"{message_type} from {node}",
            )
        except m.ProtocolError as exc:
            raise FederationError(str(exc)) from exc
    return aggregate(parts)


@dataclass
class BoostedModel:
    """A federated boosted model, with what the report needs (like ``TrainedModel``)."""

    kind: str
    feature_set: str
    features: list[str]
    scaler: Scaler
    edges: list[list[float]]
    base_margin: float
    params: gbdt.BoostParams
    trees: list[gbdt.Tree] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    per_node: dict[int, ScoreHistogram] = field(default_factory=dict)
    train_per_node: dict[int, ScoreHistogram] = field(default_factory=dict)
    round_seconds: list[float] = field(default_factory=list)
    session_id: str = ""
    # Whether the histograms were secure sums, and platforms dropped mid-training.
    secure_aggregation: bool = False
    dropped: dict[str, str] = field(default_factory=dict)
    # Only set when histograms are secure sums (then ``per_node`` is empty); not yet for gbdt.
    summed: ScoreHistogram | None = None

    @property
    def rounds(self) -> int:
        return len(self.trees)

    @property
    def histogram(self) -> ScoreHistogram:
        return sum(self.per_node.values(), ScoreHistogram.empty())

    @property
    def train_histogram(self) -> ScoreHistogram | None:
        if not self.per_node or set(self.train_per_node) != set(self.per_node):
            return None
        return sum(self.train_per_node.values(), ScoreHistogram.empty())

    def calibration(self) -> dict[str, Any]:
        return calibration_summary(self.histogram, self.train_histogram)

    def spec(self, settings: FederationSettings) -> dict[str, Any]:
        return {
            "feature_set": self.feature_set,
            "features": self.features,
            "test_share": settings.test_share,
            "session_id": self.session_id,
            "edges": self.edges,
            "bins": gbdt.bins_needed(self.edges),
            "base_margin": self.base_margin,
            "depth": self.params.depth,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_margin": self.base_margin,
            "edges": self.edges,
            "trees": [t.model_dump() for t in self.trees],
        }


def params_of(settings: FederationSettings) -> gbdt.BoostParams:
    return gbdt.BoostParams(
        trees=settings.gbdt_trees,
        depth=settings.gbdt_depth,
        learning_rate=settings.gbdt_learning_rate,
        bins=settings.gbdt_bins,
    )


def agree_bins(
    grid: Grid,
    nodes: Sequence[int],
    feature_set: str,
    features: list[str],
    settings: FederationSettings,
) -> tuple[Scaler, list[list[float]], float]:
    """Federated scaling, then the summed grid counts: bin edges and the starting score."""
    scaler = federated_scaler(grid, nodes, feature_set, features, settings)
    centre, scale = scaler.mean, scaler.std
    for first in (True, False):
        request = gbdt.SketchRequest(
            feature_set=feature_set,
            features=features,
            test_share=settings.test_share,
            centre=centre.tolist(),
            scale=scale.tolist(),
        )
        sums = _sums(
            grid,
            nodes,
            "query.gbdt_sketch",
            request.to_content(),
            {"counts": (len(features), gbdt.SKETCH_CELLS), "labels": (2,)},
            settings,
        )
        if first:
            centre, scale = gbdt.recentre(sums["counts"], centre, scale)
    edges = gbdt.edges_from_counts(sums["counts"], centre, scale, settings.gbdt_bins)
    rows, positives = sums["labels"]
    if rows <= 0:
        raise FederationError("no training rows on any platform")
    rate = min(max(positives / rows, 1e-6), 1 - 1e-6)
    return scaler, edges, float(np.log(rate / (1 - rate)))


def _grow_tree(
    grid: Grid,
    nodes: Sequence[int],
    model: BoostedModel,
    settings: FederationSettings,
) -> tuple[gbdt.Tree, dict[str, np.ndarray]]:
    """One tree, level by level; returns it and the level-0 extras (held-out sums so far)."""
    depth, lr = model.params.depth, model.params.learning_rate
    n = gbdt.heap_size(depth)
    feature, threshold, value = [-1] * n, [0] * n, [0.0] * n
    bins = gbdt.bins_needed(model.edges)
    F = len(model.features)
    sums: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    ask, derive = [0], {}  # nodes to request; node -> (parent, sibling) to derive by subtraction
    extras: dict[str, np.ndarray] = {}
    for level in range(depth):
        current = gbdt.Tree(feature=list(feature), threshold=list(threshold), value=list(value))
        first = level == 0 and not model.trees
        request = gbdt.LevelRequest(
            **{**model.spec(settings), "edges": model.edges if first else None},
            tree=len(model.trees),
            level=level,
            nodes=ask,
            current=current,
            previous=model.trees[-1] if level == 0 and model.trees else None,
        )
        expected = {k: (len(ask), F, bins) for k in ("grad", "hess", "count")}
        if level == 0:
            expected.update({"hist-pos": (BINS,), "hist-neg": (BINS,), "test-loss": (2,)})
        got = _sums(grid, nodes, "query.gbdt_level", request.to_content(), expected, settings)
        if level == 0:
            extras = {k: got[k] for k in ("hist-pos", "hist-neg", "test-loss")}
        for i, node in enumerate(ask):
            sums[node] = (got["grad"][i], got["hess"][i], got["count"][i])
        for node, (parent, sibling) in derive.items():
            sums[node] = tuple(  # type: ignore[assignment]
                np.clip(p - s, 0, None) if k else p - s
                for k, (p, s) in enumerate(zip(sums[parent], sums[sibling], strict=True))
            )
        level_nodes = range(2**level - 1, 2 ** (level + 1) - 1)
        ask, derive = [], {}
        for node in level_nodes:
            if node not in sums:
                continue  # under a leaf
            g, h, c = sums[node]
            split = gbdt.best_split(g, h, c)
            if split is None:
                value[node] = gbdt.leaf_value(float(g[0].sum()), float(h[0].sum()), lr)
                continue
            feature[node], threshold[node] = split.feature, split.threshold
            left, right = 2 * node + 1, 2 * node + 2
            if level == depth - 1:
                value[left] = gbdt.leaf_value(split.left[0], split.left[1], lr)
                value[right] = gbdt.leaf_value(split.right[0], split.right[1], lr)
                continue
            small, large = (left, right) if split.left[2] <= split.right[2] else (right, left)
            ask.append(small)
            derive[large] = (node, small)
        if not ask and not derive:
            break
    return gbdt.Tree(feature=feature, threshold=threshold, value=value), extras


def _history_entry(round_: int, extras: dict[str, np.ndarray]) -> dict[str, float]:
    hist = ScoreHistogram(
        np.rint(extras["hist-pos"]).astype(np.int64), np.rint(extras["hist-neg"]).astype(np.int64)
    )
    loss, n = extras["test-loss"]
    return {
        "round": round_,
        "auc": round(hist.auc(), 4),
        "ks": round(hist.ks(), 4),
        "loss": round(float(loss / max(n, 1)), 5),
        "brier": round(hist.brier(), 6),
    }


def train_boosted(
    grid: Grid,
    nodes: Sequence[int],
    kind: str,
    feature_set: str,
    features: list[str],
    settings: FederationSettings,
) -> BoostedModel:
    """Agree bins, grow ``gbdt-trees`` trees from summed histograms, evaluate per platform."""
    label = f"train {kind} ({feature_set} features)"
    params = params_of(settings)
    progress.report(label, 0, params.trees, "agreeing bin edges")
    scaler, edges, base = agree_bins(grid, nodes, feature_set, features, settings)
    model = BoostedModel(
        kind=kind,
        feature_set=feature_set,
        features=features,
        scaler=scaler,
        edges=edges,
        base_margin=base,
        params=params,
        session_id=secrets.token_hex(16),
    )
    for t in range(params.trees):
        started = time.perf_counter()
        tree, extras = _grow_tree(grid, nodes, model, settings)
        model.trees.append(tree)
        model.round_seconds.append(time.perf_counter() - started)
        if t > 0:  # level 0 of tree t scored the model of t trees (t = 0: the prior alone)
            model.history.append(_history_entry(t, extras))
            progress.report(label, t, params.trees, f"AUC {model.history[-1]['auc']:.4f}")
    model.per_node, model.train_per_node, loss = evaluate_boosted(grid, nodes, model, settings)
    final = model.histogram
    model.history.append(
        {
            "round": params.trees,
            "auc": round(final.auc(), 4),
            "ks": round(final.ks(), 4),
            "loss": round(loss, 5),
            "brier": round(final.brier(), 6),
        }
    )
    progress.report(label, params.trees, params.trees, f"AUC {final.auc():.4f}")
    return model


def evaluate_boosted(
    grid: Grid, nodes: Sequence[int], model: BoostedModel, settings: FederationSettings
) -> tuple[dict[int, ScoreHistogram], dict[int, ScoreHistogram], float]:
    """Per-platform held-out and training-row histograms, and the held-out log-loss."""
    request = gbdt.EvaluateRequest(**model.spec(settings), trees=model.trees)
    replies = ask_all(grid, nodes, "query.gbdt_evaluate", request.to_content(), settings.timeout)
    held_out, train = {}, {}
    loss, rows = 0.0, 0
    for node, reply in replies.items():
        metrics = next(iter(reply.metric_records.values()))
        held_out[node] = histogram_of(metrics)
        if (part := train_histogram_of(metrics)) is not None:
            train[node] = part
        try:
            count, value = int(metrics["num-examples"]), float(metrics["loss"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise FederationError(f"query.gbdt_evaluate from {node}: no loss or count") from exc
        if count < 0 or not np.isfinite(value):
            raise FederationError(f"query.gbdt_evaluate from {node}: malformed loss or count")
        loss, rows = loss + value * count, rows + count
    return held_out, train, loss / max(rows, 1)


def save_boosted(
    out_dir: Path, model: BoostedModel, platforms: list[dict[str, Any]], metrics: dict[str, Any]
) -> dict[str, str]:
    """``model-gbdt-<features>.json``: the trees (JSON) and the same metadata as the others."""
    import hashlib
    import json

    import flwr

    from server.artifacts import write_json

    name = f"model-{model.kind}-{model.feature_set}"
    body = model.to_dict()
    weights = write_json(out_dir / f"{name}.trees.json", body)
    meta = {
        "format": "fedcredit-model/v1",
        "model": model.kind,
        "feature_set": model.feature_set,
        "features": model.features,
        "scaler": model.scaler.to_dict(),
        "rounds": model.rounds,
        "boosting": model.params.as_dict(),
        "weights_file": weights.name,
        "weights_sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
        "platforms": [
            {"platform": p["platform"], "fingerprint": p["fingerprint"], "rows": p["train_rows"]}
            for p in platforms
        ],
        "held_out": metrics,
        "history": model.history,
        "round_seconds_mean": float(np.mean(model.round_seconds)) if model.round_seconds else None,
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "flwr_version": flwr.__version__,
        "output": "log-odds of default = base_margin + sum of the trees' leaf values; "
        "a row's bin per feature is the number of that feature's edges <= its value",
    }
    meta_path = write_json(out_dir / f"{name}.json", meta)
    return {"weights": str(weights), "metadata": str(meta_path)}
