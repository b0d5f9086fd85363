"""``fedcredit bench query-latency`` and ``query-load``: the lender API on a real deployment.

Both start a TLS loopback deployment with 3 SuperNodes (``fedcredit deploy init/up``, SuperNode
authentication on), the standing service (``fedcredit serve``), and ask through the HTTPS API
with the lender client, exactly as a lender would (blinding, consent, sealed answers).

The same-run baseline is the same serving protocol with Flower's transport replaced by the
in-process Grid over the same ledgers, identities, policies and the same key holder service:
``runtime_overhead`` = deployment / in-process says how much of the time is Flower's runtime
(a fresh ClientApp process per message, the SuperNode's 3 s idle poll) rather than the
protocol. The machine's load average is reported because the figures scale with it.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedcredit.deploy.ports import free_port_block

PLATFORMS = 3


def _quantile(values: list[float], q: float) -> float:
    return round(float(np.quantile(np.asarray(values), q)), 4) if values else float("nan")


class _Federation:
    """A deployment folder, up, with the lender service started."""

    def __init__(self, root: Path, borrowers: int, seed: int, lenders: int = 2) -> None:
        from fedcredit import serve_cli
        from fedcredit.deploy import init, up

        self.out = root / "fed"
        used: set[int] = set()

        def pick(count: int = 1) -> int:
            base = free_port_block(count, avoid=used)
            used.update(range(base, base + count))
            return base

        port = pick()
        init(
            PLATFORMS,
            self.out,
            borrowers=borrowers,
            seed=seed,
            lenders=lenders,
            superlink_port=pick(),
            keyholder_port=pick(),
            supernode_base_port=pick(PLATFORMS),  # base, base + 1, ...
            serve_port=port,
        )
        up(self.out)
        t0 = time.perf_counter()
        self.service = serve_cli.start(
            self.out, port=port, timeout=1800, hop_timeout=120, answer_timeout=1800
        )
        self.open_s = time.perf_counter() - t0
        self.url = self.service["url"]

    def close(self) -> None:
        from fedcredit import serve_cli
        from fedcredit.deploy import down

        serve_cli.stop(self.out, timeout=60)
        down(self.out, timeout=30)

    def tokens(self, count: int) -> list[str]:
        from flwr.common.config import parse_config_args

        from clients.platform_data import load_platform_data
        from fedcredit.deploy import load_manifest

        manifest = load_manifest(self.out)
        found: list[str] = []
        for p in manifest.platforms:
            config = parse_config_args([(self.out / p.dir / "node-config.txt").read_text().strip()])
            found += load_platform_data(str(config["ledger"])).features.tokens
        rng = np.random.default_rng(0)
        return [found[i] for i in rng.integers(0, len(found), count)]

    def health(self) -> dict[str, Any]:
        from fedcredit import serve_cli

        return serve_cli.health(self.out, serve_cli.ensure_serve_config(self.out)) or {}


def _in_process_baseline(fed: _Federation, tokens: list[str]) -> dict[str, float]:
    """The same questions through the in-process Grid (no Flower runtime)."""
    from flwr.common.config import parse_config_args

    from clients.app import build_client_app
    from fedcredit.deploy import load_manifest
    from fedcredit.inprocess import InProcessGrid
    from fedcredit.lender_client import prepare_tokens
    from fedcredit.query_cli import lender_from_folder
    from server.keyholder_client import KeyHolderClient
    from server.lender_models import DebtProfileBatchRequest
    from server.serving import Question, open_serving_session

    manifest = load_manifest(fed.out)
    configs = [
        {
            str(k): v
            for k, v in parse_config_args(
                [(fed.out / p.dir / "node-config.txt").read_text().strip()]
            ).items()
        }
        for p in manifest.platforms
    ]
    grid = InProcessGrid(build_client_app(), len(configs), configs)
    nodes = {
        p.name: node
        for p, node in zip(manifest.platforms, sorted(grid.get_node_ids()), strict=True)
    }
    keyholder = KeyHolderClient(
        manifest.keyholder_url,
        (fed.out / "bureau" / "coordinator.token").read_text().strip(),
        ca_file=fed.out / "ca" / "ca.pem",
    )
    t0 = time.perf_counter()
    session = open_serving_session(grid, nodes, keyholder, timeout=600)
    open_s = time.perf_counter() - t0
    lender = lender_from_folder(fed.out, "lender-02", fed.url)
    walls = []
    for token in tokens:
        t = time.perf_counter()
        prepared = prepare_tokens(
            [token],
            lender="lender-02",
            signing_key=lender.signing_key,
            purpose="underwriting",
            delivery_key=lender.delivery_key(),
        )
        request = DebtProfileBatchRequest.model_validate(prepared.body)
        question = Question(
            uuid.uuid4().hex,
            "lender-02",
            "underwriting",
            [a.to_applicant() for a in request.applicants],
        )
        session.ask(grid, [question], keyholder)
        walls.append(time.perf_counter() - t)
    keyholder.close()
    return {"median_s": _quantile(walls, 0.5), "open_s": round(open_s, 2)}


def run_latency(samples: int = 15, borrowers: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Sequential one-applicant questions: HTTP request to opened answer."""
    from fedcredit.query_cli import lender_from_folder

    with tempfile.TemporaryDirectory(prefix="fedcredit-latency-") as tmp:
        fed = _Federation(Path(tmp), borrowers, seed)
        try:
            lender = lender_from_folder(fed.out, "lender-01", fed.url, timeout=1800)
            lender.delivery_key()  # fetched once, as a lender would cache it
            tokens = fed.tokens(samples)
            walls, prepare, service, hops, keyholder = [], [], [], [], []
            per_hop: list[list[float]] = []
            via: dict[str, int] = {}
            errors = 0
            for token in tokens:
                t0 = time.perf_counter()
                prepared = lender.prepare_tokens([token], "underwriting")
                t1 = time.perf_counter()
                try:
                    answer = lender.send(prepared)
                except Exception:
                    errors += 1
                    continue
                walls.append(time.perf_counter() - t0)
                prepare.append(t1 - t0)
                sec = answer.get("seconds", {})
                service.append(sec.get("total", 0.0))
                hops.append(sec.get("platform_hops", 0.0))
                keyholder.append(sec.get("keyholder", 0.0))
                per_hop.append([sec[k] for k in sorted(sec) if k.startswith("hop_")])
                for how in answer.get("hops_via", {}).values():
                    via[how] = via.get(how, 0) + 1
            baseline = _in_process_baseline(fed, tokens[: min(5, len(tokens))])
        finally:
            fed.close()
    median = _quantile(walls, 0.5)
    return {
        "bench": "query-latency",
        "deployment": f"TLS loopback, {PLATFORMS} SuperNodes with node auth, flwr 1.41",
        "samples": len(walls),
        "errors": errors,
        "median_s": median,
        "p90_s": _quantile(walls, 0.9),
        "breakdown": {
            "lender_prepare_s": _quantile(prepare, 0.5),
            "platform_hops_s": _quantile(hops, 0.5),
            "per_hop_s": [_quantile(list(h), 0.5) for h in zip(*per_hop, strict=False)]
            if per_hop
            else [],
            "keyholder_s": _quantile(keyholder, 0.5),
            "service_total_s": _quantile(service, 0.5),
            "http_tls_queue_s": round(median - _quantile(service, 0.5) - _quantile(prepare, 0.5), 4)
            if walls
            else None,
            "hops_via": via,
        },
        "session_open_s": round(fed.open_s, 1),
        "baseline_in_process": baseline,
        "runtime_overhead": round(median / baseline["median_s"], 1)
        if baseline["median_s"]
        else None,
        "target_s": 1.0,
        "floor_s": 2.0,
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "borrowers": borrowers,
    }


