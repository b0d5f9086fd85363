"""Federated histogram gradient boosting: what the bureau and the platforms share.

The horizontal SecureBoost family (FATE's homo-SecureBoost, XGBoost's histogram method):
every platform holds whole rows of its own borrowers, and a tree is grown from sums only.

1. **Bin edges, agreed federatedly.** Each platform counts its training rows per feature over
   one fine common grid (``SKETCH_CELLS`` cells, linear near the grid's centre and
   logarithmic beyond, so heavy tails keep resolution where the mass is); the bureau adds the
   counts. A first grid is centred on the federated mean; a second on the median read off
   the first sum, scaled by its quartiles; the bureau reads at most ``bins - 1`` quantile
   edges per feature off the second sum. Counts are sums, so they can be protected like
   every other sum; no row, minimum or maximum leaves a platform.
2. **One message per tree level.** Each platform sends, per requested node, feature and bin
   (only the bins a feature has: ``CellLayout``), the summed gradient, hessian and row count
   of its rows (logistic loss). The bureau adds
   them, finds each node's best split, and asks next for the smaller child of every split
   only (the sibling is the parent minus it: half the traffic). The last level's leaf values
   come from the split sums, so a tree of depth ``D`` costs ``D`` round trips; the finished
   tree travels with the next tree's first message.
3. Every platform keeps its running scores in Flower's node state; a message that does not
   follow on from that state (wrong session, a tree skipped) is refused.

The tree layout is a complete binary heap of depth ``depth``: node ``i`` has children
``2i + 1`` (bin <= threshold) and ``2i + 2``; ``feature == -1`` marks a leaf.

Everything here is numpy, with the inner loops compiled (``gbdt_kernels``); the pooled
yardstick (scikit-learn's HistGradientBoosting on the same bins) is ``pooled_fit`` and
imports scikit-learn only when called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Self

import numpy as np
from flwr.app import Array, ArrayRecord
from pydantic import Field, model_validator

from protocols.messages import MAX_FEATURES, FeatureName, Payload, ProtocolError

SKETCH_CELLS = 2048
# Relative gain difference below which two candidate splits count as tied (``best_split``);
# far above the secure sums' rounding (about 1e-12 relative), far below real differences.
TIE_TOLERANCE = 1e-9
# The grid is linear within 1/SKETCH_GAIN of a scale unit around its centre and logarithmic
# beyond (about 2 % relative steps), out to a hundred million scale units: heavy tails keep
# resolution wherever the mass is.
SKETCH_GAIN = 100.0
SKETCH_RANGE = math.asinh(SKETCH_GAIN * 1e6)
MAX_BINS = 255
MAX_DEPTH = 8
L2 = 1.0  # ridge on leaf values (XGBoost's lambda)
MIN_CHILD_ROWS = 20  # scikit-learn's min_samples_leaf default
MIN_CHILD_HESSIAN = 1e-3
SESSION = r"^[0-9a-f]{32}$"


# -- bin edges --------------------------------------------------------------------------------


def _cell_width() -> float:
    return 2 * SKETCH_RANGE / SKETCH_CELLS


def sketch_counts(X: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Row counts per (feature, grid cell): the platform's contribution to the bin edges."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(centre):
        raise ValueError("rows do not match the feature list")
    u = np.arcsinh(SKETCH_GAIN * (np.nan_to_num(X) - centre) / scale)
    cells = np.clip(np.floor((u + SKETCH_RANGE) / _cell_width()), 0, SKETCH_CELLS - 1)
    flat = cells.astype(np.int64) + np.arange(X.shape[1]) * SKETCH_CELLS
    counts = np.bincount(flat.ravel(), minlength=X.shape[1] * SKETCH_CELLS)
    return counts.reshape(X.shape[1], SKETCH_CELLS).astype(np.float64)


def _cell_upper(cells: np.ndarray, centre: float, scale: float) -> np.ndarray:
    """The value at the upper boundary of each grid cell."""
    u = -SKETCH_RANGE + (np.asarray(cells) + 1) * _cell_width()
    return centre + scale * np.sinh(u) / SKETCH_GAIN


def _quantile_cells(row: np.ndarray, shares: np.ndarray) -> np.ndarray:
    cum = np.cumsum(row)
    return np.searchsorted(cum, cum[-1] * shares, side="left")


def recentre(
    counts: np.ndarray, centre: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust scale (IQR / 1.349) per feature, read off a first sketch.

    The second sketch is centred there, so a skewed feature whose mean sits far out in its
    tail (money) gets its finest cells where its borrowers are. A feature whose quartiles
    coincide (a rare flag) keeps its first scale.
    """
    new_centre, new_scale = centre.astype(np.float64).copy(), scale.astype(np.float64).copy()
    for f in range(counts.shape[0]):
        row = np.clip(counts[f], 0, None)
        if row.sum() <= 0:
            continue
        q25, q50, q75 = _cell_upper(
            _quantile_cells(row, np.array([0.25, 0.5, 0.75])), centre[f], scale[f]
        )
        new_centre[f] = q50
        if q75 - q25 > 0 and math.isfinite(q75 - q25):
            new_scale[f] = (q75 - q25) / 1.349
    return new_centre, new_scale


