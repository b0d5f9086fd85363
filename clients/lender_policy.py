"""The platform's decision on a lender question: its own ``policy.toml``, applied per record.

Every check depends only on the lender, the purpose, the consent record and the platform's
own log of earlier questions, never on whether the platform holds the applicant (it cannot
tell: it sees only a random-looking blinded element). So a refusal reveals nothing about its
customers. The rate limit counts the applicants this platform re-blinded for the lender in
the last hour, read from its hash-chained query log, so it holds across the fresh ClientApp
process a SuperNode starts per message, and across restarts.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from clients.query_log import QueryLog, query_log
from fedcredit.deploy.policy import PlatformPolicy, load_policy
from protocols.consent import SignedConsent

LENDER_KIND = "lender_blind"


@dataclass
class Decision:
    """Per record: accepted, or refused with a reason; ``batch_reason`` refuses all."""

    accepted: list[bool]
    reasons: dict[int, str] = field(default_factory=dict)
    batch_reason: str | None = None

    @property
    def accepted_count(self) -> int:
        return sum(self.accepted)


_policies: dict[str, tuple[float, PlatformPolicy]] = {}


def policy_at(path: str) -> PlatformPolicy:
    """The validated policy file, re-read when it changes (a platform may edit it live)."""
    mtime = Path(path).stat().st_mtime
    cached = _policies.get(path)
    if cached is None or cached[0] != mtime:
        cached = _policies[path] = (mtime, load_policy(Path(path)))
    return cached[1]


def recent_applicants(audit: QueryLog, lender: str, now: dt.datetime) -> int:
    """Applicants re-blinded for ``lender`` in the hour before ``now``, from the query log."""
    cutoff = (now - dt.timedelta(hours=1)).isoformat(timespec="seconds")
    with audit._ledger.engine.connect() as conn:
        rows = conn.execute(
            select(query_log.c.detail).where(
                (query_log.c.kind == LENDER_KIND)
                & (query_log.c.outcome == "answered")
                & (query_log.c.received_at >= cutoff)
            )
        ).all()
    total = 0
    for (detail,) in rows:
        doc = json.loads(detail)
        if doc.get("lender") == lender:
            total += int(doc.get("blinded", 0))
    return total


def decide(
    policy: PlatformPolicy | None,
    lender: str,
    purpose: str,
    consents: tuple[SignedConsent, ...],
    first_elements: list[bytes] | None,
    used: int,
    now: dt.datetime,
) -> Decision:
    """Apply the policy to one question; ``first_elements`` is given at step 1 only.

    ``used``: applicants of this lender re-blinded in the last hour (``recent_applicants``)
    plus those accepted earlier in the same round; the rate limit counts both.
    """
    count = len(consents)
    refuse_all = _batch_reason(policy, lender, purpose, count, used)
    if refuse_all is not None:
        return Decision([False] * count, {}, refuse_all)
    assert policy is not None
    key = bytes.fromhex(policy.lender_keys[lender])
    decision = Decision([True] * count)
    for k, consent in enumerate(consents):
        reason = _record_reason(consent, lender, purpose, key, now)
        if (
            reason is None
            and first_elements is not None
            and consent.record.element != first_elements[k].hex()
        ):
            reason = "consent is for another blinded element"
        if reason is not None:
            decision.accepted[k] = False
            decision.reasons[k] = reason
    return decision


def _batch_reason(
    policy: PlatformPolicy | None,
    lender: str,
    purpose: str,
    count: int,
    used: int,
) -> str | None:
    if policy is None:
        return "this platform has no policy file: it answers no lender"
    if lender not in policy.lenders:
        return f"lender {lender} is not served by this platform"
    if lender not in policy.lender_keys:
        return f"lender {lender} has no pinned key in this platform's policy"
    if purpose not in policy.purposes:
        return f"purpose {purpose} is not accepted by this platform"
    if count > policy.max_batch:
        return f"{count} applicants exceed this platform's max_batch of {policy.max_batch}"
    if used + count > policy.rate_limit_per_lender_per_hour:
        return (
            f"rate limit: {used} applicants in the last hour plus {count} exceed "
            f"{policy.rate_limit_per_lender_per_hour} per hour for {lender}"
        )
    return None


def _record_reason(
    consent: SignedConsent, lender: str, purpose: str, key: bytes, now: dt.datetime
) -> str | None:
    if consent.record.lender != lender:
        return "consent names another lender"
    if consent.record.purpose != purpose:
        return "consent names another purpose"
    return consent.verify(key) or consent.record.check_time(now)
