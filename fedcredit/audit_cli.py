"""``fedcredit audit verify`` and ``fedcredit audit show``: anyone can check an inquiry record.

Both read either log an auditor may be handed: a platform's ledger (a SQLite path or a
SQLAlchemy URL; its ``query_log`` table) or the key holder's JSON-lines audit file. The input
is recognised by its content, not its name, so an auditor needs no knowledge of the layout.

``verify`` exits 0 and prints the entry count and head hash (the values to publish, so that a
later audit can use them as ``--expect-count`` / ``--expect-head``), 1 naming the first bad
entry, and 2 when the input is not a ledger or audit log at all. The checks and their limits
are described in ``protocols/audit_chain.py`` and docs/protocol.md ("Audit").

``show`` lists entries with only the fields that cannot identify anyone (counts, digests,
participants, key ids, reasons), and redacts any value that is a borrower token of the ledger
being read: the log should never hold one, and an auditor's screen is no place to find out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from protocols.audit_chain import (
    ChainEntry,
    ChainReport,
    keyholder_entries,
    parse_time,
    query_log_entry,
    verify_chain,
)

log = logging.getLogger("fedcredit.audit")

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX64_ANYWHERE = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")
_SQLITE_MAGIC = b"SQLite format 3\x00"
REDACTED = "[redacted]"

# Fields of an entry's detail (query log) or event (key holder) that ``show`` may print:
# counts, digests, participant and key names, reasons. Anything else is counted as hidden.
SAFE_FIELDS = frozenset(
    {
        "participants",
        "elements",
        "ciphertexts",
        "count",
        "sealed_rows",
        "applicants",
        "tokens",
        "elements_sha256",
        "reply_sha256",
        "key_id",
        "session_id",
        "lender",
        "purpose",
        "decision",
        "status",
        "code",
        "reason",
        "caller",
    }
)
_MAX_TEXT = 300


class AuditInputError(ValueError):
    """The input is neither a ledger with a query log nor a key-holder audit file."""


@dataclasses.dataclass
class LoadedLog:
    """A log read completely: what it is, its entries, and its ledger's token lookup."""

    kind: str  # "query_log" | "keyholder"
    source: str
    entries: list[ChainEntry]
    ledger_location: str | None = None


# ------------------------------------------------------------------------------ loading


