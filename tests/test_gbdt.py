"""Federated gradient boosting (model kind ``gbdt``): bins, trees, messages, real data.

The federation sees only summed histograms; the pooled twin is scikit-learn's
HistGradientBoosting on the same bins. On a UCI subsample the two must agree within 0.01
AUC (in process; one run goes through Flower's simulation engine, where each message may run
in another worker process, so the platforms' running scores must live in node state).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.app import ERROR_REFUSED, build_client_app
from fedcredit.bench import realdata
from fedcredit.enrolment import Enrolment, enrol_platforms
from fedcredit.inprocess import InProcessGrid
from protocols import gbdt
from protocols.messages import PAYLOAD_KEY, ProtocolError
from protocols.model import parse_model_kinds
from server.boosting import aggregate
from server.federation import run_federation
from server.settings import FederationSettings
from server.training import FederationError
from tests.conftest import REPO, UCI_CSV

UCI_MAPPING = REPO / "mappings" / "uci_credit_card.toml"
SUBSAMPLE = 4500
SMALL = gbdt.BoostParams(trees=12, depth=3, learning_rate=0.2, bins=32)


@pytest.fixture(scope="module")
def uci_subsample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not UCI_CSV.exists():
        pytest.fail(f"shared UCI data not found at {UCI_CSV}")
    path = tmp_path_factory.mktemp("uci-sub") / "uci_subsample.csv"
    with UCI_CSV.open(newline="") as src, path.open("w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst)
        for i, row in enumerate(reader):
            if i > SUBSAMPLE:
                break
            writer.writerow(row)
    return path


@pytest.fixture(scope="module")
def uci_ledgers(uci_subsample: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("uci-gbdt")
    return realdata.import_split(uci_subsample, UCI_MAPPING, "random", 0, folder)


@pytest.fixture(scope="module")
def uci_enrolment(uci_ledgers: list[str], tmp_path_factory: pytest.TempPathFactory) -> Enrolment:
    """Identities and a roster for the three UCI platforms: secure sums mask with them."""
    return enrol_platforms(uci_ledgers, tmp_path_factory.mktemp("uci-enrolment"))


def _app(ledgers: list[str], enrolment: Enrolment, mods: list[Any] | None = None) -> ClientApp:
    return build_client_app(ledgers, enrolment.identities, enrolment.roster, mods)


def _settings(out: Path, **extra: object) -> FederationSettings:
    return FederationSettings.model_validate(
        {
            "out-dir": str(out),
            "stages": "train",
            "model": "gbdt",
            "min-nodes": 3,
            "gbdt-trees": SMALL.trees,
            "gbdt-depth": SMALL.depth,
            "gbdt-learning-rate": SMALL.learning_rate,
            "gbdt-bins": SMALL.bins,
            **extra,
        }
    )


# -- bins ---------------------------------------------------------------------------------------


def test_summed_sketches_give_the_pooled_edges() -> None:
    rng = np.random.default_rng(1)
    X = np.column_stack(
        [
            rng.lognormal(8, 2, 3000),  # heavy-tailed money
            rng.integers(0, 2, 3000),  # a flag
            rng.integers(0, 5, 3000),  # a small count
        ]
    ).astype(float)
    mean, std = X.mean(axis=0), X.std(axis=0)
    parts = [gbdt.sketch_counts(X[i::3], mean, std) for i in range(3)]
    assert np.array_equal(sum(parts), gbdt.sketch_counts(X, mean, std))
    centre, scale = gbdt.recentre(sum(parts), mean, std)
    assert abs(centre[0] - np.median(X[:, 0])) < 0.05 * np.median(X[:, 0])
    summed = sum(gbdt.sketch_counts(X[i::3], centre, scale) for i in range(3))
    edges = gbdt.edges_from_counts(summed, centre, scale, 16)
    assert edges == gbdt.pooled_edges(X, 16)
    assert len(edges[0]) == 15  # quantile edges, one per bin boundary
    assert len(edges[1]) == 1 and 0 < edges[1][0] <= 1  # the flag splits between 0 and 1
    assert len(edges[2]) == 4  # one edge between each pair of distinct small counts
    binned = gbdt.bin_rows(X, edges)
    assert sorted(np.unique(binned[:, 2])) == [0, 1, 2, 3, 4]
    counts = np.bincount(binned[:, 0], minlength=16)
    assert counts.min() > 0.5 * len(X) / 16  # quantile bins of a heavy tail are balanced


@pytest.mark.parametrize("rows", [0, 100, 5000])
def test_node_histograms_are_the_per_node_sums(rows: int) -> None:
    rng = np.random.default_rng(rows)
    features, bins = 20, 16
    binned = rng.integers(0, bins, (rows, features))
    grad, hess, node = rng.random(rows), rng.random(rows), rng.integers(3, 7, rows)
    got = gbdt.node_histograms(binned, grad, hess, node, [5, 3], bins)
    for name, weights in (("grad", grad), ("hess", hess), ("count", np.ones(rows))):
        for slot, wanted in enumerate([5, 3]):
            at = node == wanted
            expected = [
                np.bincount(binned[at, f], weights=weights[at], minlength=bins)
                for f in range(features)
            ]
            assert np.allclose(got[name][slot], expected), (name, wanted)


# A node of the level, several (one empty), and a root that holds every row (the matrix kept
# for the session is used as it is there).
@pytest.mark.parametrize("asked", [[2], [2, 1], [0, 3, 2, 1], [0]])
def test_node_sums_cover_only_the_cells_a_feature_has(asked: list[int]) -> None:
    """The compact layout: each feature's own bins, one-bin features as the node totals."""
    rng = np.random.default_rng(3)
    edges = [[0.5], [], [1.0, 2.0, 3.0], []]  # 2, 1, 4 and 1 bins
    X = np.column_stack([rng.random(500), np.zeros(500), rng.integers(0, 5, 500), np.ones(500)])
    binned = gbdt.bin_rows(X, edges)
    layout = gbdt.CellLayout.of(edges)
    assert layout.widths == (2, 1, 4, 1) and layout.cells == 8 and layout.bins == 4
    grad, hess = rng.normal(size=500), rng.random(500)
    node = np.zeros(500, dtype=np.int64) if asked == [0] else rng.integers(1, 4, 500)
    got = gbdt.node_sums(binned, grad, hess, node, asked, layout)
    dense = gbdt.node_histograms(binned, grad, hess, node, asked, layout.bins)
    for name in ("grad", "hess", "count"):
        assert got[name].shape == (len(asked), 8)
        assert np.allclose(layout.expand(got[name]), dense[name]), name
    for slot, wanted in enumerate(asked):
        # Every feature's cells hold all of a node's rows, once (none for node 0 here).
        rows = int((node == wanted).sum())
        per_feature = np.add.reduceat(got["count"][slot], layout.offsets)
        assert np.array_equal(per_feature, [rows] * 4)
        at = node == wanted
        assert np.isclose(got["grad"][slot][2], grad[at].sum())  # the one-bin feature
        assert np.isclose(got["grad"][slot][3:7].sum(), grad[at].sum())
    # The compiled loop against the plainest numpy: one np.add.at per (node, feature).
    for slot, wanted in enumerate(asked):
        at = node == wanted
        for f, width in enumerate(layout.widths):
            for name, weight in (("grad", grad), ("hess", hess), ("count", np.ones(500))):
                ref = np.zeros(width)
                np.add.at(ref, binned[at, f], weight[at])
                cells = got[name][slot][layout.offsets[f] : layout.offsets[f] + width]
                assert np.allclose(cells, ref), (name, wanted, f)


