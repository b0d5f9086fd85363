"""The people-facing report of ``fedcredit demo``: ``report.json``, ``report.md`` and plots.

``report.json`` is the machine record (the run's dict as given, NaN written as null so strict
JSON readers accept it). ``report.md`` is for a credit-risk reader: what the federation
achieved against local-only models, what federation costs against pooling raw data (which the
platforms refuse, so the centralized model is only a yardstick), how far the model is from the
Bayes bound, and what the encrypted queries and each stage cost.

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written report for a reader (or a later run) to trust. Missing figures are reported as
missing ("n/a", "unavailable"), never filled in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
from matplotlib.figure import Figure

from fedcredit.demo import plots, privacy_report
from protocols.metrics import ScoreHistogram, psi_verdict

log = logging.getLogger(__name__)

PNGS = ("roc.png", "scores.png", "calibration.png", "training.png", "privacy.png")
FCP, FED = "federated_cross_platform", "federated"
MODELS = (  # report key, what the model sees
    ("centralized", "all platforms' raw records pooled: a yardstick, never allowed"),
    ("centralized_local_features", "raw records pooled, each row only its platform's features"),
    (FCP, "own features + totals from the encrypted debt query"),
    (FED, "each platform's own features; no record leaves a platform"),
)
FAMILIES = {"lr": "logistic regression", "mlp": "MLP", "gbdt": "gradient-boosted trees"}
HOW_TO_READ = """\
- **AUC**: the chance a defaulter scores above a non-defaulter (0.5 is random).
  **Gini** = 2 AUC - 1, the figure most scorecard teams quote.
- **KS**: the largest gap between the score distributions of defaulters and non-defaulters
  (max TPR - FPR). Application scorecards need KS >= 0.2; above 0.3 is strong; above 0.5
  suggests leakage (a feature that knows the outcome) and should be investigated.
- **Bayes bound**: the AUC of the true default probabilities, which only the synthetic
  generator knows. No model can beat it on average; the gap is what is left to learn.
  Real ledgers have no truth file, so there is no bound for them.
- **Federated AUC and KS** come from score histograms summed across platforms (sums can be
  aggregated securely), not from averaging per-platform AUCs, which would be wrong.
- **Brier score**: the mean squared error of the predicted default probability (lower is
  better); the reference is the Brier score of predicting the default rate for everyone.
  **Reliability by decile**: borrowers in ten equal groups by score, each group's mean
  predicted probability against its observed default rate (a calibrated model sits on the
  diagonal). Both come from the summed held-out histograms, each row at its bin's centre.
- **PSI** (population stability index) compares the training rows' score distribution with
  the held-out rows' on the training deciles: below 0.1 stable, 0.1 to 0.25 a moderate
  shift, above 0.25 a significant shift (an overfitted model, or populations that differ).
- **Centralized** models pool raw data, which the platforms refuse to do: they only measure
  what federation costs. **Local-only** models are what a platform can do alone.
"""


def write_report(
    report: dict[str, Any], histograms: dict[str, ScoreHistogram], out_dir: Path
) -> list[Path]:
    """Write report.json, the plots that have data and report.md into ``out_dir``.

    Returns the paths written, report.json first and report.md last. A plot with nothing to
    show is skipped (and a stale copy from an earlier run removed, so report.md and the
    directory agree).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _jsonable(report)
    written = [_atomic(out_dir / "report.json", partial(_dump_json, data))]
    training = report.get("training")
    refs = {
        "centralized": _val(report, "centralized", "auc"),
        "Bayes bound": _val(report, "bayes_auc"),
    }
    figures: dict[str, Figure | None] = {
        "roc.png": plots.roc_figure(histograms),
        "scores.png": plots.scores_figure(histograms),
        "calibration.png": plots.calibration_figure(histograms),
        "training.png": plots.training_figure(
            training if isinstance(training, Mapping) else {},
            {k: v for k, v in refs.items() if v is not None},
        ),
        "privacy.png": privacy_report.privacy_figure(report),
    }
    pngs = []
    for name, fig in figures.items():
        path = out_dir / name
        if fig is None:
            log.info("%s: nothing to plot, skipped", name)
            if path.exists():
                path.unlink()
                log.info("removed stale %s from an earlier run", path)
            continue
        written.append(_atomic(path, partial(_save_png, fig), binary=True))
        pngs.append(name)
    markdown = render_markdown(report, histograms, pngs)
    written.append(_atomic(out_dir / "report.md", lambda fh: fh.write(markdown)))
    log.info("demo report written to %s (%d files)", out_dir, len(written))
    return written


