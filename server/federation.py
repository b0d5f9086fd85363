"""The bureau's pipeline: who is there, train, query, train again with the totals.

1. ``query.describe``: every platform names itself, its federation key id (all must match:
   tokens under different keys would never meet) and its feature names; the model uses the
   features every platform has.
2. For each model kind: federated scaling and FedAvg on each platform's own features.
3. ``query.applicants`` and the encrypted debt-profile query for every platform's borrowers;
   each platform then receives the totals of its own borrowers (``query.totals``).
4. For each model kind: FedAvg again on own features plus cross-platform totals.

Outputs go to ``out-dir``: ``federation.json`` (the run summary), ``model-*.pt`` with
``model-*.json`` metadata, ``query-totals.parquet`` and ``evaluation-histograms.npz``
(summed held-out score histograms, for plots). The bureau never opens a platform ledger.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from protocols import messages as m
from protocols.features import CROSS_PLATFORM_FEATURES
from protocols.metrics import ScoreHistogram
from server import progress
from server.artifacts import save_model, write_json, write_totals
from server.debt_query import run_debt_query
from server.keyholder import KeyHolder
from server.settings import FederationSettings
from server.training import FederationError, TrainedModel, ask_all, train_federated

log = logging.getLogger(__name__)


def wait_for_nodes(grid: Grid, settings: FederationSettings) -> list[int]:
    deadline = time.monotonic() + settings.node_wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= settings.min_nodes:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} platform node(s) connected after {settings.node_wait:.0f} s; "
                f"min-nodes is {settings.min_nodes}"
            )
        progress.report("waiting for platforms", len(nodes), settings.min_nodes, "connected")
        time.sleep(1.0)


def describe_platforms(
    grid: Grid, nodes: list[int], settings: FederationSettings
) -> dict[int, m.PlatformDescription]:
    request = m.DescribeRequest(test_share=settings.test_share).to_content()
    replies = ask_all(grid, nodes, "query.describe", request, settings.timeout)
    descs = {
        n: m.PlatformDescription.from_content(c, f"describe from {n}") for n, c in replies.items()
    }
    key_ids = {d.key_id for d in descs.values()}
    if len(key_ids) != 1:
        listing = ", ".join(f"{d.platform}={d.key_id}" for d in descs.values())
        raise FederationError(f"platforms use different federation keys: {listing}")
    names = [d.platform for d in descs.values()]
    if len(set(names)) != len(names):
        raise FederationError(f"two nodes claim the same platform name: {sorted(names)}")
    empty = [d.platform for d in descs.values() if d.train_rows == 0]
    if empty:
        raise FederationError(f"platforms without labelled training rows: {empty}")
    return descs


def common_features(descs: dict[int, m.PlatformDescription]) -> list[str]:
    """Features every platform computes, in the first platform's order."""
    lists = [d.features for d in descs.values()]
    shared = set(lists[0]).intersection(*lists[1:])
    dropped = set().union(*lists) - shared
    if dropped:
        log.warning("features not held by every platform are left out: %s", sorted(dropped))
    return [f for f in lists[0] if f in shared]


def _applicants(grid: Grid, nodes: list[int], settings: FederationSettings) -> dict[int, list[str]]:
    replies = ask_all(
        grid, nodes, "query.applicants", m.ApplicantsRequest().to_content(), settings.timeout
    )
    return {
        n: m.tokens_from_bytes(m.Applicants.from_content(c, f"applicants from {n}").tokens)
        for n, c in replies.items()
    }


def _deliver_totals(
    grid: Grid,
    holdings: dict[int, list[str]],
    index: dict[str, int],
    totals: np.ndarray,
    settings: FederationSettings,
) -> None:
    """Each platform receives the totals of its own borrowers, and nobody else's."""
    for node, tokens in holdings.items():
        rows = totals[[index[t] for t in tokens]]
        delivery = m.TotalsDelivery(tokens=m.tokens_to_bytes(tokens), totals=m.ints_to_bytes(rows))
        ask_all(grid, [node], "query.totals", delivery.to_content(), settings.timeout)


def _model_summary(
    trained: TrainedModel, names: dict[int, str], files: dict[str, str]
) -> dict[str, Any]:
    return {
        **trained.histogram.summary(),
        "per_platform": {names[n]: h.summary() for n, h in trained.per_node.items()},
        "history": trained.history,
        "files": files,
    }


