"""Platform identities and the pinned roster of their public keys.

Every platform holds two long-term private keys: an X25519 key for pairwise key agreement
(the additive masks of ``protocols.masking``) and an Ed25519 key for signing what it sends.
The roster pins, for every platform name, the two public keys, and optionally the Ed25519
key of the decryption-key holder; every node loads the same roster and refuses peers and keys
not in it.

Guarantees
    * Identity files (``fedcredit-identity/v1``) are written atomically (temporary file in the
      same folder, then ``os.replace``) and are readable by their owner only (mode 0600 from
      creation, via ``mkstemp``: the private keys are never world-readable, even briefly).
    * Everything loaded is validated, errors naming the file and the field (``IdentityError``,
      ``RosterError``): exact format tag, no unknown or duplicate JSON keys, platform names
      matching ``PLATFORM_NAME_PATTERN``, keys as 64 lowercase hex characters, the stored
      public keys matching the private ones, roster agreement keys on Curve25519 and not of
      small order (``protocols.blinding.check_element``), signing keys valid points of the
      Ed25519 prime-order subgroup, no two platforms sharing an agreement key.
    * ``Roster.fingerprint`` is SHA-256 over a canonical JSON encoding, so operators can
      compare rosters out of band (read it aloud, print it) before trusting them.

Assumes
    * The roster reaches every node authentically (compared by fingerprint out of band, or
      distributed over an authenticated channel). Nothing here can tell a genuine roster from
      a substituted one: whoever can substitute a key can impersonate that platform towards
      the others and, for masking, break cancellation.
    * The file system protects identity files; they are not encrypted at rest.

Does not protect
    * Key rotation and revocation: replacing a key is an explicit ``--replace`` at enrolment
      followed by redistributing the roster; there is no revocation list or expiry.
    * Private keys in memory: Python cannot wipe them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from nacl import bindings as _nacl
from pydantic import (
    BaseModel,
    ConfigDict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from protocols.blinding import InvalidGroupElement, check_element

log = logging.getLogger(__name__)

PLATFORM_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
IDENTITY_FORMAT = "fedcredit-identity/v1"
ROSTER_FORMAT = "fedcredit-roster/v1"
_HEX64 = r"^[0-9a-f]{64}$"

PlatformName = Annotated[str, StringConstraints(pattern=PLATFORM_NAME_PATTERN, strict=True)]
Hex64 = Annotated[str, StringConstraints(pattern=_HEX64, strict=True)]


class IdentityError(ValueError):
    """An identity (or roster) file is missing, unreadable or invalid; names file and field."""


class RosterError(IdentityError):
    """A roster file or entry is invalid; names the file and the field."""


# ---------------------------------------------------------------------------- helpers


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not re.fullmatch(PLATFORM_NAME_PATTERN, name):
        raise IdentityError(
            f"platform name must match {PLATFORM_NAME_PATTERN} (letters, digits, _ . -), "
            f"got {name!r}"
        )
    return name


def _check_agreement_key(value: str) -> str:
    try:
        check_element(0, bytes.fromhex(value))
    except InvalidGroupElement as exc:
        reason = str(exc).removeprefix("element 0: ")
        raise ValueError(f"not a valid X25519 public key: {reason}") from None
    return value


def _check_signing_key(value: str) -> str:
    if not _nacl.crypto_core_ed25519_is_valid_point(bytes.fromhex(value)):
        raise ValueError("not a valid Ed25519 public key (not a prime-order-subgroup point)")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _read_json(path: Path, kind: str, error: type[IdentityError]) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {kind} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {kind} file: {exc}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None


def _atomic_write(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` via a same-folder temporary file and ``os.replace``.

    ``mkstemp`` creates the file with mode 0600, so secrets are never exposed; ``mode`` is
    applied before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# ---------------------------------------------------------------------------- roster


class RosterEntry(BaseModel):
    """A platform's pinned public keys (lowercase hex, 32 bytes each)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agreement_key: Hex64
    signing_key: Hex64

    @field_validator("agreement_key")
    @classmethod
    def _agreement(cls, value: str) -> str:
        return _check_agreement_key(value)

    @field_validator("signing_key")
    @classmethod
    def _signing(cls, value: str) -> str:
        return _check_signing_key(value)


class Roster(BaseModel):
    """The federation's pinned public keys: every platform's, and the key holder's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["fedcredit-roster/v1"] = ROSTER_FORMAT
    platforms: dict[PlatformName, RosterEntry] = {}
    keyholder_signing_key: Hex64 | None = None

    @field_validator("keyholder_signing_key")
    @classmethod
    def _keyholder(cls, value: str | None) -> str | None:
        return None if value is None else _check_signing_key(value)

    @model_validator(mode="after")
    def _distinct_keys(self) -> Roster:
        seen: dict[str, str] = {}
        for name, entry in self.platforms.items():
            other = seen.get(entry.agreement_key)
            if other is not None:
                raise ValueError(f"platforms {other!r} and {name!r} share an agreement key")
            seen[entry.agreement_key] = name
        return self

    def agreement_keys(self) -> dict[str, bytes]:
        """Platform name -> raw X25519 public key, for ``masking.platform_mask``."""
        return {name: bytes.fromhex(e.agreement_key) for name, e in self.platforms.items()}

    def signing_keys(self) -> dict[str, bytes]:
        """Platform name -> raw Ed25519 public key."""
        return {name: bytes.fromhex(e.signing_key) for name, e in self.platforms.items()}

    def canonical_json(self) -> str:
        return _canonical_json(self.model_dump(mode="json"))

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON: equal rosters, equal fingerprints."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    def with_platform(self, name: str, entry: RosterEntry) -> Roster:
        """A new roster with ``name``'s entry added or replaced (validated again)."""
        platforms = {k: v.model_dump() for k, v in self.platforms.items()}
        platforms[name] = entry.model_dump()
        return Roster.model_validate({**self.model_dump(), "platforms": platforms})

    def with_keyholder(self, signing_key: str | None) -> Roster:
        """A new roster with the key holder's Ed25519 public key pinned (or unpinned)."""
        return Roster.model_validate({**self.model_dump(), "keyholder_signing_key": signing_key})


