"""The wire audit: a full demo federation on Flower's simulation engine, every message recorded.

The threat model (``MISSION.md``) says what each party may *receive*. This runs the federation
the way ``fedcredit demo`` does (same ``_run_simulation``, same ServerApp, the real Ray
runtime and Flower serialisation), with a recording mod on every platform, and asserts on
the recorded views:

* the coordinator receives no ledger token, in any encoding;
* no platform receives any plaintext token (not even its own customers' being asked about);
* no ciphertext of one platform's reply decrypts to that platform's figures;
* only full sums decrypt to valid values (partial sums are noise);
* nothing the coordinator writes to its out-dir holds a token;
* training replies (weights, feature sums, histograms, and federated boosting's sketch counts,
  gradient/hessian/count histograms and score histograms) are masked vectors that look
  uniform alone, and only the full set of a round's replies sums to the right totals.

The federation runs once per module (about a minute); each property is its own test so a
failure names exactly what leaked, with counts and a first example. Run without ``-x`` to see
every property at once. Two sanity tests keep the audit honest: it must have seen the query
traffic, and its scanners must find a token planted in a copy of the view.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from protocols.packing import debt_profile_layout
from server.settings import FederationSettings
from tests.conftest import REPO
from tests.wire_audit import (
    DEBT_PROFILE_REPLY,
    SECURE_SUM_TYPES,
    TokenIndex,
    WireRecord,
    WireRecorder,
    check_sums,
    decryptable_values,
    find_tokens,
    load_views,
    scan_files,
    secure_sum_groups,
    summarise_hits,
    uniformity,
)

pytestmark = pytest.mark.slow

PLATFORMS = 3
BORROWERS = 3_000
SEED = 11
# The query packs with headroom for exactly its participants (protocols/packing.py).
LAYOUT = debt_profile_layout(PLATFORMS)


@dataclasses.dataclass
class AuditRun:
    """Everything one recorded federation run leaves for the assertions."""

    out_dir: Path
    coordinator: list[WireRecord]
    platforms: dict[int, list[WireRecord]]
    tokens: TokenIndex
    own_tokens: dict[int, set[str]]  # partition -> its ledger's tokens
    own_profiles: dict[int, set[tuple[int, int, int]]]  # partition -> its (debt, loans, flag) rows
    private_key: Any
    # platform -> labelled rows per split (train, validation, test) under the run's settings
    split_rows: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


def _private_key_for_run(parties_dir: Path) -> Any:
    """The run's Paillier private key, read from the key holder's keystore.

    The key holder runs in its own process (``fedcredit.local_federation``); the audit plays
    the key holder by opening its keystore (the key file sits beside it in a test run) after
    the run, to try every decryption a curious key holder could.
    """
    from server.keystore import Keystore, KeystoreSecret

    keyholder_dir = parties_dir / "keyholder"
    keystore = Keystore.open(
        keyholder_dir / "keystore.json",
        KeystoreSecret.from_key_file(keyholder_dir / "keystore.key"),
    )
    return keystore.active.private_key


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditRun]:
    from clients.platform_data import load_platform_data
    from fedcredit.datagen.config import PopulationConfig
    from fedcredit.datagen.generate import generate, seeded_federation_key
    from fedcredit.demo.run import DemoOptions, _run_simulation
    from protocols.tokens import write_federation_key

    base = tmp_path_factory.mktemp("wire-audit")
    data_dir = base / "data"
    data_dir.mkdir()
    key_file = data_dir / "federation.key"
    write_federation_key(key_file, seeded_federation_key(SEED))
    data = generate(
        PopulationConfig(platforms=PLATFORMS, borrowers=BORROWERS, seed=SEED),
        data_dir,
        key_file=key_file,
    )
    ledgers = [str(p.ledger) for p in data.platforms]
    records_dir = base / "wire"
    fed_out = base / "federation"
    opts = DemoOptions(
        platforms=PLATFORMS,
        borrowers=BORROWERS,
        rounds=2,
        seed=SEED,
        out=base,
        model="lr,gbdt",
        key_bits=2048,
        query_batch=2_000,
        # Small trees: the audit needs every gbdt message kind on the wire, not a good model.
        run_config={"gbdt-trees": 2, "gbdt-depth": 2, "gbdt-bins": 16},
    )
    with pytest.MonkeyPatch.context() as mp:
        # Ray workers unpickle the recorder by reference: they must import this checkout.
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("FLWR_TELEMETRY_ENABLED", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # The demo's own code path, with the recorder as a Flower mod on every ClientApp.
        _run_simulation(opts, ledgers, fed_out, mods=[WireRecorder(records_dir)])

    coordinator, platforms = load_views(records_dir)
    own_tokens: dict[int, set[str]] = {}
    own_profiles: dict[int, set[tuple[int, int, int]]] = {}
    split_rows: dict[str, dict[str, int]] = {}
    run = FederationSettings()  # the demo keeps the default shares
    for pid, location in enumerate(ledgers):
        pdata = load_platform_data(location)
        split_rows[pdata.platform] = {
            split: int(
                (
                    pdata.labelled & pdata.split_mask(split, run.test_share, run.validation_share)
                ).sum()
            )
            for split in ("train", "validation", "test")
        }
        own_tokens[pid] = set(pdata.features.tokens)
        own_profiles[pid] = {tuple(int(v) for v in row) for row in pdata.profiles}  # type: ignore[misc]
    yield AuditRun(
        out_dir=fed_out,
        coordinator=coordinator,
        platforms=platforms,
        tokens=TokenIndex(set().union(*own_tokens.values())),
        own_tokens=own_tokens,
        own_profiles=own_profiles,
        private_key=_private_key_for_run(fed_out.parent / "parties"),
        split_rows=split_rows,
    )


# ------------------------------------------------------------------------- the audit is real


def test_audit_saw_the_whole_federation(audit: AuditRun) -> None:
    """Non-vacuous: every platform's traffic, the query replies, and sums that decrypt."""
    assert sorted(audit.platforms) == list(range(PLATFORMS)), (
        f"recorded inbound traffic for partitions {sorted(audit.platforms)}, "
        f"expected {list(range(PLATFORMS))}"
    )
    types = Counter(r.message_type for r in audit.coordinator)
    assert types[DEBT_PROFILE_REPLY] > 0, f"no {DEBT_PROFILE_REPLY} replies recorded: {types}"
    assert {"train", "evaluate"} <= set(types), f"no training traffic recorded: {types}"
    errors = [r for r in audit.coordinator if r.error]
    assert not errors, f"{len(errors)} error replies (first: {errors[0].error})"
    sums = check_sums(audit.coordinator, audit.private_key, layout=LAYOUT)
    assert sums.full_sums > 0 and sums.full_sums_valid == sums.full_sums, (
        f"only {sums.full_sums_valid} of {sums.full_sums} full sums decrypt to valid packed "
        "totals: the key or the ciphertext parsing in wire_audit's protocol section is wrong"
    )


