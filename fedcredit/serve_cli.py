"""``fedcredit serve DIR``: start (or stop) the standing lender service on a deployment.

The federation of ``DIR`` must be up (``fedcredit deploy up DIR``, or each party started
from COMMANDS.md). ``serve`` writes ``DIR/bureau/serve.toml`` if it is missing (the API's
address, TLS files, the lender registry and the state folder), submits one ServerApp run with
``serve-config`` pointing at it (``flwr run``; the run opens a serving session and hosts the
HTTPS API, see ``server/lender_service.py``), and returns once ``GET /v1/health`` answers
over TLS. ``--stop`` asks the run to finish (a stop file the run polls) and waits for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from fedcredit.deploy.bundle import CONNECTION, toml_value
from server.lender_service import ServeConfig

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="start the lender-facing HTTPS API on a running deployment (docs/lender-query.md)",
    )
    p.add_argument("dir", type=Path, help="deployment folder from `fedcredit deploy init`")
    p.add_argument(
        "--port", type=int, default=None, help="API port (default: deploy init --serve-port)"
    )
    p.add_argument("--app", type=Path, default=REPO, help="the Flower app folder")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for health")
    p.add_argument("--hop-timeout", type=float, default=None, help="seconds per platform hop")
    p.add_argument("--stop", action="store_true", help="stop the service of DIR")
    p.set_defaults(func=cmd_serve)
    return p


def serve_config_path(out: Path) -> Path:
    return out / "bureau" / "serve.toml"


def ensure_serve_config(
    out: Path,
    port: int | None = None,
    hop_timeout: float | None = None,
    answer_timeout: float | None = None,
) -> ServeConfig:
    """The folder's serve.toml, written with defaults if missing; ``port`` overrides."""
    from fedcredit.deploy import load_manifest

    path = serve_config_path(out)
    manifest = load_manifest(out)
    if path.exists():
        config = ServeConfig.load(path)
    else:
        bureau = out / "bureau"
        config = ServeConfig(
            host=manifest.host,
            port=manifest.serve_port,
            tls_cert=str(bureau / "superlink.pem"),
            tls_key=str(bureau / "superlink.key"),
            lenders=str(bureau / "lenders.json"),
            state_dir=str(bureau / "serve-state"),
        )
    changes: dict[str, Any] = {}
    if port is not None:
        changes["port"] = port
    if hop_timeout is not None:
        changes["hop_timeout_s"] = hop_timeout
    if answer_timeout is not None:
        changes["answer_timeout_s"] = answer_timeout
    if port is not None and port != manifest.serve_port:
        log.warning(
            "the platforms dial the channel at port %d (deploy init --serve-port); on port %d "
            "every lender hop is a Flower message (seconds, not milliseconds)",
            manifest.serve_port,
            port,
        )
    if changes or not path.exists():
        config = ServeConfig.model_validate({**config.model_dump(), **changes})
        lines = ["# fedcredit serve: the lender API (server/lender_service.py ServeConfig)"]
        lines += [f"{k} = {toml_value(v)}" for k, v in config.model_dump().items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def api_url(config: ServeConfig) -> str:
    scheme = "https" if config.tls_cert else "http"
    return f"{scheme}://{config.host}:{config.port}"


def health(out: Path, config: ServeConfig, timeout: float = 5.0) -> dict[str, Any] | None:
    verify: Any = ssl.create_default_context(cafile=str(out / "ca" / "ca.pem"))
    try:
        r = httpx.get(f"{api_url(config)}/v1/health", verify=verify, timeout=timeout)
        return dict(r.json()) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def start(
    out: Path,
    *,
    port: int | None = None,
    app: Path = REPO,
    timeout: float = 300.0,
    hop_timeout: float | None = None,
    answer_timeout: float | None = None,
) -> dict[str, Any]:
    """Submit the standing run and wait for the API; returns its URL, run id and health."""
    from fedcredit.deploy.runner import flwr_json

    out = out.resolve()
    config = ensure_serve_config(out, port, hop_timeout, answer_timeout)
    stop_file = Path(config.state_dir) / "stop"
    stop_file.unlink(missing_ok=True)
    run_config = out / "bureau" / "serve-run-config.toml"
    run_config.write_text(
        (out / "bureau" / "run-config.toml").read_text(encoding="utf-8")
        + f"serve-config = {toml_value(str(serve_config_path(out)))}\n",
        encoding="utf-8",
    )
    submitted = flwr_json(
        out, "run", str(app), CONNECTION, "--run-config", str(run_config), timeout=120
    )
    run_id = submitted.get("run-id") or submitted.get("run_id")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = health(out, config)
        if found is not None:
            result = {"url": api_url(config), "run_id": run_id, "health": found}
            (Path(config.state_dir) / "service.json").write_text(json.dumps(result) + "\n")
            return result
        time.sleep(1.0)
    raise TimeoutError(f"the lender API did not answer at {api_url(config)} within {timeout} s")


def stop(out: Path, timeout: float = 60.0) -> bool:
    """Ask the standing run to finish; True once the API stopped answering."""
    out = out.resolve()
    config = ensure_serve_config(out)
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    (state / "stop").write_text("stop\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(out, config, timeout=2.0) is None:
            return True
        time.sleep(0.5)
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    if args.stop:
        ok = stop(args.dir)
        print("stopped" if ok else "the service still answers", file=sys.stderr)
        return 0 if ok else 1
    result = start(
        args.dir,
        port=args.port,
        app=args.app,
        timeout=args.timeout,
        hop_timeout=args.hop_timeout,
    )
    print(json.dumps(result, indent=2))
    return 0
