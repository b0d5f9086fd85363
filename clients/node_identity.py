"""Who this platform node is, and whom it trusts: its identity and its pinned roster.

Why pinned files and not keys in messages
    The pairwise masks are only as good as the peers' agreement keys, and the Paillier key is
    only as good as the key holder's word that it holds the private half. If either came from
    the coordinator, a curious coordinator could substitute keys of its own and read single
    platforms' figures. So both are pinned at enrolment: each platform holds its own copy of
    the roster (every platform's X25519 agreement key and Ed25519 signing key, and the key
    holder's Ed25519 signing key) and trusts nothing else.

Node config (a SuperNode's ``--node-config``): ``identity`` (this platform's private identity
file) and ``roster`` (the roster file), beside ``ledger``. Under the simulation engine the
demo passes the same paths per partition (``build_client_app``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import cached_property

from flwr.app import Context

from clients.platform_data import PlatformData
from protocols import messages as m
from protocols.identity import IdentityError, PlatformIdentity, Roster, load_identity, load_roster
from protocols.key_announcement import AnnouncementError, KeyAnnouncement, verify_announcement
from protocols.paillier import PaillierPublicKey


@dataclass(frozen=True)
class NodeFiles:
    identity: str | None
    roster: str | None


@dataclass
class NodeIdentity:
    identity: PlatformIdentity
    roster: Roster

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def agreement_key(self):  # type: ignore[no-untyped-def]
        return self.identity.agreement_key

    @cached_property
    def roster_agreement_keys(self) -> dict[str, bytes]:
        return self.roster.agreement_keys()

    def verify_key_announcement(self, blob: bytes, key_id: str, what: str) -> PaillierPublicKey:
        """The Paillier key of a query, if the pinned key holder signed it and it is current."""
        return self._announcement(blob, key_id, what)[1]

    def delivery_key(self, blob: bytes, key_id: str, what: str) -> bytes:
        """The key holder's X25519 delivery key, from its signed announcement."""
        return bytes(self._announcement(blob, key_id, what)[0].delivery_key)

    def _announcement(
        self, blob: bytes, key_id: str, what: str
    ) -> tuple[KeyAnnouncement, PaillierPublicKey]:
        pinned = self.roster.keyholder_signing_key
        if not pinned:
            raise m.ProtocolError(f"{what}: no key holder is pinned in this platform's roster")
        try:
            announcement = KeyAnnouncement.from_bytes(blob)
            public_key = verify_announcement(
                announcement, bytes.fromhex(pinned), allow_insecure_test_size=False
            )
        except (AnnouncementError, ValueError) as exc:
            raise m.ProtocolError(f"{what}: key announcement refused: {exc}") from exc
        if announcement.key_id != key_id:
            raise m.ProtocolError(
                f"{what}: the query names key {key_id} but the announcement is for "
                f"{announcement.key_id}"
            )
        return announcement, public_key


_registered: dict[str, NodeFiles] = {}
_cache: dict[tuple[str, str, float, float], NodeIdentity] = {}
_lock = threading.Lock()


def register_files(location: str, files: NodeFiles) -> None:
    """Remember which identity and roster the node serving ``location`` was configured with."""
    with _lock:
        _registered[location] = files


def node_identity(_ctx: Context, data: PlatformData) -> NodeIdentity:
    """This node's identity and roster (re-read when either file changes)."""
    with _lock:
        files = _registered.get(data.location)
    if files is None or not files.identity or not files.roster:
        raise LookupError(
            "this node has no identity or roster: start it with --node-config "
            '\'identity="PATH" roster="PATH"\' (see `fedcredit enrol`)'
        )
    try:
        key = (
            files.identity,
            files.roster,
            os.path.getmtime(files.identity),
            os.path.getmtime(files.roster),
        )
    except OSError as exc:
        raise LookupError(f"identity or roster file unreadable: {exc}") from None
    with _lock:
        found = _cache.get(key)
    if found is not None:
        return found
    try:
        identity = load_identity(files.identity)
        roster = load_roster(files.roster)
    except IdentityError as exc:
        raise LookupError(str(exc)) from None
    if identity.name != data.platform:
        raise LookupError(
            f"identity {files.identity} is for platform {identity.name!r}, but the ledger "
            f"belongs to {data.platform!r}"
        )
    entry = roster.platforms.get(identity.name)
    if entry is None or entry != identity.public_entry():
        raise LookupError(
            f"roster {files.roster} does not pin this platform's own keys ({identity.name}): "
            "enrol it again"
        )
    node = NodeIdentity(identity, roster)
    with _lock:
        _cache[key] = node
    return node
