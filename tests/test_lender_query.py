"""Lender questions, in-process: blinding, consent, policy, audit, and what each party sees.

Real ledgers, identities, roster, 2048-bit Paillier key, masks and policy files; only Flower's
transport is replaced (tests/inprocess.py). The deployment engine runs the same protocol in
test_serve_deployment.py.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message

from clients.query_log import QueryLog
from fedcredit.lender_client import open_answers, prepare_tokens
from protocols import blinding, lender_blinding
from protocols.consent import make_consent, parse_consent
from protocols.tokens import generate_federation_key, token_for_national_id
from server.inquiry_audit import InquiryAudit
from server.keyholder import verify_audit_log
from server.lender_models import DebtProfileBatchRequest, answer_body
from server.serving import Question
from tests.lender_world import (  # noqa: F401 - fixtures
    LENDERS,
    World,
    lender_keys_fixture,
    parties_fixture,
    population_fixture,
    world_fixture,
)


def _tokens_by_holders(world: World) -> dict[int, str]:
    found: dict[int, str] = {}
    for d in world.data:
        for token in d.features.tokens:
            found.setdefault(world.holders(token), token)
    return found


# ------------------------------------------------------------------------------ the maths


def test_unblinding_recovers_the_session_pseudonym() -> None:
    h = blinding.hash_to_group(b"applicant")
    secrets_ = [blinding.new_secret() for _ in range(3)]
    pseudonym = h
    for a in secrets_:
        pseudonym = blinding.blind(a, [pseudonym])[0]
    for _ in range(20):  # both branches of the clamped-representative choice occur
        r = blinding.new_secret()
        y = blinding.blind(r, [h])[0]
        for a in secrets_:
            y = blinding.blind(a, [y])[0]
        assert lender_blinding.unblind(r, y) == pseudonym


def test_multiply_matches_x25519_and_refuses_zero() -> None:
    h = blinding.hash_to_group(b"x")
    a = blinding.new_secret()
    assert lender_blinding.multiply(blinding.clamp(a), h) == blinding.blind(a, [h])[0]
    with pytest.raises(lender_blinding.UnblindError):
        lender_blinding.multiply(blinding.L, h)


def test_lender_tokens_equal_platform_tokens() -> None:
    pepper = generate_federation_key()
    assert token_for_national_id(pepper, "11010519491231002X") == token_for_national_id(
        pepper, "110105 19491231 002x"
    )


def test_consent_signature_binds_every_field() -> None:
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization

    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    consent = make_consent(key, b"\x05" * 32, "lender-01", "underwriting")
    assert consent.verify(pub) is None
    for field, value in [("purpose", "marketing"), ("lender", "lender-02"), ("nonce", "0" * 32)]:
        doc = consent.model_dump()
        doc["record"][field] = value
        assert parse_consent(doc).verify(pub) is not None
    old = make_consent(
        key, b"\x05" * 32, "lender-01", "underwriting", now=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    )
    assert old.record.check_time(dt.datetime.now(dt.UTC)) == "consent expired"


# ---------------------------------------------------------------------------- answers


def test_lender_gets_the_totals_across_platforms(world: World) -> None:
    by_holders = _tokens_by_holders(world)
    assert {1, 2, 3} <= set(by_holders)
    stranger = secrets.token_hex(32)
    tokens = [by_holders[1], by_holders[2], by_holders[3], stranger]
    prepared, answer = world.ask(tokens)
    body = answer_body(answer, "now").model_dump()
    opened = open_answers(prepared, body)
    assert answer.missing == {}
    assert sorted(body["contributors"]) == sorted(world.nodes)
    for token, row in zip(tokens, opened, strict=True):
        assert row["status"] == "answered" and row["refusals"] == {}
        assert (row["total_debt_fen"], row["active_loans"], row["lenders"]) == world.truth(token)
    assert opened[3]["total_debt_fen"] == 0 and opened[3]["lenders"] == 0


def test_recent_inquiries_count_earlier_questions(world: World) -> None:
    token = _tokens_by_holders(world)[2]
    first = world.ask([token])[1].answers[0].recent_inquiries
    second = world.ask([token], lender="lender-02")[1].answers[0].recent_inquiries
    assert second == first + 1


def test_concurrent_questions_share_one_chain(world: World) -> None:
    tokens = world.data[0].features.tokens[:5]
    questions, keep = [], []
    for lender in LENDERS:
        prepared = prepare_tokens(
            tokens,
            lender=lender,
            signing_key=world.keys[lender],
            purpose="underwriting",
            delivery_key=world.delivery_key,
        )
        keep.append(prepared)
        request = DebtProfileBatchRequest.model_validate(prepared.body)
        questions.append(
            Question(
                uuid.uuid4().hex,
                lender,
                "underwriting",
                [a.to_applicant() for a in request.applicants],
            )
        )
    before = len(world.grid.sent)
    answers = world.session.ask(world.grid, questions, world.parties.keyholder)
    # one message per platform for the whole round, whatever the number of lenders
    assert len(world.grid.sent) - before == 3
    for prepared, answer in zip(keep, answers, strict=True):
        opened = open_answers(prepared, answer_body(answer, "now").model_dump())
        for token, row in zip(tokens, opened, strict=True):
            assert (row["total_debt_fen"], row["active_loans"], row["lenders"]) == world.truth(
                token
            )


# ------------------------------------------------------------------------------ policy


def _reasons(answer) -> set[str]:  # type: ignore[no-untyped-def]
    return {r for a in answer.answers for r in a.refusals.values()}


def test_each_platform_applies_its_own_policy(world: World) -> None:
    names = sorted(world.nodes)
    platform_of = {d.platform: i for i, d in enumerate(world.data)}
    strict = platform_of[names[1]]
    world.set_policy(strict, lenders=["lender-02"])
    try:
        _, answer = world.ask([world.data[0].features.tokens[0]])
        a = answer.answers[0]
        assert a.status == "refused" and a.sealed is None
        assert set(a.refusals) == {names[1]}
        assert "not served" in a.refusals[names[1]]
        assert answer.missing == {}  # a refusal is not a failure
        # another lender is still served by everyone
        assert world.ask([world.data[0].features.tokens[0]], "lender-02")[1].answers[0].sealed
    finally:
        world.set_policy(strict)


@pytest.mark.parametrize(
    ("changes", "purpose", "expected"),
    [
        ({"purposes": ["account-review"]}, "underwriting", "purpose underwriting is not accepted"),
        ({"max_batch": 1}, "underwriting", "exceed this platform's max_batch of 1"),
        ({"lender_keys": {}}, "underwriting", "no pinned key"),
    ],
)
def test_policy_refusals_name_the_reason(world: World, changes, purpose, expected) -> None:  # type: ignore[no-untyped-def]
    world.set_policy(0, **changes)
    try:
        tokens = world.data[0].features.tokens[:2]
        answer = world.ask(tokens, purpose=purpose)[1]
        name = world.data[0].platform
        assert all(a.status == "refused" for a in answer.answers)
        assert all(expected in a.refusals[name] for a in answer.answers)
    finally:
        world.set_policy(0)


def test_rate_limit_per_lender_per_hour(world: World) -> None:
    audit = QueryLog(world.parties.ledgers[2])
    from clients.lender_policy import recent_applicants

    used = recent_applicants(audit, "lender-02", dt.datetime.now(dt.UTC))
    world.set_policy(2, rate_limit_per_lender_per_hour=used + 2)
    try:
        tokens = world.data[1].features.tokens[:2]
        assert all(a.sealed for a in world.ask(tokens, "lender-02")[1].answers)
        refused = world.ask(tokens[:1], "lender-02")[1]
        reason = refused.answers[0].refusals[world.data[2].platform]
        assert "rate limit" in reason and f"{used + 2} per hour for lender-02" in reason
        assert set(refused.answers[0].refusals) == {world.data[2].platform}
    finally:
        world.set_policy(2)


def test_bad_consents_are_refused_per_applicant(world: World) -> None:
    tokens = world.data[0].features.tokens[:3]
    prepared = prepare_tokens(
        tokens,
        lender="lender-01",
        signing_key=world.keys["lender-01"],
        purpose="underwriting",
        delivery_key=world.delivery_key,
    )
    body = json.loads(json.dumps(prepared.body))
    body["applicants"][0]["consent"]["signature"] = "00" * 64  # forged
    other = make_consent(world.keys["lender-01"], b"\x09" * 32, "lender-01", "underwriting")
    body["applicants"][1]["consent"] = other.model_dump()  # consent for another element
    answer = world.ask_body(body, "lender-01")
    first = world.data[0].platform
    assert "does not verify" in answer.answers[0].refusals[first]
    assert "another blinded element" in answer.answers[1].refusals[first]
    assert answer.answers[2].status == "answered"


def test_a_platform_that_does_not_answer_is_named_missing(world: World) -> None:
    down = world.data[1].platform
    node = world.nodes[down]

    grid = world.grid
    original = grid.push_messages

    def push_messages(messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        ids = list(original([msg for msg in messages if msg.metadata.dst_node_id != node]))
        return ids + ["lost"] * (len(messages) - len(ids))  # sent, never answered

    grid.push_messages = push_messages  # type: ignore[method-assign]
    world.session.timeout = 1.0
    try:
        answer = world.ask([world.data[0].features.tokens[0]])[1]
    finally:
        grid.push_messages = original  # type: ignore[method-assign]
        world.session.timeout = 60
    assert answer.missing == {down: "no reply within 1 s"}
    assert answer.answers[0].status == "refused"
    assert answer.answers[0].refusals[down] == "no reply within 1 s"


# ------------------------------------------------------------------------------- audit


def test_platforms_and_bureau_log_inquiries_without_identifiers(world: World, tmp_path) -> None:  # type: ignore[no-untyped-def]
    prepared, answer = world.ask(world.data[2].features.tokens[:2], "lender-02", "account-review")
    for location in world.parties.ledgers:
        log = QueryLog(location)
        assert log.verify() > 0
        entries = [e for e in log.entries() if e["kind"] == "lender_blind"]
        last = json.loads(entries[-1]["detail"])
        assert last["lender"] == "lender-02" and last["purpose"] == "account-review"
        assert last["applicants"] == 2
        text = json.dumps([dict(e) for e in log.entries()])
        for keep in prepared.keep:
            assert keep.element.hex() not in text
        for token in world.data[2].features.tokens[:2]:
            assert token not in text
    path = tmp_path / "inquiries.jsonl"
    InquiryAudit(path).record(answer, "lender-02")
    InquiryAudit(path).record(answer, "lender-02")  # a restarted service continues the chain
    assert verify_audit_log(path) == 2
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["lender"] == "lender-02" and lines[1]["prev"] == lines[0]["hash"]
    assert all(k.element.hex() not in path.read_text() for k in prepared.keep)


# ------------------------------------------------------------------------------ privacy


def _blobs(msg: Message) -> bytes:
    out = []
    for record in msg.content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                out.append(value)
            elif isinstance(value, str):
                out.append(value.encode())
    return b"".join(out)


def test_what_each_party_sees(world: World) -> None:
    """Platforms get fresh random elements only; the coordinator never gets r or totals."""
    token = _tokens_by_holders(world)[3]  # every platform holds this applicant
    start = len(world.grid.sent)
    prepared1, answer1 = world.ask([token])
    prepared2, _ = world.ask([token])
    sent = world.grid.sent[start:]
    received = world.grid.received[start:]
    to_platforms = [m for m in sent if m.metadata.message_type == "query.lender_blind"]
    assert len(to_platforms) == 6  # two questions, three hops each
    union = set(world.session.table)
    own_lists = b"".join(union)
    elements: list[bytes] = []
    for msg in to_platforms:
        from protocols.lender_messages import LenderBlind

        body = LenderBlind.from_content(msg.content, "test")
        elements += [body.elements[i : i + 32] for i in range(0, len(body.elements), 32)]
    # a platform never sees the pseudonym, nor H(t), nor anything of the session's union
    h = blinding.hash_to_group(bytes.fromhex(token))
    assert h not in elements and not union & set(elements)
    # the two questions about the same person share no element: unlinkable for platforms
    first, second = set(elements[:3]), set(elements[3:])
    assert not first & second
    # nothing the coordinator handles contains the token, r, or the totals in the clear
    wire = b"".join(_blobs(m) for m in sent + received)
    assert bytes.fromhex(token) not in wire and token.encode() not in wire
    for keep in (*prepared1.keep, *prepared2.keep):
        assert keep.secret not in wire
    debt = world.truth(token)[0]
    sealed = answer1.answers[0].sealed
    assert sealed is not None and debt.to_bytes(8, "little") not in sealed
    with pytest.raises(lender_blinding.UnblindError):  # only the lender's answer key opens it
        lender_blinding.open_answer(lender_blinding.PrivateKey.generate(), sealed)
    assert own_lists  # the union is what the coordinator holds: pseudonyms, not tokens
    assert all(bytes.fromhex(t) not in own_lists for t in world.data[0].features.tokens[:50])


def test_holding_and_not_holding_platforms_answer_alike(world: World) -> None:
    """A platform's reply has the same shape whether or not it holds the applicant."""
    held = world.data[0].features.tokens[0]
    not_held = next(t for t in world.data[1].features.tokens if t not in world.data[0].index)
    start = len(world.grid.received)
    world.ask([held])
    world.ask([not_held])
    replies = [
        m for m in world.grid.received[start:] if m.metadata.message_type == "query.lender_blind"
    ]
    from protocols.lender_messages import LenderBlindReply

    bodies = [LenderBlindReply.from_content(r.content, "t") for r in replies]
    assert all(not b.refused and b.count == 1 and len(b.elements) == 32 for b in bodies)


