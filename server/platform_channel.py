"""The bureau's side of the platform channel (``protocols/channel.py`` says why and how).

* ``ChannelBroker``: thread-safe meeting point between the Grid's thread (which asks a
  platform for a hop and waits for the answer) and the API's threads (where the platforms'
  workers long-poll for work and post answers). Leases are known by the SHA-256 of their
  bearer token; a token is only ever sent inside a Flower message to its platform's SuperNode.
* ``LeaseKeeper``: runs in the Grid's thread. It pushes a ``query.lender_listen`` lease to
  every participant of the serving session, notices when a lease ended (its Flower reply),
  pushes the next one shortly before the current one ends (the SuperNode takes it the moment
  it answers the current one, so the hand-over costs one ClientApp start, not a 3 s poll),
  and stops every lease before the Grid needs the SuperNodes for anything else.
* ``channel_routes``: the two endpoints, hidden from the lender API's OpenAPI schema (they are
  not for lenders). A request with an unknown token gets 401, an answer to work that is not
  the platform's 403, to work already answered or given up 409; every refusal is logged.

Routing a hop: over the channel when the platform's worker is attached (it is long-polling,
or pulled within the last seconds), after waiting a moment for a lease that is about to
attach; otherwise the hop is a Flower message as before (a platform without ``channel-url``
refuses the lease, and the service keeps working, only slower).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from flwr.app import Message, RecordDict
from flwr.app.error import Error
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from protocols import channel as ch
from protocols import messages as m

log = logging.getLogger(__name__)

ATTACHED_GRACE_S = 5.0  # a worker between two pulls is still attached
MAX_ITEMS_PER_PULL = 16


@dataclass
class _Lease:
    lease_id: str
    platform: str
    session_id: str
    token_sha256: str
    expires_at: float  # monotonic, from the push (the worker starts a little later)
    message_id: str = ""
    last_pull: float | None = None
    polling: int = 0  # pulls waiting right now
    stop: bool = False
    ended: str | None = None
    successor_pushed: bool = False


@dataclass
class _Work:
    work_id: str
    platform: str
    message_type: str
    content: str
    future: cf.Future[RecordDict | Error] = field(default_factory=cf.Future)
    taken: bool = False


def polling_now(lease: _Lease, now: float) -> bool:
    """Its worker is long-polling, or pulled within the last seconds (between two pulls)."""
    return lease.polling > 0 or (
        lease.last_pull is not None and now - lease.last_pull < ATTACHED_GRACE_S
    )


class ChannelRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ChannelBroker:
    """Work queues per platform, answers by work id, leases by token digest."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._leases: dict[str, _Lease] = {}
        self._queues: dict[str, deque[_Work]] = {}
        self._work: dict[str, _Work] = {}
        self.answered = 0

    # ------------------------------------------------------------- the Grid's thread
    def new_lease(self, platform: str, session_id: str, lease_s: int) -> tuple[_Lease, str]:
        token = secrets.token_hex(32)
        lease = _Lease(
            lease_id=uuid.uuid4().hex,
            platform=platform,
            session_id=session_id,
            token_sha256=_digest(token),
            expires_at=time.monotonic() + lease_s,
        )
        with self._cond:
            self._leases[lease.token_sha256] = lease
        return lease, token

    def leases(self, platform: str | None = None) -> list[_Lease]:
        with self._cond:
            return [
                lease
                for lease in self._leases.values()
                if lease.ended is None and (platform is None or lease.platform == platform)
            ]

    def end(self, lease: _Lease, why: str) -> None:
        with self._cond:
            lease.ended = why
            self._leases.pop(lease.token_sha256, None)
            self._cond.notify_all()

    def stop_all(self) -> None:
        """Every worker's next (or current) pull answers ``stop``."""
        with self._cond:
            for lease in self._leases.values():
                lease.stop = True
            self._cond.notify_all()

    def _attached(self, platform: str, now: float) -> bool:
        return any(
            lease.platform == platform
            and lease.ended is None
            and not lease.stop
            and polling_now(lease, now)
            for lease in self._leases.values()
        )

    def attached(self, platform: str) -> bool:
        with self._cond:
            return self._attached(platform, time.monotonic())

    def live(self, platform: str) -> bool:
        """A lease of ``platform`` that may still attach (pushed, not ended, not stopped)."""
        with self._cond:
            return any(
                lease.platform == platform and lease.ended is None and not lease.stop
                for lease in self._leases.values()
            )

    def wait_attached(self, platform: str, timeout: float) -> bool:
        """True as soon as a worker of ``platform`` is attached, else False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._attached(platform, time.monotonic()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def call(
        self, platform: str, message_type: str, content: RecordDict, timeout: float
    ) -> RecordDict | Error:
        """Hand one work item to ``platform``'s worker and wait for its answer.

        Raises ``TimeoutError`` (the item is withdrawn: a late answer gets 409)."""
        work = _Work(uuid.uuid4().hex, platform, message_type, ch.encode_content(content))
        with self._cond:
            self._work[work.work_id] = work
            self._queues.setdefault(platform, deque()).append(work)
            self._cond.notify_all()
        try:
            return work.future.result(timeout=timeout)
        except cf.TimeoutError:
            raise TimeoutError(f"no answer over the channel within {timeout:.0f} s") from None
        finally:
            with self._cond:
                self._work.pop(work.work_id, None)
                queue = self._queues.get(platform)
                if queue is not None and work in queue:
                    queue.remove(work)

    # ------------------------------------------------------------- the API's threads
    def _lease_of(self, token: str, lease_id: str) -> _Lease:
        lease = self._leases.get(_digest(token))
        if lease is None or lease.lease_id != lease_id:
            raise ChannelRefused(401, "unknown or ended lease")
        return lease

    def pull(self, token: str, request: ch.PullRequest) -> ch.PullReply:
        """Long-poll: work for the lease's platform, or ``stop``, or nothing after wait_s."""
        deadline = time.monotonic() + request.wait_s
        with self._cond:
            lease = self._lease_of(token, request.lease_id)
            lease.polling += 1
            lease.last_pull = time.monotonic()
            self._cond.notify_all()  # wakes a hop waiting for this worker to attach
            try:
                while True:
                    queue = self._queues.get(lease.platform)
                    if lease.stop or lease.ended is not None:
                        return ch.PullReply(stop=True)
                    if queue:
                        items = []
                        while queue and len(items) < MAX_ITEMS_PER_PULL:
                            work = queue.popleft()
                            work.taken = True
                            items.append(
                                ch.WorkItem(
                                    work_id=work.work_id,
                                    message_type=work.message_type,
                                    content=work.content,
                                )
                            )
                        return ch.PullReply(items=tuple(items))
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return ch.PullReply()
                    self._cond.wait(left)
            finally:
                lease.polling -= 1
                lease.last_pull = time.monotonic()

    def reply(self, token: str, body: ch.WorkReply) -> None:
        with self._cond:
            lease = self._lease_of(token, body.lease_id)
            work = self._work.get(body.work_id)
            if work is None or work.future.done():
                raise ChannelRefused(409, "no such work waiting (answered, or given up)")
            if work.platform != lease.platform or not work.taken:
                raise ChannelRefused(403, "this work was not handed to this platform")
        if body.content is not None:
            try:
                result: RecordDict | Error = ch.decode_content(body.content, work.message_type)
            except m.ProtocolError as exc:  # the hop fails now, not at its timeout
                if work.future.set_running_or_notify_cancel():
                    work.future.set_result(Error(1, f"malformed answer over the channel: {exc}"))
                raise
        elif body.error_code is not None:
            result = Error(body.error_code, body.error_reason or "")
        else:
            raise ChannelRefused(422, "an answer needs a content or an error")
        if work.future.set_running_or_notify_cancel():
            work.future.set_result(result)
            self.answered += 1


