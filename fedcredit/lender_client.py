"""What a lender runs: turn national IDs into a consented, blinded question, and open answers.

Importable (``prepare_question``, ``open_answers``) and behind ``fedcredit query``. The
national ID never leaves the lender: it becomes the token under the platforms' token pepper,
then ``x = r·H(t)`` with a fresh ``r`` (``protocols.lender_blinding``); the lender signs a
consent record over ``x`` with its Ed25519 key and seals ``r`` (with a fresh answer key) for
the key holder, whose delivery key it takes from the key holder's signed announcement. Only
the lender can open the totals in the answer.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols import lender_blinding
from protocols.consent import make_consent
from protocols.tokens import token_for_national_id


@dataclass
class PreparedQuestion:
    """``body`` is what the lender sends; ``keep`` stays with it to open the answer."""

    body: dict[str, Any]
    keep: list[lender_blinding.BlindedApplicant]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prepare_tokens(
    tokens: Sequence[str],
    *,
    lender: str,
    signing_key: Ed25519PrivateKey,
    purpose: str,
    delivery_key: bytes,
    lifetime: dt.timedelta = dt.timedelta(minutes=10),
) -> PreparedQuestion:
    """A question about applicants given as tokens (the step after tokenising the IDs)."""
    keep, applicants = [], []
    for token in tokens:
        blinded = lender_blinding.blind_token(token, delivery_key)
        consent = make_consent(signing_key, blinded.element, lender, purpose, lifetime=lifetime)
        keep.append(blinded)
        applicants.append(
            {
                "element": _b64(blinded.element),
                "consent": consent.model_dump(),
                "sealed_secret": _b64(blinded.sealed),
            }
        )
    return PreparedQuestion({"purpose": purpose, "applicants": applicants}, keep)


def prepare_question(
    national_ids: Sequence[str],
    *,
    pepper: bytes,
    lender: str,
    signing_key: Ed25519PrivateKey,
    purpose: str,
    delivery_key: bytes,
    lifetime: dt.timedelta = dt.timedelta(minutes=10),
) -> PreparedQuestion:
    """A question about applicants given by national ID (normalised and checked first)."""
    tokens = [token_for_national_id(pepper, raw) for raw in national_ids]
    return prepare_tokens(
        tokens,
        lender=lender,
        signing_key=signing_key,
        purpose=purpose,
        delivery_key=delivery_key,
        lifetime=lifetime,
    )


def open_answers(prepared: PreparedQuestion, answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Each applicant's answer with its totals opened (debt in yuan and fen, loans, lenders)."""
    out = []
    for keep, item in zip(prepared.keep, answer["applicants"], strict=True):
        row = {k: v for k, v in item.items() if k != "sealed_totals"}
        sealed = item.get("sealed_totals")
        if sealed:
            debt, loans, lenders = lender_blinding.open_answer(
                keep.answer_key, base64.b64decode(sealed)
            )
            row.update(
                total_debt_fen=debt,
                total_debt_yuan=debt / 100,
                active_loans=loans,
                lenders=lenders,
            )
        out.append(row)
    return out