def test_scanners_find_planted_tokens(audit: AuditRun, tmp_path: Path) -> None:
    """Self-test: a token planted in a copy of the view is found, whatever its encoding."""
    import base64

    from protocols.paillier import ciphertexts_to_bytes, encrypt_plaintexts

    token = next(iter(audit.own_tokens[1]))
    raw = bytes.fromhex(token)
    reply = next(r for r in audit.coordinator if r.message_type == DEBT_PROFILE_REPLY)
    payload = dict(reply.content["config"]["payload"])
    blob = payload["ciphertexts"]
    payload["ciphertexts"] = blob[:7] + raw + blob[7 + len(raw) :]  # unaligned, same length
    payload["note"] = f"x{token.upper()}y"
    payload["b64"] = base64.b64encode(b"\x01" + raw).decode()
    planted = dataclasses.replace(reply, content={"config": {"payload": payload}})
    forms = {h.form for h in find_tokens([planted], audit.tokens) if h.token == token}
    assert {"raw", "hex", "base64"} <= forms, f"planted token found only as {forms}"

    table = pa.table({"token": [token], "debt": [1]})
    pq.write_table(table, tmp_path / "t.parquet", compression="snappy")
    np.savez_compressed(tmp_path / "a.npz", t=np.frombuffer(raw, dtype=np.uint8))
    found = {h.message_type for h in scan_files(tmp_path, audit.tokens)}
    assert found == {"file t.parquet", "file a.npz"}, f"out-dir scan found tokens only in {found}"

    # One platform's unmasked packed figures, encrypted under the run's key, are flagged.
    pk = audit.private_key.public_key
    rows = np.array([[123_456, 2, 1], [0, 0, 0]], dtype=np.int64)
    plain = LAYOUT.pack(rows, int(pk.n).bit_length())
    fake = dataclasses.replace(
        reply,
        content={
            "config": {
                "payload": {
                    **payload,
                    "ciphertexts": ciphertexts_to_bytes(
                        pk, encrypt_plaintexts(pk, plain, workers=1)
                    ),
                }
            }
        },
    )
    flagged = [
        d for d in decryptable_values([fake], audit.private_key, LAYOUT) if d.rows is not None
    ]
    assert flagged and tuple(flagged[0].rows[0]) == (123_456, 2, 1)


