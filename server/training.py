"""Federated training on the bureau's side: shared scaling, FedAvg rounds, held-out metrics.

FedAvg is Flower's own strategy (``flwr.serverapp.strategy.FedAvg``), made strict: a round in
which any platform failed stops training with that platform's reason, rather than silently
averaging the others (a credit model missing a platform is a different model). Evaluation
replies are score histograms; they are summed, and AUC and KS read off the sum (see
``protocols.metrics``), never averaged across platforms. The same goes for calibration: the
Brier score and reliability table come off the summed held-out histogram, and the PSI
compares it with the summed histogram of the training rows' scores (``train-hist-*``).

With ``secure-aggregation`` (the default) the scaler's sums, FedAvg's and every evaluation
are secure sums (``server.secure_aggregation``): the coordinator never holds one platform's
vector, so ``TrainedModel`` then carries only the summed histograms.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from protocols import messages as m
from protocols.metrics import BINS, ScoreHistogram, calibration_summary, psi
from protocols.model import build_model
from protocols.robust_features import RobustTransform
from protocols.scaling import FeatureSums, Scaler, combine
from server import convergence, progress
from server.dp_record import aggregate_train_metrics, dp_metadata
from server.feature_prep import prepare_features
from server.settings import FederationSettings
from server.transport import by_destination, collect_replies

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """A platform failed or refused; the message names it and its reason."""


def ask_all(
    grid: Grid, nodes: Sequence[int], message_type: str, content: RecordDict, timeout: float
) -> dict[int, RecordDict]:
    """Send one message to every node; every node must answer without error."""
    messages = [Message(content, dst_node_id=n, message_type=message_type) for n in nodes]
    replies = by_destination(messages, collect_replies(grid, messages, timeout))
    missing = [n for n in nodes if n not in replies]
    if missing:
        raise FederationError(f"{message_type}: no reply within {timeout:.0f} s from {missing}")
    failed = [(n, r.error.reason) for n, r in replies.items() if r.has_error()]
    if failed:
        raise FederationError(
            f"{message_type}: " + "; ".join(f"node {n}: {reason}" for n, reason in failed)
        )
    return {n: replies[n].content for n in nodes}


def federated_scaler(
    grid: Grid,
    nodes: Sequence[int],
    feature_set: str,
    features: list[str],
    settings: FederationSettings,
    robust: RobustTransform | None = None,
) -> Scaler:
    """Mean and std of the training rows (after ``robust``, if given), from summed sums."""
    request = feature_stats_request(feature_set, features, settings, robust)
    replies = ask_all(grid, nodes, "query.feature_stats", request.to_content(), settings.timeout)
    parts = []
    for node, content in replies.items():
        stats = m.FeatureStats.from_content(content, f"feature_stats reply from {node}")
        if len(stats.sums) != len(features):
            raise FederationError(f"node {node} sent sums for {len(stats.sums)} features")
        parts.append(FeatureSums(stats.n, np.asarray(stats.sums), np.asarray(stats.sumsq)))
    return combine(parts)


def feature_stats_request(
    feature_set: str,
    features: list[str],
    settings: FederationSettings,
    robust: RobustTransform | None = None,
) -> m.FeatureStatsRequest:
    return m.FeatureStatsRequest(
        feature_set=feature_set,  # type: ignore[arg-type]
        features=features,
        test_share=settings.test_share,
        validation_share=settings.validation_share,
        robust=None if robust is None else m.RobustSpec(**robust.to_dict()),  # type: ignore[arg-type]
    )


def histogram_of(record: MetricRecord, prefix: str = "hist") -> ScoreHistogram:
    """The held-out (``hist-*``) or training-row (``train-hist-*``) histogram of a reply."""
    pos = np.asarray(record[f"{prefix}-pos"], dtype=np.int64)
    neg = np.asarray(record[f"{prefix}-neg"], dtype=np.int64)
    if pos.shape != (BINS,) or neg.shape != (BINS,) or (pos < 0).any() or (neg < 0).any():
        raise FederationError("an evaluation reply carried a malformed score histogram")
    return ScoreHistogram(pos, neg)


def train_histogram_of(record: MetricRecord) -> ScoreHistogram | None:
    """The training rows' histogram, or None from a platform that does not send one."""
    if "train-hist-pos" not in record or "train-hist-neg" not in record:
        return None
    return histogram_of(record, "train-hist")


