"""A platform's side of federated gradient boosting: it sends sums, never rows or scores.

Three messages (``protocols.gbdt``): ``query.gbdt_sketch`` (row counts over the common grid,
for the bin edges, and the label count, for the starting score), ``query.gbdt_level``
(summed gradient, hessian and row count per node and cell: each feature's own bins) and
``query.gbdt_evaluate`` (score histograms of the finished model, like ``evaluate``).

The running scores of the platform's training and held-out rows live in Flower's node state
(``BOOST_STATE``), so a node that runs each message in a fresh process keeps them; each level
message must follow on from that state (same session, the next tree), or it is refused.
Every per-platform sum leaves through ``_reply``: when the request carries a secure-sum spec
(``secure-aggregation``, the default) the sums leave as one masked vector
(``clients.secure_sum.secure_reply``: same checks, pinned keys and query log as training);
otherwise as named arrays. Level 0 of a tree may be asked again (a dropout re-runs it over the
remaining platforms): the platform then keeps its scores and requires the same previous tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.platform_data import PlatformData
from clients.secure_sum import requested_spec, secure_reply
from protocols import gbdt
from protocols import messages as m
from protocols.metrics import ScoreHistogram

BOOST_STATE = "fedcredit.gbdt"
SUMS_KEY = "sums"


def _reply(
    msg: Message, arrays: dict[str, np.ndarray], ctx: Context, data: PlatformData, what: str
) -> RecordDict:
    """The sums, masked when the request asks for a secure sum, else as named arrays."""
    spec = requested_spec(msg.content, what)
    if spec is not None:
        return secure_reply(spec, arrays, ctx, data, what)
    return RecordDict({SUMS_KEY: gbdt.arrays_to_record(arrays)})


def _rows(
    req: gbdt._BoostSpec, ctx: Context, data: PlatformData, split: str
) -> tuple[np.ndarray, np.ndarray]:
    from clients.app import _delivered_totals

    return data.rows(req.feature_set, req.features, split, req.test_share, _delivered_totals(ctx))


def sketch(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    req = gbdt.SketchRequest.from_content(msg.content, "query.gbdt_sketch")
    X, y = _rows(req, ctx, data, "train")
    counts = gbdt.sketch_counts(X, np.asarray(req.centre), np.asarray(req.scale))
    sums = {"counts": counts, "labels": np.array([float(len(y)), float(y.sum())])}
    return _reply(msg, sums, ctx, data, "query.gbdt_sketch")


@lru_cache(maxsize=16)
def _layout_of(edge_counts: bytes) -> gbdt.CellLayout:
    """The session's cell layout from the edge counts in its node state (once per session)."""
    counts = np.frombuffer(edge_counts, dtype="<i8")
    return gbdt.CellLayout(tuple(int(c) + 1 for c in counts))


def _state(ctx: Context) -> ConfigRecord | None:
    return m.config_record(ctx.state, BOOST_STATE)


def _edges_to_state(edges: list[list[float]]) -> dict[str, bytes | int]:
    flat = np.array([v for e in edges for v in e], dtype="<f8")
    return {
        "edges": flat.tobytes(),
        "edge-counts": np.array([len(e) for e in edges], "<i8").tobytes(),
        "bins": gbdt.bins_needed(edges),
    }


def _edges_from_state(state: ConfigRecord) -> list[list[float]]:
    flat = np.frombuffer(state["edges"], dtype="<f8")  # type: ignore[arg-type]
    counts = np.frombuffer(state["edge-counts"], dtype="<i8")  # type: ignore[arg-type]
    return [part.tolist() for part in np.split(flat, np.cumsum(counts)[:-1])]


def _save_state(
    ctx: Context,
    session: str,
    trees: int,
    train: np.ndarray,
    test: np.ndarray,
    edges: dict[str, bytes | int],
    previous: str,
) -> None:
    ctx.state[BOOST_STATE] = ConfigRecord(
        {
            "session": session,
            "trees": trees,
            "previous": previous,
            "train": train.astype("<f8").tobytes(),
            "test": test.astype("<f8").tobytes(),
            **edges,
        }
    )


def _digest(tree: gbdt.Tree | None) -> str:
    """Names the tree last added to the running scores (empty before the first)."""
    if tree is None:
        return ""
    return hashlib.sha256(tree.model_dump_json().encode()).hexdigest()


