"""``fedcredit bench realdata``: any credit CSV, three platforms, federated against pooled.

The CSV is imported with the user's own mapping (the ordinary ledger import) into three
platform ledgers: ``random`` deals rows out evenly, ``skewed`` gives the platforms 60/30/10 %
of the rows and different default rates (45/35/20 % of the defaulters, so the small platform
is the riskiest). Every model kind is then trained by the federation (in process: the same
ServerApp code and ClientApp handlers as on Flower's engines, without the transport) on the
features every platform has, and scored on one held-out set (30 % of borrowers, chosen by
token). The pooled yardsticks see every platform's raw training rows: the same LR and MLP
code with the same passes, scikit-learn's LogisticRegression, and scikit-learn's
HistGradientBoosting on the bins the federation agreed. Each platform's local-only models
are scored on that platform's own held-out borrowers, beside the federated model's score on
the same borrowers.

Cost: a federated boosting round (one tree: its level messages and the platforms' histogram
work) against a pooled HistGradientBoosting round on the same rows and bins, both measured
in this run on this machine.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from clients.app import build_client_app
from clients.ledger.importer import import_file
from clients.ledger.mapping import mapping_from_dict
from clients.platform_data import PlatformData, load_platform_data
from fedcredit.demo import baselines
from fedcredit.enrolment import Enrolment, enrol_platforms
from fedcredit.inprocess import InProcessGrid
from protocols import gbdt
from protocols.metrics import exact_auc_ks
from protocols.model import TrainConfig, parse_model_kinds
from server.federation import describe_platforms, run_federation
from server.settings import FederationSettings

log = logging.getLogger(__name__)

PLATFORMS = ("platform-a", "platform-b", "platform-c")
SPLIT_COLUMN = "fedcredit_bench_platform"
SKEWED_SIZES = (0.6, 0.3, 0.1)
SKEWED_DEFAULTERS = (0.45, 0.35, 0.2)


class RealDataError(ValueError):
    pass


def _labels(rows: list[dict[str, str]], mapping: dict[str, Any]) -> np.ndarray:
    """1 defaulted, 0 not, -1 unknown, read the way the mapping reads the label."""
    spec = (mapping.get("borrower") or {}).get("label")
    if spec is None:
        raise RealDataError("the mapping declares no [borrower] label: nothing to score")
    column = spec if isinstance(spec, str) else spec.get("column")
    values = {} if isinstance(spec, str) else {str(k): v for k, v in spec.get("map", {}).items()}
    out = np.full(len(rows), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        cell = (row.get(column) or "").strip()
        try:
            value = values[cell] if values else int(float(cell))
        except (KeyError, ValueError):
            continue
        out[i] = 1 if value == 1 else 0 if value == 0 else -1
    return out


def assign_platforms(labels: np.ndarray, split: str, seed: int) -> np.ndarray:
    """Platform index per row: even at random, or 60/30/10 % with skewed default rates."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if split == "random":
        return rng.permutation(np.arange(n) % len(PLATFORMS))
    if split != "skewed":
        raise RealDataError(f"unknown split {split!r}: random or skewed")
    bad = labels == 1
    sizes, bad_share = np.array(SKEWED_SIZES), np.array(SKEWED_DEFAULTERS)
    n_bad = int(bad.sum())
    good_share = np.clip(sizes * n - bad_share * n_bad, 0, None)
    good_share = good_share / good_share.sum()
    out = np.empty(n, dtype=np.int64)
    out[bad] = rng.choice(len(PLATFORMS), size=n_bad, p=bad_share)
    out[~bad] = rng.choice(len(PLATFORMS), size=n - n_bad, p=good_share)
    return out