def render_markdown(
    report: Mapping[str, Any], histograms: Mapping[str, ScoreHistogram], pngs: list[str]
) -> str:
    """report.md's text; ``pngs`` names the plots that exist, so only those are linked."""
    r = report
    out = ["# fedcredit demo report", "", _data_line(r), ""]
    out += ["## Headline", "", *(f"- {s}" for s in _headline(r, histograms)), ""]
    out += ["## Models (held-out rows: borrower x platform)", "", *_models_table(r, histograms), ""]
    for name, alt in (("roc.png", "ROC curves"), ("scores.png", "score distributions")):
        out += [f"![{alt}]({name})", ""] if name in pngs else []
    out += _section("Per platform", _per_platform_table(r))
    out += _section("By model family", _by_model_table(r))
    out += _section(
        "Calibration and stability",
        _calibration_lines(r)
        + ["", "![reliability by score decile](calibration.png)"] * ("calibration.png" in pngs),
    )
    out += _section(
        "Training",
        _training_table(r)
        + ["", "![held-out AUC per round](training.png)"] * ("training.png" in pngs),
    )
    if any(k in r for k in ("dp", "membership_inference", "secure_aggregation")):
        out += _section(
            "Privacy: secure aggregation, differential privacy, membership inference",
            privacy_report.privacy_lines(r)
            + ["", "![AUC and attack AUC against epsilon](privacy.png)"] * ("privacy.png" in pngs),
        )
    out += _section("Encrypted debt queries", _queries_table(r))
    out += _section("Stage timings", _timings_table(r))
    gone = r.get("unavailable") if isinstance(r.get("unavailable"), Mapping) else {}
    out += _section("Not available in this run", [f"- `{k}`: {v}" for k, v in gone.items()])
    out += ["## How to read this", "", HOW_TO_READ]
    if r.get("settings"):
        out += [
            "## Settings",
            "",
            "```json",
            json.dumps(_jsonable(r["settings"]), indent=2),
            "```",
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------ sections


def _data_line(r: Mapping[str, Any]) -> str:
    d = _sub(r, "data")
    source = d.get("source")
    parts = [
        {"synthetic": "synthetic population", "ledgers": "platform ledgers"}.get(
            source, str(source) if source else "source not recorded"
        )
    ]
    names = d.get("platforms") or []
    if names:
        parts.append(f"{len(names)} platforms ({', '.join(map(str, names))})")
    if _num(d.get("borrowers")) is not None:
        parts.append(f"{_n(d['borrowers'])} borrowers")
    if d.get("seed") is not None:
        parts.append(f"seed {d['seed']}")
    if (share := _num(d.get("test_share"))) is not None:
        parts.append(f"{share:.0%} of borrowers held out")
    if d.get("train_rows") is not None or d.get("test_rows") is not None:
        parts.append(f"{_n(d.get('train_rows'))} training rows, {_n(d.get('test_rows'))} test rows")
    return "**Data:** " + ", ".join(parts) + "."


def _headline(r: Mapping[str, Any], histograms: Mapping[str, ScoreHistogram]) -> list[str]:
    best = FCP if _val(r, FCP, "auc") is not None else FED
    auc, ks, fed = _val(r, best, "auc"), _val(r, best, "ks"), _val(r, FED, "auc")
    family = FAMILIES.get(r.get("primary_model"), r.get("primary_model"))
    lines = [
        f"**{plots.name_of(best)}{f' ({family})' if family else ''}: AUC {_f4(auc)}, "
        f"Gini {_f4(_gini(auc))}, KS {_f4(ks)}** on {_n(_sub(r, best).get('n'))} held-out "
        f"rows (a borrower's row at each platform that holds them): {_ks_verdict(ks)}."
    ]
    if best == FED:
        lines.append(f"No cross-platform model in this run: {_reason(r, FCP, 'not run')}.")
    per, local = _sub(r, "per_platform"), _sub(r, "local_only")
    pairs = []
    for p in _platforms(r):
        lo = _val(per, p, "local_only", "auc")
        lo = _val(local, p, "auc") if lo is None else lo
        fp = _val(per, p, best, "auc")
        if lo is not None and fp is not None:
            pairs.append(f"{p} {lo:.4f} -> {fp:.4f} ({fp - lo:+.4f})")
    los = [v for p in local if (v := _val(local, p, "auc")) is not None]
    if pairs:
        lines.append(
            "Against each platform's local-only model, on that platform's own held-out "
            f"borrowers (AUC, local-only -> {plots.name_of(best)}): " + "; ".join(pairs) + "."
        )
    elif los and auc is not None:
        lines.append(
            f"Local-only models reach AUC {min(los):.4f} to {max(los):.4f}, each on "
            f"its own borrowers, against {auc:.4f} for the federation."
        )
    if best == FCP and fed is not None:
        lines.append(
            f"The cross-platform debt totals from the encrypted query add {auc - fed:+.4f}"
            f" AUC over the federated model on own features alone ({fed:.4f})."
        )
    cen, cen_local = _val(r, "centralized", "auc"), _val(r, "centralized_local_features", "auc")
    if best == FCP and cen is not None:
        note = " (negative: the federation did at least as well)" if cen < auc else ""
        lines.append(
            f"Cost of federation (centralized on pooled raw data minus federated + "
            f"cross-platform): {cen - auc:+.4f} AUC ({cen:.4f} vs {auc:.4f}){note}. "
            "Pooling raw data is what the platforms refuse; it is only a yardstick."
        )
    else:
        lines.append(
            "Cost of federation: not measured ("
            + ("no centralized reference)." if cen is None else "no cross-platform model).")
        )
    if cen_local is not None and fed is not None:
        lines.append(
            f"Like for like on own-platform features: centralized {cen_local:.4f} vs "
            f"federated {fed:.4f} ({cen_local - fed:+.4f} AUC)."
        )
    bayes = _val(r, "bayes_auc")
    if bayes is None:
        lines.append(f"Bayes bound: unavailable ({_reason(r, 'bayes_auc', 'no truth file')}).")
    elif auc is not None:
        share = (
            f"; the model reaches {_gini(auc) / _gini(bayes):.0%} of the Bayes Gini"
            if bayes > 0.5
            else ""
        )
        lines.append(
            f"Gap to the Bayes bound (AUC {bayes:.4f}, the true default probabilities): "
            f"{bayes - auc:.4f} AUC{share}."
            + (
                " Above the bound on this sample: sampling noise if small, leakage if not."
                * (auc > bayes)
            )
        )
    else:
        lines.append(f"Bayes bound: AUC {bayes:.4f} (no model AUC to compare).")
    if (lift := _val(r, "lift", "auc")) is not None:
        lines.append(
            f"Lift {_lift_label(r, histograms, lift)}: AUC {lift:+.4f}, "
            f"Gini {_pm(_val(r, 'lift', 'gini'))}."
        )
    q = _sub(r, "queries")
    if q:
        tps = _num(q.get("tokens_per_second"))
        rate = f" ({tps:,.0f} borrowers/s)" if tps is not None else ""
        lines.append(f"{_n(q.get('count'))} encrypted debt queries{rate}: {_match(q)}.")
    return lines


def _models_table(r: Mapping[str, Any], histograms: Mapping[str, ScoreHistogram]) -> list[str]:
    bayes = _val(r, "bayes_auc")
    b_auc = (
        _f4(bayes)
        if bayes is not None
        else f"unavailable ({_reason(r, 'bayes_auc', 'no truth file')})"
    )
    rows = [
        [
            "Bayes bound",
            "true default probabilities (generator only)",
            b_auc,
            _f4(_gini(bayes)),
            "-",
            "-",
        ]
    ]
    for key, sees in MODELS:
        if m := _sub(r, key):
            name = plots.name_of(key)
            rows.append([f"**{name}**" if key == FCP else name, sees, *_cells(m)])
    if (pooled := _pooled_local(histograms)) is not None:
        name, sees = "local-only, all platforms", "each platform alone; histograms summed"
        rows.append([name, sees, *_cells(pooled.summary())])
    for p, m in _sub(r, "local_only").items():
        rows.append([f"local-only: {p}", "that platform's own ledger", *_cells(m)])
    return _table(["model", "sees", "AUC", "Gini", "KS", "n"], rows, left=2)


def _per_platform_table(r: Mapping[str, Any]) -> list[str]:
    per, local = _sub(r, "per_platform"), _sub(r, "local_only")
    if not per and not local:
        return []
    rows = []
    for p in _platforms(r):
        pp = _sub(per, p)
        lo, fed, fcp = _sub(pp, "local_only") or _sub(local, p), _sub(pp, FED), _sub(pp, FCP)
        best = _val(fcp, "auc") if _val(fcp, "auc") is not None else _val(fed, "auc")
        lo_auc = _val(lo, "auc")
        delta = best - lo_auc if best is not None and lo_auc is not None else None
        rows.append([p, _n(lo.get("n", fed.get("n"))), _ak(lo), _ak(fed), _ak(fcp), _pm(delta)])
    head = [
        "platform",
        "n",
        "local-only AUC / KS",
        "federated AUC / KS",
        "fed + cross AUC / KS",
        "AUC gain over local-only",
    ]
    return _table(head, rows)


def _by_model_table(r: Mapping[str, Any]) -> list[str]:
    rows = []
    for fam, m in _sub(r, "by_model").items():
        name = FAMILIES.get(fam, fam) + (" (primary)" if fam == r.get("primary_model") else "")
        m = m if isinstance(m, Mapping) else {}
        rows.append([name, _ak(_sub(m, FED)), _ak(_sub(m, FCP)), _ak(_sub(m, "centralized"))])
    head = ["model family", "federated AUC / KS", "fed + cross AUC / KS", "centralized AUC / KS"]
    return _table(head, rows) if rows else []


def _calibration_lines(r: Mapping[str, Any]) -> list[str]:
    """Brier, PSI and the reliability table of the headline model, then every model's."""
    detail = _sub(r, "calibration_detail")
    brier, psi = _val(r, "calibration", "brier"), _val(r, "calibration", "psi")
    out: list[str] = []
    if brier is not None or psi is not None:
        ref, bound = _val(detail, "brier_reference"), _val(detail, "brier_error_bound")
        name = plots.name_of(str(detail.get("model") or FCP))
        out.append(
            f"- **{name}: Brier score {_f4(brier)}**"
            + (f" (predicting the default rate for everyone: {ref:.4f})" if ref is not None else "")
            + (f"; from bin centres, within {bound:.1e} of the exact score" if bound else "")
            + "."
        )
        out.append(
            f"- **PSI, training vs held-out scores: {_f4(psi)}** ({psi_verdict(psi)})."
            if psi is not None
            else "- PSI: not measured (no training-score histograms)."
        )
        mean, rate = _val(detail, "mean_predicted"), _val(detail, "observed_rate")
        if mean is not None and rate is not None:
            out.append(
                f"- Mean predicted default probability {mean:.2%} against an observed default "
                f"rate of {rate:.2%} on the held-out rows."
            )
    else:
        out.append("- Brier score and PSI: not reported by this run.")
    rows = []
    for row in detail.get("reliability") or []:
        if not isinstance(row, Mapping):
            continue
        pred, obs = _val(row, "mean_predicted"), _val(row, "observed_rate")
        ratio = f"{obs / pred:.2f}" if pred and obs is not None else "n/a"
        rows.append(
            [
                str(row.get("decile", "")),
                _n(row.get("count")),
                _n(row.get("defaults")),
                _pct(pred),
                _pct(obs),
                ratio,
            ]
        )
    if rows:
        out += [
            "",
            "Reliability by score decile (1 = lowest predicted default probability):",
            "",
            *_table(
                ["decile", "n", "defaults", "mean predicted", "observed", "observed / predicted"],
                rows,
            ),
        ]
    by_model = []
    for fam, entries in _sub(r, "calibration_by_model").items():
        for key, cal in (entries if isinstance(entries, Mapping) else {}).items():
            if not isinstance(cal, Mapping):
                continue
            p = _val(cal, "psi")
            by_model.append(
                [
                    FAMILIES.get(fam, fam),
                    plots.name_of(key),
                    _f4(_val(cal, "brier")),
                    _f4(p) + (f" ({psi_verdict(p)})" if p is not None else ""),
                ]
            )
    if by_model:
        out += ["", *_table(["model family", "model", "Brier", "PSI"], by_model, left=2)]
    return out


def _training_table(r: Mapping[str, Any]) -> list[str]:
    rows = []
    for key, rounds in _sub(r, "training").items():
        pts = sorted(
            (_num(x.get("round")), _num(x.get("auc")), _num(x.get("loss")))
            for x in (rounds if isinstance(rounds, list) else [])
            if isinstance(x, Mapping)
            and _num(x.get("round")) is not None
            and _num(x.get("auc")) is not None
        )
        if pts:
            top = max(pts, key=lambda p: p[1])
            rows.append(
                [
                    plots.name_of(key),
                    str(len(pts)),
                    _f4(pts[0][1]),
                    _f4(pts[-1][1]),
                    f"{top[1]:.4f} (round {top[0]:g})",
                    _f4(pts[-1][2]),
                ]
            )
    head = ["model", "rounds", "first-round AUC", "final AUC", "best AUC", "final loss"]
    return (_table(head, rows) + _stopping_lines(r)) if rows else []


def _stopping_lines(r: Mapping[str, Any]) -> list[str]:
    """Why each training of the primary model stopped (``report["convergence"]``)."""
    kind = r.get("primary_model")
    by_kind = _sub(r, "convergence")
    entries = by_kind.get(kind) if isinstance(kind, str) else None
    if not isinstance(entries, Mapping):
        return []
    lines = [""]
    for key, entry in entries.items():
        if isinstance(entry, Mapping) and isinstance(entry.get("stopped_because"), str):
            steps = entry.get("local_steps")
            lines.append(
                f"- {plots.name_of(key)}: {entry['stopped_because']}; {steps} local steps a round."
            )
    if len(lines) == 1:
        return []
    note = "AUC and loss per round are on the validation people (never the test people)."
    return [*lines, "", note]


def _queries_table(r: Mapping[str, Any]) -> list[str]:
    q = _sub(r, "queries")
    if not q:
        return []
    per = q.get("bytes_per_platform")
    traffic = (
        ", ".join(f"{p} {_bytes(v)}" for p, v in per.items())
        if isinstance(per, Mapping)
        else _bytes(per)
    )
    bits, tps = _num(q.get("key_bits")), _num(q.get("tokens_per_second"))
    rows = [
        ["queries answered", _n(q.get("count"))],
        ["totals vs plaintext check", _match(q)],
        ["Paillier key size", f"{bits:,.0f} bits" if bits is not None else "n/a"],
        ["batches", _n(q.get("batches"))],
        ["ciphertexts", _n(q.get("ciphertexts"))],
        ["traffic per platform", traffic],
        ["time", _secs(q.get("seconds"))],
        ["throughput", f"{tps:,.0f} borrowers/s" if tps is not None else "n/a"],
    ]
    return _table(["measure", "value"], rows)


def _timings_table(r: Mapping[str, Any]) -> list[str]:
    s = _sub(r, "seconds")
    total = _num(s.get("total"))
    rows = [
        [str(k), _secs(v), f"{_num(v) / total:.0%}" if total and _num(v) is not None else ""]
        for k, v in s.items()
        if k != "total"
    ]
    if total is not None:
        rows.append(["**total**", f"**{_secs(total)}**", "100%"])
    return _table(["stage", "time", "share"], rows) if rows else []


# ------------------------------------------------------------------------------ helpers


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"## {title}", "", *lines, ""] if lines else []


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    rule = ["---"] * left + ["---:"] * (len(head) - left)
    return ["| " + " | ".join(row) + " |" for row in (head, rule, *rows)]