def edges_from_counts(
    counts: np.ndarray, centre: np.ndarray, scale: np.ndarray, max_bins: int
) -> list[list[float]]:
    """At most ``max_bins - 1`` increasing edges per feature from the summed cell counts.

    A feature with few distinct cells (a flag, a small count) gets an edge between every
    pair of occupied cells, as scikit-learn does for features with few distinct values;
    otherwise edges sit at the upper boundary of the cell where each quantile falls.
    """
    out: list[list[float]] = []
    for f in range(counts.shape[0]):
        row = np.clip(counts[f], 0, None)
        occupied = np.flatnonzero(row > 0.5)
        if len(occupied) <= 1:
            out.append([])
            continue
        if len(occupied) <= max_bins:
            cells = occupied[:-1]
        else:
            cells = np.unique(_quantile_cells(row, np.arange(1, max_bins) / max_bins))
            cells = cells[cells < occupied[-1]]
        values = _cell_upper(cells, centre[f], scale[f])
        out.append(sorted({float(v) for v in values if math.isfinite(v)}))
    return out


def bin_rows(X: np.ndarray, edges: list[list[float]]) -> np.ndarray:
    """Bin index per (row, feature): the number of the feature's edges at or below the value."""
    X = np.nan_to_num(np.asarray(X, dtype=np.float64))
    out = np.empty(X.shape, dtype=np.int32)
    for f, e in enumerate(edges):
        out[:, f] = np.searchsorted(np.asarray(e, dtype=np.float64), X[:, f], side="right")
    return out


def small_bins(binned: np.ndarray) -> np.ndarray:
    """The bins as ``uint8`` when they fit (always, below ``MAX_BINS``): a platform keeps
    them for a session and routes rows by gathering from them every level, and a quarter
    of the bytes stays in the processor's cache."""
    if binned.size and (int(binned.min()) < 0 or int(binned.max()) > 255):
        return binned
    return np.ascontiguousarray(binned, dtype=np.uint8)


def bins_needed(edges: list[list[float]]) -> int:
    return max([len(e) + 1 for e in edges] + [2])


# -- trees ------------------------------------------------------------------------------------


def heap_size(depth: int) -> int:
    return 2 ** (depth + 1) - 1


_HEAP_SIZES = frozenset(heap_size(d) for d in range(MAX_DEPTH + 1))
_NEVER = np.iinfo(np.int64).max  # a leaf's threshold in ``Tree.routing``: no bin exceeds it


