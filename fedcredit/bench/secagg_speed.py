"""``fedcredit bench secagg``: a FedAvg round with and without secure aggregation.

One simulation-engine run (Flower's Ray runtime, one ClientApp per platform ledger) trains the
same model twice over the same platforms: first with plain replies (the baseline), then with
every sum masked (``protocols.secure_sum``). Each training is timed inside the ServerApp, from
the federated scaler to the final evaluation, and divided by the number of rounds; Ray's
start-up and one untimed warm-up training (imports, ledgers opened) are outside both.
``ratio`` is ``secure_round_s / plain_round_s`` (target: at most 2 with 3 platforms). The
two trainings are interleaved ``repeats`` times and the medians kept, so a slow spell on a
shared machine does not land on one side only.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.generate import generate
from fedcredit.enrolment import enrol_platforms


def _server_app(settings: dict[str, Any], rounds: int, repeats: int, out: Path) -> ServerApp:
    from server.federation import common_features, describe_platforms, wait_for_nodes
    from server.settings import FederationSettings
    from server.training import train_federated

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        base = FederationSettings.model_validate({**settings, "num-rounds": rounds})
        nodes = wait_for_nodes(grid, base)
        descs = describe_platforms(grid, nodes, base)
        names = {n: d.platform for n, d in descs.items()}
        features = common_features(descs)
        # Warm-up, untimed: every actor imports torch and opens its ledger once.
        warm = base.model_copy(update={"secure_aggregation": False, "num_rounds": 1})
        train_federated(grid, nodes, warm.models[0], "local", features, warm, names)
        times: dict[str, list[float]] = {"plain": [], "secure": []}
        auc: dict[str, float] = {}
        for _ in range(repeats):
            for mode in ("plain", "secure"):
                run = base.model_copy(update={"secure_aggregation": mode == "secure"})
                t = time.perf_counter()
                trained = train_federated(grid, nodes, run.models[0], "local", features, run, names)
                times[mode].append((time.perf_counter() - t) / rounds)
                auc[mode] = trained.histogram.auc()
        (out / "bench.json").write_text(json.dumps({"times": times, "auc": auc}))

    return app


def run(
    platforms: int = 3,
    borrowers: int | None = None,
    rounds: int = 5,
    model: str = "mlp",
    seed: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Measure; ``borrowers`` defaults to 5,000 per platform."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from clients.app import build_client_app

    borrowers = borrowers or 5_000 * platforms
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedcredit-secagg-") as tmp:
        base = Path(tmp)
        population = generate(
            PopulationConfig(platforms=platforms, borrowers=borrowers, seed=seed), base / "data"
        )
        ledgers = [str(p.ledger) for p in population.platforms]
        enrolment = enrol_platforms(ledgers, base / "parties")
        settings = {
            "out-dir": str(base / "fed"),
            "stages": "train",
            "model": model,
            "min-nodes": platforms,
            "seed": seed,
        }
        cpus = os.cpu_count() or 1
        run_simulation(
            server_app=_server_app(settings, rounds, repeats, base),
            client_app=build_client_app(ledgers, enrolment.identities, enrolment.roster),
            num_supernodes=platforms,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": False},
            },
        )
        result_path = base / "bench.json"
        if not result_path.exists():
            raise RuntimeError("the benchmark's ServerApp did not finish (see the log above)")
        measured = json.loads(result_path.read_text())
    plain = statistics.median(measured["times"]["plain"])
    secure = statistics.median(measured["times"]["secure"])
    return {
        "benchmark": "secagg",
        "engine": "simulation",
        "platforms": platforms,
        "borrowers": borrowers,
        "model": model,
        "rounds": rounds,
        "repeats": repeats,
        "baseline": "the same FedAvg training with plain replies, in the same run",
        "plain_round_s": round(plain, 3),
        "secure_round_s": round(secure, 3),
        "ratio": round(secure / plain, 3),
        "target_ratio_at_most": 2.0,
        "auc": {k: round(v, 4) for k, v in measured["auc"].items()},
        "samples": {k: [round(x, 3) for x in v] for k, v in measured["times"].items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
