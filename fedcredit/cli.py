"""The ``fedcredit`` command line: the only place that prints (everything else logs).

Subcommands validate their arguments at the boundary and exit with status 2 and a one-line
message naming what is wrong; ``--json`` gives machines the same content as the tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from fedcredit import __version__

log = logging.getLogger("fedcredit")
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)


class UsageError(Exception):
    """Bad arguments or input: reported in one line, exit status 2."""


class _ArgumentsRefused(Exception):
    """argparse refused the command line while JSON errors were asked for."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that ``fedcredit ledger ... --json`` gets its usage errors as JSON.

    A script that asked for ``--json`` parses stdout; argparse's usage text on stderr would
    leave it with nothing to parse. Other commands keep argparse's behaviour unchanged.
    """

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            raise _ArgumentsRefused(f"{self.prog}: {message}")
        super().error(message)


def _json_refusal(errors: list[dict[str, object]], **extra: object) -> int:
    """Print a refusal as ``{"ok": false, "errors": [...]}`` on stdout; exit status 2."""
    print(json.dumps({"ok": False, "errors": errors, **extra}, indent=2, default=str))
    return 2


# ---------------------------------------------------------------------------- datagen


def cmd_datagen(args: argparse.Namespace) -> int:
    from fedcredit.datagen.config import PopulationConfig
    from fedcredit.datagen.generate import DatagenError, generate

    try:
        cfg = PopulationConfig(
            platforms=args.platforms,
            borrowers=args.borrowers,
            seed=args.seed,
            as_of=args.as_of,
            default_rate=args.default_rate,
            shock=args.shock,
            fraud_ring=args.fraud_ring,
        )
    except ValidationError as exc:
        raise UsageError(_pydantic_message(exc)) from None
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    with _progress(not args.json, total=cfg.platforms + 3, label="datagen") as step:
        try:
            summary = generate(
                cfg,
                Path(args.out),
                key_file=Path(args.key_file) if args.key_file else None,
                ledger_template=args.ledger_template,
                workers=args.workers,
                progress=step,
            )
        except DatagenError as exc:
            raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(summary.model_dump(), indent=2))
        return 0
    table = Table(title=f"fedcredit datagen: {summary.borrowers:,} borrowers, seed {summary.seed}")
    for col in ("platform", "kind", "borrowers", "loans", "multi-platform", "default rate"):
        table.add_column(
            col, justify="left" if col in {"platform", "kind"} else "right", no_wrap=True
        )
    for p in summary.platforms:
        table.add_row(
            p.name,
            p.kind,
            f"{p.borrowers:,}",
            f"{p.loans:,}",
            f"{p.multi_platform_share:.1%}",
            f"{p.default_rate:.2%}",
        )
    out.print(table)
    for p in summary.platforms:
        out.print(f"ledger {p.name}: {p.ledger}", soft_wrap=True)
    shares = ", ".join(f"{k}: {v:.1%}" for k, v in summary.platform_count_shares.items())
    out.print(f"persons on 1/2/3/4+ platforms: {shares}")
    out.print(f"default rate {summary.default_rate:.2%}; Bayes-bound AUC {summary.bayes_auc:.4f}")
    out.print(f"truth (evaluation only, never for platform nodes): {summary.truth}", soft_wrap=True)
    out.print(f"federation key: {summary.key_file}", soft_wrap=True)
    out.print(f"took {summary.seconds['total']:.1f} s")
    return 0


# ----------------------------------------------------------------------------- ledger


def cmd_ledger_import(args: argparse.Namespace) -> int:
    from clients.ledger.importer import ImportValidationError, import_file
    from clients.ledger.store import LedgerError
    from protocols.tokens import InvalidFederationKey, read_federation_key

    try:
        key = read_federation_key(Path(args.key_file)) if args.key_file else None
    except (InvalidFederationKey, OSError) as exc:
        if args.json:
            return _json_refusal([{"message": str(exc), "key": "key_file"}])
        raise UsageError(str(exc)) from None
    try:
        report = import_file(
            Path(args.source),
            Path(args.mapping),
            args.ledger,
            key=key,
            partition=args.partition,
            platform=args.platform,
            progress=not args.json,
            require_platform=True,
        )
    except ImportValidationError as exc:
        if args.json:
            return _json_refusal([i.to_dict() for i in exc.errors], more=exc.more)
        err.print(f"[red]import refused, nothing was written:[/red]\n{exc}", soft_wrap=True)
        return 2
    except LedgerError as exc:
        if args.json:
            return _json_refusal([{"message": str(exc), "key": "ledger"}])
        raise
    data = {"ok": True, **report.model_dump(mode="json")}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for key_, value in data.items():
            out.print(f"{key_}: {value}")
    return 0


def cmd_ledger_info(args: argparse.Namespace) -> int:
    from clients.ledger import schema
    from clients.ledger.store import open_ledger

    with open_ledger(args.ledger) as ledger:
        meta = ledger.check_schema()
        counts = {t.name: ledger.count(t) for t in schema.TABLES if t is not schema.ledger_meta}
    data = {"ledger": args.ledger, "meta": meta, "rows": counts}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for k, v in meta.items():
            out.print(f"{k}: {v}")
        for k, v in counts.items():
            out.print(f"{k}: {v:,} rows")
    return 0


def cmd_ledger_rename(args: argparse.Namespace) -> int:
    from clients.ledger.store import LedgerError, open_ledger

    try:
        with open_ledger(args.ledger) as ledger:
            changed = ledger.rename_platform(args.platform, force=args.force)
    except LedgerError as exc:
        if args.json:
            return _json_refusal([{"message": str(exc)}])
        raise
    data = {"ok": True, "ledger": args.ledger, **changed}
    if args.json:
        print(json.dumps(data, indent=2))
    elif changed["previous"] == changed["platform"]:
        out.print(
            f"{args.ledger}: platform is already {changed['platform']!r}; nothing changed",
            soft_wrap=True,  # a path never wraps mid-message
        )
    else:
        out.print(
            f"{args.ledger}: ledger_meta.platform {changed['previous']!r} -> "
            f"{changed['platform']!r}",
            soft_wrap=True,
        )
    return 0


def cmd_key_generate(args: argparse.Namespace) -> int:
    from protocols.tokens import generate_federation_key, key_id, write_federation_key

    path = Path(args.path)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists; pass --force to replace it (re-keys every ledger)")
    key = generate_federation_key()
    write_federation_key(path, key)
    out.print(f"wrote federation key {path} (key id {key_id(key)}); keep it secret")
    return 0


# ------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from fedcredit.demo.run import DemoError, DemoOptions, run_demo

    ledgers = None
    if args.ledgers:
        ledgers = [x.strip() for x in args.ledgers.split(",") if x.strip()]
        if len(ledgers) < 3:
            raise UsageError(
                "--ledgers needs at least three ledgers, separated by commas: the private debt "
                "query refuses fewer (with two, each platform would learn the other's figures)"
            )
        for loc in ledgers:
            if "://" not in loc and not Path(loc).is_file():
                raise UsageError(f"--ledgers: no such ledger file: {loc}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out: {out_dir} exists and is not a directory")
    try:
        opts = DemoOptions(
            platforms=args.platforms,
            borrowers=args.borrowers,
            rounds=args.rounds,
            seed=args.seed,
            out=out_dir,
            ledgers=ledgers,
            model=args.model,
            key_bits=args.key_bits,
            dp_epsilons=_floats(args.dp_epsilons, "--dp-epsilons"),
        )
    except ValidationError as exc:
        raise UsageError(_pydantic_message(exc)) from None
    if args.key_bits not in (2048, 3072):
        raise UsageError("--key-bits must be 2048 or 3072")
    with _stage_progress(not args.json) as step:
        try:
            report, written = run_demo(opts, step)
        except DemoError as exc:
            raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    _print_demo(report, written)
    return 0


def _floats(value: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: a comma list of numbers, got {value!r}") from None


def _print_demo(report: dict, written: list[Path]) -> None:
    def fmt(entry: dict | None) -> tuple[str, str]:
        if not entry or entry.get("auc") is None:
            return "n/a", "n/a"
        return f"{entry['auc']:.4f}", f"{entry['ks']:.4f}"

    table = Table(title=f"fedcredit demo ({report['data']['source']} data)")
    table.add_column("model")
    table.add_column("AUC", justify="right")
    table.add_column("KS", justify="right")
    bayes = report.get("bayes_auc")
    rows = [
        ("Bayes bound (same held-out rows)", {"auc": bayes, "ks": float("nan")} if bayes else None),
        ("centralized (pooled raw data)", report.get("centralized")),
        ("federated (own features)", report.get("federated")),
        ("federated + cross-platform totals", report.get("federated_cross_platform")),
        *((f"local only: {k}", v) for k, v in report.get("local_only", {}).items()),
    ]
    for name, entry in rows:
        auc, ks = fmt(entry)
        table.add_row(name, auc, "" if ks == "nan" else ks)
    out.print(table)
    q = report.get("queries") or {}
    match = q.get("all_totals_match")
    out.print(
        f"encrypted debt queries: {q.get('count', 0):,} applicants, "
        f"{q.get('tokens_per_second') or 0:,.0f}/s, all totals match: "
        f"{'unavailable' if match is None else match}"
    )
    if dp := report.get("dp"):
        attack = (report.get("membership_inference") or {}).get(
            f"federated_dp_epsilon_{dp['epsilon']:g}", {}
        )
        out.print(
            f"DP federated (epsilon {dp['epsilon']:g}, delta {dp['delta']:g}): AUC "
            f"{dp['auc']:.4f}, membership attack AUC {attack.get('attack_auc', float('nan')):.4f}"
        )
    secs = report.get("seconds", {})
    out.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    out.print("wrote: " + ", ".join(str(p) for p in written))


# ------------------------------------------------------------------------------ bench


def cmd_bench(args: argparse.Namespace) -> int:
    if args.borrowers is not None and args.borrowers < 100:
        raise UsageError("--borrowers must be at least 100")
    if not 2 <= args.platforms <= 50:
        raise UsageError("--platforms must be between 2 and 50")
    if args.name == "datagen":
        from fedcredit.bench import datagen_speed

        result = datagen_speed.run(
            args.borrowers or 1_000_000, args.platforms, args.seed, args.workers
        )
    elif args.name == "datagen-quality":
        from fedcredit.bench import datagen_quality

        result = datagen_quality.run(args.borrowers or 100_000, args.platforms, args.seed)
    elif args.name == "paillier":
        from fedcredit.bench import paillier_speed
        from protocols.paillier import ALLOWED_KEY_BITS

        if args.key_bits not in ALLOWED_KEY_BITS:
            raise UsageError(f"--key-bits must be one of {', '.join(map(str, ALLOWED_KEY_BITS))}")
        if args.tokens < 1:
            raise UsageError("--tokens must be at least 1")
        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
        result = paillier_speed.run(args.key_bits, args.tokens, args.workers)
    elif args.name == "query":
        from fedcredit.bench import query_speed
        from protocols.paillier import ALLOWED_KEY_BITS

        if args.key_bits not in ALLOWED_KEY_BITS:
            raise UsageError(f"--key-bits must be one of {', '.join(map(str, ALLOWED_KEY_BITS))}")
        if args.platforms < 3:
            raise UsageError("--platforms must be at least 3 (the private query refuses fewer)")
        borrowers = args.borrowers or 100_000
        if borrowers < 1000:
            raise UsageError("--borrowers must be at least 1,000")
        result = query_speed.run(borrowers, args.platforms, args.key_bits, args.seed)
    elif args.name == "secagg":
        from fedcredit.bench import secagg_speed

        rounds = args.rounds or 5
        if not 1 <= rounds <= 100:
            raise UsageError("--rounds must be between 1 and 100")
        result = secagg_speed.run(args.platforms, args.borrowers, rounds, seed=args.seed)
    elif args.name in ("query-latency", "query-load"):
        from fedcredit.bench import lender_query

        borrowers = args.borrowers or 2000
        if args.name == "query-latency":
            result = lender_query.run_latency(max(1, args.samples), borrowers, args.seed)
        else:
            if not 1 <= args.lenders <= 100 or args.queries < 1:
                raise UsageError("--lenders 1-100 and --queries >= 1")
            result = lender_query.run_load(args.lenders, args.queries, borrowers, args.seed)
    elif args.name == "uci":
        from fedcredit.bench import uci_federation

        csv = Path(args.csv) if args.csv else Path("..") / "shared" / "data" / "uci_credit_card.csv"
        from fedcredit.demo.run import DemoError

        if not csv.is_file():
            raise UsageError(f"--csv: no such file: {csv}")
        if not 1 <= (args.rounds or 20) <= 500:
            raise UsageError("--rounds must be between 1 and 500")
        from clients.ledger.importer import ImportValidationError, MappingError

        try:
            result = uci_federation.run(csv, rounds=args.rounds or 20)
        except DemoError as exc:
            raise UsageError(str(exc)) from None
        except (ImportValidationError, MappingError) as exc:
            raise UsageError(f"--csv: {exc}") from None
    elif args.name == "convergence":
        from fedcredit.bench import convergence

        result = convergence.from_args(args, UsageError)
    elif args.name == "realdata":
        from fedcredit.bench import realdata

        result = realdata.from_args(args)
    else:  # argparse restricts choices; kept for safety
        raise UsageError(f"unknown benchmark {args.name!r}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            out.print(f"{key}: {value}")
    return 0


# ------------------------------------------------------------------------------ plumbing


class _progress:
    """A rich progress bar on stderr, shown only on a terminal (never in pipes or CI)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled = enabled and err.is_terminal
        self.total, self.label = total, label

    def __enter__(self):  # type: ignore[no-untyped-def]
        if not self.enabled:
            return lambda stage, n: log.info("%s", stage)
        from rich.progress import Progress

        self._bar = Progress(console=err, transient=True)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)

        def step(stage: str, n: int) -> None:
            self._bar.update(task, advance=n, description=f"{self.label}: {stage}")

        return step

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()