def test_compiled_loops_refuse_what_does_not_line_up() -> None:
    """The compiled loops follow indices unchecked, so what reaches them is checked first:
    a tree splitting on a column the rows lack, nodes outside the heap, lengths that differ."""
    tree = gbdt.Tree(feature=[5, -1, -1], threshold=[1, 0, 0], value=[0.0, 1.0, 2.0])
    narrow, wide = np.zeros((4, 3), np.uint8), np.zeros((4, 6), np.uint8)
    for binned, node in ((narrow, np.zeros(4)), (wide, np.zeros(3)), (wide, np.full(4, 9))):
        with pytest.raises(ValueError, match="do not fit"):
            gbdt.advance(tree, binned, node.astype(np.intp))
    wide[:, 5] = [0, 1, 2, 3]
    assert gbdt.route(tree, wide).tolist() == [1, 1, 2, 2]
    layout = gbdt.CellLayout((2, 2))
    with pytest.raises(ValueError, match="line up"):
        gbdt.node_sums(np.zeros((4, 2), np.uint8), np.ones(3), np.ones(4), np.zeros(4), [0], layout)
    with pytest.raises(ValueError, match="line up"):
        gbdt.node_sums(np.zeros((4, 3), np.uint8), np.ones(4), np.ones(4), np.zeros(4), [0], layout)


