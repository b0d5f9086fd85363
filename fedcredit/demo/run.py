"""``fedcredit demo``: data, federation on Flower's simulation engine, yardsticks, report.

Stages (each timed in ``report.json``'s ``seconds``):

1. ``datagen``: a synthetic population (skipped with ``--ledgers``, which uses existing
   ledgers, for example imported real data);
2. ``federation``: the bureau's ServerApp and one ClientApp per ledger on Flower's simulation
   engine (Ray): federated training, the encrypted debt query, the cross-platform model;
3. ``baselines``: the centralised yardstick (pooled raw data, demo only) and each platform's
   local-only model, on the same held-out borrowers;
4. ``checks``: every decrypted total against the generator's truth file;
5. ``report``: ``report.json``, ``report.md`` and PNG plots.

What needs a truth file (the Bayes bound, the total checks) is reported as unavailable for
``--ledgers`` runs rather than invented.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clients.ledger.store import LedgerError, open_ledger
from clients.platform_data import PlatformData, load_platform_data
from fedcredit.datagen.bayes import expected_auc
from fedcredit.demo import baselines
from protocols.metrics import ScoreHistogram, calibration_summary
from protocols.model import TREE_KINDS, TrainConfig, parse_model_kinds
from protocols.split import in_test_set
from protocols.tokens import write_federation_key
from server.federation import load_histograms

log = logging.getLogger(__name__)

Step = Callable[[str, int, int, str], None]
CONVERGENCE_KEYS = ("rounds_run", "best_round", "stopped_because", "local_steps", "log_transformed")


class DemoError(RuntimeError):
    pass


class DemoOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Three at least: with two, a platform's totals minus its own figures would be the other
    # platform's figures (docs/protocol.md), so the debt query refuses to run.
    platforms: int = Field(default=3, ge=3, le=50)
    borrowers: int = Field(default=100_000, ge=1_000)
    rounds: int = Field(default=20, ge=1, le=500)
    seed: int = Field(default=7, ge=0)
    out: Path = Path("demo-output")
    ledgers: list[str] | None = None
    model: str = "mlp,lr"
    key_bits: int = 2048
    test_share: float = Field(default=0.3, gt=0, lt=1)
    query_batch: int = Field(default=3000, ge=1)
    learning_rate: float = 0.05
    batch_size: int = 256
    secure_aggregation: bool = True
    stages: str = "train,query,cross"
    # Further run-config keys for the ServerApp (``fedcredit train`` forwards --dp-* here).
    run_config: dict[str, float | int | str | bool] = Field(default_factory=dict)
    # DP-SGD federations of the primary model (train only), one per epsilon; [] for none.
    # The report's ``dp`` is the one at epsilon 1 (or the smallest).
    dp_epsilons: list[float] = Field(default_factory=lambda: [0.5, 1.0, 4.0], max_length=8)
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    # Measured on the default data (docs/privacy.md): batch 1024 with clipping norm 3 and a
    # step of 0.2 beat batch 256 or 512 and norms 0.1-2 at epsilon 1.
    dp_clip_norm: float = Field(default=3.0, gt=0)
    dp_batch_size: int = Field(default=1024, ge=1)
    dp_learning_rate: float = Field(default=0.2, gt=0, le=1)

    @field_validator("dp_epsilons")
    @classmethod
    def _epsilons(cls, value: list[float]) -> list[float]:
        if any(not e > 0 for e in value) or len(set(value)) != len(value):
            raise ValueError("dp_epsilons must be distinct positive numbers")
        return sorted(value)

    @field_validator("model")
    @classmethod
    def _models(cls, value: str) -> str:
        return parse_model_kinds(value)


class _DropDeprecationNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _run_simulation(
    opts: DemoOptions,
    ledgers: list[str],
    fed_out: Path,
    mods: Sequence[Any] = (),
    dp_sweep: bool = False,
) -> dict[str, Any]:
    """The same ServerApp and ClientApp as deployment, on Flower's simulation engine.

    ``mods`` are Flower mods for every ClientApp (the test suite's wire recorder).
    ``dp_sweep`` adds the demo's DP-SGD federations (``opts.dp_epsilons``) to the same run.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    # ``run_simulation`` is Flower's Python entry point to the simulation engine in 1.41; it
    # warns that ``flwr run`` is preferred, which the demo cannot use (it needs the ledgers
    # of this process's datagen and its progress display). The warning says nothing new.
    logging.getLogger("flwr").addFilter(_DropDeprecationNotice())
    if not logging.getLogger().isEnabledFor(logging.INFO):
        # Flower logs every round at INFO (and DEBUG to its own handler); the progress
        # display and the report carry the same facts. `fedcredit -v` brings them back.
        logging.getLogger("flwr").setLevel(logging.WARNING)

    from clients.app import build_client_app
    from fedcredit.local_federation import start_local_federation
    from server.app import build_server_app

    # The key holder runs as its own process with its own keystore, and every platform has
    # its own identity and pinned roster, exactly as in a deployment.
    local = start_local_federation(ledgers, fed_out.parent / "parties", key_bits=opts.key_bits)
    overrides = {
        **local.overrides(),
        "out-dir": str(fed_out),
        "num-rounds": opts.rounds,
        "model": opts.model,
        "min-nodes": len(ledgers),
        "key-bits": opts.key_bits,
        "seed": opts.seed,
        "test-share": opts.test_share,
        "query-batch": opts.query_batch,
        "learning-rate": opts.learning_rate,
        "batch-size": opts.batch_size,
        "secure-aggregation": opts.secure_aggregation,
        "stages": opts.stages,
        **opts.run_config,
    }
    if dp_sweep and opts.dp_epsilons and opts.model.split(",")[0] not in TREE_KINDS:
        from fedcredit.demo import privacy

        sweep = privacy.sweep_overrides(
            opts.model.split(",")[0],
            opts.dp_epsilons,
            fed_out,
            opts.dp_delta,
            opts.dp_clip_norm,
            opts.dp_batch_size,
            opts.dp_learning_rate,
            _headline_epsilon(opts) if "cross" in opts.stages.split(",") else None,
        )
        server_app = privacy.server_app(overrides, sweep)
    else:
        server_app = build_server_app(overrides)
    cpus = os.cpu_count() or 1
    summary_path = fed_out / "federation.json"
    summary_path.unlink(missing_ok=True)
    try:
        run_simulation(
            server_app=server_app,
            client_app=build_client_app(
                ledgers, local.enrolment.identities, local.enrolment.roster, mods
            ),
            num_supernodes=len(ledgers),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": False},
            },
        )
    except Exception as exc:
        reason = f"{exc.__class__.__name__}: {exc}"
        if summary_path.exists():
            reason = json.loads(summary_path.read_text()).get("error", reason)
        raise DemoError(f"the federation failed: {reason}") from exc
    finally:
        local.close()
    if not summary_path.exists():
        raise DemoError(f"the federation wrote no summary ({summary_path})")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "ok":
        raise DemoError(f"the federation failed: {summary.get('error', 'unknown error')}")
    return summary


