"""``fedcredit keyholder ...``: set up, rotate, inspect and serve the decryption-key holder.

Synopsis::

    fedcredit keyholder init   --keystore F SECRET [--bits 2048|3072] [--token-file F]
                               [--grace-hours 24] [--json]
    fedcredit keyholder rotate --keystore F SECRET [--bits 2048|3072] [--grace-hours H] [--json]
    fedcredit keyholder retire --keystore F SECRET --key-id ID [--json]
    fedcredit keyholder show   --keystore F [SECRET] [--json]
    fedcredit keyholder serve  --keystore F SECRET --listen HOST:PORT [--port-file F]
                               [--token-file F] [--min-participants 3] [--max-count 100000]
                               [--roster F] [--tls-cert F --tls-key F]

    SECRET is one of --passphrase-env VAR | --passphrase-file F | --key-file F

Why the secret is never a plain option: command lines are visible to every local user (``ps``)
and land in shell history; an environment variable or a 0600 file is not.

``register(subparsers)`` adds these to the main parser; ``python -m server.keyholder_service``
runs ``serve`` alone. Wrong input exits with status 2 and one line (``UsageError``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "add_secret_arguments",
    "add_serve_arguments",
    "cmd_init",
    "cmd_retire",
    "cmd_rotate",
    "cmd_serve",
    "cmd_show",
    "register",
    "run_command",
]


def _usage(message: str) -> Exception:
    # Imported at call time: fedcredit.cli imports this module, so a top-level import of
    # fedcredit.cli here would be circular.
    from fedcredit.cli import UsageError

    return UsageError(message)


def _print(text: str) -> None:
    from fedcredit.cli import out

    out.print(text, soft_wrap=True, markup=False)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command outside ``fedcredit.cli.main``: UsageError -> one line, status 2."""
    from fedcredit.cli import UsageError, err

    try:
        return int(func(args))
    except UsageError as exc:
        err.print(f"fedcredit: error: {exc}", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130


# -------------------------------------------------------------------------------- arguments


def add_secret_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--passphrase-env", metavar="VAR", help="env variable with the passphrase")
    group.add_argument("--passphrase-file", metavar="F", help="file holding the passphrase")
    group.add_argument(
        "--key-file", metavar="F", help="file with a raw 32-byte key in hex (init creates it)"
    )


def _bits_arguments(parser: argparse.ArgumentParser, default: int | None) -> None:
    parser.add_argument(
        "--bits", type=int, default=default, help="Paillier modulus size: 2048 or 3072"
    )
    # Tests only: allows --bits 1024. Hidden so that no operator reaches for it.
    parser.add_argument("--allow-insecure-test-size", action="store_true", help=argparse.SUPPRESS)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keystore", required=True, metavar="F", help="the keystore file")
    add_secret_arguments(parser)
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8470",
        metavar="HOST:PORT",
        help="address to bind (port 0: pick a free port); default 127.0.0.1:8470",
    )
    parser.add_argument("--port-file", metavar="F", help="write the bound port here once listening")
    parser.add_argument(
        "--token-file",
        metavar="F",
        help="file holding the bearer token (default: the token hash stored by init)",
    )
    parser.add_argument(
        "--min-participants", type=int, default=3, help="fewest platforms in a sum (>= 2)"
    )
    parser.add_argument(
        "--max-count", type=int, default=100_000, help="most ciphertexts in one request"
    )
    parser.add_argument(
        "--roster",
        metavar="F",
        help="the federation roster (fedcredit enrol): platforms' agreement keys, needed to "
        "seal totals for them",
    )
    parser.add_argument("--tls-cert", metavar="F", help="PEM certificate chain (enables HTTPS)")
    parser.add_argument("--tls-key", metavar="F", help="PEM private key of --tls-cert")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``keyholder`` and its subcommands to the main parser's subparsers."""
    kh = subparsers.add_parser(
        "keyholder", help="the decryption-key holder (a separate service from the coordinator)"
    ).add_subparsers(dest="keyholder_command", required=True)

    init = kh.add_parser("init", help="create a keystore with a fresh key pair")
    init.add_argument("--keystore", required=True, help="keystore file to create")
    add_secret_arguments(init)
    _bits_arguments(init, 2048)
    init.add_argument("--token-file", help="also create a bearer token for the coordinator here")
    init.add_argument(
        "--grace-hours",
        type=float,
        default=24.0,
        help="how long a rotated-out key still decrypts (default 24)",
    )
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=cmd_init)

    rot = kh.add_parser("rotate", help="new active key; the old one decrypts for the grace period")
    rot.add_argument("--keystore", required=True)
    add_secret_arguments(rot)
    _bits_arguments(rot, None)
    rot.add_argument("--grace-hours", type=float, help="override the keystore's grace period")
    rot.add_argument("--json", action="store_true")
    rot.set_defaults(func=cmd_rotate)

    ret = kh.add_parser("retire", help="erase a retired key's private half now")
    ret.add_argument("--keystore", required=True)
    add_secret_arguments(ret)
    ret.add_argument("--key-id", required=True)
    ret.add_argument("--json", action="store_true")
    ret.set_defaults(func=cmd_retire)

    show = kh.add_parser("show", help="key ids, statuses, bits, verify key (never secrets)")
    show.add_argument("--keystore", required=True)
    add_secret_arguments(show, required=False)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    srv = kh.add_parser("serve", help="run the key-holder HTTP service")
    add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)
    return kh


