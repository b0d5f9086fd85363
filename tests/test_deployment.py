"""Our Flower app on Flower's real deployment engine: SuperLink + 3 SuperNodes, TLS, loopback.

Why: the simulation engine never exercises TLS, FAB packaging, ``--node-config``, the apps
running as separate processes spawned by SuperExec, or the Control API that reports a run's
status -- the places a deployment at the platforms breaks first. See tests/deployment.py.

Both tests are slow (they start ~10 processes); run them with ``pytest -m slow``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.deployment import Deployment, check_app_dir

log = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

NUM_NODES = 3
QUERY_LIMIT = 500
NUM_ROUNDS = 2
TOTAL_COLUMNS = ("token", "total_debt_fen", "active_loans", "lenders")

# ------------------------------------------------------------------------ plumbing (ping app)

PING_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pingapp"
version = "1.0.0"
description = "Throwaway app that checks the deployment plumbing of the fedcredit tests"
license = "Apache-2.0"
dependencies = ["flwr>=1.41.0"]

[tool.flwr.app]
publisher = "fedcredit-tests"

[tool.flwr.app.components]
serverapp = "pingapp.server_app:app"
clientapp = "pingapp.client_app:app"

[tool.flwr.app.config]
out-file = ""
num-nodes = 1
"""

PING_SERVER = '''\
"""Send one query.ping per SuperNode; write {node_id: ledger} of the replies to out-file."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    expected = int(context.run_config["num-nodes"])
    deadline = time.monotonic() + 60
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    messages = [
        Message(RecordDict({"ping": ConfigRecord({"hello": 1})}), node_id, "query.ping")
        for node_id in node_ids
    ]
    ledgers = {}
    for reply in grid.send_and_receive(messages, timeout=120):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error}")
        ledgers[str(reply.metadata.src_node_id)] = str(reply.content["pong"]["ledger"])
    Path(str(context.run_config["out-file"])).write_text(json.dumps(ledgers))
    if len(ledgers) != expected:
        raise RuntimeError(f"{len(ledgers)} of {expected} nodes replied")
'''

PING_CLIENT = '''\
"""Reply to query.ping with this SuperNode's --node-config ledger."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("ping")
def ping(msg: Message, context: Context) -> Message:
    ledger = str(context.node_config["ledger"])
    return Message(RecordDict({"pong": ConfigRecord({"ledger": ledger})}), reply_to=msg)
'''


@pytest.fixture
def ping_app(tmp_path: Path) -> Path:
    """A minimal Flower app on disk (a tmp dir of its own, so the FAB holds only it)."""
    app_dir = tmp_path / "pingapp"
    (app_dir / "pingapp").mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(PING_PYPROJECT)
    (app_dir / "pingapp" / "__init__.py").write_text("")
    (app_dir / "pingapp" / "server_app.py").write_text(PING_SERVER)
    (app_dir / "pingapp" / "client_app.py").write_text(PING_CLIENT)
    return app_dir


def test_deployment_plumbing(tmp_path: Path, ping_app: Path) -> None:
    """TLS, FABs, node-config, the Grid message API, run status and shutdown -- no ML."""
    # The ping app only echoes each node's config back: the files need not exist.
    ledgers = [str(tmp_path / f"platform-{i}" / "ledger.sqlite") for i in range(NUM_NODES)]
    out_file = tmp_path / "replies.json"
    deployment = Deployment(tmp_path / "deploy", [{"ledger": ledger} for ledger in ledgers])
    with deployment:
        result = deployment.run_app(
            ping_app, {"out-file": str(out_file), "num-nodes": NUM_NODES}, timeout=180
        )
        assert result.succeeded, result.report()
        assert out_file.exists(), result.report()
        replies = json.loads(out_file.read_text())
        assert sorted(replies.values()) == sorted(ledgers), result.report()
    assert deployment.surviving_processes() == []


# ------------------------------------------------------------------------------ fedcredit app


