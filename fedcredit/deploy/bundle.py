"""``fedcredit deploy init``: every file a bureau and its platforms need, in one folder.

Why one generator: a federation fails first on its plumbing (a certificate without the right
address, a roster that pins a stale key, a node config with a typo), and FATE's users complain
most about deployment pain. ``init`` writes the whole set consistently and ``COMMANDS.md`` says
exactly which party runs what. Layout of ``DIR``::

    ca/                 ca.pem (give to everyone), ca.key (0600: keep offline)
    bureau/             superlink.pem/.key, roster.json, lenders.json, run-config.toml,
                        flwr-home/config.toml (the `flwr` CLI's connection),
                        keyholder/ keystore.json, keystore.key (0600), keyholder.pem/.key,
                        coordinator.token (0600)
    platform-XX/        identity.json (0600), roster.json, ca.pem, supernode.pem/.key (its
                        Runtime API), supernode-auth.key (0600)/.pub, node-config.txt,
                        policy.toml
    lenders/            lender-XX.key (0600, Ed25519), lender-XX.pub, lender-XX.api-key (0600)
    data/               a synthetic population (only without --ledgers)
    deploy.json         what `deploy up` reads (ports, names; paths relative to DIR)
    COMMANDS.md         the exact commands

Paths inside the generated config files (node config, run config, FLWR_HOME) are absolute,
because Flower hands them to processes whose working directory we do not control; they are
generated on the machine that runs them, never committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import BaseModel, ConfigDict

from fedcredit.deploy.policy import DEFAULT_PURPOSES, PlatformPolicy, write_policy
from fedcredit.deploy.tls import make_ca, write_cert, write_private_pem, write_secret
from fedcredit.deploy.tls import write_server_files as _server_files

log = logging.getLogger(__name__)

CONNECTION = "fedcredit"
"""Name of the SuperLink connection in the bureau's ``$FLWR_HOME/config.toml``."""

MANIFEST = "deploy.json"
LENDERS_FORMAT = "fedcredit-lenders/v1"
LOOPBACK = ("127.0.0.1", "localhost")

ConfigValue = str | int | float | bool


class DeployError(RuntimeError):
    """A deployment folder cannot be written or started; the message says why."""


class PlatformEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the platform name its ledger records (and its roster entry)
    dir: str  # relative to the deployment folder
    runtime_port: int  # the SuperNode's Runtime API (ClientApp processes connect here)
    node_config: str


class Manifest(BaseModel):
    """``deploy.json``: what ``deploy up`` needs to start the federation of a folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = "fedcredit-deploy/v1"
    host: str
    superlink_port: int
    keyholder_port: int
    serve_port: int = 8480  # the lender API, where the platforms' channel-url points
    min_participants: int
    node_auth: bool
    platforms: list[PlatformEntry]
    lenders: list[str]
    app_dir: str

    @property
    def superlink_address(self) -> str:
        return f"{self.host}:{self.superlink_port}"

    @property
    def keyholder_url(self) -> str:
        return f"https://{self.host}:{self.keyholder_port}"


def load_manifest(out: Path) -> Manifest:
    path = out / MANIFEST
    if not path.is_file():
        raise DeployError(f"{path}: not a deployment folder (run `fedcredit deploy init`)")
    return Manifest.model_validate_json(path.read_text(encoding="utf-8"))


def toml_value(value: ConfigValue) -> str:
    """A value in the TOML syntax that ``--run-config`` / ``--node-config`` parse.

    flwr splits those strings with a regex before handing them to a TOML parser, so a double
    quote, a backslash or whitespace inside a string cannot be passed at all: refuse it loudly.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if '"' in value or "\\" in value or any(ch.isspace() for ch in value):
        raise DeployError(f"flwr cannot pass this string through a config flag: {value!r}")
    return f'"{value}"'


