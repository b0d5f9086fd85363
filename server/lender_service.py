"""``fedcredit serve``: the lender-facing HTTPS API, hosted by a standing ServerApp run.

Why the API lives inside the ServerApp run. Flower 1.41 gives a ServerApp its ``Grid`` only
inside ``main`` (for the run's lifetime); a run may last as long as it likes. So the bureau
starts one run whose ``main`` opens a serving session, starts this API (uvicorn, TLS) in a
thread of the same process, and then loops: take every question waiting, answer them together
through the Grid (``ServingSession.ask``), resolve their futures. The Grid is used from that
one thread only. No extra process or queue service is needed, and concurrent lenders share
platform hops (batching is the throughput lever; see docs/lender-query.md). The same API
server hosts the platform channel's endpoints (``server/platform_channel.py``): the hops ride
leased, long-lived ClientApps instead of one Flower message each (26.9 s -> 0.06 s a
question).

Lenders authenticate with the API keys ``fedcredit deploy init`` wrote; the bureau keeps only
their SHA-256 (``bureau/lenders.json``). An unknown key gets 401, a revoked lender 403, and
nothing else. Every answer is appended to the bureau's hash-chained inquiry record
(``server.inquiry_audit``) and stored for ``GET /v1/queries/{id}`` (the lender's own only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import datetime as dt
import hashlib
import hmac
import json
import logging
import queue
import sqlite3
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocols.lender_messages import MAX_LENDER_BATCH
from server.inquiry_audit import InquiryAudit
from server.lender_models import (
    DebtProfileAnswer,
    DebtProfileBatchRequest,
    DebtProfileRequest,
    answer_body,
)
from server.platform_channel import ChannelBroker, LeaseKeeper, channel_routes
from server.serving import Question, QuestionAnswer

log = logging.getLogger(__name__)

# First wait before a failed serving-session refresh is tried again (doubling each time).
REFRESH_RETRY_FIRST_S = 5.0

Answerer = Callable[[Sequence[Question]], list[QuestionAnswer]]


class ServeConfig(BaseModel):
    """``serve.toml``: where the lender API listens and what it keeps (run config
    ``serve-config`` names this file; ``fedcredit deploy init`` writes one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8480, ge=0, le=65535)
    tls_cert: str = ""
    tls_key: str = ""
    lenders: str = Field(min_length=1, description="bureau/lenders.json")
    state_dir: str = Field(min_length=1, description="inquiry audit and stored answers")
    session_lifetime_s: int = Field(default=24 * 3600, ge=60, le=7 * 24 * 3600)
    hop_timeout_s: float = Field(default=10.0, gt=0, le=600)
    answer_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    max_questions_per_round: int = Field(default=1000, ge=1, le=10_000)
    union_batch: int = Field(default=5000, ge=1, le=50_000)
    channel: bool = Field(
        default=True, description="offer platforms the channel (server/platform_channel.py)"
    )
    # A lease is one Flower message: it must end well inside its TTL (12 h by default).
    channel_lease_s: int = Field(default=600, ge=10, le=6 * 3600)

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        with open(path, "rb") as fh:
            return cls.model_validate(tomllib.load(fh))


class LenderRegistry:
    """``lenders.json``: lender -> SHA-256 of its API key, signing key, optional ``revoked``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        doc = json.loads(self.path.read_text(encoding="utf-8"))
        self.entries: dict[str, dict[str, Any]] = dict(doc["lenders"])
        self._by_hash = {e["api_key_sha256"]: name for name, e in self.entries.items()}

    def identify(self, api_key: str) -> tuple[str | None, bool]:
        """(lender, revoked) for a presented key; (None, False) when unknown."""
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        for known, name in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return name, bool(self.entries[name].get("revoked", False))
        return None, False

    def signing_key(self, lender: str) -> bytes:
        return bytes.fromhex(self.entries[lender]["signing_key"])


class AnswerStore:
    """Answers by query id and lender (SQLite beside the audit), for ``GET /v1/queries/{id}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS answers (query_id TEXT PRIMARY KEY, lender TEXT "
                "NOT NULL, body TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def put(self, lender: str, body: DebtProfileAnswer) -> None:
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT INTO answers VALUES (?, ?, ?)",
                (body.query_id, lender, body.model_dump_json()),
            )

    def get(self, lender: str, query_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT body FROM answers WHERE query_id = ? AND lender = ?", (query_id, lender)
            ).fetchone()
        return json.loads(row[0]) if row else None


