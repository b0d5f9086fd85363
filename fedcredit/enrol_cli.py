"""``fedcredit enrol``: create a platform identity and pin its public keys in the roster.

Enrolment is the one step where keys enter the federation, so it refuses anything that would
silently change a pinned key: an identity file made for another platform, a roster entry with
a different key for the same name, or a different key holder key, unless ``--replace`` says
so. The roster holds public keys only; the identity file (mode 0600) never leaves the
platform. After enrolling, compare the printed roster fingerprint out of band.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

log = logging.getLogger("fedcredit.enrol")

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``enrol`` subcommand to ``fedcredit``'s subparsers."""
    enrol = subparsers.add_parser(
        "enrol", help="create a platform identity and pin its public keys in the roster"
    )
    enrol.add_argument("--platform", required=True, help="platform name (letters, digits, _ . -)")
    enrol.add_argument(
        "--identity", required=True, help="identity file (private keys; created if missing)"
    )
    enrol.add_argument(
        "--roster", required=True, help="roster file (public keys; created if missing)"
    )
    enrol.add_argument(
        "--keyholder-key", help="pin the decryption-key holder's Ed25519 public key (64 hex)"
    )
    enrol.add_argument(
        "--replace", action="store_true", help="allow replacing a different pinned key"
    )
    enrol.add_argument("--json", action="store_true", help="machine-readable result")
    enrol.set_defaults(func=cmd_enrol)
    return enrol


def cmd_enrol(args: argparse.Namespace) -> int:
    from fedcredit.cli import UsageError
    from protocols.identity import (
        PLATFORM_NAME_PATTERN,
        IdentityError,
        PlatformIdentity,
        Roster,
        load_identity,
        load_roster,
        save_roster,
    )

    name = args.platform
    if not re.fullmatch(PLATFORM_NAME_PATTERN, name or ""):
        raise UsageError(f"--platform must match {PLATFORM_NAME_PATTERN}, got {name!r}")
    identity_path, roster_path = Path(args.identity), Path(args.roster)
    keyholder = args.keyholder_key
    if keyholder is not None:
        if not _HEX64.fullmatch(keyholder):
            raise UsageError("--keyholder-key must be 64 hex characters (an Ed25519 public key)")
        keyholder = keyholder.lower()

    try:
        created = not identity_path.exists()
        if created:
            identity = PlatformIdentity.generate(name)
        else:
            identity = load_identity(identity_path)
            if identity.name != name:
                raise UsageError(
                    f"--identity: {identity_path} belongs to platform {identity.name!r}, "
                    f"not {name!r}"
                )
        roster = load_roster(roster_path) if roster_path.exists() else Roster()
        entry = identity.public_entry()
        old = roster.platforms.get(name)
        if old is not None and old != entry and not args.replace:
            raise UsageError(
                f"--roster: {roster_path} already pins different keys for {name!r}; "
                "pass --replace to re-key it"
            )
        updated = roster.with_platform(name, entry)
        if keyholder is not None:
            pinned = roster.keyholder_signing_key
            if pinned is not None and pinned != keyholder and not args.replace:
                raise UsageError(
                    f"--keyholder-key: {roster_path} already pins a different key holder key; "
                    "pass --replace to change it"
                )
            try:
                updated = updated.with_keyholder(keyholder)
            except ValueError as exc:
                raise UsageError(f"--keyholder-key: {_first_error(exc)}") from None
        if created:
            identity.save(identity_path)
        if updated != roster or not roster_path.exists():
            save_roster(roster_path, updated)
    except IdentityError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write: {exc}") from None

    fingerprint = updated.fingerprint()
    if args.json:
        print(
            json.dumps(
                {
                    "platform": name,
                    "identity": str(identity_path),
                    "roster": str(roster_path),
                    "roster_fingerprint": fingerprint,
                },
                indent=2,
            )
        )
    else:
        action = "created" if created else "kept"
        print(
            f"enrolled {name}: identity {identity_path} ({action}), roster {roster_path} "
            f"({len(updated.platforms)} platforms, fingerprint {fingerprint})"
        )
    return 0


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return str(errors()[0]["msg"])
        except (IndexError, KeyError, TypeError):
            pass
    return str(exc)
