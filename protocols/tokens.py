"""Pseudonymous borrower tokens: the only borrower identifier that any ledger or message holds.

Guarantees
    A token is HMAC-SHA256 of the *normalised* national ID under the federation key, so
    the same person gets the same token on every platform and at the bureau (which needs
    it to ask about an applicant), and different spellings of one ID ("11010119900307803x",
    "110101 19900307 803X", full-width digits) map to one token. Without the key a token
    reveals nothing about the ID, and tokens cannot be linked to tokens under another key.

Assumes
    The federation key is a secret shared by the platforms and the bureau only (32 random
    bytes from ``generate_federation_key``), distributed out of band and kept out of git.

Does not protect
    Anyone who holds the key can test a guessed ID against a token (national IDs have
    little entropy: region, birth date, sequence). The key is therefore as sensitive as the
    IDs themselves; rotating it re-pseudonymises every ledger.

Why the standard library's ``hmac``: HMAC-SHA256 is exactly the primitive, and
``hmac.digest`` runs in C with no per-call object, which matters when a generator or an
import hashes a million IDs.
"""

from __future__ import annotations

import hmac
import secrets
import unicodedata
from collections.abc import Iterable
from pathlib import Path

FEDERATION_KEY_BYTES = 32
TOKEN_HEX_CHARS = 64

# ISO 7064 MOD 11-2 weights and check characters of the PRC resident identity number (GB 11643).
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_SEPARATORS = str.maketrans("", "", " -\t")


class InvalidNationalID(ValueError):
    """A national ID that cannot be normalised: wrong length, characters or check digit."""


class InvalidFederationKey(ValueError):
    """A federation key of the wrong size or encoding."""


def generate_federation_key() -> bytes:
    """Return a fresh random federation key."""
    return secrets.token_bytes(FEDERATION_KEY_BYTES)


def check_digit(first17: str) -> str:
    """The GB 11643 check character for the first 17 digits of an 18-character ID."""
    total = sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def normalise_national_id(raw: str) -> str:
    """Canonical 18-character form of a PRC resident ID, check digit verified.

    Accepts full-width characters, spaces and hyphens, a lower-case ``x``, and the old
    15-digit form (born 19xx, no check digit), which is widened to 18 characters the way
    the Ministry of Public Security did, so both forms of one person's ID give one token.
    """
    if not isinstance(raw, str):
        raise InvalidNationalID(f"national ID must be text, got {type(raw).__name__}")
    text = unicodedata.normalize("NFKC", raw).translate(_SEPARATORS).upper()
    if len(text) == 15 and text.isdigit():
        body = text[:6] + "19" + text[6:]
        return body + check_digit(body)
    if len(text) != 18:
        raise InvalidNationalID(f"national ID must have 15 or 18 characters, got {len(text)}")
    body, check = text[:17], text[17]
    if not body.isascii() or not body.isdigit():
        raise InvalidNationalID("national ID: the first 17 characters must be digits")
    if check != check_digit(body):
        raise InvalidNationalID("national ID: check digit does not match")
    return text


def token_for_normalised(key: bytes, normalised: str) -> str:
    """Token (hex HMAC-SHA256) of an already normalised identifier."""
    return hmac.digest(key, normalised.encode("ascii"), "sha256").hex()


def token_for_national_id(key: bytes, raw_id: str) -> str:
    """Token of a raw national ID: normalise, verify, then HMAC."""
    _check_key(key)
    return token_for_normalised(key, normalise_national_id(raw_id))


def token_for_customer_number(key: bytes, namespace: str, raw: str) -> str:
    """Token of an opaque customer number (data without national IDs, such as UCI's).

    The namespace keeps one source's customer 17 apart from another's: such tokens link
    rows within one source only, never across platforms, and the docs say so.
    """
    _check_key(key)
    text = unicodedata.normalize("NFKC", str(raw)).strip()
    if not text:
        raise InvalidNationalID("customer number is empty")
    return hmac.digest(key, f"customer:{namespace}:{text}".encode(), "sha256").hex()


def tokens_for_normalised(key: bytes, normalised_ids: Iterable[str]) -> list[str]:
    """Tokens of many normalised IDs (the generator's and the importer's bulk path)."""
    _check_key(key)
    digest = hmac.digest
    return [digest(key, s.encode("ascii"), "sha256").hex() for s in normalised_ids]


def key_id(key: bytes) -> str:
    """A public fingerprint of the federation key, stored in every ledger.

    Lets a node refuse to mix tokens made under different keys without revealing the key.
    """
    _check_key(key)
    return hmac.digest(key, b"fedcredit key id v1", "sha256").hex()[:16]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != FEDERATION_KEY_BYTES:
        raise InvalidFederationKey(
            f"federation key must be {FEDERATION_KEY_BYTES} bytes, "
            f"got {len(key) if isinstance(key, bytes | bytearray) else type(key).__name__}"
        )


def write_federation_key(path: Path, key: bytes) -> None:
    """Write a key file (hex, one line) readable by its owner only."""
    _check_key(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(key.hex() + "\n", encoding="ascii")
    tmp.chmod(0o600)
    tmp.replace(path)


def read_federation_key(path: Path) -> bytes:
    """Read a key file written by ``write_federation_key``; errors name the file."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise InvalidFederationKey(f"{path}: federation key file not found") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise InvalidFederationKey(f"{path}: cannot read federation key: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise InvalidFederationKey(f"{path}: federation key must be hex") from None
    if len(key) != FEDERATION_KEY_BYTES:
        raise InvalidFederationKey(
            f"{path}: federation key must be {FEDERATION_KEY_BYTES} bytes "
            f"({2 * FEDERATION_KEY_BYTES} hex characters), got {len(key)} bytes"
        )
    return key
