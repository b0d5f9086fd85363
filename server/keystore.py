"""The key holder's keystore: Paillier key pairs and its Ed25519 signing key, encrypted at rest.

Why a file of its own: the decryption key must live apart from the coordinator, survive
restarts and rotate, and a stolen disk or backup must not yield it. So every private value
(the Ed25519 signing key; each Paillier key's factors ``p`` and ``q`` and the X25519
delivery key that goes with it) is sealed with
ChaCha20-Poly1305 under a 32-byte storage key that the operator supplies at every start:

* a passphrase (``--passphrase-env`` / ``--passphrase-file``), stretched with Scrypt
  (``n = 2**15, r = 8, p = 1``, random 16-byte salt kept in the file), or
* a raw key file holding 32 random bytes in hex (``--key-file``), e.g. from a secrets manager.

Each sealed value's associated data names what it is (format, purpose, key id), so sealed
blobs cannot be swapped between entries; and one more AEAD tag over the canonical public
part (key list, statuses, bearer-token hash, settings) makes tampering with the file
detectable. A wrong passphrase is reported as such, naming the keystore, never as a traceback.

Format ``fedcredit-keystore/v1`` (JSON, written atomically via a temporary file and
``os.replace``, mode 0600). Key ids are the first 16 hex chars of SHA-256 over
``public_key_to_bytes(pk)``. Rotation makes a new active key; the previous key is retired but
keeps its private half for a grace period (default one day) so in-flight queries finish; after
that, or at ``retire``, the private half is erased from the file.

Does not protect: a running key holder holds the storage key and private keys in memory;
anyone who controls that process or its memory controls the keys. Nor against an attacker who
can both read the file and learn the passphrase.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from protocols.key_announcement import KeyAnnouncement, key_id_for, sign_announcement
from protocols.paillier import (
    PaillierPrivateKey,
    PaillierPublicKey,
    generate_keypair,
    public_key_to_bytes,
)

log = logging.getLogger(__name__)

FORMAT = "fedcredit-keystore/v1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
DEFAULT_GRACE = dt.timedelta(days=1)

__all__ = [
    "DEFAULT_GRACE",
    "FORMAT",
    "KeyRecord",
    "Keystore",
    "KeystoreError",
    "KeystoreSecret",
    "WatchedKeystore",
    "atomic_write",
]


class KeystoreError(Exception):
    """A keystore that cannot be used as asked; the message names the file and the reason."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ts(when: dt.datetime | None) -> str | None:
    return None if when is None else when.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _parse_ts(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via a fresh temporary file and ``os.replace``.

    Readers see the old file or the new one, never a half-written one; the file is created
    with ``mode`` (0600: only the owner can read secrets or hashes).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# -------------------------------------------------------------------------------- secrets


class KeystoreSecret:
    """What unlocks a keystore: a passphrase (Scrypt-stretched) or a raw 32-byte key.

    Derived storage keys are cached per salt so that reloading a rotated keystore inside a
    running service does not pay Scrypt (about 0.1 s, 32 MiB) again.
    """

    def __init__(self, *, passphrase: bytes | None = None, raw_key: bytes | None = None) -> None:
        if (passphrase is None) == (raw_key is None):
            raise KeystoreError("give exactly one of a passphrase or a raw key")
        if passphrase is not None and not passphrase:
            raise KeystoreError("the passphrase is empty")
        if raw_key is not None and len(raw_key) != 32:
            raise KeystoreError(f"a raw key must be 32 bytes, got {len(raw_key)}")
        self._passphrase = passphrase
        self._raw_key = raw_key
        self._cache: dict[tuple[bytes, int, int, int], bytes] = {}

    @property
    def kind(self) -> Literal["scrypt", "raw-key"]:
        return "scrypt" if self._passphrase is not None else "raw-key"

    @classmethod
    def from_passphrase(cls, passphrase: str | bytes) -> KeystoreSecret:
        data = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        return cls(passphrase=data)

    @classmethod
    def from_env(cls, var: str) -> KeystoreSecret:
        value = os.environ.get(var)
        if value is None:
            raise KeystoreError(f"environment variable {var} (the passphrase) is not set")
        if not value:
            raise KeystoreError(f"environment variable {var} (the passphrase) is empty")
        return cls.from_passphrase(value)

    @classmethod
    def from_passphrase_file(cls, path: Path) -> KeystoreSecret:
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise KeystoreError(f"cannot read passphrase file {path}: {exc.strerror}") from None
        text = text.rstrip(b"\r\n")
        if not text:
            raise KeystoreError(f"passphrase file {path} is empty")
        return cls(passphrase=text)

    @classmethod
    def from_key_file(cls, path: Path) -> KeystoreSecret:
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeystoreError(f"cannot read key file {path}: {exc}") from None
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise KeystoreError(f"key file {path} does not hold hex") from None
        if len(raw) != 32:
            raise KeystoreError(f"key file {path} holds {len(raw)} bytes; it must hold 32 (hex)")
        return cls(raw_key=raw)

    @staticmethod
    def write_new_key_file(path: Path) -> None:
        """Create a key file with 32 random bytes in hex (mode 0600); never overwrite one."""
        path = Path(path)
        if path.exists():
            raise KeystoreError(f"key file {path} already exists; refusing to overwrite it")
        atomic_write(path, (secrets.token_hex(32) + "\n").encode())

    def new_kdf(self) -> dict[str, Any]:
        if self._passphrase is None:
            return {"name": "raw-key"}
        return {
            "name": "scrypt",
            "salt": secrets.token_hex(16),
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
        }

    def storage_key(self, kdf: dict[str, Any], where: Path | str) -> bytes:
        """The 32-byte ChaCha20-Poly1305 key for a keystore whose ``kdf`` entry is given."""
        name = kdf.get("name")
        if name == "raw-key":
            if self._raw_key is None:
                raise KeystoreError(
                    f"keystore {where} is locked with a key file; pass --key-file, not a passphrase"
                )
            return self._raw_key
        if name != "scrypt":
            raise KeystoreError(f"keystore {where}: unknown key derivation {name!r}")
        if self._passphrase is None:
            raise KeystoreError(
                f"keystore {where} is locked with a passphrase; pass --passphrase-env or "
                "--passphrase-file, not a key file"
            )
        try:
            salt = bytes.fromhex(kdf["salt"])
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        except (KeyError, ValueError, TypeError):
            raise KeystoreError(f"keystore {where}: malformed scrypt parameters") from None
        if (n, r, p) != (SCRYPT_N, SCRYPT_R, SCRYPT_P) or len(salt) < 16:
            # Never let a tampered file talk us into weak (or memory-exhausting) parameters.
            raise KeystoreError(f"keystore {where}: unexpected scrypt parameters n={n} r={r}")
        cache_key = (salt, n, r, p)
        if cache_key not in self._cache:
            self._cache[cache_key] = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(
                self._passphrase
            )
        return self._cache[cache_key]


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> dict[str, str]:
    nonce = secrets.token_bytes(12)
    ct = ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
    return {"nonce": nonce.hex(), "ciphertext": base64.b64encode(ct).decode()}


def _open(key: bytes, sealed: dict[str, str], aad: bytes) -> bytes:
    nonce = bytes.fromhex(sealed["nonce"])
    ct = base64.b64decode(sealed["ciphertext"], validate=True)
    return ChaCha20Poly1305(key).decrypt(nonce, ct, aad)


def _aad(purpose: str, key_id: str = "") -> bytes:
    return f"{FORMAT}|{purpose}|{key_id}".encode()


# ------------------------------------------------------------------------------ key records


@dataclasses.dataclass
class KeyRecord:
    """One Paillier key pair; ``private_key`` is None once its private half was erased."""

    key_id: str
    bits: int
    created_at: dt.datetime
    status: Literal["active", "retired"]
    public_key: PaillierPublicKey
    private_key: PaillierPrivateKey | None
    retired_at: dt.datetime | None = None
    decrypt_until: dt.datetime | None = None  # end of the grace period (retired keys)
    # X25519 key that seals totals for platforms under this Paillier key (protocols.delivery);
    # its private half is sealed and erased together with the Paillier private key.
    delivery_public: bytes = b""
    delivery_key: X25519PrivateKey | None = None

    def can_decrypt(self, now: dt.datetime) -> bool:
        if self.private_key is None:
            return False
        if self.status == "active":
            return True
        return self.decrypt_until is not None and now < self.decrypt_until

    def public_dict(self, now: dt.datetime | None = None) -> dict[str, Any]:
        """What anyone may see: never a private value."""
        now = now or _now()
        return {
            "key_id": self.key_id,
            "bits": self.bits,
            "status": self.status,
            "created_at": _ts(self.created_at),
            "retired_at": _ts(self.retired_at),
            "decrypt_until": _ts(self.decrypt_until),
            "can_decrypt": self.can_decrypt(now),
            "delivery_key": self.delivery_public.hex(),
        }


def _new_record(bits: int, allow_insecure_test_size: bool, now: dt.datetime) -> KeyRecord:
    pk, sk = generate_keypair(bits, allow_insecure_test_size=allow_insecure_test_size)
    delivery = X25519PrivateKey.generate()
    return KeyRecord(
        key_id=key_id_for(public_key_to_bytes(pk)),
        bits=int(pk.n).bit_length(),
        created_at=now,
        status="active",
        public_key=pk,
        private_key=sk,
        delivery_public=delivery.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        delivery_key=delivery,
    )


# --------------------------------------------------------------------------------- keystore


class Keystore:
    """An unlocked keystore: keys in memory; ``save()`` writes it back sealed.

    ``path=None`` gives an in-memory keystore (``LocalKeyHolder``, tests): nothing on disk.
    """

    def __init__(
        self,
        path: Path | None,
        secret: KeystoreSecret | None,
        *,
        kdf: dict[str, Any],
        signing_key: Ed25519PrivateKey,
        keys: list[KeyRecord],
        token_sha256: str | None = None,
        grace: dt.timedelta = DEFAULT_GRACE,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._secret = secret
        self._kdf = kdf
        self.signing_key = signing_key
        self.keys = keys
        self.token_sha256 = token_sha256
        self.grace = grace

    # ----------------------------------------------------------------- create / open / save

    @classmethod
    def create(
        cls,
        path: Path | None,
        secret: KeystoreSecret | None,
        *,
        bits: int = 2048,
        allow_insecure_test_size: bool = False,
        token_sha256: str | None = None,
        grace: dt.timedelta = DEFAULT_GRACE,
        now: dt.datetime | None = None,
    ) -> Keystore:
        """A new keystore with one active key; written to ``path`` (never over a file)."""
        if path is not None:
            path = Path(path)
            if path.exists():
                raise KeystoreError(f"keystore {path} already exists; refusing to overwrite it")
            if secret is None:
                raise KeystoreError("a keystore on disk needs a passphrase or key file")
        if grace <= dt.timedelta(0):
            raise KeystoreError("the grace period must be positive")
        record = _new_record(bits, allow_insecure_test_size, now or _now())
        store = cls(
            path,
            secret,
            kdf=secret.new_kdf() if secret is not None else {"name": "none"},
            signing_key=Ed25519PrivateKey.generate(),
            keys=[record],
            token_sha256=token_sha256,
            grace=grace,
        )
        if path is not None:
            store.save()
            log.info("created keystore %s with key %s (%d bits)", path, record.key_id, bits)
        return store

    @classmethod
    def open(cls, path: Path, secret: KeystoreSecret) -> Keystore:
        """Read and unlock a keystore; ``KeystoreError`` names the file and what is wrong."""
        path = Path(path)
        doc = read_public(path)
        key = secret.storage_key(doc.get("kdf") or {}, path)
        try:
            signing_raw = _open(key, doc["signing_key"]["private"], _aad("signing-key"))
        except InvalidTag:
            raise KeystoreError(
                f"cannot unlock keystore {path}: wrong passphrase or key file"
            ) from None
        except (KeyError, TypeError, ValueError):
            raise KeystoreError(f"keystore {path} is malformed (signing key)") from None
        try:
            _open(key, doc["seal"], _aad("seal") + _public_canonical(doc))
        except InvalidTag:
            raise KeystoreError(
                f"keystore {path} has been tampered with: its public part does not match its seal"
            ) from None
        except (KeyError, TypeError, ValueError):
            raise KeystoreError(f"keystore {path} is malformed (seal)") from None
        try:
            keys = [_record_from_doc(entry, key) for entry in doc["keys"]]
            signing_key = Ed25519PrivateKey.from_private_bytes(signing_raw)
            grace = dt.timedelta(seconds=float(doc["settings"]["grace_seconds"]))
        except (KeyError, TypeError, ValueError, InvalidTag) as exc:
            raise KeystoreError(f"keystore {path} is malformed: {exc}") from None
        store = cls(
            path,
            secret,
            kdf=doc["kdf"],
            signing_key=signing_key,
            keys=keys,
            token_sha256=(doc.get("auth") or {}).get("token_sha256"),
            grace=grace,
        )
        if sum(1 for k in keys if k.status == "active") != 1:
            raise KeystoreError(f"keystore {path} must have exactly one active key")
        return store

    def save(self) -> None:
        """Seal and write atomically (mode 0600). In-memory keystores have nothing to write."""
        if self.path is None or self._secret is None:
            return
        key = self._secret.storage_key(self._kdf, self.path)
        doc: dict[str, Any] = {
            "format": FORMAT,
            "kdf": self._kdf,
            "settings": {"grace_seconds": self.grace.total_seconds()},
            "auth": {"token_sha256": self.token_sha256},
            "signing_key": {
                "public": self.verify_key_bytes.hex(),
                "private": _seal(key, self._signing_raw(), _aad("signing-key")),
            },
            "keys": [_record_to_doc(r, key) for r in self.keys],
        }
        doc["seal"] = _seal(key, b"", _aad("seal") + _public_canonical(doc))
        atomic_write(self.path, (json.dumps(doc, indent=1) + "\n").encode())

    def _signing_raw(self) -> bytes:
        return self.signing_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    # ----------------------------------------------------------------------------- queries

    @property
    def verify_key_bytes(self) -> bytes:
        """The Ed25519 public key platforms pin at enrolment (32 raw bytes)."""
        return self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def active(self) -> KeyRecord:
        return next(k for k in self.keys if k.status == "active")

    def get(self, key_id: str) -> KeyRecord | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def announcement(self, key_id: str, now: dt.datetime | None = None) -> KeyAnnouncement:
        """A freshly signed announcement of ``key_id``.

        Active key: valid for one grace period from now, so a platform never encrypts under
        a key that the key holder will refuse to decrypt (rotation keeps the old key that
        long). Retired key: valid until its grace period ends.
        """
        now = now or _now()
        rec = self.get(key_id)
        if rec is None:
            raise KeystoreError(f"no key {key_id} in the keystore")
        if rec.status == "active":
            issued, expires = now, now + self.grace
        else:
            issued = rec.retired_at or rec.created_at
            expires = rec.decrypt_until or issued
            if expires <= issued:  # erased early by `retire`: an already-expired window
                expires = issued + dt.timedelta(microseconds=1)
        return sign_announcement(
            self.signing_key,
            public_key_to_bytes(rec.public_key),
            bits=rec.bits,
            issued_at=issued,
            expires_at=expires,
            delivery_key=rec.delivery_public or None,
        )

    def summary(self, now: dt.datetime | None = None) -> dict[str, Any]:
        """Public facts only (key ids, statuses, bits, verify key): safe to print."""
        now = now or _now()
        return {
            "keystore": str(self.path) if self.path else None,
            "format": FORMAT,
            "verify_key": self.verify_key_bytes.hex(),
            "active_key_id": self.active.key_id,
            "grace_seconds": self.grace.total_seconds(),
            "token_configured": self.token_sha256 is not None,
            "keys": [k.public_dict(now) for k in self.keys],
        }

    # ----------------------------------------------------------------------------- changes

    def rotate(
        self,
        *,
        bits: int | None = None,
        grace: dt.timedelta | None = None,
        allow_insecure_test_size: bool = False,
        now: dt.datetime | None = None,
    ) -> KeyRecord:
        """New active key; the previous one retires and still decrypts for ``grace``."""
        now = now or _now()
        grace = self.grace if grace is None else grace
        if grace < dt.timedelta(0):
            raise KeystoreError("the grace period must not be negative")
        old = self.active
        record = _new_record(bits or old.bits, allow_insecure_test_size, now)
        old.status, old.retired_at, old.decrypt_until = "retired", now, now + grace
        self.keys.append(record)
        self.purge_expired(now)
        log.info(
            "rotated: %s active, %s retired until %s", record.key_id, old.key_id, _ts(now + grace)
        )
        return record

    def retire(self, key_id: str, now: dt.datetime | None = None) -> KeyRecord:
        """Erase a retired key's private half now (it can never decrypt again)."""
        now = now or _now()
        rec = self.get(key_id)
        if rec is None:
            raise KeystoreError(f"keystore {self.path}: no key {key_id}")
        if rec.status == "active":
            raise KeystoreError(f"key {key_id} is the active key; rotate first, then retire it")
        rec.private_key = rec.delivery_key = None
        rec.decrypt_until = min(rec.decrypt_until or now, now)
        log.info("retired key %s: private half erased", key_id)
        return rec

    def purge_expired(self, now: dt.datetime | None = None) -> list[str]:
        """Erase the private halves of retired keys whose grace period is over."""
        now = now or _now()
        erased = []
        for rec in self.keys:
            if rec.status == "retired" and rec.private_key is not None and not rec.can_decrypt(now):
                rec.private_key = rec.delivery_key = None
                erased.append(rec.key_id)
        if erased:
            log.info("erased expired private keys: %s", ", ".join(erased))
        return erased


def _record_to_doc(rec: KeyRecord, key: bytes) -> dict[str, Any]:
    private = None
    if rec.private_key is not None:
        p, q = int(rec.private_key.p), int(rec.private_key.q)
        secret: dict[str, str] = {"p": format(p, "x"), "q": format(q, "x")}
        if rec.delivery_key is not None:
            secret["delivery"] = rec.delivery_key.private_bytes(
                Encoding.Raw, PrivateFormat.Raw, NoEncryption()
            ).hex()
        payload = json.dumps(secret).encode()
        private = _seal(key, payload, _aad("paillier-private", rec.key_id))
    return {
        "key_id": rec.key_id,
        "bits": rec.bits,
        "created_at": _ts(rec.created_at),
        "status": rec.status,
        "retired_at": _ts(rec.retired_at),
        "decrypt_until": _ts(rec.decrypt_until),
        "n": format(int(rec.public_key.n), "x"),
        "delivery_public": rec.delivery_public.hex(),
        "private": private,
    }


def _record_from_doc(entry: dict[str, Any], key: bytes) -> KeyRecord:
    n = int(entry["n"], 16)
    pk = PaillierPublicKey(n)
    key_id = key_id_for(public_key_to_bytes(pk))
    if key_id != entry["key_id"]:
        raise ValueError(f"key id {entry['key_id']} does not match its modulus")
    sk, delivery = None, None
    delivery_public = bytes.fromhex(entry.get("delivery_public") or "")
    if entry.get("private") is not None:
        factors = json.loads(_open(key, entry["private"], _aad("paillier-private", key_id)))
        p, q = int(factors["p"], 16), int(factors["q"], 16)
        if p * q != n:
            raise ValueError(f"key {key_id}: stored factors do not multiply to n")
        sk = PaillierPrivateKey(pk, p, q)
        if factors.get("delivery"):
            delivery = X25519PrivateKey.from_private_bytes(bytes.fromhex(factors["delivery"]))
            derived = delivery.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            if derived != delivery_public:
                raise ValueError(f"key {key_id}: delivery key does not match its public half")
    status = entry["status"]
    if status not in ("active", "retired"):
        raise ValueError(f"key {key_id}: unknown status {status!r}")
    return KeyRecord(
        key_id=key_id,
        bits=int(entry["bits"]),
        created_at=_parse_ts(entry["created_at"]) or _now(),
        status=status,
        public_key=pk,
        private_key=sk,
        retired_at=_parse_ts(entry.get("retired_at")),
        decrypt_until=_parse_ts(entry.get("decrypt_until")),
        delivery_public=delivery_public,
        delivery_key=delivery,
    )


def _public_canonical(doc: dict[str, Any]) -> bytes:
    """Everything but the seal itself (sealed blobs included), canonically encoded."""
    public = {k: v for k, v in doc.items() if k != "seal"}
    return json.dumps(public, sort_keys=True, separators=(",", ":")).encode()


def read_public(path: Path) -> dict[str, Any]:
    """The keystore document, unverified: for ``show`` without a secret, and for ``open``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeystoreError(f"no keystore at {path}") from None
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise KeystoreError(f"keystore {path} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeystoreError(f"{path} is not a {FORMAT} keystore")
    return doc


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the keystore, held across read-modify-write changes.

    Serialises ``rotate``/``retire`` from the CLI with a running service's purge, so neither
    overwrites the other's change.
    """
    lock_path = Path(path).with_name(Path(path).name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class WatchedKeystore:
    """A keystore file that a running service re-reads when it changes on disk.

    Why: ``fedcredit keyholder rotate`` and ``retire`` edit the file while the service runs;
    the service must announce the new key and stop decrypting under an erased one without a
    restart. A cheap ``stat`` per request detects the change; the cached storage key makes
    the reload cost only the AEAD openings.
    """

    def __init__(self, path: Path, secret: KeystoreSecret) -> None:
        self.path = Path(path)
        self._secret = secret
        self._stamp: tuple[int, int, int] | None = None
        self._store: Keystore | None = None
        self._lock = threading.Lock()
        self.current()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> Keystore:
        with self._lock:
            return self._current()

    def _current(self) -> Keystore:
        try:
            stamp = self._stat()
        except OSError:
            if self._store is None:
                raise KeystoreError(f"no keystore at {self.path}") from None
            log.error("keystore %s vanished; keeping the keys loaded at start", self.path)
            return self._store
        if stamp != self._stamp or self._store is None:
            try:
                store = Keystore.open(self.path, self._secret)
            except KeystoreError:
                if self._store is None:
                    raise
                log.exception(
                    "keystore %s changed but cannot be reloaded; keeping old keys", self.path
                )
                self._stamp = stamp
                return self._store
            if self._store is not None:
                log.info("keystore %s changed on disk: reloaded", self.path)
            self._store, self._stamp = store, stamp
        return self._store


def token_sha256(token: str) -> str:
    """What the service stores of a bearer token: its SHA-256 (hex), never the token."""
    return hashlib.sha256(token.encode()).hexdigest()
