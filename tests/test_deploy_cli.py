"""``fedcredit deploy``: the files ``init`` writes, and ``up`` / ``flwr run`` / ``down`` for real.

Why test the files one by one: a deployment breaks on details nobody looks at until a platform
cannot connect -- a key left world-readable, a certificate not signed by the CA everyone trusts,
a roster that misses the key holder, an API key whose stored hash does not match. The slow test
then runs the generated folder exactly as COMMANDS.md tells an operator to.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import ValidationError

from fedcredit.cli import main
from fedcredit.deploy import DeployError, Manifest, init, load_manifest
from fedcredit.deploy.policy import PlatformPolicy, load_policy
from fedcredit.deploy.procs import QUIET_ENV, TAG_VARIABLE, pid_alive, stop_processes, tagged_pids
from fedcredit.deploy.tls import verify_signed_by
from protocols.identity import load_identity, load_roster
from tests.conftest import REPO
from tests.deployment import free_port

PLATFORMS = 3

PRIVATE = [
    "ca/ca.key",
    "bureau/superlink.key",
    "bureau/coordinator.token",
    "bureau/keyholder/keystore.key",
    "bureau/keyholder/keystore.json",
    "bureau/keyholder/keyholder.key",
    *[
        f"platform-{i:02d}/{name}"
        for i in range(1, PLATFORMS + 1)
        for name in ("identity.json", "supernode.key", "supernode-auth.key")
    ],
    *[f"lenders/lender-{i:02d}.{ext}" for i in (1, 2) for ext in ("key", "api-key")],
]
PUBLIC = [
    "COMMANDS.md",
    "deploy.json",
    "ca/ca.pem",
    "bureau/superlink.pem",
    "bureau/keyholder/keyholder.pem",
    "bureau/roster.json",
    "bureau/lenders.json",
    "bureau/run-config.toml",
    "bureau/flwr-home/config.toml",
    *[
        f"platform-{i:02d}/{name}"
        for i in range(1, PLATFORMS + 1)
        for name in (
            "ca.pem",
            "roster.json",
            "supernode.pem",
            "supernode-auth.pub",
            "node-config.txt",
            "policy.toml",
        )
    ],
    *[f"lenders/lender-{i:02d}.pub" for i in (1, 2)],
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """One small deployment folder (1024-bit test key, 300 borrowers) shared by the checks."""
    out = tmp_path_factory.mktemp("deploy") / "fed"
    manifest = init(PLATFORMS, out, borrowers=300, key_bits=1024, lenders=2)
    return out, manifest


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_init_writes_every_file_with_the_right_mode(bundle: tuple[Path, Manifest]) -> None:
    out, _ = bundle
    for name in PRIVATE:
        assert _mode(out / name) == 0o600, name
    for name in PUBLIC:
        assert (out / name).is_file(), name
        assert _mode(out / name) & 0o022 == 0, name  # nobody else may change it
    for key in out.rglob("*.key"):  # no private key escaped the list above
        assert _mode(key) == 0o600, key


def test_roster_pins_every_platform_and_the_keyholder(bundle: tuple[Path, Manifest]) -> None:
    from server.keystore import Keystore, KeystoreSecret

    out, manifest = bundle
    roster = load_roster(out / "bureau" / "roster.json")
    store = Keystore.open(
        out / "bureau/keyholder/keystore.json",
        KeystoreSecret.from_key_file(out / "bureau/keyholder/keystore.key"),
    )
    assert roster.keyholder_signing_key == store.verify_key_bytes.hex()
    assert sorted(roster.platforms) == sorted(p.name for p in manifest.platforms)
    for entry in manifest.platforms:
        pdir = out / entry.dir
        identity = load_identity(pdir / "identity.json")
        assert identity.name == entry.name
        assert roster.platforms[entry.name] == identity.public_entry()
        assert load_roster(pdir / "roster.json") == roster


def test_certificates_verify_against_the_ca(bundle: tuple[Path, Manifest]) -> None:
    out, manifest = bundle
    ca = out / "ca" / "ca.pem"
    certs = [out / "bureau/superlink.pem", out / "bureau/keyholder/keyholder.pem"]
    certs += [out / p.dir / "supernode.pem" for p in manifest.platforms]
    for path in certs:
        cert = verify_signed_by(path, ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    for entry in manifest.platforms:
        assert (out / entry.dir / "ca.pem").read_bytes() == ca.read_bytes()
    ca_key = serialization.load_pem_private_key((out / "ca/ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    assert ca_key.public_key() == ca_cert.public_key()


def test_supernode_auth_keys_are_what_flwr_loads(bundle: tuple[Path, Manifest]) -> None:
    """OpenSSH EC keys on a NIST curve: flower-supernode and `flwr supernode register` read them."""
    out, manifest = bundle
    for entry in manifest.platforms:
        pdir = out / entry.dir
        private = serialization.load_ssh_private_key(
            (pdir / "supernode-auth.key").read_bytes(), None
        )
        public = serialization.load_ssh_public_key((pdir / "supernode-auth.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key() == public


def test_policies_validate_and_bad_ones_are_refused(bundle: tuple[Path, Manifest]) -> None:
    out, manifest = bundle
    for entry in manifest.platforms:
        policy = load_policy(out / entry.dir / "policy.toml")
        assert policy.lenders == manifest.lenders
        assert policy.purposes and policy.rate_limit_per_lender_per_hour > 0
        assert policy.max_batch > 0
    good = tomllib.loads((out / manifest.platforms[0].dir / "policy.toml").read_text())
    for bad in (
        {**good, "max_batch": 0},
        {**good, "lenders": []},
        {**good, "purposes": ["a", "a"]},
        {**good, "rate_limit": 5},
        {k: v for k, v in good.items() if k != "purposes"},
    ):
        with pytest.raises(ValidationError):
            PlatformPolicy.model_validate(bad)


def test_lender_api_key_hashes_match(bundle: tuple[Path, Manifest]) -> None:
    out, manifest = bundle
    registry = json.loads((out / "bureau/lenders.json").read_text())["lenders"]
    assert sorted(registry) == manifest.lenders
    for name in manifest.lenders:
        api_key = (out / "lenders" / f"{name}.api-key").read_text().strip()
        assert registry[name]["api_key_sha256"] == hashlib.sha256(api_key.encode()).hexdigest()
        assert api_key not in (out / "bureau/lenders.json").read_text()
        key = serialization.load_pem_private_key(
            (out / "lenders" / f"{name}.key").read_bytes(), None
        )
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        assert registry[name]["signing_key"] == raw.hex()
        assert (out / "lenders" / f"{name}.pub").read_text().strip() == raw.hex()


def test_configs_parse_the_way_flwr_parses_them(bundle: tuple[Path, Manifest]) -> None:
    from flwr.common.config import parse_config_args

    out, manifest = bundle
    for entry in manifest.platforms:
        text = (out / entry.dir / "node-config.txt").read_text().strip()
        config = parse_config_args([text])
        files = {"ledger", "identity", "roster", "policy", "channel-ca"}
        assert set(config) == files | {"channel-url"}
        assert all(Path(str(config[key])).is_file() for key in files)
        # The platform dials the bureau's lender API for the channel, and only there.
        assert config["channel-url"] == f"https://{manifest.host}:{manifest.serve_port}"
    run_config = parse_config_args([str(out / "bureau/run-config.toml")])
    assert run_config["keyholder-url"] == manifest.keyholder_url
    assert Path(str(run_config["keyholder-token-file"])) == out / "bureau/coordinator.token"
    assert run_config["min-nodes"] == PLATFORMS
    app_keys = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(run_config) <= set(app_keys)  # the ServerApp knows every key
    cli = tomllib.loads((out / "bureau/flwr-home/config.toml").read_text())["superlink"]
    assert cli["default"] == "fedcredit"
    assert cli["fedcredit"]["address"] == manifest.superlink_address
    commands = (out / "COMMANDS.md").read_text()
    for needle in ("keyholder serve", "flower-superlink", "--enable-supernode-auth", "flwr run"):
        assert needle in commands, needle
    for entry in manifest.platforms:  # out is outside the cwd: COMMANDS.md shows it in full
        assert f"flwr supernode register {out / entry.dir / 'supernode-auth.pub'}" in commands
        assert f'"$(cat {out / entry.dir / "node-config.txt"})"' in commands
    assert load_manifest(out) == manifest


def test_init_refuses_to_replace_keys_and_bad_ledger_counts(
    bundle: tuple[Path, Manifest], tmp_path: Path
) -> None:
    out, _ = bundle
    with pytest.raises(DeployError, match="already holds a deployment"):
        init(PLATFORMS, out, key_bits=1024)
    with pytest.raises(DeployError, match="2 ledgers for 3 platforms"):
        init(3, tmp_path / "x", ledgers=["a", "b"], key_bits=1024)
    with pytest.raises(DeployError, match="at least 2"):
        init(1, tmp_path / "y", key_bits=1024)


def test_cli_init_with_existing_ledgers(bundle: tuple[Path, Manifest], tmp_path: Path) -> None:
    """``fedcredit deploy init --ledgers``: reuses the ledgers, generates no data."""
    out, manifest = bundle
    ledgers = [
        parse_node_config(out / p.dir / "node-config.txt")["ledger"] for p in manifest.platforms
    ]
    target = tmp_path / "cli"
    code = main(
        ["deploy", "init", "--platforms", "3", "--out", str(target), "--ledgers", ",".join(ledgers)]
    )
    assert code == 0
    assert not (target / "data").exists()
    roster = load_roster(target / "bureau/roster.json")
    assert sorted(roster.platforms) == sorted(p.name for p in manifest.platforms)
    assert main(["deploy", "init", "--platforms", "3", "--out", str(target)]) == 2


def parse_node_config(path: Path) -> dict[str, str]:
    from flwr.common.config import parse_config_args

    return {k: str(v) for k, v in parse_config_args([path.read_text().strip()]).items()}


# ------------------------------------------------------------------------------------- slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _fedcredit(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcredit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=timeout,
        check=False,
    )


def _unregistered_node_is_refused(out: Path, manifest: Manifest, tmp_path: Path) -> None:
    """A SuperNode with a valid TLS setup but an unregistered auth key must not join."""
    key = ec.generate_private_key(ec.SECP384R1())
    rogue = tmp_path / "rogue.key"
    rogue.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    rogue.chmod(0o600)
    tag = f"rogue-{os.getpid()}-{time.monotonic_ns()}"
    log_path = tmp_path / "rogue-supernode.log"
    # Output to a file, not a pipe: the SuperNode's own children would hold a pipe open.
    with log_path.open("wb") as log_file:
        node = subprocess.Popen(
            [
                "flower-supernode",
                "--root-certificates",
                str(out / "ca/ca.pem"),
                "--superlink",
                manifest.superlink_address,
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--auth-supernode-private-key",
                str(rogue),
                "--node-config",
                'ledger="none"',
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**_env(), "FLWR_HOME": str(tmp_path / "rogue-home"), TAG_VARIABLE: tag},
            start_new_session=True,
        )
    try:
        returncode = node.wait(timeout=120)
    finally:
        assert not stop_processes([node.pid], tag, timeout=10)
        node.wait(timeout=10)
    output = log_path.read_text(errors="replace")
    assert returncode != 0, output
    assert "Failed to activate SuperNode" in output, output


@pytest.mark.slow
def test_up_run_query_down(tmp_path: Path) -> None:
    """``deploy up`` with 3 platforms, ``flwr run`` (query stage), ``flwr ls``, ``deploy down``.

    SuperNode authentication is on: the SuperLink runs with ``--enable-supernode-auth`` and
    ``up`` registers every platform's key first, so the nodes being online proves the keys
    work, and a SuperNode with an unregistered key is refused.
    """
    out = tmp_path / "fed"
    init(
        PLATFORMS,
        out,
        borrowers=600,
        seed=3,
        superlink_port=free_port(),
        keyholder_port=free_port(),
        supernode_base_port=free_port(count=PLATFORMS),  # base, base + 1, ...
    )
    manifest = load_manifest(out)
    started = time.monotonic()
    up = _fedcredit("deploy", "up", str(out), cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        pids = json.loads((out / "pids.json").read_text())
        assert len(pids["processes"]) == 2 + PLATFORMS
        status = _fedcredit("deploy", "status", str(out), "--json", cwd=tmp_path)
        assert json.loads(status.stdout)["supernodes_online"] == PLATFORMS, status.stdout

        _unregistered_node_is_refused(out, manifest, tmp_path)

        run_config = tmp_path / "query.toml"
        run_config.write_text(
            (out / "bureau/run-config.toml").read_text() + 'stages = "query"\n', encoding="utf-8"
        )
        env = {**_env(), "FLWR_HOME": str(out / "bureau/flwr-home")}
        run = subprocess.run(
            ["flwr", "run", str(REPO), "fedcredit", "--stream", "--run-config", str(run_config)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=240,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        listing = subprocess.run(
            ["flwr", "ls", "fedcredit", "--format", "json"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
            check=False,
        )
        runs = json.loads(listing.stdout[listing.stdout.find("{") :])["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], runs
        federation = json.loads((out / "bureau/runs/federation.json").read_text())
        assert federation["status"] == "ok", federation
        assert federation["queries"]["contributors"] == sorted(p.name for p in manifest.platforms)

        restart_s = _restart_at_once(out, manifest.platforms[0].dir)
    finally:
        down = _fedcredit("deploy", "down", str(out), cwd=tmp_path, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (out / "pids.json").exists()
    assert not [p for p in (x["pid"] for x in pids["processes"]) if pid_alive(p)]
    assert not tagged_pids(pids["tag"]), f"{TAG_VARIABLE} processes survived"
    assert time.monotonic() - started - restart_s < 240


def _restart_at_once(out: Path, platform_dir: str) -> float:
    """Stop a SuperNode and start it again at once; returns the seconds it took.

    The SuperLink keeps the stopped node's activation until its heartbeats lapse and refuses
    a new one with the same key until then (the new SuperNode exits with Flower's code
    305): ``start_supernode`` must keep starting it until it is activated.
    """
    from fedcredit.deploy.runner import online_nodes, start_supernode, stop_supernode

    t0 = time.monotonic()
    stop_supernode(out, platform_dir)
    start_supernode(out, platform_dir)
    deadline = time.monotonic() + 60
    while online_nodes(out) < PLATFORMS and time.monotonic() < deadline:
        time.sleep(1)
    assert online_nodes(out) == PLATFORMS
    log_text = (out / "logs" / f"supernode-{platform_dir}.log").read_text(errors="replace")
    assert log_text.count("SuperNode ID:") >= 2, log_text[-3000:]  # activated again
    return time.monotonic() - t0


def test_free_port_blocks_are_free_end_to_end() -> None:
    """SuperNodes take consecutive runtime ports: every port of a block must be free, and a
    port held by another socket is never inside one."""
    import socket

    from fedcredit.deploy.ports import free_port_block

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        for _ in range(20):
            base = free_port_block(4, avoid={taken + 1})
            assert not base <= taken < base + 4
            for port in range(base, base + 4):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))


_FAKE_SUPERNODE = """
import pathlib, sys, time
count = pathlib.Path(sys.argv[1])
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if n < int(sys.argv[2]):
    print(sys.argv[3], flush=True)
    sys.exit(1)  # as Flower does: status 1 for every error, the code only in the log
