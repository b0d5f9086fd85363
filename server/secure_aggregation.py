"""The coordinator's side of secure aggregation: ask for masked vectors, re-run on dropouts.

``SecureRounds`` sends a request carrying a fresh ``SecureSumSpec`` to every live platform
and adds the masked replies (``protocols.secure_sum``): the coordinator only ever holds
uniform-looking vectors and their sum. If any platform fails, times out or sends a malformed
vector, that platform is dropped and the same round is sent again to the rest under a new
nonce (fresh masks over the smaller set); a sum is never formed from a partial set, so an
average is never wrong, only over fewer platforms (the drop is recorded and reported).

``SecureFedAvg`` is Flower's FedAvg (through ``StrictFedAvg``) with its train and evaluate
steps replaced by secure sums: the platforms send ``n_i * weights_i``, ``n_i`` and
``n_i * loss_i``; the coordinator divides the sums. Evaluate replies are the summed score
histograms and loss, read by the same ``sum_histograms`` as the plain path.

Another sum (federated boosting's gradient histograms, say) needs three lines on each side:
the coordinator ``rounds.run("<model>/<step>", "query.<name>", fields, build_request)`` with
``fields`` a list of ``SumField`` (name, shape, public bound) and ``build_request`` returning
the request's ``RecordDict``; the platform's handler ends with ``spec =
requested_spec(msg.content, what)`` and ``return secure_reply(spec, {name: array, ...}, ctx,
data, what)`` (``clients/secure_sum.py``). The result is ``{name: summed float array}``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from protocols import messages as m
from protocols import secure_sum as ss
from protocols import training_sums as ts
from protocols.metrics import ScoreHistogram
from protocols.scaling import FeatureSums, Scaler, combine
from server.training import FederationError, StrictFedAvg
from server.transport import by_destination, collect_replies

log = logging.getLogger(__name__)

ContentBuilder = Callable[[], RecordDict]


@dataclass
class Pending:
    """One secure sum in flight: its spec and how to rebuild its request for a re-run."""

    round_id: str
    message_type: str
    fields: list[ss.SumField]
    build: ContentBuilder
    spec: ss.SecureSumSpec
    messages: list[Message]


@dataclass
class SecureRounds:
    """Secure sums over a shrinking set of live platforms (``names``: node id -> platform)."""

    grid: Grid
    names: dict[int, str]
    timeout: float
    min_nodes: int = 2
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    live: list[int] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    reruns: int = 0

    def __post_init__(self) -> None:
        if not self.live:
            self.live = sorted(self.names)
        self.min_nodes = max(2, self.min_nodes)

    def start(
        self, round_id: str, message_type: str, fields: list[ss.SumField], build: ContentBuilder
    ) -> Pending:
        """The first attempt's messages (fresh nonce over every live platform)."""
        self._enough()
        spec = ss.SecureSumSpec.fresh(
            self.session_id,
            round_id,
            _kind(message_type),
            [self.names[n] for n in self.live],
            fields,
        )
        contents = _contents(build, spec, len(self.live))
        messages = [
            Message(content, dst_node_id=n, message_type=message_type)
            for n, content in zip(self.live, contents, strict=True)
        ]
        return Pending(round_id, message_type, fields, build, spec, messages)

    def finish(self, pending: Pending, replies: Iterable[Message]) -> dict[str, np.ndarray]:
        """The unmasked sums; drops failed platforms and re-runs the round until none fail."""
        while True:
            by_node = by_destination(pending.messages, replies)
            failed: dict[int, str] = {}
            blobs: list[bytes] = []
            for node in self.live:
                reply = by_node.get(node)
                if reply is None:
                    failed[node] = f"no reply within {self.timeout:.0f} s"
                elif reply.has_error():
                    failed[node] = reply.error.reason
                else:
                    try:
                        blobs.append(ss.masked_of(reply.content, pending.spec))
                    except ss.SecureSumError as exc:
                        failed[node] = str(exc)
            if not failed:
                try:
                    return ss.unmask_sum(blobs, pending.spec)
                except ss.SecureSumError as exc:
                    # Every platform answered but the masks did not cancel: some platform
                    # answered a different spec. Nobody can be blamed from the sum alone.
                    raise FederationError(f"{pending.round_id}: {exc}") from exc
            for node, reason in failed.items():
                name = self.names[node]
                log.warning(
                    "%s: dropping %s and re-running the round: %s", pending.round_id, name, reason
                )
                self.dropped[name] = reason
            self.live = [n for n in self.live if n not in failed]
            self.reruns += 1
            pending = self.start(
                pending.round_id, pending.message_type, pending.fields, pending.build
            )
            replies = collect_replies(self.grid, pending.messages, self.timeout)

    def run(
        self, round_id: str, message_type: str, fields: list[ss.SumField], build: ContentBuilder
    ) -> dict[str, np.ndarray]:
        pending = self.start(round_id, message_type, fields, build)
        replies = collect_replies(self.grid, pending.messages, self.timeout)
        return self.finish(pending, replies)

    def _enough(self) -> None:
        if len(self.live) < self.min_nodes:
            reasons = "; ".join(f"{n}: {r}" for n, r in sorted(self.dropped.items()))
            raise FederationError(
                f"only {len(self.live)} platform(s) left for secure aggregation, at least "
                f"{self.min_nodes} needed. Dropped: {reasons or 'none'}"
            )


