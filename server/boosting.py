"""The bureau's side of federated gradient boosting: sums in, splits and trees out.

Own implementation over Flower messages (``protocols.gbdt``: numpy, with the histogram,
routing and split-search loops compiled by numba in ``protocols.gbdt_kernels``), not
XGBoost's federated mode: XGBoost federates through its own gRPC collective (a federated
server of its own that every party dials), which would bypass Flower's SuperLink, its TLS
and node authentication, and the per-message validation every other fedcredit exchange has;
and its sums could not go through the same secure summation as every other sum here. The
boosting itself is small: histograms of gradients, the usual gain, leaf values
``-G / (H + lambda)``.

Every per-platform sum (the scaler's feature sums, the bin-edge sketch counts, the per-level
gradient/hessian/count histograms, the held-out score histograms) goes through one
``Summer``. With ``secure-aggregation`` (the default) it is a secure sum
(``server.secure_aggregation``, bounds in ``protocols.training_sums``): the bureau holds only
the sums over platforms, the splits it chooses and the leaf values, and the final evaluation
is a summed histogram like the other models'. Without it, each platform's named arrays are
checked and added by ``aggregate`` and the final evaluation is per platform.

Dropouts under secure aggregation: a platform that fails during a step is dropped and that
step is re-run over the rest with fresh masks (``SecureRounds``). If the platform set changed
after level 0 of a tree, the tree is restarted from level 0 over the remaining platforms
(its earlier levels summed a larger set, and a split's sibling is derived by subtracting sums,
so mixing sets would give wrong sums); trees already finished stay as they are.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from protocols import gbdt
from protocols import messages as m
from protocols import training_sums as ts
from protocols.metrics import BINS, ScoreHistogram, calibration_summary
from protocols.scaling import Scaler
from protocols.secure_sum import SumField
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


NON_NEGATIVE = ("counts", "labels", "hess", "count", "hist-pos", "hist-neg")

# Public bounds on one platform's entries (``protocols.training_sums``: ledgers of up to
# 2**24 training rows). Gradients are ``p - y`` (|.| <= 1 per row) and hessians
# ``p (1 - p)`` (<= 1/4 per row), so a (node, feature, bin) sum is at most the row count.
ROWS_BITS = 24


def sketch_fields(features: int) -> list[SumField]:
    return [
        SumField(
            name="counts",
            shape=(features, gbdt.SKETCH_CELLS),
            bound_bits=ts.COUNT_BITS,
            integer=True,
        ),
        SumField(name="labels", shape=(2,), bound_bits=ts.COUNT_BITS, integer=True),
    ]


def level_fields(nodes: int, cells: int, first: bool) -> list[SumField]:
    """Gradient and hessian sums (bounded by the rows), exact counts, per (node, cell of the
    session's ``gbdt.CellLayout``); level 0 adds the held-out score histograms and (log-loss
    sum, rows) of the model so far.

    The counts (rows, held-out borrowers per score bin) are packed two to a word: a count
    is at most a platform's rows, below ``2**ROWS_BITS``, so up to 64 platforms' sums fit
    32 bits (``SumField.packed``). That takes a fifth of a level's words off every mask,
    digest and message (over half of level 0's, the score histograms' 8,000 entries).
    """
    return list(_level_fields(nodes, cells, first))


@lru_cache(maxsize=256)
def _level_fields(nodes: int, cells: int, first: bool) -> tuple[SumField, ...]:
    shape = (nodes, cells)
    fields = [
        SumField(name="grad", shape=shape, bound_bits=ROWS_BITS),
        SumField(name="hess", shape=shape, bound_bits=ROWS_BITS - 2),
        SumField(name="count", shape=shape, bound_bits=ROWS_BITS, integer=True, packed=True),
    ]
    if first:
        fields += [
            SumField(name=h, shape=(BINS,), bound_bits=ROWS_BITS, integer=True, packed=True)
            for h in ("hist-pos", "hist-neg")
        ]
        fields.append(SumField(name="test-loss", shape=(2,), bound_bits=ts.LOSS_BITS))
    return tuple(fields)


@dataclass
class Summer:
    """Every per-platform sum of one boosted model: plain (``aggregate``) or secure."""

    grid: Grid
    nodes: Sequence[int]
    settings: FederationSettings
    prefix: str
    rounds: Any = None  # server.secure_aggregation.SecureRounds under secure aggregation

    @property
    def secure(self) -> bool:
        return self.rounds is not None

    @property
    def generation(self) -> int:
        """Changes whenever a platform is dropped (the set being summed shrank)."""
        return len(self.rounds.dropped) if self.rounds is not None else 0

    def scaler(self, feature_set: str, features: list[str]) -> Scaler:
        if self.rounds is None:
            # Boosting has no early stopping, so it trains on the validation people too: its
            # scaler is over the same rows (validation share 0), secure or plain.
            whole = self.settings.model_copy(update={"validation_share": 0.0})
            return federated_scaler(self.grid, self.nodes, feature_set, features, whole)
        from server import secure_aggregation as sa

        request = m.FeatureStatsRequest(
            feature_set=feature_set, features=features, test_share=self.settings.test_share
        )
        return sa.secure_scaler(self.rounds, self.prefix, request)

    def __call__(
        self,
        step: str,
        message_type: str,
        build: Callable[[], RecordDict],
        fields: list[SumField],
    ) -> dict[str, np.ndarray]:
        if self.rounds is not None:
            sums = self.rounds.run(f"{self.prefix}/{step}", message_type, fields, build)
            # One platform's arrays are never seen, so the checks the plain path makes per
            # platform are made on the sum (a negative count or hessian there means at least
            # one platform sent one).
            negative = [k for k in NON_NEGATIVE if k in sums and (sums[k] < 0).any()]
            if negative:
                raise FederationError(f"{message_type}: negative summed {', '.join(negative)}")
            return sums
        expected = {f.name: tuple(f.shape) for f in fields}
        return _sums(self.grid, self.nodes, message_type, build(), expected, self.settings)


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
    # DP-SGD covers lr and mlp only; boosting's histograms are outside any budget
    # (docs/privacy.md), so its metadata says so rather than omitting the key.
    privacy: dict[str, Any] = field(default_factory=lambda: {"mechanism": "none"})
    dropped: dict[str, str] = field(default_factory=dict)
    # Only set when histograms are secure sums (then ``per_node`` is empty).
    summed: ScoreHistogram | None = None
    train_summed: ScoreHistogram | None = None
    # Trees restarted because a platform dropped after their level 0 (secure aggregation).
    restarts: int = 0

    @property
    def rounds(self) -> int:
        return len(self.trees)

    @property
    def histogram(self) -> ScoreHistogram:
        if self.summed is not None:
            return self.summed
        return sum(self.per_node.values(), ScoreHistogram.empty())

    @property
    def train_histogram(self) -> ScoreHistogram | None:
        if self.summed is not None:
            return self.train_summed
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
    summer: Summer, feature_set: str, features: list[str]
) -> tuple[Scaler, list[list[float]], float]:
    """Federated scaling, then the summed grid counts: bin edges and the starting score."""
    scaler = summer.scaler(feature_set, features)
    centre, scale = scaler.mean, scaler.std
    for attempt, first in enumerate((True, False)):
        request = gbdt.SketchRequest(
            feature_set=feature_set,
            features=features,
            test_share=summer.settings.test_share,
            centre=centre.tolist(),
            scale=scale.tolist(),
        )
        sums = summer(
            f"sketch/{attempt}",
            "query.gbdt_sketch",
            request.to_content,
            sketch_fields(len(features)),
        )
        if first:
            centre, scale = gbdt.recentre(sums["counts"], centre, scale)
    edges = gbdt.edges_from_counts(sums["counts"], centre, scale, summer.settings.gbdt_bins)
    rows, positives = sums["labels"]
    if rows <= 0:
        raise FederationError("no training rows on any platform")
    rate = min(max(positives / rows, 1e-6), 1 - 1e-6)
    return scaler, edges, float(np.log(rate / (1 - rate)))


class _SetChanged(Exception):
    """A platform dropped after level 0 of the tree being grown: grow it again."""


def _grow_tree(
    summer: Summer, model: BoostedModel, attempt: int = 0
) -> tuple[gbdt.Tree, dict[str, np.ndarray]]:
    """One tree, level by level; returns it and the level-0 extras (held-out sums so far).

    Raises ``_SetChanged`` when the platform set shrank after level 0 (secure dropouts).
    """
    settings = summer.settings
    depth, lr = model.params.depth, model.params.learning_rate
    n = gbdt.heap_size(depth)
    feature, threshold, value = [-1] * n, [0] * n, [0.0] * n
    layout = gbdt.CellLayout.of(model.edges)
    sums: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    ask, derive = [0], {}  # nodes to request; node -> (parent, sibling) to derive by subtraction
    extras: dict[str, np.ndarray] = {}
    generation = summer.generation
    tree_id = f"tree/{len(model.trees)}" + (f"/restart/{attempt}" if attempt else "")
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
        got = summer(
            f"{tree_id}/level/{level}",
            "query.gbdt_level",
            request.to_content,
            level_fields(len(ask), layout.cells, level == 0),
        )
        if level == 0:
            generation = summer.generation  # a dropout during level 0 re-ran level 0 only
            extras = {k: got[k] for k in ("hist-pos", "hist-neg", "test-loss")}
        elif summer.generation != generation:
            raise _SetChanged
        for i, node in enumerate(ask):
            sums[node] = (got["grad"][i], got["hess"][i], got["count"][i])
        for node, (parent, sibling) in derive.items():
            sums[node] = tuple(  # type: ignore[assignment]
                np.clip(p - s, 0, None) if k else p - s
                for k, (p, s) in enumerate(zip(sums[parent], sums[sibling], strict=True))
            )
        level_nodes = range(2**level - 1, 2 ** (level + 1) - 1)
        ask, derive = [], {}
        here = [node for node in level_nodes if node in sums]  # the rest are under leaves
        splits = (
            gbdt.best_splits(
                *(np.stack([sums[node][i] for node in here]) for i in range(3)), layout
            )
            if here
            else []
        )
        for node, split in zip(here, splits, strict=True):
            g, h, _ = sums[node]
            if split is None:
                value[node] = gbdt.leaf_value(float(layout.total(g)), float(layout.total(h)), lr)
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
    names: dict[int, str] | None = None,
) -> BoostedModel:
    """Agree bins, grow ``gbdt-trees`` trees from summed histograms, evaluate.

    With ``secure-aggregation`` (``names``: node id -> enrolled platform name) every sum is
    a secure sum and the evaluation is summed too (``summed``; no per-platform histograms).
    """
    label = f"train {kind} ({feature_set} features)"
    params = params_of(settings)
    summer = Summer(grid, nodes, settings, f"{kind}-{feature_set}")
    if settings.secure_aggregation:
        from server import secure_aggregation as sa

        summer.rounds = sa.SecureRounds(grid, sa.names_for(nodes, names), settings.timeout)
    progress.report(label, 0, params.trees, "agreeing bin edges")
    scaler, edges, base = agree_bins(summer, feature_set, features)
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
        attempt = 0
        while True:
            try:
                tree, extras = _grow_tree(summer, model, attempt)
                break
            except _SetChanged:
                attempt += 1
                model.restarts += 1
                log.warning("%s: a platform dropped during tree %d; growing it again", label, t)
        model.trees.append(tree)
        model.round_seconds.append(time.perf_counter() - started)
        if t > 0:  # level 0 of tree t scored the model of t trees (t = 0: the prior alone)
            model.history.append(_history_entry(t, extras))
            progress.report(label, t, params.trees, f"AUC {model.history[-1]['auc']:.4f}")
    if summer.rounds is not None:
        model.summed, model.train_summed, loss = secure_evaluate_boosted(summer, model)
        model.secure_aggregation = True
        model.dropped = dict(summer.rounds.dropped)
    else:
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


def secure_evaluate_boosted(
    summer: Summer, model: BoostedModel
) -> tuple[ScoreHistogram, ScoreHistogram, float]:
    """Summed held-out and training-row histograms and the held-out log-loss (secure)."""
    from server import secure_aggregation as sa

    request = gbdt.EvaluateRequest(**model.spec(summer.settings), trees=model.trees)
    sums = summer("final-evaluate", "query.gbdt_evaluate", request.to_content, ts.evaluate_fields())
    held_out, train = sa.histograms_of(sums)
    return held_out, train, float(sums["loss"]) / max(float(sums["n"]), 1.0)


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
        "secure_aggregation": model.secure_aggregation,
        "dropped_platforms": model.dropped,
        "trees_regrown_after_dropout": model.restarts,
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "flwr_version": flwr.__version__,
        "output": "log-odds of default = base_margin + sum of the trees' leaf values; "
        "a row's bin per feature is the number of that feature's edges <= its value",
    }
    meta_path = write_json(out_dir / f"{name}.json", meta)
    return {"weights": str(weights), "metadata": str(meta_path)}