def _sub(r: Any, *keys: str) -> Mapping[str, Any]:
    """The mapping at r[k1][k2]..., or {} when anything on the way is missing or not a dict."""
    for k in keys:
        r = r.get(k) if isinstance(r, Mapping) else None
    return r if isinstance(r, Mapping) else {}


def _val(r: Any, *keys: str) -> float | None:
    """The finite number at r[k1][k2]..., or None (missing, None, NaN, not a number)."""
    for k in keys:
        r = r.get(k) if isinstance(r, Mapping) else None
    return _num(r)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float | np.number):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _platforms(r: Mapping[str, Any]) -> list[str]:
    names = list(_sub(r, "data").get("platforms") or [])
    names += [p for p in (*_sub(r, "per_platform"), *_sub(r, "local_only")) if p not in names]
    return list(dict.fromkeys(map(str, names)))


def _reason(r: Mapping[str, Any], key: str, default: str) -> str:
    return str(_sub(r, "unavailable").get(key) or default)


def _ks_verdict(ks: float | None) -> str:
    if ks is None:
        return "KS not measured"
    if ks > 0.5:
        return "KS above 0.5 suggests leakage: check the features before trusting this"
    if ks > 0.3:
        return "strong (KS above 0.3)"
    if ks >= 0.2:
        return "usable for an application scorecard (KS at least 0.2)"
    return "below the KS of 0.2 an application scorecard needs"


