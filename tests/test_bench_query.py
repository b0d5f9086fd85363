"""``fedcredit bench query``: its JSON contract, on a small population (timings not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_bench_query_json_contract() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedcredit", "bench", "query", "--borrowers", "1000", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert {"tokens_per_s", "naive_tokens_per_s", "speedup", "ciphertexts_per_s_per_core"} <= set(
        out
    )
    assert {"matching", "encryption", "aggregation", "decryption"} <= set(out["seconds"])
    assert out["tokens"] == out["applicants"] * out["platforms"]
    assert out["totals_wrong"] == 0 and out["totals_checked"] >= out["applicants"]
    assert out["speedup"] > 1


def test_bench_query_refuses_two_platforms() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedcredit", "bench", "query", "--platforms", "2", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "at least 3" in proc.stderr