class Tree(Payload):
    """One tree in heap layout: per node its feature (-1: leaf), bin threshold, leaf value."""

    feature: list[int] = Field(max_length=2 ** (MAX_DEPTH + 1) - 1)
    threshold: list[int] = Field(max_length=2 ** (MAX_DEPTH + 1) - 1)
    value: list[float] = Field(max_length=2 ** (MAX_DEPTH + 1) - 1)

    @model_validator(mode="after")
    def _shape(self) -> Self:
        # Built-in min/max/map over the lists: every level message carries one or two trees.
        n = len(self.feature)
        if not n == len(self.threshold) == len(self.value) or n not in _HEAP_SIZES:
            raise ValueError("feature, threshold and value must be one complete binary heap")
        if not all(map(math.isfinite, self.value)):
            raise ValueError("non-finite leaf value")
        last = (n - 1) // 2  # the first node of the last level: nodes from here have no children
        if max(self.feature[last:], default=-1) >= 0:
            i = last + next(i for i, f in enumerate(self.feature[last:]) if f >= 0)
            raise ValueError(f"node {i} splits but has no children in the heap")
        return self

    @cached_property
    def routing(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per heap node: the feature whose bin it reads (0 at a leaf), the threshold (at a
        leaf one no bin exceeds) and the child a row goes to when its bin is at most the
        threshold (a leaf keeps its rows; the right child is the next node).

        Shared by trees with the same splits (``_routing``): every level message parses the
        tree grown so far afresh, and it differs from the last one by a level at most."""
        return _routing(tuple(self.feature), tuple(self.threshold))

    @classmethod
    def empty(cls, depth: int) -> Tree:
        n = heap_size(depth)
        return cls(feature=[-1] * n, threshold=[0] * n, value=[0.0] * n)

    def check_against(self, n_features: int, bins: int) -> None:
        if min(self.feature) < -1 or max(self.feature) >= n_features:
            raise ProtocolError("a tree splits on a feature outside the feature list")
        if min(self.threshold) < 0 or max(self.threshold) >= bins:
            raise ProtocolError("a tree threshold is outside the bins")


@lru_cache(maxsize=64)
def _routing(
    feature: tuple[int, ...], threshold: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Tree.routing`` of one set of splits (read-only arrays, so they can be shared)."""
    features = np.asarray(feature, dtype=np.intp)
    internal = features >= 0
    node = np.arange(len(features), dtype=np.intp)
    column = np.where(internal, features, 0)
    thresholds = np.where(internal, np.asarray(threshold, dtype=np.int64), _NEVER)
    left = np.where(internal, 2 * node + 1, node)
    for a in (column, thresholds, left):
        a.flags.writeable = False
    return column, thresholds, left


def route(tree: Tree, binned: np.ndarray, levels: int | None = None) -> np.ndarray:
    """Heap node of every row after ``levels`` levels of splits (all levels by default)."""
    depth = int(math.log2(len(tree.feature) + 1)) - 1
    start = np.zeros(len(binned), dtype=np.intp)
    return advance(tree, binned, start, depth if levels is None else levels)


def advance(tree: Tree, binned: np.ndarray, node: np.ndarray, levels: int = 1) -> np.ndarray:
    """Rows at ``node`` ``levels`` levels further down ``tree`` (rows at a leaf stay)."""
    from protocols.gbdt_kernels import route_rows

    column, threshold, left = tree.routing
    # The compiled loop follows these indices unchecked (``gbdt_kernels``): a tree read from
    # anywhere but a validated request must still stay inside the rows' columns and heap.
    if len(node) != len(binned) or (
        len(node)
        and (
            int(column.max()) >= binned.shape[1]
            or not 0 <= int(node.min()) <= int(node.max()) < len(column)
        )
    ):
        raise ValueError("the tree or the rows' nodes do not fit these rows")
    return route_rows(
        np.ascontiguousarray(binned),
        np.ascontiguousarray(node, dtype=np.intp),
        column,
        threshold,
        left,
        levels,
    )


def same_splits(a: Tree, b: Tree, levels: int) -> bool:
    """Whether two trees split the same way over their first ``levels`` levels (so rows
    routed ``levels`` deep by one are where the other would put them)."""
    top = 2**levels - 1
    return (
        len(a.feature) == len(b.feature)
        and a.feature[:top] == b.feature[:top]
        and a.threshold[:top] == b.threshold[:top]
    )


def tree_output(tree: Tree, binned: np.ndarray) -> np.ndarray:
    return np.asarray(tree.value, dtype=np.float64)[route(tree, binned)]


def sigmoid(margin: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(margin, -35, 35)))