def _lift_label(r: Mapping[str, Any], histograms: Mapping[str, ScoreHistogram], lift: float) -> str:
    """Name the lift by the difference it equals, so the report never guesses its meaning."""
    fcp, fed = _val(r, FCP, "auc"), _val(r, FED, "auc")
    pooled = _pooled_local(histograms)
    pooled_auc = None if pooled is None else _num(pooled.auc())
    for base, label in (
        (fed, "from cross-platform totals (fed + cross vs federated)"),
        (pooled_auc, "over local-only models (fed + cross vs summed local-only)"),
    ):
        if fcp is not None and base is not None and abs(fcp - base - lift) < 6e-4:
            return label
    return "(as reported by the run)"


def _pooled_local(histograms: Mapping[str, ScoreHistogram]) -> ScoreHistogram | None:
    """All local-only models judged together: their histograms summed (never AUCs averaged);
    None when the sum lacks defaulters or non-defaulters."""
    hists = [h for k, h in histograms.items() if k.startswith("local_only:")]
    pooled = sum(hists[1:], hists[0]) if hists else None
    return pooled if pooled is not None and _num(pooled.auc()) is not None else None


def _match(q: Mapping[str, Any]) -> str:
    match = q.get("all_totals_match")
    if match is True:
        return "all totals match the plaintext check"
    if match is False:
        return f"**{_n(q.get('mismatches'))} totals do NOT match the plaintext check**"
    return "totals not checked against plaintext"


