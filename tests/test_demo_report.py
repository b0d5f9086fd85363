"""The demo report: every file is written, valid and honest about what is missing.

Histograms come from synthetic scores through ``ScoreHistogram.of``, as the federation builds
them; the report dicts are a full run's and a minimal one's (real ledgers, no Bayes bound, no
cross-platform model, most keys missing).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedcredit.demo import report as demo_report
from fedcredit.demo.report import write_report
from protocols.metrics import ScoreHistogram, calibration_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLATFORMS = ["platform-01", "platform-02", "platform-03"]
_PRIVACY = {
    "mechanism": "DP-SGD (Opacus): per-sample clipping, Gaussian noise, Poisson sampling",
    "delta": 1e-5,
    "clipping_norm": 1.0,
    "accountant": "opacus RDP",
    "n": 4000,
}
DP_SWEEP = [
    {
        **_PRIVACY,
        "epsilon": e,
        "auc": auc,
        "ks": 0.2,
        "epsilon_spent": e - 0.003,
        "noise_multiplier": {"min": 4 / e, "max": 5 / e},
        "attack_auc": 0.5012,
        "tpr_at_1pct_fpr": 0.0101,
    }
    for e, auc in ((0.5, 0.6301), (1.0, 0.6444), (4.0, 0.6555))
]
_ATTACK = {"strongest": "shadow_model", "loss_threshold": {"attack_auc": 0.5007}}
MEMBERSHIP = {
    "centralized": {"model_auc": 0.71, "attack_auc": 0.5123, "tpr_at_1pct_fpr": 0.0131, **_ATTACK},
    "federated": {"model_auc": 0.66, "attack_auc": 0.5034, "tpr_at_1pct_fpr": 0.0102, **_ATTACK},
    "centralized_dp_epsilon_1": {
        "model_auc": 0.6602,
        "attack_auc": 0.4991,
        "tpr_at_1pct_fpr": 0.0098,
        **_ATTACK,
    },
    "federated_dp_epsilon_1": {
        "model_auc": 0.6444,
        "attack_auc": 0.4987,
        "tpr_at_1pct_fpr": 0.0099,
        **_ATTACK,
    },
}


def _histogram(rng: np.random.Generator, separation: float, n: int = 4000) -> ScoreHistogram:
    """Scores whose log-odds separate defaulters (about 5%) by ``separation`` (higher: better)."""
    y = (rng.random(n) < 0.05).astype(int)
    logit = -3.0 + separation * y + rng.normal(size=n)
    return ScoreHistogram.of(1 / (1 + np.exp(-logit)), y)


@pytest.fixture
def histograms() -> dict[str, ScoreHistogram]:
    rng = np.random.default_rng(0)
    hists = {
        "centralized": _histogram(rng, 1.2),
        "federated": _histogram(rng, 0.9),
        "federated_cross_platform": _histogram(rng, 1.1),
    }
    for p in PLATFORMS:
        hists[f"local_only:{p}"] = _histogram(rng, 0.6, n=1500)
    return hists


def _metrics(h: ScoreHistogram) -> dict[str, float]:
    return h.summary()


@pytest.fixture
def full_report(histograms: dict[str, ScoreHistogram]) -> dict:
    fed, fcp = _metrics(histograms["federated"]), _metrics(histograms["federated_cross_platform"])
    local = {p: _metrics(histograms[f"local_only:{p}"]) for p in PLATFORMS}
    # As the bureau computes them: from the summed held-out and training-row histograms.
    train = _histogram(np.random.default_rng(9), 1.1, n=9000)
    cal = {
        "federated": calibration_summary(histograms["federated"], train),
        "federated_cross_platform": calibration_summary(
            histograms["federated_cross_platform"], train
        ),
        "centralized": calibration_summary(histograms["centralized"]),
    }
    fcp_cal = cal["federated_cross_platform"]
    return {
        "data": {
            "source": "synthetic",
            "platforms": PLATFORMS,
            "borrowers": 20_000,
            "seed": 7,
            "test_share": 0.3,
            "train_rows": 14_000,
            "test_rows": 6_000,
        },
        "bayes_auc": 0.7431,
        "centralized": _metrics(histograms["centralized"]),
        "centralized_local_features": {"auc": 0.6912, "ks": 0.2871, "n": 4000},
        "federated": fed,
        "federated_cross_platform": fcp,
        "lift": {"auc": round(fcp["auc"] - fed["auc"], 4), "gini": 0.1},
        "calibration": {"brier": fcp_cal["brier"], "psi": fcp_cal["psi"]},
        "calibration_detail": {"model": "federated_cross_platform", **fcp_cal},
        "dp": DP_SWEEP[1],
        "dp_sweep": DP_SWEEP,
        "centralized_dp": {**DP_SWEEP[1], "auc": 0.6602, "ks": 0.21, "epsilon_spent": 0.998},
        "membership_inference": MEMBERSHIP,
        "secure_aggregation": False,
        "local_only": local,
        "per_platform": {
            p: {
                "local_only": local[p],
                "federated": {"auc": 0.6611, "ks": 0.24, "n": 1500},
                "federated_cross_platform": {"auc": 0.7123, "ks": 0.31, "n": 1500},
            }
            for p in PLATFORMS
        },
        "by_model": {
            "lr": {
                "federated": {"auc": 0.6501, "ks": 0.22, "n": 4000},
                "federated_cross_platform": {"auc": 0.7002, "ks": 0.29, "n": 4000},
                "centralized": {"auc": 0.7055, "ks": 0.3, "n": 4000},
            },
            "mlp": {"federated": fed, "federated_cross_platform": fcp, "centralized": None},
        },
        "calibration_by_model": {"mlp": cal, "lr": {"federated": cal["federated"]}},
        "primary_model": "mlp",
        "training": {
            "federated": [
                {"round": i, "auc": 0.6 + 0.01 * i, "ks": 0.2, "loss": 0.3 - 0.01 * i}
                for i in range(1, 6)
            ],
            "federated_cross_platform": [
                {"round": i, "auc": 0.65 + 0.012 * i, "ks": 0.25, "loss": float("nan")}
                for i in range(1, 6)
            ],
        },
        "queries": {
            "count": 6000,
            "all_totals_match": True,
            "mismatches": 0,
            "batches": 3,
            "ciphertexts": 540,
            "key_bits": 2048,
            "bytes_per_platform": 3_276_800,
            "seconds": 4.25,
            "tokens_per_second": 1411.8,
        },
        "seconds": {"datagen": 3.5, "train": 40.25, "queries": 4.25, "total": 48.0},
        "unavailable": {},
        "settings": {"rounds": 5, "model": "mlp", "nan_setting": float("nan")},
    }


@pytest.fixture
def minimal_report() -> dict:
    return {
        "data": {"source": "ledgers", "platforms": ["a", "b"], "borrowers": None, "seed": None},
        "bayes_auc": None,
        "federated": {"auc": float("nan"), "ks": None, "n": 10},
        "federated_cross_platform": None,
        "unavailable": {"federated_cross_platform": "no debt query keys configured"},
    }


def test_full_report_writes_every_file(tmp_path: Path, full_report, histograms) -> None:
    written = write_report(full_report, histograms, tmp_path)
    names = [p.name for p in written]
    assert names == [
        "report.json",
        "roc.png",
        "scores.png",
        "calibration.png",
        "training.png",
        "privacy.png",
        "report.md",
    ]
    for path in written:
        assert path.parent == tmp_path and path.stat().st_size > 0
    for name in ("roc.png", "scores.png", "calibration.png", "training.png", "privacy.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*partial")), "temporary files left behind"


def test_report_json_round_trips_with_nan_as_null(tmp_path: Path, full_report, histograms) -> None:
    write_report(full_report, histograms, tmp_path)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text
    back = json.loads(text)  # strict parsers reject NaN; this one would accept it, hence above
    assert back["settings"]["nan_setting"] is None
    assert back["training"]["federated_cross_platform"][0]["loss"] is None
    assert list(back) == list(full_report), "keys keep the run's order (not sorted)"
    assert back["federated"] == full_report["federated"]
    assert back["per_platform"] == full_report["per_platform"]
    assert set(back["calibration"]) == {"brier", "psi"}
    assert back["calibration"] == full_report["calibration"]
    assert len(back["calibration_detail"]["reliability"]) == 10
    assert set(back["calibration_by_model"]["mlp"]) == {
        "federated",
        "federated_cross_platform",
        "centralized",
    }
    assert back["calibration_by_model"]["mlp"]["centralized"]["psi"] is None


def test_markdown_has_the_figures(tmp_path: Path, full_report, histograms) -> None:
    write_report(full_report, histograms, tmp_path)
    md = (tmp_path / "report.md").read_text()
    fcp, fed = full_report["federated_cross_platform"], full_report["federated"]
    cen = full_report["centralized"]
    assert f"AUC {fcp['auc']:.4f}" in md
    assert f"Gini {2 * fcp['auc'] - 1:.4f}" in md
    assert f"KS {fcp['ks']:.4f}" in md
    assert f"{cen['auc'] - fcp['auc']:+.4f} AUC" in md  # cost of federation
    assert f"{0.7431 - fcp['auc']:.4f} AUC" in md  # gap to the Bayes bound
    assert f"{fed['auc']:.4f}" in md and "0.6912" in md
    for p in PLATFORMS:
        assert f"| {p} |" in md
        assert f"local-only: {p}" in md
    assert "MLP (primary)" in md and "logistic regression" in md
    assert "all totals match" in md and "2,048 bits" in md and "1,412 borrowers/s" in md
    assert "3.1 MiB" in md
    assert "| train | 40.25 s | 84% |" in md
    assert "from cross-platform totals" in md  # the lift's meaning, recognised from the numbers
    for png in ("roc.png", "scores.png", "calibration.png", "training.png"):
        assert f"]({png})" in md
    cal = full_report["calibration_detail"]
    assert "## Calibration and stability" in md
    assert f"Brier score {cal['brier']:.4f}" in md
    assert f"PSI, training vs held-out scores: {cal['psi']:.4f}** ({cal['psi_verdict']})" in md
    assert "| decile | n | defaults | mean predicted | observed | observed / predicted |" in md
    first = cal["reliability"][0]
    row = f"| 1 | {first['count']:,} | {first['defaults']:,} | {first['mean_predicted']:.2%} |"
    assert row in md
    assert "PSI** (population stability index)" in md and "above 0.25" in md
    assert "KS >= 0.2" in md and "Gini" in md and "summed" in md
    assert "unavailable" not in md.split("## How to read this")[0]


def test_minimal_report_is_honest_about_what_is_missing(tmp_path: Path, minimal_report) -> None:
    h = _histogram(np.random.default_rng(1), 0.8)
    written = write_report(minimal_report, {"federated": h}, tmp_path)
    names = {p.name for p in written}
    assert names == {"report.json", "roc.png", "scores.png", "calibration.png", "report.md"}, (
        "no training data"
    )
    md = (tmp_path / "report.md").read_text()
    assert "Bayes bound: unavailable (no truth file)" in md
    assert "no debt query keys configured" in md
    assert "Cost of federation: not measured" in md
    assert "n/a" in md and "platform ledgers" in md
    assert "](training.png)" not in md
    assert "## Calibration and stability" in md  # the plot, from the histogram
    assert "Brier score and PSI: not reported by this run" in md  # none invented
    assert json.loads((tmp_path / "report.json").read_text())["federated"]["auc"] is None


def test_nothing_to_plot_writes_json_and_markdown_only(tmp_path: Path) -> None:
    (tmp_path / "training.png").write_bytes(PNG_MAGIC)  # stale, from an earlier run
    written = write_report({"federated": {"auc": 0.7, "ks": 0.3, "n": 5}}, {}, tmp_path)
    assert [p.name for p in written] == ["report.json", "report.md"]
    assert not (tmp_path / "training.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "AUC 0.7000" in md and ".png" not in md


def test_degenerate_histogram_is_left_out_of_plots(tmp_path: Path) -> None:
    only_good = ScoreHistogram.of(np.full(50, 0.1), np.zeros(50, dtype=int))
    written = write_report({"federated": {"auc": None}}, {"federated": only_good}, tmp_path)
    assert [p.name for p in written] == ["report.json", "report.md"]


def test_failed_json_write_leaves_old_report_intact(tmp_path: Path, full_report, histograms):
    (tmp_path / "report.json").write_text('{"previous": true}\n')
    broken = dict(full_report, settings={"rounds": 5, "callback": object()})
    with pytest.raises(TypeError):
        write_report(broken, histograms, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_failed_first_write_leaves_no_report_json(tmp_path: Path, full_report, histograms):
    """json.dump streams: the failure comes after part of the file was written."""
    broken = dict(full_report, settings={"callback": object()})
    with pytest.raises(TypeError):
        write_report(broken, histograms, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_failed_rename_leaves_no_partial_file(tmp_path: Path, monkeypatch, full_report, histograms):
    def fail(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(demo_report.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(full_report, histograms, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_numpy_values_become_plain_json(tmp_path: Path) -> None:
    rep = {"federated": {"auc": np.float64(0.71), "ks": np.float32("nan"), "n": np.int64(9)}}
    write_report(rep, {}, tmp_path)
    back = json.loads((tmp_path / "report.json").read_text())
    assert back == {"federated": {"auc": 0.71, "ks": None, "n": 9}}
    assert not math.isnan(back["federated"]["auc"])


def test_privacy_keys_and_section(tmp_path: Path, full_report, histograms) -> None:
    """The issue's report contract: dp, membership_inference, calibration, secure_aggregation."""
    write_report(full_report, histograms, tmp_path)
    back = json.loads((tmp_path / "report.json").read_text())
    assert {"epsilon", "delta", "auc", "ks"} <= set(back["dp"])
    assert back["dp"]["epsilon"] == 1.0 and back["dp"]["delta"] == 1e-5
    for result in back["membership_inference"].values():
        assert {"attack_auc", "tpr_at_1pct_fpr"} <= set(result)
    assert set(back["calibration"]) == {"brier", "psi"}
    assert back["secure_aggregation"] is False
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Privacy")[1].split("\n## ")[0]
    assert "Secure aggregation of training sums**: off" in section
    assert "epsilon 1, delta 1e-05**: AUC 0.6444" in section
    assert "| 0.5 | 0.6301 |" in section and "| 4 | 0.6555 |" in section
    assert "| federated_dp_epsilon_1 | 0.6444 | 0.4987 | 0.99% |" in section
    # The DP twin of the centralized model: in report.json, its line and its attack's row.
    assert back["centralized_dp"]["epsilon"] == 1.0
    auc_drop = 0.6602 - back["centralized"]["auc"]
    assert f"pooled DP-SGD) at epsilon 1**: AUC 0.6602, KS 0.2100 ({auc_drop:+.4f}" in section
    assert "| centralized_dp_epsilon_1 | 0.6602 | 0.4991 | 0.98% |" in section
    assert "cross-platform totals at epsilon" not in section  # not in this report: no line
    assert "](privacy.png)" in section


def test_markdown_says_why_training_stopped(tmp_path: Path, full_report, histograms) -> None:
    because = "validation loss did not improve for 5 rounds (best 0.15500 at round 4)"
    report = {
        **full_report,
        "convergence": {
            "mlp": {
                "federated_cross_platform": {
                    "stopped_because": because,
                    "rounds_run": 9,
                    "best_round": 4,
                    "local_steps": 309,
                }
            }
        },
    }
    write_report(report, histograms, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert f"- federated + cross-platform totals: {because}; 309 local steps a round." in md
    assert "on the validation people" in md
    write_report(full_report, histograms, tmp_path / "without")  # older reports: no lines
    assert "local steps a round" not in (tmp_path / "without" / "report.md").read_text()
