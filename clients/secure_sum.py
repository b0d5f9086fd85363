"""The platform's side of a secure sum: check the request, mask the values, log the answer.

A train, evaluate or feature_stats request that carries a ``SecureSumSpec``
(``protocols.secure_sum``) is answered with one masked ``uint64`` vector instead of the plain
weights, histograms or sums. Before masking, the platform refuses:

* a spec that does not include it, or names a platform its pinned roster does not know;
* a nonce it has already answered (two vectors under one mask would leak their difference);
* a re-run of a round over a participant set that is not a strict subset of the set it
  last answered for that round (a dropout shrinks the set; a coordinator may not grow it
  back or swap members to line up sums over different sets).

Every answer is appended to the platform's hash-chained query log (round, kind, nonce,
participants, a digest of the masked reply), so a coordinator that claims a platform dropped
when it had answered can be shown wrong from the logs afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import NoReturn

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from clients.node_identity import node_identity
from clients.platform_data import PlatformData
from clients.query_log import QueryLog, ReplayedQuery, query_log_for
from protocols import messages as m
from protocols import secure_sum as ss
from protocols.masking import MaskError

ROUNDS_STATE = "fedcredit.secure-sum-rounds"


def requested_spec(content: RecordDict, what: str) -> ss.SecureSumSpec | None:
    """The request's secure-sum spec (None for a plain request); refusals are ProtocolErrors."""
    try:
        return ss.spec_of(content, what)
    except ss.SecureSumError as exc:
        raise m.ProtocolError(str(exc)) from None


def _round_key(spec: ss.SecureSumSpec) -> str:
    return f"{spec.session_id}/{spec.round_id}"


def _check_rerun(ctx: Context, spec: ss.SecureSumSpec, what: str) -> None:
    record = m.config_record(ctx.state, ROUNDS_STATE)
    previous = record.get(_round_key(spec)) if record is not None else None
    if isinstance(previous, str):
        before = set(previous.split(","))
        now = set(spec.participants)
        if not now < before:
            raise m.ProtocolError(
                f"{what}: round {spec.round_id} was already answered over {sorted(before)}; "
                f"a re-run must be over a strict subset, not {sorted(now)}"
            )


def _remember_round(ctx: Context, spec: ss.SecureSumSpec) -> None:
    record = m.config_record(ctx.state, ROUNDS_STATE)
    if record is None:
        record = ctx.state[ROUNDS_STATE] = ConfigRecord()
    record[_round_key(spec)] = ",".join(spec.participants)


def _refuse_replay(audit: QueryLog | None, spec: ss.SecureSumSpec, what: str) -> NoReturn:
    """Refuse a nonce already answered; ``audit`` logs the refusal (None: already logged)."""
    if audit is not None:
        audit.append(spec.nonce, f"secure_sum.{spec.kind}", "refused", {"reason": "replay"})
    raise m.ProtocolError(f"{what}: secure-sum nonce {spec.nonce} already answered (replay)")


def secure_reply(
    spec: ss.SecureSumSpec,
    values: Mapping[str, np.ndarray],
    ctx: Context,
    data: PlatformData,
    what: str,
) -> RecordDict:
    """This platform's masked vector for ``spec``, after every check; logged when answered."""
    node = node_identity(ctx, data)
    if node.name not in spec.participants:
        raise m.ProtocolError(f"{what}: this platform ({node.name}) is not a participant")
    unknown = [p for p in spec.participants if p not in node.roster.platforms]
    if unknown:
        raise m.ProtocolError(f"{what}: participants not enrolled in this roster: {unknown}")
    audit = query_log_for(data.location)
    try:
        _check_rerun(ctx, spec, what)
    except m.ProtocolError:
        if audit.answered(spec.nonce):  # a replay of the very same request: say so
            _refuse_replay(audit, spec, what)
        raise
    try:
        masked = ss.mask_values(
            values, node.name, node.agreement_key, node.roster_agreement_keys, spec
        )
    except (ss.SecureSumError, MaskError) as exc:
        raise m.ProtocolError(f"{what}: {exc}") from None
    # The replay check and the log entry are one transaction, before the reply leaves:
    # masking first costs nothing (a refused vector never leaves this process).
    try:
        audit.answer_once(
            spec.nonce,
            f"secure_sum.{spec.kind}",
            {
                "session_id": spec.session_id,
                "round_id": spec.round_id,
                "participants": list(spec.participants),
                "words": spec.count,
                "reply_sha256": hashlib.sha256(masked).hexdigest(),
            },
            refused={"reason": "replay"},
        )
    except ReplayedQuery:
        _refuse_replay(None, spec, what)
    _remember_round(ctx, spec)
    return ss.reply_content(spec, masked)
