"""The bureau's inquiry record: one hash-chained line per lender request, never an identifier.

The key holder's ``AuditLog`` format (JSON lines, ``prev`` and ``hash``), so
``fedcredit audit verify FILE`` and ``fedcredit audit show FILE --lender L`` read it. It is
reopened at its last line, so a restarted service continues the same chain. Each line says
who asked (lender), why (purpose), about how many applicants, with what outcome (answered,
refused, the platforms missing and the refusal reasons), and when; never a blinded element,
a pseudonym, a token or a total.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from server.keyholder import AuditLog
from server.serving import QuestionAnswer


class InquiryAudit:
    def __init__(self, path: Path | None) -> None:
        self.log = AuditLog(path)

    def record(self, answer: QuestionAnswer, caller: str) -> str:
        answered = sum(1 for a in answer.answers if a.status == "answered")
        reasons = sorted({f"{p}: {r}" for a in answer.answers for p, r in a.refusals.items()})
        return self.log.append(
            {
                "event": "lender_query",
                "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "query_id": answer.query_id,
                "lender": answer.lender,
                "purpose": answer.purpose,
                "applicants": len(answer.answers),
                "answered": answered,
                "refused": len(answer.answers) - answered,
                "decision": "answered" if answered else "refused",
                "missing": sorted(answer.missing),
                "reasons": reasons[:10],
                "caller": caller,
            }
        )