def logistic_loss_sum(margin: np.ndarray, y: np.ndarray) -> float:
    """Summed log-loss (a sum, so the bureau can add it across platforms)."""
    return float(np.sum(np.logaddexp(0.0, margin) - y * margin))


@dataclass(frozen=True)
class CellLayout:
    """The (feature, bin) cells that can hold rows: feature ``f`` has ``widths[f]`` bins.

    A level reply carries only these cells, feature after feature, not the whole (feature,
    ``bins``) grid: a feature's bin count is its number of edges plus one, and on UCI the 42
    features have 1 to 60 bins (1,026 cells where the grid has 2,520). Masks, secure sums,
    the query log's digests and the messages shrink with the cells; the bureau puts the sums
    back on the grid (``expand``) to find splits. Both sides derive the layout from the
    agreed edges, so it is public.
    """

    widths: tuple[int, ...]

    @classmethod
    def of(cls, edges: list[list[float]]) -> CellLayout:
        return cls(tuple(len(e) + 1 for e in edges))

    @classmethod
    def uniform(cls, features: int, bins: int) -> CellLayout:
        return cls((bins,) * features)

    @cached_property
    def cells(self) -> int:
        return sum(self.widths)

    @cached_property
    def bins(self) -> int:
        """Width of the dense grid (``bins_needed`` of the edges)."""
        return max([*self.widths, 2])

    def total(self, compact: np.ndarray) -> np.ndarray:
        """A node's total over its rows: the sum over feature 0's cells."""
        return compact[..., : self.widths[0]].sum(axis=-1)

    @cached_property
    def offsets(self) -> np.ndarray:
        """First cell of each feature (read-only; computed once per layout)."""
        offsets = np.concatenate([[0], np.cumsum(self.widths)[:-1]]).astype(np.int64)
        offsets.flags.writeable = False
        return offsets

    def expand(self, compact: np.ndarray) -> np.ndarray:
        """``(..., cells)`` -> ``(..., features, bins)``, zeros where a feature has no bin."""
        valid = np.arange(self.bins) < np.asarray(self.widths)[:, None]
        out = np.zeros((*compact.shape[:-1], len(self.widths), self.bins))
        out[..., valid] = compact
        return out


def node_sums(
    binned: np.ndarray,
    grad: np.ndarray,
    hess: np.ndarray,
    node_of_row: np.ndarray,
    nodes: list[int],
    layout: CellLayout,
) -> dict[str, np.ndarray]:
    """Summed gradient, hessian and row count per (requested node, cell of ``layout``).

    One compiled pass over the rows for the whole level (``gbdt_kernels.level_histograms``):
    every (row, feature) of the requested nodes' rows is touched once, with the three sums
    together. A one-bin feature (constant over the federation) holds all of a node's rows in
    its one cell: its sums are the node's totals, so the loop skips it.
    """
    from protocols.gbdt_kernels import level_histograms

    K, C = len(nodes), layout.cells
    if not len(binned) == len(grad) == len(hess) == len(node_of_row) or (
        binned.ndim != 2 or binned.shape[1] != len(layout.widths)
    ):
        raise ValueError("rows, gradients, nodes and the layout's features do not line up")
    top = max(int(node_of_row.max(initial=0)), *nodes) + 1
    slot_of = np.full(top, -1, dtype=np.intp)
    slot_of[nodes] = np.arange(K)
    widths = np.asarray(layout.widths)
    multi = np.flatnonzero(widths >= 2)
    sums, totals = level_histograms(
        np.ascontiguousarray(binned),
        np.ascontiguousarray(grad, dtype=np.float64),
        np.ascontiguousarray(hess, dtype=np.float64),
        np.ascontiguousarray(node_of_row, dtype=np.intp),
        slot_of,
        multi.astype(np.intp),
        np.ascontiguousarray(layout.offsets[multi]),
        K,
        C,
    )
    out = np.ascontiguousarray(sums.transpose(2, 0, 1))
    single = layout.offsets[widths == 1]
    if len(single):
        out[:, :, single] = totals.T[:, :, None]
    return {name: out[i] for i, name in enumerate(("grad", "hess", "count"))}


