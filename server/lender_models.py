"""The lender-facing API's request and answer bodies (validated; OpenAPI comes from them).

Binary fields are base64 text. Every body is strict: unknown fields refused, sizes bounded,
so a hostile body gets a 422 naming the field, never a 500.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from protocols.consent import NAME_PATTERN, SignedConsent
from protocols.lender_messages import MAX_LENDER_BATCH
from server.serving import Applicant, QuestionAnswer

SEALED_SECRET_BYTES = 64 + 48  # r and the answer key, in a SealedBox


def _b64(size: int):  # type: ignore[no-untyped-def]
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("must be base64 text")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        if len(raw) != size:
            raise ValueError(f"must decode to {size} bytes, got {len(raw)}")
        return value

    return BeforeValidator(check)


Element = Annotated[str, _b64(32), Field(description="the blinded element x (base64, 32 bytes)")]
SealedSecret = Annotated[
    str, _b64(SEALED_SECRET_BYTES), Field(description="r and answer key sealed to the key holder")
]


class ApplicantIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    element: Element
    consent: SignedConsent
    sealed_secret: SealedSecret

    def to_applicant(self) -> Applicant:
        return Applicant(
            element=base64.b64decode(self.element),
            consent=self.consent,
            sealed=base64.b64decode(self.sealed_secret),
        )


class DebtProfileRequest(BaseModel):
    """One applicant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: str = Field(pattern=NAME_PATTERN)
    applicants: list[ApplicantIn] = Field(min_length=1, max_length=1)


class DebtProfileBatchRequest(BaseModel):
    """Up to 1,000 applicants."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: str = Field(pattern=NAME_PATTERN)
    applicants: list[ApplicantIn] = Field(min_length=1, max_length=MAX_LENDER_BATCH)


class ApplicantOut(BaseModel):
    status: str = Field(description="answered | refused")
    sealed_totals: str | None = Field(
        description="(debt fen, active loans, lenders) sealed for the lender's answer key"
    )
    refusals: dict[str, str] = Field(description="platform -> reason it refused")
    recent_inquiries: int = Field(description="earlier inquiries about this applicant")


class DebtProfileAnswer(BaseModel):
    query_id: str
    lender: str
    purpose: str
    contributors: list[str] = Field(description="the platforms whose figures every total sums")
    missing: dict[str, str] = Field(description="platforms that did not answer, and why")
    applicants: list[ApplicantOut]
    answered_at: str
    seconds: dict[str, float] = Field(default_factory=dict)
    hops_via: dict[str, str] = Field(
        default_factory=dict,
        description="platform -> how its hop travelled: channel | flower message",
    )


def answer_body(answer: QuestionAnswer, answered_at: str) -> DebtProfileAnswer:
    return DebtProfileAnswer(
        query_id=answer.query_id,
        lender=answer.lender,
        purpose=answer.purpose,
        contributors=list(answer.contributors),
        missing=answer.missing,
        applicants=[
            ApplicantOut(
                status=a.status,
                sealed_totals=base64.b64encode(a.sealed).decode() if a.sealed else None,
                refusals=a.refusals,
                recent_inquiries=a.recent_inquiries,
            )
            for a in answer.answers
        ],
        answered_at=answered_at,
        seconds=answer.seconds,
        hops_via=answer.hops_via,
    )
