"""The platform's side of the platform channel (``protocols/channel.py`` says why).

``query.lender_listen`` hands the platform a lease: for ``lease_s`` seconds this ClientApp
process stays alive and long-polls the bureau's channel for lender hops, answering each with
the very handler a ``query.lender_blind`` Flower message gets
(``clients.lender_handlers.answer_lender_blind``: consent, policy, rate limit, query log,
blinding). One process, warm, instead of one per hop.

What the platform controls, not the bureau:
* where it dials: ``channel-url`` in its own node config (``fedcredit deploy init`` writes
  it), and whose certificate it accepts: ``channel-ca`` (the deployment CA). A platform with
  no ``channel-url`` refuses the lease, and the bureau falls back to one Flower message a hop;
* what it answers: only ``query.lender_blind`` for the leased serving session; anything else
  is answered with a refusal, as a hostile Flower message would be.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

import httpx
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error

from clients import matching
from protocols import channel as ch
from protocols import messages as m

log = logging.getLogger(__name__)

PULL_WAIT_S = 20.0
UNREACHABLE_GIVE_UP_S = 15.0


def _client(ctx: Context, token: str) -> httpx.Client:
    url = ctx.node_config.get("channel-url")
    if not isinstance(url, str) or not url:
        raise m.ProtocolError(
            "query.lender_listen: this platform has no bureau channel (node config channel-url)"
        )
    if not url.startswith("https://"):
        raise m.ProtocolError(f"query.lender_listen: channel-url {url!r} is not https")
    ca = ctx.node_config.get("channel-ca")
    verify: Any = ssl.create_default_context(cafile=ca) if isinstance(ca, str) and ca else True
    return httpx.Client(
        base_url=url,
        verify=verify,
        headers={"authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(10.0, read=ch.MAX_PULL_WAIT_S + 10.0),
    )


def _answer(item: ch.WorkItem, lease: ch.ListenLease, ctx: Context, location: str) -> ch.WorkReply:
    from clients.lender_handlers import answer_lender_blind, guarded

    def run() -> RecordDict:
        if item.message_type not in ch.CHANNEL_MESSAGE_TYPES:
            raise m.ProtocolError(f"channel: {item.message_type!r} is not answered here")
        content = ch.decode_content(item.content, item.message_type)
        return answer_lender_blind(content, ctx, location, leased_session=lease.session_id)

    result = guarded(item.message_type, run)
    if isinstance(result, Error):
        return ch.WorkReply(
            lease_id=lease.lease_id,
            work_id=item.work_id,
            error_code=int(result.code),
            error_reason=str(result.reason)[:1000],
        )
    return ch.WorkReply(
        lease_id=lease.lease_id, work_id=item.work_id, content=ch.encode_content(result)
    )


def listen(msg: Message, ctx: Context, location: str) -> RecordDict:
    """Serve lender hops over the channel until the lease ends; then answer the message."""
    what = "query.lender_listen"
    lease = ch.ListenLease.from_content(msg.content, what)
    session = matching.load_session(ctx, lease.session_id, what)
    if not session.serving_until or not session.secret:
        raise m.ProtocolError(f"{what}: session {lease.session_id} is not an open serving session")
    ends = time.monotonic() + min(lease.lease_s, max(0.0, session.serving_until - time.time()))
    handled = 0
    ended = "lease over"
    failing_since: float | None = None
    with _client(ctx, lease.token) as client:
        log.info("channel lease %s: listening for %.0f s", lease.lease_id, ends - time.monotonic())
        while (left := ends - time.monotonic()) > 0:
            wait = min(PULL_WAIT_S, left)
            try:
                got = client.post(
                    ch.PULL_PATH, json={"lease_id": lease.lease_id, "wait_s": round(wait, 3)}
                )
                if got.status_code in (401, 403):
                    ended = "token refused"
                    break
                got.raise_for_status()
                pulled = ch.PullReply.model_validate_json(got.content)
            except (httpx.HTTPError, ValueError) as exc:
                failing_since = failing_since or time.monotonic()
                # A certificate the platform's CA did not sign will not get better: stop now.
                untrusted = "CERTIFICATE_VERIFY_FAILED" in str(exc)
                if untrusted or time.monotonic() - failing_since > UNREACHABLE_GIVE_UP_S:
                    log.warning("channel lease %s: bureau unreachable: %s", lease.lease_id, exc)
                    ended = "channel unreachable"
                    break
                time.sleep(0.5)
                continue
            failing_since = None
            for item in pulled.items:
                reply = _answer(item, lease, ctx, location)
                try:
                    client.post(
                        ch.REPLY_PATH,
                        content=reply.model_dump_json(),
                        headers={"content-type": "application/json"},
                    ).raise_for_status()
                except httpx.HTTPError as exc:  # the bureau gave up on it (timeout): logged
                    log.warning("channel: reply to work %s not taken: %s", item.work_id, exc)
                handled += 1
            if pulled.stop:
                ended = "asked to stop"
                break
    log.info("channel lease %s ended (%s) after %d hops", lease.lease_id, ended, handled)
    return ch.ListenDone(lease_id=lease.lease_id, handled=handled, ended=ended).to_content()