def config_string(config: dict[str, ConfigValue]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``a=1 b="x"`` (the format of --run-config and --node-config)."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def app_dir() -> Path:
    """The fedcredit Flower app (the folder whose pyproject.toml names server/ and clients/)."""
    import server

    return Path(server.__file__).resolve().parent.parent


def _ledger_location(text: str) -> str:
    """A ledger path made absolute (SuperNodes run elsewhere); SQLAlchemy URLs unchanged."""
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if not path.exists():
        raise DeployError(f"--ledgers: no such ledger: {text}")
    return str(path.resolve())


def _synthetic_ledgers(out: Path, platforms: int, borrowers: int, seed: int) -> list[str]:
    from fedcredit.datagen.config import PopulationConfig
    from fedcredit.datagen.generate import generate

    summary = generate(
        PopulationConfig(platforms=platforms, borrowers=borrowers, seed=seed), out / "data"
    )
    return [str(Path(p.ledger).resolve()) for p in summary.platforms]


def _auth_key_pair(directory: Path) -> None:
    """SuperNode authentication keys: EC P-384, OpenSSH format (what flwr 1.41 loads).

    ``flower-supernode --auth-supernode-private-key`` reads the private key with
    ``load_ssh_private_key``; ``flwr supernode register`` reads the public key with
    ``load_ssh_public_key`` and accepts NIST EC curves only.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write_secret(directory / "supernode-auth.key", private)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (directory / "supernode-auth.pub").write_bytes(public + b" " + directory.name.encode() + b"\n")


def _lender_credentials(out: Path, count: int) -> list[str]:
    """Per lender an Ed25519 signing key and an API key; the bureau keeps only hashes."""
    lenders_dir = out / "lenders"
    lenders_dir.mkdir(parents=True, exist_ok=True)
    registry: dict[str, dict[str, str]] = {}
    names = [f"lender-{i:02d}" for i in range(1, count + 1)]
    for name in names:
        key = ed25519.Ed25519PrivateKey.generate()
        write_secret(
            lenders_dir / f"{name}.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        (lenders_dir / f"{name}.pub").write_text(public.hex() + "\n", encoding="utf-8")
        api_key = secrets.token_urlsafe(32)
        write_secret(lenders_dir / f"{name}.api-key", (api_key + "\n").encode())
        registry[name] = {
            "api_key_sha256": hashlib.sha256(api_key.encode()).hexdigest(),
            "signing_key": public.hex(),
        }
    doc = {"format": LENDERS_FORMAT, "lenders": registry}
    (out / "bureau" / "lenders.json").write_text(
        json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return names


def _keyholder(bureau: Path, key_bits: int) -> str:
    """Keystore (sealed by a 0600 key file) and the coordinator's bearer token (hash stored)."""
    from server.keystore import Keystore, KeystoreSecret, token_sha256

    kh = bureau / "keyholder"
    kh.mkdir(parents=True, exist_ok=True)
    key_file = kh / "keystore.key"
    KeystoreSecret.write_new_key_file(key_file)
    token = secrets.token_urlsafe(32)
    store = Keystore.create(
        kh / "keystore.json",
        KeystoreSecret.from_key_file(key_file),
        bits=key_bits,
        allow_insecure_test_size=key_bits < 2048,
        token_sha256=token_sha256(token),
    )
    write_secret(bureau / "coordinator.token", (token + "\n").encode())
    return store.verify_key_bytes.hex()


def init(
    platforms: int,
    out: Path,
    *,
    host: str = "127.0.0.1",
    ledgers: Sequence[str] | None = None,
    borrowers: int = 5_000,
    seed: int = 0,
    lenders: int = 2,
    key_bits: int = 2048,
    superlink_port: int = 9092,
    keyholder_port: int = 8470,
    supernode_base_port: int = 9094,
    serve_port: int = 8480,
    node_auth: bool = True,
    cert_days: float = 365,
    purposes: Sequence[str] = DEFAULT_PURPOSES,
    rate_limit_per_lender_per_hour: int = 1000,
    max_batch: int = 3000,
) -> Manifest:
    """Write a deployment folder for a bureau and ``platforms`` platforms; return its manifest.

    Refuses a folder that already holds a deployment: regenerating would silently replace
    keys that other parties may already have pinned.
    """
    from fedcredit.enrolment import ledger_platform
    from protocols.identity import PlatformIdentity, Roster, save_roster

    if platforms < 2:
        raise DeployError("--platforms: a federation needs at least 2 platforms")
    if lenders < 1:
        raise DeployError("--lenders: at least one lender")
    if ledgers is not None and len(ledgers) != platforms:
        raise DeployError(f"--ledgers names {len(ledgers)} ledgers for {platforms} platforms")
    out = out.resolve()
    if (out / MANIFEST).exists() or (out / "ca").exists():
        raise DeployError(f"{out} already holds a deployment; refusing to replace its keys")
    out.mkdir(parents=True, exist_ok=True)

    locations = (
        [_ledger_location(x) for x in ledgers]
        if ledgers is not None
        else _synthetic_ledgers(out, platforms, borrowers, seed)
    )
    names = [ledger_platform(loc) for loc in locations]
    if len(set(names)) != len(names):
        raise DeployError(f"two ledgers belong to the same platform: {names}")

    hosts = list(dict.fromkeys([host, *LOOPBACK]))
    ca = make_ca("fedcredit federation CA", days=cert_days)
    write_cert(ca.cert, out / "ca" / "ca.pem")
    write_private_pem(ca.key, out / "ca" / "ca.key")
    ca_pem = out / "ca" / "ca.pem"

    bureau = out / "bureau"
    bureau.mkdir(exist_ok=True)
    _server_files(ca, bureau / "superlink.pem", bureau / "superlink.key", hosts, days=cert_days)
    keyholder_key = _keyholder(bureau, key_bits)
    _server_files(
        ca,
        bureau / "keyholder" / "keyholder.pem",
        bureau / "keyholder" / "keyholder.key",
        hosts,
        days=cert_days,
    )
    lender_names = _lender_credentials(out, lenders)

    roster = Roster()
    identities: list[PlatformIdentity] = []
    for name in names:
        identity = PlatformIdentity.generate(name)
        identities.append(identity)
        roster = roster.with_platform(name, identity.public_entry())
    roster = roster.with_keyholder(keyholder_key)
    save_roster(bureau / "roster.json", roster)

    entries: list[PlatformEntry] = []
    for index, (name, location, identity) in enumerate(
        zip(names, locations, identities, strict=True), start=1
    ):
        pdir = out / f"platform-{index:02d}"
        pdir.mkdir(exist_ok=True)
        identity.save(pdir / "identity.json")
        save_roster(pdir / "roster.json", roster)
        shutil.copyfile(ca_pem, pdir / "ca.pem")
        # The SuperNode's Runtime API (ClientApp <-> SuperNode) stays on the platform's own
        # machine, so its certificate names loopback only.
        _server_files(ca, pdir / "supernode.pem", pdir / "supernode.key", LOOPBACK, days=cert_days)
        _auth_key_pair(pdir)
        node_config = config_string(
            {
                "ledger": location,
                "identity": str(pdir / "identity.json"),
                "roster": str(pdir / "roster.json"),
                "policy": str(pdir / "policy.toml"),  # enforced on lender questions
                # Where this platform dials the bureau's channel for lender hops, and the CA
                # it accepts the bureau's certificate from (protocols/channel.py).
                "channel-url": f"https://{host}:{serve_port}",
                "channel-ca": str(pdir / "ca.pem"),
            }
        )
        (pdir / "node-config.txt").write_text(node_config + "\n", encoding="utf-8")
        write_policy(
            pdir / "policy.toml",
            PlatformPolicy(
                lenders=lender_names,
                lender_keys={
                    n: (out / "lenders" / f"{n}.pub").read_text(encoding="utf-8").strip()
                    for n in lender_names
                },
                purposes=list(purposes),
                rate_limit_per_lender_per_hour=rate_limit_per_lender_per_hour,
                max_batch=max_batch,
            ),
        )
        entries.append(
            PlatformEntry(
                name=name,
                dir=pdir.name,
                runtime_port=supernode_base_port + index - 1,
                node_config=node_config,
            )
        )

    manifest = Manifest(
        host=host,
        superlink_port=superlink_port,
        keyholder_port=keyholder_port,
        serve_port=serve_port,
        min_participants=min(3, platforms),
        node_auth=node_auth,
        platforms=entries,
        lenders=lender_names,
        app_dir=str(app_dir()),
    )
    _bureau_configs(out, manifest)
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (out / "COMMANDS.md").write_text(commands_markdown(out, manifest), encoding="utf-8")
    log.info("deployment folder %s: %d platforms, %d lenders", out, platforms, lenders)
    return manifest


def _bureau_configs(out: Path, manifest: Manifest) -> None:
    """The run config for ``flwr run --run-config`` and the ``flwr`` CLI's connection."""
    bureau = out / "bureau"
    run_config: dict[str, ConfigValue] = {
        "out-dir": str(bureau / "runs"),
        "keyholder-url": manifest.keyholder_url,
        "keyholder-token-file": str(bureau / "coordinator.token"),
        "keyholder-ca": str(out / "ca" / "ca.pem"),
        "min-nodes": len(manifest.platforms),
        "min-participants": manifest.min_participants,
    }
    lines = ["# fedcredit run config for `flwr run . fedcredit --run-config <this file>`"]
    lines += [f"{key} = {toml_value(value)}" for key, value in run_config.items()]
    (bureau / "run-config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    home = bureau / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{manifest.superlink_address}"\n'
        f'root-certificates = "{out / "ca" / "ca.pem"}"\n',
        encoding="utf-8",
    )


# ------------------------------------------------------------------------------ commands


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def party_commands(out: Path, manifest: Manifest, *, rel: Path | None = None) -> dict[str, str]:
    """The shell command of every party, keyed by party (``rel``: how to write DIR)."""
    d = rel if rel is not None else out
    bureau = d / "bureau"
    commands: dict[str, str] = {
        "keyholder": shlex.join(keyholder_argv(d, manifest, program=["fedcredit"])),
        "superlink": f"FLWR_HOME={_q(bureau / 'superlink-home')} "
        + shlex.join(superlink_argv(d, manifest, binary="flower-superlink")),
    }
    for entry in manifest.platforms:
        pdir = d / entry.dir
        if manifest.node_auth:
            commands[f"register-{entry.dir}"] = (
                f"FLWR_HOME={_q(bureau / 'flwr-home')} flwr supernode register "
                f"{_q(pdir / 'supernode-auth.pub')} {CONNECTION} --name {entry.dir}"
            )
        argv = supernode_argv(d, manifest, entry, binary="flower-supernode")
        commands[f"supernode-{entry.dir}"] = (
            f"FLWR_HOME={_q(pdir / 'flwr-home')} "
            + shlex.join(argv[:-1])
            + f' "$(cat {_q(pdir / "node-config.txt")})"'
        )
    app = Path(manifest.app_dir)
    app_arg = "." if Path.cwd().resolve() == app else str(app)
    commands["run"] = (
        f"FLWR_HOME={_q(bureau / 'flwr-home')} flwr run {_q(app_arg)} {CONNECTION} --stream "
        f"--run-config {_q(bureau / 'run-config.toml')}"
    )
    commands["status"] = f"FLWR_HOME={_q(bureau / 'flwr-home')} flwr ls {CONNECTION} --format json"
    return commands


def keyholder_argv(out: Path, manifest: Manifest, *, program: list[str]) -> list[str]:
    """``fedcredit keyholder serve`` for this deployment (``program``: how to call fedcredit).

    One definition for COMMANDS.md and for ``deploy up``, so the two never drift apart.
    """
    bureau, kh = out / "bureau", out / "bureau" / "keyholder"
    return [
        *program,
        "keyholder",
        "serve",
        "--keystore",
        str(kh / "keystore.json"),
        "--key-file",
        str(kh / "keystore.key"),
        "--listen",
        f"{manifest.host}:{manifest.keyholder_port}",
        "--roster",
        str(bureau / "roster.json"),
        "--tls-cert",
        str(kh / "keyholder.pem"),
        "--tls-key",
        str(kh / "keyholder.key"),
        "--min-participants",
        str(manifest.min_participants),
    ]


def superlink_argv(out: Path, manifest: Manifest, *, binary: str) -> list[str]:
    bureau = out / "bureau"
    argv = [
        binary,
        "--ssl-ca-certfile",
        str(out / "ca" / "ca.pem"),
        "--ssl-certfile",
        str(bureau / "superlink.pem"),
        "--ssl-keyfile",
        str(bureau / "superlink.key"),
        "--host",
        manifest.host,
        "--port",
        str(manifest.superlink_port),
        "--database",
        str(bureau / "superlink-state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if manifest.node_auth:
        argv.append("--enable-supernode-auth")
    return argv


def supernode_argv(
    out: Path, manifest: Manifest, entry: PlatformEntry, *, binary: str
) -> list[str]:
    pdir = out / entry.dir
    argv = [
        binary,
        "--root-certificates",
        str(pdir / "ca.pem"),
        "--superlink",
        manifest.superlink_address,
        "--host",
        "127.0.0.1",
        "--port",
        str(entry.runtime_port),
        "--ssl-ca-certfile",
        str(pdir / "ca.pem"),
        "--ssl-certfile",
        str(pdir / "supernode.pem"),
        "--ssl-keyfile",
        str(pdir / "supernode.key"),
    ]
    if manifest.node_auth:
        argv += ["--auth-supernode-private-key", str(pdir / "supernode-auth.key")]
    return [*argv, "--node-config", entry.node_config]


def _display_dir(out: Path) -> Path:
    """DIR as the user should type it: relative to the current folder when inside it."""
    try:
        return out.relative_to(Path.cwd().resolve())
    except ValueError:
        return out


def commands_markdown(out: Path, manifest: Manifest) -> str:
    d = _display_dir(out)
    c = party_commands(out, manifest, rel=d)
    platform_cmds = "\n".join(
        c["register-" + e.dir] for e in manifest.platforms if manifest.node_auth
    )
    node_cmds = "\n".join(f"{c['supernode-' + e.dir]} &" for e in manifest.platforms)
    auth_note = (
        "SuperNode authentication is on (`--enable-supernode-auth`): the bureau registers each "
        "platform's `supernode-auth.pub` with `flwr supernode register` BEFORE that SuperNode "
        "starts; an unregistered SuperNode is refused."
        if manifest.node_auth
        else "SuperNode authentication is off (init --no-node-auth): TLS only."
    )
    return f"""# fedcredit deployment: the exact commands

Generated by `fedcredit deploy init`. Run every command from the folder in which `init` ran
(paths below are relative to it; the generated config files hold absolute paths), in the
virtualenv that has fedcredit and flwr 1.41.

## One machine (a try-out)
```
fedcredit deploy up {d}    # key holder, SuperLink, SuperNodes; pids in pids.json
{c["run"]}
{c["status"]}   # `flwr run --stream` exits 0 even if the run failed
fedcredit deploy down {d}      # SIGTERM, then SIGKILL, by pid
```

## Each party by hand (one machine or many)
{auth_note}

Bureau, key-holder machine (keep `bureau/keyholder/` there only):
```
{c["keyholder"]}
```

Bureau, SuperLink:
```
{c["superlink"]}
{platform_cmds}
```

Each platform (copy only its own `platform-XX/` folder to its machine; edit the `ledger`
path in its `node-config.txt` if the ledger lives elsewhere):
```
{node_cmds}
```

Bureau, the run:
```
{c["run"]}
{c["status"]}
```

Bureau, the lender service (a standing run hosting the HTTPS lender API on port
{manifest.serve_port}; each platform's `node-config.txt` has `channel-url` pointing there, and its
ClientApp dials it for lender hops, so the platforms must reach that port too):
```
fedcredit serve {d}
fedcredit query NATIONAL_ID --dir {d} --lender lender-01 --purpose underwriting
fedcredit serve {d} --stop
```

## What goes where
| folder | party | secret files (mode 0600) |
|---|---|---|
| `ca/` | whoever issues certificates; `ca.pem` to everyone | `ca.key` (keep offline) |
| `bureau/` | the bureau (coordinator, SuperLink) | `coordinator.token`, `superlink.key` |
| `bureau/keyholder/` | the key holder, a separate service | `keystore.key`, `keyholder.key` |
| `platform-XX/` | platform XX | `identity.json`, `supernode-auth.key`, `supernode.key` |
| `lenders/` | each lender gets its own files | `lender-XX.key`, `lender-XX.api-key` |

For many machines, run init with `--host` set to the bureau's address (it goes into the
SuperLink's and key holder's certificates, the run config and the CLI connection), and make the
SuperLink and key holder listen on an interface the platforms reach. `bureau/lenders.json`
keeps only the SHA-256 of each lender's API key. `policy.toml` (lenders served with their
pinned keys, purposes, rate limit, batch size) is enforced by each platform on every lender
question.
"""