async def _lender_burst(
    url: str, ca: Path, api_key: str, bodies: list[dict[str, Any]], timeout: float
) -> list[tuple[bool, float]]:
    import ssl

    verify = ssl.create_default_context(cafile=str(ca))
    out: list[tuple[bool, float]] = []
    async with httpx.AsyncClient(
        base_url=url,
        verify=verify,
        timeout=timeout,
        headers={"Authorization": f"Bearer {api_key}"},
        limits=httpx.Limits(max_connections=len(bodies)),
    ) as client:

        async def one(body: dict[str, Any]) -> tuple[bool, float]:
            t = time.perf_counter()
            try:
                r = await client.post("/v1/debt-profile", json=body)
                ok = r.status_code == 200 and r.json()["applicants"][0]["status"] == "answered"
            except (httpx.HTTPError, ValueError, KeyError):
                ok = False
            return ok, time.perf_counter() - t

        out = list(await asyncio.gather(*(one(b) for b in bodies)))
    return out


def run_load(
    lenders: int = 20, queries: int = 1000, borrowers: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """``lenders`` lenders send ``queries`` one-applicant questions, all at once."""
    from fedcredit.query_cli import lender_from_folder

    with tempfile.TemporaryDirectory(prefix="fedcredit-load-") as tmp:
        fed = _Federation(Path(tmp), borrowers, seed, lenders=lenders)
        try:
            tokens = fed.tokens(queries)
            names = [f"lender-{i:02d}" for i in range(1, lenders + 1)]
            clients = {n: lender_from_folder(fed.out, n, fed.url) for n in names}
            plan: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for i, token in enumerate(tokens):
                name = names[i % lenders]
                plan[name].append(clients[name].prepare_tokens([token], "underwriting").body)
            rounds_before = int(fed.health().get("rounds", 0))

            async def everyone() -> list[tuple[bool, float]]:
                bursts = [
                    _lender_burst(
                        fed.url,
                        fed.out / "ca" / "ca.pem",
                        (fed.out / "lenders" / f"{n}.api-key").read_text().strip(),
                        plan[n],
                        1800,
                    )
                    for n in names
                ]
                results = await asyncio.gather(*bursts)
                return [x for r in results for x in r]

            t0 = time.perf_counter()
            results = asyncio.run(everyone())
            wall = time.perf_counter() - t0
            rounds = int(fed.health().get("rounds", 0)) - rounds_before
        finally:
            fed.close()
    latencies = [t for ok, t in results if ok]
    errors = sum(1 for ok, _ in results if not ok)
    return {
        "bench": "query-load",
        "deployment": f"TLS loopback, {PLATFORMS} SuperNodes with node auth, flwr 1.41",
        "lenders": lenders,
        "queries": queries,
        "errors": errors,
        "queries_per_s": round(len(latencies) / wall, 2) if wall else None,
        "median_s": _quantile(latencies, 0.5),
        "p99_s": _quantile(latencies, 0.99),
        "wall_s": round(wall, 1),
        "rounds": rounds,
        "questions_per_round": round(queries / rounds, 1) if rounds else None,
        "target_queries_per_s": 20,
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
    }