# ------------------------------------------------------------------------- the properties


def test_coordinator_receives_no_token(audit: AuditRun) -> None:
    hits = find_tokens(audit.coordinator, audit.tokens)
    assert not hits, f"coordinator received {summarise_hits(hits)}"


def test_platforms_receive_no_plaintext_token(audit: AuditRun) -> None:
    problems = []
    for pid, view in sorted(audit.platforms.items()):
        hits = find_tokens(view, audit.tokens)
        if hits:
            own = {h.token for h in hits} & audit.own_tokens[pid]
            problems.append(
                f"partition {pid} received {summarise_hits(hits)}; {len(own):,} distinct of "
                f"them are its own customers (it learns which of them another platform asks "
                f"about), {len({h.token for h in hits} - own):,} are other platforms' customers"
            )
    assert not problems, "\n".join(problems)


def test_no_single_platform_figure_decrypts(audit: AuditRun) -> None:
    values = decryptable_values(audit.coordinator, audit.private_key, LAYOUT)
    assert values, "no ciphertexts to decrypt"
    single = [v for v in values if v.rows is not None]
    nonzero = [
        (v, tuple(int(x) for x in row))
        for v in single
        for row in v.rows  # type: ignore[union-attr]
        if row.any()
    ]
    own = [(v, row) for v, row in nonzero if row in audit.own_profiles.get(v.partition, set())]
    first = (
        f"{own[0][0].party}, query {own[0][0].query[:8]}, ciphertext {own[0][0].index}: "
        f"debt {own[0][1][0]:,} fen, {own[0][1][1]} active loans, lender flag {own[0][1][2]}"
        if own
        else "none"
    )
    replies = len({(v.party, v.query) for v in single})
    assert not single, (
        f"decrypting one platform's reply reveals its figures: {len(single):,} of "
        f"{len(values):,} ciphertexts in {replies} '{DEBT_PROFILE_REPLY}' replies decrypt to "
        f"one platform's packed (debt, loans, lender) slots; {len(nonzero):,} non-zero "
        f"token rows, {len(own):,} of them equal to rows of that platform's own ledger "
        f"(first: {first})"
    )


def test_only_full_sums_decrypt(audit: AuditRun) -> None:
    sums = check_sums(audit.coordinator, audit.private_key, layout=LAYOUT)
    assert sums.partial_sums > 0, "no partial sums to check (fewer than three platforms?)"
    assert sums.partial_sums_valid == 0, (
        f"partial sums decrypt: {sums.partial_sums_valid} of {sums.partial_sums} sampled "
        f"products over a proper subset of platforms decrypt to valid packed totals "
        f"(examples: {'; '.join(sums.examples)})"
    )


def test_coordinator_out_dir_holds_no_token(audit: AuditRun) -> None:
    hits = scan_files(audit.out_dir, audit.tokens)
    files = Counter(h.message_type for h in hits)
    first = hits[0] if hits else None
    assert not hits, (
        f"the coordinator's out-dir holds {len(hits):,} ledger-token occurrences (raw bytes "
        f"and decoded contents) "
        f"({len({h.token for h in hits}):,} distinct) in {dict(files)} (first: {first})"
    )


# ------------------------------------------------------------------------- training (secure sums)


def test_training_replies_hold_no_single_platform_vector(audit: AuditRun) -> None:
    """Every train, evaluate and feature-stats reply the coordinator received is one masked
    vector: no weights, no histogram, no sums in the clear; each looks uniform on its own."""
    replies = [r for r in audit.coordinator if r.message_type in SECURE_SUM_TYPES]
    kinds = Counter(r.message_type for r in replies)
    assert set(kinds) == set(SECURE_SUM_TYPES), f"training traffic seen: {kinds}"
    clear = [
        f"{r.party} {r.message_type}: arrays {sorted(r.content.get('arrays', {}))}, metrics "
        f"{sorted(r.content.get('metrics', {}))}, config {sorted(r.content.get('config', {}))}"
        for r in replies
        if r.content.get("arrays")
        or r.content.get("metrics")
        or set(r.content.get("config", {})) != {"secure-sum"}
    ]
    assert not clear, f"{len(clear)} training replies carry plain records: {clear[:3]}"
    for kind in SECURE_SUM_TYPES:
        for record in (r for r in replies if r.message_type == kind):
            plain_like, chi2 = uniformity([record.content["config"]["secure-sum"]["masked"]])
            words = len(record.content["config"]["secure-sum"]["masked"]) // 8
            # One reply alone: top bytes not piled on 0x00/0xff (a plaintext vector puts
            # nearly every word there; a uniform one 0.8 %, and 25 % of even the shortest
            # reply, 24 words, has probability below 1e-7).
            assert plain_like < 0.25, (record.party, kind, plain_like)
            if words >= 2560:  # enough words for a chi-square over 256 cells
                assert chi2 < 400, (record.party, kind, chi2)


