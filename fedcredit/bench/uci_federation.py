"""``fedcredit bench uci``: real data, federated against pooled, on Flower's simulation engine.

The UCI credit-card set (``../shared/data/uci_credit_card.csv``) is imported into three
platform ledgers (``mappings/uci_credit_card.toml``, split by ID mod 3) and run through the
same pipeline as ``fedcredit demo --ledgers``. The baseline, measured in the same run, is the
centralised model on the same features (pooled raw data, same training code and passes);
the issue's target is a federated AUC within 0.01 of it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from clients.ledger.importer import import_file
from fedcredit.demo.run import DemoOptions, run_demo
from protocols.tokens import generate_federation_key

REPO = Path(__file__).resolve().parents[2]
MAPPING = REPO / "mappings" / "uci_credit_card.toml"


def run(csv: Path, rounds: int = 20, model: str = "mlp,lr") -> dict[str, object]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedcredit-uci-") as tmp:
        key = generate_federation_key()
        ledgers = []
        for name in ("uci-a", "uci-b", "uci-c"):
            path = Path(tmp) / f"{name}.sqlite"
            import_file(csv, MAPPING, path, key=key, partition=name)
            ledgers.append(str(path))
        report, _ = run_demo(
            DemoOptions(
                ledgers=ledgers, out=Path(tmp) / "demo", rounds=rounds, model=model, dp_epsilons=[]
            ),
            lambda *_: None,
        )
    models = {}
    for kind, entry in report["by_model"].items():
        fed = entry["federated"]["auc"]
        central = entry["centralized_local_features"]["auc"]
        models[kind] = {
            "federated_auc": fed,
            "centralized_auc": central,
            "gap": round(central - fed, 4),
            "within_0_01": abs(central - fed) < 0.01,
            "ratio_federated_over_centralized_gini": round((2 * fed - 1) / (2 * central - 1), 3),
            **report["convergence"][kind].get("federated", {}),
        }
    return {
        "benchmark": "uci",
        "data": str(csv.name),
        "rounds": rounds,
        "baseline": "centralized model on pooled raw data, same features, transforms, "
        "validation split and stopping rule",
        "models": models,
        "local_only": report["local_only"],
        "queries": {k: report["queries"].get(k) for k in ("count", "tokens_per_second")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
