"""Feature names both sides must agree on without either side reading the other's data.

The bureau asks for the cross-platform model by these names; each platform computes them from
the totals it received (``clients/features.py``). Keeping the list here, not in ``clients/``,
means the bureau's code never imports platform-side code.
"""

from __future__ import annotations

CROSS_PLATFORM_FEATURES = (
    "log_total_debt",
    "total_active_loans",
    "lenders",
    "log_other_platforms_debt",
    "other_lenders",
    "log_total_debt_to_income",
)