class Dispatcher:
    """Questions from the API threads, answered in rounds by the thread that owns the Grid."""

    def __init__(
        self, max_per_round: int, window_s: float = 0.02, max_gather_s: float = 5.0
    ) -> None:
        self.max_per_round = max_per_round
        self.window_s = window_s
        self.max_gather_s = max_gather_s
        self._held: tuple[Question, cf.Future[QuestionAnswer]] | None = None
        self._queue: queue.Queue[tuple[Question, cf.Future[QuestionAnswer]]] = queue.Queue()
        self.stopped = threading.Event()
        self.rounds = 0

    def submit(self, question: Question) -> cf.Future[QuestionAnswer]:
        future: cf.Future[QuestionAnswer] = cf.Future()
        self._queue.put((question, future))
        return future

    def run_once(self, answer: Answerer, wait: float = 0.2) -> int:
        """Answer every question waiting (up to the round limits); returns how many.

        After the first question, the round keeps gathering while questions keep arriving
        (each within ``window_s`` of the last, for at most ``max_gather_s``): a round costs
        about the same for 1 or 1,000 applicants, so a burst should ride one round. The
        window is short because a lone question should not wait for company: under load the
        questions that arrive during a round are all waiting when the next one starts.
        """
        if self._held is not None:
            first, self._held = self._held, None
        else:
            try:
                first = self._queue.get(timeout=wait)
            except queue.Empty:
                return 0
        batch = [first]
        applicants = len(first[0].applicants)
        deadline = time.monotonic() + self.max_gather_s
        while len(batch) < self.max_per_round and time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=self.window_s)
            except queue.Empty:
                break
            if applicants + len(item[0].applicants) > MAX_LENDER_BATCH:
                self._held = item  # one platform message carries at most this many
                break
            batch.append(item)
            applicants += len(item[0].applicants)
        try:
            t0 = time.perf_counter()
            answers = answer([q for q, _ in batch])
            log.info(
                "round %d: %d questions, %d applicants in %.3f s",
                self.rounds + 1,
                len(batch),
                applicants,
                time.perf_counter() - t0,
            )
            for (_, future), result in zip(batch, answers, strict=True):
                future.set_result(result)
        except Exception as exc:  # a failed round fails its questions, never the loop
            log.exception("lender round failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        self.rounds += 1
        return len(batch)

    def run_forever(self, answer: Answerer) -> None:
        while not self.stopped.is_set():
            self.run_once(answer)


def _error(status: int, code: str, reason: str) -> JSONResponse:
    return JSONResponse({"error": code, "reason": reason}, status_code=status)


class _Refused(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        self.status, self.code, self.reason = status, code, reason


def create_app(
    dispatcher: Dispatcher,
    registry: LenderRegistry,
    audit: InquiryAudit,
    answers: AnswerStore,
    *,
    health: Callable[[], dict[str, Any]],
    key_announcement: Callable[[], dict[str, Any]],
    answer_timeout_s: float = 30.0,
    channel: ChannelBroker | None = None,
) -> FastAPI:
    """The lender API (OpenAPI at ``/openapi.json``); with ``channel``, also the platforms'
    channel endpoints (not in the schema, not for lenders)."""
    app = FastAPI(
        title="fedcredit lender API",
        version="1",
        description="Consented debt-profile queries over blinded applicants "
        "(docs/lender-query.md).",
    )
    responses: dict[int | str, dict[str, Any]] = {
        401: {"description": "unknown API key"},
        403: {"description": "revoked lender"},
        422: {"description": "invalid body, with a reason"},
        503: {"description": "the federation did not answer in time"},
    }

    @app.exception_handler(_Refused)
    async def _refused(_request: Request, exc: _Refused) -> JSONResponse:
        return _error(exc.status, exc.code, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:10]
        )
        return _error(422, "invalid_request", problems[:2000])

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    def lender_of(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _Refused(401, "unauthenticated", "an API key is required (Bearer)")
        name, revoked = registry.identify(key.strip())
        if name is None:
            raise _Refused(401, "unauthenticated", "unknown API key")
        if revoked:
            raise _Refused(403, "revoked", "this lender's access is revoked")
        return name

    async def ask(lender: str, purpose: str, applicants: list[Any]) -> DebtProfileAnswer:
        """Check the consents at the door, queue the question, await its round.

        Async, so that thousands of questions can wait for their round without holding a
        worker thread each (the answering itself happens in the Grid's thread)."""
        key = registry.signing_key(lender)
        for k, a in enumerate(applicants):
            if a.consent.record.lender != lender:
                raise _Refused(422, "bad_consent", f"applicant {k}: consent names another lender")
            if a.consent.record.purpose != purpose:
                raise _Refused(422, "bad_consent", f"applicant {k}: consent is for another purpose")
            reason = a.consent.verify(key)
            if reason is None and a.consent.record.element != _hex_b64(a.element):
                reason = "consent is for another blinded element"
            if reason is not None:
                raise _Refused(422, "bad_consent", f"applicant {k}: {reason}")
        question = Question(
            uuid.uuid4().hex, lender, purpose, [a.to_applicant() for a in applicants]
        )
        future = dispatcher.submit(question)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), answer_timeout_s)
        except TimeoutError:
            raise _Refused(503, "timeout", "the federation did not answer in time") from None
        except Exception as exc:
            raise _Refused(503, "unavailable", f"no answer: {exc}"[:300]) from None
        body = answer_body(result, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        await run_in_threadpool(audit.record, result, lender)
        await run_in_threadpool(answers.put, lender, body)
        return body

    @app.post("/v1/debt-profile", response_model=DebtProfileAnswer, responses=responses)
    async def debt_profile(
        body: DebtProfileRequest, lender: str = Depends(lender_of)
    ) -> DebtProfileAnswer:
        """One applicant's total debt, active loans and number of lenders (sealed)."""
        return await ask(lender, body.purpose, list(body.applicants))

    @app.post("/v1/debt-profile/batch", response_model=DebtProfileAnswer, responses=responses)
    async def debt_profile_batch(
        body: DebtProfileBatchRequest, lender: str = Depends(lender_of)
    ) -> DebtProfileAnswer:
        """Up to 1,000 applicants in one question."""
        return await ask(lender, body.purpose, list(body.applicants))

    @app.get("/v1/queries/{query_id}", response_model=DebtProfileAnswer, responses=responses)
    def past_answer(query_id: str, lender: str = Depends(lender_of)) -> dict[str, Any]:
        """One of this lender's own past answers (another lender's id is simply not found)."""
        found = answers.get(lender, query_id)
        if found is None:
            raise _Refused(404, "not_found", "no such query for this lender")
        return found

    @app.get("/v1/health")
    def get_health() -> dict[str, Any]:
        """Liveness and the serving session's public facts (no secrets)."""
        return health()

    @app.get("/v1/key", responses=responses)
    def get_key(_lender: str = Depends(lender_of)) -> dict[str, Any]:
        """The key holder's signed announcement: lenders seal their secrets to its delivery
        key after verifying the signature with the key holder's pinned signing key."""
        return key_announcement()

    if channel is not None:
        app.include_router(channel_routes(channel))
    return app


def _hex_b64(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


# ----------------------------------------------------------------- inside the ServerApp run


def run_service(grid: Any, settings: Any, keyholder: Any = None) -> None:
    """The standing run: open a serving session, serve the API, answer in rounds, forever.

    Stops when the run is stopped (``flwr stop``), or when ``state_dir/stop`` appears.
    """
    import uvicorn
    from flwr.app import Message

    from protocols import messages as m
    from server.federation import wait_for_nodes
    from server.keyholder_client import connect_keyholder
    from server.keyholder_service import announcement_json
    from server.serving import open_serving_session
    from server.transport import send_and_collect

    config = ServeConfig.load(settings.serve_config)
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    # The ServerApp process's output goes to the SuperLink's log stream only while someone
    # streams it; the service keeps its own log beside its state.
    handler = logging.FileHandler(state / "service.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("server", "clients", "protocols"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    keyholder = keyholder or connect_keyholder(settings)
    holder: dict[str, Any] = {"stale": False, "retry_at": 0.0}
    broker = ChannelBroker() if config.channel else None
    keeper = LeaseKeeper(broker, config.channel_lease_s) if broker is not None else None
    # Discovery must not wait the batch run's long timeouts on a platform that is down.
    quick = settings.model_copy(update={"timeout": max(4 * config.hop_timeout_s, 30.0)})

    def discover() -> tuple[dict[str, int], frozenset[int]]:
        """Platform -> node id of every SuperNode that describes itself now, and every node
        id listed. A node that fails or does not answer is left out (a stopped SuperNode stays
        listed until its heartbeat lapses), so one dead node id cannot block a new session."""
        listed = frozenset(grid.get_node_ids())
        request = m.DescribeRequest(test_share=settings.test_share).to_content()
        messages = [Message(request, dst_node_id=n, message_type="query.describe") for n in listed]
        nodes: dict[str, int] = {}
        key_ids: set[str] = set()
        for reply in send_and_collect(grid, messages, quick.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s left out of the session: %s", node, reply.error.reason)
                continue
            try:
                described = m.PlatformDescription.from_content(reply.content, f"node {node}")
            except m.ProtocolError as exc:
                log.warning("node %s left out of the session: %s", node, exc)
                continue
            if described.platform in nodes:
                raise RuntimeError(f"two nodes claim the platform name {described.platform!r}")
            nodes[described.platform] = node
            key_ids.add(described.key_id)
        if len(key_ids) > 1:
            raise RuntimeError(f"platforms enrolled under different federation keys: {key_ids}")
        return nodes, listed

    def refresh() -> None:
        """A new serving session over the platforms online now (node ids may have changed:
        a restarted SuperNode comes back with an empty node state, so its secret is gone).
        The channel's workers are stopped first: a SuperNode answers one message at a time."""
        t0 = time.perf_counter()
        if keeper is not None:
            keeper.stop_all(grid, wait_s=max(2 * config.hop_timeout_s, 10.0))
        if "session" not in holder:
            wait_for_nodes(grid, settings)
        nodes, listed = discover()
        if len(nodes) < settings.min_participants:
            raise RuntimeError(f"{len(nodes)} platforms online, {settings.min_participants} needed")
        session = open_serving_session(
            grid,
            nodes,
            keyholder,
            timeout=quick.timeout,
            lifetime_s=config.session_lifetime_s,
            batch_size=config.union_batch,
        )
        session.timeout = config.hop_timeout_s
        session.channel = keeper
        holder["known"] = holder.get("known", set()) | set(session.participants)
        holder["session"] = session
        holder["listing"] = listed
        holder["stale"] = False
        if keeper is not None:
            keeper.start(grid, session)
        log.info("serving session ready in %.1f s", time.perf_counter() - t0)

    def keep_fresh() -> None:
        """Open a fresh session when the current one expired, or when it is stale (a hop
        failed) or the SuperNodes changed (a participant's node left the listing, or a node id
        appeared that was not listed when the session opened: a restarted SuperNode) and
        either the retry time passed or the listing differs from the last failed attempt's.
        Called before every round, so a question asked after a platform rejoined is answered
        by a session that includes it."""
        session = holder["session"]
        listed = frozenset(grid.get_node_ids())
        changed = bool(listed - holder["listing"]) or not set(session.nodes.values()) <= listed
        retry = time.monotonic() >= holder["retry_at"] or listed != holder.get("failed_listing")
        if not (session.expired or ((holder["stale"] or changed) and retry)):
            return
        try:
            refresh()
        except Exception as exc:  # keep answering (naming the missing) and retry
            # A restarted SuperNode keeps its node id, so the listing does not change when it
            # comes back; the SuperLink may still call it offline for a few seconds after it
            # reconnects. Retry soon at first, then back off to two hop timeouts.
            failures = holder.get("failures", 0) + 1
            delay = min(REFRESH_RETRY_FIRST_S * 2 ** (failures - 1), 2 * config.hop_timeout_s)
            log.warning("serving session refresh failed, retrying in %.0f s: %s", delay, exc)
            holder["failures"] = failures
            holder["retry_at"] = time.monotonic() + delay
            holder["failed_listing"] = listed
        else:
            holder["failures"] = 0

    def answer_round(questions: Sequence[Question]) -> list[QuestionAnswer]:
        keep_fresh()
        session = holder["session"]
        answers = session.ask(grid, questions, keyholder)
        if any(a.missing for a in answers):
            holder["stale"] = True  # try a fresh session before the next round
        # A platform that served before but was offline when this session opened contributes
        # to no total: the lender is told, as for a platform that failed a hop.
        absent = sorted(holder["known"] - set(session.participants))
        for answer in answers:
            for platform in absent:
                answer.missing.setdefault(platform, "offline when the serving session opened")
        return answers

    refresh()
    dispatcher = Dispatcher(config.max_questions_per_round)

    def health() -> dict[str, Any]:
        session = holder["session"]
        return {
            "status": "ok",
            "session": session.session_id,
            "participants": list(session.participants),
            # A hop failed in this session and a fresh one is not open yet.
            "stale": bool(holder["stale"]),
            "expires_at": int(session.expires_at),
            "rounds": dispatcher.rounds,
            "channel": keeper.status() if keeper is not None else {},
        }

    app = create_app(
        dispatcher,
        LenderRegistry(config.lenders),
        InquiryAudit(state / "inquiries.jsonl"),
        AnswerStore(state / "answers.sqlite"),
        health=health,
        key_announcement=lambda: announcement_json(keyholder.announcement()),
        answer_timeout_s=config.answer_timeout_s,
        channel=broker,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            ssl_certfile=config.tls_cert or None,
            ssl_keyfile=config.tls_key or None,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, name="lender-api", daemon=True)
    thread.start()
    log.info("lender API on https://%s:%d", config.host, config.port)
    stop_file = state / "stop"
    try:
        while not stop_file.exists():
            if time.monotonic() >= holder.get("census_at", 0.0):
                holder["census_at"] = time.monotonic() + 1.0
                keep_fresh()
            if keeper is not None:
                keeper.tend(grid, holder["session"])
            dispatcher.run_once(answer_round)
    finally:
        if keeper is not None:
            keeper.stop_all(grid, wait_s=10.0)
        server.should_exit = True
        thread.join(timeout=10)