_binned: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
# (location, session) -> (tree, level, heap node of every training row after ``level``
# levels, the tree those levels were read from)
_routes: dict[tuple[str, str], tuple[int, int, np.ndarray, gbdt.Tree]] = {}
# (location, session) -> (the state's training scores, labels, gradient, hessian)
_gradients: dict[tuple[str, str], tuple[bytes, np.ndarray, np.ndarray, np.ndarray]] = {}


def _binned_rows(
    req: gbdt._Model,
    ctx: Context,
    data: PlatformData,
    split: str,
    edges: Callable[[], list[list[float]]],
) -> tuple[np.ndarray, np.ndarray]:
    """(bins, labels) of the train or test rows for this session's edges.

    Cached in process memory for the session (a tree costs a few messages); a node that runs
    the next message in another process just reads the edges from its state and bins again.
    """
    key = (data.location, req.session_id, split)
    if key not in _binned:
        if len(_binned) >= 8:
            _binned.clear()
        X, y = _rows(req, ctx, data, split)
        _binned[key] = (gbdt.small_bins(gbdt.bin_rows(X, edges())), y)
    return _binned[key]


def _cached_route(
    req: gbdt.LevelRequest, data: PlatformData, tree: int, splits: gbdt.Tree
) -> tuple[int, np.ndarray] | None:
    """(levels, heap node per training row) this process last computed for ``tree`` of the
    session, if ``splits`` has the same splits over those levels (else None: route again)."""
    cached = _routes.get((data.location, req.session_id))
    if cached is None or cached[0] != tree or not gbdt.same_splits(cached[3], splits, cached[1]):
        return None
    return cached[1], cached[2]


def _route(req: gbdt.LevelRequest, data: PlatformData, binned: np.ndarray) -> np.ndarray:
    """Heap node of every training row at this level: one level on from the last message
    when this process answered it, else routed from the root."""
    cached = _cached_route(req, data, req.tree, req.current)
    if cached is not None and cached[0] == req.level - 1:
        node = gbdt.advance(req.current, binned, cached[1])
    else:
        node = gbdt.route(req.current, binned, req.level)
    if len(_routes) >= 8:
        _routes.clear()
    _routes[(data.location, req.session_id)] = (req.tree, req.level, node, req.current)
    return node