def run_federation(grid: Grid, settings: FederationSettings) -> dict[str, Any]:
    """The whole pipeline; writes every output and returns the run summary."""
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"status": "running", "settings": settings.as_run_config()}
    seconds: dict[str, float] = {}
    histograms: dict[str, np.ndarray] = {}
    try:
        t0 = time.perf_counter()
        nodes = wait_for_nodes(grid, settings)
        descs = describe_platforms(grid, nodes, settings)
        names = {n: d.platform for n, d in descs.items()}
        platforms = [{"node_id": n, **d.model_dump()} for n, d in descs.items()]
        for p in platforms:
            p.pop("features")
        features = common_features(descs)
        summary.update(platforms=[names[n] for n in nodes], platform_details=platforms)
        summary["features"] = {"local": features}
        seconds["describe"] = time.perf_counter() - t0
        models: dict[str, dict[str, Any]] = {k: {} for k in settings.models}

        def train(kind: str, feature_set: str, names_: list[str]) -> None:
            t = time.perf_counter()
            trained = train_federated(grid, nodes, kind, feature_set, names_, settings)
            metrics = trained.histogram.summary()
            files = save_model(out, trained, platforms, metrics)
            models[kind][feature_set] = _model_summary(trained, names, files)
            prefix = f"{kind}-{feature_set}"
            for node, hist in trained.per_node.items():
                histograms[f"{prefix}:{names[node]}:pos"] = hist.positives
                histograms[f"{prefix}:{names[node]}:neg"] = hist.negatives
            seconds[f"train-{prefix}"] = time.perf_counter() - t

        if "train" in settings.stage_list:
            for kind in settings.models:
                train(kind, "local", features)

        if "query" in settings.stage_list:
            t = time.perf_counter()
            holdings = _applicants(grid, nodes, settings)
            union = sorted(set().union(*holdings.values()))
            limited = 0 < settings.query_limit < len(union)
            if limited:
                rng = np.random.default_rng(settings.seed)
                union = sorted(rng.choice(union, settings.query_limit, replace=False).tolist())
            progress.report("key holder", 0, 0, f"generating a {settings.key_bits}-bit key pair")
            keyholder = KeyHolder(settings.key_bits)
            progress.report("key holder", 1, 1, f"{settings.key_bits}-bit key pair ready")
            totals, stats = run_debt_query(
                grid, nodes, union, keyholder, settings.query_batch, settings.timeout
            )
            write_totals(out / "query-totals.parquet", union, totals)
            summary["queries"] = {
                **stats.to_dict(),
                "key_bits": keyholder.key_bits,
                "tokens_per_ciphertext": keyholder.layout.tokens_per_plaintext(keyholder.key_bits),
                "platforms_answering": len(nodes),
                "bytes_per_platform": round((stats.bytes_sent + stats.bytes_received) / len(nodes)),
                "limited": limited,
            }
            seconds["query"] = time.perf_counter() - t
            if "cross" in settings.stage_list and limited:
                summary["cross_skipped"] = (
                    "query-limit covers only some borrowers; the cross-platform model needs "
                    "totals for every platform's borrowers"
                )
            elif "cross" in settings.stage_list:
                t = time.perf_counter()
                index = {tok: i for i, tok in enumerate(union)}
                _deliver_totals(grid, holdings, index, totals, settings)
                seconds["deliver-totals"] = time.perf_counter() - t
                cross = [*features, *CROSS_PLATFORM_FEATURES]
                summary["features"]["cross"] = cross
                for kind in settings.models:
                    train(kind, "cross", cross)

        primary = settings.models[0]
        summary["primary_model"] = primary
        summary["models"] = models
        for key, feature_set in (("federated", "local"), ("federated_cross_platform", "cross")):
            if feature_set in models[primary]:
                entry = models[primary][feature_set]
                summary[key] = {k: entry[k] for k in ("auc", "ks", "n")}
        if histograms:
            path = out / "evaluation-histograms.npz"
            np.savez_compressed(path, **histograms)  # type: ignore[arg-type]
        seconds["total"] = time.perf_counter() - t0
        summary["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        summary["status"] = "ok"
        return summary
    except Exception as exc:
        summary["status"] = "failed"
        summary["error"] = f"{exc.__class__.__name__}: {exc}"
        raise
    finally:
        write_json(out / "federation.json", summary)


def load_histograms(path: Path) -> dict[str, dict[str, ScoreHistogram]]:
    """``evaluation-histograms.npz`` as {"<kind>-<features>": {platform: histogram}}."""
    out: dict[str, dict[str, ScoreHistogram]] = {}
    with np.load(path) as data:
        for key in data.files:
            model, platform, which = key.rsplit(":", 2)
            if which != "pos":
                continue
            out.setdefault(model, {})[platform] = ScoreHistogram(
                data[key], data[f"{model}:{platform}:neg"]
            )
    return out
