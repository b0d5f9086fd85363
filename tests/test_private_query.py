"""The private debt query, in-process: matching, masks, sealed delivery, refusals, dropouts.

Real ledgers, real identities and roster, real 2048-bit Paillier keys and real masks; only
Flower's transport is replaced (tests/inprocess.py). The same protocol runs through the
simulation engine (test_simulation.py, test_wire_audit.py) and the deployment engine
(test_deployment.py).
"""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message, RecordDict
from scipy import stats as sps

from clients.platform_data import load_platform_data
from clients.query_log import QueryLog
from clients.received_totals import read_received_totals
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from protocols import blinding
from protocols import messages as m
from protocols.key_announcement import KeyAnnouncement, sign_announcement
from protocols.packing import SlotOverflowError, debt_profile_layout
from protocols.paillier import (
    add_ciphertexts,
    ciphertexts_from_bytes,
    decrypt_plaintexts,
    public_key_from_bytes,
)
from server.debt_query import QueryKey, run_debt_query
from server.federation import run_federation
from server.matching import MatchResult, run_matching
from server.settings import FederationSettings
from server.training import FederationError
from tests.inprocess import InProcessGrid
from tests.parties import Parties, enrol


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return generate(
        PopulationConfig(platforms=4, borrowers=2000, seed=5), tmp_path_factory.mktemp("pop")
    )


@pytest.fixture(scope="module")
def ledgers(population) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(p.ledger) for p in population.platforms]


@pytest.fixture(scope="module")
def parties(ledgers: list[str], tmp_path_factory: pytest.TempPathFactory) -> Parties:
    return enrol(ledgers[:3], tmp_path_factory.mktemp("parties"))


def _grid(parties: Parties, cls: type[InProcessGrid] = InProcessGrid) -> InProcessGrid:
    return cls(parties.client_app(), len(parties.ledgers))


def _names(grid: InProcessGrid, parties: Parties) -> dict[str, int]:
    """Platform name -> node id (the in-process grid numbers nodes in ledger order)."""
    names = [load_platform_data(loc).platform for loc in parties.ledgers]
    return dict(zip(names, sorted(grid.get_node_ids()), strict=True))


def _send(grid: InProcessGrid, node: int, message_type: str, content: RecordDict) -> Message:
    return next(iter(grid.send_and_receive([Message(content, node, message_type)])))


def _request(match: MatchResult, key: QueryKey, elements: list[bytes], **changes: object):  # type: ignore[no-untyped-def]
    fields: dict[str, object] = {
        "query_id": uuid.uuid4().hex,
        "session_id": match.session_id,
        "key_id": key.key_id,
        "participants": match.participants,
        "count": len(elements),
        "announcement": key.announcement,
        "elements": b"".join(elements),
    }
    fields.update(changes)
    return m.DebtProfileRequest.model_construct(**fields)  # type: ignore[arg-type]


def _private_key(parties: Parties, key_id: str):  # type: ignore[no-untyped-def]
    record = parties.keyholder.keystore.get(key_id)
    assert record is not None and record.private_key is not None
    return record.private_key


@pytest.fixture(scope="module")
def session(parties: Parties):  # type: ignore[no-untyped-def]
    grid = _grid(parties)
    match = run_matching(grid, _names(grid, parties), timeout=60)
    return grid, match, QueryKey.from_keyholder(parties.keyholder)


def test_matching_finds_every_shared_borrower_and_nothing_else(session, parties) -> None:  # type: ignore[no-untyped-def]
    _, match, _ = session
    tokens = [set(load_platform_data(loc).features.tokens) for loc in parties.ledgers]
    assert {n: len(v) for n, v in match.lists.items()} == dict(
        zip(sorted(match.lists), [len(t) for t in tokens], strict=True)
    )
    assert len(match.union()) == len(set().union(*tokens))
    for a in range(3):
        for b in range(a + 1, 3):
            la, lb = (set(match.lists[match.participants[i]]) for i in (a, b))
            assert len(la & lb) == len(tokens[a] & tokens[b])


def test_blinded_forms_are_fresh_per_session(session, parties) -> None:  # type: ignore[no-untyped-def]
    grid, match, _ = session
    again = run_matching(grid, _names(grid, parties), timeout=60)
    assert not set(again.union()) & set(match.union())
    for name in match.participants:  # each platform's own list comes in a fresh order too
        assert len(again.lists[name]) == len(match.lists[name])


