"""The lender API over an in-process serving session: auth, answers, past answers, bad input.

The API and its dispatcher are the ones ``fedcredit serve`` runs inside the ServerApp; here
the dispatcher's answering loop drives an in-process Grid in a background thread, exactly as
the ServerApp's main thread drives Flower's. schemathesis generates requests from the
published OpenAPI schema: no 500s, and every error is a 4xx with a reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from fedcredit.lender_client import open_answers, prepare_tokens
from server.inquiry_audit import InquiryAudit
from server.keyholder import verify_audit_log
from server.keyholder_service import announcement_json
from server.lender_service import AnswerStore, Dispatcher, LenderRegistry, create_app
from tests.lender_world import (  # noqa: F401 - fixtures
    World,
    lender_keys_fixture,
    parties_fixture,
    population_fixture,
    world_fixture,
)

API_KEYS = {"lender-01": "key-one", "lender-02": "key-two", "lender-03": "key-three"}


class Service:
    def __init__(self, world: World, state: Path) -> None:
        self.world = world
        registry: dict[str, dict[str, object]] = {}
        for name, api_key in API_KEYS.items():
            signer = world.keys.get(name) or next(iter(world.keys.values()))
            registry[name] = {
                "api_key_sha256": hashlib.sha256(api_key.encode()).hexdigest(),
                "signing_key": signer.public_key()
                .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                .hex(),
            }
        registry["lender-03"]["revoked"] = True
        (state / "lenders.json").write_text(json.dumps({"lenders": registry}))
        self.audit_path = state / "inquiries.jsonl"
        self.dispatcher = Dispatcher(max_per_round=50)
        self.app = create_app(
            self.dispatcher,
            LenderRegistry(state / "lenders.json"),
            InquiryAudit(self.audit_path),
            AnswerStore(state / "answers.sqlite"),
            health=lambda: {"status": "ok"},
            key_announcement=lambda: announcement_json(world.parties.keyholder.announcement()),
        )
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        keyholder = self.world.parties.keyholder
        while not self.dispatcher.stopped.is_set():
            self.dispatcher.run_once(
                lambda qs: self.world.session.ask(self.world.grid, qs, keyholder), wait=0.05
            )

    def stop(self) -> None:
        self.dispatcher.stopped.set()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def service(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(world, tmp_path_factory.mktemp("service"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service: Service) -> TestClient:
    return TestClient(service.app)


def _auth(lender: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[lender]}"}


def _question(world: World, tokens: list[str], lender: str = "lender-01"):  # type: ignore[no-untyped-def]
    return prepare_tokens(
        tokens,
        lender=lender,
        signing_key=world.keys[lender],
        purpose="underwriting",
        delivery_key=world.delivery_key,
    )


def test_one_applicant_end_to_end(client: TestClient, world: World, service: Service) -> None:
    token = world.data[1].features.tokens[3]
    prepared = _question(world, [token])
    r = client.post("/v1/debt-profile", json=prepared.body, headers=_auth("lender-01"))
    assert r.status_code == 200, r.text
    body = r.json()
    (row,) = open_answers(prepared, body)
    assert (row["total_debt_fen"], row["active_loans"], row["lenders"]) == world.truth(token)
    assert sorted(body["contributors"]) == sorted(world.nodes) and body["missing"] == {}
    # the lender's own past answer, and nobody else's
    again = client.get(f"/v1/queries/{body['query_id']}", headers=_auth("lender-01"))
    assert again.status_code == 200 and again.json()["applicants"] == body["applicants"]
    other = client.get(f"/v1/queries/{body['query_id']}", headers=_auth("lender-02"))
    assert other.status_code == 404 and other.json()["reason"]
    assert verify_audit_log(service.audit_path) >= 1
    assert token not in service.audit_path.read_text()


def test_batch(client: TestClient, world: World) -> None:
    tokens = world.data[0].features.tokens[:20]
    prepared = _question(world, tokens, "lender-02")
    r = client.post("/v1/debt-profile/batch", json=prepared.body, headers=_auth("lender-02"))
    assert r.status_code == 200, r.text
    rows = open_answers(prepared, r.json())
    assert [(x["total_debt_fen"], x["active_loans"], x["lenders"]) for x in rows] == [
        world.truth(t) for t in tokens
    ]


def test_unknown_and_revoked_lenders_get_401_and_403_only(client: TestClient, world: World) -> None:
    prepared = _question(world, [world.data[0].features.tokens[0]])
    for headers, status in [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": "Basic key-one"}, 401),
        (_auth("lender-03"), 403),
    ]:
        r = client.post("/v1/debt-profile", json=prepared.body, headers=headers)
        assert r.status_code == status
        assert set(r.json()) == {"error", "reason"}


def test_consent_of_another_lender_is_refused_at_the_door(client: TestClient, world: World) -> None:
    prepared = _question(world, [world.data[0].features.tokens[0]], "lender-01")
    r = client.post("/v1/debt-profile", json=prepared.body, headers=_auth("lender-02"))
    assert r.status_code == 422 and "another lender" in r.json()["reason"]


def test_openapi_is_published(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/debt-profile", "/v1/debt-profile/batch", "/v1/health", "/v1/queries/{query_id}"}
    assert set(paths) >= {
        "/v1/debt-profile",
        "/v1/debt-profile/batch",
        "/v1/health",
        "/v1/queries/{query_id}",
    }


def _fuzz(operation) -> None:  # type: ignore[no-untyped-def]
    @given(case=operation.as_strategy())
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:  # type: ignore[no-untyped-def]
        for headers in ({}, _auth("lender-01")):
            response = case.call(headers=headers)
            assert response.status_code < 500, (operation.path, response.text)
            if response.status_code >= 400:
                assert response.json()["reason"], response.text

    check()


def test_generated_requests_never_get_a_server_error(service: Service) -> None:
    """Every operation of the published schema, with and without a valid API key."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:
        _fuzz(operation)


def test_a_valid_looking_forged_body_is_a_clean_422(client: TestClient, world: World) -> None:
    prepared = _question(world, [world.data[0].features.tokens[0]])
    body = json.loads(json.dumps(prepared.body))
    body["applicants"][0]["sealed_secret"] = base64.b64encode(b"x" * 10).decode()
    r = client.post("/v1/debt-profile", json=body, headers=_auth("lender-01"))
    assert r.status_code == 422 and "sealed_secret" in r.json()["reason"]


def test_dispatcher_rounds_never_exceed_one_platform_message() -> None:
    """A round holds at most 1,000 applicants; the question that would overflow waits."""
    from server.serving import Applicant, Question

    dispatcher = Dispatcher(max_per_round=50, window_s=0.01)
    stub = Applicant(element=b"", consent=None, sealed=b"")  # type: ignore[arg-type]
    sizes = [1, 1000, 1, 998, 1]
    futures = [
        dispatcher.submit(Question(str(i), "l", "p", [stub] * n)) for i, n in enumerate(sizes)
    ]
    rounds: list[list[int]] = []

    def answer(questions):  # type: ignore[no-untyped-def]
        rounds.append([len(q.applicants) for q in questions])
        return [object() for _ in questions]

    while not all(f.done() for f in futures):
        dispatcher.run_once(answer, wait=0.01)
    assert rounds == [[1], [1000], [1, 998, 1]]
