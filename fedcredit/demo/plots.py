"""The demo report's figures, drawn from the federation's summed score histograms.

Everything is read off ``ScoreHistogram`` sums, never off raw scores, because the sums are all
the bureau gets: what the plots show is exactly what the federation can know.

Figures are bare ``matplotlib.figure.Figure`` objects on an Agg canvas: no pyplot, no global
backend switch and no display, so the report renders on a headless server and does not disturb
other matplotlib users in the same process. The caller saves them (atomically).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from protocols.metrics import BINS, LOGIT_RANGE, ScoreHistogram

log = logging.getLogger(__name__)

# Report keys in the order a reader compares them, with names a credit-risk reader knows.
NAMES = {
    "centralized": "centralized (pooled raw data)",
    "centralized_local_features": "centralized, own-platform features",
    "federated_cross_platform": "federated + cross-platform totals",
    "federated": "federated, own features",
}
COLOURS = {
    "centralized": "0.35",
    "centralized_local_features": "0.6",
    "federated_cross_platform": "tab:blue",
    "federated": "tab:orange",
}
# 4000 fine bins are 0.006 log-odds wide: far too noisy to show as a density. 40 of them
# make a 0.24 log-odds bar, 100 bars over the whole range.
COARSEN = 40
PROBABILITY_TICKS = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 0.95)


def name_of(key: str) -> str:
    """Readable name of a histogram or report key ("local_only:p1" -> "local-only: p1")."""
    if key.startswith("local_only:"):
        return "local-only: " + key.split(":", 1)[1]
    return NAMES.get(key, key.replace("_", " "))


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _usable(histograms: Mapping[str, ScoreHistogram]) -> dict[str, ScoreHistogram]:
    """Histograms with both classes present, in reading order; the rest cannot have a ROC."""
    order = [k for k in NAMES if k in histograms]
    order += sorted(k for k in histograms if k not in NAMES)
    usable = {}
    for key in order:
        h = histograms[key]
        if h.positives.sum() > 0 and h.negatives.sum() > 0:
            usable[key] = h
        else:
            log.warning("histogram %r lacks defaulters or non-defaulters: left out of plots", key)
    return usable


def roc_figure(histograms: Mapping[str, ScoreHistogram]) -> Figure | None:
    """ROC curve of every histogram, AUC in the legend; None when none can be drawn."""
    usable = _usable(histograms)
    if not usable:
        return None
    fig = _figure(6.0, 5.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", c="0.5", lw=1, label="random (AUC 0.5)")
    locals_ = [k for k in usable if k.startswith("local_only:")]
    for key, h in usable.items():
        fpr, tpr = h.roc()
        local = key in locals_
        colour = f"C{2 + locals_.index(key) % 8}" if local else COLOURS.get(key)
        ax.plot(
            fpr,
            tpr,
            c=colour,
            lw=1.0 if local else 1.8,
            ls="--" if local else "-",
            label=f"{name_of(key)} (AUC {h.auc():.4f})",
        )
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.set_xlabel("false positive rate (non-defaulters flagged)")
    ax.set_ylabel("true positive rate (defaulters caught)")
    ax.set_title("ROC on held-out borrowers")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def scores_figure(histograms: Mapping[str, ScoreHistogram]) -> Figure | None:
    """Score densities of defaulters vs non-defaulters on the log-odds axis, one panel per
    federated model; the dotted line is the KS cut (where the two CDFs are furthest apart)."""
    usable = _usable(histograms)
    keys = [k for k in ("federated_cross_platform", "federated") if k in usable]
    if not keys:
        return None
    fig = _figure(7.0, 2.9 * len(keys))
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    width = 2 * LOGIT_RANGE / BINS * COARSEN
    edges = -LOGIT_RANGE + np.arange(BINS // COARSEN + 1) * width
    for ax, key in zip(axes, keys, strict=True):
        h = usable[key]
        pos = h.positives.reshape(-1, COARSEN).sum(axis=1)
        neg = h.negatives.reshape(-1, COARSEN).sum(axis=1)
        ax.stairs(
            neg / (neg.sum() * width),
            edges,
            fill=True,
            alpha=0.35,
            color="tab:green",
            label=f"non-defaulters ({int(neg.sum()):,})",
        )
        ax.stairs(
            pos / (pos.sum() * width),
            edges,
            lw=1.6,
            color="tab:red",
            label=f"defaulters ({int(pos.sum()):,})",
        )
        fpr, tpr = h.roc()
        cut = BINS - int(np.argmax(tpr - fpr))  # roc() runs from the highest bin down
        ax.axvline(
            -LOGIT_RANGE + cut * 2 * LOGIT_RANGE / BINS, ls=":", c="0.3", lw=1, label="KS cut"
        )
        lo = min(_quantile_edge(pos, edges, 0.002), _quantile_edge(neg, edges, 0.002))
        hi = max(_quantile_edge(pos, edges, 0.998), _quantile_edge(neg, edges, 0.998))
        lo, hi = lo - width, hi + width
        ax.set_xlim(lo, hi)
        ax.set_xlabel("score log-odds  ln(p / (1 - p))")
        ax.set_ylabel("density")
        ax.set_title(f"{name_of(key)}: KS {h.ks():.4f}, AUC {h.auc():.4f}", fontsize="medium")
        ax.legend(fontsize="small")
        top = ax.secondary_xaxis("top", functions=(_expit, _logit))
        ticks = [p for p in PROBABILITY_TICKS if lo <= float(_logit(np.array(p))) <= hi]
        top.set_xticks(ticks, [f"{p:g}" for p in ticks])
        top.set_xlabel("predicted default probability", fontsize="small")
    return fig


def calibration_figure(histograms: Mapping[str, ScoreHistogram]) -> Figure | None:
    """Reliability by score decile: observed default rate against mean predicted
    probability, one line per model (federated ones and the centralized yardstick), the
    diagonal being perfect calibration; None when no histogram has both classes."""
    usable = _usable(histograms)
    keys = [k for k in NAMES if k in usable]
    if not keys:
        return None
    fig = _figure(6.0, 5.4)
    ax = fig.add_subplot()
    top = 0.0
    for key in keys:
        h = usable[key]
        rows = h.reliability()
        predicted = [r["mean_predicted"] for r in rows]
        observed = [r["observed_rate"] for r in rows]
        top = max(top, *predicted, *observed)
        ax.plot(
            predicted,
            observed,
            marker="o",
            ms=4,
            c=COLOURS.get(key),
            lw=1.8 if key.startswith("federated") else 1.0,
            ls="-" if key.startswith("federated") else "--",
            label=f"{name_of(key)} (Brier {h.brier():.4f})",
        )
    top *= 1.05
    ax.plot([0, top], [0, top], ls=":", c="0.5", lw=1, label="perfectly calibrated")
    ax.set(xlim=(0, top), ylim=(0, top), aspect="equal")
    ax.set_xlabel("mean predicted default probability (per score decile)")
    ax.set_ylabel("observed default rate")
    ax.set_title("Reliability by score decile, held-out borrowers")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def training_figure(
    training: Mapping[str, Sequence[Mapping[str, object]]],
    references: Mapping[str, float],
) -> Figure | None:
    """Held-out AUC per round for each training curve, with horizontal reference lines
    (centralized, Bayes bound) so a reader sees how far training got; None without data."""
    curves = {}
    for key, rounds in training.items():
        points = [
            (r["round"], r["auc"])
            for r in rounds or ()
            if isinstance(r, Mapping) and _finite(r.get("round")) and _finite(r.get("auc"))
        ]
        if points:
            curves[key] = sorted(points)
    if not curves:
        return None
    fig = _figure(6.5, 4.4)
    ax = fig.add_subplot()
    for key, points in curves.items():
        rounds, aucs = zip(*points, strict=True)
        ax.plot(rounds, aucs, marker="o", ms=3, c=COLOURS.get(key), label=name_of(key))
    for (label, value), ls in zip(references.items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, ls=ls, lw=1.2, c="0.3", label=f"{label} (AUC {value:.4f})")
    ax.set_xlabel("federated round")
    ax.set_ylabel("validation AUC")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Validation AUC per training round")
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return fig


def _quantile_edge(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Left edge of the bin holding the q-quantile: the plot range ignores lone outliers."""
    cdf = np.cumsum(counts) / max(counts.sum(), 1)
    return float(edges[min(int(np.searchsorted(cdf, q)), len(edges) - 2)])


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and bool(np.isfinite(x))


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)
