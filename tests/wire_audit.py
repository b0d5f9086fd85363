"""A wire audit: record every message each party receives, then scan it for what must not be there.

The threat model (``MISSION.md``) is a claim about *views*: what the coordinator and each
platform receive. Unit tests of handlers cannot check it, because a leak is usually a field
nobody thought of. So a Flower mod wraps every ClientApp call of a real federation run and
writes both sides of each exchange to disk:

* the inbound message is what one **platform** receives from the coordinator;
* the reply is what the **coordinator** receives from that platform.

The scanners then look for ledger tokens in any form (raw 32 bytes at any offset, hex text,
base64, SHA-256 of the token), for ciphertexts that decrypt to one platform's packed figures,
and for tokens in the files the coordinator writes.

Everything above the ``PROTOCOL-SPECIFIC`` banner knows nothing of fedcredit's message
formats; the functions below it (where ciphertexts live in a reply, how replies of one query
are grouped) are the part to adapt when the protocol changes.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import pickle
import re
import time
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from protocols.packing import DEBT_PROFILE_LAYOUT, SlotLayout

TOKEN_BYTES = 32
Direction = Literal["in", "out"]

# ------------------------------------------------------------------------------ recording


@dataclass(frozen=True)
class WireRecord:
    """One message as one party received it, reduced to plain picklable values.

    ``direction`` is ``"in"`` for a message the platform received, ``"out"`` for the reply
    the coordinator received. ``content`` maps ``"config"``, ``"arrays"`` and ``"metrics"``
    to ``{record name: {key: value}}`` with bytes, str, numbers, lists and numpy arrays.
    """

    node_id: int
    partition: int | None
    direction: Direction
    message_type: str
    message_id: str
    reply_to: str
    recorded_ns: int
    content: dict[str, dict[str, dict[str, Any]]]
    error: str | None = None

    @property
    def party(self) -> str:
        who = f"partition {self.partition}" if self.partition is not None else "node"
        return f"{who} (node {self.node_id})"


def _plain_content(msg: Message) -> tuple[dict[str, dict[str, dict[str, Any]]], str | None]:
    """Every record of a message as plain values (an error reply has no content)."""
    if msg.has_error():
        return {}, f"{msg.error.code}: {msg.error.reason}"
    content = msg.content
    return {
        "config": {name: dict(rec.items()) for name, rec in content.config_records.items()},
        "arrays": {
            name: {k: np.array(arr.numpy(), copy=True) for k, arr in rec.items()}
            for name, rec in content.array_records.items()
        },
        "metrics": {name: dict(rec.items()) for name, rec in content.metric_records.items()},
    }, None


class WireRecorder:
    """A Flower ClientApp mod that writes each inbound message and its reply to ``directory``.

    Picklable (a plain class holding a path): the simulation engine runs ClientApps in Ray
    worker processes, so records go to files, one per message, never to shared memory. A
    recording failure propagates on purpose: an audit that silently misses a message would
    pass for the wrong reason.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = str(directory)

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        self._write(msg, context, "in")
        reply = call_next(msg, context)
        self._write(reply, context, "out")
        return reply

    def _write(self, msg: Message, context: Context, direction: Direction) -> None:
        content, error = _plain_content(msg)
        pid = context.node_config.get("partition-id")
        meta = msg.metadata
        record = WireRecord(
            node_id=int(context.node_id),
            partition=int(pid) if isinstance(pid, int) else None,
            direction=direction,
            message_type=meta.message_type,
            message_id=meta.message_id or "",
            reply_to=meta.reply_to_message_id or "",
            recorded_ns=time.time_ns(),
            content=content,
            error=error,
        )
        out = Path(self.directory)
        out.mkdir(parents=True, exist_ok=True)
        # Unique across Ray workers (one node's messages may run in different processes).
        name = f"{record.partition}-{record.node_id}-{record.recorded_ns}-{uuid.uuid4().hex[:8]}"
        tmp = out / f".{name}-{direction}.tmp"
        with tmp.open("wb") as fh:
            pickle.dump(record, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, out / f"{name}-{direction}.pkl")


