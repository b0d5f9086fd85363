"""How the coordinator talks to the key holder: ``KeyHolderAPI`` and its implementations.

* ``KeyHolderClient``: the real thing, HTTP(S) to ``fedcredit keyholder serve`` with a bearer
  token. The coordinator uses only this in production, so it never holds a private key.
* ``LocalKeyHolder``: the same interface and the same checks (``KeyHolderCore``) over an
  in-memory keystore, for fast unit tests and the in-process test harness only.
* ``start_keyholder_process``: start the service as a subprocess and wait until it listens
  (tests, demos, a supervisor).

Errors: ``KeyHolderRefusal`` (the key holder answered and said no: reason, status, code) and
``KeyHolderUnavailable`` (no usable answer: connection, timeout, 5xx, garbage).
"""

from __future__ import annotations

import abc
import base64
import binascii
import datetime as dt
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from protocols.delivery import ROW_BYTES
from protocols.key_announcement import AnnouncementError, KeyAnnouncement, verify_announcement
from protocols.paillier import (
    InvalidCiphertext,
    PaillierPublicKey,
    ciphertexts_to_bytes,
    public_key_from_bytes,
)
from server.keyholder import (
    DEFAULT_MAX_COUNT,
    DEFAULT_MIN_PARTICIPANTS,
    ROUTE_DECRYPT,
    ROUTE_HEALTH,
    ROUTE_KEY,
    ROUTE_KEYS,
    AuditLog,
    KeyHolderCore,
    KeyHolderRefusal,
    ReplayGuard,
)
from server.keyholder_lender import (
    ROUTE_ANSWER,
    ROUTE_UNBLIND,
    AnswerItem,
    LenderDesk,
    answer_request,
    unblind_request,
)
from server.keystore import Keystore

log = logging.getLogger(__name__)

__all__ = [
    "KeyHolderAPI",
    "KeyHolderClient",
    "KeyHolderRefusal",
    "KeyHolderUnavailable",
    "LocalKeyHolder",
    "RunningKeyHolder",
    "connect_keyholder",
    "start_keyholder_process",
]


class KeyHolderUnavailable(RuntimeError):
    """The key holder could not be reached or gave no usable answer."""


class KeyHolderAPI(abc.ABC):
    """What the coordinator may ask of a key holder: its key, and decryption of sums."""

    @abc.abstractmethod
    def announcement(self) -> KeyAnnouncement:
        """The active key's signed announcement (the coordinator forwards it to platforms)."""

    @abc.abstractmethod
    def decrypt_sums(
        self, key_id: str, query_id: str, participants: Sequence[str], sums: Sequence[int]
    ) -> list[int]:
        """Plaintexts of homomorphic sums over ``participants`` under key ``key_id``.

        ``query_id`` (32 lowercase hex) may be decrypted once; a second call refuses.
        """

    @abc.abstractmethod
    def decrypt_and_seal(
        self,
        key_id: str,
        query_id: str,
        participants: Sequence[str],
        sums: Sequence[int],
        rows: int,
    ) -> dict[str, bytes]:
        """The sums' ``rows`` debt-profile totals, sealed for each participant.

        ``result[name]`` is ``rows * protocols.delivery.ROW_BYTES`` bytes that only platform
        ``name`` (with its agreement key and the announced delivery key) can open; the caller
        cannot read the totals. Same refusals as ``decrypt_sums``, plus: a participant not in
        the key holder's roster, and sums that do not unpack into valid totals.
        """

    def lender_unblind(
        self, key_id: str, elements: Sequence[bytes], sealed: Sequence[bytes]
    ) -> list[bytes | None]:
        """Lender question, step 1: each applicant's pseudonym (``server.keyholder_lender``)."""
        raise NotImplementedError(f"{type(self).__name__} does not answer lender questions")

    def lender_answer(
        self, key_id: str, participants: Sequence[str], items: Sequence[AnswerItem]
    ) -> list[bytes]:
        """Lender question, step 2: each applicant's totals sealed for its lender."""
        raise NotImplementedError(f"{type(self).__name__} does not answer lender questions")


