"""The platform's handlers for lender questions (docs/lender-query.md).

* ``query.serve_start`` / ``query.serve_done``: private matching exactly as
  ``query.match_start`` / ``query.match_done`` (``query.match_blind`` re-blinds), except that
  the platform keeps its session secret until the session's lifetime ends, to re-blind
  lenders' applicants into the session's pseudonyms.
* ``query.lender_blind``: one hop of a lender question. The platform checks every consent
  record against its own policy (``clients/lender_policy.py``), applies its session secret to
  the accepted elements, logs the question in its hash-chained query log (lender, purpose,
  counts, a digest of what it received; never an element), and answers. It sees only
  uniformly random elements, so it cannot tell whether an applicant is its customer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from clients import channel_worker, matching
from clients.lender_policy import LENDER_KIND, decide, policy_at, recent_applicants
from clients.node_identity import node_identity
from clients.platform_data import PlatformData
from clients.query_log import query_log_for
from protocols import blinding
from protocols import lender_messages as lm
from protocols import messages as m

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context, PlatformData], RecordDict]
ERROR_REFUSED = 1  # as clients.app: malformed, hostile or replayed message
ERROR_FAILED = 2  # as clients.app: the platform could not answer


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _serve_start(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    what = "query.serve_start"
    req = lm.ServeStart.from_content(msg.content, what)
    node = node_identity(ctx, data)
    if node.name not in req.participants:
        raise m.ProtocolError(f"{what}: this platform ({node.name}) is not a participant")
    unknown = [p for p in req.participants if p not in node.roster.platforms]
    if unknown:
        raise m.ProtocolError(f"{what}: participants not enrolled in the roster: {unknown}")
    audit = query_log_for(data.location)
    if audit.answered(req.session_id):
        raise m.ProtocolError(f"{what}: session {req.session_id} already started (replay)")
    until = int(_now().timestamp()) + req.lifetime_s
    session, blob = matching.start_session(
        ctx, req.session_id, req.participants, data.features.tokens, serving_until=until
    )
    audit.append(
        req.session_id,
        "serve_start",
        "answered",
        {
            "participants": list(req.participants),
            "elements": len(session.perm),
            "lifetime_s": req.lifetime_s,
        },
    )
    return m.MatchElements(
        session_id=req.session_id, origin=node.name, count=len(session.perm), elements=blob
    ).to_content()


def _serve_done(msg: Message, ctx: Context, _data: PlatformData) -> RecordDict:
    what = "query.serve_done"
    req = m.MatchDone.from_content(msg.content, what)
    session = matching.load_session(ctx, req.session_id, what)
    if not session.serving_until:
        raise m.ProtocolError(f"{what}: session {req.session_id} is not a serving session")
    matching.accept_fully_blinded(session, req, what)  # the secret stays: lenders need it
    matching.save_session(ctx, session)
    return m.Ack(stored=req.count).to_content()


@dataclass
class _LogEntry:
    """What the query log records about one lender's questions (one purpose) in a round."""

    questions: int = 0
    applicants: int = 0
    blinded: int = 0
    reasons: set[str] = field(default_factory=set)
    digest: Any = field(default_factory=hashlib.sha256)


def _lender_blind(msg: Message, ctx: Context, location: str) -> RecordDict:
    return answer_lender_blind(msg.content, ctx, location)