def node_histograms(
    binned: np.ndarray,
    grad: np.ndarray,
    hess: np.ndarray,
    node_of_row: np.ndarray,
    nodes: list[int],
    bins: int,
) -> dict[str, np.ndarray]:
    """``node_sums`` on the whole (node, feature, bin) grid, every feature ``bins`` wide."""
    layout = CellLayout.uniform(binned.shape[1], bins)
    sums = node_sums(binned, grad, hess, node_of_row, nodes, layout)
    return {name: layout.expand(value) for name, value in sums.items()}


@dataclass(frozen=True)
class Split:
    feature: int
    threshold: int
    gain: float
    left: tuple[float, float, float]  # (gradient, hessian, rows)
    right: tuple[float, float, float]


def leaf_value(grad: float, hess: float, learning_rate: float) -> float:
    return float(-learning_rate * grad / (hess + L2))


def best_split(
    grad: np.ndarray, hess: np.ndarray, count: np.ndarray, min_child_rows: int = MIN_CHILD_ROWS
) -> Split | None:
    """The split of one node with the largest loss reduction, from its (feature, bin) sums."""
    layout = CellLayout.uniform(*grad.shape)
    flat = (a.reshape(1, -1) for a in (grad, hess, count))
    return best_splits(*flat, layout, min_child_rows)[0]


def best_splits(
    grad: np.ndarray,
    hess: np.ndarray,
    count: np.ndarray,
    layout: CellLayout,
    min_child_rows: int = MIN_CHILD_ROWS,
) -> list[Split | None]:
    """``best_split`` of every node of a level at once, from its (node, cell) sums in
    ``layout`` (a compiled pass over the cells a feature has, not the grid:
    ``gbdt_kernels.level_splits``).

    A split of feature ``f`` at bin ``b`` sends bins ``<= b`` left; every cell but a
    feature's last is a candidate, in (feature, bin) order, so ties go to the same first
    (feature, bin) as on the whole grid. Gains within ``TIE_TOLERANCE`` of the best are
    ties and the first (feature, bin) wins: two features that part the rows the same way
    (a count and its indicator, say) tie exactly, and the rounding of a secure sum (or the
    order of a float sum) must not decide between them.
    """
    from protocols.gbdt_kernels import level_splits

    widths = np.asarray(layout.widths, dtype=np.intp)
    offsets = np.asarray(layout.offsets, dtype=np.intp)
    cells, gains, left, right = level_splits(
        *(np.ascontiguousarray(a, dtype=np.float64) for a in (grad, hess, count)),
        widths,
        offsets,
        float(min_child_rows),
        MIN_CHILD_HESSIAN,
        L2,
        TIE_TOLERANCE,
    )
    features = np.searchsorted(offsets, cells, side="right") - 1
    out: list[Split | None] = []
    for k, cell in enumerate(cells.tolist()):
        if cell < 0:
            out.append(None)
            continue
        f = int(features[k])
        out.append(
            Split(
                f,
                cell - int(offsets[f]),
                float(gains[k]),
                tuple(left[k].tolist()),  # type: ignore[arg-type]
                tuple(right[k].tolist()),  # type: ignore[arg-type]
            )
        )
    return out


# -- messages ---------------------------------------------------------------------------------


class _BoostSpec(Payload):
    feature_set: str = Field(pattern=r"^(local|cross)$")
    features: list[FeatureName] = Field(min_length=1, max_length=MAX_FEATURES)
    test_share: float = Field(gt=0.0, lt=1.0)


class SketchRequest(_BoostSpec):
    """``query.gbdt_sketch``: count training rows over the common grid (and the labels).

    Sent twice: centred on the federated mean and scaled by the standard deviation, then
    centred on the median and scaled by the quartiles read off the first sum.
    """

    centre: list[float]
    scale: list[float]

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.features) == len(self.centre) == len(self.scale):
            raise ValueError("features, centre and scale differ in length")
        if not all(math.isfinite(v) for v in self.centre) or not all(
            math.isfinite(s) and s > 0 for s in self.scale
        ):
            raise ValueError("grid centre and scale must be finite, scales positive")
        return self


