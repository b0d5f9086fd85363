"""What a platform computes from its own ledger: complete, flagged where absent, and local."""

from __future__ import annotations

import numpy as np
import pytest

from clients.features import BASE_FEATURES, local_features
from clients.ledger.importer import import_file
from clients.ledger.store import open_ledger
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from tests.conftest import REPO


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate(PopulationConfig(borrowers=3_000, seed=9), tmp_path_factory.mktemp("f"))


def test_one_row_per_borrower_no_nan(generated):
    for p in generated.platforms:
        with open_ledger(p.ledger) as ledger:
            f = local_features(ledger)
        assert f.X.shape == (p.borrowers, len(BASE_FEATURES))
        assert f.names == list(BASE_FEATURES)
        assert not np.isnan(f.X).any()
        assert set(np.unique(f.y)) <= {0.0, 1.0}
        assert f.tokens == sorted(f.tokens)


def test_fields_a_platform_does_not_record_are_flagged(generated):
    by_name = {p.name: p for p in generated.platforms}
    with open_ledger(by_name["platform-03"].ledger) as ledger:  # subprime: no city recorded
        f = local_features(ledger)
    assert (f.X[:, f.names.index("city_tier_missing")] == 1).all()
    with open_ledger(by_name["platform-01"].ledger) as ledger:
        f = local_features(ledger)
    assert (f.X[:, f.names.index("city_tier_missing")] == 0).all()


def test_no_cross_platform_figure_among_the_features():
    forbidden = ("total", "lenders", "platforms", "true")
    assert not [n for n in BASE_FEATURES if any(word in n for word in forbidden)]


def test_imported_attributes_become_features(tmp_path, uci_csv, federation_key):
    ledger_path = tmp_path / "uci-a.sqlite"
    import_file(
        uci_csv,
        REPO / "mappings" / "uci_credit_card.toml",
        ledger_path,
        key=federation_key,
        partition="uci-a",
    )
    with open_ledger(ledger_path) as ledger:
        f = local_features(ledger)
    assert f.X.shape[0] == 10_000
    assert {"x_limit_bal", "x_pay_0", "x_bill_amt1"} <= set(f.names)
    assert 0.20 <= np.nanmean(f.y) <= 0.24
    assert not np.isnan(f.X).any()
