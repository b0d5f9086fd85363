"""A throwaway Flower deployment (SuperLink + SuperNodes over real TLS on loopback) for tests.

Why this exists: the simulation engine skips everything that breaks first in production -- TLS,
FAB packaging, ``--node-config`` plumbing, app processes spawned by SuperExec, the Control API.
This harness starts the real ``flower-superlink`` / ``flower-supernode`` binaries of the venv,
drives them with the real ``flwr`` CLI, and guarantees that every process it caused to exist is
gone afterwards (asserted, by pid).

This is a helper module, not a test module (pytest does not collect it). Typical use::

    ledgers = [tmp_path / "a.sqlite", tmp_path / "b.sqlite"]
    with Deployment(tmp_path, node_configs=[{"ledger": str(x)} for x in ledgers]) as dep:
        result = dep.run_app(app_dir, {"out-dir": str(tmp_path / "out")}, timeout=600)
        assert result.succeeded, result.report()
    assert not dep.surviving_processes()

Notes on flwr 1.41 (read from its source, not guessed):

* The SuperLink serves the Fleet, Control and Runtime APIs on ONE HTTPS port (``--host`` /
  ``--port``); the old ``--fleet-api-address`` / ``--control-api-address`` flags are deprecated.
* A SuperNode serves its Runtime API (for the ClientApp processes) on ``--host``/``--port``
  (``--clientappio-api-address`` is rejected). It reaches the SuperLink at ``--superlink``.
* The SuperLink spawns ``flower-superexec`` in a NEW session (``start_new_session=True``), which
  spawns ``flwr-serverapp``; so killing our process groups is not enough. Every child therefore
  carries a per-deployment marker in its environment and is found through ``/proc`` at shutdown.
* The SuperLink installs app dependencies with ``uv`` unless
  ``--disable-runtime-dependency-installation``; SuperNodes only do so when asked
  (``--allow-runtime-dependency-installation``), so they need no flag.
* ``flwr run <app> <connection>`` reads the connection from ``$FLWR_HOME/config.toml``. If the
  app's pyproject.toml had a ``[tool.flwr.federations]`` table, ``flwr run`` would migrate it
  and REWRITE the pyproject (commenting it out); :meth:`Deployment.run_app` refuses such apps.
* ``flwr run --stream`` exits 0 even if the ServerApp failed; the run status comes from
  ``flwr ls --run-id N --format json`` (``finished:completed`` on success).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedcredit.deploy.ports import free_port_block
from fedcredit.deploy.procs import QUIET_ENV, TAG_VARIABLE, signal_group, tail
from fedcredit.deploy.procs import cmdline as _cmdline
from fedcredit.deploy.procs import descendants as _descendants
from fedcredit.deploy.procs import pid_alive as _pid_alive
from fedcredit.deploy.procs import tagged_pids as _tagged_pids
from fedcredit.deploy.runner import parse_flwr_json
from fedcredit.deploy.tls import TlsFiles, make_tls_files

__all__ = ["QUIET_ENV", "TAG_VARIABLE", "TlsFiles", "make_tls_files", "tail"]

log = logging.getLogger(__name__)

ConfigValue = str | int | float | bool

CONNECTION_NAME = "fedtest"
"""Name of the SuperLink connection written to ``$FLWR_HOME/config.toml``."""

RUN_SUCCESS_STATUS = "finished:completed"

_HANDED_OUT_PORTS: set[int] = set()


class DeploymentError(AssertionError):
    """The deployment did not come up or a CLI call failed; the message carries log tails."""


# ------------------------------------------------------------------------------ small helpers


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port (the first of ``count`` consecutive ones: SuperNodes take ``base + i``) that is
    free right now and not yet handed out by this process.

    The OS may reuse a port between this call and the server's bind (a classic race); the
    readiness checks turn that rare case into a clear error instead of a hang.
    """
    base = free_port_block(count, host, avoid=_HANDED_OUT_PORTS)
    _HANDED_OUT_PORTS.update(range(base, base + count))
    return base