print("INFO : SuperNode ID: 42", flush=True)
time.sleep(120)
"""
REFUSED = "ERROR : Exit Code: 305 (could not be activated)"


def _fake_supernode_deployment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refusals: int,
    error: str = REFUSED,
) -> tuple[Path, str, Path]:
    """A deployment folder whose ``flower-supernode`` is a stand-in that fails ``refusals``
    times with ``error`` (by default the SuperLink's refusal while a stopped SuperNode's
    activation has not lapsed); returns the folder, a platform's dir and the attempt count."""
    from fedcredit.deploy import runner

    out = tmp_path / "out"
    manifest = init(PLATFORMS, out, borrowers=300, key_bits=1024)
    (out / runner.PIDS).write_text(json.dumps({"tag": "t-retry", "processes": []}))
    script = tmp_path / "fake_supernode.py"
    script.write_text(_FAKE_SUPERNODE)
    count = tmp_path / "attempts"
    argv = [sys.executable, str(script), str(count), str(refusals), error]
    monkeypatch.setattr(runner, "supernode_argv", lambda *a, **k: argv)
    return out, manifest.platforms[0].dir, count


def test_a_supernode_refused_activation_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcredit.deploy.runner import PIDS, start_supernode

    out, platform, count = _fake_supernode_deployment(tmp_path, monkeypatch, refusals=2)
    pid = start_supernode(out, platform, retry_s=0.1, activation_timeout=60)
    try:
        assert count.read_text() == "3"  # refused twice, activated on the third start
        assert pid_alive(pid)
        recorded = json.loads((out / PIDS).read_text())["processes"]
        assert [p["pid"] for p in recorded] == [pid]
    finally:
        stop_processes([pid], None, timeout=5)


def test_a_supernode_refused_until_the_deadline_is_reported_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcredit.deploy.runner import start_supernode

    out, platform, _ = _fake_supernode_deployment(tmp_path, monkeypatch, refusals=1000)
    with pytest.raises(DeployError, match="exited with status 1") as info:
        start_supernode(out, platform, retry_s=0.2, activation_timeout=2)
    assert "could not be activated" in str(info.value)


def test_a_supernode_failing_for_another_reason_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcredit.deploy.runner import start_supernode

    out, platform, count = _fake_supernode_deployment(
        tmp_path, monkeypatch, refusals=1000, error="ERROR : Exit Code: 300 (bad certificate)"
    )
    with pytest.raises(DeployError, match="bad certificate"):
        start_supernode(out, platform, retry_s=0.1, activation_timeout=30)
    assert count.read_text() == "1"
