"""Where the bureau's pipeline reports its progress.

The ServerApp runs inside Flower's runtime (a thread of the simulation engine, or the
``flwr-serverapp`` process of a SuperLink), so it cannot own a terminal. It reports stages and
steps here; by default they go to ``logging``, and ``fedcredit demo``, which runs the
simulation in its own process, installs a sink that draws a rich progress display.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("fedcredit.progress")

#: sink(stage, done, total, note): total 0 means "indeterminate"
Sink = Callable[[str, int, int, str], None]


def _log_sink(stage: str, done: int, total: int, note: str) -> None:
    if total:
        log.info("%s: %d/%d %s", stage, done, total, note)
    else:
        log.info("%s %s", stage, note)


_sink: Sink = _log_sink


def set_sink(sink: Sink | None) -> None:
    global _sink
    _sink = sink or _log_sink


def report(stage: str, done: int = 0, total: int = 0, note: str = "") -> None:
    try:
        _sink(stage, done, total, note)
    except Exception:  # a broken display must never stop the federation
        log.debug("progress sink failed", exc_info=True)
