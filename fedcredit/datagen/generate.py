"""``fedcredit datagen``: draw the world, write the ledgers and the truth file, summarise."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from fedcredit.datagen.bayes import expected_auc, sample_auc
from fedcredit.datagen.config import PopulationConfig
from fedcredit.datagen.identities import national_ids, tokens_for_ids
from fedcredit.datagen.platforms import make_platforms
from fedcredit.datagen.population import World, generate_world
from fedcredit.datagen.writer import LedgerCounts, write_platform_ledger, write_truth
from protocols.tokens import (
    generate_federation_key,
    key_id,
    read_federation_key,
    write_federation_key,
)

log = logging.getLogger(__name__)

TRUTH_FILE = Path("evaluation") / "truth.parquet"
KEY_FILE = "federation.key"
SUMMARY_FILE = "summary.json"


class DatagenError(ValueError):
    """Bad output settings (folder, ledger template), found before any work is done."""


class PlatformSummary(BaseModel):
    name: str
    kind: str
    ledger: str
    borrowers: int
    loans: int
    history_rows: int
    multi_platform_share: float
    default_rate: float


class DatagenSummary(BaseModel):
    bayes_auc: float
    bayes_auc_sample: float
    borrowers: int
    truth: str
    key_file: str
    default_rate: float
    platform_count_shares: dict[str, float]
    platforms: list[PlatformSummary]
    seed: int
    seconds: dict[str, float]
    config: dict[str, object]


Progress = Callable[[str, int], None]  # (stage description, units completed)


def platform_count_shares(k: np.ndarray) -> dict[str, float]:
    """Share of persons on 1, 2, 3 and 4+ platforms (the MISSION.md 67/25/6/2 figures)."""
    n = len(k)
    return {
        "1": float((k == 1).sum() / n),
        "2": float((k == 2).sum() / n),
        "3": float((k == 3).sum() / n),
        "4+": float((k >= 4).sum() / n),
    }


_WORLD: World | None = None
_TOKENS: np.ndarray | None = None


def _write_one(args: tuple[int, str, str]) -> LedgerCounts:
    """Worker: the world is inherited through fork, never pickled."""
    j, target, kid = args
    assert _WORLD is not None and _TOKENS is not None
    return write_platform_ledger(_WORLD, j, target, _TOKENS, kid)


def ledger_targets(out: Path, names: list[str], template: str | None) -> list[str]:
    if template is None:
        return [str(out / "platforms" / f"{name}.sqlite") for name in names]
    if "{platform}" not in template:
        raise DatagenError(f"--ledger-template must contain '{{platform}}': {template!r}")
    return [template.replace("{platform}", name) for name in names]


def seeded_federation_key(seed: int) -> bytes:
    """A federation key derived from the seed: for synthetic data in demos and benchmarks only.

    With it the tokens, and so every token-based held-out split, are the same on every run of
    the same command, which makes reported figures reproducible. Real identities always get a
    random key (``fedcredit key generate``).
    """
    return hashlib.sha256(f"fedcredit demo federation key, seed {seed}".encode()).digest()


def generate(
    cfg: PopulationConfig,
    out: Path,
    *,
    key_file: Path | None = None,
    ledger_template: str | None = None,
    workers: int = 2,
    progress: Progress | None = None,
) -> DatagenSummary:
    """Generate everything into ``out``; returns the summary (also written to summary.json)."""
    global _WORLD, _TOKENS
    step = progress or (lambda _stage, _n: None)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatagenError(
            f"--out {out}: cannot create the output folder ({exc.strerror})"
        ) from None
    names = [p.name for p in make_platforms(cfg.platforms)]
    targets = ledger_targets(out, names, ledger_template)  # checked before any work

    key_path = key_file or out / KEY_FILE
    if key_path.exists():
        key = read_federation_key(key_path)
    else:
        key = generate_federation_key()
        write_federation_key(key_path, key)
    kid = key_id(key)

    world = generate_world(cfg)
    step("population drawn", 1)
    # IDs come from their own stream so the world does not depend on how IDs are drawn.
    id_rng = np.random.default_rng([cfg.seed, 1])
    ids = national_ids(id_rng, world.persons.tier, world.persons.age.astype(float), cfg.as_of)
    tokens = tokens_for_ids(key, ids)
    del ids  # raw IDs never leave this function
    seconds["population"] = time.perf_counter() - t0
    step("tokens computed", 1)

    t1 = time.perf_counter()
    _WORLD, _TOKENS = world, tokens
    try:
        jobs = [(j, targets[j], kid) for j in range(len(names))]
        # Largest platforms first so the two cores finish together.
        jobs.sort(key=lambda job: -int((world.loans.platform == job[0]).sum()))
        counts: dict[int, LedgerCounts] = {}
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                for job, result in zip(jobs, pool.map(_write_one, jobs), strict=True):
                    counts[job[0]] = result
                    step(f"ledger {names[job[0]]} written", 1)
        else:
            for job in jobs:
                counts[job[0]] = _write_one(job)
                step(f"ledger {names[job[0]]} written", 1)
    finally:
        _WORLD, _TOKENS = None, None
    seconds["ledgers"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    p, y = world.outcome.true_pd, world.outcome.defaulted
    bayes = expected_auc(p)
    bayes_sample = sample_auc(p, y)
    truth_path = out / TRUTH_FILE
    write_truth(
        world,
        truth_path,
        tokens,
        {
            "bayes_auc": bayes,
            "seed": cfg.seed,
            "config": cfg.model_dump(mode="json"),
            "key_id": kid,
        },
    )
    seconds["truth"] = time.perf_counter() - t2
    step("truth written", 1)

    k = world.persons.k
    platforms = []
    for j, plat in enumerate(world.platforms):
        on = world.pairs.platform == j
        holders = world.pairs.person[on]
        platforms.append(
            PlatformSummary(
                name=plat.name,
                kind=plat.archetype.kind,
                ledger=targets[j],
                borrowers=counts[j].borrowers,
                loans=counts[j].loans,
                history_rows=counts[j].history_rows,
                multi_platform_share=float((k[holders] > 1).mean()) if len(holders) else 0.0,
                default_rate=float(y[holders].mean()) if len(holders) else 0.0,
            )
        )
    seconds["total"] = time.perf_counter() - t0
    summary = DatagenSummary(
        bayes_auc=bayes,
        bayes_auc_sample=bayes_sample,
        borrowers=len(k),
        truth=str(truth_path),
        key_file=str(key_path),
        default_rate=float(y.mean()),
        platform_count_shares=platform_count_shares(k),
        platforms=platforms,
        seed=cfg.seed,
        seconds={name: round(value, 3) for name, value in seconds.items()},
        config=cfg.model_dump(mode="json"),
    )
    (out / SUMMARY_FILE).write_text(json.dumps(summary.model_dump(), indent=2) + "\n")
    log.info("generated %d borrowers on %d platforms into %s", len(k), len(names), out)
    return summary