def test_a_loop_numba_cannot_cache_is_compiled_per_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where numba has no writable cache place (here: code without a source file), the
    loop still compiles and runs, uncached, with a warning."""
    from protocols.gbdt_kernels import compiled

    namespace: dict[str, object] = {}
    exec("def twice(x):\n    return 2 * x\n", namespace)
    with caplog.at_level("WARNING", logger="protocols.gbdt_kernels"):
        twice = compiled(namespace["twice"])  # type: ignore[arg-type]
    assert twice(21) == 42
    assert "not cached" in caplog.text


def test_best_splits_on_the_compact_layout_are_the_grid_splits() -> None:
    """A level's splits from the compact cells equal each node's split on the whole grid
    (the cells past a feature's last bin are empty there and never win)."""
    rng = np.random.default_rng(4)
    layout = gbdt.CellLayout((5, 1, 8, 2, 3))
    nodes = 6
    count = rng.integers(0, 40, (nodes, layout.cells)).astype(float)
    # Every feature's cells must hold the node's rows: rescale each feature to feature 0.
    rows = count[:, : layout.widths[0]].sum(axis=1)
    for f, (start, width) in enumerate(zip(layout.offsets, layout.widths, strict=True)):
        part = count[:, start : start + width]
        if f and width == 1:
            part[:] = rows[:, None]
        elif f:
            share = rng.dirichlet(np.ones(width), nodes)
            part[:] = np.floor(share * rows[:, None])
            part[:, -1] += rows - part.sum(axis=1)
    grad = rng.normal(size=count.shape) * count
    hess = rng.random(count.shape) * count / 4
    splits = gbdt.best_splits(grad, hess, count, layout)
    for k in range(nodes):
        dense = gbdt.best_split(*(layout.expand(a[k]) for a in (grad, hess, count)))
        if dense is None:
            assert splits[k] is None
            continue
        got = splits[k]
        assert got is not None and (got.feature, got.threshold) == (dense.feature, dense.threshold)
        assert got.gain == pytest.approx(dense.gain, rel=1e-9)
        assert got.left[2] + got.right[2] == rows[k]


def _brute_force_split(
    grad: np.ndarray, hess: np.ndarray, count: np.ndarray, layout: gbdt.CellLayout
) -> tuple[int, int, float] | None:
    """The textbook split search, one candidate at a time: (feature, threshold, gain)."""
    G, H, N = (float(a[: layout.widths[0]].sum()) for a in (grad, hess, count))
    parent = G * G / (H + gbdt.L2)
    found: list[tuple[float, int, int]] = []
    for f, (start, width) in enumerate(zip(layout.offsets, layout.widths, strict=True)):
        for b in range(width - 1):
            cells = slice(int(start), int(start) + b + 1)
            gl, hl, cl = (float(a[cells].sum()) for a in (grad, hess, count))
            gr, hr, cr = G - gl, H - hl, N - cl
            if min(cl, cr) < gbdt.MIN_CHILD_ROWS or min(hl, hr) < gbdt.MIN_CHILD_HESSIAN:
                continue
            found.append((gl * gl / (hl + gbdt.L2) + gr * gr / (hr + gbdt.L2) - parent, f, b))
    if not found or max(g for g, _, _ in found) <= 1e-12:
        return None
    best = max(g for g, _, _ in found)
    gain, f, b = next(c for c in found if c[0] >= best - gbdt.TIE_TOLERANCE * abs(best))
    return f, b, gain


@pytest.mark.parametrize("seed", range(6))
def test_best_splits_match_the_textbook_search(seed: int) -> None:
    """The compiled split search against one candidate at a time, ties included (a copied
    feature parts the rows the same way: the first copy must win)."""
    rng = np.random.default_rng(seed)
    widths = tuple(int(w) for w in rng.integers(1, 12, 7))
    layout = gbdt.CellLayout((*widths, widths[2]))  # the last feature repeats feature 2
    nodes = 5
    rows = rng.integers(0, 400, nodes).astype(float)
    count = np.zeros((nodes, layout.cells))
    for start, width in zip(layout.offsets, layout.widths, strict=True):
        share = rng.dirichlet(np.ones(width), nodes)
        part = np.floor(share * rows[:, None])
        part[:, -1] += rows - part.sum(axis=1)
        count[:, start : start + width] = part
    count[:, layout.offsets[-1] :] = count[:, layout.offsets[2] : layout.offsets[2] + widths[2]]
    grad = rng.normal(size=count.shape) * count
    hess = rng.random(count.shape) * count / 4
    grad[:, layout.offsets[-1] :] = grad[:, layout.offsets[2] : layout.offsets[2] + widths[2]]
    hess[:, layout.offsets[-1] :] = hess[:, layout.offsets[2] : layout.offsets[2] + widths[2]]
    for k, got in enumerate(gbdt.best_splits(grad, hess, count, layout)):
        want = _brute_force_split(grad[k], hess[k], count[k], layout)
        if want is None:
            assert got is None
            continue
        assert got is not None and (got.feature, got.threshold) == want[:2]
        assert got.feature != len(widths)  # a tie with the copy goes to the first
        assert got.gain == pytest.approx(want[2], rel=1e-9)
        assert got.left[2] + got.right[2] == rows[k]


def test_best_split_finds_the_informative_feature() -> None:
    rng = np.random.default_rng(2)
    bins = rng.integers(0, 8, size=(2000, 2))
    y = (bins[:, 1] >= 5).astype(float)
    p = np.full(len(y), y.mean())
    node = np.zeros(len(y), dtype=np.int64)
    h = gbdt.node_histograms(bins, p - y, p * (1 - p), node, [0], 8)
    split = gbdt.best_split(h["grad"][0], h["hess"][0], h["count"][0])
    assert split is not None and (split.feature, split.threshold) == (1, 4)
    assert split.left[2] + split.right[2] == len(y)


# -- messages ----------------------------------------------------------------------------------


def _level(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "feature_set": "local",
        "features": ["a", "b"],
        "test_share": 0.3,
        "session_id": "0" * 32,
        "edges": [[0.0, 1.0], [2.0]],
        "bins": 3,
        "base_margin": -1.0,
        "depth": 2,
        "tree": 0,
        "level": 0,
        "nodes": [0],
        "current": gbdt.Tree.empty(2).model_dump(),
    }
    return {**base, **overrides}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"edges": [[1.0, 0.0], [2.0]]}, "strictly increasing"),
        ({"edges": [[0.0, float("nan")], [2.0]]}, "finite"),
        ({"edges": [[0.0]]}, "one edge list per feature"),
        ({"nodes": [1]}, "nodes of level 0"),
        ({"level": 1, "nodes": [1, 1], "edges": None}, "distinct"),
        ({"level": 2}, "beyond the tree depth"),
        ({"tree": 3}, "previous tree travels"),
        ({"level": 1, "nodes": [1]}, "edges travel with the first message"),
        ({"bins": 7}, "bins does not match"),
        (
            {"current": {"feature": [0, -1, 1], "threshold": [0, 0, 0], "value": [0, 0, 0]}},
            "no children",
        ),
        (
            {"current": {"feature": [5] + [-1] * 6, "threshold": [0] * 7, "value": [0] * 7}},
            "outside",
        ),
        (
            {"current": {"feature": [0] + [-1] * 6, "threshold": [9] + [0] * 6, "value": [0] * 7}},
            "outside the bins",
        ),
        ({"current": gbdt.Tree.empty(3).model_dump()}, "depth 2"),
        ({"base_margin": 1e9}, "base_margin"),
        ({"features": ["a;drop"], "edges": [[0.0]]}, "features"),
    ],
)
def test_hostile_level_requests_are_refused(change: dict[str, object], reason: str) -> None:
    raw = json.dumps(_level(**change)).encode()  # as a hostile coordinator would send it
    content = RecordDict({PAYLOAD_KEY: ConfigRecord({PAYLOAD_KEY: raw})})
    with pytest.raises(ProtocolError, match=reason):
        gbdt.LevelRequest.from_content(content, "query.gbdt_level")


