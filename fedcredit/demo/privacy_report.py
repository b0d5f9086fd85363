"""report.md's privacy section and its plot (model AUC and attack AUC against epsilon).

Kept apart from ``fedcredit.demo.privacy`` (which trains and attacks) so that rendering a
report needs neither torch nor Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator


def privacy_figure(report: Mapping[str, Any]) -> Figure | None:
    """Model AUC and attack AUC against epsilon, the non-DP federated model as reference."""
    sweep = [s for s in report.get("dp_sweep") or [] if s.get("auc") is not None]
    if not sweep:
        return None
    eps = [s["epsilon"] for s in sweep]
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    ax.plot(eps, [s["auc"] for s in sweep], "o-", color="tab:blue", label="DP federated: AUC")
    attack = [s.get("attack_auc") for s in sweep]
    if all(a is not None for a in attack):
        ax.plot(eps, attack, "s-", color="tab:red", label="membership attack AUC")
    fed = (report.get("federated") or {}).get("auc")
    if fed is not None:
        ax.axhline(fed, color="tab:blue", ls="--", lw=1, label=f"federated, no DP ({fed:.4f})")
    mia = (report.get("membership_inference") or {}).get("federated") or {}
    if mia.get("attack_auc") is not None:
        ax.axhline(
            mia["attack_auc"],
            color="tab:red",
            ls="--",
            lw=1,
            label=f"attack on federated, no DP ({mia['attack_auc']:.4f})",
        )
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance (0.5)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel(f"epsilon (delta = {sweep[0].get('delta', float('nan')):g})")
    ax.set_ylabel("AUC")
    ax.set_title("Privacy against utility: DP-SGD on every platform")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def _f(x: Any, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _range(noise: Any) -> str:
    """A noise multiplier range: each platform's follows from its own row count."""
    if not isinstance(noise, Mapping):
        return "n/a"
    return f"{_f(noise.get('min'), '.3f')}-{_f(noise.get('max'), '.3f')}"


def privacy_lines(report: Mapping[str, Any]) -> list[str]:
    """report.md's privacy section: secure aggregation, the DP model, the attacks."""
    secagg = report.get("secure_aggregation")
    lines = [
        "- **Secure aggregation of training sums**: "
        + ("on" if secagg else "off (the bureau sees each platform's update)")
        + "."
    ]
    dp = report.get("dp")
    fed = (report.get("federated") or {}).get("auc")
    if dp:
        lines.append(
            f"- **DP federated model at epsilon {dp['epsilon']:g}, delta {dp['delta']:g}**: "
            f"AUC {_f(dp['auc'])}, KS {_f(dp['ks'])}"
            + (
                f" ({dp['auc'] - fed:+.4f} against the federated model without DP)"
                if fed and "dp_sweep" in report  # the demo: its federated model has no DP
                else ""
            )
            + f". {dp.get('mechanism')}, clipping norm {dp.get('clipping_norm')}, noise "
            f"multiplier {_range(dp.get('noise_multiplier'))}, {dp.get('accountant')} accountant, "
            f"epsilon spent {dp.get('epsilon_spent')} (the largest over platforms)."
        )
    else:
        lines.append("- **Differential privacy**: off in this run (no `dp-epsilon`).")
    for key, label, base in (
        ("centralized_dp", "DP centralized model (pooled DP-SGD)", "centralized"),
        (
            "federated_cross_platform_dp",
            "DP federated model with cross-platform totals",
            "federated_cross_platform",
        ),
    ):
        other = report.get(key)
        if not other:
            continue
        plain = (report.get(base) or {}).get("auc")
        lines.append(
            f"- **{label} at epsilon {other['epsilon']:g}**: AUC {_f(other.get('auc'))}, "
            f"KS {_f(other.get('ks'))}"
            + (f" ({other['auc'] - plain:+.4f} against the same model without DP)" if plain else "")
            + f", epsilon spent {other.get('epsilon_spent')}."
        )
    sweep = report.get("dp_sweep") or []
    if sweep:
        lines += [
            "",
            "| epsilon | AUC | KS | attack AUC | TPR at 1% FPR | noise multiplier |",
            "|---|---|---|---|---|---|",
        ]
        for s in sweep:
            lines.append(
                f"| {s['epsilon']:g} | {_f(s.get('auc'))} | {_f(s.get('ks'))} | "
                f"{_f(s.get('attack_auc'))} | {_f(s.get('tpr_at_1pct_fpr'), '.2%')} | "
                f"{_range(s.get('noise_multiplier'))} |"
            )
    mia = report.get("membership_inference") or {}
    if mia:
        lines += [
            "",
            "Membership inference (members: training rows; non-members: held-out borrowers of "
            "the same platforms, equal numbers; the stronger of a loss-threshold and a "
            "shadow-model attack):",
            "",
            "| model | model AUC | attack AUC | TPR at 1% FPR | loss threshold | shadow model |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in mia.items():
            lines.append(
                f"| {name} | {_f(m.get('model_auc'))} | {_f(m.get('attack_auc'))} | "
                f"{_f(m.get('tpr_at_1pct_fpr'), '.2%')} | "
                f"{_f((m.get('loss_threshold') or {}).get('attack_auc'))} | "
                f"{_f((m.get('shadow_model') or {}).get('attack_auc'))} |"
            )
    else:
        lines.append("- **Membership inference**: not measured in this run.")
    return lines