def _encode_request(
    pk: PaillierPublicKey,
    key_id: str,
    query_id: str,
    participants: Sequence[str],
    sums: Sequence[int],
    seal_rows: int | None = None,
) -> dict[str, Any]:
    try:
        blob = ciphertexts_to_bytes(pk, list(sums))
    except InvalidCiphertext as exc:
        raise KeyHolderRefusal(f"{exc} (refused before sending)", 422, "bad_ciphertext") from None
    body: dict[str, Any] = {
        "key_id": key_id,
        "query_id": query_id,
        "participants": list(participants),
        "count": len(sums),
        "ciphertexts": base64.b64encode(blob).decode(),
    }
    if seal_rows is not None:
        body["seal_rows"] = seal_rows
    return body


def _decode_sealed(data: Any, participants: Sequence[str], rows: int) -> dict[str, bytes]:
    if not isinstance(data, dict) or set(data) != set(participants):
        raise ValueError("sealed totals are not exactly one entry per participant")
    out = {}
    for name in participants:
        blob = base64.b64decode(data[name], validate=True)
        if len(blob) != rows * ROW_BYTES:
            raise ValueError(f"{len(blob)} sealed bytes for {name}; expected {rows} rows")
        out[name] = blob
    return out


def _decode_plaintexts(pk: PaillierPublicKey, data: str, count: int) -> list[int]:
    width = (int(pk.n).bit_length() + 7) // 8
    blob = base64.b64decode(data, validate=True)
    if len(blob) != count * width:
        raise ValueError(f"{len(blob)} bytes of plaintexts; expected {count} x {width}")
    return [int.from_bytes(blob[i * width : (i + 1) * width], "big") for i in range(count)]


# ------------------------------------------------------------------------------- HTTP client