def channel_routes(broker: ChannelBroker) -> APIRouter:
    """``POST /internal/v1/channel/pull`` and ``/reply`` (not in the lender API's schema)."""
    router = APIRouter(include_in_schema=False)

    def token_of(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ChannelRefused(401, "a lease token is required (Bearer)")
        return token.strip()

    async def parse(request: Request, model: type[Any]) -> Any:
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise ChannelRefused(422, f"malformed {model.__name__}: {exc.errors()[:3]}") from None

    async def guarded(request: Request, model: type[Any], act: Any) -> JSONResponse:
        try:
            token = token_of(request)
            body = await parse(request, model)
            result = await run_in_threadpool(act, token, body)
        except ChannelRefused as exc:
            log.warning("channel %s refused (%d): %s", request.url.path, exc.status, exc.reason)
            return JSONResponse({"error": "refused", "reason": exc.reason}, exc.status)
        except m.ProtocolError as exc:
            log.warning("channel %s refused: %s", request.url.path, exc)
            return JSONResponse({"error": "refused", "reason": str(exc)[:500]}, 422)
        return JSONResponse(result.model_dump(mode="json") if result is not None else {"ok": True})

    @router.post(ch.PULL_PATH)
    async def pull(request: Request) -> JSONResponse:
        return await guarded(request, ch.PullRequest, broker.pull)

    @router.post(ch.REPLY_PATH)
    async def reply(request: Request) -> JSONResponse:
        return await guarded(request, ch.WorkReply, broker.reply)

    return router


class LeaseKeeper:
    """Keeps a worker attached for every participant of the serving session (Grid thread)."""

    def __init__(self, broker: ChannelBroker, lease_s: int = 600, renew_before_s: float = 30.0):
        self.broker = broker
        self.lease_s = lease_s
        self.renew_before_s = min(renew_before_s, lease_s / 2)
        self.no_channel: dict[str, str] = {}  # platform -> why it refused a lease
        self._pending: dict[str, _Lease] = {}  # Flower message id -> lease

    def _push(self, grid: Any, session: Any, platform: str) -> None:
        lease, token = self.broker.new_lease(platform, session.session_id, self.lease_s)
        content = ch.ListenLease(
            lease_id=lease.lease_id,
            session_id=session.session_id,
            lease_s=self.lease_s,
            token=token,
        ).to_content()
        msg = Message(
            content, dst_node_id=session.nodes[platform], message_type="query.lender_listen"
        )
        (message_id,) = list(grid.push_messages([msg]))
        lease.message_id = message_id
        self._pending[message_id] = lease

    def start(self, grid: Any, session: Any) -> None:
        """One lease per participant (after the session opened; the SuperNodes are idle)."""
        self.no_channel.clear()
        for platform in session.participants:
            self._push(grid, session, platform)

    def tend(self, grid: Any, session: Any) -> None:
        """Collect ended leases and keep every platform with a channel covered."""
        if self._pending:
            for reply in grid.pull_messages(list(self._pending)):
                lease = self._pending.pop(reply.metadata.reply_to_message_id, None)
                if lease is None:
                    continue
                why = self._ended_because(reply, lease.platform)
                self.broker.end(lease, why)
                if why.startswith("refused") or why == "channel unreachable":
                    self.no_channel[lease.platform] = why  # Flower messages until the next session
        now = time.monotonic()
        for lease in list(self._pending.values()):
            # Its SuperNode is gone (a successor starts up to renew_before_s after its push).
            if lease.ended is None and now > lease.expires_at + self.renew_before_s + 60:
                self.broker.end(lease, "no reply after the lease's end")
                self._pending = {k: v for k, v in self._pending.items() if v is not lease}
        if session is None or session.expired:
            return
        for platform in session.participants:
            if platform in self.no_channel:
                continue
            live = [x for x in self._pending.values() if x.platform == platform and not x.stop]
            if not live:
                self._push(grid, session, platform)
            elif len(live) == 1 and live[0].expires_at - now < self.renew_before_s:
                self._push(grid, session, platform)  # waits at the SuperLink for the hand-over

    def route(self, grid: Any, session: Any, platform: str, timeout: float) -> str:
        """How a hop to ``platform`` travels: ``channel`` (a worker is attached), ``flower
        message`` (no lease of it is live: it has no channel, or none was offered), or
        ``timeout``: a lease is live but no worker attached within ``timeout`` (a Flower
        message would only queue behind the lease at the SuperNode)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.broker.attached(platform):
                return "channel"
            if not self.broker.live(platform):
                return "flower message"
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            self.tend(grid, session)  # a refused lease ends here
            self.broker.wait_attached(platform, min(0.25, left))

    def _ended_because(self, reply: Message, platform: str) -> str:
        if reply.has_error():
            reason = f"refused: {reply.error.reason}"[:300]
            log.warning("platform %s refused a channel lease: %s", platform, reason)
            return reason
        try:
            done = ch.ListenDone.from_content(reply.content, f"lease reply from {platform}")
        except m.ProtocolError as exc:
            return f"refused: {exc}"[:300]
        log.info("channel lease of %s ended (%s, %d hops)", platform, done.ended, done.handled)
        return done.ended

    def stop_all(self, grid: Any, wait_s: float) -> None:
        """Ask every worker to stop and wait (up to ``wait_s``) until the attached ones have
        answered their lease, so their SuperNodes are free for the Grid's next messages. A
        lease with no worker attached (its SuperNode is down, or has not started it) is
        simply ended: if it starts later, its first pull is refused and it returns."""
        self.broker.stop_all()
        waiting = {}
        for message_id, lease in list(self._pending.items()):
            lease.stop = True
            if polling_now(lease, time.monotonic()):
                waiting[message_id] = lease
            else:
                self.broker.end(lease, "stopped before it attached")
        self._pending = waiting
        deadline = time.monotonic() + wait_s
        while self._pending and time.monotonic() < deadline:
            self.tend(grid, None)
            time.sleep(0.05)
        for lease in self._pending.values():
            self.broker.end(lease, "stopped")
        self._pending.clear()

    def status(self) -> dict[str, str]:
        out = {p: f"no channel ({why})" for p, why in list(self.no_channel.items())}
        for lease in list(self._pending.values()):
            if lease.platform not in out or out[lease.platform] != "attached":
                out[lease.platform] = (
                    "attached" if self.broker.attached(lease.platform) else "lease pending"
                )
        return out
