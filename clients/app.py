"""The platform's ClientApp: answers the bureau from its own ledger and nothing else.

A node opens exactly one ledger, named by its node config (``--node-config 'ledger="..."'``
on a SuperNode), and knows who it is and whom it trusts from its ``identity`` and pinned
``roster`` files (``clients/node_identity.py``). Under the simulation engine, where Flower
gives nodes only a partition id, the same app is built with the lists of ledgers and
identities and picks the ones at its partition id (``build_client_app``).

For the debt query a platform never sends a token: it takes part in private matching
(``clients/matching.py``), answers batches of fully blinded ids with masked Paillier
ciphertexts, refuses a query over anything but its matching session's participant set (two
answers over different sets could be differenced), verifies the key holder's signature on
every query's key, and opens only its own sealed totals.

Torch and scikit-learn are imported only by the handlers that train or evaluate: on a
SuperNode every message starts a fresh ClientApp process, and a query batch should not pay
three seconds of imports it never uses.

Every handler validates the message (``protocols.messages``) before acting, and any failure
becomes a Flower error reply that names the message and the reason, and is logged: a hostile
or malformed message never crashes the node and never touches the ledger's data tables.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from clients import boosting, lender_handlers, matching
from clients.node_identity import NodeFiles, NodeIdentity, node_identity, register_files
from clients.platform_data import PlatformData, load_platform_data
from clients.query_log import QueryLog, query_log_for
from clients.received_totals import store_received_totals
from clients.secure_sum import requested_spec, secure_reply
from protocols import blinding, delivery, robust_features
from protocols import messages as m
from protocols.local_work import local_epochs
from protocols.masking import MaskContext, MaskError, add_masks, pairwise_secret, platform_mask
from protocols.packing import debt_profile_layout
from protocols.paillier import ciphertexts_to_bytes, encrypt_plaintexts
from protocols.robust_features import RobustTransform
from protocols.scaling import FeatureSums, Scaler

if TYPE_CHECKING:
    from protocols.dp import DPSGD

log = logging.getLogger(__name__)

ERROR_REFUSED = 1  # malformed, hostile or replayed message
ERROR_FAILED = 2  # the platform could not answer (ledger problem, missing totals)

Handler = Callable[[Message, Context, PlatformData], RecordDict]


def _partition(context: Context, count: int, what: str) -> int:
    pid = context.node_config.get("partition-id")
    if pid is None or not 0 <= int(pid) < count:
        raise LookupError(f"no {what} for simulated partition {pid!r} ({count} given)")
    return int(pid)


def _ledger_location(context: Context, ledgers: Sequence[str] | None) -> str:
    location = context.node_config.get("ledger")
    if isinstance(location, str) and location:
        return location
    if ledgers:
        return ledgers[_partition(context, len(ledgers), "ledger")]
    raise LookupError("this node has no ledger: start it with --node-config 'ledger=\"PATH\"'")


def _node_files(
    context: Context, identities: Sequence[str] | None, roster: str | None
) -> NodeFiles:
    """The identity and roster paths from the node config, or the simulation's lists."""
    identity = context.node_config.get("identity")
    pinned = context.node_config.get("roster")
    if not (isinstance(identity, str) and identity) and identities:
        identity = identities[_partition(context, len(identities), "identity")]
    if not (isinstance(pinned, str) and pinned):
        pinned = roster
    return NodeFiles(
        identity=identity if isinstance(identity, str) else None,
        roster=pinned if isinstance(pinned, str) else None,
    )


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


