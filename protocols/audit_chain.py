"""Verifying the hash-chained audit logs that platforms and the key holder keep.

Two logs, one rule: every entry stores ``prev`` (the previous entry's hash, ``GENESIS`` for the
first) and its own hash ``sha256(prev || canonical JSON of the entry without its hash)``.

- The platform's query log (table ``query_log`` in its ledger, ``clients/query_log.py``): rows
  with a ``seq`` number, ``prev_hash`` and ``entry_hash``; the hashed body is seq, query id,
  kind, outcome, detail (JSON text) and ``received_at``.
- The key holder's audit file (JSON lines, ``server/keyholder.py``): each line is an object
  with ``prev`` and ``hash``; the hashed body is the line without ``hash``. It has no sequence
  number: the line number stands in for it.

Why one verifier: both sides must give an auditor the same answers (count, head hash, the
first bad entry and why), and a check added for one log should not be forgotten for the
other. What the checks catch, and what they cannot:

- **content**: an entry whose stored hash is not the hash of its content and ``prev`` was
  edited (or its hash was). Caught unless the editor recomputed this hash *and every later
  one*; that rewrite is only caught by an anchor.
- **sequence** (query log only): seq numbers must run 1, 2, 3, ... A gap names the deleted
  entries; deleting from the middle also breaks the next entry's link.
- **link**: an entry must chain to the entry stored before it. When it does not, the
  verifier says which tampering fits: it chains to a *later* entry (reordered), it skips
  its predecessor and chains to the one before (the predecessor was inserted), it repeats an
  earlier entry (replayed), or it chains to a hash absent from the log (entries deleted).
- **time**: timestamps that go backwards are a *warning*: clocks step back legitimately
  (NTP), and the chain, not the clock, fixes the order.
- **anchor** (``expect_count``, ``expect_head``): the chain alone cannot show that entries
  were removed from the end, nor that everything from some point on was rewritten with
  freshly computed hashes, because the result is a valid chain. An auditor who kept a count
  and head hash published earlier (or that the other party holds: the bureau keeps the
  platform's head and vice versa) catches both: the log must still hold at least that many
  entries and entry ``expect_count`` must still have that hash. Entries appended after the
  anchor are legitimate and reported, not refused; a forged entry appended *after* the
  anchor, with a valid hash, is indistinguishable from a real one until a later anchor is
  compared with the other party's records.

Nothing here opens an identifier: the verifier reads hashes, numbers and the stored text.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

GENESIS = "0" * 64
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")

# The columns of a query-log row that its hash covers, in the writer's order.
QUERY_LOG_FIELDS = ("seq", "query_id", "kind", "outcome", "detail", "received_at")


def chain_hash(prev: str, body: Mapping[str, Any]) -> str:
    """``sha256(prev || canonical JSON)``: the one hash both logs use."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + text).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ChainEntry:
    """One stored entry, as read, with the hash its content should have.

    ``position`` is 1-based in storage order (seq order for the query log, line order for
    the key holder's file); ``label`` is how a person finds it ("entry seq 3", "line 3").
    ``unreadable`` says why an entry could not be parsed at all (its other fields are then
    empty).
    """

    position: int
    label: str
    seq: int | None
    prev: str
    stored_hash: str
    computed_hash: str
    at: str | None
    record: dict[str, Any]
    unreadable: str | None = None


@dataclasses.dataclass(frozen=True)
class Break:
    """The first bad entry: where (position, label, seq) and why (check, reason)."""

    position: int | None
    label: str
    seq: int | None
    check: str
    reason: str

    def message(self) -> str:
        return f"{self.label}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ChainReport:
    """What ``verify_chain`` found: publishable (count, head) and the first break if any."""

    count: int
    head: str
    first_bad: Break | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    anchor: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "count": self.count,
            "head": self.head,
            "first_bad": self.first_bad.to_dict() if self.first_bad else None,
            "warnings": list(self.warnings),
            "anchor": self.anchor,
        }


# ------------------------------------------------------------------------------ readers


