"""The platform channel (protocols/channel.py): lender hops without a Flower message per hop.

The bureau's channel endpoints run under uvicorn with real TLS on loopback; the platforms'
``query.lender_listen`` handlers run in threads of the in-process Grid (as a SuperNode runs a
message while the ServerApp goes on) and dial the channel exactly as on a deployment. The
deployment engine test is tests/test_serve_deployment.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from clients.app import build_client_app
from fedcredit.deploy.tls import make_tls_files
from fedcredit.lender_client import open_answers, prepare_tokens
from protocols import channel as ch
from protocols import lender_messages as lm
from server.lender_models import DebtProfileBatchRequest, answer_body
from server.platform_channel import ChannelBroker, LeaseKeeper, channel_routes
from server.serving import Question, open_serving_session
from tests.deployment import free_port
from tests.inprocess import InProcessGrid
from tests.lender_world import (  # noqa: F401 - fixtures
    World,
    lender_keys_fixture,
    parties_fixture,
    population_fixture,
    world_fixture,
)


class RecordingBroker(ChannelBroker):
    """Keeps every content that crossed the channel, both ways (the wire audit below)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_platforms: list[str] = []
        self.from_platforms: list[ch.WorkReply] = []

    def pull(self, token: str, request: ch.PullRequest) -> ch.PullReply:
        reply = super().pull(token, request)
        self.to_platforms += [item.content for item in reply.items]
        return reply

    def reply(self, token: str, body: ch.WorkReply) -> None:
        self.from_platforms.append(body)
        super().reply(token, body)


class Bureau:
    """The channel endpoints over TLS on loopback, and a serving session using them."""

    def __init__(self, world: World, tmp: Path, channel_for: set[int]) -> None:
        self.tls = make_tls_files(tmp / "tls")
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.broker = RecordingBroker()
        app = FastAPI()
        app.include_router(channel_routes(self.broker))
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                ssl_certfile=str(self.tls.server_cert),
                ssl_keyfile=str(self.tls.server_key),
                log_level="warning",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        parties = world.parties
        configs = []
        for i, (led, ident, policy) in enumerate(
            zip(parties.ledgers, parties.enrolment.identities, world.policies, strict=True)
        ):
            config = {
                "ledger": led,
                "identity": ident,
                "roster": parties.enrolment.roster,
                "policy": str(policy),
            }
            if i in channel_for:
                config |= {"channel-url": self.url, "channel-ca": str(self.tls.ca_cert)}
            configs.append(config)
        self.grid = InProcessGrid(
            build_client_app(), len(configs), configs, background=("query.lender_listen",)
        )
        self.nodes = {
            d.platform: node
            for d, node in zip(world.data, sorted(self.grid.get_node_ids()), strict=True)
        }
        self.keyholder = parties.keyholder
        self.session = open_serving_session(
            self.grid, self.nodes, self.keyholder, timeout=60, batch_size=400
        )
        self.keeper = LeaseKeeper(self.broker, lease_s=120)
        self.session.channel = self.keeper
        self.keeper.start(self.grid, self.session)

    def ask(self, world: World, tokens: list[str], lender: str = "lender-01"):  # type: ignore[no-untyped-def]
        prepared = prepare_tokens(
            tokens,
            lender=lender,
            signing_key=world.keys[lender],
            purpose="underwriting",
            delivery_key=self.keyholder.announcement().delivery_key,
        )
        request = DebtProfileBatchRequest.model_validate(prepared.body)
        question = Question(
            uuid.uuid4().hex, lender, "underwriting", [a.to_applicant() for a in request.applicants]
        )
        (answer,) = self.session.ask(self.grid, [question], self.keyholder)
        return prepared, answer

    def close(self) -> None:
        self.keeper.stop_all(self.grid, wait_s=30)
        for thread in self.grid.threads:
            thread.join(timeout=30)
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(name="bureau")
def bureau_fixture(world: World, tmp_path: Path) -> Iterator[Bureau]:
    bureau = Bureau(world, tmp_path, channel_for={0, 1, 2})
    yield bureau
    bureau.close()


