"""``fedcredit deploy init | up | down | status``: one command to a working federation.

Kept out of ``fedcredit/cli.py`` (one ``register`` call there) so that the deployment code,
which imports cryptography and the key holder, loads only when a ``deploy`` command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("fedcredit.deploy")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``deploy`` and its subcommands to the main parser's subparsers."""
    deploy = subparsers.add_parser(
        "deploy", help="write a deployment folder (keys, certificates, configs) and run it"
    )
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    init = sub.add_parser("init", help="write everything a bureau and its platforms need")
    init.add_argument("--platforms", type=int, required=True, help="number of platforms (>= 2)")
    init.add_argument("--out", required=True, help="the deployment folder to create")
    init.add_argument(
        "--host",
        default="127.0.0.1",
        help="the bureau's address (SuperLink, key holder); default 127.0.0.1",
    )
    init.add_argument(
        "--ledgers", help="comma-separated ledgers, one per platform (default: synthetic data)"
    )
    init.add_argument(
        "--borrowers", type=int, default=5_000, help="synthetic population size (no --ledgers)"
    )
    init.add_argument("--seed", type=int, default=0, help="synthetic population seed")
    init.add_argument("--lenders", type=int, default=2, help="lender credentials to create")
    init.add_argument(
        "--key-bits", type=int, default=2048, choices=[2048, 3072], help="Paillier modulus"
    )
    init.add_argument("--superlink-port", type=int, default=9092)
    init.add_argument("--keyholder-port", type=int, default=8470)
    init.add_argument(
        "--serve-port",
        type=int,
        default=8480,
        help="the lender API's port; platforms dial it for lender hops (the channel)",
    )
    init.add_argument(
        "--supernode-port",
        type=int,
        default=9094,
        help="first SuperNode Runtime API port (one per platform, consecutive)",
    )
    init.add_argument(
        "--no-node-auth",
        dest="node_auth",
        action="store_false",
        help="do not turn on Flower's SuperNode authentication (keys are still written)",
    )
    init.add_argument("--json", action="store_true", help="print the manifest as JSON")
    init.set_defaults(func=cmd_init)

    up = sub.add_parser("up", help="start the folder's whole federation on loopback")
    up.add_argument("dir")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for startup")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop everything `up` started, by pid")
    down.add_argument("dir")
    down.add_argument("--timeout", type=float, default=15.0, help="seconds before SIGKILL")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="which recorded processes run; SuperNodes online")
    status.add_argument("dir")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    return deploy


def _fail(message: str) -> Exception:
    from fedcredit.cli import UsageError

    return UsageError(message)


def cmd_init(args: argparse.Namespace) -> int:
    from fedcredit.deploy import DeployError, init

    ledgers = [x.strip() for x in args.ledgers.split(",") if x.strip()] if args.ledgers else None
    try:
        manifest = init(
            args.platforms,
            Path(args.out),
            host=args.host,
            ledgers=ledgers,
            borrowers=args.borrowers,
            seed=args.seed,
            lenders=args.lenders,
            key_bits=args.key_bits,
            superlink_port=args.superlink_port,
            keyholder_port=args.keyholder_port,
            serve_port=args.serve_port,
            supernode_base_port=args.supernode_port,
            node_auth=args.node_auth,
        )
    except (DeployError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if args.json:
        print(manifest.model_dump_json(indent=2))
    else:
        names = ", ".join(p.name for p in manifest.platforms)
        print(f"wrote {args.out}: bureau, {len(manifest.platforms)} platforms ({names}),")
        commands_file = Path(args.out) / "COMMANDS.md"
        print(f"{len(manifest.lenders)} lenders; the commands are in {commands_file}")
        print(f"try it: fedcredit deploy up {args.out}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from fedcredit.deploy import DeployError, up
    from fedcredit.deploy.bundle import party_commands
    from fedcredit.deploy.runner import running

    out = Path(args.dir)
    try:
        manifest = up(out, timeout=args.timeout)
    except DeployError as exc:
        raise _fail(str(exc)) from None
    for name, pid in running(out):
        print(f"{name}: pid {pid}")
    print(f"{len(manifest.platforms)} SuperNodes online; pids in {out / 'pids.json'}")
    commands = party_commands(out.resolve(), manifest, rel=out)
    print("run the app:")
    print(f"  {commands['run']}")
    print(f"  {commands['status']}")
    print(f"stop: fedcredit deploy down {out}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from fedcredit.deploy import DeployError, down

    try:
        survivors = down(Path(args.dir), timeout=args.timeout)
    except DeployError as exc:
        raise _fail(str(exc)) from None
    if survivors:
        print("still running after SIGKILL:", file=sys.stderr)
        for line in survivors:
            print(f"  {line}", file=sys.stderr)
        return 1
    print("stopped; no process left")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fedcredit.deploy import DeployError, load_manifest
    from fedcredit.deploy.runner import online_nodes, running

    out = Path(args.dir)
    try:
        manifest = load_manifest(out.resolve())
        alive = running(out.resolve()) if (out / "pids.json").exists() else []
    except DeployError as exc:
        raise _fail(str(exc)) from None
    online = online_nodes(out.resolve()) if alive else 0
    if args.json:
        doc = {
            "running": [{"name": n, "pid": p} for n, p in alive],
            "supernodes_online": online,
            "platforms": len(manifest.platforms),
        }
        print(json.dumps(doc, indent=2))
    else:
        for name, pid in alive:
            print(f"{name}: pid {pid}")
        print(f"{online}/{len(manifest.platforms)} SuperNodes online")
    return 0 if alive else 3