class _Model(_BoostSpec):
    session_id: str = Field(pattern=SESSION)
    # Sent once per session (and with the whole model): the platform keeps them in its state.
    edges: list[list[float]] | None = Field(default=None, max_length=MAX_FEATURES)
    bins: int = Field(ge=2, le=MAX_BINS)
    base_margin: float = Field(ge=-30.0, le=30.0)
    depth: int = Field(ge=1, le=MAX_DEPTH)

    @model_validator(mode="after")
    def _edges(self) -> Self:
        if self.edges is None:
            return self
        if len(self.edges) != len(self.features):
            raise ValueError("one edge list per feature is required")
        if bins_needed(self.edges) != self.bins:
            raise ValueError("bins does not match the edges")
        if max((len(e) for e in self.edges), default=0) > MAX_BINS - 1:
            raise ValueError(f"more than {MAX_BINS} bins for a feature")
        flat = np.array([v for e in self.edges for v in e], dtype=np.float64)
        ends = np.cumsum([len(e) for e in self.edges])[:-1]  # first edge of each next list
        rising = np.diff(flat) > 0
        rising[ends[(ends > 0) & (ends < len(flat))] - 1] = True  # across lists: not compared
        if not np.isfinite(flat).all() or not rising.all():
            raise ValueError("bin edges must be finite and strictly increasing")
        return self

    def _check_tree(self, tree: Tree, what: str) -> None:
        if len(tree.feature) != heap_size(self.depth):
            raise ValueError(f"{what} is not a tree of depth {self.depth}")
        try:
            tree.check_against(len(self.features), self.bins)
        except ProtocolError as exc:
            raise ValueError(f"{what}: {exc}") from exc


class LevelRequest(_Model):
    """``query.gbdt_level``: histograms of the listed nodes at one level of tree ``tree``.

    ``current`` holds the splits chosen so far in this tree; ``previous`` the finished tree
    before it (sent with level 0 of every tree but the first), which the platform adds to its
    running scores first.
    """

    tree: int = Field(ge=0, le=100_000)
    level: int = Field(ge=0, lt=MAX_DEPTH)
    nodes: list[int] = Field(min_length=1, max_length=2 ** (MAX_DEPTH - 1))
    current: Tree
    previous: Tree | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.level >= self.depth:
            raise ValueError("level beyond the tree depth")
        first, last = 2**self.level - 1, 2 ** (self.level + 1) - 2
        if any(not first <= n <= last for n in self.nodes) or len(set(self.nodes)) != len(
            self.nodes
        ):
            raise ValueError(f"nodes must be distinct nodes of level {self.level}")
        self._check_tree(self.current, "current")
        if (self.previous is None) != (self.level != 0 or self.tree == 0):
            raise ValueError("the previous tree travels with level 0 of every tree but the first")
        if (self.edges is None) == (self.tree == 0 and self.level == 0):
            raise ValueError("the bin edges travel with the first message of a session only")
        if self.previous is not None:
            self._check_tree(self.previous, "previous")
        return self


class EvaluateRequest(_Model):
    """``query.gbdt_evaluate``: score held-out and training rows with the whole model."""

    trees: list[Tree] = Field(max_length=100_000)

    @model_validator(mode="after")
    def _trees(self) -> Self:
        if self.edges is None:
            raise ValueError("the model's bin edges are missing")
        for i, tree in enumerate(self.trees):
            self._check_tree(tree, f"tree {i}")
        return self


def model_margin(
    binned: np.ndarray, base_margin: float, trees: list[Tree], depth: int
) -> np.ndarray:
    margin = np.full(len(binned), base_margin, dtype=np.float64)
    for tree in trees:
        margin += tree_output(tree, binned)
    return margin


# -- named arrays (the shape every per-platform sum takes) ----------------------------------

