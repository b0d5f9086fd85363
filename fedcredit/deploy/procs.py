"""Finding and stopping the processes of a Flower deployment, by pid, through ``/proc``.

Why not process groups alone: the SuperLink spawns ``flower-superexec`` in a NEW session, which
spawns ``flwr-serverapp``; SuperNodes spawn ``flwr-clientapp`` processes. Killing the groups we
created leaves those behind. So every process we start carries a per-deployment marker in its
environment (inherited by all its descendants) and is found again through ``/proc`` -- both by
``fedcredit deploy down`` and by the test harness (``tests/deployment.py``). Nothing here ever
matches processes by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterable
from pathlib import Path

TAG_VARIABLE = "FEDCREDIT_DEPLOYMENT_TAG"
"""Environment marker inherited by every process a deployment starts (found via /proc)."""

# Silence everything that would phone home or wait on the network.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "NO_COLOR": "1",
    "COLUMNS": "250",  # rich wraps at 80 columns without a TTY, which breaks log matching
}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # flwr colours its log levels even without a TTY


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (or a note that it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f"<cannot read {path}: {err}>"
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (zombies are dead, just not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def proc_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def tagged_pids(tag: str) -> set[int]:
    """Every live process whose environment carries this deployment's marker."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found: set[int] = set()
    for pid in proc_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_alive(pid):
            found.add(pid)
    return found


def descendants(roots: Iterable[int]) -> set[int]:
    """Live descendants of ``roots`` (by parent pid), in case a child scrubbed its environment."""
    children: dict[int, list[int]] = {}
    for pid in proc_pids():
        parent = parent_pid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {pid for pid in found if pid_alive(pid)}


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal ``pid``'s process group (never our own group), then ``pid`` itself."""
    try:
        pgid = os.getpgid(pid)
        if pgid != os.getpgrp():
            os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def family(pids: Iterable[int], tag: str | None) -> set[int]:
    """``pids`` that still live, their live descendants and every process carrying ``tag``."""
    roots = list(pids)
    found = {pid for pid in roots if pid_alive(pid)} | descendants(roots)
    if tag:
        found |= tagged_pids(tag)
    return found


def stop_processes(
    pids: list[int], tag: str | None, *, timeout: float = 15.0, kill_timeout: float = 10.0
) -> set[int]:
    """SIGTERM ``pids`` (in the given order) and their family, SIGKILL what outlives ``timeout``.

    The family is collected before signalling: once a parent dies its children are re-parented
    and only the environment marker still identifies them. Returns the pids still alive.
    """
    everyone = family(pids, tag)
    for pid in pids:
        if pid_alive(pid):
            signal_group(pid, signal.SIGTERM)
    for pid in everyone:
        signal_group(pid, signal.SIGTERM)
    alive = _wait_gone(everyone, tag, timeout)
    if alive:
        for pid in alive:
            signal_group(pid, signal.SIGKILL)
        alive = _wait_gone(alive, tag, kill_timeout)
    return alive


def _wait_gone(pids: set[int], tag: str | None, timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid for pid in pids if pid_alive(pid)}
        if tag:
            alive |= tagged_pids(tag)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