def _rows(
    req: m.FeatureStatsRequest | m.FeatureSketchRequest | m.ModelInstructions,
    ctx: Context,
    data: PlatformData,
    split: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows a request names, after its robust transform where it carries one."""
    X, y = data.rows(
        req.feature_set,
        req.features,
        split,
        req.test_share,
        _delivered_totals(ctx),
        validation_share=req.validation_share,
    )
    if req.robust is not None:
        X = RobustTransform.from_dict(req.robust.model_dump()).transform(X)
    return X, y


def _feature_stats(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    req = m.FeatureStatsRequest.from_content(msg.content, "query.feature_stats")
    spec = requested_spec(msg.content, "query.feature_stats")
    X, _ = _rows(req, ctx, data, "train")
    sums = FeatureSums.of(X)
    if spec is not None:
        values = {"n": np.asarray(float(sums.n)), "sums": sums.sums, "sumsq": sums.sumsq}
        return secure_reply(spec, values, ctx, data, "query.feature_stats")
    return m.FeatureStats(n=sums.n, sums=sums.sums.tolist(), sumsq=sums.sumsq.tolist()).to_content()


def _feature_sketch(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    what = "query.feature_sketch"
    req = m.FeatureSketchRequest.from_content(msg.content, what)
    spec = requested_spec(msg.content, what)
    if req.robust is not None:
        raise m.ProtocolError(f"{what}: sketches are of untransformed rows")
    X, _ = _rows(req, ctx, data, "train")
    counts = robust_features.sketch(
        X, np.asarray(req.mean), np.asarray(req.std), robust_features.flag_columns(req.features)
    )
    if spec is not None:
        return secure_reply(spec, {"sketch": counts.astype(np.float64)}, ctx, data, what)
    return m.FeatureSketch(
        width=counts.shape[0], bins=counts.shape[1], counts=m.ints_to_bytes(counts)
    ).to_content()


def _model_and_rows(
    msg: Message, ctx: Context, data: PlatformData, split: str | None
) -> tuple[m.ModelInstructions, object, np.ndarray, np.ndarray]:
    """The model and the rows of ``split`` (None: the split the message asks to score)."""
    what = msg.metadata.message_type
    req = m.ModelInstructions.from_content(msg.content, what)
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        raise m.ProtocolError(f"{what}: no model weights ('arrays' record)")
    from protocols.model import build_model  # torch: only messages that train import it

    model = build_model(req.model, len(req.features))
    try:
        model.load_state_dict(arrays.to_torch_state_dict())
    except (RuntimeError, KeyError, ValueError) as exc:
        raise m.ProtocolError(f"{what}: weights do not fit a {req.model} model: {exc}") from exc
    X, y = _rows(req, ctx, data, split or req.eval_split)
    scaler = Scaler(np.asarray(req.mean), np.asarray(req.std))
    return req, model, scaler.transform(X), y


def _train(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    spec = requested_spec(msg.content, "train")
    req, model, X, y = _model_and_rows(msg, ctx, data, "train")
    from protocols.model import TrainConfig, scheduled_lr, train_local

    cfg = TrainConfig(
        epochs=local_epochs(req.epochs, req.local_steps, len(y), req.batch_size),
        learning_rate=scheduled_lr(
            req.learning_rate, req.lr_schedule, req.server_round, req.total_rounds
        ),
        batch_size=req.batch_size,
        seed=req.seed * 100_003 + req.server_round,
    )
    dp = _dp_round(req, len(y), ctx)
    loss = train_local(model, X, y, cfg, dp)  # type: ignore[arg-type]
    dp_metrics = {}
    if dp is not None:
        dp_metrics = dp.metrics()
        _dp_steps(ctx)[_dp_key(req)] = int(dp_metrics["dp-steps"])
    if spec is not None:
        from protocols.training_sums import train_values

        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
        reply = secure_reply(spec, train_values(state, len(y), float(loss)), ctx, data, "train")
        if dp_metrics:
            # In clear beside the masked vector: the accounting is a function of this
            # platform's row count (which `describe` already gives) and the public schedule.
            reply.metric_records["dp"] = MetricRecord(dp_metrics)  # type: ignore[arg-type]
        return reply
    metrics = {"num-examples": len(y), "train-loss": float(loss), **dp_metrics}
    return RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),  # type: ignore[attr-defined]
            "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        }
    )


DP_STATE = "dp-steps"


def _dp_key(req: m.ModelInstructions) -> str:
    """One DP-SGD schedule of this run: a model, its features and its budget."""
    return f"{req.model}/{req.feature_set}/{req.dp_epsilon:g}/{req.dp_delta:g}/{req.total_rounds}"


def _dp_steps(ctx: Context) -> ConfigRecord:
    """DP-SGD steps taken so far per schedule, in the node's context state (it outlives the
    process): a round re-run after a dropout trains again, and those steps count too."""
    if DP_STATE not in ctx.state.config_records:
        ctx.state.config_records[DP_STATE] = ConfigRecord()
    return ctx.state.config_records[DP_STATE]


def _dp_round(req: m.ModelInstructions, rows: int, ctx: Context) -> DPSGD | None:
    """DP-SGD for this round when the bureau asked for it: the noise is fixed by the whole
    schedule and this platform's row count, and the accountant starts from the steps already
    taken (each round runs in a fresh process): the earlier rounds', and a re-run's."""
    if req.dp_epsilon <= 0:
        return None
    from protocols.dp import DPSGD, plan

    if req.server_round > req.total_rounds:
        raise m.ProtocolError(
            f"train: round {req.server_round} of {req.total_rounds} would spend more than "
            f"the announced privacy budget (epsilon {req.dp_epsilon})"
        )
    budget = plan(
        req.dp_epsilon,
        req.dp_delta,
        req.dp_clip_norm,
        rows,
        req.batch_size,
        # The epochs this round really runs (at least ``local_steps`` steps): the noise must
        # be planned for every step taken, or the budget is overspent.
        local_epochs(req.epochs, req.local_steps, rows, req.batch_size),
        req.total_rounds,
    )
    done = max(req.server_round - 1, 0) * budget.steps_per_round
    taken = _dp_steps(ctx).get(_dp_key(req), 0)
    return DPSGD(budget, steps_before=max(done, int(taken)))  # type: ignore[call-overload]


def _evaluate(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    spec = requested_spec(msg.content, "evaluate")
    req, model, X, y = _model_and_rows(msg, ctx, data, None)
    from protocols.metrics import ScoreHistogram
    from protocols.model import log_loss, predict_proba

    hist = ScoreHistogram.of(predict_proba(model, X), y)  # type: ignore[arg-type]
    # The training rows' scores too, as counts: the bureau compares the two summed
    # distributions (PSI) without seeing a score.
    X_train, y_train = _rows(req, ctx, data, "train")
    X_train = Scaler(np.asarray(req.mean), np.asarray(req.std)).transform(X_train)
    train = ScoreHistogram.of(predict_proba(model, X_train), y_train)  # type: ignore[arg-type]
    loss = float(log_loss(model, X, y)) if len(y) else 0.0  # type: ignore[arg-type]
    if spec is not None:
        values = {
            "n": np.asarray(float(len(y))),
            "loss": np.asarray(loss * len(y)),
            "hist-pos": hist.positives,
            "hist-neg": hist.negatives,
            "train-hist-pos": train.positives,
            "train-hist-neg": train.negatives,
        }
        return secure_reply(spec, values, ctx, data, "evaluate")
    return RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": len(y),
                    "loss": loss,
                    "hist-pos": hist.positives.tolist(),
                    "hist-neg": hist.negatives.tolist(),
                    "train-hist-pos": train.positives.tolist(),
                    "train-hist-neg": train.negatives.tolist(),
                }
            )
        }
    )


def _audit(data: PlatformData) -> QueryLog:
    return query_log_for(data.location)


def _refuse_replay(audit: QueryLog, query_id: str, kind: str) -> None:
    if audit.answered(query_id):
        audit.append(query_id, kind, "refused", {"reason": "replayed id"})
        raise m.ProtocolError(f"query.{kind}: id {query_id} already answered (replay)")


def _check_participants(node: NodeIdentity, participants: tuple[str, ...], what: str) -> None:
    if node.name not in participants:
        raise m.ProtocolError(f"{what}: this platform ({node.name}) is not a participant")
    unknown = [p for p in participants if p not in node.roster.platforms]
    if unknown:
        raise m.ProtocolError(
            f"{what}: participants not enrolled in this platform's roster: {unknown}"
        )


def _match_start(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    req = m.MatchStart.from_content(msg.content, "query.match_start")
    node = node_identity(ctx, data)
    _check_participants(node, req.participants, "query.match_start")
    audit = _audit(data)
    _refuse_replay(audit, req.session_id, "match_start")
    session, blob = matching.start_session(
        ctx, req.session_id, req.participants, data.features.tokens
    )
    audit.append(
        req.session_id,
        "match_start",
        "answered",
        {"participants": list(req.participants), "elements": len(session.perm)},
    )
    return m.MatchElements(
        session_id=req.session_id, origin=node.name, count=len(session.perm), elements=blob
    ).to_content()


def _match_blind(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    what = "query.match_blind"
    req = m.MatchBlind.from_content(msg.content, what)
    node = node_identity(ctx, data)
    session = matching.load_session(ctx, req.session_id, what)
    if req.origin == node.name:
        raise m.ProtocolError(f"{what}: refusing to re-blind this platform's own list")
    if req.origin not in session.participants:
        raise m.ProtocolError(f"{what}: {req.origin} is not a participant of the session")
    if session.fully or not session.secret:
        raise m.ProtocolError(f"{what}: session {req.session_id} is finished")
    if req.origin in session.reblinded:
        raise m.ProtocolError(f"{what}: {req.origin}'s list was already re-blinded (replay)")
    try:
        elements = blinding.elements_from_bytes(
            req.elements, max_count=m.MAX_ELEMENTS_PER_LIST, what=what
        )
        out = blinding.blind(
            session.secret, elements, workers=_crypto_workers(ctx), validate=False
        )  # elements_from_bytes validated every element just above
    except blinding.InvalidGroupElement as exc:
        raise m.ProtocolError(f"{what}: {exc}") from exc
    session.reblinded.append(req.origin)
    matching.save_session(ctx, session)
    return m.MatchElements(
        session_id=req.session_id,
        origin=req.origin,
        count=len(out),
        elements=blinding.elements_to_bytes(out),
    ).to_content()


def _match_done(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    what = "query.match_done"
    req = m.MatchDone.from_content(msg.content, what)
    session = matching.load_session(ctx, req.session_id, what)
    matching.accept_fully_blinded(session, req, what)
    # Every re-blinding of this session is over: forget the secret, so that nothing kept in
    # node state can later link this session's pseudonyms to anything.
    session.secret = b""
    matching.save_session(ctx, session)
    return m.Ack(stored=req.count).to_content()


def _crypto_workers(context: Context) -> int | None:
    workers = context.node_config.get("crypto-workers")
    return int(workers) if isinstance(workers, int) and workers > 0 else None


def _debt_profile(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    what = "query.debt_profile"
    req = m.DebtProfileRequest.from_content(msg.content, what)
    node = node_identity(ctx, data)
    _check_participants(node, req.participants, what)
    session = matching.load_session(ctx, req.session_id, what)
    if set(req.participants) != set(session.participants):
        # Answers over two participant sets could be differenced to isolate one platform.
        raise m.ProtocolError(
            f"{what}: participants {sorted(req.participants)} are not the matching session's "
            f"{sorted(session.participants)}"
        )
    public_key = node.verify_key_announcement(req.announcement, req.key_id, what)
    audit = _audit(data)
    _refuse_replay(audit, req.query_id, "debt_profile")
    try:
        elements = blinding.elements_from_bytes(
            req.elements, max_count=m.MAX_TOKENS_PER_BATCH, what=what
        )
    except blinding.InvalidGroupElement as exc:
        raise m.ProtocolError(f"{what}: {exc}") from exc
    rows = matching.own_rows(ctx, session)
    values = data.profile_rows([rows.get(e, -1) for e in elements])
    n = int(public_key.n)
    layout = debt_profile_layout(len(req.participants))
    plaintexts = layout.pack(values, n.bit_length())
    mask_ctx = MaskContext(
        session_id=req.session_id,
        query_id=req.query_id,
        participants=req.participants,
        key_id=req.key_id,
        count=len(plaintexts),
        modulus=n,
    )
    try:
        masks = platform_mask(node.name, node.agreement_key, node.roster_agreement_keys, mask_ctx)
    except MaskError as exc:
        raise m.ProtocolError(f"{what}: {exc}") from exc
    masked = add_masks(plaintexts, masks, n)
    ciphertexts = encrypt_plaintexts(public_key, masked, workers=_crypto_workers(ctx))
    blob = ciphertexts_to_bytes(public_key, ciphertexts)
    audit.append(
        req.query_id,
        "debt_profile",
        "answered",
        {
            "session_id": req.session_id,
            "participants": list(req.participants),
            "key_id": req.key_id,
            "elements": len(elements),
            "elements_sha256": hashlib.sha256(req.elements).hexdigest(),
            "ciphertexts": len(ciphertexts),
            "reply_sha256": hashlib.sha256(blob).hexdigest(),
        },
    )
    return m.DebtProfileReply(
        query_id=req.query_id, key_id=req.key_id, count=len(ciphertexts), ciphertexts=blob
    ).to_content()


def _totals(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    what = "query.totals"
    req = m.TotalsDelivery.from_content(msg.content, what)
    node = node_identity(ctx, data)
    session = matching.load_session(ctx, req.session_id, what)
    if node.name not in req.contributors:
        raise m.ProtocolError(f"{what}: totals that do not include this platform's own figures")
    strangers = [p for p in req.contributors if p not in session.participants]
    if strangers:
        raise m.ProtocolError(f"{what}: contributors {strangers} were not in the session")
    if req.count != len(session.perm):
        raise m.ProtocolError(f"{what}: {req.count} rows for a list of {len(session.perm)}")
    delivery_key = node.delivery_key(req.announcement, req.key_id, what)
    where = np.frombuffer(req.rows, dtype="<i4").reshape(req.count, 2).astype(np.int64)
    if req.count and (where[:, 0].min() < 0 or where[:, 0].max() >= len(req.batches)):
        raise m.ProtocolError(f"{what}: a row names a batch that is not listed")
    in_sent_order = np.zeros((req.count, m.PROFILE_FIELDS), dtype=np.int64)
    sealed = np.frombuffer(req.sealed, dtype=np.uint8).reshape(req.count, delivery.ROW_BYTES)
    shared = pairwise_secret(node.agreement_key, delivery_key)
    try:
        for b, batch in enumerate(req.batches):
            picked = np.flatnonzero(where[:, 0] == b)
            if not len(picked):
                continue
            stream = delivery.delivery_stream(
                shared, batch.query_id, req.key_id, node.name, batch.size
            )
            in_sent_order[picked] = delivery.open_rows(
                sealed[picked].tobytes(), where[picked, 1].tolist(), stream
            )
    except delivery.DeliveryError as exc:
        raise m.ProtocolError(f"{what}: {exc}") from exc
    totals = np.zeros_like(in_sent_order)
    totals[session.perm] = in_sent_order
    token_blob = m.tokens_to_bytes(data.features.tokens)
    totals_blob = m.ints_to_bytes(totals)
    try:
        data.cross_features(token_blob, totals_blob)
    except (LookupError, ValueError) as exc:
        raise m.ProtocolError(f"{what}: {exc}") from exc
    store_received_totals(data, req.session_id, list(req.contributors), totals)
    ctx.state.config_records[TOTALS_STATE] = ConfigRecord(
        {"tokens": token_blob, "totals": totals_blob}
    )
    return m.Ack(stored=req.count).to_content()


def build_client_app(
    ledgers: Sequence[str] | None = None,
    identities: Sequence[str] | None = None,
    roster: str | None = None,
    mods: Sequence[Callable[..., Message]] | None = None,
) -> ClientApp:
    """The platform's ClientApp.

    ``ledgers`` and ``identities`` (by partition id) and ``roster`` only for the simulation
    engine, whose nodes have no node config; ``mods`` are Flower mods (the test suite's wire
    recorder, for one).
    """
    app = ClientApp(mods=list(mods or []))

    def serve(handler: Handler) -> Callable[[Message, Context], Message]:
        def run(msg: Message, context: Context) -> Message:
            what = msg.metadata.message_type
            try:
                location = _ledger_location(context, ledgers)
                register_files(location, _node_files(context, identities, roster))
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
    app.query("feature_sketch")(serve(_feature_sketch))
    app.train()(serve(_train))
    app.evaluate()(serve(_evaluate))
    app.query("match_start")(serve(_match_start))
    app.query("match_blind")(serve(_match_blind))
    app.query("match_done")(serve(_match_done))
    app.query("debt_profile")(serve(_debt_profile))
    app.query("totals")(serve(_totals))
    app.query("gbdt_sketch")(serve(boosting.sketch))
    app.query("gbdt_level")(serve(boosting.level))
    app.query("gbdt_evaluate")(serve(boosting.evaluate))
    lender_handlers.register(app, serve, lambda c: _ledger_location(c, ledgers))
    return app


app = build_client_app()