def answer_lender_blind(
    content: RecordDict, ctx: Context, location: str, leased_session: str | None = None
) -> RecordDict:
    """One hop, whether it came as a Flower message or over the platform channel
    (``clients/channel_worker.py``, which passes its lease's ``leased_session``: a hop of
    another session is refused there): the same checks, log entries and answer."""
    what = "query.lender_blind"
    req = lm.LenderBlind.from_content(content, what)
    if leased_session is not None and req.session_id != leased_session:
        raise m.ProtocolError(f"{what}: a hop of another serving session than the lease's")
    session = matching.load_session(ctx, req.session_id, what)
    now = _now()
    if not session.serving_until or not session.fully or not session.secret:
        raise m.ProtocolError(f"{what}: session {req.session_id} is not an open serving session")
    if now.timestamp() >= session.serving_until:
        raise m.ProtocolError(f"{what}: serving session {req.session_id} has expired")
    audit = query_log_for(location)
    if audit.answered(f"{req.request_id}:0"):
        raise m.ProtocolError(f"{what}: request {req.request_id} already answered (replay)")
    try:
        elements = blinding.elements_from_bytes(
            req.elements, max_count=lm.MAX_LENDER_BATCH, what=what
        )
    except blinding.InvalidGroupElement as exc:
        raise m.ProtocolError(f"{what}: {exc}") from exc
    where = ctx.node_config.get("policy")
    policy = policy_at(where) if isinstance(where, str) and where else None
    accepted_flags: list[bool] = []
    refused: list[lm.Refusal] = []
    # The rate limit's count of the last hour: one read of the log per lender and round.
    used = {
        lender: recent_applicants(audit, lender, now)
        for lender in {span.lender for span in req.questions}
    }
    # One log entry per (lender, purpose) of the round: a round may carry a thousand questions.
    logged: dict[tuple[str, str], _LogEntry] = {}
    start = 0
    for span in req.questions:
        stop = start + span.count
        decision = decide(
            policy,
            span.lender,
            span.purpose,
            req.consents[start:stop],
            elements[start:stop] if req.step == 1 else None,
            used[span.lender],
            now,
        )
        used[span.lender] += decision.accepted_count
        accepted_flags += decision.accepted
        for k in range(span.count):
            reason = decision.batch_reason or decision.reasons.get(k)
            if reason is not None:
                refused.append(lm.Refusal(index=start + k, reason=reason))
        entry = logged.setdefault((span.lender, span.purpose), _LogEntry())
        entry.questions += 1
        entry.applicants += span.count
        entry.blinded += decision.accepted_count
        entry.reasons |= {r for r in (decision.batch_reason, *decision.reasons.values()) if r}
        entry.digest.update(req.elements[start * m.ELEMENT_BYTES : stop * m.ELEMENT_BYTES])
        start = stop
    for i, ((lender, purpose), entry) in enumerate(sorted(logged.items())):
        audit.append(
            f"{req.request_id}:{i}",
            LENDER_KIND,
            "answered" if entry.blinded else "refused",
            {
                "session_id": req.session_id,
                "lender": lender,
                "purpose": purpose,
                "questions": entry.questions,
                "applicants": entry.applicants,
                "blinded": entry.blinded,
                "refused": entry.applicants - entry.blinded,
                "reasons": sorted(entry.reasons)[:10],
                "step": req.step,
                "elements_sha256": entry.digest.hexdigest(),
            },
        )
    accepted = [k for k, ok in enumerate(accepted_flags) if ok]
    blinded = blinding.blind(session.secret, [elements[k] for k in accepted], validate=False)
    out = [bytes(m.ELEMENT_BYTES)] * req.count
    for k, element in zip(accepted, blinded, strict=True):
        out[k] = element
    if refused:
        log.info("lender round: refused %d of %d applicants", len(refused), req.count)
    return lm.LenderBlindReply(
        request_id=req.request_id,
        count=req.count,
        refused=tuple(refused),
        elements=b"".join(out),
    ).to_content()


def _light(
    handler: Callable[[Message, Context, str], RecordDict], location_of: Callable[[Context], str]
) -> Callable[[Message, Context], Message]:
    """Like ``clients.app``'s wrapper, without loading the ledger's features.

    A SuperNode runs every message in a fresh process, and a lender hop sits on the lender's
    critical path: it needs the session (node state), the policy and the query log, never
    the borrowers' features, so it does not compute them.
    """

    def run(msg: Message, context: Context) -> Message:
        result = guarded(
            msg.metadata.message_type, lambda: handler(msg, context, location_of(context))
        )
        return Message(result, reply_to=msg)

    return run


def guarded(what: str, answer: Callable[[], RecordDict]) -> RecordDict | Error:
    """``answer()``, or the ``Error`` the bureau gets when the platform refuses or fails:
    a refusal is logged with its reason and never crashes the node."""
    try:
        return answer()
    except m.ProtocolError as exc:
        log.warning("refused %s from the bureau: %s", what, exc)
        return Error(ERROR_REFUSED, f"refused: {exc}")
    except Exception as exc:
        log.exception("could not answer %s", what)
        return Error(ERROR_FAILED, f"{what} failed: {exc.__class__.__name__}: {exc}")


def register(
    app: ClientApp,
    serve: Callable[[Handler], Callable[[Message, Context], Message]],
    location_of: Callable[[Context], str],
) -> None:
    """Add the lender handlers to the platform's ClientApp (``serve`` wraps errors)."""
    app.query("serve_start")(serve(_serve_start))
    app.query("serve_done")(serve(_serve_done))
    app.query("lender_blind")(_light(_lender_blind, location_of))
    app.query("lender_listen")(_light(channel_worker.listen, location_of))
