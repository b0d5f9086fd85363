"""``fedcredit train``: the bureau's real training run, on ledgers or on a deployed federation.

Two ways to reach the platforms:

* ``--ledgers L1 L2 ...``: Flower's simulation engine over those ledgers, exactly as
  ``fedcredit demo --ledgers`` runs it (enrolled identities, pinned roster, the key holder as
  its own process), without the demo's yardsticks: no raw data is pooled.
* ``--federation NAME``: a deployment federation from ``$FLWR_HOME/config.toml``, through
  ``flwr run``; the ServerApp writes into ``--out`` on the SuperLink's machine (the bureau's),
  so run it there. ``--run-config FILE`` supplies the deployment's own keys (the key holder's
  address and token, from ``fedcredit deploy init``).

Either way ``--out`` receives the federation's models with their metadata
(``federation/model-*.pt`` and ``.json``), ``federation/federation.json``, and a report:
``report.json``, ``report.md`` and PNG plots (ROC, score distributions, calibration and the
per-round training curve), all from securely summed histograms unless
``--no-secure-aggregation``.

``--dp-epsilon`` and ``--dp-delta`` are forwarded as the run-config keys ``dp-epsilon`` and
``dp-delta`` only when given (the ServerApp validates them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


class TrainError(RuntimeError):
    """The run could not be started or did not finish; the message says why."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    train = sub.add_parser(
        "train",
        help="the bureau's training run: models, metadata and a report",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    where = train.add_mutually_exclusive_group(required=True)
    where.add_argument("--ledgers", nargs="+", metavar="LEDGER", help="simulation over these")
    where.add_argument("--federation", metavar="NAME", help="a deployment federation (flwr run)")
    train.add_argument(
        "--model", default="mlp", help="lr, mlp, gbdt or a comma list (first: primary)"
    )
    train.add_argument("--rounds", type=int, default=20, help="FedAvg rounds per model")
    train.add_argument(
        "--secure-aggregation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mask every training sum (default); --no-secure-aggregation sends plain replies",
    )
    train.add_argument("--dp-epsilon", type=float, help="forwarded as run config dp-epsilon")
    train.add_argument("--dp-delta", type=float, help="forwarded as run config dp-delta")
    train.add_argument(
        "--stages",
        default=None,
        help="train,query,cross (default; needs 3 platforms) or train",
    )
    train.add_argument("--run-config", help="--federation: a TOML file of further run config")
    train.add_argument("--app", default=str(REPO), help="--federation: the Flower app folder")
    train.add_argument("--out", default="fedcredit-train", help="output folder")
    train.add_argument("--json", action="store_true", help="print report.json to stdout")
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from fedcredit.cli import UsageError, out

    if not 1 <= args.rounds <= 500:
        raise UsageError("--rounds must be between 1 and 500")
    out_dir = Path(args.out).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out: {out_dir} exists and is not a directory")
    extra: dict[str, float] = {}
    if args.dp_epsilon is not None:
        extra["dp-epsilon"] = args.dp_epsilon
    if args.dp_delta is not None:
        extra["dp-delta"] = args.dp_delta
    try:
        if args.ledgers:
            stages = args.stages or ("train,query,cross" if len(args.ledgers) >= 3 else "train")
            summary = train_on_ledgers(
                args.ledgers,
                out_dir,
                args.model,
                args.rounds,
                args.secure_aggregation,
                stages,
                extra,
            )
        else:
            summary = train_on_federation(
                args.federation,
                out_dir,
                args.model,
                args.rounds,
                args.secure_aggregation,
                args.stages,
                extra,
                args.run_config,
                Path(args.app),
            )
        report, written = write_train_report(summary, out_dir)
    except TrainError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for key in ("federated", "federated_cross_platform"):
        entry = report.get(key)
        if entry:
            out.print(f"{key}: AUC {entry['auc']:.4f}, KS {entry['ks']:.4f}, n {entry['n']:,}")
    out.print(f"secure aggregation: {report['secure_aggregation']}")
    out.print("wrote: " + ", ".join(str(p) for p in written))
    return 0


def train_on_ledgers(
    ledgers: list[str],
    out_dir: Path,
    model: str,
    rounds: int,
    secure: bool,
    stages: str,
    extra: dict[str, float],
) -> dict[str, Any]:
    """The federation over ``ledgers`` on Flower's simulation engine (``fedcredit demo``'s)."""
    from pydantic import ValidationError

    from clients.ledger.store import LedgerError, open_ledger
    from fedcredit.demo.run import DemoError, DemoOptions, _run_simulation

    if "query" in stages and len(ledgers) < 3:
        raise TrainError(
            f"--ledgers: {len(ledgers)} given; the debt query (stages {stages}) needs at least "
            "three platforms. Use --stages train for training alone"
        )
    for location in ledgers:
        if "://" not in location and not Path(location).is_file():
            raise TrainError(f"--ledgers: no such ledger file: {location}")
        try:
            with open_ledger(location) as ledger:
                ledger.check_schema()
        except LedgerError as exc:
            raise TrainError(f"--ledgers: {exc}") from None
    try:
        opts = DemoOptions(
            ledgers=ledgers,
            out=out_dir,
            model=model,
            rounds=rounds,
            secure_aggregation=secure,
            stages=stages,
            run_config=extra,
        )
    except ValidationError as exc:
        raise TrainError("; ".join(str(e["msg"]) for e in exc.errors())) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_simulation(opts, ledgers, out_dir / "federation")
    except DemoError as exc:
        raise TrainError(str(exc)) from None


def flwr_run_command(app: Path, federation: str, run_config: Path) -> list[str]:
    """``flwr run APP FEDERATION --stream --run-config FILE`` (the flwr beside this Python)."""
    flwr = Path(sys.executable).with_name("flwr")
    binary = str(flwr) if flwr.exists() else (shutil.which("flwr") or "flwr")
    return [binary, "run", str(app), federation, "--stream", "--run-config", str(run_config)]