def test_named_sums_are_checked_before_they_are_added() -> None:
    good = {"grad": np.zeros((1, 2, 3)), "hess": np.ones((1, 2, 3))}
    shapes = {"grad": (1, 2, 3), "hess": (1, 2, 3)}
    assert gbdt.check_named_arrays(good, shapes, ("hess",))["hess"].sum() == 6
    with pytest.raises(ProtocolError, match="shape"):
        gbdt.check_named_arrays({**good, "grad": np.zeros((2, 2, 3))}, shapes)
    with pytest.raises(ProtocolError, match="negative"):
        gbdt.check_named_arrays({**good, "hess": -np.ones((1, 2, 3))}, shapes, ("hess",))
    with pytest.raises(ProtocolError, match="non-finite"):
        gbdt.check_named_arrays({**good, "grad": np.full((1, 2, 3), np.inf)}, shapes)
    with pytest.raises(ProtocolError, match="expected"):
        gbdt.check_named_arrays({"grad": good["grad"]}, shapes)
    record = gbdt.arrays_to_record(good)
    assert np.array_equal(gbdt.arrays_from_record(record, "reply")["hess"], good["hess"])
    forged = ArrayRecord({"grad": Array(np.zeros((1, 2, 3)))})  # numpy's pickle-able format
    with pytest.raises(ProtocolError, match="not raw float64"):
        gbdt.arrays_from_record(forged, "reply")
    short = ArrayRecord({"grad": Array("<f8", (1, 2, 3), gbdt.WIRE_STYPE, b"\0" * 40)})
    with pytest.raises(ProtocolError, match="40 bytes"):
        gbdt.arrays_from_record(short, "reply")
    total = aggregate({1: good, 2: good})
    assert total["hess"].sum() == 12
    with pytest.raises(FederationError, match="different sets"):
        aggregate({1: good, 2: {"grad": good["grad"]}})


