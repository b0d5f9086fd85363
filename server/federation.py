"""The bureau's pipeline: who is there, train, query, train again with the totals.

1. ``query.describe``: every platform names itself, its federation key id (all must match:
   tokens under different keys would never meet) and its feature names; the model uses the
   features every platform has.
2. For each model kind: federated scaling and FedAvg on each platform's own features.
3. Private matching on blinded identifiers (``server/matching.py``), then the masked
   encrypted debt-profile query over every distinct fully blinded identifier
   (``server/debt_query.py``), decrypted by the separate key holder service; each platform
   then receives the totals of its own borrowers (``query.totals``), in the order of its own
   blinded list, with no identifier attached.
4. For each model kind: FedAvg again on own features plus cross-platform totals.

Outputs go to ``out-dir``: ``federation.json`` (the run summary), ``model-*.pt`` with
``model-*.json`` metadata and ``evaluation-histograms.npz`` (summed held-out score
histograms, for plots). The bureau never opens a platform ledger, never sees a token and
never reads a per-borrower total (the key holder seals them for the platforms).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from protocols import messages as m
from protocols.delivery import ROW_BYTES
from protocols.features import CROSS_PLATFORM_FEATURES
from protocols.metrics import ScoreHistogram
from protocols.model import TREE_KINDS
from protocols.packing import debt_profile_layout
from server import progress
from server.artifacts import save_model, write_json
from server.boosting import BoostedModel, train_boosted
from server.debt_query import QueryAnswer, QueryFailed, run_debt_query
from server.keyholder_client import KeyHolderAPI, connect_keyholder
from server.matching import MatchResult, PlatformsFailed, exchange, run_matching
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
    """Features every platform computes, in the first platform's order, plus the missing-value
    flags of those features that only some platforms need (a platform without the flag has
    no gaps: it sends zeros, ``clients.features.select_columns``)."""
    lists = [d.features for d in descs.values()]
    shared = set(lists[0]).intersection(*lists[1:])
    everywhere = [f for f in lists[0] if f in shared]
    flags = sorted(
        f
        for f in set().union(*lists) - shared
        if f.endswith("_missing") and f.removesuffix("_missing") in shared
    )
    dropped = set().union(*lists) - shared - set(flags)
    if dropped:
        log.warning("features not held by every platform are left out: %s", sorted(dropped))
    return everywhere + flags


def deliver_totals(
    grid: Grid, match: MatchResult, answer: QueryAnswer, settings: FederationSettings
) -> None:
    """Each contributing platform receives the sealed totals of its own borrowers only.

    Rows go in the order of the platform's own fully blinded list: no identifier travels,
    and the coordinator cannot open what it forwards (``protocols.delivery``).
    """
    index = {e: i for i, e in enumerate(answer.elements)}
    starts = np.cumsum([0] + [size for _, size in answer.batches])
    batches = [m.DeliveryBatch(query_id=q, size=size) for q, size in answer.batches]
    requests: dict[str, tuple[str, m.Payload]] = {}
    for name in answer.contributors:
        idx = np.asarray([index[e] for e in match.lists[name]], dtype=np.int64)
        batch_of = np.searchsorted(starts, idx, side="right") - 1
        where = np.stack([batch_of, idx - starts[batch_of]], axis=1).astype("<i4")
        rows = np.frombuffer(answer.sealed[name], dtype=np.uint8).reshape(-1, ROW_BYTES)
        requests[name] = (
            "query.totals",
            m.TotalsDelivery(
                session_id=match.session_id,
                key_id=answer.key.key_id,
                count=len(idx),
                contributors=answer.contributors,
                batches=batches,
                announcement=answer.key.announcement,
                rows=where.tobytes(),
                sealed=rows[idx].tobytes(),
            ),
        )
    exchange(grid, requests, match.nodes, settings.query_timeout)


def private_query(
    grid: Grid, names: dict[int, str], settings: FederationSettings, keyholder: KeyHolderAPI
) -> tuple[MatchResult, QueryAnswer, dict[str, str]]:
    """Private matching, then the masked encrypted query over every distinct blinded id.

    A platform that fails or does not answer within ``query-timeout`` is dropped, and
    everything runs again from a fresh matching session over the others (fresh secrets,
    fresh pseudonyms, fresh query ids and so fresh masks): a total is never over a mix of
    participant sets, and answers from two sets can never be lined up and differenced.
    """
    live = {name: node for node, name in names.items()}
    dropped: dict[str, str] = {}
    while True:
        if len(live) < settings.min_participants:
            raise FederationError(
                f"only {len(live)} platform(s) can take part in the debt query; it needs at "
                f"least {settings.min_participants}. Dropped: "
                + ("; ".join(f"{n}: {r}" for n, r in sorted(dropped.items())) or "none")
            )
        try:
            match = run_matching(grid, live, settings.query_timeout)
            elements = match.union()
            if 0 < settings.query_limit < len(elements):
                rng = np.random.default_rng(settings.seed)
                picked = rng.choice(len(elements), settings.query_limit, replace=False)
                elements = [elements[i] for i in sorted(picked.tolist())]
            answer = run_debt_query(
                grid,
                match,
                elements,
                keyholder,
                settings.query_batch,
                settings.query_timeout,
            )
        except PlatformsFailed as exc:
            log.warning("dropping %s and starting the query again: %s", sorted(exc.failed), exc)
            dropped.update(exc.failed)
            live = {n: v for n, v in live.items() if n not in exc.failed}
            continue
        except QueryFailed as exc:
            raise FederationError(str(exc)) from exc
        answer.dropped = dict(dropped)
        return match, answer, dropped


def _model_summary(
    trained: TrainedModel | BoostedModel, names: dict[int, str], files: dict[str, str]
) -> dict[str, Any]:
    return {
        **trained.histogram.summary(),
        "calibration": trained.calibration(),
        "per_platform": {names[n]: h.summary() for n, h in trained.per_node.items()},
        "history": trained.history,
        "privacy": trained.privacy,
        # Why training stopped (server/convergence.py); boosting reports its own history.
        **(trained.convergence() if isinstance(trained, TrainedModel) else {}),
        "files": files,
    }


def run_federation(
    grid: Grid, settings: FederationSettings, keyholder: KeyHolderAPI | None = None
) -> dict[str, Any]:
    """The whole pipeline; writes every output and returns the run summary.

    ``keyholder`` is the decryption-key holder's client; by default it is reached at the
    run config's ``keyholder-url`` (a separate service: the coordinator holds no private key).
    """
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "status": "running",
        "settings": settings.as_run_config(),
        "secure_aggregation": settings.secure_aggregation,
    }
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
            if kind in TREE_KINDS:
                trained = train_boosted(grid, nodes, kind, feature_set, names_, settings, names)
            else:
                trained = train_federated(grid, nodes, kind, feature_set, names_, settings, names)
            entry = _model_summary(trained, names, {})
            entry["secure_aggregation"] = trained.secure_aggregation
            if trained.dropped:
                entry["dropped"] = trained.dropped
            metrics = {
                **trained.histogram.summary(),
                "brier": entry["calibration"]["brier"],
                "psi": entry["calibration"]["psi"],
            }
            entry["files"] = save_model(out, trained, platforms, metrics)
            models[kind][feature_set] = entry
            prefix = f"{kind}-{feature_set}"
            for node, hist in trained.per_node.items():
                histograms[f"{prefix}:{names[node]}:pos"] = hist.positives
                histograms[f"{prefix}:{names[node]}:neg"] = hist.negatives
            if trained.summed is not None:  # secure aggregation: only the sum exists
                histograms[f"{prefix}:all:pos"] = trained.summed.positives
                histograms[f"{prefix}:all:neg"] = trained.summed.negatives
            seconds[f"train-{prefix}"] = time.perf_counter() - t

        if "train" in settings.stage_list:
            for kind in settings.models:
                train(kind, "local", features)

        if "query" in settings.stage_list:
            t = time.perf_counter()
            if keyholder is None:
                keyholder = connect_keyholder(settings)
            match, answer, dropped = private_query(grid, names, settings, keyholder)
            stats = answer.stats
            limited = len(answer.elements) < len(match.union())
            key_bits = answer.key.public_key.n.bit_length()
            layout = debt_profile_layout(len(answer.contributors))
            summary["matching"] = match.stats()
            query_stats = stats.to_dict()
            # The whole private query: matching is part of it (it is what replaced the
            # plaintext token lists), so its time counts in the throughput.
            whole = match.seconds + stats.seconds
            query_stats["stage_seconds"] = {
                "matching": round(match.seconds, 2),
                **query_stats["stage_seconds"],  # type: ignore[dict-item]
            }
            query_stats["seconds"] = round(whole, 2)
            query_stats["tokens_per_second"] = round(stats.tokens / whole, 1) if whole else None
            summary["queries"] = {
                **query_stats,
                "key_id": answer.key.key_id,
                "key_bits": key_bits,
                "tokens_per_ciphertext": layout.tokens_per_plaintext(key_bits),
                "platforms_answering": len(answer.contributors),
                "contributors": list(answer.contributors),
                "dropped": dropped,
                "bytes_per_platform": round(
                    (
                        stats.bytes_sent
                        + stats.bytes_received
                        + match.bytes_sent
                        + match.bytes_received
                    )
                    / len(match.participants)
                ),
                "limited": limited,
            }
            seconds["matching"] = match.seconds
            seconds["query"] = time.perf_counter() - t
            if not limited:
                # Every contributing platform gets the totals of its own borrowers.
                t = time.perf_counter()
                deliver_totals(grid, match, answer, settings)
                seconds["deliver-totals"] = time.perf_counter() - t
                summary["queries"]["delivered_to"] = list(answer.contributors)
            if "cross" in settings.stage_list and dropped:
                summary["cross_skipped"] = (
                    f"platforms dropped out of the query ({', '.join(sorted(dropped))}); the "
                    "cross-platform model needs every platform's totals"
                )
            elif "cross" in settings.stage_list and limited:
                summary["cross_skipped"] = (
                    "query-limit covers only some borrowers; the cross-platform model needs "
                    "totals for every platform's borrowers"
                )
            elif "cross" in settings.stage_list:
                cross = [*features, *CROSS_PLATFORM_FEATURES]
                summary["features"]["cross"] = cross
                for kind in settings.models:
                    train(kind, "cross", cross)

        if "cross" in settings.stage_list and "query" not in settings.stage_list:
            # A later federation of the same run: the platforms hold their totals already.
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