def recording_client_app(inner: ClientApp, recorder: WireRecorder) -> ClientApp:
    """A ClientApp with ``recorder`` as its mod that forwards every message to ``inner``.

    Flower binds app-wide mods when a handler is registered, so they cannot be added to an
    app that is already built. This registers one forwarding handler per message type the
    inner app serves (read from its registry, so new message types are covered without
    editing this file). A ``mods`` argument on ``clients.app.build_client_app`` would make
    this wrapper unnecessary.
    """
    outer = ClientApp(mods=[recorder])
    registered = list(inner._registered_funcs)  # private: see docstring
    if not registered:
        raise ValueError("the inner ClientApp registers no message handlers")

    def forward(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    for full_name in registered:
        category, action = full_name.split(".", 1)
        register = {"train": outer.train, "evaluate": outer.evaluate, "query": outer.query}
        register[category](action)(forward)
    return outer


def load_records(directory: str | Path) -> list[WireRecord]:
    """Every record in ``directory``, in the order they were written."""
    records = []
    for path in sorted(Path(directory).glob("*.pkl")):
        with path.open("rb") as fh:
            records.append(pickle.load(fh))  # files this test wrote itself
    return sorted(records, key=lambda r: r.recorded_ns)


def load_views(directory: str | Path) -> tuple[list[WireRecord], dict[int, list[WireRecord]]]:
    """``(coordinator view, {partition or node id: platform view})``.

    The coordinator's view is every reply; a platform's view is every message it received.
    """
    coordinator: list[WireRecord] = []
    platforms: dict[int, list[WireRecord]] = defaultdict(list)
    for record in load_records(directory):
        if record.direction == "out":
            coordinator.append(record)
        else:
            key = record.partition if record.partition is not None else record.node_id
            platforms[key].append(record)
    return coordinator, dict(platforms)


def iter_values(record: WireRecord) -> Iterator[tuple[str, object]]:
    """``(where, value)`` for every leaf value of a record (lists flattened one level)."""
    for kind, records in record.content.items():
        for name, values in records.items():
            for key, value in values.items():
                where = f"{kind} {name}/{key}"
                if isinstance(value, list):
                    for i, item in enumerate(value):
                        yield f"{where}[{i}]", item
                else:
                    yield where, value


# ------------------------------------------------------------------------------ token scans


@dataclass(frozen=True)
class Hit:
    """One token found: which token, in what form, and where."""

    token: str
    form: str  # raw, hex, base64, sha256-raw, sha256-hex
    where: str
    message_type: str = ""

    def __str__(self) -> str:
        return f"{self.token[:12]}... as {self.form} in {self.message_type} {self.where}".strip()


class TokenIndex:
    """Every searchable form of a set of 64-hex ledger tokens.

    Raw 32-byte forms (the token and its SHA-256) are found at *any* byte offset: an
    8-byte prefix of every form is matched against the 8-byte word at every offset with
    numpy, and candidates are confirmed on the full 32 bytes. Hex forms are found in any
    run of hex digits (case-insensitive), and base64 runs are decoded and scanned as raw
    bytes, so aligning, hex-encoding or base64-encoding a token does not hide it.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self.raw: dict[bytes, tuple[str, str]] = {}
        for token in tokens:
            token = token.lower()
            raw = bytes.fromhex(token)
            if len(raw) != TOKEN_BYTES:
                raise ValueError(f"not a 32-byte token: {token!r}")
            self.raw[raw] = (token, "raw")
            self.raw.setdefault(hashlib.sha256(raw).digest(), (token, "sha256-raw"))
            self.raw.setdefault(hashlib.sha256(token.encode()).digest(), (token, "sha256-raw"))
        self.hex = {
            raw.hex(): (tok, form.replace("raw", "hex")) for raw, (tok, form) in self.raw.items()
        }
        self.prefixes = (
            np.unique(np.frombuffer(b"".join(r[:8] for r in self.raw), dtype="<u8"))
            if self.raw
            else np.zeros(0, dtype="<u8")
        )

    def __len__(self) -> int:
        return sum(1 for _tok, form in self.raw.values() if form == "raw")


_HEX_RUN = re.compile(rb"[0-9a-fA-F]{64,}")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{43,}={0,2}")
_CHUNK = 1 << 22


def _raw_offsets(blob: bytes, index: TokenIndex) -> Iterator[tuple[int, bytes]]:
    """Offsets of every indexed 32-byte form in ``blob``, at any alignment."""
    if len(blob) < TOKEN_BYTES or not len(index.prefixes):
        return
    arr = np.frombuffer(blob, dtype=np.uint8)
    for start in range(0, len(blob) - TOKEN_BYTES + 1, _CHUNK):
        stop = min(start + _CHUNK, len(blob) - TOKEN_BYTES + 1)  # window starts
        count = stop - start
        words = np.zeros(count, dtype=np.uint64)
        for i in range(8):
            words |= arr[start + i : start + i + count].astype(np.uint64) << np.uint64(8 * i)
        for off in np.flatnonzero(np.isin(words, index.prefixes)):
            at = start + int(off)
            window = blob[at : at + TOKEN_BYTES]
            if window in index.raw:
                yield at, window


def scan_blob(
    blob: bytes | str, index: TokenIndex, where: str, message_type: str = ""
) -> list[Hit]:
    """Every token form in one value (bytes or text)."""
    data = blob.encode() if isinstance(blob, str) else bytes(blob)
    hits = [
        Hit(*index.raw[w], f"{where} @ byte {at}", message_type)
        for at, w in _raw_offsets(data, index)
    ]
    for run in _HEX_RUN.finditer(data):
        text = run.group().decode().lower()
        for i in range(len(text) - 63):
            found = index.hex.get(text[i : i + 64])
            if found:
                hits.append(Hit(*found, f"{where} @ char {run.start() + i}", message_type))
    for run in _B64_RUN.finditer(data):
        chunk = run.group().rstrip(b"=")
        if _HEX_RUN.fullmatch(chunk):
            continue  # already scanned as hex
        chunk = chunk[: len(chunk) - len(chunk) % 4]
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                decoded = decode(chunk)
            except ValueError:
                continue
            hits += [
                Hit(index.raw[w][0], "base64", f"{where} @ char {run.start()}", message_type)
                for _at, w in _raw_offsets(decoded, index)
            ]
    return hits


def find_tokens(view: Sequence[WireRecord], tokens: TokenIndex | Iterable[str]) -> list[Hit]:
    """Every occurrence of any token, in any form, in any value of any record of a view."""
    index = tokens if isinstance(tokens, TokenIndex) else TokenIndex(tokens)
    hits: list[Hit] = []
    for record in view:
        for where, value in iter_values(record):
            label = f"from/to {record.party}: {where}"
            if isinstance(value, bytes | bytearray | str):
                hits += scan_blob(value, index, label, record.message_type)
            elif isinstance(value, np.ndarray):
                hits += scan_blob(value.tobytes(), index, label, record.message_type)
        if record.error:
            hits += scan_blob(record.error, index, f"{record.party}: error", record.message_type)
    return hits


def _file_payloads(path: Path) -> Iterator[tuple[str, bytes]]:
    """The file's bytes, plus decompressed/decoded contents where compression could hide data."""
    yield str(path), path.read_bytes()
    if zipfile.is_zipfile(path):  # npz, torch .pt
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                yield f"{path}:{name}", zf.read(name)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for column in table.column_names:
            values = table.column(column).to_pylist()
            parts = [v if isinstance(v, bytes) else str(v).encode() for v in values]
            yield f"{path}:column {column}", b"\n".join(parts)


def scan_files(directory: str | Path, tokens: TokenIndex | Iterable[str]) -> list[Hit]:
    """Every token form in every file under ``directory`` (parquet and zip contents decoded)."""
    index = tokens if isinstance(tokens, TokenIndex) else TokenIndex(tokens)
    hits: list[Hit] = []
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        for label, blob in _file_payloads(path):
            hits += scan_blob(blob, index, label, f"file {path.relative_to(directory)}")
    return hits


def summarise_hits(hits: Sequence[Hit]) -> str:
    """``N tokens (M distinct) in 'type' ...; first: ...`` for assertion messages."""
    if not hits:
        return "nothing"
    by_type = Counter(h.message_type for h in hits)
    distinct = len({h.token for h in hits})
    forms = Counter(h.form for h in hits)
    parts = ", ".join(f"{n:,} in {t!r}" for t, n in by_type.most_common())
    return (
        f"{len(hits):,} ledger-token occurrences ({distinct:,} distinct tokens; forms "
        f"{dict(forms)}): {parts} (first: {hits[0]})"
    )


# ------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Decrypted:
    """One ciphertext of one platform's reply, decrypted by the test (it holds the key)."""

    party: str
    partition: int | None
    query: str
    index: int
    plaintext: int
    rows: np.ndarray | None  # per-token (debt, loans, flag) if it packs as ONE platform's values


def single_platform_rows(plaintext: int, key_bits: int, layout: SlotLayout) -> np.ndarray | None:
    """Rows if ``plaintext`` is a valid packing of *one contributor's* values, else None.

    Every slot must be within the single-contributor bound (so all headroom bits zero) and
    everything above the packed width zero. A masked plaintext is uniform modulo n, so it
    passes with probability about 2^-(hundreds): passing means the value is unmasked.
    """
    tpp = layout.tokens_per_plaintext(key_bits)
    tb = layout.token_bits
    if plaintext < 0 or plaintext >> (tpp * tb):
        return None
    shifts, at = [], 0
    for f in layout.fields:
        shifts.append(at)
        at += layout.slot_bits(f)
    rows = np.zeros((tpp, len(layout.fields)), dtype=np.int64)
    for j in range(tpp):
        token = (plaintext >> (j * tb)) & ((1 << tb) - 1)
        for col, f in enumerate(layout.fields):
            v = (token >> shifts[col]) & ((1 << layout.slot_bits(f)) - 1)
            if v >> f.contributor_bits:
                return None
            rows[j, col] = v
    return rows


def sum_rows(plaintext: int, key_bits: int, layout: SlotLayout) -> np.ndarray | None:
    """Rows if ``plaintext`` is a valid packed *sum* (slots within max_sum), else None."""
    tpp = layout.tokens_per_plaintext(key_bits)
    try:
        return layout.unpack([plaintext], tpp, key_bits)
    except ValueError:
        return None


def decryptable_values(
    view: Sequence[WireRecord], private_key: Any, layout: SlotLayout = DEBT_PROFILE_LAYOUT
) -> list[Decrypted]:
    """Decrypt every ciphertext of every debt-profile reply in ``view`` with the run's key.

    Each reply comes from one platform, so any of its ciphertexts that decrypts to a valid
    single-contributor packing is that platform's own figures in the clear (to whoever holds
    the key).
    """
    from protocols.paillier import decrypt_plaintexts

    key_bits = int(private_key.public_key.n).bit_length()
    out: list[Decrypted] = []
    for record, query, cts in reply_ciphertexts(view, private_key.public_key):
        plains = decrypt_plaintexts(private_key, cts)
        out += [
            Decrypted(
                record.party,
                record.partition,
                query,
                i,
                p,
                single_platform_rows(p, key_bits, layout),
            )
            for i, p in enumerate(plains)
        ]
    return out


@dataclass
class SumCheck:
    """What decrypting products of replies (per query) reveals."""

    full_sums: int = 0
    full_sums_valid: int = 0
    partial_sums: int = 0
    partial_sums_valid: int = 0
    examples: list[str] = field(default_factory=list)


def check_sums(
    view: Sequence[WireRecord],
    private_key: Any,
    layout: SlotLayout = DEBT_PROFILE_LAYOUT,
    per_subset: int = 4,
) -> SumCheck:
    """Decrypt full sums (all platforms of a query) and partial sums (proper subsets, >= 2).

    With masks that cancel only in the full sum, every full sum must unpack and every
    partial sum must be noise. ``per_subset`` ciphertexts per subset keep this cheap.
    """
    from protocols.paillier import add_ciphertexts, decrypt_plaintexts

    pk = private_key.public_key
    key_bits = int(pk.n).bit_length()
    by_query: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for record, query, cts in reply_ciphertexts(view, pk):
        by_query[query][record.party] = cts
    result = SumCheck()
    for query, per_party in by_query.items():
        parties = sorted(per_party)
        width = min(len(c) for c in per_party.values())
        for size in range(2, len(parties) + 1):
            for subset in itertools.combinations(parties, size):
                k = width if size == len(parties) else min(width, per_subset)
                sums = add_ciphertexts(pk, [per_party[p][:k] for p in subset])
                valid = sum(
                    sum_rows(p, key_bits, layout) is not None
                    for p in decrypt_plaintexts(private_key, sums)
                )
                if size == len(parties):
                    result.full_sums += k
                    result.full_sums_valid += valid
                else:
                    result.partial_sums += k
                    result.partial_sums_valid += valid
                    if valid and len(result.examples) < 3:
                        result.examples.append(f"query {query[:8]}: {' + '.join(subset)}")
    return result


# ==============================================================================================
# PROTOCOL-SPECIFIC: where debt-profile ciphertexts travel and how one query's replies group.
# Adapt these (and the key source in tests/test_wire_audit.py::_private_key_for_run) when the
# protocol changes; everything above is protocol-agnostic.
# ==============================================================================================

DEBT_PROFILE_REPLY = "query.debt_profile"
PAYLOAD_RECORD = "payload"
CIPHERTEXT_FIELD = "ciphertexts"


def ciphertext_width(public_key: Any) -> int:
    """Bytes of one fixed-width big-endian ciphertext: the byte length of n**2."""
    return (int(public_key.nsquare).bit_length() + 7) // 8


def query_of(record: WireRecord) -> str:
    """Which query a reply answers (replies to one query are summed together)."""
    payload = record.content.get("config", {}).get(PAYLOAD_RECORD, {})
    raw = payload.get(PAYLOAD_RECORD)
    if isinstance(raw, bytes):
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError:
            fields = {}
        if isinstance(fields, dict) and isinstance(fields.get("query_id"), str):
            return fields["query_id"]
    return record.reply_to  # fallback: one group per request


def reply_ciphertexts(
    view: Sequence[WireRecord], public_key: Any
) -> Iterator[tuple[WireRecord, str, list[int]]]:
    """``(reply, query, ciphertext ints)`` for every debt-profile reply in the view."""
    width = ciphertext_width(public_key)
    for record in view:
        if record.direction != "out" or record.message_type != DEBT_PROFILE_REPLY or record.error:
            continue
        blob = record.content.get("config", {}).get(PAYLOAD_RECORD, {}).get(CIPHERTEXT_FIELD)
        if not isinstance(blob, bytes) or not blob or len(blob) % width:
            raise ValueError(
                f"{record.party}: {DEBT_PROFILE_REPLY} reply without a whole number of "
                f"{width}-byte ciphertexts in {PAYLOAD_RECORD}/{CIPHERTEXT_FIELD}"
            )
        cts = [int.from_bytes(blob[i : i + width], "big") for i in range(0, len(blob), width)]
        yield record, query_of(record), cts


# ------------------------------------------------------------------------------ secure sums

SECURE_SUM_TYPES = (
    "train",
    "evaluate",
    "query.feature_stats",
    "query.feature_sketch",
    # Federated boosting: bin-edge sketch counts, per-level histograms, final evaluation.
    "query.gbdt_sketch",
    "query.gbdt_level",
    "query.gbdt_evaluate",
)


@dataclass(frozen=True)
class SecureSumGroup:
    """One secure sum as the wire saw it: the spec the platforms were sent, and each
    participant's masked reply as the coordinator received it."""

    spec: Any  # protocols.secure_sum.SecureSumSpec
    message_type: str
    replies: dict[int, bytes]  # partition (or node id) -> masked vector


def secure_sum_groups(
    coordinator: Sequence[WireRecord], platforms: dict[int, list[WireRecord]]
) -> list[SecureSumGroup]:
    """Pair every masked training reply with the spec of the request it answers (by nonce)."""
    from protocols import secure_sum as ss

    specs: dict[str, Any] = {}
    for view in platforms.values():
        for record in view:
            raw = record.content.get("config", {}).get(ss.SPEC_KEY, {}).get("spec")
            if isinstance(raw, bytes):
                spec = ss.SecureSumSpec.model_validate_json(raw)
                specs[spec.nonce] = (spec, record.message_type)
    groups: dict[str, dict[int, bytes]] = defaultdict(dict)
    for record in coordinator:
        if record.message_type not in SECURE_SUM_TYPES or record.error:
            continue
        body = record.content.get("config", {}).get(ss.SPEC_KEY, {})
        nonce, masked = body.get("nonce"), body.get("masked")
        if isinstance(nonce, str) and isinstance(masked, bytes):
            key = record.partition if record.partition is not None else record.node_id
            groups[nonce][key] = masked
    return [
        SecureSumGroup(specs[nonce][0], specs[nonce][1], replies)
        for nonce, replies in groups.items()
        if nonce in specs
    ]


def uniformity(blobs: Sequence[bytes]) -> tuple[float, float]:
    """``(share of words that look like plaintext, chi-square of their top byte)``.

    A quantised plaintext entry (a count, a histogram bin, a weight times rows, positive or
    negative) is small in two's complement: its top byte is 0x00 or 0xff. A uniform word has
    such a top byte with probability 2/256, so masked replies show under 1 % of them and a
    plain vector nearly 100 %. The chi-square over the 256 top-byte cells (255 degrees of
    freedom) is for long vectors.
    """
    words = np.concatenate([np.frombuffer(b, dtype="<u8") for b in blobs])
    top = (words >> np.uint64(56)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    expected = len(words) / 256
    plain_like = float((counts[0] + counts[255]) / len(words))
    return plain_like, float(((counts - expected) ** 2 / expected).sum())
