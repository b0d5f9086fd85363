"""The key holder's two steps of a lender question (docs/lender-query.md).

1. **Unblind**: for each applicant, open the lender's sealed blob (its blinding scalar ``r``
   and answer key) with the delivery key of the named Paillier key and return
   ``F = r^-1 · y`` (``y`` the element every platform re-blinded). The coordinator, which
   holds the serving session's table, never sees ``r``; the key holder, which sees ``r`` and
   ``F``, never holds the table.
2. **Answer**: decrypt the one summed ciphertext that holds the applicant's slot, unpack it
   (a sum whose slots are not valid totals, as an uncancelled mask gives, is refused) and
   seal that slot's totals for the lender's answer key; the coordinator relays them unread.
   An applicant that no platform holds gets sealed zeros, so the coordinator's "not held"
   and the platforms' zero slots give the lender the same kind of answer.

Both steps refuse a key that cannot decrypt, fewer participants than the key holder's
minimum, and more items than its batch limit; both are appended to the key holder's audit
chain with counts only (never an element, a scalar or a total).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field

from protocols import blinding, lender_blinding
from protocols.packing import SlotOverflowError, debt_profile_layout
from protocols.paillier import InvalidCiphertext, decrypt_plaintexts
from server.keyholder import AuditLog, KeyHolderRefusal
from server.keystore import KeyRecord, Keystore

log = logging.getLogger(__name__)

MAX_LENDER_ITEMS = 1000


@dataclass(frozen=True)
class AnswerItem:
    """One applicant: its sealed blob, and where its totals are (None: nobody holds it)."""

    sealed: bytes
    ciphertext: int | None = None
    rows: int = 0  # rows packed in that plaintext
    slot: int = 0


class LenderDesk:
    """The key holder's lender steps over its keystore; transport-free like KeyHolderCore."""

    def __init__(
        self,
        keystore: Callable[[], Keystore],
        audit: AuditLog,
        *,
        min_participants: int,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._keystore = keystore
        self.audit = audit
        self.min_participants = min_participants
        self.clock = clock

    def _record(self, key_id: str, count: int) -> KeyRecord:
        if count > MAX_LENDER_ITEMS:
            raise KeyHolderRefusal(f"{count} items exceed the limit of {MAX_LENDER_ITEMS}", 413)
        rec = self._keystore().get(key_id)
        if rec is None:
            raise KeyHolderRefusal(f"unknown key id {key_id}", 404, "unknown_key")
        if not rec.can_decrypt(self.clock()) or rec.delivery_key is None:
            raise KeyHolderRefusal(f"key {key_id} cannot decrypt or seal", 409, "expired_key")
        return rec

    def _open(self, rec: KeyRecord, sealed: bytes) -> tuple[bytes, bytes]:
        assert rec.delivery_key is not None
        raw = rec.delivery_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return lender_blinding.open_sealed_secret(raw, sealed)

    def unblind(
        self, key_id: str, elements: Sequence[bytes], sealed: Sequence[bytes], caller: str = "?"
    ) -> list[bytes | None]:
        """``F`` per applicant, or None where the blob or the element is not acceptable."""
        if len(elements) != len(sealed):
            raise KeyHolderRefusal("elements and sealed secrets differ in number", 422)
        rec = self._record(key_id, len(elements))
        out: list[bytes | None] = []
        for element, blob in zip(elements, sealed, strict=True):
            try:
                secret, _ = self._open(rec, blob)
                out.append(lender_blinding.unblind(secret, element))
            except (lender_blinding.UnblindError, blinding.InvalidGroupElement):
                out.append(None)
        self.audit.append(
            {
                "event": "lender_unblind",
                "at": self.clock().isoformat(),
                "key_id": key_id,
                "count": len(elements),
                "failed": sum(1 for f in out if f is None),
                "caller": caller,
            }
        )
        return out

    def answer(
        self,
        key_id: str,
        participants: Sequence[str],
        items: Sequence[AnswerItem],
        caller: str = "?",
    ) -> list[bytes]:
        """Each applicant's totals sealed for its lender's answer key."""
        if len(set(participants)) < self.min_participants:
            raise KeyHolderRefusal(
                f"{len(set(participants))} participants, at least {self.min_participants} needed",
                403,
                "too_few_participants",
            )
        rec = self._record(key_id, len(items))
        assert rec.private_key is not None
        key_bits = int(rec.public_key.n).bit_length()
        layout = debt_profile_layout(len(participants))
        held = [i for i, item in enumerate(items) if item.ciphertext is not None]
        # Applicants of one round often share a packed plaintext: decrypt each sum once.
        unique = list(dict.fromkeys(items[i].ciphertext for i in held))
        try:
            opened = dict(zip(unique, decrypt_plaintexts(rec.private_key, unique), strict=True))  # type: ignore[arg-type]
            plain = [opened[items[i].ciphertext] for i in held]
        except InvalidCiphertext as exc:
            raise KeyHolderRefusal(
                f"invalid ciphertext: {exc}", 422, "invalid_ciphertext"
            ) from None
        totals: list[tuple[int, int, int]] = [(0, 0, 0)] * len(items)
        for i, p in zip(held, plain, strict=True):
            item = items[i]
            if not 0 <= item.slot < item.rows:
                raise KeyHolderRefusal(f"item {i}: slot {item.slot} of {item.rows} rows", 422)
            try:
                row = layout.unpack([p], item.rows, key_bits)[item.slot]
            except (SlotOverflowError, ValueError) as exc:
                raise KeyHolderRefusal(
                    f"item {i}: the sum is not valid totals (an uncancelled mask?): {exc}",
                    422,
                    "invalid_sums",
                ) from None
            totals[i] = (int(row[0]), int(row[1]), int(row[2]))
        out = []
        for item, row in zip(items, totals, strict=True):
            try:
                _, answer_public = self._open(rec, item.sealed)
            except lender_blinding.UnblindError as exc:
                raise KeyHolderRefusal(str(exc), 422, "bad_sealed_secret") from None
            out.append(lender_blinding.seal_answer(answer_public, row))
        self.audit.append(
            {
                "event": "lender_answer",
                "at": self.clock().isoformat(),
                "key_id": key_id,
                "participants": list(participants),
                "count": len(items),
                "decrypted": len(held),
                "caller": caller,
            }
        )
        return out


# ------------------------------------------------------------------------------ HTTP bodies

ROUTE_UNBLIND = "/v1/lender/unblind"
ROUTE_ANSWER = "/v1/lender/answer"


class UnblindBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(min_length=1, max_length=64)
    elements: list[str] = Field(max_length=MAX_LENDER_ITEMS)
    sealed: list[str] = Field(max_length=MAX_LENDER_ITEMS)


class AnswerItemBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sealed: str = Field(max_length=400)
    ciphertext: str | None = Field(default=None, max_length=4096)
    rows: int = Field(default=0, ge=0, le=1000)
    slot: int = Field(default=0, ge=0, le=1000)


class AnswerBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(min_length=1, max_length=64)
    participants: list[str] = Field(min_length=1, max_length=64)
    items: list[AnswerItemBody] = Field(max_length=MAX_LENDER_ITEMS)


def _unb64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyHolderRefusal(f"{what}: not base64", 422, "invalid") from None


def serve_unblind(desk: LenderDesk, body: UnblindBody, caller: str) -> dict[str, Any]:
    elements = [_unb64(e, "elements") for e in body.elements]
    sealed = [_unb64(s, "sealed") for s in body.sealed]
    found = desk.unblind(body.key_id, elements, sealed, caller)
    return {"pseudonyms": [None if f is None else base64.b64encode(f).decode() for f in found]}


def serve_answer(desk: LenderDesk, body: AnswerBody, caller: str) -> dict[str, Any]:
    items = [
        AnswerItem(
            sealed=_unb64(i.sealed, "sealed"),
            ciphertext=None
            if i.ciphertext is None
            else int.from_bytes(_unb64(i.ciphertext, "ciphertext"), "big"),
            rows=i.rows,
            slot=i.slot,
        )
        for i in body.items
    ]
    boxes = desk.answer(body.key_id, body.participants, items, caller)
    return {"sealed": [base64.b64encode(b).decode() for b in boxes]}


def unblind_request(key_id: str, elements: Sequence[bytes], sealed: Sequence[bytes]) -> dict:  # type: ignore[type-arg]
    b64 = base64.b64encode
    return {
        "key_id": key_id,
        "elements": [b64(e).decode() for e in elements],
        "sealed": [b64(s).decode() for s in sealed],
    }


def answer_request(key_id: str, participants: Sequence[str], items: Sequence[AnswerItem]) -> dict:  # type: ignore[type-arg]
    def ct(value: int | None) -> str | None:
        if value is None:
            return None
        return base64.b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).decode()

    return {
        "key_id": key_id,
        "participants": list(participants),
        "items": [
            {
                "sealed": base64.b64encode(i.sealed).decode(),
                "ciphertext": ct(i.ciphertext),
                "rows": i.rows,
                "slot": i.slot,
            }
            for i in items
        ],
    }