def sum_histograms(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower metric aggregation: add the histograms, then read AUC, KS, Brier score and
    (when every platform sent its training rows' histogram) PSI off the sums."""
    total = ScoreHistogram.empty()
    train: ScoreHistogram | None = ScoreHistogram.empty()
    loss, n = 0.0, 0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        total = total + histogram_of(metrics)
        part = train_histogram_of(metrics)
        train = None if part is None or train is None else train + part
        count = int(metrics[weight_key])  # type: ignore[arg-type]
        loss += float(metrics["loss"]) * count  # type: ignore[arg-type]
        n += count
    out: dict[str, float | int] = {
        "auc": total.auc(),
        "ks": total.ks(),
        "brier": total.brier(),
        "loss": loss / max(n, 1),
        "n": total.count,
    }
    if train is not None:
        out["psi"] = psi(train, total)
    return MetricRecord(out)  # type: ignore[arg-type]


class StrictFedAvg(FedAvg):
    """FedAvg that stops on the first failed platform instead of averaging the rest."""

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        replies = list(replies)
        failed = [r for r in replies if r.has_error()]
        if failed:
            reasons = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed)
            raise FederationError(f"{'train' if is_train else 'evaluate'} round failed: {reasons}")
        return super()._check_and_log_replies(replies, is_train, validate)


@dataclass
class TrainedModel:
    kind: str
    feature_set: str
    features: list[str]
    scaler: Scaler
    arrays: ArrayRecord
    rounds: int
    history: list[dict[str, float]] = field(default_factory=list)
    per_node: dict[int, ScoreHistogram] = field(default_factory=dict)
    # The training rows' score histograms, from the same final evaluation as ``per_node``.
    train_per_node: dict[int, ScoreHistogram] = field(default_factory=dict)
    # DP-SGD budget and accounting (server/dp_record.py); mechanism "none" without DP.
    privacy: dict[str, Any] = field(default_factory=lambda: {"mechanism": "none"})

    # With secure aggregation the coordinator holds only these sums, never ``per_node``.
    summed: ScoreHistogram | None = None
    train_summed: ScoreHistogram | None = None
    secure_aggregation: bool = False
    # Platforms dropped mid-training (secure aggregation re-runs the round without them).
    dropped: dict[str, str] = field(default_factory=dict)
    robust: RobustTransform | None = None
    local_steps: int = 0
    # Why the round loop ended, and after how many rounds (server/convergence.py).
    stopped_because: str = ""
    best_round: int = 0

    @property
    def histogram(self) -> ScoreHistogram:
        """Held-out scores summed over platforms."""
        if self.summed is not None:
            return self.summed
        total = ScoreHistogram.empty()
        for hist in self.per_node.values():
            total = total + hist
        return total

    @property
    def train_histogram(self) -> ScoreHistogram | None:
        """Training rows' scores summed over platforms; None unless every platform sent
        them (a partial sum would make the PSI compare different populations)."""
        if self.summed is not None:
            return self.train_summed
        if not self.per_node or set(self.train_per_node) != set(self.per_node):
            return None
        return sum(self.train_per_node.values(), ScoreHistogram.empty())

    def convergence(self) -> dict[str, Any]:
        """How training ran and why it stopped (``server/convergence.py``)."""
        return {
            "rounds_run": self.rounds,
            "best_round": self.best_round,
            "stopped_because": self.stopped_because,
            "local_steps": self.local_steps,
            "log_transformed": self.robust.describe(self.features)["log_transformed"]
            if self.robust is not None
            else [],
        }

    def calibration(self) -> dict[str, Any]:
        """Brier score, PSI (training vs held-out) and reliability table, from the sums."""
        return calibration_summary(self.histogram, self.train_histogram)

    def instructions(self, settings: FederationSettings) -> m.ModelInstructions:
        return instructions(
            self.kind,
            self.feature_set,
            self.features,
            self.scaler,
            settings,
            robust=self.robust,
            local_steps=self.local_steps,
        )


def instructions(
    kind: str,
    feature_set: str,
    features: list[str],
    scaler: Scaler,
    settings: FederationSettings,
    robust: RobustTransform | None = None,
    local_steps: int = 0,
) -> m.ModelInstructions:
    return m.ModelInstructions(
        model=kind,  # type: ignore[arg-type]
        feature_set=feature_set,  # type: ignore[arg-type]
        features=features,
        test_share=settings.test_share,
        mean=scaler.mean.tolist(),
        std=scaler.std.tolist(),
        epochs=settings.local_epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
        total_rounds=settings.num_rounds,
        lr_schedule=settings.lr_schedule,  # type: ignore[arg-type]
        dp_epsilon=settings.dp_epsilon,
        dp_delta=settings.dp_delta,
        dp_clip_norm=settings.dp_clip_norm,
        validation_share=settings.validation_share,
        robust=None if robust is None else m.RobustSpec(**robust.to_dict()),  # type: ignore[arg-type]
        local_steps=local_steps,
    )


def train_federated(
    grid: Grid,
    nodes: Sequence[int],
    kind: str,
    feature_set: str,
    features: list[str],
    settings: FederationSettings,
    names: dict[int, str] | None = None,
) -> TrainedModel:
    """Federated robust features and scaling, then FedAvg rounds until converged
    (``server/convergence.py``), then an evaluation on the test people.

    With ``secure-aggregation`` (``names``: node id -> enrolled platform name) every sum is
    masked (``server.secure_aggregation``) and the final evaluation is a sum too.
    """
    label = f"train {kind} ({feature_set} features)"
    progress.report(label, 0, settings.num_rounds, "scaling")
    strategy_args: dict[str, Any] = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=len(nodes),
        min_evaluate_nodes=len(nodes),
        min_available_nodes=len(nodes),
        configrecord_key=m.PAYLOAD_KEY,
        evaluate_metrics_aggr_fn=sum_histograms,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    rounds = None
    prefix = f"{kind}-{feature_set}"
    if settings.secure_aggregation:
        from server import secure_aggregation as sa

        # A dropout shrinks the set down to two platforms (the sum still hides each one from
        # the coordinator); min-nodes only says how many must connect before the run starts.
        rounds = sa.SecureRounds(grid, sa.names_for(nodes, names), settings.timeout)
        robust, scaler = prepare_features(
            grid, nodes, feature_set, features, settings, rounds=rounds, label=prefix
        )
        strategy = convergence.make_strategy(
            sa.SecureFedAvg, settings, rounds, prefix, **strategy_args
        )
    else:
        robust, scaler = prepare_features(grid, nodes, feature_set, features, settings)
        strategy = convergence.make_strategy(StrictFedAvg, settings, **strategy_args)
    steps = convergence.local_steps(settings, scaler.n)
    model = build_model(kind, len(features), seed=settings.seed)
    base = instructions(kind, feature_set, features, scaler, settings, robust, steps)
    split = "validation" if settings.validation_share > 0 else "test"
    eval_config = (
        base.model_copy(update={"eval_split": split}).to_content().config_records[m.PAYLOAD_KEY]
    )
    history: list[dict[str, float]] = []
    latest: list[MetricRecord] = []

    # The rounds' validation metrics come back through the evaluation aggregation hook, which
    # also reports progress; the round loop reads the latest loss to decide when to stop.
    def on_round(records: list[RecordDict], weight_key: str) -> MetricRecord:
        metrics = sum_histograms(records, weight_key)
        entry = {
            "round": len(history) + 1,
            "auc": round(float(metrics["auc"]), 4),  # type: ignore[arg-type]
            "ks": round(float(metrics["ks"]), 4),  # type: ignore[arg-type]
            "loss": round(float(metrics["loss"]), 5),  # type: ignore[arg-type]
            "brier": round(float(metrics["brier"]), 6),  # type: ignore[arg-type]
        }
        if "psi" in metrics:
            entry["psi"] = round(float(metrics["psi"]), 6)  # type: ignore[arg-type]
        history.append(entry)
        latest[:] = [metrics]
        progress.report(label, len(history), settings.num_rounds, f"AUC {metrics['auc']:.4f}")
        return metrics

    def train_config(scale: float) -> ConfigRecord:
        lr = base.model_copy(update={"learning_rate": settings.learning_rate * scale})
        return ConfigRecord(dict(lr.to_content().config_records[m.PAYLOAD_KEY]))

    strategy.evaluate_metrics_aggr_fn = on_round
    result = convergence.run_rounds(
        strategy,
        grid,
        ArrayRecord(model.state_dict()),
        settings,
        train_config=train_config,
        evaluate_config=ConfigRecord(dict(eval_config)),
        evaluated=lambda: latest[0] if latest else None,
    )
    trained = TrainedModel(
        kind=kind,
        feature_set=feature_set,
        features=features,
        scaler=scaler,
        arrays=result.arrays,
        rounds=result.rounds_run,
        history=history,
        privacy=dp_metadata(
            settings.dp_epsilon,
            settings.dp_delta,
            settings.dp_clip_norm,
            result.train_metrics.get(result.rounds_run),  # early stopping: rounds actually run
            len(rounds.live) if rounds is not None else len(nodes),
        ),
        robust=robust,
        local_steps=steps,
        stopped_because=result.stopped_because,
        best_round=result.best_round,
    )
    if rounds is None:
        trained.per_node, trained.train_per_node = evaluate_per_node(grid, nodes, trained, settings)
        return trained

    def final_request() -> RecordDict:
        content = trained.instructions(settings).to_content()
        content.array_records["arrays"] = trained.arrays
        return content

    trained.summed, trained.train_summed = sa.secure_evaluate(rounds, prefix, final_request)
    trained.secure_aggregation = True
    trained.dropped = dict(rounds.dropped)
    return trained


def evaluate_per_node(
    grid: Grid, nodes: Sequence[int], trained: TrainedModel, settings: FederationSettings
) -> tuple[dict[int, ScoreHistogram], dict[int, ScoreHistogram]]:
    """Each platform's held-out histogram, and its training rows' where it sent one."""
    content = trained.instructions(settings).to_content()
    content.array_records["arrays"] = trained.arrays
    replies = ask_all(grid, nodes, "evaluate", content, settings.timeout)
    held_out, train = {}, {}
    for node, reply in replies.items():
        metrics = next(iter(reply.metric_records.values()))
        held_out[node] = histogram_of(metrics)
        if (part := train_histogram_of(metrics)) is not None:
            train[node] = part
    return held_out, train
