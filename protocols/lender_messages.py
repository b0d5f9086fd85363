"""Messages of the lender question between the coordinator and the platforms.

Kept apart from ``protocols.messages`` (the batch protocol) so the two evolve separately; the
same strict style: frozen pydantic models, unknown fields refused, element bytes carried
beside the JSON, every count bounded. See docs/lender-query.md for the protocol.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BeforeValidator, Field, model_validator

from protocols.consent import NAME_PATTERN, SignedConsent
from protocols.messages import (
    MAX_PARTICIPANTS,
    QUERY_ID,
    BinaryPayload,
    Participants,
    Payload,
    _unique,
    _whole_elements,
)

MAX_LENDER_BATCH = 1000
MAX_SESSION_LIFETIME_S = 7 * 24 * 3600
MIN_SESSION_LIFETIME_S = 60


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


class ServeStart(Payload):
    """Opens a serving session: private matching whose secret lives for ``lifetime_s``."""

    session_id: str = Field(pattern=QUERY_ID.pattern)
    participants: Participants
    lifetime_s: int = Field(ge=MIN_SESSION_LIFETIME_S, le=MAX_SESSION_LIFETIME_S)

    @model_validator(mode="after")
    def _check(self) -> Self:
        _unique(self.participants)
        return self


class LenderBlind(BinaryPayload):
    """One hop of a lender question: apply the session secret to ``elements``.

    ``consents[k]`` is the lender's signed record for applicant ``k``; its ``element`` is the
    lender's ``x``, while ``elements[k]`` is ``x`` as re-blinded by the platforms before this
    one (``x`` itself at step 1).
    """

    BINARY_FIELDS = ("elements",)
    request_id: str = Field(pattern=QUERY_ID.pattern)
    session_id: str = Field(pattern=QUERY_ID.pattern)
    step: int = Field(ge=1, le=MAX_PARTICIPANTS)
    lender: str = Field(pattern=NAME_PATTERN)
    purpose: str = Field(pattern=NAME_PATTERN)
    count: int = Field(ge=1, le=MAX_LENDER_BATCH)
    consents: Annotated[tuple[SignedConsent, ...], BeforeValidator(_as_tuple)] = Field(
        min_length=1, max_length=MAX_LENDER_BATCH
    )
    elements: bytes

    @model_validator(mode="after")
    def _check(self) -> Self:
        _whole_elements(self.elements, self.count, MAX_LENDER_BATCH)
        if len(self.consents) != self.count:
            raise ValueError(f"{len(self.consents)} consent records for {self.count} elements")
        return self


class Refusal(Payload):
    """Why one applicant (``index``; -1 for the whole question) was refused."""

    index: int = Field(ge=-1, lt=MAX_LENDER_BATCH)
    reason: str = Field(min_length=1, max_length=300)


class LenderBlindReply(BinaryPayload):
    """The re-blinded elements (32 zero bytes where refused) and the refusals."""

    BINARY_FIELDS = ("elements",)
    request_id: str = Field(pattern=QUERY_ID.pattern)
    count: int = Field(ge=1, le=MAX_LENDER_BATCH)
    refused: Annotated[tuple[Refusal, ...], BeforeValidator(_as_tuple)] = Field(
        default=(), max_length=MAX_LENDER_BATCH + 1
    )
    elements: bytes

    @model_validator(mode="after")
    def _check(self) -> Self:
        _whole_elements(self.elements, self.count, MAX_LENDER_BATCH)
        return self
