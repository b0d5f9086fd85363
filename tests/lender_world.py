"""A serving session over three enrolled platforms with policy files, for lender tests.

Shared by test_lender_query.py (the protocol) and test_lender_api.py (the HTTP API).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.app import build_client_app
from clients.platform_data import load_platform_data
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from fedcredit.deploy.policy import PlatformPolicy, write_policy
from fedcredit.lender_client import prepare_tokens
from server.lender_models import DebtProfileBatchRequest
from server.serving import Question, ServingSession, open_serving_session
from tests.inprocess import InProcessGrid
from tests.parties import Parties, enrol

LENDERS = ("lender-01", "lender-02")


@pytest.fixture(scope="module", name="population")
def population_fixture(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return generate(
        PopulationConfig(platforms=3, borrowers=900, seed=17), tmp_path_factory.mktemp("pop")
    )


@pytest.fixture(scope="module", name="parties")
def parties_fixture(population, tmp_path_factory: pytest.TempPathFactory) -> Parties:  # type: ignore[no-untyped-def]
    return enrol([str(p.ledger) for p in population.platforms], tmp_path_factory.mktemp("enrol"))


@pytest.fixture(scope="module", name="lender_keys")
def lender_keys_fixture() -> dict[str, Ed25519PrivateKey]:
    return {name: Ed25519PrivateKey.generate() for name in LENDERS}


def _policy(keys: dict[str, Ed25519PrivateKey], **changes: object) -> PlatformPolicy:
    pub = {
        n: k.public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        .hex()
        for n, k in keys.items()
    }
    fields: dict[str, object] = {
        "lenders": list(keys),
        "purposes": ["underwriting", "account-review"],
        "rate_limit_per_lender_per_hour": 10_000,
        "max_batch": 1000,
        "lender_keys": pub,
    }
    fields.update(changes)
    return PlatformPolicy.model_validate(fields)


class World:
    """A serving session over three platforms and the files a test may change."""

    def __init__(self, parties: Parties, keys: dict[str, Ed25519PrivateKey], tmp: Path) -> None:
        self.parties, self.keys = parties, keys
        self.policies = [tmp / f"policy-{i}.toml" for i in range(len(parties.ledgers))]
        for path in self.policies:
            write_policy(path, _policy(keys))
        configs = [
            {"ledger": led, "identity": ident, "roster": parties.enrolment.roster, "policy": str(p)}
            for led, ident, p in zip(
                parties.ledgers, parties.enrolment.identities, self.policies, strict=True
            )
        ]
        self.grid = InProcessGrid(build_client_app(), len(parties.ledgers), configs)
        self.data = [load_platform_data(loc) for loc in parties.ledgers]
        self.nodes = {
            d.platform: node
            for d, node in zip(self.data, sorted(self.grid.get_node_ids()), strict=True)
        }
        self.session: ServingSession = open_serving_session(
            self.grid, self.nodes, parties.keyholder, timeout=60, batch_size=400
        )
        self.delivery_key = parties.keyholder.announcement().delivery_key

    def truth(self, token: str) -> tuple[int, int, int]:
        total = sum(d.profile_matrix([token])[0] for d in self.data)
        return tuple(int(v) for v in np.asarray(total))  # type: ignore[return-value]

    def holders(self, token: str) -> int:
        return sum(1 for d in self.data if token in d.index)

    def ask(self, tokens: list[str], lender: str = "lender-01", purpose: str = "underwriting"):  # type: ignore[no-untyped-def]
        prepared = prepare_tokens(
            tokens,
            lender=lender,
            signing_key=self.keys[lender],
            purpose=purpose,
            delivery_key=self.delivery_key,
        )
        return prepared, self.ask_body(prepared.body, lender)

    def ask_body(self, body: dict, lender: str):  # type: ignore[no-untyped-def]
        request = DebtProfileBatchRequest.model_validate(body)
        question = Question(
            uuid.uuid4().hex,
            lender,
            request.purpose,
            [a.to_applicant() for a in request.applicants],
        )
        (answer,) = self.session.ask(self.grid, [question], self.parties.keyholder)
        return answer

    def set_policy(self, index: int, **changes: object) -> None:
        write_policy(self.policies[index], _policy(self.keys, **changes))


@pytest.fixture(scope="module", name="world")
def world_fixture(parties, lender_keys, tmp_path_factory) -> World:  # type: ignore[no-untyped-def]
    return World(parties, lender_keys, tmp_path_factory.mktemp("world"))
