"""Everything a federation on one machine needs besides ledgers: enrolment and a key holder.

The demo, the benchmarks and the test suite run the bureau, its platforms and the key holder
on one machine. They still keep the parties apart exactly as a deployment does: every
platform gets its own identity, every party a pinned roster, and the key holder runs as its
own process (``fedcredit keyholder serve``) with an encrypted keystore, so the coordinator's
process never holds a private key. ``LocalFederation.overrides`` is the run config that points
the ServerApp at that key holder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcredit.enrolment import Enrolment, enrol_platforms
from protocols.identity import load_roster, save_roster
from server.keyholder_client import RunningKeyHolder, start_keyholder_process
from server.keystore import Keystore, KeystoreSecret

log = logging.getLogger(__name__)


@dataclass
class LocalFederation:
    enrolment: Enrolment
    keyholder: RunningKeyHolder
    token_file: Path
    keystore: Path

    def overrides(self) -> dict[str, object]:
        """Run-config keys that point the ServerApp at this key holder."""
        return {"keyholder-url": self.keyholder.url, "keyholder-token-file": str(self.token_file)}

    def close(self) -> None:
        self.keyholder.stop()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def start_local_federation(
    ledgers: Sequence[str],
    workdir: Path,
    *,
    key_bits: int = 2048,
    min_participants: int = 3,
    env: dict[str, str] | None = None,
) -> LocalFederation:
    """Enrol every ledger's platform, create a keystore, start the key holder service."""
    workdir.mkdir(parents=True, exist_ok=True)
    enrolment = enrol_platforms(list(ledgers), workdir / "enrolment")
    keyholder_dir = workdir / "keyholder"
    keyholder_dir.mkdir(exist_ok=True)
    key_file = keyholder_dir / "keystore.key"
    keystore_path = keyholder_dir / "keystore.json"
    for stale in (key_file, keystore_path):
        stale.unlink(missing_ok=True)
    KeystoreSecret.write_new_key_file(key_file)
    keystore = Keystore.create(keystore_path, KeystoreSecret.from_key_file(key_file), bits=key_bits)
    roster = load_roster(enrolment.roster).with_keyholder(keystore.verify_key_bytes.hex())
    save_roster(enrolment.roster, roster)
    child_env = dict(os.environ if env is None else env)
    running = start_keyholder_process(
        keystore_path,
        ["--key-file", str(key_file)],
        min_participants=min_participants,
        env=child_env,
        extra_args=["--roster", enrolment.roster],
    )
    token_file = keyholder_dir / "coordinator.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(running.token + "\n")
    log.info("key holder for %d platforms at %s (pid %d)", len(ledgers), running.url, running.pid)
    return LocalFederation(enrolment, running, token_file, keystore_path)
