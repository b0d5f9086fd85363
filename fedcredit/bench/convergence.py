"""``fedcredit bench convergence``: does federated training converge on this data, and how?

A CSV and its import mapping are split at random (seeded) into three platforms of equal
size, as a new user would try real data, and federated LR and MLP are trained under several
training regimes, each against its pooled twin trained the same way (same code, features,
transforms, validation split and stopping rule) and scikit-learn's LogisticRegression and
HistGradientBoostingClassifier on the same pooled training rows:

* ``one_epoch``: the old regime: one local epoch a round, all ``--rounds`` rounds, plain
  standardisation (no robust features, no validation people);
* ``fedavg``: the defaults: robust features, local steps scaled to the data, early stopping
  on the federated validation loss;
* ``fedadam``, ``fedyogi``: the same with Flower's server optimisers on top.

The transport is in-process (``fedcredit.inprocess``): training and the sums it needs are the
same messages and handlers as on Flower's runtimes (enrolled platforms, every sum securely
aggregated), without the debt query (the random split
has no cross-platform borrowers to total). ``gap`` is pooled minus federated AUC.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import random
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from clients.app import build_client_app
from clients.features import select_columns
from clients.ledger.importer import import_file
from clients.ledger.mapping import mapping_from_dict
from clients.platform_data import PlatformData, load_platform_data
from fedcredit.demo import baselines
from fedcredit.enrolment import enrol_platforms
from fedcredit.inprocess import InProcessGrid
from protocols.model import TrainConfig
from server.federation import run_federation
from server.settings import FederationSettings

ROW_COLUMN = "_fedcredit_row"
PLATFORMS = ("part-a", "part-b", "part-c")
REGIMES: dict[str, dict[str, object]] = {
    "one_epoch": {"local-steps": 1, "validation-share": 0.0, "robust-features": False},
    "fedavg": {},
    "fedadam": {"server-optimizer": "fedadam"},
    "fedyogi": {"server-optimizer": "fedyogi"},
}


def split_at_random(csv_path: Path, mapping_path: Path, folder: Path, seed: int) -> list[str]:
    """Three ledgers of a random third of the rows each (one federation key, from the seed).

    A mapping that numbers rows (``id = { row_number = true }``) would give row 1 of every
    part the same token; the parts carry their original row number in a column instead.
    A ``[partition]`` section is dropped: the split here replaces it.
    """
    data = tomllib.loads(mapping_path.read_text(encoding="utf-8"))
    data.pop("partition", None)
    data.pop("platform", None)
    borrower = data["borrower"]
    numbered = isinstance(borrower.get("id"), dict) and borrower["id"].get("row_number")
    if numbered:
        borrower["id"] = {"column": ROW_COLUMN, "kind": "customer_number"}
    mapping = mapping_from_dict(data, mapping_path.name)
    delimiter = mapping.source.delimiter
    with csv_path.open(encoding=mapping.source.encoding, newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    header, body = rows[0], rows[1:]
    order = list(range(len(body)))
    random.Random(seed).shuffle(order)
    key = hashlib.sha256(f"fedcredit bench convergence, seed {seed}".encode()).digest()
    ledgers = []
    for part, name in enumerate(PLATFORMS):
        path = folder / f"{name}.csv"
        with path.open("w", encoding=mapping.source.encoding, newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow([*header, ROW_COLUMN] if numbered else header)
            for i in order[part :: len(PLATFORMS)]:
                writer.writerow([*body[i], str(i + 1)] if numbered else body[i])
        ledger = folder / f"{name}.sqlite"
        import_file(path, mapping, ledger, key=key, platform=name)
        ledgers.append(str(ledger))
    return ledgers


def _sklearn_yardsticks(
    platforms: list[PlatformData], features: list[str], settings: FederationSettings
) -> dict[str, float]:
    """scikit-learn on the pooled training and validation rows, scored on the test rows."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parts: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {True: [], False: []}
    for data in platforms:
        X = select_columns(data.features, features)
        test = data.test_mask(settings.test_share)
        for held_out in (True, False):
            mask = data.labelled & (test if held_out else ~test)
            parts[held_out].append((X[mask], data.features.y[mask]))
    X_tr, y_tr = (np.concatenate([p[i] for p in parts[False]]) for i in range(2))
    X_te, y_te = (np.concatenate([p[i] for p in parts[True]]) for i in range(2))
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(X_tr, y_tr)
    hgb = HistGradientBoostingClassifier(random_state=0).fit(X_tr, y_tr)
    return {
        "sklearn_lr_auc": round(float(roc_auc_score(y_te, lr.predict_proba(X_te)[:, 1])), 4),
        "sklearn_hgb_auc": round(float(roc_auc_score(y_te, hgb.predict_proba(X_te)[:, 1])), 4),
    }