def query_log_entry(position: int, row: Mapping[str, Any]) -> ChainEntry:
    """A ``query_log`` row (any mapping with its columns) as a chain entry."""
    try:
        body = {k: row[k] for k in QUERY_LOG_FIELDS}
        seq = row["seq"]
        prev, stored = row["prev_hash"], row["entry_hash"]
    except KeyError as exc:
        return _unreadable(position, f"row {position}", f"missing column {exc}")
    return ChainEntry(
        position=position,
        label=f"entry seq {seq}",
        seq=seq if isinstance(seq, int) else None,
        prev=str(prev),
        stored_hash=str(stored),
        computed_hash=chain_hash(str(prev), body),
        at=row["received_at"] if isinstance(row["received_at"], str) else None,
        record=dict(body),
    )


def keyholder_line_entry(position: int, line: str) -> ChainEntry:
    """One line of the key holder's JSON-lines audit file as a chain entry."""
    label = f"line {position}"
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return _unreadable(position, label, "not JSON")
    if not isinstance(entry, dict):
        return _unreadable(position, label, "not a JSON object")
    stored = entry.pop("hash", None)
    prev = entry.get("prev")
    if not isinstance(stored, str) or not isinstance(prev, str):
        return _unreadable(position, label, "no 'prev' and 'hash' fields")
    at = entry.get("at")
    return ChainEntry(
        position=position,
        label=label,
        seq=None,
        prev=prev,
        stored_hash=stored,
        computed_hash=chain_hash(prev, entry),
        at=at if isinstance(at, str) else None,
        record={k: v for k, v in entry.items() if k != "prev"},
    )


def keyholder_entries(lines: Iterable[str]) -> list[ChainEntry]:
    """Every line of an audit file; a blank line counts (someone removed its content)."""
    found = list(lines)
    while found and not found[-1].strip():  # a trailing newline is not an entry
        found.pop()
    return [keyholder_line_entry(i + 1, line) for i, line in enumerate(found)]


def _unreadable(position: int, label: str, why: str) -> ChainEntry:
    return ChainEntry(position, label, None, "", "", "", None, {}, unreadable=why)


# ----------------------------------------------------------------------------- verifier


def verify_chain(
    entries: Sequence[ChainEntry],
    *,
    expect_head: str | None = None,
    expect_count: int | None = None,
) -> ChainReport:
    """Check every entry and the optional anchor; the report names the first bad entry.

    Checks per entry, in this order so that the reason given is the most specific one: it
    parses; its hash is well formed; it is not a repeat of an earlier entry; its seq is
    the next one (query log); it chains to its predecessor (and if not, which tampering
    fits); its hash matches its content. Then the anchor. Time going backwards is a
    warning only.
    """
    first_at: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e.stored_hash and e.stored_hash not in first_at:
            first_at[e.stored_hash] = i
    report = ChainReport(count=len(entries), head=entries[-1].stored_hash if entries else GENESIS)
    prev = GENESIS
    last_time: tuple[str, dt.datetime] | None = None
    for i, e in enumerate(entries):
        bad = _check_entry(entries, i, prev, first_at)
        if bad is not None:
            report.first_bad = bad
            break
        prev = e.stored_hash
        last_time = _check_time(e, last_time, report.warnings)
    report.anchor = _check_anchor(entries, report, expect_head, expect_count)
    return report