def missing_app_parts() -> list[str]:
    """What of the fedcredit Flower app's contract is not in the checkout (normally nothing)."""
    missing = [name for name in ("server/app.py", "clients/app.py") if not (REPO / name).exists()]
    if "[tool.flwr.app]" not in (REPO / "pyproject.toml").read_text(encoding="utf-8"):
        missing.append("[tool.flwr.app] in pyproject.toml")
    return missing


def test_fedcredit_on_deployment_engine(tmp_path: Path) -> None:
    """Train for 2 rounds and run an encrypted query batch over 3 TLS SuperNodes; check all.

    The decrypted cross-platform totals must equal the generator's truth exactly (Paillier
    is exact on integers), the model must beat chance, and every process must be gone.
    """
    if missing := missing_app_parts():
        pytest.skip(f"the fedcredit Flower app is incomplete: {', '.join(missing)}")
    check_app_dir(REPO)  # before spending a minute on data and processes

    from fedcredit.datagen.config import PopulationConfig
    from fedcredit.datagen.generate import generate
    from protocols.tokens import write_federation_key

    # A fixed federation key: tokens, hence the token-based test split, hence the AUC, are
    # the same on every run (with a fresh random key the AUC moved between 0.54 and 0.59).
    key_file = tmp_path / "federation.key"
    write_federation_key(key_file, hashlib.sha256(b"fedcredit deployment test").digest())
    summary = generate(
        PopulationConfig(platforms=NUM_NODES, borrowers=3000, seed=5),
        tmp_path / "data",
        key_file=key_file,
    )
    ledgers = [str(Path(p.ledger).resolve()) for p in summary.platforms]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run_config = {
        "out-dir": str(out_dir),
        "num-rounds": NUM_ROUNDS,
        "query-limit": QUERY_LIMIT,
        "model": "lr",
        # Also declared in [tool.flwr.app.config]. Two rounds of one epoch on ~700 training rows
        # a platform are a handful of SGD steps, too few to lift the AUC clearly above chance
        # (only ~35 test defaults); ten local epochs a round make "AUC > 0.5" a real check.
        "learning-rate": 0.02,
        "local-epochs": 10,
    }

    deployment = Deployment(tmp_path / "deploy", [{"ledger": ledger} for ledger in ledgers])
    with deployment:
        result = deployment.run_app(REPO, run_config, timeout=900)
        log.info("fedcredit run %s took %.1fs", result.run_id, result.elapsed)
        report = result.report
        assert result.succeeded, report()

        federation_file = out_dir / "federation.json"
        assert federation_file.exists(), f"no federation.json in {out_dir}\n{report()}"
        federation = json.loads(federation_file.read_text())
        assert federation["status"] == "ok", federation
        assert len(federation["platforms"]) == NUM_NODES, federation
        assert federation["queries"]["count"] == QUERY_LIMIT, federation
        auc = federation["federated"]["auc"]
        assert isinstance(auc, int | float) and math.isfinite(auc), federation
        assert 0.5 < auc <= 1.0, federation

        models = sorted(out_dir.glob("model-*.pt"))
        assert models, f"no model-*.pt in {out_dir}: {sorted(p.name for p in out_dir.iterdir())}"
        assert sorted(out_dir.glob("model-*.json")), f"no model metadata in {out_dir}"

        totals = pq.read_table(out_dir / "query-totals.parquet", columns=list(TOTAL_COLUMNS))
        truth = pq.read_table(summary.truth, columns=list(TOTAL_COLUMNS))
        expected = {row["token"]: row for row in truth.to_pylist()}
        rows = totals.to_pylist()
        assert len(rows) == QUERY_LIMIT
        assert len({row["token"] for row in rows}) == QUERY_LIMIT, "duplicate tokens"
        wrong = [
            (row, expected.get(row["token"])) for row in rows if expected.get(row["token"]) != row
        ]
        assert not wrong, (
            f"{len(wrong)} of {len(rows)} totals differ from the truth, e.g. {wrong[:3]}"
        )
    assert deployment.surviving_processes() == []