def federation_run_config(
    out_dir: Path,
    model: str,
    rounds: int,
    secure: bool,
    stages: str | None,
    extra: dict[str, float],
    base: Path | None,
) -> dict[str, Any]:
    """The run config for ``flwr run``: the deployment's file, then this command's keys."""
    config: dict[str, Any] = {}
    if base is not None:
        try:
            config.update(tomllib.loads(base.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TrainError(f"--run-config: {exc}") from None
    config.update(
        {
            "out-dir": str(out_dir / "federation"),
            "model": model,
            "num-rounds": rounds,
            "secure-aggregation": secure,
            **extra,
        }
    )
    if stages:
        config["stages"] = stages
    return config


def _toml(config: dict[str, Any]) -> str:
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        lines.append(f'"{key}" = {text}')
    return "\n".join(lines) + "\n"


def train_on_federation(
    federation: str,
    out_dir: Path,
    model: str,
    rounds: int,
    secure: bool,
    stages: str | None,
    extra: dict[str, float],
    run_config: str | None,
    app: Path,
) -> dict[str, Any]:
    """Start the run on a deployed federation and wait for its summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = federation_run_config(
        out_dir, model, rounds, secure, stages, extra, Path(run_config) if run_config else None
    )
    config_file = out_dir / "run-config.toml"
    config_file.write_text(_toml(config), encoding="utf-8")
    summary_path = out_dir / "federation" / "federation.json"
    summary_path.unlink(missing_ok=True)
    command = flwr_run_command(app, federation, config_file)
    log.info("running %s", " ".join(command))
    t = time.perf_counter()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise TrainError(
            f"`flwr run` exited {completed.returncode}: {completed.stderr[-2000:].strip()}"
        )
    # ``flwr run --stream`` exits 0 even when the run failed: the summary is the verdict.
    if not summary_path.exists():
        raise TrainError(
            f"the run wrote no {summary_path} after {time.perf_counter() - t:.0f} s: the "
            "ServerApp writes --out on the SuperLink's machine; run `fedcredit train` there"
        )
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "ok":
        raise TrainError(f"the federation failed: {summary.get('error', 'unknown error')}")
    return summary


def write_train_report(summary: dict[str, Any], out_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """report.json, report.md and the plots, in the demo report's shape, from the summary.

    Only what the bureau holds goes in: summed held-out histograms and per-round metrics.
    There is no centralised yardstick and no Bayes bound (no raw data is pooled, there is no
    truth file): they are listed under ``unavailable``.
    """
    from fedcredit.demo.report import write_report
    from server.federation import load_histograms

    fed_out = out_dir / "federation"
    primary = summary["primary_model"]
    models = summary["models"][primary]
    histograms = {}
    path = fed_out / "evaluation-histograms.npz"
    if path.exists():
        from protocols.metrics import ScoreHistogram

        loaded = load_histograms(path)
        for key, feature_set in (("federated", "local"), ("federated_cross_platform", "cross")):
            parts = loaded.get(f"{primary}-{feature_set}", {})
            if parts:
                histograms[key] = sum(parts.values(), ScoreHistogram.empty())
    headline = "cross" if "cross" in models else "local"
    calibrated = (models.get(headline) or {}).get("calibration")
    report: dict[str, Any] = {
        "data": {"source": "ledgers", "platforms": summary.get("platforms", [])},
        "primary_model": primary,
        "federated": _metrics(models.get("local")),
        "federated_cross_platform": _metrics(models.get("cross")),
        "secure_aggregation": summary.get("secure_aggregation"),
        "dp": _dp_of(models.get(headline)),
        "dropped": {k: v.get("dropped", {}) for k, v in models.items() if v.get("dropped")},
        "calibration": {"brier": calibrated["brier"], "psi": calibrated["psi"]}
        if calibrated
        else None,
        "calibration_detail": {"model": headline, **calibrated} if calibrated else None,
        "training": {
            "federated": (models.get("local") or {}).get("history", []),
            "federated_cross_platform": (models.get("cross") or {}).get("history", []),
        },
        "models": {
            kind: {fs: _model_files(entry) for fs, entry in sets.items()}
            for kind, sets in summary["models"].items()
        },
        "queries": summary.get("queries") or {},
        "unavailable": {
            "centralized": "fedcredit train never pools raw data (see fedcredit demo)",
            "bayes_auc": "real ledgers carry no true default probabilities",
            "per_platform": "the bureau holds only sums over platforms",
        },
        "settings": summary.get("settings"),
        "seconds": summary.get("seconds", {}),
    }
    if "cross" not in models:
        report["unavailable"]["federated_cross_platform"] = summary.get(
            "cross_skipped", "not run (stages)"
        )
    written = write_report(report, histograms, out_dir)
    md = out_dir / "report.md"
    md.write_text(
        md.read_text(encoding="utf-8").replace(
            "# fedcredit demo report", "# fedcredit train report", 1
        ),
        encoding="utf-8",
    )
    return report, written


def _dp_of(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline model's DP-SGD record (docs/privacy.md), or None without DP."""
    privacy = (entry or {}).get("privacy") or {}
    if privacy.get("mechanism", "none") == "none":
        return None
    return {"auc": entry["auc"], "ks": entry["ks"], **privacy}  # type: ignore[index]


def _metrics(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    return {k: entry[k] for k in ("auc", "ks", "n")} if entry else None


def _model_files(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "auc": entry.get("auc"),
        "ks": entry.get("ks"),
        "files": entry.get("files", {}),
        "secure_aggregation": entry.get("secure_aggregation"),
    }