def test_training_sums_are_right_and_only_full_sums_decode(audit: AuditRun) -> None:
    """The replies of one secure sum add up to the right totals (row counts against the
    platforms' own descriptions); any proper subset fails the sum's check word."""
    from protocols import secure_sum as ss

    groups = secure_sum_groups(audit.coordinator, audit.platforms)
    assert groups, "no secure sums recorded"
    full = partial = 0
    for group in groups:
        spec = group.spec
        assert len(group.replies) == len(spec.participants), "a sum with missing replies"
        total = ss.unmask_sum(list(group.replies.values()), spec)
        full += 1
        where = (group.message_type, spec.round_id)

        def people(split: str, parts: tuple[str, ...] = tuple(spec.participants)) -> int:
            return sum(audit.split_rows[p][split] for p in parts)

        if group.message_type == "query.gbdt_sketch":
            # Boosting has no early stopping: it trains on the validation people too.
            train_rows = people("train") + people("validation")
            assert total["labels"][0] == train_rows, where
            assert np.all(total["counts"].sum(axis=1) == train_rows), where
        elif group.message_type == "query.gbdt_level":
            if "hist-pos" in total:  # level 0: the root holds every training row
                train_rows = people("train") + people("validation")
                # Cells run feature after feature, each feature's summing to every row.
                ends = np.cumsum(total["count"][0])
                features = round(ends[-1] / train_rows)
                assert features >= 1 and ends[-1] == features * train_rows, where
                assert all(k * train_rows in ends for k in range(1, features + 1)), where
                assert total["hist-pos"].sum() + total["hist-neg"].sum() == people("test"), where
            assert np.all(total["hess"] >= 0) and np.all(total["count"] >= 0), where
        elif group.message_type == "query.gbdt_evaluate":
            assert total["n"] == people("test"), where
        else:
            # Training sums are over the training people; each round's evaluation over the
            # validation people (early stopping), the final one over the test people.
            split = {
                "query.feature_stats": "train",
                "train": "train",
                "query.feature_sketch": "train",
            }
            expected = split.get(group.message_type) or (
                "test" if spec.round_id.endswith("final-evaluate") else "validation"
            )
            if group.message_type == "query.feature_sketch":
                # A feature's rows with its missing flag set are left out; unflagged ones
                # count all.
                n = int(np.rint(total["sketch"]).sum(axis=1).max())
            else:
                n = total["n"]
            if spec.round_id.startswith("gbdt-"):
                # Boosting's scaler: no early stopping, so over the validation people too.
                assert group.message_type == "query.feature_stats", where
                assert n == people("train") + people("validation"), where
            else:
                assert n == people(expected), where
        for size in range(1, len(spec.participants)):
            for subset in itertools.combinations(group.replies.values(), size):
                words = sum(
                    (ss.words_of(b, spec) for b in subset), np.zeros(spec.count, dtype=np.uint64)
                )
                partial += 1
                assert int(words[-1]) != size, f"a subset of {spec.round_id} cancels its masks"
    assert full > 0 and partial > 0


def test_uniformity_check_flags_an_unmasked_vector(audit: AuditRun) -> None:
    """Self-test: the same spec's vector quantised but not masked fails the check above."""
    from protocols import secure_sum as ss

    group = next(
        g
        for g in secure_sum_groups(audit.coordinator, audit.platforms)
        if g.message_type == "train"
    )
    rng = np.random.default_rng(0)
    values = {
        f.name: (rng.normal(0, 0.3, f.shape) * 700 if not f.integer else np.full(f.shape, 700.0))
        for f in group.spec.fields
    }
    plain = ss.quantise(values, group.spec).astype("<u8").tobytes()
    plain_like, _ = uniformity([plain])
    assert plain_like > 0.9, plain_like
    masked = next(iter(group.replies.values()))
    assert uniformity([masked])[0] < 0.25