def toml_value(value: ConfigValue) -> str:
    """A value in the TOML syntax that ``--run-config`` / ``--node-config`` parse.

    flwr splits those strings with a regex before handing them to a TOML parser, so a
    double quote inside a string cannot be expressed at all: refuse it loudly.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if '"' in value or "\\" in value or any(ch.isspace() for ch in value):
        raise ValueError(f"flwr cannot pass this string through a config flag: {value!r}")
    return f'"{value}"'


def config_string(config: Mapping[str, ConfigValue]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``a=1 b="x"`` (the format of --run-config and --node-config)."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def check_app_dir(app_dir: Path) -> None:
    """Refuse an app that ``flwr run`` would modify on disk.

    With a ``[tool.flwr.federations]`` table, flwr 1.41's ``flwr run`` "migrates" it: it
    copies the connections into ``$FLWR_HOME/config.toml`` (replacing the default connection)
    and comments the table out of the app's pyproject.toml -- a test must not edit the repo.
    """
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    if "federations" in pyproject.get("tool", {}).get("flwr", {}):
        raise DeploymentError(
            f"{app_dir / 'pyproject.toml'} has a [tool.flwr.federations] table: `flwr run` "
            "would rewrite that file (it migrates the table to $FLWR_HOME/config.toml). "
            "Remove the table; connections belong in $FLWR_HOME/config.toml."
        )


# ----------------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """A process we started, in its own session, with stdout+stderr in ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)


@dataclass
class RunResult:
    """What ``flwr run`` printed, and the run's final status according to ``flwr ls``."""

    run_id: int | None
    returncode: int | None
    output: str
    status: str
    status_details: str
    elapsed: float
    timed_out: bool
    logs: Callable[[], str] = field(repr=False)

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.status == RUN_SUCCESS_STATUS

    def report(self, lines: int = 60) -> str:
        """Everything needed to debug a failed run without re-running it."""
        output = "\n".join(self.output.splitlines()[-lines:])
        return (
            f"run {self.run_id}: status={self.status!r} details={self.status_details!r} "
            f"returncode={self.returncode} timed_out={self.timed_out} "
            f"elapsed={self.elapsed:.1f}s\n"
            f"----- flwr run output (last {lines} lines) -----\n{output}\n{self.logs()}"
        )


