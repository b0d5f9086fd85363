"""Enrolment of a whole federation on one machine: the demo's, the tests' and a try-out's.

In production each platform enrols itself (``fedcredit enrol``: it keeps its private identity
and sends only its public keys to be pinned in everyone's roster). For a federation that runs
on one machine (the demo, the test suite, a try-out) this does the same for every ledger at
once: one identity file per platform (mode 0600) and one roster that pins every platform's
public keys and the key holder's signing key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clients.ledger.store import open_ledger
from protocols.identity import PlatformIdentity, Roster, save_roster


@dataclass(frozen=True)
class Enrolment:
    identities: list[str]  # one per ledger, same order
    roster: str


def ledger_platform(location: str) -> str:
    """The platform name a ledger records (the name its node must enrol under)."""
    with open_ledger(location) as ledger:
        name = ledger.meta().get("platform")
    if not name:
        raise ValueError(f"{location}: the ledger records no platform name")
    return str(name)


def enrol_platforms(
    ledgers: list[str], out: Path, keyholder_signing_key: str | None = None
) -> Enrolment:
    """Fresh identities for every ledger's platform and a roster pinning them all."""
    out.mkdir(parents=True, exist_ok=True)
    roster = Roster()
    identities: list[str] = []
    for location in ledgers:
        name = ledger_platform(location)
        if name in roster.platforms:
            raise ValueError(f"two ledgers belong to the same platform {name!r}")
        identity = PlatformIdentity.generate(name)
        path = out / f"{name}.identity.json"
        identity.save(path)
        roster = roster.with_platform(name, identity.public_entry())
        identities.append(str(path))
    if keyholder_signing_key:
        roster = roster.with_keyholder(keyholder_signing_key)
    roster_path = out / "roster.json"
    save_roster(roster_path, roster)
    return Enrolment(identities, str(roster_path))