def _contents(build: ContentBuilder, spec: ss.SecureSumSpec, count: int) -> list[RecordDict]:
    """One request per platform, all alike: built and serialised once when the request is
    config records only (a boosting level: copying them is cheaper than building again),
    else built once per platform."""
    first = ss.attach_spec(build(), spec)
    if all(isinstance(record, ConfigRecord) for record in first.values()):
        return [first] + [
            RecordDict({key: ConfigRecord(dict(record)) for key, record in first.items()})  # type: ignore[arg-type]
            for _ in range(count - 1)
        ]
    return [first] + [ss.attach_spec(build(), spec) for _ in range(count - 1)]


def _kind(message_type: str) -> str:
    return message_type.removeprefix("query.")


def secure_scaler(rounds: SecureRounds, label: str, request: m.FeatureStatsRequest) -> Scaler:
    """The federated scaler from the securely summed count, sums and sums of squares."""
    sums = rounds.run(
        f"{label}/scaler",
        "query.feature_stats",
        ts.feature_stats_fields(len(request.features)),
        request.to_content,
    )
    return combine([FeatureSums(round(float(sums["n"])), sums["sums"], sums["sumsq"])])


def histograms_of(sums: dict[str, np.ndarray]) -> tuple[ScoreHistogram, ScoreHistogram]:
    """(held-out, training rows) summed histograms of a secure evaluate sum."""

    def hist(prefix: str) -> ScoreHistogram:
        pos, neg = (np.rint(sums[f"{prefix}-{s}"]).astype(np.int64) for s in ("pos", "neg"))
        if (pos < 0).any() or (neg < 0).any():
            raise FederationError("a summed score histogram has negative counts")
        return ScoreHistogram(pos, neg)

    return hist("hist"), hist("train-hist")


def evaluate_record(sums: dict[str, np.ndarray]) -> MetricRecord:
    """The summed evaluate reply in the plain reply's shape, for ``sum_histograms``."""
    n = round(float(sums["n"]))
    record: dict[str, float | int | list[int]] = {
        "num-examples": n,
        "loss": float(sums["loss"]) / max(n, 1),
    }
    for name in ts.HISTOGRAMS:
        record[name] = np.rint(sums[name]).astype(np.int64).tolist()
    return MetricRecord(record)  # type: ignore[arg-type]


class SecureFedAvg(StrictFedAvg):
    """FedAvg whose train and evaluate replies are masked vectors, summed by ``SecureRounds``."""

    def __init__(self, rounds: SecureRounds, label: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.rounds = rounds
        self.label = label
        self._pending: Pending | None = None
        self._arrays: ArrayRecord | None = None

    def _content(
        self, arrays: ArrayRecord, config: ConfigRecord, server_round: int
    ) -> ContentBuilder:
        def build() -> RecordDict:
            cfg = ConfigRecord(dict(config))
            cfg[m.SERVER_ROUND] = server_round
            return RecordDict({"arrays": arrays, self.configrecord_key: cfg})

        return build

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._arrays = arrays
        shapes = {k: tuple(a.shape) for k, a in arrays.items()}
        self._pending = self.rounds.start(
            f"{self.label}/train/{server_round}",
            "train",
            ts.train_fields(shapes),
            self._content(arrays, config, server_round),
        )
        return self._pending.messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._pending is not None and self._arrays is not None
        replies = list(replies)
        sums = self.rounds.finish(self._pending, replies)
        n = float(sums["n"])
        if n <= 0:
            raise FederationError(f"{self.label} round {server_round}: no training rows")
        averaged = {}
        for key, old in self._arrays.items():
            reference = old.numpy()
            mean = sums[ts.WEIGHT_PREFIX + key] / n
            averaged[key] = Array(np.asarray(mean, dtype=reference.dtype).reshape(reference.shape))
        metrics = MetricRecord({"train-loss": float(sums["loss"]) / n, "num-examples": int(n)})
        return ArrayRecord(averaged), with_dp_accounting(metrics, replies, self.rounds.live)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._pending = self.rounds.start(
            f"{self.label}/evaluate/{server_round}",
            "evaluate",
            ts.evaluate_fields(),
            self._content(arrays, config, server_round),
        )
        return self._pending.messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        assert self._pending is not None
        sums = self.rounds.finish(self._pending, replies)
        record = RecordDict({"metrics": evaluate_record(sums)})
        return self.evaluate_metrics_aggr_fn([record], "num-examples")


def with_dp_accounting(
    metrics: MetricRecord, replies: Iterable[Message], live: Sequence[int]
) -> MetricRecord:
    """Add the DP-SGD accounting the live platforms sent in clear beside their masked
    vectors (``server.dp_record``); nothing is added without DP."""
    from server.dp_record import aggregate_train_metrics

    dp = [
        RecordDict({"metrics": MetricRecord({**r.content.metric_records["dp"], "num-examples": 1})})
        for r in replies
        if r.metadata.src_node_id in live and not r.has_error() and "dp" in r.content.metric_records
    ]
    if not dp:
        return metrics
    merged = aggregate_train_metrics(dp, "num-examples")
    for key, value in merged.items():
        if key.startswith("dp-"):
            metrics[key] = value
    return metrics


def secure_evaluate(
    rounds: SecureRounds, label: str, build: ContentBuilder
) -> tuple[ScoreHistogram, ScoreHistogram]:
    """The final model's summed held-out and training-row histograms."""
    sums = rounds.run(f"{label}/final-evaluate", "evaluate", ts.evaluate_fields(), build)
    return histograms_of(sums)


def names_for(nodes: Sequence[int], names: dict[int, str] | None) -> dict[int, str]:
    if names is None or any(n not in names for n in nodes):
        raise FederationError(
            "secure aggregation needs every platform's enrolled name (from query.describe)"
        )
    return {n: names[n] for n in nodes}