def run(
    csv_path: Path,
    mapping_path: Path,
    rounds: int = 20,
    seed: int = 0,
    regimes: tuple[str, ...] = tuple(REGIMES),
) -> dict[str, Any]:
    t0 = time.perf_counter()
    if not logging.getLogger().isEnabledFor(logging.INFO):
        # Flower logs every round at INFO; the JSON carries the same facts (`fedcredit -v`).
        logging.getLogger("flwr").setLevel(logging.WARNING)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedcredit-convergence-") as tmp:
        ledgers = split_at_random(csv_path, mapping_path, Path(tmp), seed)
        # Enrolled platforms: training sums are securely aggregated, as in a real run.
        enrolment = enrol_platforms(ledgers, Path(tmp) / "parties")
        platforms = [load_platform_data(loc) for loc in ledgers]
        features: list[str] = []
        logged: list[str] = []
        for regime in regimes:
            for kind in ("lr", "mlp"):
                t = time.perf_counter()
                settings = FederationSettings.model_validate(
                    {
                        "out-dir": str(Path(tmp) / f"{regime}-{kind}"),
                        "stages": "train",
                        "model": kind,
                        "num-rounds": rounds,
                        **REGIMES[regime],
                    }
                )
                app = build_client_app(ledgers, enrolment.identities, enrolment.roster)
                grid = InProcessGrid(app, len(ledgers))
                summary = run_federation(grid, settings)
                features = summary["features"]["local"]
                entry = summary["models"][kind]["local"]
                pooled = baselines.centralized(
                    platforms,
                    kind,
                    features,
                    False,
                    settings.test_share,
                    rounds,
                    TrainConfig(seed=settings.seed),
                    training=baselines.PooledTraining.of(settings),
                )
                fed, central = entry["auc"], pooled.metrics["auc"]
                logged = entry["log_transformed"] or logged
                results.setdefault(regime, {})[kind] = {
                    "federated_auc": fed,
                    "centralized_auc": central,
                    "gap": round(central - fed, 4),
                    "rounds_run": entry["rounds_run"],
                    "best_round": entry["best_round"],
                    "stopped_because": entry["stopped_because"],
                    "local_steps": entry["local_steps"],
                    "centralized_passes_run": pooled.passes_run,
                    "seconds": round(time.perf_counter() - t, 1),
                }
        defaults = FederationSettings()
        yardsticks = _sklearn_yardsticks(platforms, features, defaults)
        rows = {d.platform: int(d.labelled.sum()) for d in platforms}
    best_fed = max(r["federated_auc"] for res in results.values() for r in res.values())
    # The cost of converging, against the old regime measured in the same run.
    ratios = {
        kind: round(results["fedavg"][kind]["seconds"] / results["one_epoch"][kind]["seconds"], 2)
        for kind in ("lr", "mlp")
        if "fedavg" in results and "one_epoch" in results
    }
    return {
        "benchmark": "convergence",
        "data": csv_path.name,
        "mapping": mapping_path.name,
        "split": "random thirds",
        "labelled_rows": rows,
        "rounds_ceiling": rounds,
        "features": len(features),
        "regimes": results,
        **yardsticks,
        "best_federated_auc": best_fed,
        "seconds_ratio_fedavg_over_one_epoch": ratios,
        "log_transformed": logged,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def from_args(args: argparse.Namespace, usage_error: type[Exception]) -> dict[str, Any]:
    """``fedcredit bench convergence --csv FILE --mapping TOML [--rounds N] [--seed S]``."""
    from clients.ledger.importer import ImportValidationError, MappingError
    from clients.ledger.store import LedgerError

    if not args.csv or not args.mapping:
        raise usage_error("convergence needs --csv FILE and --mapping TOML")
    csv_path, mapping_path = Path(args.csv), Path(args.mapping)
    for flag, path in (("--csv", csv_path), ("--mapping", mapping_path)):
        if not path.is_file():
            raise usage_error(f"{flag}: no such file: {path}")
    rounds = args.rounds or 20
    if not 1 <= rounds <= 500:
        raise usage_error("--rounds must be between 1 and 500")
    try:
        return run(csv_path, mapping_path, rounds=rounds, seed=args.seed)
    except (ImportValidationError, MappingError, LedgerError) as exc:
        raise usage_error(f"--csv/--mapping: {exc}") from None
