"""Shared fixtures: where the real data lives, and a fresh federation key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocols.tokens import generate_federation_key

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (CI clones with shared/ beside it).

    FEDCREDIT_SHARED_DATA overrides it for checkouts kept elsewhere.
    """
    override = os.environ.get("FEDCREDIT_SHARED_DATA")
    return Path(override) if override else REPO.parent / "shared" / "data"


UCI_CSV = shared_data_dir() / "uci_credit_card.csv"


@pytest.fixture
def uci_csv() -> Path:
    if not UCI_CSV.exists():
        pytest.fail(f"the shared UCI data set is missing: {UCI_CSV} (set FEDCREDIT_SHARED_DATA)")
    return UCI_CSV


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put every ``slow`` test (Flower's real runtime: Ray or a deployment) on one xdist worker.

    With ``--dist loadgroup`` (the Makefile's test command) tests of one group run one after
    another on the same worker. On a 2-core machine a Ray simulation (which takes both cores)
    beside a 4-SuperNode deployment starved the SuperNodes' per-message ClientApp processes
    past the query timeout, so a test that checks dropouts saw a platform it never killed drop
    out. The fast tests still run on the other worker meanwhile.
    """
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("runtime"))


@pytest.fixture
def federation_key() -> bytes:
    return generate_federation_key()
