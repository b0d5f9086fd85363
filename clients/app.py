"""The platform's ClientApp: answers the bureau from its own ledger and nothing else.

A node opens exactly one ledger, named by its node config (``--node-config 'ledger="..."'``
on a SuperNode). Under the simulation engine, where Flower gives nodes only a partition id,
the same app is built with the list of ledgers and picks the one at its partition id
(``build_client_app``); it still opens only that one.

Every handler validates the message (``protocols.messages``) before acting, and any failure
becomes a Flower error reply that names the message and the reason, and is logged: a hostile
or malformed message never crashes the node and never touches the ledger's data tables.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from clients.platform_data import PlatformData, load_platform_data
from clients.query_log import QueryLog
from protocols import messages as m
from protocols.metrics import ScoreHistogram
from protocols.model import (
    TrainConfig,
    build_model,
    log_loss,
    predict_proba,
    scheduled_lr,
    train_local,
)
from protocols.packing import DEBT_PROFILE_LAYOUT
from protocols.paillier import (
    ciphertexts_to_bytes,
    encrypt_plaintexts,
    public_key_from_bytes,
)
from protocols.scaling import FeatureSums, Scaler

log = logging.getLogger(__name__)

ERROR_REFUSED = 1  # malformed, hostile or replayed message
ERROR_FAILED = 2  # the platform could not answer (ledger problem, missing totals)

Handler = Callable[[Message, Context, PlatformData], RecordDict]


def _ledger_location(context: Context, ledgers: Sequence[str] | None) -> str:
    location = context.node_config.get("ledger")
    if isinstance(location, str) and location:
        return location
    if ledgers:
        pid = context.node_config.get("partition-id")
        if pid is None or not 0 <= int(pid) < len(ledgers):
            raise LookupError(f"no ledger for simulated partition {pid!r} ({len(ledgers)} given)")
        return ledgers[int(pid)]
    raise LookupError("this node has no ledger: start it with --node-config 'ledger=\"PATH\"'")


TOTALS_STATE = "fedcredit.totals"


def _delivered_totals(context: Context) -> tuple[bytes, bytes] | None:
    """Totals this node received earlier in the run (kept by Flower in the node's state)."""
    record = context.state.config_records.get(TOTALS_STATE)
    if record is None:
        return None
    return record["tokens"], record["totals"]  # type: ignore[return-value]


def _describe(msg: Message, _ctx: Context, data: PlatformData) -> RecordDict:
    req = m.DescribeRequest.from_content(msg.content, "query.describe")
    feats = data.features
    labelled = data.labelled
    test = data.test_mask(req.test_share)
    return m.PlatformDescription(
        platform=data.platform,
        key_id=data.key_id,
        borrowers=len(feats.tokens),
        labelled=int(labelled.sum()),
        train_rows=int((labelled & ~test).sum()),
        test_rows=int((labelled & test).sum()),
        features=feats.names,
        fingerprint=data.fingerprint(),
    ).to_content()


def _feature_stats(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    req = m.FeatureStatsRequest.from_content(msg.content, "query.feature_stats")
    X, _ = data.rows(req.feature_set, req.features, "train", req.test_share, _delivered_totals(ctx))
    sums = FeatureSums.of(X)
    return m.FeatureStats(n=sums.n, sums=sums.sums.tolist(), sumsq=sums.sumsq.tolist()).to_content()


def _model_and_rows(
    msg: Message, ctx: Context, data: PlatformData, split: str
) -> tuple[m.ModelInstructions, object, np.ndarray, np.ndarray]:
    what = msg.metadata.message_type
    req = m.ModelInstructions.from_content(msg.content, what)
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        raise m.ProtocolError(f"{what}: no model weights ('arrays' record)")
    model = build_model(req.model, len(req.features))
    try:
        model.load_state_dict(arrays.to_torch_state_dict())
    except (RuntimeError, KeyError, ValueError) as exc:
        raise m.ProtocolError(f"{what}: weights do not fit a {req.model} model: {exc}") from exc
    X, y = data.rows(req.feature_set, req.features, split, req.test_share, _delivered_totals(ctx))
    scaler = Scaler(np.asarray(req.mean), np.asarray(req.std))
    return req, model, scaler.transform(X), y


def _train(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    req, model, X, y = _model_and_rows(msg, ctx, data, "train")
    cfg = TrainConfig(
        epochs=req.epochs,
        learning_rate=scheduled_lr(
            req.learning_rate, req.lr_schedule, req.server_round, req.total_rounds
        ),
        batch_size=req.batch_size,
        seed=req.seed * 100_003 + req.server_round,
    )
    loss = train_local(model, X, y, cfg)  # type: ignore[arg-type]
    return RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),  # type: ignore[attr-defined]
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": float(loss)}),
        }
    )


