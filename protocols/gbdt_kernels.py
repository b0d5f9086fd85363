"""Compiled inner loops of federated boosting (numba): a level's histograms and row routing.

Why compiled: a platform answers one level message per tree level, and what it computes
there is what the pooled yardstick (scikit-learn's HistGradientBoosting, in Cython) computes
for the same rows: a histogram of gradient, hessian and row count per (node, feature, bin).
In numpy or scipy that takes gathers, index arithmetic and a sparse matrix per level, about
twice the compiled loop's time on UCI and the larger part of a platform's answer; a loop
over the rows that touches each (row, feature) cell once does not. Routing every row one
level down a tree is the same story at a smaller scale (four gathers in numpy).

numba rather than scikit-learn's own ``HistogramBuilder``: that class is private API, keeps
float32 gradients, wants the rows of each node as an index list and fills the whole
(feature, 256-bin) grid per node; measured on UCI it was no faster than the sparse product.

Compiled on first use and cached on disk (``compiled``), so a fresh process (a SuperNode
runs every message in one) loads the machine code instead of compiling it again.

Compiled code does not check indices, so every index these loops follow is checked before
it gets here: a tree from the bureau is a complete heap whose features and thresholds lie
within the session's features and bins (``gbdt.Tree``, ``LevelRequest``/``EvaluateRequest``
validation), asked nodes lie in their level, and a row's bin of a feature is at most the
feature's edge count (``gbdt.bin_rows``), so ``offsets[j] + bin`` stays inside the layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

log = logging.getLogger(__name__)


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled, with its machine code cached on disk where numba finds a writable
    place (beside this file, else ``NUMBA_CACHE_DIR`` or the user's cache folder).

    A node installed read-only and without a writable home has none: numba then refuses
    ``cache=True`` outright, which would stop every boosting message. Such a node compiles
    once per process instead (about a second for each loop), and says so.
    """
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        log.warning("%s: compiled per process, not cached (%s)", fn.__name__, exc)
        return njit(nogil=True)(fn)


@compiled
def level_histograms(
    binned: np.ndarray,
    grad: np.ndarray,
    hess: np.ndarray,
    node_of_row: np.ndarray,
    slot_of_node: np.ndarray,
    features: np.ndarray,
    offsets: np.ndarray,
    slots: int,
    cells: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(slots, cells, 3) sums of (gradient, hessian, 1) per cell of ``features`` (cell
    ``offsets[j] + bin`` of feature ``features[j]``), and the (slots, 3) totals, over the
    rows whose heap node has a slot (``slot_of_node[node] >= 0``)."""
    out = np.zeros((slots, cells, 3))
    totals = np.zeros((slots, 3))
    for r in range(binned.shape[0]):
        node = node_of_row[r]
        if node >= slot_of_node.shape[0]:
            continue
        s = slot_of_node[node]
        if s < 0:
            continue
        g = grad[r]
        h = hess[r]
        totals[s, 0] += g
        totals[s, 1] += h
        totals[s, 2] += 1.0
        for j in range(features.shape[0]):
            c = offsets[j] + binned[r, features[j]]
            out[s, c, 0] += g
            out[s, c, 1] += h
            out[s, c, 2] += 1.0
    return out, totals


@compiled
def route_rows(
    binned: np.ndarray,
    node_of_row: np.ndarray,
    column: np.ndarray,
    threshold: np.ndarray,
    left: np.ndarray,
    levels: int,
) -> np.ndarray:
    """Every row ``levels`` levels further down (rows at a leaf stay): a node sends a row to
    ``left[node]`` when its bin of ``column[node]`` is at most ``threshold[node]``, else to
    the next node (``Tree.routing``)."""
    out = np.empty(node_of_row.shape[0], dtype=np.intp)
    for r in range(node_of_row.shape[0]):
        node = node_of_row[r]
        for _ in range(levels):
            node = left[node] + (1 if binned[r, column[node]] > threshold[node] else 0)
        out[r] = node
    return out


@compiled
def level_splits(
    grad: np.ndarray,
    hess: np.ndarray,
    count: np.ndarray,
    widths: np.ndarray,
    offsets: np.ndarray,
    min_child_rows: float,
    min_child_hessian: float,
    l2: float,
    tie_tolerance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per node (row of the (nodes, cells) sums): the chosen cell (-1: no split), its gain
    and the (gradient, hessian, rows) sums of its left and right children.

    Two passes over a node's cells: the largest gain, then the first (feature, bin) whose
    gain is within ``tie_tolerance`` of it (``gbdt.best_splits`` says why ties go first).
    A feature's last bin is never a candidate (nothing would go right).
    """
    nodes = grad.shape[0]
    cell = np.full(nodes, -1, dtype=np.intp)
    gain_of = np.full(nodes, -np.inf)
    left = np.zeros((nodes, 3))
    right = np.zeros((nodes, 3))
    for k in range(nodes):
        G = 0.0
        H = 0.0
        N = 0.0
        for c in range(widths[0]):
            G += grad[k, c]
            H += hess[k, c]
            N += count[k, c]
        parent = G * G / (H + l2)
        best = -np.inf
        for sweep in range(2):
            floor = best - tie_tolerance * abs(best)
            found = False
            for f in range(widths.shape[0]):
                gl = 0.0
                hl = 0.0
                cl = 0.0
                for b in range(widths[f] - 1):
                    c = offsets[f] + b
                    gl += grad[k, c]
                    hl += hess[k, c]
                    cl += count[k, c]
                    gr = G - gl
                    hr = H - hl
                    cr = N - cl
                    if cl < min_child_rows or cr < min_child_rows:
                        continue
                    if hl < min_child_hessian or hr < min_child_hessian:
                        continue
                    gain = gl * gl / (hl + l2) + gr * gr / (hr + l2) - parent
                    if sweep == 0:
                        if gain > best:
                            best = gain
                    elif gain >= floor:
                        cell[k] = c
                        gain_of[k] = gain
                        left[k, 0], left[k, 1], left[k, 2] = gl, hl, cl
                        right[k, 0], right[k, 1], right[k, 2] = gr, hr, cr
                        found = True
                        break
                if found:
                    break
            if sweep == 0 and not (best > 1e-12 and best < np.inf):
                break
    return cell, gain_of, left, right
