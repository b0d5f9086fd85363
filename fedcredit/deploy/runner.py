"""``fedcredit deploy up / down / status``: the whole federation of a folder on loopback.

``up`` is a try-out, not a service manager: it starts the key holder, the SuperLink and one
SuperNode per platform as detached processes (each in its own session, so they outlive the
command), records their pids in ``DIR/pids.json`` as it goes (so ``down`` can clean up even
after a failed ``up``), and returns once every SuperNode is online. Every process, and
everything they spawn (SuperExec, ServerApp, ClientApp processes), carries a per-``up`` marker
in its environment; ``down`` signals only processes that carry it, so a recycled pid is never
killed by mistake.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedcredit.deploy.bundle import (
    CONNECTION,
    LOOPBACK,
    DeployError,
    Manifest,
    keyholder_argv,
    load_manifest,
    superlink_argv,
    supernode_argv,
)
from fedcredit.deploy.procs import (
    QUIET_ENV,
    TAG_VARIABLE,
    cmdline,
    pid_alive,
    stop_processes,
    tail,
)

log = logging.getLogger(__name__)

PIDS = "pids.json"


@dataclass
class Started:
    name: str
    pid: int
    log: Path
    popen: subprocess.Popen[bytes]


def _binary(name: str) -> str:
    """The venv's own Flower binaries first (the interpreter's folder), then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def _env(tag: str, flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env[TAG_VARIABLE] = tag
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


def cli_env(out: Path) -> dict[str, str]:
    """Environment for the ``flwr`` CLI against this folder's SuperLink."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["FLWR_HOME"] = str(out / "bureau" / "flwr-home")
    return env


def flwr_json(out: Path, *args: str, timeout: float = 60.0) -> dict[str, object]:
    """Run ``flwr ... --format json`` with the bureau's FLWR_HOME; parse the JSON it prints.

    cwd is the deployment folder, never an app folder: some flwr commands treat the cwd as an
    app and migrate (rewrite) its pyproject.toml.
    """
    completed = subprocess.run(
        [_binary("flwr"), *args, "--format", "json"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=cli_env(out),
        cwd=out,
        timeout=timeout,
        check=False,
    )
    data = parse_flwr_json(completed)
    if data is None:
        raise DeployError(
            f"`flwr {' '.join(args)}` printed no JSON (exit {completed.returncode}):\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    return data


def parse_flwr_json(completed: subprocess.CompletedProcess[str]) -> dict[str, object] | None:
    """The JSON object a ``flwr ... --format json`` command printed (after any log lines)."""
    text = completed.stdout.strip()
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def online_nodes(out: Path) -> int:
    """How many SuperNodes the SuperLink reports as online (``flwr supernode ls``)."""
    try:
        data = flwr_json(out, "supernode", "ls", CONNECTION, timeout=30)
    except (DeployError, subprocess.TimeoutExpired):
        return 0
    nodes = data.get("nodes", [])
    if not isinstance(nodes, list):
        return 0
    return sum(1 for node in nodes if isinstance(node, dict) and node.get("status") == "online")


def _tls_answers(host: str, port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host, port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLCertVerificationError as err:  # a wrong certificate never heals
        raise DeployError(f"{host}:{port}: TLS verification failed: {err}") from err
    except OSError:
        return False


class _Launcher:
    def __init__(self, out: Path, tag: str) -> None:
        self.out = out
        self.tag = tag
        self.started: list[Started] = []
        self.logs = out / "logs"
        self.logs.mkdir(exist_ok=True)

    def spawn(self, name: str, argv: list[str], flwr_home: Path) -> Started:
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as fh:
            fh.write(f"$ {shlex.join(argv)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=_env(self.tag, flwr_home),
                cwd=self.out,
                start_new_session=True,
            )
        started = Started(name, popen.pid, log_path, popen)
        self.started.append(started)
        self.write_pids()
        log.info("started %s (pid %d)", name, popen.pid)
        return started

    def write_pids(self) -> None:
        doc = {
            "tag": self.tag,
            "processes": [{"name": s.name, "pid": s.pid, "log": s.log.name} for s in self.started],
        }
        (self.out / PIDS).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    def wait_for(
        self, what: str, ready: Callable[[], bool], timeout: float, interval: float = 0.3
    ) -> None:
        """Poll ``ready``; fail fast, with the log tails, if a started process exits."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [s for s in self.started if s.popen.poll() is not None]
            if dead:
                names = ", ".join(f"{s.name} (exit {s.popen.returncode})" for s in dead)
                raise DeployError(f"while waiting for {what}: {names} exited\n{self.report()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise DeployError(f"timed out waiting for {what}\n{self.report()}")
            time.sleep(interval)

    def report(self, lines: int = 25) -> str:
        return "\n".join(
            f"===== {s.name} (pid {s.pid}) {s.log}\n{tail(s.log, lines)}" for s in self.started
        )


def _register_nodes(out: Path, manifest: Manifest) -> None:
    """``flwr supernode register`` every platform's auth key (already registered is fine).

    With ``--enable-supernode-auth`` the SuperLink refuses a SuperNode whose public key was
    not registered through the Control API first; the SuperLink's state database remembers
    registrations, so a second ``up`` finds them there.
    """
    for entry in manifest.platforms:
        pub = out / entry.dir / "supernode-auth.pub"
        data = flwr_json(
            out, "supernode", "register", str(pub), CONNECTION, "--name", entry.dir, timeout=60
        )
        if not data.get("success"):
            message = json.dumps(data)
            if "already" not in message.lower():
                raise DeployError(f"registering {entry.dir}'s SuperNode key failed: {message}")
            log.info("%s: key already registered", entry.dir)


def up(out: Path, *, timeout: float = 120.0) -> Manifest:
    """Start the key holder, the SuperLink and every SuperNode; wait until all are online."""
    out = out.resolve()
    manifest = load_manifest(out)
    if manifest.host not in LOOPBACK:
        raise DeployError(
            f"`deploy up` is a one-machine try-out; {out} was made for host {manifest.host!r}. "
            "Start each party with the commands in COMMANDS.md instead."
        )
    if (out / PIDS).exists() and running(out):
        raise DeployError(f"{out} is already up (see {out / PIDS}); run `fedcredit deploy down`")
    launcher = _Launcher(out, uuid.uuid4().hex)
    bureau = out / "bureau"
    ca = out / "ca" / "ca.pem"
    try:
        launcher.spawn(
            "keyholder",
            keyholder_argv(out, manifest, program=[sys.executable, "-m", "fedcredit"]),
            bureau / "keyholder-home",
        )
        launcher.spawn(
            "superlink",
            superlink_argv(out, manifest, binary=_binary("flower-superlink")),
            bureau / "superlink-home",
        )
        launcher.wait_for(
            "the key holder and the SuperLink to answer over TLS",
            lambda: (
                _tls_answers(manifest.host, manifest.keyholder_port, ca)
                and _tls_answers(manifest.host, manifest.superlink_port, ca)
            ),
            timeout,
        )
        if manifest.node_auth:
            launcher.wait_for(
                "the Control API", lambda: _control_api_answers(out), timeout, interval=1.0
            )
            _register_nodes(out, manifest)
        for entry in manifest.platforms:
            launcher.spawn(
                f"supernode-{entry.dir}",
                supernode_argv(out, manifest, entry, binary=_binary("flower-supernode")),
                out / entry.dir / "flwr-home",
            )
        count = len(manifest.platforms)
        launcher.wait_for(
            f"{count} SuperNodes online in `flwr supernode ls`",
            lambda: online_nodes(out) == count,
            timeout,
            interval=1.0,
        )
    except BaseException:
        log.error("deploy up failed; stopping what it started")
        if launcher.started:
            survivors = down(out)
            if survivors:
                log.error("still running after the failed up: %s", survivors)
        raise
    return manifest


def _control_api_answers(out: Path) -> bool:
    try:
        flwr_json(out, "supernode", "ls", CONNECTION, timeout=30)
    except (DeployError, subprocess.TimeoutExpired):
        return False
    return True


def _read_pids(out: Path) -> tuple[str, list[dict[str, object]]]:
    path = out / PIDS
    if not path.is_file():
        raise DeployError(f"{path}: nothing recorded as running (no pids.json)")
    doc = json.loads(path.read_text(encoding="utf-8"))
    return str(doc["tag"]), list(doc["processes"])


def _carries_tag(pid: int, tag: str) -> bool:
    """True if ``pid`` still is a process we started (its environment has our marker)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{TAG_VARIABLE}={tag}".encode() in environ.split(b"\0")


def running(out: Path) -> list[tuple[str, int]]:
    """``(name, pid)`` of the recorded processes that still run (and still are ours)."""
    tag, processes = _read_pids(out)
    found = []
    for proc in processes:
        pid = int(str(proc["pid"]))
        if pid_alive(pid) and _carries_tag(pid, tag):
            found.append((str(proc["name"]), pid))
    return found


def down(out: Path, *, timeout: float = 15.0) -> list[str]:
    """Stop every recorded process and its descendants; return descriptions of survivors.

    SuperNodes first (so they do not spin reconnecting to a dead SuperLink), then the
    SuperLink, then the key holder: the reverse of the start order.
    """
    out = out.resolve()
    tag, processes = _read_pids(out)
    pids = [
        int(str(p["pid"]))
        for p in reversed(processes)
        if pid_alive(int(str(p["pid"]))) and _carries_tag(int(str(p["pid"])), tag)
    ]
    survivors = stop_processes(pids, tag, timeout=timeout)
    described = [f"{pid}: {cmdline(pid)}" for pid in sorted(survivors)]
    if described:
        log.error("processes survived `deploy down`:\n%s", "\n".join(described))
    else:
        (out / PIDS).unlink(missing_ok=True)
    return described


def stop_supernode(out: Path, platform_dir: str, *, timeout: float = 15.0) -> None:
    """Stop one platform's SuperNode (and the ClientApps it spawned), as an outage would."""
    out = out.resolve()
    tag, processes = _read_pids(out)
    name = f"supernode-{platform_dir}"
    pids = [int(str(p["pid"])) for p in processes if p["name"] == name]
    alive = [pid for pid in pids if pid_alive(pid) and _carries_tag(pid, tag)]
    survivors = stop_processes(alive, None, timeout=timeout)  # its family only, not all tagged
    if survivors:
        raise DeployError(f"{name} survived: {sorted(survivors)}")


# What a SuperNode logs when it cannot connect or activate (flwr ExitCode
# SUPERNODE_CONNECTION_ERROR). Flower's process exits with status 1 for every error, so
# the log line is the only way to tell this one apart.
CONNECTION_ERROR_MARK = b"Exit Code: 305"
ACTIVATED_MARK = b"SuperNode ID:"


def start_supernode(
    out: Path, platform_dir: str, *, activation_timeout: float = 180.0, retry_s: float = 5.0
) -> int:
    """(Re)start one platform's SuperNode under this folder's ``up``; returns its pid once
    the SuperLink has activated it.

    Why it may take several tries: a SuperNode that stopped keeps its activation at the
    SuperLink until two heartbeats lapse (about a minute; ``flwr supernode ls`` still says
    online). A SuperNode started with the same key before then is refused ("could not be
    activated", HTTP 412) and exits at once (Flower's exit code 305 in its log), leaving the
    platform out for good.
    So a refused start is retried every ``retry_s`` seconds until ``activation_timeout``.
    """
    out = out.resolve()
    manifest = load_manifest(out)
    tag, processes = _read_pids(out)
    entry = next(e for e in manifest.platforms if e.dir == platform_dir)
    launcher = _Launcher(out, tag)
    name = f"supernode-{entry.dir}"
    others = [p for p in processes if p["name"] != name]
    deadline = time.monotonic() + activation_timeout
    attempts = 0
    while True:
        attempts += 1
        log_path = launcher.logs / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        started = launcher.spawn(
            name,
            supernode_argv(out, manifest, entry, binary=_binary("flower-supernode")),
            out / entry.dir / "flwr-home",
        )
        doc = {
            "tag": tag,
            "processes": [
                *others,
                {"name": started.name, "pid": started.pid, "log": started.log.name},
            ],
        }
        (out / PIDS).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        while time.monotonic() < deadline:
            code = started.popen.poll()
            if code is not None or _log_since(started.log, offset).count(ACTIVATED_MARK):
                break
            time.sleep(0.3)
        code = started.popen.poll()
        if code is None:
            if _log_since(started.log, offset).count(ACTIVATED_MARK):
                log.info("%s activated (attempt %d)", name, attempts)
                return started.pid
            stop_processes([started.pid], None)
            raise DeployError(
                f"{name} was not activated within {activation_timeout:.0f} s:\n"
                + tail(started.log, 25)
            )
        stop_processes([started.pid], None)  # its SuperExec outlives it otherwise
        refused = CONNECTION_ERROR_MARK in _log_since(started.log, offset)
        if not refused or time.monotonic() + retry_s >= deadline:
            raise DeployError(f"{name} exited with status {code}:\n" + tail(started.log, 25))
        log.info("%s refused by the SuperLink (exit code 305); retrying in %.0f s", name, retry_s)
        time.sleep(retry_s)


def _log_since(path: Path, offset: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read()