def _evaluate(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    _req, model, X, y = _model_and_rows(msg, ctx, data, "test")
    hist = ScoreHistogram.of(predict_proba(model, X), y)  # type: ignore[arg-type]
    return RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": len(y),
                    "loss": float(log_loss(model, X, y)) if len(y) else 0.0,  # type: ignore[arg-type]
                    "hist-pos": hist.positives.tolist(),
                    "hist-neg": hist.negatives.tolist(),
                }
            )
        }
    )


def _applicants(msg: Message, _ctx: Context, data: PlatformData) -> RecordDict:
    m.ApplicantsRequest.from_content(msg.content, "query.applicants")
    return m.Applicants(tokens=m.tokens_to_bytes(data.features.tokens)).to_content()


def _crypto_workers(context: Context) -> int | None:
    workers = context.node_config.get("crypto-workers")
    return int(workers) if isinstance(workers, int) and workers > 0 else None


def _debt_profile(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    req = m.DebtProfileRequest.from_content(msg.content, "query.debt_profile")
    try:
        public_key = public_key_from_bytes(req.public_key, allow_insecure_test_size=False)
    except ValueError as exc:
        raise m.ProtocolError(f"query.debt_profile: public key refused: {exc}") from exc
    audit = QueryLog(data.location)
    try:
        tokens_digest = hashlib.sha256(req.tokens).hexdigest()
        if audit.answered(req.query_id):
            audit.append(req.query_id, "debt_profile", "refused", {"reason": "replayed query id"})
            raise m.ProtocolError(f"query.debt_profile: query id {req.query_id} already answered")
        tokens = m.tokens_from_bytes(req.tokens)
        values = data.profile_matrix(tokens)
        key_bits = public_key.n.bit_length()
        plaintexts = DEBT_PROFILE_LAYOUT.pack(values, key_bits)
        ciphertexts = encrypt_plaintexts(public_key, plaintexts, workers=_crypto_workers(ctx))
        blob = ciphertexts_to_bytes(public_key, ciphertexts)
        audit.append(
            req.query_id,
            "debt_profile",
            "answered",
            {
                "tokens": len(tokens),
                "tokens_sha256": tokens_digest,
                "ciphertexts": len(ciphertexts),
                "reply_sha256": hashlib.sha256(blob).hexdigest(),
                "key_bits": key_bits,
            },
        )
    finally:
        audit.close()
    return m.DebtProfileReply(
        query_id=req.query_id, count=len(ciphertexts), ciphertexts=blob
    ).to_content()


def _totals(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    req = m.TotalsDelivery.from_content(msg.content, "query.totals")
    try:
        data.cross_features(req.tokens, req.totals)
    except (LookupError, ValueError) as exc:
        raise m.ProtocolError(f"query.totals: {exc}") from exc
    ctx.state.config_records[TOTALS_STATE] = ConfigRecord(
        {"tokens": req.tokens, "totals": req.totals}
    )
    return m.Ack(stored=len(req.tokens) // m.TOKEN_BYTES).to_content()


def build_client_app(ledgers: Sequence[str] | None = None) -> ClientApp:
    """The platform's ClientApp; ``ledgers`` only for the simulation engine (by partition)."""
    app = ClientApp()

    def serve(handler: Handler) -> Callable[[Message, Context], Message]:
        def run(msg: Message, context: Context) -> Message:
            what = msg.metadata.message_type
            try:
                location = _ledger_location(context, ledgers)
                data = load_platform_data(location)
                return Message(handler(msg, context, data), reply_to=msg)
            except m.ProtocolError as exc:
                log.warning("refused %s from the bureau: %s", what, exc)
                return Message(Error(ERROR_REFUSED, f"refused: {exc}"), reply_to=msg)
            except Exception as exc:
                log.exception("could not answer %s", what)
                return Message(
                    Error(ERROR_FAILED, f"{what} failed: {exc.__class__.__name__}: {exc}"),
                    reply_to=msg,
                )

        return run

    app.query("describe")(serve(_describe))
    app.query("feature_stats")(serve(_feature_stats))
    app.train()(serve(_train))
    app.evaluate()(serve(_evaluate))
    app.query("applicants")(serve(_applicants))
    app.query("debt_profile")(serve(_debt_profile))
    app.query("totals")(serve(_totals))
    return app


app = build_client_app()