class _stage_progress:
    """Stage-by-stage progress for long pipelines (the demo), fed by the bureau's reports."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and err.is_terminal

    def __enter__(self):  # type: ignore[no-untyped-def]
        from server import progress

        if not self.enabled:

            def quiet(stage: str, done: int, total: int, note: str) -> None:
                log.info("%s %s/%s %s", stage, done, total, note)

            progress.set_sink(quiet)
            return quiet
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        self._bar.start()
        tasks: dict[str, object] = {}

        def step(stage: str, done: int, total: int, note: str) -> None:
            if stage not in tasks:
                tasks[stage] = self._bar.add_task(stage, total=total or None, note=note)
            self._bar.update(tasks[stage], completed=done, total=total or None, note=note)  # type: ignore[arg-type]

        progress.set_sink(step)
        return step

    def __exit__(self, *exc: object) -> None:
        from server import progress

        progress.set_sink(None)
        if self.enabled:
            self._bar.stop()


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e["loc"]) or "value"
        parts.append(f"--{where.replace('_', '-')}: {e['msg']}")
    return "; ".join(parts)


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date (YYYY-MM-DD): {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedcredit",
        description="Federated credit models and encrypted cross-platform debt queries.",
    )
    parser.add_argument("--version", action="version", version=f"fedcredit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    dg = sub.add_parser("datagen", help="generate a synthetic multi-platform population")
    dg.add_argument("--platforms", type=int, default=3, help="lending platforms (2-50)")
    dg.add_argument("--borrowers", type=int, default=100_000, help="persons in the population")
    dg.add_argument("--seed", type=int, default=0, help="the population is a function of it")
    dg.add_argument("--out", default="fedcredit-data", help="output folder")
    dg.add_argument("--as-of", type=_date, default=dt.date(2026, 6, 30), help="snapshot date")
    dg.add_argument("--default-rate", type=float, default=0.03, help="person-level target")
    dg.add_argument("--shock", type=float, default=0.0, help="macro shock strength (0-3)")
    dg.add_argument("--fraud-ring", type=int, default=0, help="members of a bust-out ring")
    dg.add_argument("--key-file", help="federation key to use (default: OUT/federation.key)")
    dg.add_argument(
        "--ledger-template",
        help="SQLAlchemy URL with {platform}, e.g. sqlite:////data/{platform}.db "
        "(default: OUT/platforms/NAME.sqlite)",
    )
    dg.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    dg.add_argument("--json", action="store_true", help="machine-readable summary")
    dg.set_defaults(func=cmd_datagen)

    ledger = sub.add_parser("ledger", help="a platform's ledger").add_subparsers(
        dest="ledger_command", required=True
    )
    imp = ledger.add_parser("import", help="load CSV or Parquet through a column mapping")
    imp.add_argument("source", help="CSV or Parquet file")
    imp.add_argument(
        "--mapping", required=True, help="TOML column mapping (docs/import-mapping.md)"
    )
    imp.add_argument("--ledger", required=True, help="ledger path or SQLAlchemy URL")
    imp.add_argument("--key-file", help="federation key (needed unless the source holds tokens)")
    imp.add_argument("--partition", help="which partition of a split source to load")
    imp.add_argument(
        "--platform",
        help="platform name recorded in the ledger (required unless the mapping, the "
        "partition or the ledger names it)",
    )
    imp.add_argument(
        "--json", action="store_true", help="report, or refusal {ok: false, errors}, as JSON"
    )
    imp.set_defaults(func=cmd_ledger_import)
    ren = ledger.add_parser("rename", help="change the platform name a ledger records")
    ren.add_argument("ledger", help="ledger path or SQLAlchemy URL")
    ren.add_argument("--platform", required=True, help="the new platform name")
    ren.add_argument(
        "--force",
        action="store_true",
        help="rename even though the ledger has already answered federation queries",
    )
    ren.add_argument("--json", action="store_true")
    ren.set_defaults(func=cmd_ledger_rename)
    info = ledger.add_parser("info", help="metadata and row counts of a ledger")
    info.add_argument("ledger", help="ledger path or SQLAlchemy URL")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_ledger_info)

    key = sub.add_parser("key", help="federation keys").add_subparsers(
        dest="key_command", required=True
    )
    gen = key.add_parser("generate", help="write a new random federation key")
    gen.add_argument("path")
    gen.add_argument("--force", action="store_true")
    gen.set_defaults(func=cmd_key_generate)

    from fedcredit import audit_cli, deploy_cli, enrol_cli, keyholder_cli, train_cli

    enrol_cli.register(sub)
    keyholder_cli.register(sub)
    audit_cli.register(sub)
    deploy_cli.register(sub)
    train_cli.register(sub)
    from fedcredit import query_cli, serve_cli  # lender service (docs/lender-query.md)

    serve_cli.register(sub)
    query_cli.register(sub)

    demo = sub.add_parser(
        "demo",
        help="generate data (or use --ledgers), train federated models, run encrypted "
        "debt queries on Flower's simulation engine, write a report",
    )
    demo.add_argument("--platforms", type=int, default=3)
    demo.add_argument("--borrowers", type=int, default=100_000)
    demo.add_argument("--rounds", type=int, default=20, help="FedAvg rounds per model")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--out", default="demo-output")
    demo.add_argument(
        "--ledgers", help="comma-separated existing ledgers (paths or SQLAlchemy URLs)"
    )
    demo.add_argument(
        "--model",
        default="mlp,lr",
        help="comma list of lr, mlp, gbdt (first is primary): default mlp,lr",
    )
    demo.add_argument("--key-bits", type=int, default=2048, help="Paillier modulus: 2048 or 3072")
    demo.add_argument(
        "--dp-epsilons",
        default="0.5,1,4",
        help="epsilons of the DP-SGD federations (comma list; empty for none): default 0.5,1,4",
    )
    demo.add_argument("--json", action="store_true", help="print report.json to stdout")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks (figures and ratios vs a same-run baseline)")
    bench.add_argument(
        "name",
        choices=[
            "datagen",
            "datagen-quality",
            "paillier",
            "query",
            "uci",
            "secagg",
            "realdata",
            "query-latency",  # the lender API on a deployment (docs/lender-query.md)
            "query-load",
            "convergence",
        ],
    )
    bench.add_argument(
        "--borrowers",
        type=int,
        help="default: 1,000,000 (datagen), 100,000 (datagen-quality, query)",
    )
    bench.add_argument("--platforms", type=int, default=3)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    bench.add_argument("--key-bits", type=int, default=2048, help="paillier: 2048 or 3072")
    bench.add_argument("--tokens", type=int, default=3000, help="paillier: tokens to encrypt")
    bench.add_argument(
        "--rounds", type=int, default=None, help="uci, realdata: FedAvg rounds (20); secagg: (5)"
    )
    bench.add_argument(
        "--csv",
        help="uci, realdata, convergence: the CSV (uci default ../shared/data/uci_credit_card.csv)",
    )
    bench.add_argument("--mapping", help="realdata, convergence: the CSV's import mapping (TOML)")
    bench.add_argument(
        "--split", choices=["random", "skewed"], default="random", help="realdata: platform split"
    )
    bench.add_argument("--model", help="realdata: model kinds (default gbdt,mlp,lr)")
    bench.add_argument("--report-dir", help="realdata: also write realdata.json, .md and .png")
    bench.add_argument("--lenders", type=int, default=20, help="query-load: lenders")
    bench.add_argument("--queries", type=int, default=1000, help="query-load: questions")
    bench.add_argument("--samples", type=int, default=15, help="query-latency: questions")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), None)
    _Parser.json_errors = command == "ledger" and "--json" in words
    try:
        args = parser.parse_args(words)
    except _ArgumentsRefused as exc:
        return _json_refusal([{"message": str(exc)}])
    finally:
        _Parser.json_errors = False
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from clients.ledger.store import LedgerError
    from protocols.tokens import InvalidFederationKey

    try:
        return int(args.func(args))
    except (UsageError, LedgerError, InvalidFederationKey) as exc:
        err.print(f"fedcredit: error: {exc}", markup=False, soft_wrap=True)
        return 2
    except BrokenPipeError:  # output piped into head and the like
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        err.print("fedcredit: interrupted", markup=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