def test_a_level_out_of_sequence_is_refused_by_the_platform(uci_ledgers: list[str]) -> None:
    app = build_client_app(uci_ledgers)
    grid = InProcessGrid(app, 3)
    features = ["age", "age_missing"]
    request = gbdt.LevelRequest.model_validate(
        {**_level(features=features, edges=None, tree=4, level=1, nodes=[1])}
    )
    context = next(iter(grid.contexts.values()))
    reply = app(
        Message(request.to_content(), dst_node_id=1000, message_type="query.gbdt_level"), context
    )
    assert reply.has_error() and reply.error.code == ERROR_REFUSED
    assert "no boosting session" in reply.error.reason


def test_gbdt_is_a_model_kind() -> None:
    assert parse_model_kinds("gbdt, mlp,lr") == "gbdt,mlp,lr"
    assert FederationSettings.model_validate({"model": "gbdt"}).models == ["gbdt"]


# -- federated against pooled ------------------------------------------------------------------


@pytest.fixture(scope="module")
def boosted(
    uci_ledgers: list[str], uci_enrolment: Enrolment, tmp_path_factory: pytest.TempPathFactory
) -> dict[bool, dict[str, Any]]:
    """The same federation with secure aggregation (the default) and without."""
    runs = {}
    for secure in (True, False):
        grid = InProcessGrid(_app(uci_ledgers, uci_enrolment), 3)
        out = tmp_path_factory.mktemp(f"gbdt-secure-{secure}")
        runs[secure] = run_federation(grid, _settings(out, **{"secure-aggregation": secure}))
    return runs