def test_keyholder_service_routes_for_lenders(world: World) -> None:
    """The key holder's HTTP routes give what LocalKeyHolder gives, and refuse bad input."""
    import base64
    import hashlib

    from fastapi.testclient import TestClient

    from server.keyholder_lender import answer_request, unblind_request
    from server.keyholder_service import create_app

    keyholder = world.parties.keyholder
    app = create_app(keyholder.core, hashlib.sha256(b"tok").hexdigest())
    client = TestClient(app, headers={"Authorization": "Bearer tok"})
    token = world.data[0].features.tokens[0]
    blinded = lender_blinding.blind_token(token, world.delivery_key)
    y = blinded.element
    for name in world.session.participants:  # what the platforms' hops would do
        node = world.grid.contexts[world.nodes[name]]
        from clients import matching

        secret = matching.load_session(node, world.session.session_id, "t").secret
        y = blinding.blind(secret, [y])[0]
    key_id = world.session.key.key_id
    r = client.post("/v1/lender/unblind", json=unblind_request(key_id, [y], [blinded.sealed]))
    assert r.status_code == 200, r.text
    pseudonym = base64.b64decode(r.json()["pseudonyms"][0])
    assert pseudonym in world.session.table
    row = world.session.table[pseudonym]
    from server.keyholder_lender import AnswerItem

    item = AnswerItem(
        sealed=blinded.sealed,
        ciphertext=world.session.sums[row.batch][row.plaintext],
        rows=row.rows,
        slot=row.slot,
    )
    body = answer_request(key_id, world.session.participants, [item])
    r = client.post("/v1/lender/answer", json=body)
    assert r.status_code == 200, r.text
    sealed = base64.b64decode(r.json()["sealed"][0])
    assert lender_blinding.open_answer(blinded.answer_key, sealed) == world.truth(token)
    bad = client.post("/v1/lender/unblind", json={**unblind_request(key_id, [y], []), "x": 1})
    assert bad.status_code == 422
    two = answer_request(key_id, world.session.participants[:2], [item])
    assert client.post("/v1/lender/answer", json=two).status_code == 403
    assert TestClient(app).post("/v1/lender/answer", json=body).status_code == 401
