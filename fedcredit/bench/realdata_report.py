"""``fedcredit bench realdata --report-dir DIR``: the result for people (Markdown and PNG).

``realdata.json`` is the same JSON as ``--json``; ``realdata.md`` a table per model and per
platform; ``realdata.png`` federated against pooled AUC per model, and each platform's
local-only against federated AUC on its own held-out borrowers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# bench realdata: {result['data']} ({result['split']} split, seed {result['seed']})",
        "",
        "| model | federated AUC | pooled AUC | gap |",
        "|---|---|---|---|",
    ]
    for kind, entry in result["models"].items():
        lines.append(
            f"| {kind} | {entry['federated_auc']:.4f} | {entry['centralized_auc']:.4f} "
            f"| {entry['gap']:+.4f} |"
        )
    sk = result["sklearn_logistic_regression"]["auc"]
    lines += [
        f"| scikit-learn LogisticRegression (pooled) | | {sk:.4f} | |",
        "",
        f"Best pooled {result['best_centralized_auc']:.4f} ({result['best_centralized_model']}), "
        f"best federated {result['best_federated_auc']:.4f} ({result['best_federated_model']}): "
        f"gap {result['best_gap']:+.4f}.",
        "",
        "| platform | rows (train/test) | default rate | best local-only AUC "
        "| best federated AUC |",
        "|---|---|---|---|---|",
    ]
    for name, entry in result["local_only"].items():
        rows = result["rows"][name]
        lines.append(
            f"| {name} | {rows['train']}/{rows['test']} | {rows['default_rate']:.3f} "
            f"| {entry['local_only_best_auc']:.4f} | {entry['federated_best_auc']:.4f} |"
        )
    if cost := result.get("boosting_round_seconds"):
        lines += [
            "",
            f"Boosting round: federated {cost['federated'] * 1000:.1f} ms "
            f"({cost['federated_platforms_in_parallel'] * 1000:.1f} ms with the platforms in "
            f"parallel), pooled HistGradientBoosting "
            f"{cost['pooled_histgradientboosting'] * 1000:.1f} ms: "
            f"{cost['ratio_federated_over_pooled']}x "
            f"({cost['ratio_platforms_in_parallel']}x).",
        ]
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    kinds = list(result["models"])
    xs = range(len(kinds))
    left.bar(
        [x - 0.2 for x in xs],
        [result["models"][k]["federated_auc"] for k in kinds],
        0.4,
        label="federated",
    )
    left.bar(
        [x + 0.2 for x in xs],
        [result["models"][k]["centralized_auc"] for k in kinds],
        0.4,
        label="pooled",
    )
    left.axhline(
        result["sklearn_logistic_regression"]["auc"],
        color="grey",
        linestyle="--",
        label="scikit-learn LR, pooled",
    )
    left.set_xticks(list(xs), kinds)
    left.set_ylim(0.5, 1.0)
    left.set_ylabel("held-out AUC")
    left.set_title("federated vs pooled")
    left.legend(loc="upper right", fontsize=8)
    names = list(result["local_only"])
    xs = range(len(names))
    local = [result["local_only"][n]["local_only_best_auc"] for n in names]
    fed = [result["local_only"][n]["federated_best_auc"] for n in names]
    right.bar([x - 0.2 for x in xs], local, 0.4, label="best local-only")
    right.bar([x + 0.2 for x in xs], fed, 0.4, label="best federated")
    right.set_xticks(list(xs), names)
    right.set_ylim(0.5, 1.0)
    right.set_title("each platform's own held-out borrowers")
    right.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{result['data']}, {result['split']} split")
    fig.tight_layout()
    return fig


def write(result: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "realdata.json", folder / "realdata.md", folder / "realdata.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    figure(result).savefig(paths[2], dpi=110)
    return paths