def _gradients_at(
    data: PlatformData, session: str, scores: bytes, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Logistic-loss gradient and hessian of the training rows at the node state's scores.

    They are the same at every level of a tree, so they are computed at its first level
    message and reused, keyed by the very bytes object the state holds the scores in (and
    the labels array): a state read afresh (another process, a new tree) computes them again.
    """
    key = (data.location, session)
    hit = _gradients.get(key)
    if hit is not None and hit[0] is scores and hit[1] is y:
        return hit[2], hit[3]
    p = gbdt.sigmoid(np.frombuffer(scores, dtype="<f8"))
    grad, hess = p - y, p * (1 - p)
    if len(_gradients) >= 8:
        _gradients.clear()
    _gradients[key] = (scores, y, grad, hess)
    return grad, hess


def _previous_output(req: gbdt.LevelRequest, data: PlatformData, binned: np.ndarray) -> np.ndarray:
    """The previous tree's leaf value for every training row: from where the rows were at
    that tree's last level message (when this process answered it), else from the root."""
    previous = req.previous
    assert previous is not None
    depth = int(np.log2(len(previous.feature) + 1)) - 1
    cached = _cached_route(req, data, req.tree - 1, previous)
    if cached is None:
        return gbdt.tree_output(previous, binned)
    levels, node = cached
    node = gbdt.advance(previous, binned, node, depth - levels)
    return np.asarray(previous.value, dtype=np.float64)[node]


def level(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    what = "query.gbdt_level"
    req = gbdt.LevelRequest.from_content(msg.content, what)
    state = _state(ctx)
    if req.level == 0 and req.tree == 0:
        first = req.edges
        assert first is not None  # validated: the first message carries them
        edges, edge_blob = (lambda: first), _edges_to_state(first)
        layout = gbdt.CellLayout.of(first)
        for split in ("train", "test"):
            _binned.pop((data.location, req.session_id, split), None)
    else:
        if state is None or state["session"] != req.session_id:
            raise m.ProtocolError(f"{what}: no boosting session {req.session_id} on this platform")
        edge_blob = {k: state[k] for k in ("edges", "edge-counts", "bins")}  # type: ignore[misc]
        counts = np.frombuffer(state["edge-counts"], dtype="<i8")  # type: ignore[arg-type]
        if len(counts) != len(req.features) or state["bins"] != req.bins:
            raise m.ProtocolError(f"{what}: features or bins differ from the session's")
        layout = _layout_of(state["edge-counts"])  # type: ignore[arg-type]
        saved = state
        edges = lambda: _edges_from_state(saved)  # noqa: E731 (read only on a cache miss)
    binned, y = _binned_rows(req, ctx, data, "train", edges)
    binned_test, y_test = _binned_rows(req, ctx, data, "test", edges)
    if req.level == 0 and req.tree == 0:
        train = np.full(len(y), req.base_margin)
        test = np.full(len(y_test), req.base_margin)
        trees = 0
    else:
        assert state is not None
        trees = int(state["trees"])  # type: ignore[arg-type]
        expected = req.tree - 1 if req.level == 0 else req.tree
        # Level 0 asked again (a re-run after a dropout): the scores already hold the
        # previous tree, which must be the same one.
        again = req.level == 0 and trees == req.tree and req.previous is not None
        if again and state.get("previous") != _digest(req.previous):
            raise m.ProtocolError(
                f"{what}: tree {req.tree} level 0 asked again with a different previous tree"
            )
        if trees != expected and not again:
            raise m.ProtocolError(
                f"{what}: tree {req.tree} level {req.level} does not follow on from the "
                f"{trees} tree(s) this platform holds"
            )
        saved_train, saved_test = state["train"], state["test"]
        if len(saved_train) != 8 * len(y) or len(saved_test) != 8 * len(y_test):  # type: ignore[arg-type]
            raise m.ProtocolError(f"{what}: this platform's rows changed during the session")
        if req.level == 0:
            train = np.frombuffer(saved_train, dtype="<f8").copy()  # type: ignore[arg-type]
            test = np.frombuffer(saved_test, dtype="<f8").copy()  # type: ignore[arg-type]
            if req.previous is not None and not again:
                train += _previous_output(req, data, binned)
                test += gbdt.tree_output(req.previous, binned_test)
                trees += 1
    if req.level == 0:  # a new tree: the scores moved on (or started)
        _save_state(ctx, req.session_id, trees, train, test, edge_blob, _digest(req.previous))
        state = _state(ctx)
    assert state is not None
    grad, hess = _gradients_at(data, req.session_id, state["train"], y)  # type: ignore[arg-type]
    node = _route(req, data, binned)
    sums = gbdt.node_sums(binned, grad, hess, node, req.nodes, layout)
    if req.level == 0:
        # The model so far on the held-out rows, as sums: the bureau's per-tree history.
        hist = ScoreHistogram.of(gbdt.sigmoid(test), y_test)
        sums.update(
            {
                "hist-pos": hist.positives.astype(np.float64),
                "hist-neg": hist.negatives.astype(np.float64),
                "test-loss": np.array([gbdt.logistic_loss_sum(test, y_test), float(len(y_test))]),
            }
        )
    return _reply(msg, sums, ctx, data, what)


def evaluate(msg: Message, ctx: Context, data: PlatformData) -> RecordDict:
    """The finished model's held-out and training-row score histograms (as ``evaluate``)."""
    what = "query.gbdt_evaluate"
    req = gbdt.EvaluateRequest.from_content(msg.content, what)
    spec = requested_spec(msg.content, what)
    out: dict[str, object] = {}
    sums: dict[str, np.ndarray] = {}
    for split, prefix in (("test", "hist"), ("train", "train-hist")):
        X, y = _rows(req, ctx, data, split)
        margin = gbdt.model_margin(
            gbdt.bin_rows(X, req.edges or []), req.base_margin, req.trees, req.depth
        )
        hist = ScoreHistogram.of(gbdt.sigmoid(margin), y)
        out[f"{prefix}-pos"] = hist.positives.tolist()
        out[f"{prefix}-neg"] = hist.negatives.tolist()
        sums[f"{prefix}-pos"], sums[f"{prefix}-neg"] = hist.positives, hist.negatives
        if split == "test":
            loss = gbdt.logistic_loss_sum(margin, y)
            out["num-examples"] = len(y)
            out["loss"] = loss / len(y) if len(y) else 0.0
            sums["n"], sums["loss"] = np.asarray(float(len(y))), np.asarray(loss)
    if spec is not None:  # the same figures as the secure ``evaluate`` reply, masked
        return secure_reply(spec, sums, ctx, data, what)
    return RecordDict({"metrics": MetricRecord(out)})  # type: ignore[arg-type]
