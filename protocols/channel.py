"""The platform channel: lender hops without a Flower message per hop.

Why it exists. On Flower 1.41's deployment engine every message to a SuperNode waits for the
SuperNode's next poll (every 3 s when idle, hard-coded in
``flwr/supernode/start_client_internal.py``) and runs in a fresh ``flwr-clientapp`` process.
A lender question needs one hop per platform in ring order, so it took 9 s a hop, 27 s a
question (docs/lender-query.md has the measured breakdown). The channel keeps the Flower
message for what it is good at (routing to an authenticated SuperNode, carrying a credential)
and moves the per-question traffic onto a connection the platform opens itself:

1. The bureau sends each platform a ``query.lender_listen`` message (``ListenLease``): a
   serving session, a lease length and a fresh random bearer token. Only that platform's
   SuperNode receives it (SuperNode authentication, TLS), so the token proves "this is the
   enrolled platform" to the bureau's API.
2. The platform's ClientApp, while it handles that message, dials the bureau's channel URL
   from its *own* node config (never from the message: the bureau cannot point a platform
   elsewhere), verifies the bureau's TLS certificate against the deployment CA, and
   long-polls ``POST /internal/v1/channel/pull`` for work. Each work item is a
   ``query.lender_blind`` content, byte for byte as the Flower message would carry it
   (Flower's own RecordDict protobuf), answered by the same handler and posted back to
   ``/internal/v1/channel/reply``.
3. At the lease's end (or when the bureau asks it to stop) the ClientApp answers the Flower
   message with ``ListenDone`` and the SuperNode is free for other messages.

Nothing new crosses: the same messages, between the same two parties, over TLS, validated by
the same pydantic models on both sides. Only ``query.lender_blind`` travels on the channel.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field

from protocols.messages import QUERY_ID, Payload, ProtocolError

CHANNEL_MESSAGE_TYPES = ("query.lender_blind",)
MIN_LEASE_S = 10
MAX_LEASE_S = 24 * 3600
MAX_PULL_WAIT_S = 30.0
# A lender_blind content for 1,000 applicants is about 400 KB; base64 adds a third.
MAX_CONTENT_BYTES = 4 * 1024 * 1024
TOKEN_HEX = r"^[0-9a-f]{64}$"
PULL_PATH = "/internal/v1/channel/pull"
REPLY_PATH = "/internal/v1/channel/reply"


class ListenLease(Payload):
    """``query.lender_listen``: serve lender hops of ``session_id`` over the channel."""

    lease_id: str = Field(pattern=QUERY_ID.pattern)
    session_id: str = Field(pattern=QUERY_ID.pattern)
    lease_s: int = Field(ge=MIN_LEASE_S, le=MAX_LEASE_S)
    token: str = Field(pattern=TOKEN_HEX)


class ListenDone(Payload):
    """The lease ended: how many work items the platform answered, and why it stopped."""

    lease_id: str = Field(pattern=QUERY_ID.pattern)
    handled: int = Field(ge=0)
    ended: Literal["lease over", "asked to stop", "channel unreachable", "token refused"]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class PullRequest(_Wire):
    lease_id: str = Field(pattern=QUERY_ID.pattern)
    wait_s: float = Field(ge=0, le=MAX_PULL_WAIT_S)


class WorkItem(_Wire):
    work_id: str = Field(pattern=QUERY_ID.pattern)
    message_type: str = Field(max_length=64)
    content: str = Field(max_length=MAX_CONTENT_BYTES, description="base64 RecordDict")


class PullReply(_Wire):
    items: tuple[WorkItem, ...] = ()
    stop: bool = False


class WorkReply(_Wire):
    """The answer to one work item: a content, or an error code and reason (as a Flower
    ``Error``)."""

    lease_id: str = Field(pattern=QUERY_ID.pattern)
    work_id: str = Field(pattern=QUERY_ID.pattern)
    content: str | None = Field(default=None, max_length=MAX_CONTENT_BYTES)
    error_code: int | None = Field(default=None, ge=0, le=2**31)
    error_reason: str | None = Field(default=None, max_length=1000)


def encode_content(content: RecordDict) -> str:
    """A RecordDict as Flower serialises it, in base64 (the channel's JSON carries it)."""
    return base64.b64encode(recorddict_to_proto(content).SerializeToString()).decode()


def decode_content(text: str, what: str) -> RecordDict:
    """The inverse; any malformed input is a ``ProtocolError`` naming ``what``."""
    try:
        raw = base64.b64decode(text, validate=True)
        return recorddict_from_proto(ProtoRecordDict.FromString(raw))
    except (binascii.Error, ValueError, DecodeError, TypeError, KeyError) as exc:
        raise ProtocolError(f"{what}: content is not a Flower RecordDict: {exc}") from exc