def _check_totals(ledgers: list[str], truth_path: Path) -> dict[str, Any]:
    """Every total the platforms received against the generator's truth file.

    Checked on what each platform stored (its ``received_totals``): the bureau never sees
    a token, and never reads a total.
    """
    from clients.received_totals import read_received_totals

    truth = pq.read_table(
        truth_path, columns=["token", "total_debt_fen", "active_loans", "lenders"]
    ).to_pydict()
    index = {t: i for i, t in enumerate(truth["token"])}
    cols = ("total_debt_fen", "active_loans", "lenders")
    mismatches = checked = 0
    for location in ledgers:
        for token, got in read_received_totals(location).items():
            checked += 1
            j = index.get(token)
            if j is None or got != tuple(truth[c][j] for c in cols):
                mismatches += 1
    return {
        "all_totals_match": mismatches == 0 and checked > 0,
        "mismatches": mismatches,
        "checked": checked,
    }


def _bayes_on_test_rows(platforms: list[PlatformData], truth_path: Path, share: float) -> float:
    truth = pq.read_table(truth_path, columns=["token", "true_pd"]).to_pydict()
    pd_of = dict(zip(truth["token"], truth["true_pd"], strict=True))
    values = []
    for data in platforms:
        mask = in_test_set(data.features.tokens, share) & data.labelled
        values += [pd_of[t] for t, keep in zip(data.features.tokens, mask, strict=True) if keep]
    return round(expected_auc(np.asarray(values)), 4)


