"""The decryption-key holder as its own process: keystore, announcements, service, refusals.

Why these tests: the separation only helps if (1) the coordinator really gets nothing but sums
from a separate process, (2) the private key is unreadable at rest, (3) platforms can tell
the key holder's key from a substituted one, and (4) hostile requests are refused cleanly.
The main path runs through real subprocesses (``fedcredit keyholder init``/``rotate``/
``retire``/``show`` and the service); the request decoder is fuzzed directly (fast).
All keys here are 1024-bit, allowed only through the explicit test-only options.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import delivery
from protocols.identity import Roster, RosterEntry, save_roster
from protocols.key_announcement import (
    AnnouncementError,
    KeyAnnouncement,
    sign_announcement,
    verify_announcement,
)
from protocols.masking import pairwise_secret
from protocols.packing import debt_profile_layout
from protocols.paillier import (
    add_ciphertexts,
    ciphertext_width,
    encrypt_plaintexts,
    public_key_to_bytes,
)
from server.keyholder import (
    AuditLog,
    KeyHolderCore,
    KeyHolderRefusal,
    ReplayGuard,
    decode_decrypt_body,
    decode_decrypt_request,
    verify_audit_log,
)
from server.keyholder_client import (
    KeyHolderClient,
    KeyHolderUnavailable,
    LocalKeyHolder,
    RunningKeyHolder,
    start_keyholder_process,
)
from server.keystore import Keystore, KeystoreError, KeystoreSecret
from tests.conftest import REPO

PASS_VAR = "FEDCREDIT_TEST_KH_PASSPHRASE"
PASSPHRASE = "correct horse battery staple"
PLATFORMS = ["alipay", "webank", "jd"]
TEST_BITS = ["--bits", "1024", "--allow-insecure-test-size"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), PASS_VAR: PASSPHRASE}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fedcredit keyholder ...`` in a subprocess (via the keyholder CLI module)."""
    return subprocess.run(
        [sys.executable, "-m", "fedcredit.keyholder_cli", "keyholder", *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _cli_json(*args: str) -> dict:
    proc = _cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _qid() -> str:
    return secrets.token_hex(16)


def _init(tmp: Path) -> tuple[Path, dict]:
    ks = tmp / "keyholder.json"
    info = _cli_json("init", "--keystore", str(ks), "--passphrase-env", PASS_VAR, *TEST_BITS)
    return ks, info


def _start(ks: Path, *extra: str) -> RunningKeyHolder:
    return start_keyholder_process(
        ks, ["--passphrase-env", PASS_VAR], env=_env(), extra_args=list(extra)
    )


def _encrypted_sum(pk, per_platform: list[list[int]]) -> list[int]:  # type: ignore[no-untyped-def]
    return add_ciphertexts(
        pk, [encrypt_plaintexts(pk, values, workers=1) for values in per_platform]
    )


# ----------------------------------------------------------------------- the real service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("keyholder")
    ks, info = _init(tmp)
    shown = _cli_json("show", "--keystore", str(ks))  # what an operator reads off to pin
    assert shown["verify_key"] == info["verify_key"]
    running = _start(ks)
    try:
        yield {
            "ks": ks,
            "pinned": bytes.fromhex(shown["verify_key"]),
            "running": running,
            "key_id": info["active_key_id"],
        }
    finally:
        running.stop()


def _client(service: dict) -> KeyHolderClient:
    return KeyHolderClient(
        service["running"].url,
        service["running"].token,
        verify_key=service["pinned"],
        allow_insecure_test_size=True,
    )


def _post(service: dict, body: dict, token: str | None = None) -> httpx.Response:
    token = service["running"].token if token is None else token
    return httpx.post(
        service["running"].url + "/v1/decrypt",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def _body(pk, key_id: str, cts: list[int], participants=PLATFORMS, **over) -> dict:  # type: ignore[no-untyped-def]
    width = ciphertext_width(pk)
    blob = b"".join(c.to_bytes(width, "big") for c in cts)
    body = {
        "key_id": key_id,
        "query_id": _qid(),
        "participants": list(participants),
        "count": len(cts),
        "ciphertexts": base64.b64encode(blob).decode(),
    }
    body.update(over)
    return body


def test_announcement_verifies_against_the_pinned_key(service: dict) -> None:
    with _client(service) as client:
        ann = client.announcement()
    assert ann.key_id == service["key_id"]
    pk = verify_announcement(ann, service["pinned"], allow_insecure_test_size=True)
    assert ann.public_key == public_key_to_bytes(pk)
    # A production platform (no insecure sizes) refuses the 1024-bit test key.
    with pytest.raises(AnnouncementError, match="bits"):
        verify_announcement(ann, service["pinned"])
    # Another key holder's (or a coordinator's) verify key does not verify it.
    with pytest.raises(AnnouncementError, match="signature"):
        verify_announcement(
            ann,
            Keystore.create(None, None, bits=1024, allow_insecure_test_size=True).verify_key_bytes,
            allow_insecure_test_size=True,
        )
    openapi = httpx.get(service["running"].url + "/openapi.json", timeout=10).json()
    assert {"/v1/health", "/v1/key", "/v1/keys", "/v1/decrypt"} <= set(openapi["paths"])


def test_decrypts_a_homomorphic_sum_of_three_platforms(service: dict) -> None:
    values = [[5, 0, 10**9], [7, 1, 2], [11, 0, 3]]
    with _client(service) as client:
        ann = client.announcement()
        pk = verify_announcement(ann, service["pinned"], allow_insecure_test_size=True)
        sums = _encrypted_sum(pk, values)
        qid = _qid()
        plain = client.decrypt_sums(ann.key_id, qid, PLATFORMS, sums)
    assert plain == [sum(col) for col in zip(*values, strict=True)]
    audit = service["ks"].with_name(service["ks"].name + ".audit.jsonl")
    assert verify_audit_log(audit) >= 1
    entries = [json.loads(x) for x in audit.read_text().splitlines()]
    assert any(
        e["event"] == "decrypt"
        and e["query_id"] == qid
        and e["participants"] == PLATFORMS
        and e["count"] == 3
        for e in entries
    )


def test_refusals_name_their_reason(service: dict) -> None:
    with _client(service) as client:
        ann = client.announcement()
    pk = verify_announcement(ann, service["pinned"], allow_insecure_test_size=True)
    cts = _encrypted_sum(pk, [[1, 2], [3, 4], [5, 6]])
    key_id = ann.key_id

    r = _post(service, _body(pk, key_id, cts), token="not-the-token")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = httpx.post(service["running"].url + "/v1/decrypt", json={}, timeout=10)
    assert r.status_code == 401

    r = _post(service, _body(pk, "0123456789abcdef", cts))
    assert r.status_code == 404 and "unknown key id 0123456789abcdef" in r.json()["reason"]

    r = _post(service, _body(pk, key_id, cts, participants=PLATFORMS[:2]))
    assert r.status_code == 403 and "at least 3" in r.json()["reason"]

    r = _post(service, _body(pk, key_id, cts, participants=["alipay", "alipay", "jd"]))
    assert r.status_code == 422 and "unique" in r.json()["reason"]

    body = _body(pk, key_id, [cts[0], cts[1]])
    width = ciphertext_width(pk)
    blob = base64.b64decode(body["ciphertexts"])
    too_big = int(pk.nsquare).to_bytes(width, "big")  # n**2 itself: outside Z*_{n^2}
    body["ciphertexts"] = base64.b64encode(blob[:width] + too_big).decode()
    r = _post(service, body)
    assert r.status_code == 422 and "ciphertext 1" in r.json()["reason"]
    assert "n**2" in r.json()["reason"]

    r = _post(service, _body(pk, key_id, [cts[0], int(pk.n)]))  # shares a factor with n
    assert r.status_code == 422 and "ciphertext 1" in r.json()["reason"]

    r = _post(service, _body(pk, key_id, cts, hint="please"))
    assert r.status_code == 422 and "unknown field 'hint'" in r.json()["reason"]

    r = _post(service, _body(pk, key_id, cts, count=3))
    assert r.status_code == 422 and "count mismatch" in r.json()["reason"]

    r = _post(service, _body(pk, key_id, cts, count=100_001))
    assert r.status_code == 413 and "maximum" in r.json()["reason"]

    r = _post(service, _body(pk, key_id, cts, query_id="NOT-A-QUERY-ID"))
    assert r.status_code == 422 and "query_id" in r.json()["reason"]

    r = httpx.post(
        service["running"].url + "/v1/decrypt",
        content=b"{not json",
        headers={"Authorization": f"Bearer {service['running'].token}"},
        timeout=10,
    )
    assert r.status_code == 422 and "not JSON" in r.json()["reason"]
    # Every refusal was logged by the service; the service still answers.
    assert "refused decrypt (404 unknown_key)" in service["running"].log_text
    assert httpx.get(service["running"].url + "/v1/health", timeout=10).json() == {"status": "ok"}


def test_replayed_query_is_refused_also_after_a_restart(tmp_path: Path) -> None:
    ks, info = _init(tmp_path)
    qid = _qid()
    with _start(ks) as running:
        client = running.client(allow_insecure_test_size=True)
        ann = client.announcement()
        pk = verify_announcement(
            ann, bytes.fromhex(info["verify_key"]), allow_insecure_test_size=True
        )
        assert client.decrypt_sums(ann.key_id, qid, PLATFORMS, _encrypted_sum(pk, [[1]] * 3)) == [3]
        with pytest.raises(KeyHolderRefusal, match="already decrypted") as exc:
            client.decrypt_sums(ann.key_id, qid, PLATFORMS, _encrypted_sum(pk, [[1]] * 3))
        assert exc.value.status == 409
        client.close()
    # A new process on the same keystore still remembers the query id; a small --max-count
    # also lets us check that an oversized body is refused before it is parsed.
    with _start(ks, "--max-count", "4") as running:
        with (
            running.client(allow_insecure_test_size=True) as client,
            pytest.raises(KeyHolderRefusal, match="already") as exc,
        ):
            client.decrypt_sums(ann.key_id, qid, PLATFORMS, _encrypted_sum(pk, [[2]] * 3))
        assert exc.value.status == 409
        r = httpx.post(
            running.url + "/v1/decrypt",
            content=b" " * 1_000_000,
            headers={
                "Authorization": f"Bearer {running.token}",
                "Content-Type": "application/json",
            },
            timeout=30,
        )
        assert r.status_code == 413 and "body over" in r.json()["reason"]


def test_rotation_announces_a_new_key_and_the_old_one_decrypts_in_grace(tmp_path: Path) -> None:
    ks, info = _init(tmp_path)
    pinned = bytes.fromhex(info["verify_key"])
    with (
        _start(ks) as running,
        running.client(verify_key=pinned, allow_insecure_test_size=True) as client,
    ):
        old = client.announcement()
        old_pk = verify_announcement(old, pinned, allow_insecure_test_size=True)
        in_flight = _encrypted_sum(old_pk, [[4], [5], [6]])  # encrypted before the rotation

        rotated = _cli_json(
            "rotate", "--keystore", str(ks), "--passphrase-env", PASS_VAR, *TEST_BITS
        )
        assert rotated["rotated_from"] == old.key_id
        new = client.announcement()  # the running service picked up the rotated keystore
        assert new.key_id == rotated["rotated_to"] != old.key_id
        new_pk = verify_announcement(new, pinned, allow_insecure_test_size=True)
        assert {a.key_id for a in client.announcements()} == {old.key_id, new.key_id}

        assert client.decrypt_sums(old.key_id, _qid(), PLATFORMS, in_flight) == [15]
        assert client.decrypt_sums(
            new.key_id, _qid(), PLATFORMS, _encrypted_sum(new_pk, [[1], [1], [1]])
        ) == [3]

        # The active key cannot be retired; the old one can, and then never decrypts again.
        refused = _cli(
            "retire", "--keystore", str(ks), "--passphrase-env", PASS_VAR, "--key-id", new.key_id
        )
        assert refused.returncode == 2 and "active key" in refused.stderr
        _cli_json(
            "retire", "--keystore", str(ks), "--passphrase-env", PASS_VAR, "--key-id", old.key_id
        )
        with pytest.raises(KeyHolderRefusal, match="retired") as exc:
            client.decrypt_sums(old.key_id, _qid(), PLATFORMS, in_flight)
        assert exc.value.status == 409
        # A fresh client learns of the erased key from /v1/keys; its announcement is expired.
        with running.client(verify_key=pinned, allow_insecure_test_size=True) as fresh:
            anns = {a.key_id: a for a in fresh.announcements()}
            with pytest.raises(AnnouncementError, match="expired"):
                verify_announcement(anns[old.key_id], pinned, allow_insecure_test_size=True)
            with pytest.raises(KeyHolderRefusal, match="retired"):
                fresh.decrypt_sums(old.key_id, _qid(), PLATFORMS, in_flight)
        # A client pinned to another key holder's verify key refuses this one's announcement.
        stranger = Keystore.create(None, None, bits=1024, allow_insecure_test_size=True)
        with (
            running.client(
                verify_key=stranger.verify_key_bytes, allow_insecure_test_size=True
            ) as wary,
            pytest.raises(KeyHolderUnavailable, match="signature"),
        ):
            wary.announcement()
    shown = _cli_json("show", "--keystore", str(ks), "--passphrase-env", PASS_VAR)
    assert shown["verified"] is True
    assert {k["key_id"]: k["can_decrypt"] for k in shown["keys"]} == {
        old.key_id: False,
        new.key_id: True,
    }


def test_service_over_tls(tmp_path: Path) -> None:
    from fedcredit.deploy.tls import make_tls_files

    tls = make_tls_files(tmp_path / "tls")  # a throwaway CA and a 127.0.0.1 certificate
    ks, info = _init(tmp_path)
    with _start(
        ks, "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)
    ) as running:
        assert running.url.startswith("https://")
        with running.client(
            ca_file=tls.ca_cert,
            verify_key=bytes.fromhex(info["verify_key"]),
            allow_insecure_test_size=True,
        ) as client:
            assert client.announcement().key_id == info["active_key_id"]
        with pytest.raises(httpx.ConnectError):  # an untrusted CA is refused by the client
            httpx.get(running.url + "/v1/health", timeout=10)


# ---------------------------------------------------------------------------- the keystore


def _factor_forms(x: int) -> list[bytes]:
    be = x.to_bytes((x.bit_length() + 7) // 8, "big")
    return [
        str(x).encode(),
        format(x, "x").encode(),
        format(x, "X").encode(),
        be,
        base64.b64encode(be),
    ]


@pytest.mark.parametrize("kind", ["passphrase", "key-file"])
def test_keystore_holds_no_private_factor_in_clear(tmp_path: Path, kind: str) -> None:
    if kind == "passphrase":
        secret = KeystoreSecret.from_passphrase(PASSPHRASE)
    else:
        KeystoreSecret.write_new_key_file(tmp_path / "ks.key")
        secret = KeystoreSecret.from_key_file(tmp_path / "ks.key")
    path = tmp_path / "ks.json"
    store = Keystore.create(path, secret, bits=1024, allow_insecure_test_size=True)
    store.rotate(allow_insecure_test_size=True)  # two key pairs on file
    store.save()
    assert path.stat().st_mode & 0o777 == 0o600
    data = path.read_bytes()
    for rec in store.keys:
        assert rec.private_key is not None
        for factor in (int(rec.private_key.p), int(rec.private_key.q)):
            for form in _factor_forms(factor):
                assert form not in data
        assert format(int(rec.public_key.n), "x").encode() in data  # n is public, on file
    signing_raw = store._signing_raw()
    assert signing_raw not in data and signing_raw.hex().encode() not in data
    shown = json.dumps(store.summary()).encode()  # what `show` prints
    for rec in store.keys:
        assert rec.private_key is not None
        for factor in (int(rec.private_key.p), int(rec.private_key.q)):
            assert not any(form in shown for form in _factor_forms(factor))
    assert signing_raw.hex().encode() not in shown
    reopened = Keystore.open(path, secret)
    assert [k.key_id for k in reopened.keys] == [k.key_id for k in store.keys]
    assert reopened.verify_key_bytes == store.verify_key_bytes


def test_wrong_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    ks, _ = _init(tmp_path)
    proc = _cli(
        "show",
        "--keystore",
        str(ks),
        "--passphrase-env",
        PASS_VAR,
        env={**_env(), PASS_VAR: "wrong passphrase"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"cannot unlock keystore {ks}: wrong passphrase" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        Keystore.open(ks, KeystoreSecret.from_passphrase("nope"))
    key_file = tmp_path / "k.hex"
    KeystoreSecret.write_new_key_file(key_file)
    with pytest.raises(KeystoreError, match="locked with a passphrase"):
        Keystore.open(ks, KeystoreSecret.from_key_file(key_file))
    # serve fails the same way, before listening.
    proc = _cli(
        "serve",
        "--keystore",
        str(ks),
        "--passphrase-env",
        PASS_VAR,
        "--listen",
        "127.0.0.1:0",
        env={**_env(), PASS_VAR: "wrong"},
    )
    assert proc.returncode == 2 and "wrong passphrase" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_keystore_tampering_and_cli_misuse(tmp_path: Path) -> None:
    secret = KeystoreSecret.from_passphrase(PASSPHRASE)
    path = tmp_path / "ks.json"
    Keystore.create(path, secret, bits=1024, allow_insecure_test_size=True)
    doc = json.loads(path.read_text())
    doc["auth"]["token_sha256"] = "00" * 32  # an attacker's own token
    path.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="tampered"):
        Keystore.open(path, secret)
    with pytest.raises(KeystoreError, match="already exists"):
        Keystore.create(path, secret, bits=1024, allow_insecure_test_size=True)

    ks = tmp_path / "fresh.json"
    proc = _cli("init", "--keystore", str(ks), "--passphrase-env", PASS_VAR, "--bits", "1024")
    assert proc.returncode == 2 and "--bits must be 2048 or 3072" in proc.stderr
    proc = _cli("init", "--keystore", str(ks), "--passphrase-env", "NO_SUCH_VAR_X", *TEST_BITS)
    assert proc.returncode == 2 and "NO_SUCH_VAR_X" in proc.stderr
    key_file, token_file = tmp_path / "fresh.key", tmp_path / "coordinator.token"
    info = _cli_json(
        "init",
        "--keystore",
        str(ks),
        "--key-file",
        str(key_file),
        *TEST_BITS,
        "--token-file",
        str(token_file),
    )
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert info["token_configured"] is True
    token = token_file.read_text().strip()
    assert token.encode() not in ks.read_bytes()  # only its hash is kept
    proc = _cli("init", "--keystore", str(ks), "--key-file", str(key_file), *TEST_BITS)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = _cli(
        "serve", "--keystore", str(ks), "--key-file", str(key_file), "--min-participants", "1"
    )
    assert proc.returncode == 2 and "at least 2" in proc.stderr
    # init's token works for serve without --token-file.
    running = start_keyholder_process(ks, ["--key-file", str(key_file)], env=_env(), token=token)
    with running, running.client(allow_insecure_test_size=True) as client:
        assert client.announcement().key_id == info["active_key_id"]


def test_cli_commands_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command functions as ``fedcredit.cli`` will call them (``register`` + ``func``)."""
    from fedcredit import keyholder_cli

    ks, pw = tmp_path / "ks.json", tmp_path / "pass.txt"
    pw.write_text(PASSPHRASE + "\n")
    secret = ["--passphrase-file", str(pw)]
    assert (
        keyholder_cli.main(["keyholder", "init", "--keystore", str(ks), *secret, *TEST_BITS]) == 0
    )
    capsys.readouterr()
    assert keyholder_cli.main(["keyholder", "show", "--keystore", str(ks), *secret, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified"] is True and len(shown["keys"]) == 1
    assert (
        keyholder_cli.main(
            ["keyholder", "retire", "--keystore", str(ks), *secret, "--key-id", "0" * 16]
        )
        == 2
    )
    assert "no key 0000000000000000" in capsys.readouterr().err
    assert (
        keyholder_cli.main(
            ["keyholder", "serve", "--keystore", str(ks), *secret, "--listen", "nonsense"]
        )
        == 2
    )
    assert "--listen must be HOST:PORT" in capsys.readouterr().err
    assert (
        keyholder_cli.main(
            ["keyholder", "serve", "--keystore", str(ks), *secret, "--listen", "127.0.0.1:0"]
        )
        == 2
    )  # init made no token
    assert "no bearer token" in capsys.readouterr().err


# ---------------------------------------------------------------------- the announcements


def _announcement(store: Keystore, now: dt.datetime) -> KeyAnnouncement:
    return store.announcement(store.active.key_id, now)


@pytest.fixture(scope="module")
def two_stores() -> tuple[Keystore, Keystore]:
    return (
        Keystore.create(None, None, bits=1024, allow_insecure_test_size=True),
        Keystore.create(None, None, bits=1024, allow_insecure_test_size=True),
    )


def test_announcement_tampering_is_detected(two_stores: tuple[Keystore, Keystore]) -> None:
    store, other = two_stores
    now = dt.datetime.now(dt.UTC)
    ann = _announcement(store, now)
    pinned = store.verify_key_bytes
    assert verify_announcement(ann, pinned, allow_insecure_test_size=True, now=now)
    assert KeyAnnouncement.from_bytes(ann.to_bytes()) == ann

    other_ann = _announcement(other, now)
    flipped = bytearray(ann.signature)
    flipped[0] ^= 1
    changes = {
        "key_id": other_ann.key_id,
        "public_key": other_ann.public_key,
        "bits": 2048,
        "issued_at": ann.issued_at - dt.timedelta(seconds=1),
        "expires_at": ann.expires_at + dt.timedelta(days=365),
        "signature": bytes(flipped),
    }
    for field, value in changes.items():
        forged = ann.model_copy(update={field: value})
        with pytest.raises(AnnouncementError):
            verify_announcement(forged, pinned, allow_insecure_test_size=True, now=now)
        # ... also after a trip through the wire form.
        with pytest.raises(AnnouncementError):
            verify_announcement(
                KeyAnnouncement.from_bytes(forged.to_bytes()),
                pinned,
                allow_insecure_test_size=True,
                now=now,
            )
    # A coordinator substituting its own key pair, signed with its own key: refused.
    with pytest.raises(AnnouncementError, match="signature"):
        verify_announcement(other_ann, pinned, allow_insecure_test_size=True, now=now)
    # Expired, or "issued" far in the future.
    with pytest.raises(AnnouncementError, match="expired"):
        verify_announcement(
            ann, pinned, allow_insecure_test_size=True, now=ann.expires_at + dt.timedelta(seconds=1)
        )
    with pytest.raises(AnnouncementError, match="future"):
        verify_announcement(
            ann, pinned, allow_insecure_test_size=True, now=now - dt.timedelta(hours=1)
        )
    # A correctly signed but inconsistent announcement (key id of another key).
    signer = store.signing_key
    bad = sign_announcement(
        signer, ann.public_key, bits=ann.bits, issued_at=now, expires_at=now + dt.timedelta(hours=1)
    )
    bad = bad.model_copy(update={"key_id": other_ann.key_id})
    with pytest.raises(AnnouncementError):
        verify_announcement(bad, pinned, allow_insecure_test_size=True, now=now)
    # Malformed wire bytes are AnnouncementErrors, not crashes.
    wire = json.loads(ann.to_bytes())
    for mutate in (
        {"extra": 1},
        {"bits": "1024"},
        {"public_key": "%%%"},
        {"format": "x"},
        {"issued_at": "yesterday"},
    ):
        with pytest.raises(AnnouncementError):
            KeyAnnouncement.from_bytes(json.dumps({**wire, **mutate}).encode())
    for junk in (b"", b"[]", b"\xff", b"{" * 10_000):
        with pytest.raises(AnnouncementError):
            KeyAnnouncement.from_bytes(junk)


# -------------------------------------------------------------------- in-process key holder


def test_local_key_holder_has_the_service_checks_and_grace() -> None:
    clock = [dt.datetime(2026, 1, 1, tzinfo=dt.UTC)]
    kh = LocalKeyHolder(
        1024, allow_insecure_test_size=True, clock=lambda: clock[0], grace=dt.timedelta(hours=2)
    )
    ann = kh.announcement()
    pk = verify_announcement(ann, kh.verify_key, allow_insecure_test_size=True, now=clock[0])
    sums = _encrypted_sum(pk, [[1, 2], [3, 4], [5, 6]])
    assert kh.decrypt_sums(ann.key_id, "a" * 32, PLATFORMS, sums) == [9, 12]
    with pytest.raises(KeyHolderRefusal, match="replay"):
        kh.decrypt_sums(ann.key_id, "a" * 32, PLATFORMS, sums)
    with pytest.raises(KeyHolderRefusal, match="at least 3"):
        kh.decrypt_sums(ann.key_id, "b" * 32, PLATFORMS[:1], sums)
    new_id = kh.rotate()
    clock[0] += dt.timedelta(hours=1)
    assert kh.decrypt_sums(ann.key_id, "c" * 32, PLATFORMS, sums) == [9, 12]  # in grace
    clock[0] += dt.timedelta(hours=2)
    with pytest.raises(KeyHolderRefusal, match="past its grace") as exc:
        kh.decrypt_sums(ann.key_id, "d" * 32, PLATFORMS, sums)
    assert exc.value.status == 409
    assert kh.announcement().key_id == new_id
    with pytest.raises(ValueError, match="at least 2"):
        LocalKeyHolder(1024, allow_insecure_test_size=True, min_participants=1)
    assert verify_audit_log(kh.core.audit.lines) == 5  # 2 decryptions, 3 refusals


def test_audit_log_is_tamper_evident(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.append({"event": "decrypt", "query_id": f"{i:032x}", "count": i})
    AuditLog(path).append({"event": "decrypt", "query_id": "f" * 32, "count": 9})  # restart
    assert verify_audit_log(path) == 4
    lines = path.read_text().splitlines()
    edited = lines[1].replace('"count":1', '"count":2')
    with pytest.raises(ValueError, match="line 2"):
        verify_audit_log([lines[0], edited, *lines[2:]])
    with pytest.raises(ValueError, match="line 2"):
        verify_audit_log([lines[0], *lines[2:]])  # a deleted line


def test_replay_guard_persists_and_admits_one_of_concurrent_claims(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    now = dt.datetime.now(dt.UTC)
    guard = ReplayGuard(tmp_path / "q.sqlite")
    assert guard.claim("a" * 32, "k", now) and not guard.claim("a" * 32, "k", now)
    assert ReplayGuard(tmp_path / "q.sqlite").seen("a" * 32)
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda _: guard.claim("b" * 32, "k", now), range(16)))
    assert wins.count(True) == 1


# ------------------------------------------------------------------ fuzzing the decoder

_FUZZ_STORE = Keystore.create(None, None, bits=1024, allow_insecure_test_size=True)
_FUZZ_KEY = _FUZZ_STORE.active
_WIDTH = ciphertext_width(_FUZZ_KEY.public_key)

_json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
)
_json = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_b64_blobs = st.one_of(
    st.binary(max_size=3 * _WIDTH).map(lambda b: base64.b64encode(b).decode()),
    st.lists(st.integers(min_value=-5, max_value=2**2048), min_size=1, max_size=3).map(
        lambda xs: base64.b64encode(
            b"".join((x % 2 ** (8 * _WIDTH)).to_bytes(_WIDTH, "big") for x in xs)
        ).decode()
    ),
    st.text(max_size=80),
)
_near_valid = st.fixed_dictionaries(
    {
        "key_id": st.sampled_from([_FUZZ_KEY.key_id, "0" * 16, "", "G" * 16]) | _json,
        "query_id": st.sampled_from(["a" * 32, "A" * 32, "a" * 31]) | _json,
        "participants": st.lists(
            st.sampled_from(["p1", "p2", "p3", "p3", "", "x y", "ä"]), max_size=5
        )
        | _json,
        "count": st.integers(min_value=-2, max_value=5) | st.just(10**40) | _json,
        "ciphertexts": _b64_blobs | _json,
    },
    optional={"extra": _json, "seal_rows": st.integers(min_value=-1, max_value=200) | _json},
)


# Right shape, right key, three platforms: only the ciphertext values vary (0, n, n**2, ...).
_N = int(_FUZZ_KEY.public_key.n)
_ct_values = st.one_of(
    st.integers(min_value=0, max_value=2 ** (8 * _WIDTH) - 1),
    st.sampled_from([0, 1, _N, 2 * _N, _N * _N - 1, _N * _N, 2 ** (8 * _WIDTH) - 1]),
)
_well_formed = st.lists(_ct_values, min_size=1, max_size=4).map(
    lambda xs: {
        "key_id": _FUZZ_KEY.key_id,
        "query_id": "c" * 32,
        "participants": ["p1", "p2", "p3"],
        "count": len(xs),
        "ciphertexts": base64.b64encode(b"".join(x.to_bytes(_WIDTH, "big") for x in xs)).decode(),
    }
)


def _decode(raw: object) -> None:
    try:
        req = decode_decrypt_request(raw, _FUZZ_STORE)
    except KeyHolderRefusal as exc:
        assert 400 <= exc.status < 500 and exc.reason
    else:
        assert len(req.ciphertexts) >= 1 and len(set(req.participants)) >= 3


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, _near_valid, _well_formed))
def test_decoder_rejects_arbitrary_input_cleanly(raw: object) -> None:
    _decode(raw)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _near_valid.map(lambda d: json.dumps(d).encode())))
def test_body_decoder_rejects_arbitrary_bytes_cleanly(body: bytes) -> None:
    try:
        decode_decrypt_body(body, _FUZZ_STORE)
    except KeyHolderRefusal as exc:
        assert 400 <= exc.status < 500


def test_decoder_names_the_bad_index() -> None:
    good = encrypt_plaintexts(_FUZZ_KEY.public_key, [1, 2, 3], workers=1)
    for bad in (0, _N, _N * _N):
        cts = [*good[:2], bad]
        with pytest.raises(KeyHolderRefusal, match="ciphertext 2") as exc:
            decode_decrypt_request(_body(_FUZZ_KEY.public_key, _FUZZ_KEY.key_id, cts), _FUZZ_STORE)
        assert exc.value.status == 422
    ok = decode_decrypt_request(_body(_FUZZ_KEY.public_key, _FUZZ_KEY.key_id, good), _FUZZ_STORE)
    assert ok.ciphertexts == good
    sneaky = _body(_FUZZ_KEY.public_key, _FUZZ_KEY.key_id, good, participants=["p1\n", "p2", "p3"])
    with pytest.raises(KeyHolderRefusal, match="not a platform name"):
        decode_decrypt_request(sneaky, _FUZZ_STORE)


def test_decoder_edge_cases() -> None:
    for body in (
        b"9" * 5000,
        b"[" * 100_000,
        b'{"a": 1e999999}',
        "\ud800".encode("utf-8", "surrogatepass"),
    ):
        with pytest.raises(KeyHolderRefusal):
            decode_decrypt_body(body, _FUZZ_STORE)
    core = KeyHolderCore(lambda: _FUZZ_STORE, replay=ReplayGuard(None), audit=AuditLog(None))
    with pytest.raises(KeyHolderRefusal, match="not JSON"):
        core.decrypt_body(b"\x00garbage")
    assert core.audit.lines and json.loads(core.audit.lines[-1])["event"] == "refused"


# ------------------------------------------------------------------ sealed delivery of totals


def _platform_keys() -> dict[str, X25519PrivateKey]:
    return {name: X25519PrivateKey.generate() for name in PLATFORMS}


def _raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _profile_rows(seed: int, count: int) -> np.ndarray:
    """Three platforms' (debt fen, active loans, has-active-loan) rows for ``count`` ids."""
    rng = np.random.default_rng(seed)
    loans = rng.integers(0, 4, size=(len(PLATFORMS), count))
    debt = rng.integers(0, 10**7, size=(len(PLATFORMS), count)) * (loans > 0)
    return np.stack([debt, loans, (loans > 0).astype(np.int64)], axis=-1)


def _packed_sums(pk, rows: np.ndarray) -> list[int]:  # type: ignore[no-untyped-def]
    """Three platforms' packed rows, encrypted and summed (no masks: they would cancel)."""
    layout = debt_profile_layout(len(PLATFORMS))
    bits = int(pk.n).bit_length()
    return _encrypted_sum(pk, [layout.pack(r, bits) for r in rows])


def _open_all(
    sealed: dict[str, bytes], ann: KeyAnnouncement, platform_keys: dict, qid: str, rows: int
) -> dict[str, np.ndarray]:
    assert ann.delivery_key is not None
    out = {}
    for name, blob in sealed.items():
        shared = pairwise_secret(platform_keys[name], ann.delivery_key)
        stream = delivery.delivery_stream(shared, qid, ann.key_id, name, rows)
        out[name] = delivery.open_rows(blob, list(range(rows)), stream)
    return out


def test_totals_are_sealed_for_each_participant_in_process() -> None:
    keys = _platform_keys()
    kh = LocalKeyHolder(
        1024, allow_insecure_test_size=True, roster={n: _raw(k) for n, k in keys.items()}
    )
    ann = kh.announcement()
    pk = verify_announcement(ann, kh.verify_key, allow_insecure_test_size=True)
    rows = _profile_rows(7, 50)
    qid = _qid()
    sealed = kh.decrypt_and_seal(ann.key_id, qid, PLATFORMS, _packed_sums(pk, rows), 50)
    assert set(sealed) == set(PLATFORMS)
    assert all(len(b) == 50 * delivery.ROW_BYTES for b in sealed.values())
    for name, opened in _open_all(sealed, ann, keys, qid, 50).items():
        assert (opened == rows.sum(axis=0)).all(), name
    # Another platform's key opens nothing meaningful.
    stranger = pairwise_secret(X25519PrivateKey.generate(), ann.delivery_key)
    wrong = delivery.open_rows(
        sealed["jd"], list(range(50)), delivery.delivery_stream(stranger, qid, ann.key_id, "jd", 50)
    )
    assert not (wrong == rows.sum(axis=0)).all()

    with pytest.raises(KeyHolderRefusal, match="not in the key holder's roster") as exc:
        kh.decrypt_and_seal(
            ann.key_id, _qid(), ["alipay", "webank", "mallory"], _packed_sums(pk, rows), 50
        )
    assert exc.value.status == 403
    garbage = _encrypted_sum(pk, [[secrets.randbelow(int(pk.n))] * 3] * 3)  # uncancelled masks
    with pytest.raises(KeyHolderRefusal, match="not valid totals") as exc:
        kh.decrypt_and_seal(ann.key_id, _qid(), PLATFORMS, garbage, 50)
    assert exc.value.status == 422
    with pytest.raises(KeyHolderRefusal, match="count mismatch"):
        kh.decrypt_and_seal(ann.key_id, _qid(), PLATFORMS, _packed_sums(pk, rows), 5000)
    no_roster = LocalKeyHolder(1024, allow_insecure_test_size=True)
    a2 = no_roster.announcement()
    with pytest.raises(KeyHolderRefusal, match="no roster") as exc:
        no_roster.decrypt_and_seal(a2.key_id, _qid(), PLATFORMS, [1], 1)
    assert exc.value.status == 409


def test_totals_are_sealed_through_the_service(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = _platform_keys()
    entries = {
        name: RosterEntry(
            agreement_key=_raw(k).hex(),
            signing_key=Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
            .hex(),
        )
        for name, k in keys.items()
    }
    ks, info = _init(tmp_path)
    pinned = bytes.fromhex(info["verify_key"])
    roster_path = tmp_path / "roster.json"
    save_roster(roster_path, Roster(platforms=entries, keyholder_signing_key=info["verify_key"]))
    with (
        _start(ks, "--roster", str(roster_path)) as running,
        running.client(verify_key=pinned, allow_insecure_test_size=True) as client,
    ):
        ann = client.announcement()
        # What a platform does with the announcement the coordinator forwards to it:
        wire = KeyAnnouncement.from_bytes(ann.to_bytes())
        pk = verify_announcement(wire, pinned, allow_insecure_test_size=True)
        rows = _profile_rows(1, 40)
        qid = _qid()
        sealed = client.decrypt_and_seal(ann.key_id, qid, PLATFORMS, _packed_sums(pk, rows), 40)
        for opened in _open_all(sealed, wire, keys, qid, 40).values():
            assert (opened == rows.sum(axis=0)).all()
        with pytest.raises(KeyHolderRefusal, match="already decrypted"):
            client.decrypt_and_seal(ann.key_id, qid, PLATFORMS, _packed_sums(pk, rows), 40)
    audit = ks.with_name(ks.name + ".audit.jsonl")
    assert any(json.loads(x).get("sealed_rows") == 40 for x in audit.read_text().splitlines())