class KeyHolderClient(KeyHolderAPI):
    """HTTP(S) client of ``fedcredit keyholder serve``.

    ``verify_key`` (the pinned Ed25519 key, optional): when given, ``announcement()``
    verifies what it returns. ``ca_file``: trust this CA for TLS (https URLs). ``timeout``:
    seconds to wait for an answer; a maximal batch (100,000 ciphertexts) takes minutes to
    decrypt, so the default is generous, while connecting gives up after 10 s.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 600.0,
        ca_file: Path | str | None = None,
        verify_key: bytes | None = None,
        allow_insecure_test_size: bool = False,
    ) -> None:
        verify: Any = True
        if ca_file:
            verify = ssl.create_default_context(cafile=str(ca_file))
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            verify=verify,
        )
        self.verify_key = verify_key
        self.allow_insecure_test_size = allow_insecure_test_size
        self._keys: dict[str, PaillierPublicKey] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KeyHolderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise KeyHolderUnavailable(f"key holder {self._http.base_url}: {exc}") from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if 400 <= resp.status_code < 500:
            reason = data.get("reason") if isinstance(data, dict) else None
            code = data.get("error") if isinstance(data, dict) else None
            raise KeyHolderRefusal(
                str(reason or f"HTTP {resp.status_code}"), resp.status_code, str(code or "refused")
            )
        if resp.status_code != 200 or not isinstance(data, dict):
            raise KeyHolderUnavailable(
                f"key holder {self._http.base_url}{path}: HTTP {resp.status_code}"
            )
        return data

    def _parse_announcement(self, item: Any) -> KeyAnnouncement:
        """Parse one announcement and remember its key (for encoding sums under it).

        The key is cached unverified: encoding a sum needs only ``n``, and the key holder is
        the authority on whether it still decrypts under it. Verification against the pinned
        key (``verify_key``) is for what gets forwarded to platforms: ``announcement()``.
        """
        try:
            ann = KeyAnnouncement.from_bytes(base64.b64decode(item["announcement"], validate=True))
            pk = public_key_from_bytes(
                ann.public_key, allow_insecure_test_size=self.allow_insecure_test_size
            )
        except (AnnouncementError, KeyError, TypeError, binascii.Error, ValueError) as exc:
            raise KeyHolderUnavailable(f"key holder sent an unusable announcement: {exc}") from None
        self._keys[ann.key_id] = pk
        return ann

    def announcement(self) -> KeyAnnouncement:
        """The active key's announcement; verified first when a ``verify_key`` is pinned.

        A verification failure (wrong signer, expired, inconsistent) raises
        ``KeyHolderUnavailable``: whatever answered is not our key holder, or not sane.
        """
        ann = self._parse_announcement(self._call("GET", ROUTE_KEY))
        if self.verify_key is not None:
            try:
                verify_announcement(
                    ann, self.verify_key, allow_insecure_test_size=self.allow_insecure_test_size
                )
            except AnnouncementError as exc:
                raise KeyHolderUnavailable(f"announcement failed verification: {exc}") from None
        return ann

    def announcements(self) -> list[KeyAnnouncement]:
        """Announcements of every key, retired ones included (those may be expired)."""
        data = self._call("GET", ROUTE_KEYS)
        items = data.get("keys")
        if not isinstance(items, list):
            raise KeyHolderUnavailable("key holder sent a malformed key list")
        return [self._parse_announcement(item) for item in items]

    def health(self) -> dict[str, Any]:
        try:
            resp = self._http.get(ROUTE_HEALTH)
            return dict(resp.json())
        except (httpx.HTTPError, ValueError, TypeError) as exc:
            raise KeyHolderUnavailable(f"key holder {self._http.base_url}: {exc}") from None

    def _public_key(self, key_id: str) -> PaillierPublicKey:
        if key_id not in self._keys:
            self.announcements()
        if key_id not in self._keys:
            raise KeyHolderRefusal(f"unknown key id {key_id}", 404, "unknown_key")
        return self._keys[key_id]

    def decrypt_sums(
        self, key_id: str, query_id: str, participants: Sequence[str], sums: Sequence[int]
    ) -> list[int]:
        pk = self._public_key(key_id)
        body = _encode_request(pk, key_id, query_id, participants, sums)
        data = self._call("POST", ROUTE_DECRYPT, json=body)
        try:
            if data.get("key_id") != key_id or data.get("query_id") != query_id:
                raise ValueError("answer is for another key or query")
            return _decode_plaintexts(pk, data["plaintexts"], len(sums))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise KeyHolderUnavailable(f"key holder sent a malformed answer: {exc}") from None

    def decrypt_and_seal(
        self,
        key_id: str,
        query_id: str,
        participants: Sequence[str],
        sums: Sequence[int],
        rows: int,
    ) -> dict[str, bytes]:
        pk = self._public_key(key_id)
        body = _encode_request(pk, key_id, query_id, participants, sums, seal_rows=rows)
        data = self._call("POST", ROUTE_DECRYPT, json=body)
        try:
            if data.get("key_id") != key_id or data.get("query_id") != query_id:
                raise ValueError("answer is for another key or query")
            return _decode_sealed(data.get("sealed"), participants, rows)
        except (TypeError, ValueError, binascii.Error) as exc:
            raise KeyHolderUnavailable(f"key holder sent malformed sealed totals: {exc}") from None

    def lender_unblind(
        self, key_id: str, elements: Sequence[bytes], sealed: Sequence[bytes]
    ) -> list[bytes | None]:
        data = self._call("POST", ROUTE_UNBLIND, json=unblind_request(key_id, elements, sealed))
        try:
            found = data["pseudonyms"]
            return [None if f is None else base64.b64decode(f, validate=True) for f in found]
        except (KeyError, TypeError, binascii.Error, ValueError) as exc:
            raise KeyHolderUnavailable(f"key holder sent malformed pseudonyms: {exc}") from None

    def lender_answer(
        self, key_id: str, participants: Sequence[str], items: Sequence[AnswerItem]
    ) -> list[bytes]:
        data = self._call("POST", ROUTE_ANSWER, json=answer_request(key_id, participants, items))
        try:
            return [base64.b64decode(b, validate=True) for b in data["sealed"]]
        except (KeyError, TypeError, binascii.Error, ValueError) as exc:
            raise KeyHolderUnavailable(f"key holder sent malformed answers: {exc}") from None


# ------------------------------------------------------------------------- in-process (tests)


class LocalKeyHolder(KeyHolderAPI):
    """An in-memory key holder with the service's exact checks: FOR TESTS ONLY.

    It exists for fast unit tests and the in-process test harness. It puts the private key
    into the caller's process, which is precisely what the key-holder separation forbids:
    it must never be used where the coordinator runs in production (use
    ``KeyHolderClient`` against ``fedcredit keyholder serve``).
    """

    def __init__(
        self,
        bits: int = 2048,
        *,
        allow_insecure_test_size: bool = False,
        min_participants: int = DEFAULT_MIN_PARTICIPANTS,
        max_count: int = DEFAULT_MAX_COUNT,
        grace: dt.timedelta = dt.timedelta(days=1),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        roster: Mapping[str, bytes] | None = None,
    ) -> None:
        """``roster``: platform name -> raw X25519 agreement key, to seal totals for them."""
        self.roster = dict(roster) if roster is not None else None
        self.keystore = Keystore.create(
            None, None, bits=bits, allow_insecure_test_size=allow_insecure_test_size, grace=grace
        )
        self._allow_insecure = allow_insecure_test_size
        self.core = KeyHolderCore(
            lambda: self.keystore,
            replay=ReplayGuard(None),
            audit=AuditLog(None),
            min_participants=min_participants,
            max_count=max_count,
            clock=clock,
            roster=(lambda: self.roster or {}) if roster is not None else None,
        )
        self.lender = LenderDesk(
            lambda: self.keystore, self.core.audit, min_participants=min_participants, clock=clock
        )

    def lender_unblind(
        self, key_id: str, elements: Sequence[bytes], sealed: Sequence[bytes]
    ) -> list[bytes | None]:
        return self.lender.unblind(key_id, elements, sealed, caller="local")

    def lender_answer(
        self, key_id: str, participants: Sequence[str], items: Sequence[AnswerItem]
    ) -> list[bytes]:
        return self.lender.answer(key_id, participants, items, caller="local")

    @property
    def verify_key(self) -> bytes:
        return self.keystore.verify_key_bytes

    def announcement(self) -> KeyAnnouncement:
        return self.core.announcement()

    def rotate(self) -> str:
        """New active key (the old one decrypts for the grace period); returns its id."""
        return self.keystore.rotate(
            allow_insecure_test_size=self._allow_insecure, now=self.core.clock()
        ).key_id

    def decrypt_sums(
        self, key_id: str, query_id: str, participants: Sequence[str], sums: Sequence[int]
    ) -> list[int]:
        rec = self.keystore.get(key_id)
        if rec is None:
            raise KeyHolderRefusal(f"unknown key id {key_id}", 404, "unknown_key")
        body = _encode_request(rec.public_key, key_id, query_id, participants, sums)
        answer = self.core.decrypt_body(body, caller="local")
        assert answer.plaintexts is not None
        return _decode_plaintexts(rec.public_key, answer.plaintexts, len(sums))

    def decrypt_and_seal(
        self,
        key_id: str,
        query_id: str,
        participants: Sequence[str],
        sums: Sequence[int],
        rows: int,
    ) -> dict[str, bytes]:
        rec = self.keystore.get(key_id)
        if rec is None:
            raise KeyHolderRefusal(f"unknown key id {key_id}", 404, "unknown_key")
        body = _encode_request(rec.public_key, key_id, query_id, participants, sums, rows)
        answer = self.core.decrypt_body(body, caller="local")
        return _decode_sealed(answer.sealed, participants, rows)


# ------------------------------------------------------------------------- from run config


def connect_keyholder(settings: Any) -> KeyHolderClient:
    """The client for the key holder named in the coordinator's run config.

    ``settings`` has ``keyholder_url``, ``keyholder_token_file`` and ``keyholder_ca``
    (``server.settings.FederationSettings``). Missing configuration is a clear
    ``KeyHolderUnavailable``: the coordinator never falls back to holding a key itself.
    """
    url = str(getattr(settings, "keyholder_url", "") or "")
    token_file = str(getattr(settings, "keyholder_token_file", "") or "")
    ca = str(getattr(settings, "keyholder_ca", "") or "")
    if not url:
        raise KeyHolderUnavailable(
            "no key holder configured: set keyholder-url (and keyholder-token-file) in the run "
            "config; start one with `fedcredit keyholder serve`"
        )
    if not token_file:
        raise KeyHolderUnavailable("keyholder-token-file is not set: the key holder needs a token")
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise KeyHolderUnavailable(
            f"cannot read keyholder-token-file {token_file}: {exc.strerror}"
        ) from None
    if not token:
        raise KeyHolderUnavailable(f"keyholder-token-file {token_file} is empty")
    if ca and not Path(ca).is_file():
        raise KeyHolderUnavailable(f"keyholder-ca: no such file: {ca}")
    return KeyHolderClient(url, token, ca_file=ca or None)


# --------------------------------------------------------------------------- the subprocess


class RunningKeyHolder:
    """A key-holder service started by ``start_keyholder_process``; ``stop()`` ends it."""

    def __init__(
        self, process: subprocess.Popen[bytes], url: str, token: str, workdir: Path
    ) -> None:
        self.process = process
        self.url = url
        self.token = token
        self.workdir = workdir

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_text(self) -> str:
        """What the service wrote to stderr so far (its log)."""
        try:
            return (self.workdir / "service.log").read_text(errors="replace")
        except OSError:
            return ""

    def client(self, **kwargs: Any) -> KeyHolderClient:
        return KeyHolderClient(self.url, self.token, **kwargs)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it does not exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("key holder pid %d ignored SIGTERM; killing it", self.pid)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> RunningKeyHolder:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_keyholder_process(
    keystore_path: Path | str,
    secret_args: Sequence[str],
    *,
    min_participants: int = DEFAULT_MIN_PARTICIPANTS,
    env: Mapping[str, str] | None = None,
    token: str | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 60.0,
) -> RunningKeyHolder:
    """Start ``python -m server.keyholder_service`` on 127.0.0.1 (a free port) and wait.

    ``secret_args``: e.g. ``["--passphrase-env", "VAR"]`` or ``["--key-file", path]``.
    ``token``: the bearer token to require (default: a fresh random one, handed to the
    service in a 0600 file). Returns once the service listens (its port file appeared);
    raises ``KeyHolderUnavailable`` with the service's log if it exits or does not come up.
    """
    workdir = Path(tempfile.mkdtemp(prefix="fedcredit-keyholder-"))
    token = token or secrets.token_urlsafe(32)
    token_file, port_file = workdir / "token", workdir / "port"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    cmd = [
        sys.executable,
        "-m",
        "server.keyholder_service",
        "--keystore",
        str(keystore_path),
        *secret_args,
        "--listen",
        "127.0.0.1:0",
        "--port-file",
        str(port_file),
        "--token-file",
        str(token_file),
        "--min-participants",
        str(min_participants),
        *extra_args,
    ]
    log_fh = open(workdir / "service.log", "wb")  # noqa: SIM115 (the child owns it)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
        )
    finally:
        log_fh.close()
    running = RunningKeyHolder(proc, "", token, workdir)
    deadline = time.monotonic() + startup_timeout
    while True:
        if port_file.exists():
            text = port_file.read_text().strip()
            if text.isdigit():
                scheme = "https" if "--tls-cert" in extra_args else "http"
                running.url = f"{scheme}://127.0.0.1:{int(text)}"
                log.info("key holder pid %d at %s", proc.pid, running.url)
                return running
        if proc.poll() is not None:
            raise KeyHolderUnavailable(
                f"key holder exited with status {proc.returncode} before listening:\n"
                f"{running.log_text[-4000:]}"
            )
        if time.monotonic() > deadline:
            running.stop()
            raise KeyHolderUnavailable(
                f"key holder did not listen within {startup_timeout} s:\n{running.log_text[-4000:]}"
            )
        time.sleep(0.05)