def test_only_the_full_sum_decrypts(session, parties) -> None:  # type: ignore[no-untyped-def]
    """One platform's reply, and a sum over a strict subset, are uniform noise mod n."""
    grid, match, key = session
    elements = match.union()[:1500]
    request = _request(match, key, elements)
    nodes = [match.nodes[n] for n in match.participants]
    msgs = [Message(request.to_content(), n, "query.debt_profile") for n in nodes]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs)}
    pk, sk = key.public_key, _private_key(parties, key.key_id)
    layout = debt_profile_layout(3)
    count = layout.plaintexts_for(len(elements), pk.n.bit_length())
    cts = []
    for node in nodes:
        body = m.DebtProfileReply.from_content(replies[node].content, "reply")
        cts.append(ciphertexts_from_bytes(pk, body.ciphertexts, count))
    full = decrypt_plaintexts(sk, add_ciphertexts(pk, cts))
    totals = layout.unpack(full, len(elements), pk.n.bit_length())
    assert totals[:, 0].sum() > 0 and totals[:, 2].max() >= 2  # real totals, some shared
    noise: list[int] = []
    for subset in ([0], [1], [2], [0, 1], [1, 2], [0, 2]):
        plain = decrypt_plaintexts(sk, add_ciphertexts(pk, [cts[i] for i in subset]))
        with pytest.raises(SlotOverflowError):
            layout.unpack(plain, len(elements), pk.n.bit_length())
        noise += plain
    n = int(pk.n)
    # Uniform on [0, n): a Kolmogorov-Smirnov test (false alarm once in a million runs).
    assert sps.kstest([v / n for v in noise], "uniform").pvalue > 1e-6
    # Real packed totals would use at most the packed width; noise fills the modulus.
    assert np.median([v.bit_length() for v in noise]) > pk.n.bit_length() - 3


def test_refusals_are_clear_and_logged(session, parties) -> None:  # type: ignore[no-untyped-def]
    grid, match, key = session
    name = match.participants[0]
    node = match.nodes[name]
    elements = match.union()[:10]
    good = _request(match, key, elements)
    first = _send(grid, node, "query.debt_profile", good.to_content())
    assert not first.has_error()
    cases = {
        "replay": (good, "already answered (replay)"),
        "subset": (
            _request(match, key, elements, participants=match.participants[:2]),
            "are not the matching session's",
        ),
        "unknown session": (
            _request(match, key, elements, session_id=uuid.uuid4().hex),
            "unknown matching session",
        ),
        "wrong key id": (_request(match, key, elements, key_id="0" * 16), "announcement is for"),
        "twist point": (
            _request(match, key, [_twist_point(), *elements[1:]]),
            "element 0",
        ),
        "identity": (_request(match, key, [bytes(32), *elements[1:]]), "element 0"),
    }
    for label, (request, reason) in cases.items():
        reply = _send(grid, node, "query.debt_profile", request.to_content())
        assert reply.has_error(), label
        assert reason in reply.error.reason, (label, reply.error.reason)
    log = QueryLog(load_platform_data(parties.ledgers[0]).location)
    try:
        outcomes = [e["outcome"] for e in log.entries() if e["query_id"] == good.query_id]
        assert outcomes == ["answered", "refused"]
        log.verify()
    finally:
        log.close()


def _twist_point() -> bytes:
    """A canonical u-coordinate on the twist of Curve25519 (not on the curve)."""
    for u in range(2, 1000):
        try:
            blinding.check_element(0, u.to_bytes(32, "little"))
        except blinding.InvalidGroupElement as exc:
            if "curve" in str(exc) or "twist" in str(exc):
                return u.to_bytes(32, "little")
    raise AssertionError("no twist point found")


def test_a_substituted_paillier_key_is_refused(session) -> None:  # type: ignore[no-untyped-def]
    """The coordinator cannot make a platform encrypt under a key of its own."""
    grid, match, key = session
    genuine = KeyAnnouncement.from_bytes(key.announcement)
    now = dt.datetime.now(dt.UTC)
    forged = sign_announcement(
        Ed25519PrivateKey.generate(),
        genuine.public_key,
        bits=genuine.bits,
        issued_at=now,
        expires_at=now + dt.timedelta(hours=1),
        delivery_key=genuine.delivery_key,
    )
    request = _request(match, key, match.union()[:5], announcement=forged.to_bytes())
    reply = _send(
        grid, match.nodes[match.participants[1]], "query.debt_profile", request.to_content()
    )
    assert reply.has_error() and "key announcement refused" in reply.error.reason