def _cells(m: Mapping[str, Any]) -> list[str]:
    auc = _val(m, "auc")
    return [_f4(auc), _f4(_gini(auc)), _f4(_val(m, "ks")), _n(m.get("n"))]


def _ak(m: Mapping[str, Any]) -> str:
    return "n/a" if not m else f"{_f4(_val(m, 'auc'))} / {_f4(_val(m, 'ks'))}"


def _gini(auc: float | None) -> float | None:
    return None if auc is None else 2 * auc - 1


def _f4(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _pm(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _n(x: Any) -> str:
    return "n/a" if (v := _num(x)) is None else f"{v:,.0f}"


def _secs(x: Any) -> str:
    if (v := _num(x)) is None:
        return "n/a"
    return f"{v:.2f} s" if v < 100 else f"{v:,.0f} s ({v / 60:.1f} min)"


def _bytes(x: Any) -> str:
    if (v := _num(x)) is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:,.0f} {unit}" if unit == "B" else f"{v:,.1f} {unit}"
        v /= 1024
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ writing


def _jsonable(x: Any) -> Any:
    """Plain JSON values: NaN and infinities become null (strict JSON has neither), numpy
    scalars and arrays become Python ones. Anything else is left for json to reject."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | np.generic):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _dump_json(data: Any, fh: IO[str]) -> None:
    json.dump(data, fh, indent=2, allow_nan=False, ensure_ascii=False)
    fh.write("\n")


def _save_png(fig: Figure, fh: IO[bytes]) -> None:
    fig.savefig(fh, format="png", dpi=110)


def _atomic(path: Path, write: Callable[[IO[Any]], object], *, binary: bool = False) -> Path:
    """Write through a temporary file beside ``path`` and rename it into place, so readers
    see the old file or the whole new one; the temporary file is removed on any failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