def import_split(
    csv_path: Path, mapping_path: Path, split: str, seed: int, folder: Path
) -> list[str]:
    """Three ledgers, through the ordinary import: the mapping gets a [partition] on an
    added column that names each row's platform."""
    mapping = tomllib.loads(mapping_path.read_text())
    source = mapping.get("source") or {}
    delimiter, encoding = source.get("delimiter", ","), source.get("encoding", "utf-8")
    with csv_path.open(newline="", encoding=encoding) as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if SPLIT_COLUMN in header:
        raise RealDataError(f"the CSV already has a column {SPLIT_COLUMN!r}")
    platform_of = assign_platforms(_labels(rows, mapping), split, seed)
    split_csv = folder / "split.csv"
    with split_csv.open("w", newline="", encoding=encoding) as fh:
        writer = csv.DictWriter(fh, [*header, SPLIT_COLUMN], delimiter=delimiter)
        writer.writeheader()
        for row, p in zip(rows, platform_of, strict=True):
            writer.writerow({**row, SPLIT_COLUMN: str(int(p))})
    mapping["partition"] = {"column": SPLIT_COLUMN, "method": "modulo", "names": list(PLATFORMS)}
    parsed = mapping_from_dict(mapping, origin=str(mapping_path))
    # A federation key fixed by the seed: tokens, and so the held-out borrowers (chosen by
    # token), are the same in every run with that seed. Not a secret: benchmark data only.
    key = hashlib.sha256(f"fedcredit bench realdata seed {seed}".encode()).digest()
    ledgers = []
    for name in PLATFORMS:
        path = folder / f"{name}.sqlite"
        import_file(split_csv, parsed, path, key=key, partition=name, platform=name)
        ledgers.append(str(path))
    return ledgers