def test_federated_boosting_matches_pooled_on_uci(
    uci_ledgers: list[str], boosted: dict[bool, dict[str, Any]]
) -> None:
    from clients.platform_data import load_platform_data
    from fedcredit.demo import baselines
    from protocols.model import TrainConfig

    summary = boosted[True]
    entry = summary["models"]["gbdt"]["local"]
    platforms = [load_platform_data(loc) for loc in uci_ledgers]
    pooled = baselines.centralized(
        platforms, "gbdt", summary["features"]["local"], False, 0.3, 1, TrainConfig(), SMALL
    )
    assert pooled.metrics["auc"] > 0.70  # the trees do learn
    assert abs(entry["auc"] - pooled.metrics["auc"]) < 0.01, (entry["auc"], pooled.metrics)
    assert [h["round"] for h in entry["history"]] == list(range(1, SMALL.trees + 1))
    assert entry["history"][-1]["auc"] == entry["auc"]
    assert entry["calibration"]["brier"] is not None

    # Saved with the same metadata as the other kinds; the trees reproduce the scores.
    meta = json.loads(Path(entry["files"]["metadata"]).read_text())
    assert meta["model"] == "gbdt" and meta["format"] == "fedcredit-model/v1"
    assert meta["rounds"] == SMALL.trees and len(meta["platforms"]) == 3
    body = json.loads(Path(entry["files"]["weights"]).read_text())
    trees = [gbdt.Tree.model_validate(t) for t in body["trees"]]
    X = np.concatenate([p.rows("local", meta["features"], "test", 0.3)[0] for p in platforms])
    y = np.concatenate([p.rows("local", meta["features"], "test", 0.3)[1] for p in platforms])
    margin = gbdt.model_margin(gbdt.bin_rows(X, body["edges"]), body["base_margin"], trees, 3)
    from sklearn.metrics import roc_auc_score

    assert abs(roc_auc_score(y, margin) - entry["auc"]) < 0.002


