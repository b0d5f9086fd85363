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


class QuestionSpan(Payload):
    """``count`` consecutive records of one lender question (its lender and purpose)."""

    lender: str = Field(pattern=NAME_PATTERN)
    purpose: str = Field(pattern=NAME_PATTERN)
    count: int = Field(ge=1, le=MAX_LENDER_BATCH)


class LenderBlind(BinaryPayload):
    """One hop of a round of lender questions: apply the session secret to ``elements``.

    Concurrent questions travel together (one platform message per hop, whatever the number
    of lenders): ``questions`` cuts the records into the lenders' questions, in order.
    ``consents[k]`` is the lender's signed record for applicant ``k``; its ``element`` is the
    lender's ``x``, while ``elements[k]`` is ``x`` as re-blinded by the platforms before this
    one (``x`` itself at step 1).
    """

    BINARY_FIELDS = ("elements",)
    request_id: str = Field(pattern=QUERY_ID.pattern)
    session_id: str = Field(pattern=QUERY_ID.pattern)
    step: int = Field(ge=1, le=MAX_PARTICIPANTS)
    questions: Annotated[tuple[QuestionSpan, ...], BeforeValidator(_as_tuple)] = Field(
        min_length=1, max_length=MAX_LENDER_BATCH
    )
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
        if sum(q.count for q in self.questions) != self.count:
            raise ValueError("the questions do not cover the records exactly")
        return self


class Refusal(Payload):
    """Why one applicant (record ``index``) was refused."""

    index: int = Field(ge=0, lt=MAX_LENDER_BATCH)
    reason: str = Field(min_length=1, max_length=300)


class LenderBlindReply(BinaryPayload):
    """The re-blinded elements (32 zero bytes where refused) and the refusals."""

    BINARY_FIELDS = ("elements",)
    request_id: str = Field(pattern=QUERY_ID.pattern)
    count: int = Field(ge=1, le=MAX_LENDER_BATCH)
    refused: Annotated[tuple[Refusal, ...], BeforeValidator(_as_tuple)] = Field(
        default=(), max_length=MAX_LENDER_BATCH
    )
    elements: bytes

    @model_validator(mode="after")
    def _check(self) -> Self:
        _whole_elements(self.elements, self.count, MAX_LENDER_BATCH)
        return self