WIRE_STYPE = "fedcredit.f8le"  # raw little-endian float64: no pickle, no header to parse


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named float arrays as a Flower ArrayRecord of raw little-endian float64 bytes."""
    return ArrayRecord(
        {
            name: Array(
                dtype="<f8",
                shape=tuple(int(d) for d in np.shape(value)),
                stype=WIRE_STYPE,
                data=np.ascontiguousarray(value, dtype="<f8").tobytes(),
            )
            for name, value in arrays.items()
        }
    )


def arrays_from_record(record: ArrayRecord, what: str) -> dict[str, np.ndarray]:
    """The inverse of ``arrays_to_record``; anything else is refused (ProtocolError)."""
    out = {}
    for name, array in record.items():
        if array.stype != WIRE_STYPE or array.dtype != "<f8":
            raise ProtocolError(f"{what}: {name} is not raw float64 ({array.stype}, {array.dtype})")
        shape = tuple(array.shape)
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ProtocolError(f"{what}: {name} has a malformed shape")
        if len(array.data) != 8 * math.prod(shape):
            raise ProtocolError(f"{what}: {name} holds {len(array.data)} bytes for shape {shape}")
        out[name] = np.frombuffer(array.data, dtype="<f8").reshape(shape)
    return out


def check_named_arrays(
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    non_negative: tuple[str, ...] = (),
    what: str = "reply",
) -> dict[str, np.ndarray]:
    """Exactly the expected names and shapes, finite float values; else ProtocolError."""
    if set(arrays) != set(expected):
        raise ProtocolError(
            f"{what}: arrays {sorted(arrays)} where {sorted(expected)} were expected"
        )
    out = {}
    for name, shape in expected.items():
        value = np.asarray(arrays[name])
        if value.shape != shape or value.dtype.kind not in "fiu":
            raise ProtocolError(f"{what}: {name} has shape {value.shape}, expected {shape}")
        value = value.astype(np.float64)
        if not np.isfinite(value).all():
            raise ProtocolError(f"{what}: {name} holds non-finite values")
        if name in non_negative and (value < 0).any():
            raise ProtocolError(f"{what}: {name} holds negative sums")
        out[name] = value
    return out


# -- the pooled yardstick ---------------------------------------------------------------------


@dataclass(frozen=True)
class BoostParams:
    trees: int = 100
    depth: int = 5
    learning_rate: float = 0.1
    bins: int = 64

    def as_dict(self) -> dict[str, Any]:
        return {
            "trees": self.trees,
            "depth": self.depth,
            "learning_rate": self.learning_rate,
            "bins": self.bins,
            "l2": L2,
            "min_child_rows": MIN_CHILD_ROWS,
        }


def pooled_edges(X: np.ndarray, bins: int) -> list[list[float]]:
    """The edges the federation would agree on, computed from pooled rows (same sums)."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    centre, scale = recentre(sketch_counts(X, mean, std), mean, std)
    return edges_from_counts(sketch_counts(X, centre, scale), centre, scale, bins)


def pooled_fit(
    X_train: np.ndarray,
    y_train: np.ndarray,
    params: BoostParams,
    edges: list[list[float]] | None = None,
) -> tuple[Any, list[list[float]], float]:
    """scikit-learn's HistGradientBoostingClassifier on the same bins and tree shape.

    The rows are binned with the federation's edges first, so scikit-learn sees each bin as
    one distinct value (fewer than its 255 bins) and splits on exactly the same thresholds.
    Same depth, learning rate, number of trees, L2 and minimum leaf size; no early stopping.
    Returns the model, the edges and the seconds per boosting round.
    """
    import time

    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    edges = edges if edges is not None else pooled_edges(X_train, params.bins)
    model = HistGradientBoostingClassifier(
        learning_rate=params.learning_rate,
        max_iter=params.trees,
        max_depth=params.depth,
        max_leaf_nodes=2**params.depth,
        min_samples_leaf=MIN_CHILD_ROWS,
        l2_regularization=L2,
        max_bins=MAX_BINS,
        early_stopping=False,
        random_state=0,
    )
    binned = bin_rows(X_train, edges)
    # One thread, like each platform's numpy work: on a shared machine OpenMP threads that
    # wait for busy cores made a round 10-50x slower and its time meaningless.
    with threadpool_limits(limits=1):
        t = time.perf_counter()
        model.fit(binned, y_train)
        seconds = (time.perf_counter() - t) / max(model.n_iter_, 1)
    return model, edges, seconds


def pooled_scores(model: Any, X: np.ndarray, edges: list[list[float]]) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return model.predict_proba(bin_rows(X, edges))[:, 1]