def _check_entry(
    entries: Sequence[ChainEntry], i: int, prev: str, first_at: Mapping[str, int]
) -> Break | None:
    e = entries[i]

    def bad(check: str, reason: str, at: ChainEntry = e) -> Break:
        return Break(at.position, at.label, at.seq, check, reason)

    if e.unreadable:
        return bad("unreadable", f"unreadable ({e.unreadable})")
    if not _HASH_RE.fullmatch(e.stored_hash) or not _HASH_RE.fullmatch(e.prev):
        return bad("content", "its hash or previous hash is not 64 lowercase hex (edited)")
    earlier = first_at.get(e.stored_hash, i)
    if earlier < i:
        return bad("inserted", f"repeats {entries[earlier].label} (a replayed copy)")
    if e.seq is not None or entries[0].seq is not None:
        expected = i + 1
        if e.seq is None:
            return bad("sequence", "seq is not a whole number (edited)")
        if e.seq > expected:
            gone = str(expected) if e.seq == expected + 1 else f"{expected}..{e.seq - 1}"
            return bad("deleted", f"seq jumps from {expected - 1} to {e.seq}: entry {gone} deleted")
        if e.seq < expected:
            return bad("sequence", f"seq {e.seq} where {expected} was due (renumbered)")
    if e.prev != prev:
        target = first_at.get(e.prev)
        if target is not None and target > i - 1:
            return bad(
                "reordered",
                f"chains to {entries[target].label}, which is stored after it (entries reordered)",
            )
        if i >= 1 and (e.prev == GENESIS if i == 1 else e.prev == entries[i - 2].stored_hash):
            before = entries[i - 1]
            return bad(
                "inserted",
                f"not part of the chain: {e.label} chains past it to its predecessor "
                "(entry inserted)",
                at=before,
            )
        if target is None:
            return bad(
                "deleted",
                "chains to a hash that is not in the log (the entry before it was deleted "
                "or rewritten)",
            )
        return bad("link", f"chains to {entries[target].label}, not to the entry before it")
    if e.computed_hash != e.stored_hash:
        return bad("content", "content does not match its hash (edited)")
    return None


def _check_time(
    e: ChainEntry, last: tuple[str, dt.datetime] | None, warnings: list[str]
) -> tuple[str, dt.datetime] | None:
    if e.at is None:
        return last
    try:
        when = parse_time(e.at)
    except ValueError:
        warnings.append(f"{e.label}: time {e.at!r} is not ISO 8601")
        return last
    if last is not None and when < last[1]:
        warnings.append(f"{e.label}: time {e.at} is earlier than {last[0]}'s (clock stepped back?)")
    return (e.label, when) if last is None or when >= last[1] else last


def parse_time(text: str) -> dt.datetime:
    """ISO 8601 as an aware datetime (naive times are taken as UTC, as the writers use)."""
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _check_anchor(
    entries: Sequence[ChainEntry],
    report: ChainReport,
    expect_head: str | None,
    expect_count: int | None,
) -> dict[str, Any] | None:
    """Compare with a published (count, head): catches truncation and full rewrites."""
    if expect_head is None and expect_count is None:
        return None
    anchor: dict[str, Any] = {"expect_count": expect_count, "expect_head": expect_head}
    count = len(entries)
    failure: Break | None = None
    if expect_count is not None and count < expect_count:
        gone = str(expect_count) if count + 1 == expect_count else f"{count + 1}..{expect_count}"
        failure = Break(
            count + 1,
            f"entry {count + 1}",
            count + 1 if entries and entries[0].seq is not None else None,
            "truncated",
            f"the log holds {count} entries but the anchor says {expect_count}: entry {gone} "
            "deleted from the end (or the log rewritten)",
        )
    elif expect_head is not None:
        if expect_count is not None:
            found = entries[expect_count - 1].stored_hash if expect_count else GENESIS
            if found != expect_head:
                at = entries[expect_count - 1] if expect_count else None
                failure = Break(
                    expect_count or None,
                    at.label if at else "the empty log",
                    at.seq if at else None,
                    "anchor",
                    "hash differs from the anchored head: the log was rewritten at or before "
                    "this entry",
                )
            else:
                anchor["position"] = expect_count
        else:
            where = 0 if expect_head == GENESIS else first_index(entries, expect_head)
            if where is None:
                failure = Break(
                    None,
                    "the anchored head",
                    None,
                    "anchor",
                    "not found in the log: entries were deleted from the end or the log was "
                    "rewritten",
                )
            else:
                anchor["position"] = where
    if failure is None and "position" in anchor:
        anchor["appended_since"] = count - anchor["position"]
    elif failure is None and expect_count is not None:
        anchor["appended_since"] = count - expect_count
    anchor["ok"] = failure is None
    # A break inside the chain comes before any anchor failure: it is the first bad entry.
    if failure is not None and report.first_bad is None:
        report.first_bad = failure
    return anchor


def first_index(entries: Sequence[ChainEntry], digest: str) -> int | None:
    """1-based position of the entry with this hash, if any."""
    for e in entries:
        if e.stored_hash == digest:
            return e.position
    return None
