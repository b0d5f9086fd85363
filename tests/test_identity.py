"""Platform identities, the pinned roster, and ``fedcredit enrol``."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from fedcredit.cli import UsageError
from fedcredit.enrol_cli import register
from protocols.identity import (
    IdentityError,
    PlatformIdentity,
    Roster,
    RosterEntry,
    RosterError,
    load_identity,
    load_roster,
    save_roster,
)
from protocols.masking import MaskContext, platform_mask


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcredit")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _enrol(*argv: str) -> int:
    args = _parser().parse_args(["enrol", *argv])
    return args.func(args)


def _ed_pub_hex() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


# ---------------------------------------------------------------------------- identity


def test_identity_roundtrip_mode_and_repr(tmp_path: Path) -> None:
    ident = PlatformIdentity.generate("alpha_1")
    path = tmp_path / "sub" / "alpha.identity.json"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_identity(path)
    assert loaded.name == "alpha_1"
    assert loaded.public_entry() == ident.public_entry()
    assert "private" not in repr(loaded) and loaded.name in repr(loaded)
    doc = json.loads(path.read_text())
    assert doc["format"] == "fedcredit-identity/v1"


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "ü", "a/b"])
def test_identity_rejects_bad_names(name: str) -> None:
    with pytest.raises(IdentityError, match="platform name"):
        PlatformIdentity.generate(name)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("signing_key"), "field 'signing_key' is missing"),
        (lambda d: d.update(format="v0"), "field 'format'"),
        (lambda d: d.update(name="bad name"), "field 'name'"),
        (lambda d: d.update(agreement_private_key="zz"), "field 'agreement_private_key'"),
        (lambda d: d.update(agreement_key="00" * 32), "'agreement_key' does not match"),
        (lambda d: d.update(signing_key="11" * 32), "'signing_key' does not match"),
        (lambda d: d.update(extra="1"), "unknown field"),
        (lambda d: d.update(name=5), "field 'name' must be a string"),
    ],
)
def test_load_identity_errors_name_file_and_field(tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "id.json"
    PlatformIdentity.generate("a").save(path)
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match=message) as info:
        load_identity(path)
    assert str(path) in str(info.value)


def test_load_identity_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="not found"):
        load_identity(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(IdentityError, match="not valid JSON"):
        load_identity(bad)
    bad.write_text('{"name": "a", "name": "b"}')
    with pytest.raises(IdentityError, match="duplicate JSON key 'name'"):
        load_identity(bad)
    bad.write_text("[]")
    with pytest.raises(IdentityError, match="JSON object"):
        load_identity(bad)


# ---------------------------------------------------------------------------- roster


def test_roster_roundtrip_fingerprint_and_keys(tmp_path: Path) -> None:
    a, b = PlatformIdentity.generate("a"), PlatformIdentity.generate("b")
    roster = Roster().with_platform("a", a.public_entry()).with_platform("b", b.public_entry())
    roster = roster.with_keyholder(_ed_pub_hex())
    path = tmp_path / "roster.json"
    save_roster(path, roster)
    loaded = load_roster(path)
    assert loaded == roster
    assert loaded.fingerprint() == roster.fingerprint()
    assert len(roster.fingerprint()) == 64
    assert roster.fingerprint() != Roster().with_platform("a", a.public_entry()).fingerprint()
    keys = loaded.agreement_keys()
    assert set(keys) == {"a", "b"} and all(len(k) == 32 for k in keys.values())
    assert set(loaded.signing_keys()) == {"a", "b"}
    # the pinned keys drive masking end to end
    ctx = MaskContext(
        session_id="s",
        query_id="ab" * 16,
        participants=("a", "b"),
        key_id="k",
        count=3,
        modulus=2**127 - 1,
    )
    ma = platform_mask("a", a.agreement_key, keys, ctx)
    mb = platform_mask("b", b.agreement_key, keys, ctx)
    assert [(x + y) % ctx.modulus for x, y in zip(ma, mb, strict=True)] == [0, 0, 0]


def test_roster_validation() -> None:
    entry = PlatformIdentity.generate("a").public_entry()
    with pytest.raises(ValidationError, match="Extra inputs"):
        Roster.model_validate({"platforms": {}, "surprise": 1})
    with pytest.raises(ValidationError):
        Roster.model_validate({"format": "fedcredit-roster/v2"})
    with pytest.raises(ValidationError):
        Roster.model_validate({"platforms": {"bad name": entry.model_dump()}})
    with pytest.raises(ValidationError, match="share an agreement key"):
        Roster.model_validate({"platforms": {"a": entry.model_dump(), "b": entry.model_dump()}})
    with pytest.raises(ValidationError, match="X25519 public key: small-order"):
        RosterEntry(agreement_key="00" * 32, signing_key=entry.signing_key)
    with pytest.raises(ValidationError, match="Ed25519"):
        RosterEntry(agreement_key=entry.agreement_key, signing_key="00" * 32)
    with pytest.raises(ValidationError, match="pattern"):
        RosterEntry(agreement_key=entry.agreement_key.upper(), signing_key=entry.signing_key)
    with pytest.raises(ValidationError, match="Ed25519"):
        Roster().with_keyholder("00" * 32)


def test_load_roster_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    entry = PlatformIdentity.generate("a").public_entry().model_dump()
    entry["signing_key"] = "zz"
    path.write_text(json.dumps({"format": "fedcredit-roster/v1", "platforms": {"a": entry}}))
    with pytest.raises(RosterError, match=r"roster.json: platforms.a.signing_key") as info:
        load_roster(path)
    assert str(path) in str(info.value)
    with pytest.raises(RosterError, match="not found"):
        load_roster(tmp_path / "missing.json")
    path.write_text('{"platforms": {"a": {}, "a": {}}}')
    with pytest.raises(RosterError, match="duplicate JSON key 'a'"):
        load_roster(path)


# ---------------------------------------------------------------------------- enrol


def test_enrol_creates_and_updates(tmp_path: Path, capsys) -> None:
    roster = tmp_path / "roster.json"
    ida, idb = tmp_path / "a.json", tmp_path / "b.json"
    assert _enrol("--platform", "a", "--identity", str(ida), "--roster", str(roster)) == 0
    assert "enrolled a" in capsys.readouterr().out
    kh = _ed_pub_hex()
    argv = ["--platform", "b", "--identity", str(idb), "--roster", str(roster)]
    assert _enrol(*argv, "--keyholder-key", kh, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    loaded = load_roster(roster)
    assert out == {
        "platform": "b",
        "identity": str(idb),
        "roster": str(roster),
        "roster_fingerprint": loaded.fingerprint(),
    }
    assert set(loaded.platforms) == {"a", "b"}
    assert loaded.keyholder_signing_key == kh
    assert loaded.platforms["a"] == load_identity(ida).public_entry()
    assert stat.S_IMODE(ida.stat().st_mode) == 0o600
    # re-running is idempotent
    before = roster.read_bytes()
    assert _enrol(*argv) == 0
    assert roster.read_bytes() == before


def test_enrol_refusals(tmp_path: Path) -> None:
    roster = tmp_path / "roster.json"
    ida = tmp_path / "a.json"
    _enrol("--platform", "a", "--identity", str(ida), "--roster", str(roster))
    with pytest.raises(UsageError, match="belongs to platform 'a', not 'b'"):
        _enrol("--platform", "b", "--identity", str(ida), "--roster", str(roster))
    # a new identity for an already enrolled name: refused unless --replace
    other = tmp_path / "a2.json"
    with pytest.raises(UsageError, match="already pins different keys for 'a'"):
        _enrol("--platform", "a", "--identity", str(other), "--roster", str(roster))
    assert not other.exists()  # nothing written on refusal
    assert (
        _enrol("--platform", "a", "--identity", str(other), "--roster", str(roster), "--replace")
        == 0
    )
    assert load_roster(roster).platforms["a"] == load_identity(other).public_entry()
    # key holder key
    base = ["--platform", "a", "--identity", str(other), "--roster", str(roster)]
    kh1, kh2 = _ed_pub_hex(), _ed_pub_hex()
    _enrol(*base, "--keyholder-key", kh1)
    with pytest.raises(UsageError, match="different key holder key"):
        _enrol(*base, "--keyholder-key", kh2)
    assert _enrol(*base, "--keyholder-key", kh2.upper(), "--replace") == 0
    assert load_roster(roster).keyholder_signing_key == kh2
    with pytest.raises(UsageError, match="64 hex"):
        _enrol(*base, "--keyholder-key", "abc")
    with pytest.raises(UsageError, match=r"--keyholder-key: .*Ed25519"):
        _enrol(*base, "--keyholder-key", "00" * 32, "--replace")
    with pytest.raises(UsageError, match="--platform must match"):
        _enrol("--platform", "bad name", "--identity", str(ida), "--roster", str(roster))
    roster.write_text("{}{")
    with pytest.raises(UsageError, match="not valid JSON"):
        _enrol(*base)