def test_secure_boosting_grows_the_plain_trees(boosted: dict[bool, dict[str, Any]]) -> None:
    """Secure sums differ from plain ones by at most P * 2**-(f+1) per entry (about 3e-11
    for gradients); the splits are the same and leaf values agree far below that."""
    secure, plain = (boosted[s]["models"]["gbdt"]["local"] for s in (True, False))
    assert secure["secure_aggregation"] is True and plain["secure_aggregation"] is False
    # Only the sums reach the coordinator: no per-platform histograms.
    assert secure["per_platform"] == {} and set(plain["per_platform"]) == set(realdata.PLATFORMS)
    bodies = [json.loads(Path(e["files"]["weights"]).read_text()) for e in (secure, plain)]
    # The sketch counts are exact; the grid they count on is centred and scaled by the
    # federated scaler, whose secure sums carry 2-limb rounding (below 1e-12 relative).
    for a, b in zip(bodies[0]["edges"], bodies[1]["edges"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert bodies[0]["base_margin"] == bodies[1]["base_margin"]
    for a, b in zip(bodies[0]["trees"], bodies[1]["trees"], strict=True):
        assert a["feature"] == b["feature"] and a["threshold"] == b["threshold"]
        np.testing.assert_allclose(a["value"], b["value"], rtol=0, atol=1e-9)
    assert secure["n"] == plain["n"] and secure["auc"] == plain["auc"]
    assert secure["history"] == plain["history"]


class _FailsFromTree:
    """A Flower mod: one platform fails every level message from (tree, level) on."""

    def __init__(self, partition: int, tree: int, level: int) -> None:
        self.partition, self.at = partition, (tree, level)

    def __call__(self, msg: Message, context, call_next):  # type: ignore[no-untyped-def]
        if (
            context.node_config.get("partition-id") == self.partition
            and msg.metadata.message_type == "query.gbdt_level"
        ):
            req = gbdt.LevelRequest.from_content(msg.content, "test")
            if (req.tree, req.level) >= self.at:
                return Message(Error(2, "gbdt_level failed: out of memory"), reply_to=msg)
        return call_next(msg, context)


def test_a_dropout_mid_tree_grows_that_tree_again_over_the_rest(
    uci_ledgers: list[str],
    uci_enrolment: Enrolment,
    boosted: dict[bool, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """platform-c fails at level 1 of tree 2: level 1 is re-run over the other two, then the
    tree is grown again from level 0 (its root sums covered three platforms); the earlier
    trees stay, every later sum covers the two platforms left."""
    from protocols import secure_sum as ss

    grid = InProcessGrid(_app(uci_ledgers, uci_enrolment, [_FailsFromTree(2, 2, 1)]), 3)
    summary = run_federation(grid, _settings(tmp_path, **{"gbdt-trees": 4}))
    assert summary["status"] == "ok", summary.get("error")
    entry = summary["models"]["gbdt"]["local"]
    assert list(entry["dropped"]) == ["platform-c"] and "out of memory" in str(entry["dropped"])
    details = {p["platform"]: p for p in summary["platform_details"]}
    assert entry["n"] == details["platform-a"]["test_rows"] + details["platform-b"]["test_rows"]
    attempts = {}
    for msg in grid.sent:
        spec = ss.spec_of(msg.content, msg.metadata.message_type)
        if spec is not None and "/tree/2" in spec.round_id:
            attempts.setdefault(spec.round_id, set()).add(spec.participants)
    assert {len(p) for p in attempts["gbdt-local/tree/2/level/1"]} == {2, 3}  # re-run
    assert attempts["gbdt-local/tree/2/level/0"] == {tuple(realdata.PLATFORMS)}
    assert attempts["gbdt-local/tree/2/restart/1/level/0"] == {realdata.PLATFORMS[:2]}
    # The two trees grown before the drop are the full run's.
    trees = json.loads(Path(entry["files"]["weights"]).read_text())["trees"]
    full = boosted[True]["models"]["gbdt"]["local"]["files"]["weights"]
    assert trees[:2] == json.loads(Path(full).read_text())["trees"][:2]
    assert len(trees) == 4
    meta = json.loads(Path(entry["files"]["metadata"]).read_text())
    assert meta["dropped_platforms"] == entry["dropped"] and meta["secure_aggregation"] is True
    assert meta["trees_regrown_after_dropout"] == 1


def test_a_negative_summed_hessian_stops_the_secure_run(
    uci_ledgers: list[str],
    uci_enrolment: Enrolment,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bureau cannot check one platform's masked histograms, so it checks the sums."""
    honest = gbdt.node_sums

    def lying(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        out = honest(*args, **kwargs)
        return {**out, "hess": -out["hess"]}

    monkeypatch.setattr(gbdt, "node_sums", lying)
    grid = InProcessGrid(_app(uci_ledgers, uci_enrolment), 3)
    with pytest.raises(FederationError, match="negative summed hess"):
        run_federation(grid, _settings(tmp_path, **{"gbdt-trees": 1}))


def test_level_zero_asked_again_needs_the_same_previous_tree(
    uci_ledgers: list[str], uci_enrolment: Enrolment, tmp_path: Path
) -> None:
    """A re-run of level 0 keeps the platform's scores; a different previous tree is refused."""
    grid = InProcessGrid(_app(uci_ledgers, uci_enrolment), 3)
    run_federation(grid, _settings(tmp_path, **{"gbdt-trees": 2, "secure-aggregation": False}))
    last = next(
        msg
        for msg in reversed(grid.sent)
        if msg.metadata.message_type == "query.gbdt_level"
        and gbdt.LevelRequest.from_content(msg.content, "t").level == 0
    )
    request = gbdt.LevelRequest.from_content(last.content, "t")
    node = last.metadata.dst_node_id
    context = grid.contexts[node]

    def ask(req: gbdt.LevelRequest) -> Message:
        msg = Message(req.to_content(), dst_node_id=node, message_type="query.gbdt_level")
        return grid.client_app(msg, context)

    again = ask(request)
    assert not again.has_error(), again.error.reason if again.has_error() else ""
    other = request.previous.model_copy(update={"value": [v + 0.5 for v in request.previous.value]})
    refused = ask(request.model_copy(update={"previous": other}))
    assert refused.has_error() and "different previous tree" in refused.error.reason


def test_boosting_needs_only_node_state_between_messages(
    uci_ledgers: list[str], uci_enrolment: Enrolment, tmp_path: Path
) -> None:
    """A SuperNode may run every message in a fresh process: with every in-process cache
    dropped before each message, the model is the same."""
    from clients import boosting

    def fresh_process(msg, context, call_next):  # type: ignore[no-untyped-def]
        boosting._binned.clear()
        boosting._routes.clear()
        boosting._gradients.clear()
        return call_next(msg, context)

    runs = []
    for mods in ([], [fresh_process]):
        grid = InProcessGrid(_app(uci_ledgers, uci_enrolment, mods), 3)
        settings = _settings(tmp_path / str(len(mods)), **{"gbdt-trees": 3})
        runs.append(run_federation(grid, settings)["models"]["gbdt"]["local"])
    assert runs[0]["history"] == runs[1]["history"]
    trees = [json.loads(Path(r["files"]["weights"]).read_text())["trees"] for r in runs]
    assert trees[0] == trees[1]


@pytest.mark.slow
def test_realdata_bench_on_a_uci_subsample(uci_subsample: Path) -> None:
    result = realdata.run(uci_subsample, UCI_MAPPING, "skewed", "gbdt,lr", rounds=3, boost=SMALL)
    rows = result["rows"]
    sizes = np.array([rows[p]["train"] + rows[p]["test"] for p in realdata.PLATFORMS])
    assert np.allclose(sizes / sizes.sum(), realdata.SKEWED_SIZES, atol=0.03)
    rates = [rows[p]["default_rate"] for p in realdata.PLATFORMS]
    assert rates[0] < rates[1] < rates[2]  # the small platform is the riskiest
    for kind in ("gbdt", "lr"):
        entry = result["models"][kind]
        assert entry["gap"] == pytest.approx(
            entry["centralized_auc"] - entry["federated_auc"], abs=1e-4
        )
    assert abs(result["models"]["gbdt"]["gap"]) < 0.01
    assert result["best_centralized_auc"] >= result["sklearn_logistic_regression"]["auc"]
    assert set(result["local_only"]) == set(realdata.PLATFORMS)
    cost = result["boosting_round_seconds"]
    assert cost["federated"] > 0 and cost["pooled_histgradientboosting"] > 0
    assert cost["secure_aggregation"] is True and cost["federated_without_secure_aggregation"] > 0
    # Per-platform federated AUCs come from the saved models, scored on each platform's rows.
    for platform in realdata.PLATFORMS:
        scored = result["local_only"][platform]["federated_auc"]
        assert set(scored) == {"gbdt", "lr"}
        # The saved models are scored on the inputs they were trained on (robust features,
        # then the scaler): near the overall held-out AUC, not a constant score's 0.5.
        for kind in ("gbdt", "lr"):
            assert abs(scored[kind] - result["models"][kind]["federated_auc"]) < 0.1, kind
    assert cost["federated_first_tree"] > 0


# -- through Flower's runtime ------------------------------------------------------------------


@pytest.mark.slow
def test_boosting_on_the_simulation_engine(
    uci_ledgers: list[str], uci_enrolment: Enrolment, tmp_path: Path
) -> None:
    """Through Flower's runtime, with secure aggregation (the default): every sum masked."""
    from flwr.simulation import run_simulation

    from server.app import build_server_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = tmp_path / "run"
    overrides = {
        **{k: v for k, v in _settings(out).as_run_config().items()},
        "gbdt-trees": 4,
    }
    run_simulation(
        server_app=build_server_app(overrides),
        client_app=_app(uci_ledgers, uci_enrolment),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    summary = json.loads((out / "federation.json").read_text())
    assert summary["status"] == "ok", summary.get("error")
    entry = summary["models"]["gbdt"]["local"]
    assert entry["auc"] > 0.70 and len(entry["history"]) == 4
    assert entry["secure_aggregation"] is True and entry["per_platform"] == {}
    assert "dropped" not in entry
    assert (out / "model-gbdt-local.trees.json").exists()


def test_realdata_cli_refuses_bad_arguments(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cases = [
        (["--mapping", str(UCI_MAPPING)], "needs --csv"),
        (["--csv", str(tmp_path / "none.csv"), "--mapping", str(UCI_MAPPING)], "no such file"),
        (["--csv", str(UCI_MAPPING), "--mapping", str(UCI_MAPPING), "--model", "svm"], "model"),
    ]
    for extra, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "fedcredit", "bench", "realdata", *extra, "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_skewed_split_sizes_and_default_rates() -> None:
    labels = (np.random.default_rng(3).random(20_000) < 0.2).astype(np.int64)
    platform = realdata.assign_platforms(labels, "skewed", 0)
    sizes = np.bincount(platform, minlength=3) / len(labels)
    assert np.allclose(sizes, realdata.SKEWED_SIZES, atol=0.01)
    bad = np.bincount(platform[labels == 1], minlength=3) / labels.sum()
    assert np.allclose(bad, realdata.SKEWED_DEFAULTERS, atol=0.02)
    even = np.bincount(realdata.assign_platforms(labels, "random", 0), minlength=3)
    assert even.max() - even.min() <= 1