def _pooled_rows(
    platforms: list[PlatformData], features: list[str], test_share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = []
    for data in platforms:
        X = data.features.X[:, [data.features.names.index(n) for n in features]]
        # Every non-test row trains (no validation share): (train, validation, test) rows.
        (X_tr, y_tr), _, (X_te, y_te) = baselines._split(data, X, test_share, 0.0)
        parts.append((X_tr, y_tr, X_te, y_te))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


def sklearn_logistic(
    X_tr: np.ndarray, y_tr: np.ndarray, X_te: np.ndarray, y_te: np.ndarray
) -> dict[str, float]:
    """scikit-learn's LogisticRegression on standardised pooled rows (the usual yardstick)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(X_tr, y_tr)
    return exact_auc_ks(y_te, model.predict_proba(X_te)[:, 1])


def run(
    csv_path: Path,
    mapping_path: Path,
    split: str = "random",
    model: str = "gbdt,mlp,lr",
    rounds: int = 20,
    seed: int = 0,
    boost: gbdt.BoostParams | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    if not logging.getLogger().isEnabledFor(logging.INFO):
        # Flower's strategy logs every round at INFO; the result carries the same facts.
        logging.getLogger("flwr").setLevel(logging.WARNING)
    kinds = parse_model_kinds(model).split(",")
    boost = boost or gbdt.BoostParams()
    with tempfile.TemporaryDirectory(prefix="fedcredit-realdata-") as tmp:
        folder = Path(tmp)
        ledgers = import_split(csv_path, mapping_path, split, seed, folder)
        t_import = time.perf_counter() - t0
        settings = FederationSettings.model_validate(
            {
                "out-dir": str(folder / "federation"),
                "stages": "train",
                "model": ",".join(kinds),
                "num-rounds": rounds,
                "min-nodes": len(ledgers),
                "seed": seed,
                "gbdt-trees": boost.trees,
                "gbdt-depth": boost.depth,
                "gbdt-learning-rate": boost.learning_rate,
                "gbdt-bins": boost.bins,
            }
        )
        # Enrolled like real nodes: secure aggregation masks with the roster's pinned keys.
        enrolment = enrol_platforms(ledgers, folder / "enrolment")
        app = build_client_app(ledgers, enrolment.identities, enrolment.roster)
        grid = InProcessGrid(app, len(ledgers))
        t = time.perf_counter()
        summary = run_federation(grid, settings)
        t_fed = time.perf_counter() - t
        features = summary["features"]["local"]
        platforms = [load_platform_data(loc) for loc in ledgers]
        X_tr, y_tr, X_te, y_te = _pooled_rows(platforms, features, settings.test_share)
        # Secure aggregation leaves the bureau no per-platform figures; the bench, which
        # holds every party's rows, scores the saved models on each platform's own.
        fed_by_platform = _federated_by_platform(
            Path(settings.out_dir), summary, platforms, kinds, features, settings.test_share
        )
        cost = None
        if "gbdt" in kinds:
            cost = round_costs(ledgers, enrolment, features, settings, X_tr, y_tr, boost)
    share = settings.test_share
    cfg = TrainConfig(
        learning_rate=settings.learning_rate, batch_size=settings.batch_size, seed=seed
    )
    models: dict[str, dict[str, Any]] = {}
    t = time.perf_counter()
    for kind in kinds:
        fed = summary["models"][kind]["local"]
        central = baselines.fit_and_score(kind, X_tr, y_tr, X_te, y_te, rounds, cfg, boost)
        models[kind] = {
            "federated_auc": fed["auc"],
            "centralized_auc": central.metrics["auc"],
            "gap": round(central.metrics["auc"] - fed["auc"], 4),
            "federated_ks": fed["ks"],
            "centralized_ks": central.metrics["ks"],
            "centralized": {
                "gbdt": "scikit-learn HistGradientBoostingClassifier, same bins and tree shape",
                "mlp": "the same MLP code on pooled rows, same passes",
                "lr": "the same logistic regression code on pooled rows, same passes",
            }[kind],
        }
    sk = sklearn_logistic(X_tr, y_tr, X_te, y_te)
    pooled = {k: v["centralized_auc"] for k, v in models.items()}
    pooled["sklearn_logistic_regression"] = sk["auc"]
    best_central = max(pooled.values())
    best_fed = max(v["federated_auc"] for v in models.values())
    result: dict[str, Any] = {
        "benchmark": "realdata",
        "data": csv_path.name,
        "mapping": mapping_path.name,
        "split": split,
        "seed": seed,
        "rows": {
            p.platform: {
                "train": int((p.labelled & ~p.test_mask(share)).sum()),
                "test": int((p.labelled & p.test_mask(share)).sum()),
                "default_rate": round(float(np.nanmean(p.features.y)), 4),
            }
            for p in platforms
        },
        "features": len(features),
        "rounds": rounds,
        "boosting": boost.as_dict(),
        "models": models,
        "sklearn_logistic_regression": sk,
        "best_centralized_auc": best_central,
        "best_centralized_model": max(pooled, key=pooled.__getitem__),
        "best_federated_auc": best_fed,
        "best_federated_model": max(models, key=lambda k: models[k]["federated_auc"]),
        "best_gap": round(best_central - best_fed, 4),
        "best_within_0_01": best_central - best_fed <= 0.01,
    }
    if cost is not None:
        result["boosting_round_seconds"] = cost
    result["local_only"] = _local_only(
        platforms, kinds, fed_by_platform, share, rounds, cfg, boost, features
    )
    result["federated_beats_every_local"] = all(
        p["federated_best_auc"] > p["local_only_best_auc"] for p in result["local_only"].values()
    )
    result["seconds"] = {
        "import": round(t_import, 1),
        "federation": round(t_fed, 1),
        "yardsticks": round(time.perf_counter() - t, 1),
        "total": round(time.perf_counter() - t0, 1),
    }
    return result


COST_TREES = 5
COST_REPEATS = 3


def levels_asked(tree: gbdt.Tree, depth: int) -> int:
    """Level messages a finished tree took: level ``l + 1`` is asked only when a node of
    level ``l`` split and ``l + 1 < depth`` (the last level's leaves come from split sums)."""
    asked = 1
    for level in range(depth - 1):
        nodes = range(2**level - 1, 2 ** (level + 1) - 1)
        if not any(tree.feature[n] >= 0 for n in nodes):
            break
        asked += 1
    return asked


def round_costs(
    ledgers: list[str],
    enrolment: Enrolment,
    features: list[str],
    settings: FederationSettings,
    X_train: np.ndarray,
    y_train: np.ndarray,
    boost: gbdt.BoostParams,
) -> dict[str, Any]:
    """Seconds per boosting round, federated and pooled, on the same rows and bins.

    Federated and pooled runs alternate ``COST_REPEATS`` times, and each side reports its
    median: alternating exposes both sides to the same conditions on a shared machine. Both
    are the marginal cost of a tree. The federated round is timed from a tree's first level
    message to its last (bin edges agreed before), averaged over trees 2 to ``COST_TREES``:
    the first tree's messages also make the platforms read and bin their rows, a one-off per
    session (reported apart as ``federated_first_tree``). The pooled round is the extra time
    of fitting ``4 * COST_TREES`` trees over ``COST_TREES`` in the same repeat (scikit-learn's
    binning, checks and set-up cancel out the same way).
    """
    from server.boosting import train_boosted

    timer = HandlerTimer()
    short = settings.model_copy(update={"gbdt_trees": COST_TREES})
    small = gbdt.BoostParams(COST_TREES, boost.depth, boost.learning_rate, boost.bins)
    longer = gbdt.BoostParams(4 * COST_TREES, boost.depth, boost.learning_rate, boost.bins)
    edges = gbdt.pooled_edges(X_train, boost.bins)
    plain_settings = short.model_copy(update={"secure_aggregation": False})
    federated, first, parallel, pooled, plain = [], [], [], [], []
    for _ in range(COST_REPEATS):
        # The same trees without secure aggregation: what the masking and the platforms'
        # logged answers (one query-log entry per reply) add to a round.
        app = build_client_app(ledgers, enrolment.identities, enrolment.roster)
        grid = InProcessGrid(app, len(ledgers))
        nodes = sorted(grid.get_node_ids())
        model = train_boosted(grid, nodes, "gbdt", "local", features, plain_settings)
        plain.append(float(np.mean(model.round_seconds[1:])))
        timer.calls.clear()
        app = build_client_app(ledgers, enrolment.identities, enrolment.roster, [timer])
        grid = InProcessGrid(app, len(ledgers))
        nodes = sorted(grid.get_node_ids())
        names = {n: d.platform for n, d in describe_platforms(grid, nodes, short).items()}
        model = train_boosted(grid, nodes, "gbdt", "local", features, short, names)
        per_round = float(np.mean(model.round_seconds[1:]))
        federated.append(per_round)
        first.append(model.round_seconds[0])
        skip = levels_asked(model.trees[0], boost.depth)
        saved = timer.saved_if_parallel("query.gbdt_level", skip_batches=skip)
        parallel.append(per_round - saved / (COST_TREES - 1))
        short_fit = gbdt.pooled_fit(X_train, y_train, small, edges)[2] * COST_TREES
        long_fit = gbdt.pooled_fit(X_train, y_train, longer, edges)[2] * 4 * COST_TREES
        pooled.append((long_fit - short_fit) / (3 * COST_TREES))
    fed, par = float(np.median(federated)), float(np.median(parallel))
    pool = float(np.median(pooled))
    if pool <= 0:  # set-up noise larger than the trees: fall back to the whole fit
        pool = long_fit / (4 * COST_TREES)
    return {
        "federated": round(fed, 5),
        "pooled_histgradientboosting": round(pool, 5),
        "ratio_federated_over_pooled": round(fed / pool, 2),
        "within_3x": fed <= 3 * pool,
        "federated_platforms_in_parallel": round(par, 5),
        "ratio_platforms_in_parallel": round(par / pool, 2),
        "secure_aggregation": bool(short.secure_aggregation),
        "federated_without_secure_aggregation": round(float(np.median(plain)), 5),
        "ratio_without_secure_aggregation": round(float(np.median(plain)) / pool, 2),
        "federated_first_tree": round(float(np.median(first)), 5),
        "measured": (
            f"median of {COST_REPEATS} alternating runs; federated = every level message of "
            f"a tree, mean over trees 2 to {COST_TREES} (the first tree also bins the "
            "platforms' rows: federated_first_tree), the three platforms answering one after "
            "another in this process (in-process transport: no serialisation or network), "
            "plus the bureau's split finding; in parallel = the same with each level's "
            "platform work counted at its slowest platform, as on separate machines; pooled "
            "= HistGradientBoostingClassifier.fit on one thread, "
            f"({4 * COST_TREES} trees - {COST_TREES} trees) / {3 * COST_TREES}"
        ),
    }


class HandlerTimer:
    """A Flower mod that times every message a platform handles (in-process runs only)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __call__(self, msg: Any, context: Any, call_next: Any) -> Any:
        started = time.perf_counter()
        reply = call_next(msg, context)
        self.calls.append((msg.metadata.message_type, time.perf_counter() - started))
        return reply

    def saved_if_parallel(
        self, message_type: str, platforms: int = len(PLATFORMS), skip_batches: int = 0
    ) -> float:
        """Seconds the platforms' answers to ``message_type`` would save if they ran side by
        side (the in-process grid sends each batch to every platform in turn), leaving out
        the first ``skip_batches`` batches."""
        times = [t for kind, t in self.calls if kind == message_type]
        batches = [times[i : i + platforms] for i in range(0, len(times), platforms)]
        return sum(sum(b) - max(b) for b in batches[skip_batches:])


def _federated_by_platform(
    out_dir: Path,
    summary: dict[str, Any],
    platforms: list[PlatformData],
    kinds: list[str],
    features: list[str],
    share: float,
) -> dict[str, dict[str, float]]:
    """AUC of each saved federated model on each platform's held-out rows (exact scores)."""
    import json

    out: dict[str, dict[str, float]] = {p.platform: {} for p in platforms}
    for kind in kinds:
        files = summary["models"][kind]["local"]["files"]
        meta = json.loads(Path(files["metadata"]).read_text())
        for data in platforms:
            X, y = data.rows("local", features, "test", share)
            if kind == "gbdt":
                body = json.loads(Path(files["weights"]).read_text())
                trees = [gbdt.Tree.model_validate(t) for t in body["trees"]]
                depth = int(meta["boosting"]["depth"])
                scores = gbdt.model_margin(
                    gbdt.bin_rows(X, body["edges"]), body["base_margin"], trees, depth
                )
            else:
                import torch

                from protocols.model import build_model, predict_proba
                from protocols.robust_features import RobustTransform
                from protocols.scaling import Scaler

                model = build_model(kind, len(features))
                model.load_state_dict(torch.load(files["weights"]))
                scaler = Scaler(
                    np.asarray(meta["scaler"]["mean"]), np.asarray(meta["scaler"]["std"])
                )
                # The saved inputs are the robust features (log money, clipped), then scaled.
                if spec := meta.get("robust_transform"):
                    X = RobustTransform.from_dict(spec).transform(X)
                scores = predict_proba(model, scaler.transform(X))
            out[data.platform][kind] = round(exact_auc_ks(y, scores)["auc"], 4)
    return out


def _local_only(
    platforms: list[PlatformData],
    kinds: list[str],
    federated: dict[str, dict[str, float]],
    share: float,
    rounds: int,
    cfg: TrainConfig,
    boost: gbdt.BoostParams,
    features: list[str],
) -> dict[str, dict[str, Any]]:
    """Each platform alone against the federated models, on its own held-out borrowers."""
    out: dict[str, dict[str, Any]] = {}
    for data in platforms:
        local = {
            kind: baselines.local_only(data, kind, share, rounds, cfg, boost, features).metrics[
                "auc"
            ]
            for kind in kinds
        }
        fed = federated[data.platform]
        out[data.platform] = {
            "local_only_auc": local,
            "federated_auc": fed,
            "local_only_best_auc": max(local.values()),
            "federated_best_auc": max(fed.values()),
        }
    return out


def from_args(args: Any) -> dict[str, Any]:
    """``fedcredit bench realdata``'s arguments checked and run (UsageError on bad input)."""
    from clients.ledger.importer import ImportValidationError
    from fedcredit.cli import UsageError

    if not args.csv or not args.mapping:
        raise UsageError("realdata needs --csv FILE and --mapping TOML")
    csv_path, mapping_path = Path(args.csv), Path(args.mapping)
    for flag, path in (("--csv", csv_path), ("--mapping", mapping_path)):
        if not path.is_file():
            raise UsageError(f"{flag}: no such file: {path}")
    rounds = args.rounds or 20
    if not 1 <= rounds <= 500:
        raise UsageError("--rounds must be between 1 and 500")
    try:
        result = run(
            csv_path,
            mapping_path,
            split=args.split,
            model=args.model or "gbdt,mlp,lr",
            rounds=rounds,
            seed=args.seed,
        )
    except (ImportValidationError, RealDataError, tomllib.TOMLDecodeError, ValueError) as exc:
        raise UsageError(f"realdata: {exc}") from None
    if getattr(args, "report_dir", None):
        from fedcredit.bench import realdata_report

        realdata_report.write(result, Path(args.report_dir))
    return result
