"""The demo's privacy comparison: DP-SGD federations at a few epsilons, and the attacks.

``server_app`` is the demo's ServerApp: the bureau's whole run (``run_federation``) and then,
on the same simulated platforms, one train-only federation of the primary model per epsilon
of the sweep with DP-SGD on (``dp-epsilon``), each into its own directory. At the headline
epsilon that federation trains the cross-platform feature set too (stages ``train,cross``):
the totals the bureau's run delivered are still in each node's state (the same run), so no
second private query is needed. One simulation engine start serves them all.

``attack_models`` then runs both membership-inference attacks (``fedcredit.privacy``)
against every model the demo trained: the centralized yardstick and its DP-SGD twin, the
federated models with and without cross-platform totals, and the DP federated models (own
features at every epsilon, cross-platform at the headline one). Members are the training rows
of the platforms, non-members their held-out borrowers; the demo holds every ledger (it builds
the pooled yardstick too), so it can play the attacker with the model's scores for any row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.platform_data import PlatformData
from fedcredit.demo import baselines
from fedcredit.privacy.membership import Fit, Predict, membership_inference
from protocols.model import TrainConfig, build_model, predict_proba
from protocols.robust_features import RobustTransform
from protocols.scaling import Scaler

log = logging.getLogger(__name__)

DP_DIR = "dp"


def dp_dir(fed_out: Path, epsilon: float) -> Path:
    return fed_out / DP_DIR / f"epsilon-{epsilon:g}"


def sweep_overrides(
    primary: str,
    epsilons: Sequence[float],
    fed_out: Path,
    delta: float,
    clip_norm: float,
    batch_size: int,
    learning_rate: float,
    cross_at: float | None = None,
) -> list[dict[str, object]]:
    """Run-config overrides of each DP federation: train only, the primary model only.

    DP-SGD gets its own batch size and learning rate: its noise is added once per batch, so
    larger batches (and a step size to match) carry more signal per unit of noise.
    At epsilon ``cross_at`` the federation trains the cross-platform feature set too, on the
    totals the bureau's run delivered to every node earlier in the same run (node state).
    """
    return [
        {
            "stages": "train,cross" if cross_at is not None and e == cross_at else "train",
            "model": primary,
            "dp-epsilon": float(e),
            "dp-delta": delta,
            "dp-clip-norm": clip_norm,
            "batch-size": batch_size,
            "learning-rate": learning_rate,
            # One local epoch a round: DP-SGD pays for every step, and the bureau's automatic
            # minimum of steps (protocols/local_work.py) would multiply them, and the noise.
            "local-steps": 1,
            # Every planned round: the noise is planned for all of them, and early stopping
            # on a noisy validation loss kept round 2 of a model whose AUC rose to round 20.
            "validation-share": 0.0,
            "out-dir": str(dp_dir(fed_out, e)),
        }
        for e in epsilons
    ]


def server_app(overrides: Mapping[str, object], sweep: Sequence[Mapping[str, object]]) -> ServerApp:
    """The bureau's run, then each DP federation of the sweep, on the same grid (the
    cross-platform one only where the bureau's run delivered totals)."""
    from server.federation import run_federation
    from server.settings import FederationSettings

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        base = {**dict(context.run_config), **dict(overrides)}
        done = run_federation(grid, FederationSettings.from_run_config(base))
        for extra in sweep:
            if "cross" not in done["features"]:  # no totals delivered: own features only
                extra = {**extra, "stages": "train"}
            run_federation(grid, FederationSettings.from_run_config({**base, **extra}))

    return app


def read_sweep(fed_out: Path, primary: str, epsilons: Sequence[float]) -> list[dict[str, Any]]:
    """Each DP federation's held-out metrics and privacy record, by epsilon."""
    out = []
    for e in epsilons:
        summary = json.loads((dp_dir(fed_out, e) / "federation.json").read_text())
        if summary.get("status") != "ok":
            raise RuntimeError(f"the DP federation at epsilon {e:g} failed: {summary.get('error')}")
        entry = summary["models"][primary]["local"]
        out.append({"auc": entry["auc"], "ks": entry["ks"], "n": entry["n"], **entry["privacy"]})
    return out