def test_sealed_totals_are_opaque_to_the_coordinator(session, parties) -> None:  # type: ignore[no-untyped-def]
    grid, match, _ = session
    answer = run_debt_query(grid, match, match.union(), parties.keyholder, 1000, 60)
    assert answer.totals is None  # the coordinator holds no clear totals
    clear = run_debt_query(grid, match, match.union(), parties.keyholder, 1000, 60, sealed=False)
    assert clear.totals is not None
    plain = np.ascontiguousarray(clear.totals, dtype="<i8").tobytes()
    for name in match.participants:
        sealed = answer.sealed[name]
        assert len(sealed) == len(plain)
        same = np.frombuffer(sealed, np.uint8) == np.frombuffer(plain, np.uint8)
        assert same.mean() < 0.02  # a keystream, not the totals
    others = [answer.sealed[n] for n in match.participants]
    assert len(set(others)) == len(others)  # a different seal for every platform


def test_full_run_delivers_exact_totals_and_keeps_nothing_at_the_bureau(
    parties: Parties, population, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    grid = _grid(parties)
    settings = FederationSettings.model_validate(
        {"out-dir": str(tmp_path), "stages": "query,cross", "model": "lr", "num-rounds": 1}
    )
    summary = run_federation(grid, settings, parties.keyholder)
    expected = _expected_totals(parties.ledgers)
    for location in parties.ledgers:
        got = read_received_totals(location)
        assert got == {tok: expected[tok] for tok in load_platform_data(location).features.tokens}
    assert summary["queries"]["contributors"] == sorted(summary["platforms"])
    tokens = set().union(*(set(load_platform_data(loc).features.tokens) for loc in parties.ledgers))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert not any(t.encode() in text for t in list(tokens)[:500]), path


def _expected_totals(ledgers: list[str]) -> dict[str, tuple[int, int, int]]:
    """Per token, the sum of the given platforms' own (debt, active loans, lender flag)."""
    out: dict[str, np.ndarray] = {}
    for location in ledgers:
        data = load_platform_data(location)
        for token, row in zip(data.features.tokens, data.profiles, strict=True):
            out[token] = out.get(token, np.zeros(3, dtype=np.int64)) + row
    return {t: tuple(int(v) for v in row) for t, row in out.items()}  # type: ignore[misc]


class _DiesMidQuery(InProcessGrid):
    """The last node stops answering after its first debt-profile batch, as if killed."""

    victim: int | None = None
    answered = 0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for msg in messages:
            dst = msg.metadata.dst_node_id
            if dst == self.victim and msg.metadata.message_type == "query.debt_profile":
                self.answered += 1
                if self.answered > 1:
                    continue  # never answers: the coordinator times out on it
            ids += list(super().push_messages([msg]))
        return ids

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        sent = self.push_messages(messages)
        return self.pull_messages(sent)


def test_a_platform_killed_mid_query_is_dropped_and_totals_stay_exact(
    ledgers: list[str], tmp_path: Path
) -> None:
    four = enrol(ledgers, tmp_path / "parties")
    grid = _DiesMidQuery(four.client_app(), 4)
    grid.victim = max(grid.get_node_ids())
    victim_name = load_platform_data(ledgers[3]).platform
    settings = FederationSettings.model_validate(
        {
            "out-dir": str(tmp_path / "run"),
            "stages": "query,cross",
            "model": "lr",
            "num-rounds": 1,
            "query-batch": 500,
            "query-timeout": 5,
        }
    )
    summary = run_federation(grid, settings, four.keyholder)
    assert grid.answered >= 2  # it died after answering part of the query
    assert victim_name in summary["queries"]["dropped"]
    assert victim_name not in summary["queries"]["contributors"]
    assert len(summary["queries"]["contributors"]) == 3
    live = ledgers[:3]
    expected = _expected_totals(live)
    for location in live:
        got = read_received_totals(location)
        assert got == {tok: expected[tok] for tok in load_platform_data(location).features.tokens}


def test_fewer_than_three_platforms_get_no_query(ledgers: list[str], tmp_path: Path) -> None:
    two = enrol(ledgers[:2], tmp_path / "parties")
    grid = InProcessGrid(two.client_app(), 2)
    settings = FederationSettings.model_validate(
        {"out-dir": str(tmp_path / "run"), "stages": "query", "model": "lr"}
    )
    with pytest.raises(FederationError, match="needs at least 3"):
        run_federation(grid, settings, two.keyholder)


def test_ledgers_from_before_the_private_query_keep_working(
    parties: Parties, tmp_path: Path
) -> None:
    """No migration is needed: the tables this protocol adds are created on first use."""
    from sqlalchemy import create_engine, text

    copies = []
    for location in parties.ledgers:
        copy = tmp_path / Path(location).name
        shutil.copy(location, copy)
        engine = create_engine(f"sqlite:///{copy}")
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS received_totals"))
            conn.execute(text("DROP TABLE IF EXISTS query_log"))
        engine.dispose()
        copies.append(str(copy))
    old = enrol(copies, tmp_path / "parties")
    grid = InProcessGrid(old.client_app(), 3)
    settings = FederationSettings.model_validate(
        {"out-dir": str(tmp_path / "run"), "stages": "query,cross", "model": "lr", "num-rounds": 1}
    )
    run_federation(grid, settings, old.keyholder)
    expected = _expected_totals(copies)
    for location in copies:
        got = read_received_totals(location)
        assert got and all(got[t] == expected[t] for t in got)


def test_truth_file_agrees_with_platform_profiles(population, ledgers: list[str]) -> None:  # type: ignore[no-untyped-def]
    """The expectation used above is the generator's truth, so the check is not circular."""
    truth = pq.read_table(population.truth).to_pydict()
    expected = _expected_totals(ledgers)
    for tok, d, a, n in zip(
        truth["token"],
        truth["total_debt_fen"],
        truth["active_loans"],
        truth["lenders"],
        strict=True,
    ):
        assert expected[tok] == (d, a, n)


def test_public_key_in_announcement_is_the_key_holders(session) -> None:  # type: ignore[no-untyped-def]
    _, _, key = session
    ann = KeyAnnouncement.from_bytes(key.announcement)
    assert public_key_from_bytes(ann.public_key).n == key.public_key.n


class _Tampering(InProcessGrid):
    """Replaces the first debt-profile reply's first ciphertext with one >= n**2."""

    tampered = 0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = list(super().push_messages(messages))
        for mid in ids:
            reply = self._replies[mid]
            if reply.metadata.message_type != "query.debt_profile" or self.tampered:
                continue
            if reply.has_error():
                continue
            payload = reply.content.config_records["payload"]
            blob = bytearray(payload["ciphertexts"])  # type: ignore[arg-type]
            blob[:8] = b"\xff" * 8
            payload["ciphertexts"] = bytes(blob)
            self.tampered = reply.metadata.src_node_id
        return ids


def test_a_ciphertext_outside_the_key_range_drops_its_sender(
    parties: Parties, tmp_path: Path
) -> None:
    """Never a wrong total: the reply is refused, its sender named, and with three platforms
    nothing is answered at all."""
    grid = _Tampering(parties.client_app(), len(parties.ledgers))
    settings = FederationSettings.model_validate(
        {"out-dir": str(tmp_path), "stages": "query", "model": "lr", "query-timeout": 30}
    )
    with pytest.raises(FederationError, match="not below n\\*\\*2") as caught:
        run_federation(grid, settings, parties.keyholder)
    names = {v: k for k, v in _names(grid, parties).items()}
    assert names[grid.tampered] in str(caught.value)
    assert "needs at least 3" in str(caught.value)


def test_a_finished_session_blinds_nothing_more(session) -> None:  # type: ignore[no-untyped-def]
    """After match_done a platform has forgotten its secret: it is no blinding oracle."""
    grid, match, _ = session
    name = match.participants[0]
    other = match.participants[1]
    chosen = [blinding.hash_to_group(b"an ID the coordinator knows")]
    request = m.MatchBlind(
        session_id=match.session_id,
        origin=other,
        step=1,
        count=1,
        elements=b"".join(chosen),
    )
    reply = _send(grid, match.nodes[name], "query.match_blind", request.to_content())
    assert reply.has_error() and "is finished" in reply.error.reason