def _lease_replies(bureau: Bureau) -> list[ch.ListenDone]:
    return [
        ch.ListenDone.from_content(r.content, "lease reply")
        for r in bureau.grid.received
        if r.metadata.message_type == "query.lender_listen" and not r.has_error()
    ]


def test_hops_travel_the_channel_and_totals_are_right(bureau: Bureau, world: World) -> None:
    tokens = [world.data[0].features.tokens[0], world.data[2].features.tokens[3]]
    prepared, answer = bureau.ask(world, tokens)
    assert answer.missing == {}
    assert answer.hops_via == {p: "channel" for p in bureau.session.participants}
    opened = open_answers(prepared, answer_body(answer, "now").model_dump())
    for token, row in zip(tokens, opened, strict=True):
        assert row["status"] == "answered"
        assert (row["total_debt_fen"], row["active_loans"], row["lenders"]) == world.truth(token)
    # No lender hop went as a Flower message: the Grid carried only the leases.
    kinds = {m.metadata.message_type for m in bureau.grid.sent}
    assert "query.lender_blind" not in kinds and "query.lender_listen" in kinds


def test_the_channel_carries_the_hop_messages_and_nothing_else(
    bureau: Bureau, world: World
) -> None:
    bureau.ask(world, [world.data[1].features.tokens[5]])
    assert len(bureau.broker.to_platforms) == 3 and len(bureau.broker.from_platforms) == 3
    for text in bureau.broker.to_platforms:
        hop = lm.LenderBlind.from_content(ch.decode_content(text, "hop"), "hop")
        assert hop.count == 1 and hop.session_id == bureau.session.session_id
    for body in bureau.broker.from_platforms:
        assert body.error_code is None and body.content is not None
        reply = lm.LenderBlindReply.from_content(ch.decode_content(body.content, "r"), "r")
        # A re-blinded element, never the applicant's token or the session pseudonym table.
        assert reply.count == 1 and len(reply.elements) == 32


def test_a_platform_without_a_channel_gets_flower_messages(world: World, tmp_path: Path) -> None:
    bureau = Bureau(world, tmp_path, channel_for={0, 2})
    try:
        token = world.data[1].features.tokens[7]
        prepared, answer = bureau.ask(world, [token])
        second = bureau.session.participants[1]
        assert answer.hops_via[second] == "flower message"
        assert {answer.hops_via[p] for p in answer.hops_via if p != second} == {"channel"}
        assert "channel-url" in bureau.keeper.no_channel[second]
        row = open_answers(prepared, answer_body(answer, "now").model_dump())[0]
        assert (row["total_debt_fen"], row["active_loans"], row["lenders"]) == world.truth(token)
    finally:
        bureau.close()


def test_stop_frees_every_platform_and_leases_say_why(world: World, tmp_path: Path) -> None:
    bureau = Bureau(world, tmp_path, channel_for={0, 1, 2})
    bureau.ask(world, [world.data[0].features.tokens[1]])
    bureau.close()
    assert all(not t.is_alive() for t in bureau.grid.threads)
    ended = _lease_replies(bureau)
    assert len(ended) == 3 and {d.ended for d in ended} == {"asked to stop"}
    assert sum(d.handled for d in ended) == 3


def test_a_bureau_certificate_the_platform_ca_did_not_sign_is_refused(
    world: World, tmp_path: Path
) -> None:
    bureau = Bureau(world, tmp_path, channel_for={0, 1, 2})
    try:
        other = make_tls_files(tmp_path / "other")
        context = bureau.grid.contexts[bureau.nodes[bureau.session.participants[0]]]
        context.node_config["channel-ca"] = str(other.ca_cert)
        bureau.keeper.stop_all(bureau.grid, wait_s=30)
        bureau.keeper.start(bureau.grid, bureau.session)
        token = world.data[0].features.tokens[2]
        _, answer = bureau.ask(world, [token])
        first = bureau.session.participants[0]
        assert answer.missing == {}
        assert answer.hops_via[first] == "flower message"
        assert bureau.keeper.no_channel[first] == "channel unreachable"
    finally:
        bureau.close()