def read_cross(fed_out: Path, primary: str, epsilon: float) -> dict[str, Any]:
    """The DP cross-platform federation's held-out metrics and privacy record."""
    summary = json.loads((dp_dir(fed_out, epsilon) / "federation.json").read_text())
    entry = summary["models"][primary]["cross"]
    return {"auc": entry["auc"], "ks": entry["ks"], "n": entry["n"], **entry["privacy"]}


def _saved_model(directory: Path, kind: str, feature_set: str) -> Predict:
    """A model the federation saved, as the function from raw rows to probabilities."""
    meta = json.loads((directory / f"model-{kind}-{feature_set}.json").read_text())
    model = build_model(kind, len(meta["features"]))
    model.load_state_dict(torch.load(directory / meta["weights_file"], weights_only=True))
    scaler = Scaler(np.asarray(meta["scaler"]["mean"]), np.asarray(meta["scaler"]["std"]))
    spec = meta.get("robust_transform")
    robust = RobustTransform.from_dict(spec) if spec else None

    def predict(X: np.ndarray) -> np.ndarray:
        return predict_proba(model, scaler.transform(X if robust is None else robust.transform(X)))

    return predict


def _shadow_fit(kind: str, passes: int, cfg: TrainConfig) -> Fit:
    """The attacker trains its shadow the way the target was trained (same model, passes and
    step size, pooled). Cached by the rows: every target of a feature set gets the same
    attacker data, so the same shadow."""
    cache: dict[str, Predict] = {}

    def fit(X: np.ndarray, y: np.ndarray) -> Predict:
        key = hashlib.sha256(np.ascontiguousarray(X).tobytes() + y.tobytes()).hexdigest()
        if key not in cache:
            trained = baselines.train_pooled(kind, X, y, passes, cfg)
            cache[key] = trained
        return cache[key]

    return fit


def attack_models(
    platforms: list[PlatformData],
    kind: str,
    features: list[str],
    has_cross: bool,
    fed_out: Path,
    centralized: Predict | None,
    sweep_epsilons: Sequence[float],
    test_share: float,
    passes: int,
    cfg: TrainConfig,
    seed: int,
    centralized_dp: tuple[float, Predict] | None = None,
    cross_dp_epsilon: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Model name -> both attacks' results (the stronger one as the headline).

    ``centralized_dp`` is the pooled DP-SGD model (its epsilon, its predictor);
    ``cross_dp_epsilon`` the epsilon whose DP federation also trained the cross feature set."""
    fit = _shadow_fit(kind, passes, cfg)
    rows = {
        fs: baselines.pooled_rows(platforms, features, fs == "cross", test_share)
        for fs in ("local", "cross")[: 1 + has_cross]
    }
    targets: list[tuple[str, str, Predict]] = []
    if centralized is not None:
        targets.append(("centralized", "cross" if "cross" in rows else "local", centralized))
    if centralized_dp is not None:
        name = f"centralized_dp_epsilon_{centralized_dp[0]:g}"
        targets.append((name, "cross" if "cross" in rows else "local", centralized_dp[1]))
    targets.append(("federated", "local", _saved_model(fed_out, kind, "local")))
    if "cross" in rows:
        targets.append(("federated_cross_platform", "cross", _saved_model(fed_out, kind, "cross")))
    for e in sweep_epsilons:
        dp_model = _saved_model(dp_dir(fed_out, e), kind, "local")
        targets.append((f"federated_dp_epsilon_{e:g}", "local", dp_model))
    if cross_dp_epsilon is not None and "cross" in rows:
        dp_cross = _saved_model(dp_dir(fed_out, cross_dp_epsilon), kind, "cross")
        name = f"federated_cross_platform_dp_epsilon_{cross_dp_epsilon:g}"
        targets.append((name, "cross", dp_cross))
    out: dict[str, dict[str, Any]] = {}
    for name, feature_set, predict in targets:
        X_tr, y_tr, X_te, y_te = rows[feature_set]
        out[name] = membership_inference(predict, (X_tr, y_tr), (X_te, y_te), fit, seed=seed)
        log.info("membership inference against %s: %s", name, out[name]["attack_auc"])
    return out