class Deployment:
    """One SuperLink and N SuperNodes on loopback with TLS, plus a ``flwr`` CLI pointed at them.

    Use it as a context manager: ``__enter__`` starts everything and waits until all SuperNodes
    are online; ``__exit__`` terminates, then kills, every process started -- including the
    SuperExec/ServerApp/ClientApp children flwr spawns outside our process groups -- and raises
    if any survives.
    """

    def __init__(
        self,
        workdir: Path,
        node_configs: list[Mapping[str, ConfigValue]],
        *,
        bin_dir: Path | None = None,
        supernode_runtime_tls: bool = True,
        startup_timeout: float = 90.0,
        stop_timeout: float = 15.0,
    ) -> None:
        """Lay out the work folder; nothing is started before ``start()`` / ``__enter__``.

        ``node_configs[i]`` becomes SuperNode i's ``--node-config``. ``bin_dir`` defaults to
        the folder of the running interpreter, i.e. the venv whose flwr the tests import.
        ``supernode_runtime_tls`` also puts each SuperNode's Runtime API (ClientApp <->
        SuperNode) behind TLS, as a production node would.
        """
        if not node_configs:
            raise ValueError("a deployment needs at least one SuperNode")
        self.workdir = workdir.resolve()
        self.node_configs = [dict(cfg) for cfg in node_configs]
        self.bin_dir = (bin_dir or Path(sys.executable).parent).resolve()
        self.supernode_runtime_tls = supernode_runtime_tls
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout

        self.tag = uuid.uuid4().hex
        self.log_dir = self.workdir / "logs"
        self.cli_home = self.workdir / "cli-home"
        self.superlink_port = 0
        self.supernode_ports: list[int] = []
        self.tls: TlsFiles | None = None
        self.processes: list[ManagedProcess] = []
        self._cli_calls = 0
        self._stopped = False

    # -------------------------------------------------------------------- binaries and env

    def _binary(self, name: str) -> str:
        candidate = self.bin_dir / name
        if candidate.exists():
            return str(candidate)
        found = shutil.which(name)
        if found is None:
            raise DeploymentError(f"{name} not found in {self.bin_dir} nor on PATH")
        return found

    def _env(self, flwr_home: Path) -> dict[str, str]:
        """Environment of every child: quiet, tagged, own FLWR_HOME, venv binaries first.

        The venv's bin goes first on PATH because SuperLink/SuperNode launch
        ``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` by bare name.
        Separate FLWR_HOMEs keep the components from sharing installed FABs and state,
        as they would on separate machines.
        """
        env = dict(os.environ)
        env.update(QUIET_ENV)
        env[TAG_VARIABLE] = self.tag
        env["FLWR_HOME"] = str(flwr_home)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])
        flwr_home.mkdir(parents=True, exist_ok=True)
        return env

    def _spawn(self, name: str, command: list[str], flwr_home: Path) -> ManagedProcess:
        """Start ``command`` in a new session (so its whole process group can be signalled)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            log_file.write(f"$ {shlex.join(command)}\n".encode())
            log_file.flush()
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env(flwr_home),
                cwd=self.workdir,
                start_new_session=True,
            )
        process = ManagedProcess(name=name, popen=popen, log_path=log_path)
        self.processes.append(process)
        log.info("started %s (pid %d): %s", name, popen.pid, shlex.join(command))
        return process

    # -------------------------------------------------------------------------- start-up

    def start(self) -> Deployment:
        """Start the SuperLink, the SuperNodes, write the CLI config, wait until all are online.

        On any failure everything started so far is stopped before the error propagates.
        """
        try:
            self._start()
        except BaseException:
            self.stop(raise_on_survivors=False)
            raise
        return self

    def _server_tls_flags(self) -> list[str]:
        """The flags that make a Flower server endpoint speak TLS with the test CA's cert."""
        assert self.tls is not None
        return [
            "--ssl-ca-certfile",
            str(self.tls.ca_cert),
            "--ssl-certfile",
            str(self.tls.server_cert),
            "--ssl-keyfile",
            str(self.tls.server_key),
        ]

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = make_tls_files(self.workdir / "tls")
        self.superlink_port = free_port()
        superlink = self._spawn(
            "superlink",
            [
                self._binary("flower-superlink"),
                *self._server_tls_flags(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.superlink_port),
                "--database",
                str(self.workdir / "superlink-state.db"),
                "--disable-runtime-dependency-installation",
            ],
            self.workdir / "superlink-home",
        )
        self._write_cli_config()
        self._wait_for(
            f"SuperLink TLS endpoint 127.0.0.1:{self.superlink_port}",
            self._superlink_answers,
            watch=[superlink],
        )

        for index, node_config in enumerate(self.node_configs):
            port = free_port()
            self.supernode_ports.append(port)
            command = [
                self._binary("flower-supernode"),
                "--root-certificates",
                str(self.tls.ca_cert),
                "--superlink",
                f"127.0.0.1:{self.superlink_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-config",
                config_string(node_config),
            ]
            if self.supernode_runtime_tls:
                command += self._server_tls_flags()
            self._spawn(f"supernode-{index}", command, self.workdir / f"supernode-{index}-home")

        nodes = self.processes[1:]
        self._wait_for(
            f"{len(nodes)} SuperNodes to register",
            lambda: all("SuperNode ID" in tail(p.log_path, 10_000) for p in nodes),
            watch=self.processes,
        )
        self._wait_for(
            f"{len(nodes)} SuperNodes online in `flwr supernode ls`",
            lambda: self.online_node_count() == len(nodes),
            watch=self.processes,
            interval=1.0,
        )
        log.info("deployment ready: %s", self.describe())

    def _write_cli_config(self) -> None:
        """``$FLWR_HOME/config.toml`` with a single TLS connection, set as the default.

        Written before any ``flwr`` call so flwr never creates its default config (whose
        ``local`` connection would make it spawn a detached SuperLink of its own).
        """
        assert self.tls is not None
        self.cli_home.mkdir(parents=True, exist_ok=True)
        text = (
            "[superlink]\n"
            f'default = "{CONNECTION_NAME}"\n\n'
            f"[superlink.{CONNECTION_NAME}]\n"
            f'address = "127.0.0.1:{self.superlink_port}"\n'
            f'root-certificates = "{self.tls.ca_cert}"\n'
        )
        (self.cli_home / "config.toml").write_text(text, encoding="utf-8")

    def _superlink_answers(self) -> bool:
        """True once the SuperLink's HTTPS endpoint completes a verified TLS handshake."""
        assert self.tls is not None
        context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.superlink_port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return True
        except ssl.SSLCertVerificationError as err:  # a wrong certificate never heals
            raise DeploymentError(f"SuperLink TLS verification failed: {err}") from err
        except OSError:
            return False

    def _wait_for(
        self,
        what: str,
        ready: Callable[[], bool],
        *,
        watch: list[ManagedProcess],
        timeout: float | None = None,
        interval: float = 0.2,
    ) -> None:
        """Poll ``ready`` until true; fail fast (with logs) if a watched process exits."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            dead = [p for p in watch if not p.alive()]
            if dead:
                names = ", ".join(f"{p.name} (exit {p.popen.returncode})" for p in dead)
                raise DeploymentError(
                    f"while waiting for {what}: {names} exited\n{self.logs_report()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out waiting for {what}\n{self.logs_report()}")
            time.sleep(interval)

    # ------------------------------------------------------------------------------ the CLI

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against this deployment; output is also logged to file.

        cwd is the work folder, never an app folder: with no connection name some flwr
        commands treat the cwd as an app and migrate (rewrite) its pyproject.toml.
        """
        self._cli_calls += 1
        log_path = self.log_dir / f"cli-{self._cli_calls:03d}.log"
        command = [self._binary("flwr"), *args]
        try:
            completed = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self._env(self.cli_home),
                cwd=self.workdir,
                timeout=timeout,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            log_path.write_text(f"$ {shlex.join(command)}\nTIMEOUT after {timeout}s\n")
            raise DeploymentError(f"`{shlex.join(command)}` timed out after {timeout}s") from err
        log_path.write_text(
            f"$ {shlex.join(command)}\nexit {completed.returncode}\n"
            f"--- stdout ---\n{completed.stdout}\n--- stderr ---\n{completed.stderr}\n",
            encoding="utf-8",
        )
        return completed

    def flwr_json(self, *args: str, timeout: float = 60.0) -> dict[str, object]:
        """Run a ``flwr ... --format json`` command and parse its JSON answer."""
        completed = self.flwr(*args, "--format", "json", timeout=timeout)
        data = parse_flwr_json(completed)
        if data is None:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` printed no JSON (exit {completed.returncode}):\n"
                f"{completed.stdout}\n{completed.stderr}"
            )
        return data

    def online_node_count(self) -> int:
        """How many SuperNodes the SuperLink reports as online (``flwr supernode ls``)."""
        try:
            data = self.flwr_json("supernode", "ls", CONNECTION_NAME, timeout=30)
        except DeploymentError:
            return 0  # the Control API may not be up yet
        nodes = data.get("nodes", [])
        if not isinstance(nodes, list):
            return 0
        return sum(1 for node in nodes if isinstance(node, dict) and node.get("status") == "online")

    def run_status(self, run_id: int) -> tuple[str, str]:
        """``(status, details)`` of a run, e.g. ``("finished:completed", "")``."""
        data = self.flwr_json("ls", CONNECTION_NAME, "--run-id", str(run_id), timeout=30)
        runs = data.get("runs")
        if not data.get("success") or not isinstance(runs, list) or not runs:
            raise DeploymentError(f"`flwr ls --run-id {run_id}` failed: {data}")
        run = runs[0]
        return str(run.get("status", "")), str(run.get("status-details", ""))

    def run_app(
        self,
        app_dir: Path,
        run_config: Mapping[str, ConfigValue] | None = None,
        *,
        timeout: float = 600.0,
        status_timeout: float = 30.0,
    ) -> RunResult:
        """``flwr run <app_dir> <connection> --stream [--run-config ...]`` and the final status.

        On timeout the CLI is killed and the run is stopped with ``flwr stop``; the result is
        returned either way (check ``result.succeeded``, print ``result.report()``).
        """
        app_dir = app_dir.resolve()
        check_app_dir(app_dir)

        command = [self._binary("flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream"]
        if run_config:
            command += ["--run-config", config_string(run_config)]
        started = time.monotonic()
        process = self._spawn(f"flwr-run-{len(self.processes)}", command, self.cli_home)
        timed_out = False
        try:
            process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            log.error("flwr run timed out after %.0fs; killing it", timeout)
            self._signal_group(process.pid, signal.SIGKILL)
            process.popen.wait(timeout=10)
        elapsed = time.monotonic() - started
        output = tail(process.log_path, 100_000)

        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        status, details = "unknown", "the run was never started"
        if run_id is not None:
            try:
                if timed_out:
                    self.flwr("stop", str(run_id), CONNECTION_NAME, timeout=30)
                status, details = self._final_status(run_id, status_timeout)
            except DeploymentError as err:  # e.g. the SuperLink died: still return the logs
                status, details = "unknown", f"could not read the run status: {err}"
        return RunResult(
            run_id=run_id,
            returncode=process.popen.returncode,
            output=output,
            status=status,
            status_details=details,
            elapsed=elapsed,
            timed_out=timed_out,
            logs=self.logs_report,
        )

    def _final_status(self, run_id: int, timeout: float) -> tuple[str, str]:
        """Poll ``flwr ls`` until the run is finished (the stream may end a moment earlier)."""
        deadline = time.monotonic() + timeout
        status, details = self.run_status(run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(1.0)
            status, details = self.run_status(run_id)
        return status, details

    # ------------------------------------------------------------------------------- reports

    def describe(self) -> str:
        return (
            f"SuperLink 127.0.0.1:{self.superlink_port} (pid "
            f"{self.processes[0].pid if self.processes else '-'}), SuperNodes on ports "
            f"{self.supernode_ports}, work folder {self.workdir}"
        )

    def logs_report(self, lines: int = 40) -> str:
        """The tail of every process log, for assertion messages."""
        parts = [f"===== deployment: {self.describe()}"]
        for process in self.processes:
            state = "running" if process.alive() else f"exit {process.popen.returncode}"
            parts.append(
                f"===== {process.name} (pid {process.pid}, {state}) {process.log_path} "
                f"(last {lines} lines)\n{process.tail(lines)}"
            )
        return "\n".join(parts)

    def kill_node(self, index: int) -> None:
        """SIGKILL SuperNode ``index`` and the ClientApp processes it spawned, as a crash would."""
        process = next(p for p in self.processes if p.name == f"supernode-{index}")
        family = {process.pid} | _descendants([process.pid])
        self._signal_group(process.pid, signal.SIGKILL)
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        process.popen.wait(timeout=10)
        log.info("killed supernode-%d (pid %d)", index, process.pid)

    # ---------------------------------------------------------------------------- shutdown

    def _family(self) -> set[int]:
        """Every live process this deployment caused: ours, their descendants, tagged ones."""
        ours = {p.pid for p in self.processes if p.alive()}
        return ours | _descendants(p.pid for p in self.processes) | _tagged_pids(self.tag)

    def _signal_group(self, pid: int, sig: signal.Signals) -> None:
        signal_group(pid, sig)

    def _reap(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=0.05)

    def _wait_gone(self, pids: set[int], timeout: float) -> set[int]:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            alive = {pid for pid in pids if _pid_alive(pid)} | self._family()
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def surviving_processes(self) -> list[str]:
        """Descriptions of processes of this deployment that are still alive (should be [])."""
        self._reap()
        return [f"{pid}: {_cmdline(pid)}" for pid in sorted(self._family())]

    def stop(self, *, raise_on_survivors: bool = True) -> list[str]:
        """SIGTERM everything (SuperNodes first), wait, SIGKILL what is left; report survivors.

        SuperNodes go first so that they do not spin on reconnecting to a dead SuperLink.
        The family is collected before signalling: once a parent dies its children are
        re-parented and only the environment marker still identifies them.
        """
        if self._stopped:
            return self.surviving_processes()
        self._stopped = True
        family = self._family()
        for process in reversed(self.processes):
            if process.alive():
                self._signal_group(process.pid, signal.SIGTERM)
        for pid in family:
            self._signal_group(pid, signal.SIGTERM)
        alive = self._wait_gone(family, self.stop_timeout)
        if alive:
            log.warning("SIGKILL for processes that ignored SIGTERM: %s", sorted(alive))
            for pid in alive:
                self._signal_group(pid, signal.SIGKILL)
            for process in self.processes:
                if process.alive():
                    self._signal_group(process.pid, signal.SIGKILL)
            self._wait_gone(alive, 10.0)
        survivors = self.surviving_processes()
        if survivors:
            message = "processes survived the deployment's shutdown:\n" + "\n".join(survivors)
            log.error(message)
            if raise_on_survivors:
                raise DeploymentError(message)
        else:
            log.info("deployment stopped; no process left (%s)", self.workdir)
        return survivors

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # If the body already failed, keep its error as the one reported (survivors are
        # logged); otherwise leftover processes are a failure of their own.
        self.stop(raise_on_survivors=exc_type is None)
