"""The lender's consent record: a signed statement that it may ask about one blinded applicant.

Every lender question carries one record per applicant. The lender signs (Ed25519, from
``cryptography``) a canonical JSON of the applicant's blinded element (never the ID or token:
the element is a fresh random-looking group element), its own id, the purpose, the issue
time, the expiry and a random nonce. Each platform verifies the record with the lender key
pinned in its own ``policy.toml`` and checks it against its policy
(``clients/lender_policy.py``).

Guarantees
    * A record is bound to one blinded element: it cannot be reused for another applicant.
    * Nobody without the lender's private key can make a record the platforms accept, so a
      coordinator cannot ask in a lender's name.
Does not protect
    * Consent is the lender's assertion that it holds the applicant's consent; platforms can
      audit and rate-limit it, not check it against the applicant.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, field_validator

CONSENT_VERSION = "fedcredit-consent/v1"
MAX_LIFETIME = dt.timedelta(days=30)
CLOCK_SKEW = dt.timedelta(minutes=2)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ConsentError(ValueError):
    """A consent record that is malformed, unsigned by its lender, or outside its validity."""


class ConsentRecord(BaseModel):
    """What the lender signs; ``element`` is the applicant's blinded element (hex)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    element: str = Field(pattern=r"^[0-9a-f]{64}$")
    lender: str = Field(pattern=NAME_PATTERN)
    purpose: str = Field(pattern=NAME_PATTERN)
    issued_at: int = Field(ge=0, lt=2**40, description="Unix seconds")
    expires_at: int = Field(ge=0, lt=2**40, description="Unix seconds")
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")

    @field_validator("expires_at")
    @classmethod
    def _after_issue(cls, value: int, info) -> int:  # type: ignore[no-untyped-def]
        issued = info.data.get("issued_at")
        if issued is not None and value <= issued:
            raise ValueError("expires_at must be after issued_at")
        return value

    def signing_bytes(self) -> bytes:
        """The exact bytes signed: versioned, sorted-key JSON without spaces."""
        body = {"version": CONSENT_VERSION, **self.model_dump()}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def check_time(self, now: dt.datetime) -> str | None:
        """Why the record is not valid at ``now``, or None."""
        ts = now.timestamp()
        if self.issued_at > ts + CLOCK_SKEW.total_seconds():
            return "consent issued in the future"
        if self.expires_at <= ts:
            return "consent expired"
        if self.expires_at - self.issued_at > MAX_LIFETIME.total_seconds():
            return f"consent valid longer than {MAX_LIFETIME.days} days"
        return None


class SignedConsent(BaseModel):
    """A consent record and the lender's Ed25519 signature over ``signing_bytes``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    record: ConsentRecord
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")

    def verify(self, public_key: bytes) -> str | None:
        """Why the signature does not verify under ``public_key`` (raw 32 bytes), or None."""
        try:
            key = Ed25519PublicKey.from_public_bytes(public_key)
            key.verify(bytes.fromhex(self.signature), self.record.signing_bytes())
        except (InvalidSignature, ValueError):
            return "consent signature does not verify with the lender's pinned key"
        return None


def make_consent(
    key: Ed25519PrivateKey,
    element: bytes,
    lender: str,
    purpose: str,
    *,
    now: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(minutes=10),
) -> SignedConsent:
    """Sign a fresh consent record for one blinded element."""
    issued = int((now or dt.datetime.now(dt.UTC)).timestamp())
    record = ConsentRecord(
        element=bytes(element).hex(),
        lender=lender,
        purpose=purpose,
        issued_at=issued,
        expires_at=issued + int(lifetime.total_seconds()),
        nonce=secrets.token_hex(16),
    )
    return SignedConsent(record=record, signature=key.sign(record.signing_bytes()).hex())


def parse_consent(raw: object) -> SignedConsent:
    """Validate a received record (a dict or JSON text); errors become ``ConsentError``."""
    from pydantic import ValidationError

    try:
        if isinstance(raw, str | bytes):
            return SignedConsent.model_validate_json(raw)
        return SignedConsent.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'consent'}: {e['msg']}" for e in exc.errors()
        )
        raise ConsentError(f"malformed consent: {problems}") from None