def _validation_message(path: Path, exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e["loc"]) or "document"
        parts.append(f"{where}: {e['msg']}")
    return f"{path}: " + "; ".join(parts)


def load_roster(path: Path | str) -> Roster:
    """Read and validate a roster file; ``RosterError`` names the file and the field."""
    path = Path(path)
    doc = _read_json(path, "roster", RosterError)
    if not isinstance(doc, dict):
        raise RosterError(f"{path}: roster must be a JSON object")
    try:
        return Roster.model_validate(doc)
    except ValidationError as exc:
        raise RosterError(_validation_message(path, exc)) from None


def save_roster(path: Path | str, roster: Roster) -> None:
    """Write a roster atomically (mode 0644: it holds public keys only)."""
    text = json.dumps(roster.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), text, 0o644)
    log.info("roster %s written (fingerprint %s)", path, roster.fingerprint()[:16])


# ---------------------------------------------------------------------------- identity


def _raw_private(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, eq=False, repr=False)
class PlatformIdentity:
    """A platform's name and long-term private keys (X25519 agreement, Ed25519 signing)."""

    name: str
    agreement_key: X25519PrivateKey
    signing_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        _check_name(self.name)

    def __repr__(self) -> str:  # never print private keys
        return f"PlatformIdentity(name={self.name!r})"

    @classmethod
    def generate(cls, name: str) -> PlatformIdentity:
        """Fresh keys from the OS CSPRNG."""
        return cls(_check_name(name), X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    def public_entry(self) -> RosterEntry:
        return RosterEntry(
            agreement_key=_raw_public(self.agreement_key).hex(),
            signing_key=_raw_public(self.signing_key).hex(),
        )

    def save(self, path: Path | str) -> None:
        """Write ``fedcredit-identity/v1`` JSON atomically, mode 0600."""
        entry = self.public_entry()
        doc = {
            "format": IDENTITY_FORMAT,
            "name": self.name,
            "agreement_private_key": _raw_private(self.agreement_key).hex(),
            "signing_private_key": _raw_private(self.signing_key).hex(),
            "agreement_key": entry.agreement_key,
            "signing_key": entry.signing_key,
        }
        _atomic_write(Path(path), json.dumps(doc, indent=2) + "\n", 0o600)
        log.info("identity of %s written to %s", self.name, path)


_IDENTITY_FIELDS = (
    "format",
    "name",
    "agreement_private_key",
    "signing_private_key",
    "agreement_key",
    "signing_key",
)


def load_identity(path: Path | str) -> PlatformIdentity:
    """Read an identity file; ``IdentityError`` names the file and the field."""
    path = Path(path)
    doc = _read_json(path, "identity", IdentityError)
    if not isinstance(doc, dict):
        raise IdentityError(f"{path}: identity must be a JSON object")
    unknown = sorted(set(doc) - set(_IDENTITY_FIELDS))
    if unknown:
        raise IdentityError(f"{path}: unknown field(s): {', '.join(unknown)}")
    for field in _IDENTITY_FIELDS:
        if field not in doc:
            raise IdentityError(f"{path}: field {field!r} is missing")
        if not isinstance(doc[field], str):
            raise IdentityError(f"{path}: field {field!r} must be a string")
    if doc["format"] != IDENTITY_FORMAT:
        raise IdentityError(f"{path}: field 'format' must be {IDENTITY_FORMAT!r}")
    try:
        name = _check_name(doc["name"])
    except IdentityError as exc:
        raise IdentityError(f"{path}: field 'name': {exc}") from None
    for field in _IDENTITY_FIELDS[2:]:
        if not re.fullmatch(_HEX64, doc[field]):
            raise IdentityError(f"{path}: field {field!r} must be 64 lowercase hex characters")
    agreement = X25519PrivateKey.from_private_bytes(bytes.fromhex(doc["agreement_private_key"]))
    signing = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(doc["signing_private_key"]))
    if _raw_public(agreement).hex() != doc["agreement_key"]:
        raise IdentityError(f"{path}: field 'agreement_key' does not match the private key")
    if _raw_public(signing).hex() != doc["signing_key"]:
        raise IdentityError(f"{path}: field 'signing_key' does not match the private key")
    return PlatformIdentity(name, agreement, signing)