# ---------------------------------------------------------------------------------- helpers


def _secret(args: argparse.Namespace, *, create_key_file: bool = False):  # type: ignore[no-untyped-def]
    from server.keystore import KeystoreError, KeystoreSecret

    try:
        if args.passphrase_env:
            return KeystoreSecret.from_env(args.passphrase_env)
        if args.passphrase_file:
            return KeystoreSecret.from_passphrase_file(Path(args.passphrase_file))
        if args.key_file:
            path = Path(args.key_file)
            if create_key_file and not path.exists():
                KeystoreSecret.write_new_key_file(path)
                log.info("wrote a new key file %s", path)
            elif not path.exists():
                raise KeystoreError(f"no key file at {path}")
            return KeystoreSecret.from_key_file(path)
    except KeystoreError as exc:
        raise _usage(str(exc)) from None
    return None


def _check_bits(args: argparse.Namespace) -> None:
    if args.bits is None:
        return
    allowed = {2048, 3072} | ({1024} if args.allow_insecure_test_size else set())
    if args.bits not in allowed:
        raise _usage("--bits must be 2048 or 3072")


def _grace(hours: float | None) -> dt.timedelta | None:
    if hours is None:
        return None
    if not 0 < hours <= 24 * 365:
        raise _usage("--grace-hours must be above 0 and at most a year")
    return dt.timedelta(hours=hours)