def _metrics(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    return {k: entry[k] for k in ("auc", "ks", "n")} if entry else None


def _calibration_by_model(
    fed: dict[str, Any], kinds: list[str], central: dict[str, ScoreHistogram]
) -> dict[str, dict[str, Any]]:
    """Each model's calibration block, as the bureau computed it from summed histograms
    (``federation.json``); the centralized yardstick's from its own held-out scores (it has
    no training-row histogram, so no PSI)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        entry = {
            key: cal
            for key, feature_set in (("federated", "local"), ("federated_cross_platform", "cross"))
            if (cal := (fed["models"][kind].get(feature_set) or {}).get("calibration"))
        }
        if kind in central:
            entry["centralized"] = calibration_summary(central[kind])
        out[kind] = entry
    return out


def _headline_epsilon(opts: DemoOptions) -> float | None:
    """The report's ``dp`` epsilon: 1 if swept, else the first; the DP centralized and DP
    cross-platform models are trained at it only."""
    if not opts.dp_epsilons:
        return None
    return 1.0 if 1.0 in opts.dp_epsilons else opts.dp_epsilons[0]


def _privacy(
    opts: DemoOptions,
    fed: dict[str, Any],
    fed_out: Path,
    platforms: list[PlatformData],
    central_predict: Any,
    cfg: TrainConfig,
    step: Step,
) -> dict[str, Any]:
    """The DP federations' results and the membership attacks against every model."""
    from fedcredit.demo import privacy

    primary = opts.model.split(",")[0]
    if primary in TREE_KINDS:  # DP-SGD and the attacks' model loading are for torch models
        return {"dp": None, "dp_sweep": [], "membership_inference": {}}
    sweep = privacy.read_sweep(fed_out, primary, opts.dp_epsilons)
    has_cross = "cross" in fed["features"]
    e = _headline_epsilon(opts)
    central_dp = cross_dp = None
    if e is not None:
        step("privacy", 0, 0, f"DP-SGD centralized model at epsilon {e:g}")
        dp_cfg = TrainConfig(
            learning_rate=opts.dp_learning_rate, batch_size=opts.dp_batch_size, seed=opts.seed
        )
        budget = baselines.PooledDP(e, opts.dp_delta, opts.dp_clip_norm)
        features = fed["features"]["local"]
        central_dp = baselines.centralized(
            platforms, primary, features, has_cross, opts.test_share, opts.rounds, dp_cfg, dp=budget
        )
        if has_cross:
            cross_dp = privacy.read_cross(fed_out, primary, e)
    step("privacy", 0, 0, "membership-inference attacks")
    attacks = privacy.attack_models(
        platforms,
        primary,
        fed["features"]["local"],
        "cross" in fed["features"],
        fed_out,
        central_predict,
        opts.dp_epsilons,
        opts.test_share,
        opts.rounds,
        cfg,
        opts.seed,
        centralized_dp=None if central_dp is None else (e, central_dp.predict),
        cross_dp_epsilon=e if cross_dp is not None else None,
    )
    for entry in sweep:
        attack = attacks[f"federated_dp_epsilon_{entry['epsilon']:g}"]
        entry.update(attack_auc=attack["attack_auc"], tpr_at_1pct_fpr=attack["tpr_at_1pct_fpr"])
        entry["batch_size"], entry["learning_rate"] = opts.dp_batch_size, opts.dp_learning_rate
    headline = next((s for s in sweep if s["epsilon"] == e), None)
    extra: dict[str, Any] = {}
    if central_dp is not None:
        extra["centralized_dp"] = {**central_dp.metrics, **(central_dp.privacy or {})}
    if cross_dp is not None:
        extra["federated_cross_platform_dp"] = cross_dp
    for key, entry in extra.items():
        attack = attacks[f"{key.removesuffix('_dp')}_dp_epsilon_{e:g}"]
        entry.update(attack_auc=attack["attack_auc"], tpr_at_1pct_fpr=attack["tpr_at_1pct_fpr"])
        entry["batch_size"], entry["learning_rate"] = opts.dp_batch_size, opts.dp_learning_rate
    return {"dp": headline, "dp_sweep": sweep, **extra, "membership_inference": attacks}


def _with_model_aucs(
    privacy: dict[str, Any],
    by_model: dict[str, Any],
    fed_m: dict[str, Any] | None,
    cross_m: dict[str, Any] | None,
) -> dict[str, Any]:
    """The attack results with each attacked model's own held-out AUC beside them."""
    aucs = {
        "centralized": (by_model.get("centralized") or {}).get("auc"),
        "federated": (fed_m or {}).get("auc"),
        "federated_cross_platform": (cross_m or {}).get("auc"),
        **{f"federated_dp_epsilon_{s['epsilon']:g}": s["auc"] for s in privacy["dp_sweep"]},
        **{
            f"{key.removesuffix('_dp')}_dp_epsilon_{privacy[key]['epsilon']:g}": privacy[key]["auc"]
            for key in ("centralized_dp", "federated_cross_platform_dp")
            if privacy.get(key)
        },
    }
    attacks = {
        name: {"model_auc": aucs.get(name), **result}
        for name, result in privacy["membership_inference"].items()
    }
    return {**privacy, "membership_inference": attacks}


def run_demo(opts: DemoOptions, step: Step) -> tuple[dict[str, Any], list[Path]]:
    """The whole pipeline; returns the report dict and the files written."""
    from fedcredit.demo.report import write_report

    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    unavailable: dict[str, str] = {}
    truth_path: Path | None = None
    summary_meta: dict[str, Any] = {}

    t = time.perf_counter()
    if opts.ledgers:
        ledgers = list(opts.ledgers)
        if len(ledgers) < 3:
            raise DemoError(
                f"--ledgers: {len(ledgers)} given; the private debt query needs at least three "
                "platforms (with two, each would learn the other's figures from the totals)"
            )
        for location in ledgers:  # a clear error now, not a failed node inside Ray later
            try:
                with open_ledger(location) as ledger:
                    ledger.check_schema()
            except LedgerError as exc:
                raise DemoError(f"--ledgers: {exc}") from None
        source = "ledgers"
        unavailable["bayes_auc"] = "real ledgers carry no true default probabilities"
        unavailable["all_totals_match"] = "no truth file to check the decrypted totals against"
    else:
        from fedcredit.datagen.config import PopulationConfig
        from fedcredit.datagen.generate import generate, seeded_federation_key

        step("generating data", 0, 0, f"{opts.borrowers:,} borrowers, {opts.platforms} platforms")
        data_dir = out / "data"
        if data_dir.exists():
            import shutil

            shutil.rmtree(data_dir)
        # A federation key derived from the seed, for synthetic demo data only: the tokens, and
        # so the held-out split, are then the same on every run of the same command, which
        # makes the figures reproducible. Real deployments use `fedcredit key generate`.
        data_dir.mkdir(parents=True)
        key_file = data_dir / "federation.key"
        write_federation_key(key_file, seeded_federation_key(opts.seed))
        result = generate(
            PopulationConfig(platforms=opts.platforms, borrowers=opts.borrowers, seed=opts.seed),
            data_dir,
            key_file=key_file,
        )
        ledgers = [str(p.ledger) for p in result.platforms]
        truth_path = Path(result.truth)
        summary_meta = {"bayes_auc": result.bayes_auc}
        source = "synthetic"
    seconds["datagen"] = time.perf_counter() - t

    t = time.perf_counter()
    step("federation", 0, 0, "starting Flower's simulation engine")
    fed_out = out / "federation"
    fed = _run_simulation(opts, ledgers, fed_out, dp_sweep=True)
    seconds["federation"] = time.perf_counter() - t

    t = time.perf_counter()
    platforms = [load_platform_data(loc) for loc in ledgers]
    kinds = opts.model.split(",")
    primary = kinds[0]
    features = fed["features"]["local"]
    has_cross = "cross" in fed["features"]
    cfg = TrainConfig(learning_rate=opts.learning_rate, batch_size=opts.batch_size, seed=opts.seed)
    by_model: dict[str, dict[str, Any]] = {}
    central_hist: ScoreHistogram | None = None
    central_predict = None
    central_hists: dict[str, ScoreHistogram] = {}
    for i, kind in enumerate(kinds):
        step("baselines", i, len(kinds) + 1, f"centralized {kind}")
        entry: dict[str, Any] = {
            "federated": _metrics(fed["models"][kind].get("local")),
            "federated_cross_platform": _metrics(fed["models"][kind].get("cross")),
        }
        local_fit = baselines.centralized(
            platforms, kind, features, False, opts.test_share, opts.rounds, cfg
        )
        entry["centralized_local_features"] = local_fit.metrics
        central = local_fit
        if has_cross:
            central = baselines.centralized(
                platforms, kind, features, True, opts.test_share, opts.rounds, cfg
            )
        entry["centralized"] = central.metrics
        # The pooled yardstick stops by the same rule as the federation (baselines.py).
        entry["centralized_training"] = {
            "passes_run": central.passes_run,
            "best_pass": central.best_pass,
        }
        by_model[kind] = entry
        central_hists[kind] = central.histogram
        if kind == primary:
            central_hist = central.histogram
            central_predict = central.predict
    step("baselines", len(kinds), len(kinds) + 1, "local-only models")
    local_only: dict[str, Any] = {}
    histograms: dict[str, ScoreHistogram] = {}
    for data in platforms:
        fit = baselines.local_only(data, primary, opts.test_share, opts.rounds, cfg)
        local_only[data.platform] = fit.metrics
        histograms[f"local_only:{data.platform}"] = fit.histogram
    seconds["baselines"] = time.perf_counter() - t

    t = time.perf_counter()
    privacy_report = _privacy(opts, fed, fed_out, platforms, central_predict, cfg, step)
    seconds["privacy"] = time.perf_counter() - t

    t = time.perf_counter()
    queries: dict[str, Any] = dict(fed.get("queries") or {})
    bayes: float | None = None
    bayes_rows: float | None = None
    if truth_path is not None:
        step("checks", 0, 0, "decrypted totals against the truth file")
        queries.update(_check_totals(ledgers, truth_path))
        bayes = round(float(summary_meta["bayes_auc"]), 4)
        bayes_rows = _bayes_on_test_rows(platforms, truth_path, opts.test_share)
    else:
        queries.update(all_totals_match=None, mismatches=None)
    seconds["checks"] = time.perf_counter() - t

    t = time.perf_counter()
    fed_hists = load_histograms(fed_out / "evaluation-histograms.npz")
    for key, feature_set in (("federated", "local"), ("federated_cross_platform", "cross")):
        parts = fed_hists.get(f"{primary}-{feature_set}", {})
        if parts:
            histograms[key] = sum(parts.values(), ScoreHistogram.empty())
    if central_hist is not None:
        histograms["centralized"] = central_hist
    models = fed["models"][primary]
    per_platform = {
        data.platform: {
            "local_only": local_only[data.platform],
            "federated": models.get("local", {}).get("per_platform", {}).get(data.platform),
            "federated_cross_platform": models.get("cross", {})
            .get("per_platform", {})
            .get(data.platform),
        }
        for data in platforms
    }
    details = fed.get("platform_details", [])
    fed_m, cross_m = _metrics(models.get("local")), _metrics(models.get("cross"))
    calibration_by_model = _calibration_by_model(fed, kinds, central_hists)
    calibrated_key = "federated_cross_platform" if cross_m else "federated"
    calibrated = calibration_by_model[primary].get(calibrated_key)
    report: dict[str, Any] = {
        "data": {
            "source": source,
            "platforms": [d.platform for d in platforms],
            "borrowers": opts.borrowers if source == "synthetic" else None,
            "seed": opts.seed if source == "synthetic" else None,
            "test_share": opts.test_share,
            "train_rows": sum(d["train_rows"] for d in details),
            "test_rows": sum(d["test_rows"] for d in details),
        },
        # The Bayes bound on the same held-out rows the models are scored on: the ceiling no
        # model can beat there. The generator's population figure weighs each person once,
        # while the rows weigh a person once per platform (multi-platform borrowers are
        # riskier), so it is lower and not comparable; it is kept for reference.
        "bayes_auc": bayes_rows,
        "bayes_auc_population": bayes,
        "primary_model": primary,
        "centralized": by_model[primary]["centralized"],
        "centralized_local_features": by_model[primary]["centralized_local_features"],
        "federated": fed_m,
        "federated_cross_platform": cross_m,
        "lift": {
            "auc": round(cross_m["auc"] - fed_m["auc"], 4),
            "gini": round(2 * (cross_m["auc"] - fed_m["auc"]), 4),
        }
        if fed_m and cross_m
        else None,
        # Calibration and stability of the headline model (federated + cross-platform, or
        # federated alone without the cross model), from the bureau's summed histograms.
        "calibration": {"brier": calibrated["brier"], "psi": calibrated["psi"]}
        if calibrated
        else None,
        "calibration_detail": {"model": calibrated_key, **calibrated} if calibrated else None,
        **_with_model_aucs(privacy_report, by_model[primary], fed_m, cross_m),
        "local_only": local_only,
        "per_platform": per_platform,
        "by_model": by_model,
        "calibration_by_model": calibration_by_model,
        "training": {
            "federated": models.get("local", {}).get("history", []),
            "federated_cross_platform": models.get("cross", {}).get("history", []),
        },
        # Why each federated training stopped, after how many rounds, with how many local
        # steps a round and which features were log-transformed; by model kind.
        "convergence": {
            kind: {
                key: {k: entry[k] for k in CONVERGENCE_KEYS if k in entry}
                for key, feature_set in (
                    ("federated", "local"),
                    ("federated_cross_platform", "cross"),
                )
                if (entry := fed["models"][kind].get(feature_set))
            }
            for kind in kinds
        },
        "queries": queries,
        "secure_aggregation": fed.get("secure_aggregation"),
        "unavailable": unavailable,
        "settings": {**opts.model_dump(mode="json"), "federation": fed.get("settings")},
    }
    if not has_cross:
        unavailable["federated_cross_platform"] = fed.get("cross_skipped", "not run")
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    step("report", 0, 0, "writing report.json, report.md and plots")
    written = write_report(report, histograms, out)
    return report, written