def test_hostile_channel_requests_are_refused(bureau: Bureau) -> None:
    lease, token = bureau.broker.new_lease("platform-x", bureau.session.session_id, 60)
    other, other_token = bureau.broker.new_lease("platform-y", bureau.session.session_id, 60)
    verify = str(bureau.tls.ca_cert)
    with httpx.Client(base_url=bureau.url, verify=verify, timeout=30) as client:

        def post(path: str, tok: str | None, body: object) -> httpx.Response:
            headers = {"authorization": f"Bearer {tok}"} if tok else {}
            if isinstance(body, str):
                return client.post(path, content=body, headers=headers)
            return client.post(path, json=body, headers=headers)

        pull = {"lease_id": lease.lease_id, "wait_s": 0}
        assert post(ch.PULL_PATH, None, pull).status_code == 401
        assert post(ch.PULL_PATH, "ab" * 32, pull).status_code == 401
        assert post(ch.PULL_PATH, other_token, pull).status_code == 401  # another lease's id
        assert post(ch.PULL_PATH, token, {"lease_id": lease.lease_id}).status_code == 422
        assert post(ch.PULL_PATH, token, "{not json").status_code == 422
        assert post(ch.PULL_PATH, token, pull | {"wait_s": 1e9}).status_code == 422

        # A work item for platform-x, pulled by it; answered by platform-y: 403.
        content = lm.LenderBlindReply(request_id="a" * 32, count=1, elements=bytes(32))
        result: dict[str, object] = {}
        caller = threading.Thread(
            target=lambda: result.update(
                got=bureau.broker.call("platform-x", "query.lender_blind", content.to_content(), 20)
            )
        )
        caller.start()
        pulled = post(ch.PULL_PATH, token, pull | {"wait_s": 10}).json()
        (item,) = pulled["items"]
        answer = {
            "work_id": item["work_id"],
            "content": ch.encode_content(content.to_content()),
        }
        assert (
            post(ch.REPLY_PATH, other_token, answer | {"lease_id": other.lease_id}).status_code
            == 403
        )
        assert post(ch.REPLY_PATH, token, answer | {"lease_id": lease.lease_id}).status_code == 200
        caller.join(timeout=20)
        assert result["got"].config_records  # type: ignore[union-attr]

        # A malformed answer is refused and fails its hop at once (not at the hop timeout).
        caller = threading.Thread(
            target=lambda: result.update(
                bad=bureau.broker.call("platform-x", "query.lender_blind", content.to_content(), 20)
            )
        )
        caller.start()
        (item2,) = post(ch.PULL_PATH, token, pull | {"wait_s": 10}).json()["items"]
        bad = {"lease_id": lease.lease_id, "work_id": item2["work_id"], "content": "not base64!"}
        assert post(ch.REPLY_PATH, token, bad).status_code == 422
        caller.join(timeout=20)
        assert "malformed answer" in result["bad"].reason  # type: ignore[union-attr]
        # The same answer again (a replay), or to work nobody asked for: 409.
        assert post(ch.REPLY_PATH, token, answer | {"lease_id": lease.lease_id}).status_code == 409
        unknown = answer | {"lease_id": lease.lease_id, "work_id": "b" * 32}
        assert post(ch.REPLY_PATH, token, unknown).status_code == 409
    bureau.broker.end(lease, "test")
    bureau.broker.end(other, "test")


def test_a_hop_nobody_answers_times_out_and_is_withdrawn() -> None:
    broker = ChannelBroker()
    lease, _ = broker.new_lease("p", "c" * 32, 60)
    content = lm.LenderBlindReply(request_id="a" * 32, count=1, elements=bytes(32)).to_content()
    with pytest.raises(TimeoutError):
        broker.call("p", "query.lender_blind", content, 0.2)
    assert not broker._queues["p"] and not broker._work  # nothing left for a late worker
    broker.end(lease, "test")