def _open(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from server.keystore import Keystore, KeystoreError

    secret = _secret(args)
    try:
        return Keystore.open(Path(args.keystore), secret)
    except KeystoreError as exc:
        raise _usage(str(exc)) from None


def _emit(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for line in lines:
            _print(line)


def _keys_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"verify key (pin this on every platform): {summary['verify_key']}"]
    for k in summary["keys"]:
        extra = ""
        if k["status"] == "retired":
            extra = (
                f", decrypts until {k['decrypt_until']}"
                if k["can_decrypt"]
                else ", private half erased"
            )
        lines.append(f"key {k['key_id']}: {k['status']}, {k['bits']} bits{extra}")
    return lines


# --------------------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    from server.keystore import Keystore, KeystoreError, atomic_write, token_sha256

    _check_bits(args)
    path = Path(args.keystore)
    if path.exists():
        raise _usage(f"keystore {path} already exists; refusing to overwrite it")
    if not path.parent.is_dir():
        raise _usage(f"--keystore: no such directory: {path.parent}")
    token_file = Path(args.token_file) if args.token_file else None
    if token_file is not None and token_file.exists():
        raise _usage(f"--token-file: {token_file} exists; refusing to overwrite it")
    grace = _grace(args.grace_hours)
    assert grace is not None
    secret = _secret(args, create_key_file=True)
    token = secrets.token_urlsafe(32) if token_file else None
    try:
        store = Keystore.create(
            path,
            secret,
            bits=args.bits,
            allow_insecure_test_size=args.allow_insecure_test_size,
            token_sha256=token_sha256(token) if token else None,
            grace=grace,
        )
    except (KeystoreError, ValueError) as exc:
        raise _usage(str(exc)) from None
    if token_file is not None and token is not None:
        atomic_write(token_file, (token + "\n").encode())
    summary = store.summary()
    data = {**summary, "token_file": str(token_file) if token_file else None}
    lines = [f"created keystore {path}", *_keys_lines(summary)]
    if token_file:
        lines.append(f"bearer token for the coordinator: {token_file} (keep it secret)")
    _emit(args, data, lines)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from server.keystore import KeystoreError, locked

    _check_bits(args)
    grace = _grace(args.grace_hours)
    with locked(Path(args.keystore)):
        store = _open(args)
        old = store.active.key_id
        try:
            new = store.rotate(
                bits=args.bits, grace=grace, allow_insecure_test_size=args.allow_insecure_test_size
            )
            store.save()
        except (KeystoreError, ValueError) as exc:
            raise _usage(str(exc)) from None
    summary = store.summary()
    _emit(
        args,
        {**summary, "rotated_from": old, "rotated_to": new.key_id},
        [f"rotated: key {new.key_id} is active; {old} retired", *_keys_lines(summary)],
    )
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    from server.keystore import KeystoreError, locked

    with locked(Path(args.keystore)):
        store = _open(args)
        try:
            store.retire(args.key_id)
            store.purge_expired()
            store.save()
        except KeystoreError as exc:
            raise _usage(str(exc)) from None
    summary = store.summary()
    _emit(
        args,
        {**summary, "retired": args.key_id},
        [f"key {args.key_id}: private half erased", *_keys_lines(summary)],
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from server.keystore import FORMAT, KeystoreError, read_public

    if args.passphrase_env or args.passphrase_file or args.key_file:
        summary = {**_open(args).summary(), "verified": True}
    else:  # the public part only, without checking the seal
        try:
            doc = read_public(Path(args.keystore))
            keys = [
                {
                    "key_id": k["key_id"],
                    "bits": k["bits"],
                    "status": k["status"],
                    "created_at": k.get("created_at"),
                    "retired_at": k.get("retired_at"),
                    "decrypt_until": k.get("decrypt_until"),
                    "can_decrypt": k.get("private") is not None
                    and (
                        k["status"] == "active"
                        or dt.datetime.fromisoformat(k["decrypt_until"]) > dt.datetime.now(dt.UTC)
                    ),
                    "delivery_key": k.get("delivery_public", ""),
                }
                for k in doc["keys"]
            ]
            summary = {
                "keystore": args.keystore,
                "format": FORMAT,
                "verify_key": doc["signing_key"]["public"],
                "active_key_id": next(k["key_id"] for k in keys if k["status"] == "active"),
                "grace_seconds": doc["settings"]["grace_seconds"],
                "token_configured": bool((doc.get("auth") or {}).get("token_sha256")),
                "keys": keys,
                "verified": False,
            }
        except KeystoreError as exc:
            raise _usage(str(exc)) from None
        except (KeyError, TypeError, ValueError, StopIteration):
            raise _usage(f"keystore {args.keystore} is malformed") from None
    note = "" if summary["verified"] else " (unverified: give the secret to check the seal)"
    _emit(args, summary, [f"keystore {args.keystore}{note}", *_keys_lines(summary)])
    return 0


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _usage(f"--listen must be HOST:PORT (port 0-65535), got {text!r}")
    return host, int(port)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.keyholder import AuditLog, KeyHolderCore, ReplayGuard
    from server.keyholder_service import WatchedRoster, create_app, serve
    from server.keystore import KeystoreError, WatchedKeystore, locked, token_sha256

    host, port = _listen(args.listen)
    if args.min_participants < 2:
        raise _usage("--min-participants must be at least 2 (one would be a platform's own sum)")
    if args.max_count < 1:
        raise _usage("--max-count must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise _usage("--tls-cert and --tls-key go together")
    for opt in ("tls_cert", "tls_key"):
        value = getattr(args, opt)
        if value and not Path(value).is_file():
            raise _usage(f"--{opt.replace('_', '-')}: no such file: {value}")
    path = Path(args.keystore)
    with locked(path):  # erase expired private halves before serving
        store = _open(args)
        if store.purge_expired():
            store.save()
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise _usage(f"--token-file: cannot read {args.token_file}: {exc.strerror}") from None
        if len(token) < 16:
            raise _usage(f"--token-file: {args.token_file} holds no token of 16+ characters")
        digest = token_sha256(token)
        del token
    elif store.token_sha256:
        digest = store.token_sha256
    else:
        raise _usage("no bearer token: pass --token-file, or create one with init --token-file")
    try:
        watched = WatchedKeystore(path, _secret(args))
    except KeystoreError as exc:
        raise _usage(str(exc)) from None
    roster = None
    if args.roster:
        from protocols.identity import IdentityError

        try:
            roster = WatchedRoster(Path(args.roster))
        except (IdentityError, OSError) as exc:
            raise _usage(f"--roster: {exc}") from None
    core = KeyHolderCore(
        watched.current,
        replay=ReplayGuard(path.with_name(path.name + ".queries.sqlite")),
        audit=AuditLog(path.with_name(path.name + ".audit.jsonl")),
        min_participants=args.min_participants,
        max_count=args.max_count,
        roster=roster,
    )
    if not args.tls_cert and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s without TLS: the bearer token and sums travel in clear", host)
    for name in ("server", __name__):  # the service logs every request it refuses or serves
        logging.getLogger(name).setLevel(logging.INFO)
    log.info("key holder: keystore %s, active key %s", path, store.active.key_id)
    try:
        serve(
            create_app(core, digest),
            host,
            port,
            port_file=Path(args.port_file) if args.port_file else None,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
        )
    except OSError as exc:
        raise _usage(f"--listen {args.listen}: {exc.strerror or exc}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fedcredit.keyholder_cli ...``: the keyholder commands on their own."""
    parser = argparse.ArgumentParser(prog="fedcredit")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