def load_log(target: str) -> LoadedLog:
    """Recognise and read ``target``; ``AuditInputError`` if it is neither kind of log."""
    if "://" in target:
        return _load_ledger(target)
    path = Path(target).expanduser()
    if not path.exists():
        raise AuditInputError(f"{target}: no such file")
    if not path.is_file():
        raise AuditInputError(f"{target}: not a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise AuditInputError(f"{target}: cannot read: {exc}") from None
    if head == _SQLITE_MAGIC:
        return _load_ledger(target)
    return _load_keyholder_file(path, target)


def _load_ledger(target: str) -> LoadedLog:
    from sqlalchemy import inspect, select
    from sqlalchemy.exc import SQLAlchemyError

    from clients.ledger.store import LedgerError, open_ledger
    from clients.query_log import query_log

    try:
        ledger = open_ledger(target)
    except LedgerError as exc:
        raise AuditInputError(str(exc)) from None
    try:
        with ledger.engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            if "query_log" not in tables:
                if "ledger_meta" in tables:
                    # A ledger that never answered a query: an empty log (an anchor that
                    # expects entries then reports them as deleted).
                    log.info("%s: no query_log table; an empty query log", target)
                    return LoadedLog("query_log", target, [], target)
                raise AuditInputError(
                    f"{target}: a database without a query_log table: not a fedcredit ledger"
                )
            rows = conn.execute(select(query_log).order_by(query_log.c.seq)).mappings().all()
    except SQLAlchemyError as exc:
        raise AuditInputError(
            f"{target}: cannot read a query log ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:160]})"
        ) from None
    finally:
        ledger.close()
    entries = [query_log_entry(i + 1, row) for i, row in enumerate(rows)]
    return LoadedLog("query_log", target, entries, target)


def _load_keyholder_file(path: Path, target: str) -> LoadedLog:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AuditInputError(
            f"{target}: neither a SQLite ledger nor a text audit file (not UTF-8)"
        ) from None
    except OSError as exc:
        raise AuditInputError(f"{target}: cannot read: {exc}") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is not None:
        try:
            obj = json.loads(first)
        except (ValueError, RecursionError):
            obj = None
        if not (isinstance(obj, dict) and "prev" in obj and "hash" in obj):
            raise AuditInputError(
                f"{target}: not a ledger, and its first line is not a key-holder audit entry "
                "(a JSON object with 'prev' and 'hash')"
            )
    return LoadedLog("keyholder", target, keyholder_entries(lines))


# ------------------------------------------------------------------------------- verify


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``audit verify`` and ``audit show`` to ``fedcredit``'s subparsers."""
    audit = subparsers.add_parser(
        "audit", help="verify or list a hash-chained inquiry record (query log or audit file)"
    )
    sub = audit.add_subparsers(dest="audit_command", required=True)
    ver = sub.add_parser(
        "verify",
        help="check the hash chain; exit 0 intact, 1 naming the first bad entry, 2 bad input",
    )
    ver.add_argument("log", metavar="LEDGER_OR_LOG", help="ledger path/URL or key-holder file")
    ver.add_argument(
        "--expect-head", help="head hash published earlier (64 hex): catches truncation/rewrite"
    )
    ver.add_argument(
        "--expect-count", type=int, help="entry count published with that head (catches cuts)"
    )
    ver.add_argument("--json", action="store_true", help="machine-readable report")
    ver.set_defaults(func=cmd_audit_verify)

    show = sub.add_parser("show", help="list entries (never an identifier)")
    show.add_argument("log", metavar="LEDGER_OR_LOG", help="ledger path/URL or key-holder file")
    show.add_argument("--kind", help="only this kind (debt_profile, match_start, decrypt, ...)")
    show.add_argument("--lender", help="only entries recording this lender")
    show.add_argument("--since", help="only entries at or after this ISO 8601 time")
    show.add_argument("--json", action="store_true", help="entries as a JSON list")
    show.set_defaults(func=cmd_audit_show)
    return audit


def _refuse(args: argparse.Namespace, message: str) -> int:
    from fedcredit.cli import UsageError, _json_refusal

    if args.json:
        return _json_refusal([{"message": message}])
    raise UsageError(message)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    head = args.expect_head
    if head is not None and not _HEX64.fullmatch(head):
        return _refuse(args, "--expect-head must be 64 hex characters (a published head hash)")
    if args.expect_count is not None and args.expect_count < 0:
        return _refuse(args, "--expect-count must be 0 or more")
    try:
        loaded = load_log(args.log)
    except AuditInputError as exc:
        return _refuse(args, str(exc))
    report = verify_chain(
        loaded.entries,
        expect_head=head.lower() if head else None,
        expect_count=args.expect_count,
    )
    if args.json:
        print(json.dumps({"kind": loaded.kind, "source": loaded.source, **report.to_dict()}))
    else:
        _print_report(loaded, report)
    return 0 if report.ok else 1


def _print_report(loaded: LoadedLog, report: ChainReport) -> None:
    what = "query log" if loaded.kind == "query_log" else "key-holder audit log"
    for warning in report.warnings:
        print(f"warning: {warning}")
    if report.first_bad is not None:
        print(f"TAMPERED {what} {loaded.source}: {report.first_bad.message()}")
        print(f"first bad entry: {report.first_bad.label} (check: {report.first_bad.check})")
        return
    print(f"intact {what} {loaded.source}: {report.count} entries")
    print(f"head {report.head}")
    anchor = report.anchor
    if anchor:
        print(
            f"anchor matches at entry {anchor.get('position', anchor.get('expect_count'))}; "
            f"{anchor.get('appended_since', 0)} entries appended since"
        )


# --------------------------------------------------------------------------------- show


def cmd_audit_show(args: argparse.Namespace) -> int:
    since = None
    if args.since:
        try:
            since = parse_time(args.since)
        except ValueError:
            return _refuse(args, f"--since must be an ISO 8601 time, got {args.since!r}")
    try:
        loaded = load_log(args.log)
    except AuditInputError as exc:
        return _refuse(args, str(exc))
    rows = [_safe_row(loaded.kind, e) for e in loaded.entries if not e.unreadable]
    rows = [r for r in rows if _wanted(r, args.kind, args.lender, since)]
    _redact_tokens(rows, loaded.ledger_location)
    report = verify_chain(loaded.entries)
    if not report.ok and report.first_bad is not None:
        log.warning(
            "%s: chain broken at %s; run `fedcredit audit verify`",
            loaded.source,
            report.first_bad.label,
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no entries")
        return 0
    for row in rows:
        detail = ", ".join(f"{k}={_fmt(v)}" for k, v in row["detail"].items())
        hidden = f" (+{row['hidden']} fields hidden)" if row["hidden"] else ""
        print(
            f"{row['seq']:>6}  {row['time'] or '-':<25}  {row['query_id'] or '-':<32}  "
            f"{row['kind']:<14}  {row['outcome']:<8}  {detail}{hidden}"
        )
    return 0


def _safe_row(kind: str, e: ChainEntry) -> dict[str, Any]:
    """The printable view of one entry: fixed columns plus the whitelisted detail fields."""
    rec = e.record
    if kind == "query_log":
        try:
            detail = json.loads(rec.get("detail") or "{}")
        except (TypeError, ValueError, RecursionError):
            detail = {}
        if not isinstance(detail, dict):
            detail = {}
        kind_name, outcome = str(rec.get("kind")), str(rec.get("outcome"))
    else:
        detail = {k: v for k, v in rec.items() if k not in ("event", "at", "query_id")}
        kind_name = str(rec.get("event"))
        outcome = {"decrypt": "answered", "refused": "refused"}.get(kind_name, kind_name)
    shown = {k: _safe_value(k, v) for k, v in sorted(detail.items()) if k in SAFE_FIELDS}
    shown = {k: v for k, v in shown.items() if v is not None}
    query_id = rec.get("query_id")
    return {
        "seq": e.seq if e.seq is not None else e.position,
        "time": e.at,
        "query_id": query_id if isinstance(query_id, str) else None,
        "kind": kind_name,
        "outcome": outcome,
        "detail": shown,
        "hidden": len(detail) - len(shown),
    }


def _safe_value(key: str, value: Any) -> Any:
    """Numbers as they are, short text with stray 64-hex runs redacted, lists of names."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        text = value[:_MAX_TEXT]
        if key.endswith("_sha256") or key == "session_id":
            return text  # a digest or id: checked against the ledger's tokens later
        return _HEX64_ANYWHERE.sub(REDACTED, text)
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return [_HEX64_ANYWHERE.sub(REDACTED, x[:80]) for x in value[:64]]
    return None


def _wanted(row: dict[str, Any], kind: str | None, lender: str | None, since: Any) -> bool:
    if kind is not None and row["kind"] != kind:
        return False
    if lender is not None and row["detail"].get("lender") != lender:
        return False
    if since is not None:
        try:
            return row["time"] is not None and parse_time(row["time"]) >= since
        except ValueError:
            return False
    return True


def _redact_tokens(rows: list[dict[str, Any]], ledger: str | None) -> None:
    """Replace any displayed 64-hex value that is a borrower token of ``ledger``.

    Digests and ids are 64 (or 32) hex like tokens are, so a token written into a log by
    mistake would otherwise be printed as if it were a digest.
    """
    if ledger is None:
        return
    candidates = {v for r in rows for v in _hex_values(r) if _HEX64.fullmatch(v)}
    if not candidates:
        return
    tokens = _tokens_among(ledger, candidates)
    if not tokens:
        return
    log.warning("%s: %d borrower token(s) found in the query log; redacted", ledger, len(tokens))
    for r in rows:
        if r["query_id"] in tokens:
            r["query_id"] = REDACTED
        for k, v in r["detail"].items():
            if isinstance(v, str) and v.lower() in tokens:
                r["detail"][k] = REDACTED


def _hex_values(row: dict[str, Any]) -> Iterable[str]:
    if isinstance(row["query_id"], str):
        yield row["query_id"].lower()
    for v in row["detail"].values():
        if isinstance(v, str):
            yield v.lower()


def _tokens_among(ledger: str, candidates: set[str]) -> set[str]:
    from sqlalchemy import inspect, select
    from sqlalchemy.exc import SQLAlchemyError

    from clients.ledger.schema import borrowers
    from clients.ledger.store import open_ledger

    found: set[str] = set()
    values = sorted(candidates)
    with open_ledger(ledger) as opened:
        try:
            with opened.engine.connect() as conn:
                if "borrowers" not in inspect(conn).get_table_names():
                    return found
                for i in range(0, len(values), 500):
                    chunk = values[i : i + 500]
                    chunk += [v.upper() for v in chunk]
                    hits = conn.execute(
                        select(borrowers.c.token).where(borrowers.c.token.in_(chunk))
                    )
                    found.update(t.lower() for (t,) in hits)
        except SQLAlchemyError as exc:
            # Cannot check: hide every 64-hex value rather than risk printing a token.
            log.warning("%s: cannot read borrowers (%s); hiding all 64-hex values", ledger, exc)
            return set(candidates)
    return found


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(x) for x in value)
    return str(value)
