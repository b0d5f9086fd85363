"""Enrolled parties for in-process tests: identities, a pinned roster, an in-memory key holder.

The in-process harness (``tests/inprocess.py``) replaces Flower's transport only; the parties
are the real ones, except that the key holder is ``LocalKeyHolder`` (same checks as the
service, in this process) so each test does not start a service. Tests through the real
runtimes start the real service (``fedcredit.local_federation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from clients.app import build_client_app
from fedcredit.enrolment import Enrolment, enrol_platforms
from protocols.identity import load_roster, save_roster
from server.keyholder_client import LocalKeyHolder


@dataclass
class Parties:
    ledgers: list[str]
    enrolment: Enrolment
    keyholder: LocalKeyHolder

    def client_app(self, mods: Sequence[Any] = ()) -> ClientApp:
        return build_client_app(
            self.ledgers, self.enrolment.identities, self.enrolment.roster, mods
        )


def enrol(ledgers: Sequence[str], workdir: Path, bits: int = 2048) -> Parties:
    enrolment = enrol_platforms(list(ledgers), workdir)
    roster = load_roster(enrolment.roster)
    keyholder = LocalKeyHolder(bits, roster=roster.agreement_keys())
    save_roster(enrolment.roster, roster.with_keyholder(keyholder.verify_key.hex()))
    return Parties(list(ledgers), enrolment, keyholder)
