"""Run fedkd on Flower's Deployment Engine: a SuperLink, one SuperNode per edge partition.

    fedkd deploy local --nodes 3 --synthetic-users 50    # a whole fleet on 127.0.0.1, one run, then stop
    fedkd deploy local --nodes 3 --tls certs --auth      # the same over TLS with registered SuperNodes
    fedkd deploy certs --out certs --nodes 3 --host 192.168.1.10
    fedkd deploy device-commands --superlink 192.168.1.10:8000 --nodes 3 --certs certs

``local`` starts ``flower-superlink`` and N ``flower-supernode`` processes (each with
``--node-config "partition-id=i num-partitions=N"`` and its own ClientApp runtime port),
points a ``flwr`` SuperLink connection at them (``[superlink.fedkd-local]`` in a private
``FLWR_HOME/config.toml``; flwr 1.41 has no federations in ``pyproject.toml`` any more),
runs ``flwr run . fedkd-local --stream`` with the experiment's settings, waits for the run to
finish and stops every process it started, also on errors, Ctrl-C and SIGTERM. The fleet
size the settings make must equal N: unless ``users-per-client`` is given, it is chosen so
that the edge users split into exactly N clients. See docs/devices.md.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import ipaddress
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedkd import processes
from fedkd.config import ExperimentConfig, Scalar
from simulations import clientapp_worker, supernode
from simulations.options import (HelpFormatter, RawHelpFormatter, add_config_options, blame, config_values,
                                 read_overrides)
from simulations.runner import overrides_toml

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedkd-local"
MARKER_ENV = "FEDKD_DEPLOY_ID"  # set in every process a LocalFleet starts, to find strays
DEVICE_PORT = 8000  # flwr 1.41's default SuperLink port (Fleet, Control and Runtime over HTTP(S))
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# How a local fleet runs its ClientApps (docs/devices.md, "A fast ClientApp path"): "worker" = one
# long-lived process per SuperNode (--isolation process + simulations.clientapp_worker); "flower" =
# Flower's default, a flwr-clientapp process per message.
CLIENTAPP_MODES = ("worker", "flower")
SUPERNODE_POLL = 0.1  # a SuperNode's next poll after a message, doubling to 1 s (simulations.supernode; Flower: 3 s)


class DeployError(RuntimeError):
    """The deployment could not start or the run did not finish."""


def flower_exe(name: str) -> str:
    """A Flower console script of this Python environment (the one fedkd runs in)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


# --------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class CertPaths:
    """Files written by ``fedkd deploy certs``."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, i: int) -> Path:
        """SuperNode i's private key (OpenSSH, ECDSA P-384), for --auth-supernode-private-key."""
        return self.root / "supernodes" / f"node-{i}"

    def node_pub(self, i: int) -> Path:
        """SuperNode i's public key (OpenSSH), for ``flwr supernode register``."""
        return self.root / "supernodes" / f"node-{i}.pub"

    def check(self, *, nodes: int = 0) -> CertPaths:
        need = [self.ca_cert, self.server_cert, self.server_key]
        need += [p for i in range(nodes) for p in (self.node_key(i), self.node_pub(i))]
        missing = [str(p) for p in need if not p.is_file()]
        if missing:
            raise ValueError(f"missing TLS/auth files in {self.root}: {', '.join(missing)}; "
                             f"create them with: fedkd deploy certs --out {self.root} --nodes {max(nodes, 1)}")
        return self


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(hosts: Sequence[str]):
    from cryptography import x509
    names: list = []
    for h in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_node_key(private_path: Path) -> Path:
    """An ECDSA P-384 key pair in the OpenSSH formats Flower reads; returns the public key path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    pub = private_path.with_name(private_path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return pub


def make_certs(out: Path, *, nodes: int, hosts: Sequence[str] = (), days: int = 365) -> CertPaths:
    """A CA, a SuperLink certificate for 127.0.0.1/localhost/::1 + ``hosts``, and N SuperNode keys.

    SuperNode keys are not certificates: Flower authenticates a SuperNode by an ECDSA key
    pair whose public half an operator registers with ``flwr supernode register``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if nodes < 0:
        raise ValueError(f"--nodes must be >= 0, got {nodes}")
    paths = CertPaths(Path(out))
    paths.root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)  # clock skew
    until = now + datetime.timedelta(days=days)
    pem = serialization.Encoding.PEM

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkd deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA384()))

    all_hosts = [*LOCAL_HOSTS, *hosts]
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now).not_valid_after(until)
           .add_extension(_san(all_hosts), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                        crl_sign=False, content_commitment=False, data_encipherment=False,
                                        key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
           .sign(ca_key, hashes.SHA384()))

    pkcs8 = serialization.PrivateFormat.PKCS8
    paths.ca_cert.write_bytes(ca.public_bytes(pem))
    _write_private(paths.ca_key, ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    paths.server_cert.write_bytes(srv.public_bytes(pem))
    _write_private(paths.server_key, srv_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    for i in range(nodes):
        make_node_key(paths.node_key(i))
    return paths


# --------------------------------------------------------------------------- commands
def superlink_command(*, port: int, host: str = "127.0.0.1", certs: CertPaths | None = None,
                      auth: bool = False, database: str | None = None, exe: str = "flower-superlink") -> list[str]:
    """``flower-superlink`` serving Fleet, Control and Runtime APIs on host:port (flwr 1.41).

    ``database``: a SQLite file for registrations and runs (default: in memory, lost on exit).
    """
    if auth and certs is None:
        raise ValueError("SuperNode authentication needs TLS: give --tls DIR (from `fedkd deploy certs`)")
    cmd = [exe, "--host", host, "--port", str(port)]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
                "--ssl-keyfile", str(certs.server_key)]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    return cmd + ["--disable-runtime-dependency-installation"]


def node_config(partition_id: int | None, num_partitions: int | None = None, data_path: str | None = None, *,
                shard: str | None = None, usage_log: str | None = None) -> str:
    """The ``--node-config`` string a fedkd SuperNode needs (TOML values, space separated).

    ``shard``: the device's own shard folder (``fedkd shard``; its partition id is in its manifest,
    so ``partition_id`` may be None); ``usage-log``: where the device writes its time and memory
    per message (fedkd.usage)."""
    parts = [] if partition_id is None else [f"partition-id={partition_id}"]
    parts += [] if num_partitions is None else [f"num-partitions={num_partitions}"]
    for key, value in (("data-path", data_path), ("shard", shard), ("usage-log", usage_log)):
        if value:
            parts.append(f"{key}={json.dumps(str(value))}")  # a TOML basic string
    return " ".join(parts)


def supernode_command(*, superlink: str, partition_id: int | None, num_partitions: int | None,
                      port: int | None = None, root_certificates: Path | str | None = None,
                      private_key: Path | str | None = None, data_path: str | None = None, shard: str | None = None,
                      usage_log: str | None = None, exe: str = "flower-supernode", isolation: str | None = None,
                      launcher: Sequence[str] = ()) -> list[str]:
    """``flower-supernode`` for one partition; ``port`` is its ClientApp runtime API (default 9094).

    ``isolation``: Flower's ``--isolation`` (``process``: the SuperNode starts no ClientApp, a
    worker claims its tasks); ``launcher``: a command that runs flower-supernode with the
    arguments that follow (``simulations.supernode.command``), instead of ``exe``.
    """
    cmd = [*launcher] if launcher else [exe]
    cmd += ["--superlink", superlink]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if private_key:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if port is not None:
        cmd += ["--port", str(port)]
    if isolation:
        cmd += ["--isolation", isolation]
    return cmd + ["--node-config", node_config(partition_id, num_partitions, data_path, shard=shard,
                                               usage_log=usage_log)]


@dataclass(frozen=True)
class WeakDevice:
    """How ``fedkd deploy local --weak-node`` confines one SuperNode: the CPUs it may run on
    (``taskset -c``) and a cap on each process's data memory (``prlimit --data``: heap and private
    writable mappings, thread stacks included, shared libraries not; an allocation past it fails
    with MemoryError), both inherited by the SuperExec and every ClientApp process it starts, and
    given to its ClientApp worker alike.

    A data cap rather than an address-space one (``--as``): glibc reserves 64 MB of address
    space per thread arena, up to 8 per core of the machine, so an address-space cap would
    measure the host's core count more than the device's memory."""

    cpus: str = "0"
    memory_mb: int = 1000

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d+([-,]\d+)*", self.cpus):
            raise ValueError(f"--weak-cpus must be a CPU list as taskset -c takes it (e.g. 0 or 0,2), got {self.cpus!r}")
        if self.memory_mb < 16:
            raise ValueError(f"--weak-memory-mb must be at least 16, got {self.memory_mb}")

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        missing = [t for t in ("taskset", "prlimit") if shutil.which(t) is None]
        if missing:
            raise ValueError(f"--weak-node needs {' and '.join(missing)} (util-linux) on this machine")
        return ["taskset", "-c", self.cpus, "prlimit", f"--data={self.memory_mb * 1_000_000}", *cmd]

    def describe(self) -> str:
        return f"CPU {self.cpus}, data memory <= {self.memory_mb} MB per process"


def connection_toml(address: str, *, name: str = CONNECTION, root_certificates: Path | str | None = None,
                    default: bool = True) -> str:
    """A SuperLink connection for ``$FLWR_HOME/config.toml`` (flwr 1.41 reads connections there, not
    from ``[tool.flwr.federations]``); with ``default``, a whole file whose default it is."""
    lines = ["[superlink]", f"default = {json.dumps(name)}", ""] if default else []
    lines += [f"[superlink.{name}]", f"address = {json.dumps(address)}"]
    if root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    else:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def flwr_run_command(run_config: Path, *, app_dir: Path = APP_DIR, connection: str = CONNECTION,
                     exe: str = "flwr") -> list[str]:
    return [exe, "run", str(app_dir), connection, "--run-config", str(run_config), "--stream"]


def stage_app(src: Path, dest: Path) -> Path:
    """Copy into ``dest`` the files of the app at ``src`` that Flower would put into its FAB.

    ``flwr run DIR`` (flwr 1.41, ``flwr.cli.utils.collect_files``) lists every file under DIR,
    resolving each path, before it drops what ``.gitignore`` and its include rules exclude:
    with a virtual environment inside the checkout that is ~46,000 files, about 20 s on a
    loaded 2-core machine, for an app of 1.5 MB. This walk skips the folders ``.gitignore``
    excludes (and ``.git``) and keeps exactly the files Flower's own filter keeps
    (``filter_paths_for_publish``), so ``flwr run dest`` builds the same FAB.
    """
    from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
    ignored = build_pathspec(load_gitignore_patterns(src / ".gitignore"))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dirnames[:] = [d for d in dirnames if d != ".git" and not (Path(dirpath) / d).is_symlink()
                       and not ignored.match_file(f"{(rel / d).as_posix()}/")]
        files.update({(rel / f).as_posix(): Path(dirpath) / f for f in filenames
                      if not (Path(dirpath) / f).is_symlink()})
    shutil.rmtree(dest, ignore_errors=True)
    for rel, path in filter_paths_for_publish(files).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel)
    return dest


# --------------------------------------------------------------------------- run settings
def load_settings(files: Sequence[Path], run_config: Sequence[str], extra: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """Overrides from TOML files, then ``--run-config "k=v ..."`` strings, then options; validated
    (a bad key or value set in a file is named with the file and line)."""
    out, where = read_overrides(files)
    for text in run_config:
        pairs = _parse_pairs(text)
        out.update(pairs)
        where = {k: v for k, v in where.items() if k not in pairs}
    out.update(extra)
    with blame({k: v for k, v in where.items() if k not in extra}):
        ExperimentConfig.from_flat(out)  # names a bad key or value before anything starts
    return out


def _parse_pairs(text: str) -> dict[str, Scalar]:
    """Flower's ``k1=v1 k2="v2"`` syntax (TOML values)."""
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", text)
    if not pairs and text.strip():
        raise ValueError(f"--run-config {text!r}: expected space separated key=value pairs")
    try:
        return tomllib.loads("\n".join(f"{json.dumps(k)} = {v}" for k, v in pairs))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--run-config {text!r}: {exc} (strings need quotes: key=\"text\")") from None


def fit_fleet(overrides: Mapping[str, Scalar], nodes: int) -> dict[str, Scalar]:
    """Make the settings split the edge users into exactly ``nodes`` clients.

    The fleet size is ceil(edge users / users-per-client). If ``users-per-client`` was not
    set, it becomes ceil(edge users / nodes) when that gives exactly ``nodes`` clients.
    """
    from fedkd.population import population
    if nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {nodes}")
    out = dict(overrides)
    pop = population(ExperimentConfig.from_flat(out))
    if pop.num_clients == nodes:
        return out
    edge = sum(len(c) for c in pop.clients)
    upc = ExperimentConfig.from_flat(out).users_per_client
    if "users-per-client" not in out and edge >= nodes:
        k = math.ceil(edge / nodes)
        if math.ceil(edge / k) == nodes:
            out["users-per-client"] = k
            return out
    raise ValueError(
        f"the settings make {pop.num_clients} edge clients ({edge} edge users, users-per-client {upc}) but "
        f"--nodes is {nodes}: every partition needs exactly one SuperNode. Set users-per-client so that "
        f"ceil({edge} / users-per-client) = {nodes}, or change synthetic-users / cloud-fraction / --nodes.")


# --------------------------------------------------------------------------- processes
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct TCP ports free right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# /proc helpers live in fedkd.processes (fedkd stop uses them too); the names stay importable here
_proc_stat, alive, descendants = processes.proc_stat, processes.alive, processes.descendants


def processes_with_marker(marker: str) -> set[int]:
    """Live processes whose environment holds ``FEDKD_DEPLOY_ID=marker`` (started by one fleet)."""
    return processes.with_env(MARKER_ENV, marker)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def check_clientapp(clientapp: str, supernode_poll: float) -> None:
    if clientapp not in CLIENTAPP_MODES:
        raise ValueError(f"--clientapp must be one of {', '.join(CLIENTAPP_MODES)}, got {clientapp!r}")
    if not (math.isfinite(supernode_poll) and supernode_poll >= 0):
        raise ValueError(f"--supernode-poll must be a number >= 0, got {supernode_poll}")


class LocalFleet:
    """A SuperLink and SuperNodes on this machine, and the ``flwr`` CLI pointed at them.

    Every process is started in its own session with ``FEDKD_DEPLOY_ID`` in its environment;
    :meth:`stop` signals them, everything they spawned (Flower's SuperExec, ServerApp and
    ClientApp processes) and any stray carrying the marker, then waits until all are gone.

    ``clientapp``: ``worker`` starts each SuperNode with ``--isolation process`` and, next to
    it, one long-lived ClientApp worker (``simulations.clientapp_worker``, named
    ``<supernode>-clientapp``); ``flower`` leaves Flower's process per message.
    ``supernode_poll``: when a SuperNode polls the SuperLink again after a message, doubling to
    1 s while nothing comes (``simulations.supernode``); 0 runs Flower's own ``flower-supernode``,
    which sleeps 3 s whenever nothing came.
    """

    def __init__(self, state_dir: Path, *, certs: CertPaths | None = None, auth: bool = False,
                 out: Callable[[str], None] = print, clientapp: str = "worker",
                 supernode_poll: float = SUPERNODE_POLL) -> None:
        if auth and certs is None:
            raise ValueError("--auth needs --tls DIR (SuperNode authentication requires TLS)")
        check_clientapp(clientapp, supernode_poll)
        self.clientapp, self.supernode_poll = clientapp, supernode_poll
        self.workers: dict[str, str] = {}  # SuperNode name -> its ClientApp worker's name
        self.dir = Path(state_dir)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.certs, self.auth, self.out = certs, auth, out
        self.marker = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, int] = {}  # pid -> start time, of every process ever found in the fleet
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self._stopped = False
        self._lock = threading.Lock()
        self.cli_home = self.home("cli")
        (self.cli_home / "config.toml").write_text(connection_toml(
            self.address, root_certificates=certs.ca_cert.resolve() if certs else None))

    # ---- plumbing
    def home(self, name: str) -> Path:
        path = self.dir / "flwr-home" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"FLWR_HOME": str(home), MARKER_ENV: self.marker, "PYTHONUNBUFFERED": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])})
        env.setdefault("OMP_NUM_THREADS", "1")  # N SuperNodes and a ServerApp share the cores
        return env

    def start(self, name: str, cmd: list[str], *, home: Path, cwd: Path | None = None,
              pipe: bool = False) -> subprocess.Popen:
        with self._lock:
            if self._stopped:
                raise DeployError("the fleet is stopping")
            if name in self.procs and self.procs[name].poll() is None:
                raise DeployError(f"{name} is already running")
            log = None if pipe else self.log_path(name).open("ab")
            proc = subprocess.Popen(cmd, cwd=cwd or self.dir, env=self.env(home), start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if pipe else log,
                                    stderr=subprocess.STDOUT, text=pipe or None)
            if log:
                log.close()
            self.procs[name] = proc
            self._remember(proc.pid)
            self._write_pids()
            return proc

    def _remember(self, pid: int) -> None:
        st = _proc_stat(pid)
        if st is not None:
            self.seen.setdefault(pid, st[2])

    def _write_pids(self) -> None:
        """``pids.json`` (name -> PID) and ``processes.json`` (with start times, for ``fedkd stop
        STATE_DIR`` if this controller is killed before it can stop the fleet itself)."""
        (self.dir / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.procs.items()}, indent=1))
        entries = [e for n, p in self.procs.items() if (e := processes.entry(p.pid, n)) is not None]
        processes.write(self.dir / processes.FILE, entries,
                        note="processes `fedkd deploy local` started; it stops them when it ends; if it was "
                             "killed, `fedkd stop` on this folder stops them and what they started, by PID")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this fleet's SuperLink (killed with the fleet if interrupted)."""
        name = f"flwr-{args[0]}-{len(self.procs)}"
        proc = self.start(name, [flower_exe("flwr"), *args], home=self.cli_home, cwd=APP_DIR, pipe=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeployError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f}s") from None
        self.log_path(name).write_text(stdout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")

    def tail(self, name: str, lines: int = 25) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text[-lines:])

    # ---- the parts
    def start_superlink(self, *, timeout: float = 60) -> None:
        cmd = superlink_command(port=self.port, certs=self.certs, auth=self.auth, exe=flower_exe("flower-superlink"))
        proc = self.start("superlink", cmd, home=self.home("superlink"))
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if proc.poll() is not None:
                raise DeployError(f"flower-superlink exited with code {proc.returncode}:\n{self.tail('superlink')}")
            if time.monotonic() > deadline:
                raise DeployError(f"flower-superlink did not answer on {self.address} within {timeout:.0f}s:\n"
                                  f"{self.tail('superlink')}")
            time.sleep(0.3)
        self.out(f"[fedkd deploy] SuperLink up on {'https' if self.certs else 'http'}://{self.address}"
                 f"{' with SuperNode authentication' if self.auth else ''}")

    def _healthy(self) -> bool:
        import httpx
        scheme = "https" if self.certs else "http"
        verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(self.certs.ca_cert))
                                         if self.certs else False)
        try:
            return httpx.get(f"{scheme}://{self.address}/health", timeout=2, verify=verify).is_success
        except httpx.HTTPError:
            return False

    def register(self, public_key: Path) -> str:
        """``flwr supernode register KEY.pub fedkd-local``; returns Flower's answer."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION)
        if res.returncode != 0 or "registered successfully" not in res.stdout:
            raise DeployError(f"registering {public_key} failed (exit {res.returncode}):\n{res.stdout[-2000:]}")
        return res.stdout.strip().splitlines()[-1]

    def start_supernode(self, partition_id: int | None, num_partitions: int | None, *,
                        private_key: Path | None = None, data_path: str | None = None, shard: str | None = None,
                        usage_log: str | None = None, weak: WeakDevice | None = None, name: str | None = None) -> str:
        name = name or f"supernode-{partition_id}"
        port, worker = free_ports(1)[0], self.clientapp == "worker"
        cmd = supernode_command(superlink=self.address, partition_id=partition_id, num_partitions=num_partitions,
                                port=port, root_certificates=self.certs.ca_cert if self.certs else None,
                                private_key=private_key, data_path=data_path, shard=shard, usage_log=usage_log,
                                exe=flower_exe("flower-supernode"), isolation="process" if worker else None,
                                launcher=supernode.command(self.supernode_poll) if self.supernode_poll else ())
        proc = self.start(name, weak.wrap(cmd) if weak else cmd, home=self.home(name))
        if worker:  # the same Flower home (the run's FAB is installed there) and the same confinement
            self.workers[name] = f"{name}-clientapp"
            wcmd = clientapp_worker.command(f"127.0.0.1:{port}", parent_pid=proc.pid)
            self.start(self.workers[name], weak.wrap(wcmd) if weak else wcmd, home=self.home(name))
        return name

    def peak_rss_mb(self, name: str) -> dict[str, float]:
        """Peak resident memory (VmHWM, MB) of a running process of the fleet and of each long-lived
        process below it (a SuperNode's SuperExec), by command name. A ClientApp process still
        finishing its message is left out, and a SuperNode's ClientApp worker is not below it: the
        node's usage log has every ClientApp's own peak (the worker's, over all its messages)."""
        root = self.procs[name].pid
        out = {}
        for pid in [root, *sorted(descendants([root]))]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
            cmd = processes.command_line(pid)
            exe = next((Path(a).name for a in cmd[:2] if Path(a).name.startswith(("flower-", "flwr-"))), "")
            if cmd[1:3] == ["-m", "simulations.supernode"]:  # flower-supernode through fedkd's launcher
                exe = "flower-supernode"
            if hwm and exe and exe != "flwr-clientapp":
                out[exe] = max(out.get(exe, 0.0), int(hwm.group(1)) * 1024 / 1e6)
        return out

    def wait_online(self, names: Sequence[str], *, timeout: float = 120) -> None:
        """Until every named SuperNode has been activated by the SuperLink (it logs its node ID)."""
        deadline, left = time.monotonic() + timeout, list(names)
        while left:
            for name in list(left):
                if "SuperNode ID:" in self.log_path(name).read_text(errors="replace"):
                    left.remove(name)
                elif self.procs[name].poll() is not None:
                    raise DeployError(f"{name} exited with code {self.procs[name].returncode} before joining:\n"
                                      f"{self.tail(name)}")
            if left and time.monotonic() > deadline:
                raise DeployError(f"{', '.join(left)} did not join within {timeout:.0f}s")
            if left:
                time.sleep(0.3)

    def check_alive(self, names: Sequence[str]) -> None:
        """Raise if a named process (or the ClientApp worker of a named SuperNode) has exited."""
        for name in [*names, *(self.workers[n] for n in names if n in self.workers)]:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise DeployError(f"{name} exited with code {proc.returncode} while the run was going; "
                                  f"stopping the deployment. Its last lines:\n{self.tail(name)}")

    def run_status(self, run_id: int) -> str:
        """``flwr ls --run-id``'s status, e.g. ``finished:completed``; empty if it cannot be read."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            return json.loads(res.stdout[res.stdout.index("{"):])["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            return ""

    # ---- teardown
    def _members(self) -> set[int]:
        roots = [p.pid for p in self.procs.values()]
        found = {p for p in roots if alive(p)} | descendants(roots) | processes_with_marker(self.marker)
        for pid in found:
            self._remember(pid)
        return {p for p, start in self.seen.items() if alive(p) and (_proc_stat(p) or (0, "", -1))[2] == start}

    def stop(self, *, grace: float = 10.0) -> list[int]:
        """Stop every process of the fleet (SIGTERM, then SIGKILL after ``grace``); returns leftovers."""
        with self._lock:
            if self._stopped:
                return []
            self._stopped = True
        order = sorted(self.procs, key=lambda n: (n == "superlink", n.startswith("supernode"), n))
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            members = self._members()
            for name in order:  # clients of the SuperLink first, the SuperLink last
                proc = self.procs[name]
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            for pid in members:
                _signal(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                for proc in self.procs.values():
                    proc.poll()  # reap our own children
                if not self._members():
                    break
                time.sleep(0.2)
            else:
                continue
            break
        for proc in self.procs.values():
            if proc.stdout:
                proc.stdout.close()
        return sorted(self._members())


# --------------------------------------------------------------------------- fedkd deploy local
def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def deploy_local(overrides: Mapping[str, Scalar], *, nodes: int, certs: CertPaths | None = None,
                 auth: bool = False, state_dir: Path | None = None, keep: bool = False,
                 timeout: float = 0.0, startup_timeout: float = 180.0, shards: bool = False,
                 extra_nodes: Sequence[Path] = (), weak_node: int | None = None, weak: WeakDevice | None = None,
                 out: Callable[[str], None] = print, clientapp: str = "worker",
                 supernode_poll: float = SUPERNODE_POLL) -> Path:
    """Start a SuperLink and ``nodes`` SuperNodes here, run the experiment, stop everything.

    ``shards``: write each partition's shard (fedkd.shards) into the state folder and start
    SuperNode i from ``shards/device-i`` (it reads nothing else). ``extra_nodes``: shard folders
    of more SuperNodes, beyond the fleet (a device whose data may not be the fleet's: the
    ServerApp refuses it at the handshake unless its shard matches a partition no one holds).
    ``weak_node``: confine SuperNode ``weak_node`` as ``weak`` says (one CPU, a memory cap).
    Every node logs its time and memory per message (fedkd.usage); the summary is printed and
    written to ``device_usage.json`` in the results folder.
    ``clientapp`` and ``supernode_poll``: how the SuperNodes run their ClientApps (:class:`LocalFleet`).

    Returns the results folder; raises DeployError (run failed, a process died, timeout) or
    ValueError (bad settings) after every started process is gone.
    """
    from fedkd.checks import check_run_config
    from simulations.runner import resolve_overrides
    overrides = fit_fleet(resolve_overrides(overrides), nodes)
    cfg, plan = check_run_config(overrides)  # every check, before any process starts (the ServerApp repeats it)
    if auth and certs is None:
        raise ValueError("--auth needs --tls DIR (SuperNode authentication requires TLS)")
    check_clientapp(clientapp, supernode_poll)
    if auth and extra_nodes:
        raise ValueError("--extra-node with --auth: an extra SuperNode has no registered key and could not join")
    if weak_node is not None:
        if not 0 <= weak_node < nodes:
            raise ValueError(f"--weak-node must be a partition id in 0..{nodes - 1}, got {weak_node}")
        weak = weak or WeakDevice()
        weak.wrap([])  # the tools exist, before anything starts
    extra = [Path(p).resolve() for p in extra_nodes]
    if certs is not None:
        certs = CertPaths(certs.root.resolve()).check(nodes=nodes if auth else 0)
    made_dir = state_dir is None
    state = Path(tempfile.mkdtemp(prefix="fedkd-deploy-")) if made_dir else Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    results = Path(cfg.output_dir) / cfg.experiment_name
    run_config = state / "run-config.toml"
    run_config.write_text(overrides_toml(overrides))
    folders: list[Path | None] = [None] * nodes
    if shards:
        from fedkd.shards import write_shards
        folders = write_shards(cfg, plan.population, state / "shards", replace=True)
    usage_dir = state / "usage"
    fleet = LocalFleet(state, certs=certs, auth=auth, out=out, clientapp=clientapp, supernode_poll=supernode_poll)
    atexit.register(fleet.stop)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    ok = False
    try:
        out(f"[fedkd deploy] {nodes} SuperNodes, state and logs in {state}")
        if shards:
            out(f"[fedkd deploy] {nodes} device shards in {state / 'shards'}: SuperNode i reads only device-i "
                f"(fleet fingerprint {_fleet_fingerprint(folders[0])})")
        fleet.start_superlink(timeout=startup_timeout)
        keys: list[Path | None] = [None] * nodes
        if auth:
            for i in range(nodes):
                keys[i] = certs.node_key(i)
                out(f"[fedkd deploy] {fleet.register(certs.node_pub(i))} ({certs.node_pub(i).name})")
        names = [fleet.start_supernode(i, nodes, private_key=keys[i], shard=folders[i] and str(folders[i]),
                                       usage_log=str(usage_dir / f"supernode-{i}.jsonl"),
                                       weak=weak if i == weak_node else None) for i in range(nodes)]
        if weak_node is not None:
            out(f"[fedkd deploy] supernode-{weak_node} is a weak device: {weak.describe()}")
        for j, shard in enumerate(extra):
            names.append(fleet.start_supernode(None, None, shard=str(shard), name=f"extra-{j}",
                                               usage_log=str(usage_dir / f"extra-{j}.jsonl")))
            out(f"[fedkd deploy] extra-{j}: one more SuperNode, from the shard {shard}")
        fleet.wait_online(names, timeout=startup_timeout)
        out(f"[fedkd deploy] {nodes} SuperNodes online{f' and {len(extra)} extra' if extra else ''}; "
            f"flwr run . {CONNECTION} (results: {results})")
        run_id = _run(fleet, run_config, names, timeout=timeout)
        peaks = {name: fleet.peak_rss_mb(name) for name in names}  # of the long-lived processes, before they stop
        status = _final_status(fleet, run_id)
        if status != "finished:completed":
            raise DeployError(f"run {run_id} ended as {status or 'unknown'}; see the ServerApp log above"
                              f"{'' if (results / 'summary.json').exists() else ' (no summary.json written)'}")
        if not (results / "summary.json").exists():
            raise DeployError(f"run {run_id} completed but {results / 'summary.json'} is missing")
        report = device_usage(usage_dir, names, peaks, weak={f"supernode-{weak_node}": weak.describe()}
                              if weak_node is not None else {})
        (results / "device_usage.json").write_text(json.dumps(report, indent=2) + "\n")
        for line in usage_lines(report):
            out(line)
        ok = True
        return results
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        left = fleet.stop()
        atexit.unregister(fleet.stop)
        if left:
            out(f"[fedkd deploy] WARNING: processes still alive after SIGKILL: {left}")
        else:
            out(f"[fedkd deploy] stopped every process of the deployment ({len(fleet.seen)} seen)")
        if made_dir and ok and not keep:
            shutil.rmtree(state, ignore_errors=True)
        else:
            out(f"[fedkd deploy] logs kept in {state / 'logs'}")


def _fleet_fingerprint(folder: Path | None) -> str:
    return json.loads((folder / "manifest.json").read_text())["fingerprint"]["fleet"] if folder else "-"


def device_usage(usage_dir: Path, names: Sequence[str], peaks: Mapping[str, Mapping[str, float]], *,
                 weak: Mapping[str, str]) -> dict:
    """Every node's usage as it measured it (fedkd.usage: its ClientApp processes, per message)
    and the peak memory of its long-lived processes (SuperNode, SuperExec) read from /proc."""
    from fedkd import usage
    return {"nodes": [{"name": name, "weak": weak.get(name), **usage.summarize(usage.read(usage_dir / f"{name}.jsonl")),
                       "processes_peak_rss_mb": {k: round(v, 1) for k, v in peaks.get(name, {}).items()}}
                      for name in names]}


def usage_lines(report: Mapping) -> list[str]:
    """The deployment's device usage, one line per node (weak nodes marked)."""
    lines = ["[fedkd deploy] device usage, as each node measured its ClientApp processes (device_usage.json):"]
    for node in report["nodes"]:
        peak = "-" if node["peak_rss_mb"] is None else f"{node['peak_rss_mb']:.0f} MB"
        if node.get("data_mb") is not None:
            peak += f" (data {node['data_mb']:.0f} MB)"
        rounds = "; ".join(f"round {r['round']} {r['process_s']:.1f} s (handler {r['handler_s']:.1f} s)"
                           for r in node["rounds"] if r["process_s"] is not None) or "no train message"
        procs = ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(node["processes_peak_rss_mb"].items()))
        tag = f" [weak: {node['weak']}]" if node["weak"] else ""
        lines.append(f"[fedkd deploy]   {node['name']}{tag}: {node['messages']} messages, ClientApp peak RSS {peak}; "
                     f"train {rounds}" + (f"; long-lived: {procs}" if procs else ""))
    return lines


def _run(fleet: LocalFleet, run_config: Path, nodes: Sequence[str], *, timeout: float) -> int:
    """``flwr run --stream``: print its lines, watch the fleet, return the run id once it ends."""
    app = stage_app(APP_DIR, fleet.dir / "app")  # what `flwr run` ships, without walking .venv
    proc = fleet.start("flwr-run", flwr_run_command(run_config, app_dir=app, exe=flower_exe("flwr")),
                       home=fleet.cli_home, cwd=APP_DIR, pipe=True)
    run_id: list[int] = []
    log = fleet.log_path("flwr-run").open("a")

    def pump() -> None:
        try:
            for line in proc.stdout:
                if not run_id and (m := re.search(r"Successfully started run (\d+)", line)):
                    run_id.append(int(m.group(1)))
                    (fleet.dir / "run-id").write_text(m.group(1))
                log.write(line)
                log.flush()
                fleet.out(line.rstrip("\n"))
        except (OSError, ValueError):  # the fleet is being stopped
            pass

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout if timeout else math.inf
    try:
        while proc.poll() is None:
            fleet.check_alive(["superlink", *nodes])
            if time.monotonic() > deadline:
                raise DeployError(f"the run did not finish within {timeout:.0f}s (--timeout)")
            time.sleep(0.5)
        reader.join(timeout=5)
    finally:
        log.close()
    if proc.returncode != 0 or not run_id:
        raise DeployError(f"`flwr run` failed (exit {proc.returncode}):\n{fleet.tail('flwr-run')}")
    fleet.check_alive(["superlink"])
    return run_id[0]


def _final_status(fleet: LocalFleet, run_id: int, wait: float = 30.0) -> str:
    """The run's final status; `flwr run --stream` returns when the logs end, the status may lag."""
    deadline = time.monotonic() + wait
    status = fleet.run_status(run_id)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1)
        status = fleet.run_status(run_id)
    return status


# --------------------------------------------------------------------------- device instructions
def device_commands(*, superlink: str, nodes: int, certs_dir: Path | None, device_dir: str = "/home/pi/fedkd",
                    data_path: str | None = None, server_host: str = "0.0.0.0", shards_dir: Path | None = None) -> str:
    """Copy-paste instructions: SuperLink, connection, registration, one SuperNode per device, the run."""
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--superlink must be HOST:PORT, got {superlink!r}")
    certs = CertPaths(Path(certs_dir).resolve()) if certs_dir else None
    q = shlex.join
    out = ["# 1. On the server: the SuperLink (Fleet, Control and Runtime APIs on one port; registrations",
           "#    and runs kept in superlink.db). The Control API has no login: firewall the port to your devices.",
           q(superlink_command(port=int(port), host=server_host, certs=certs, auth=certs is not None,
                               database="superlink.db")), ""]
    out += ["# 2. On the machine that starts runs: a SuperLink connection for `flwr` (in $FLWR_HOME/config.toml,",
            "#    default ~/.flwr/config.toml; merge by hand if the file exists)",
            "mkdir -p ~/.flwr && cat >> ~/.flwr/config.toml <<'EOF'",
            connection_toml(superlink, name="fedkd", root_certificates=certs.ca_cert if certs else None,
                            default=False).rstrip("\n"), "EOF", ""]
    if certs:
        out += ["# 3. Register each SuperNode's public key (SuperNode authentication is on)"]
        out += [q(["flwr", "supernode", "register", str(certs.node_pub(i)), "fedkd"]) for i in range(nodes)]
        out.append("")
    out.append(f"# {4 if certs else 3}. On device i (Raspberry Pi / phone-class Linux, 64-bit, Python >= 3.11):")
    out.append("#    pip install 'flwr==1.41.0' torch numpy pandas pyarrow   # or: pip install <fedkd checkout>")
    for i in range(nodes):
        files = []
        if certs:
            files += [str(certs.ca_cert), str(certs.node_key(i))]
        out.append(f"#  device {i}:")
        if files:
            out.append(q(["scp", *files, f"pi@device-{i}:{device_dir}/"]) + "   # from the server")
        if shards_dir:
            out.append(q(["scp", "-r", str(Path(shards_dir).resolve() / f"device-{i}"),
                          f"pi@device-{i}:{device_dir}/shard"]) + "   # its own users' histories only")
        elif data_path:
            out.append(f"#    and copy the same data file to {data_path} on the device")
        cmd = supernode_command(superlink=superlink, partition_id=i, num_partitions=nodes,
                                root_certificates=f"{device_dir}/ca.crt" if certs else None,
                                private_key=f"{device_dir}/node-{i}" if certs else None,
                                data_path=None if shards_dir else data_path,
                                shard=f"{device_dir}/shard" if shards_dir else None)
        out.append(q(cmd))
    out += ["", f"# {5 if certs else 4}. From the fedkd checkout, once every SuperNode is online "
            "(`flwr supernode ls fedkd`)."]
    if shards_dir:
        out += [f"#    {Path(shards_dir).resolve() / 'run-config.toml'}: the settings the shards were cut with "
                "(`fedkd shard` wrote it); the server refuses a device whose shard does not match them."]
    else:
        out += ["#    run-config.toml: your settings with absolute output-dir and cache-dir and a users-per-client",
                f"#    that splits the edge users into exactly {nodes} clients (`fedkd deploy local --nodes {nodes} "
                "--keep` writes one to its state folder)."]
    run_config = Path(shards_dir).resolve() / "run-config.toml" if shards_dir else "run-config.toml"
    out += ["export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
            q(["flwr", "run", ".", "fedkd", "--stream", "--run-config", str(run_config)])]
    return "\n".join(out)


# --------------------------------------------------------------------------- command line
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="Run on Flower's Deployment Engine (local fleet, certificates, devices).",
                       description=__doc__, formatter_class=RawHelpFormatter)
    dsub = p.add_subparsers(dest="deploy_command", required=True)

    loc = dsub.add_parser("local", help="SuperLink + N SuperNodes on 127.0.0.1, one run, then stop all.",
                          usage="fedkd deploy local --nodes N [--config FILE] [--run-config \"K=V ...\"] "
                                "[--tls DIR] [--auth] [--KEY VALUE ...]",
                          formatter_class=HelpFormatter)
    loc.add_argument("--nodes", type=int, required=True, help="SuperNodes to start = edge clients of the run.")
    loc.add_argument("--config", type=Path, action="append", default=[],
                     help="TOML file of experiment overrides, as for `fedkd run`; may repeat.")
    loc.add_argument("--run-config", action="append", default=[], metavar='"K=V ..."',
                     help="Experiment overrides in flwr's syntax (strings quoted); after --config files.")
    loc.add_argument("--tls", type=Path, default=None, metavar="DIR",
                     help="Serve TLS with the files of `fedkd deploy certs --out DIR` (default: insecure).")
    loc.add_argument("--auth", action="store_true",
                     help="SuperNode authentication: register DIR/supernodes/node-i.pub, start node i with its key.")
    loc.add_argument("--state-dir", type=Path, default=None,
                     help="Folder for Flower homes, pids.json and logs (default: a temporary folder, "
                          "removed after a successful run unless --keep).")
    loc.add_argument("--keep", action="store_true", help="Keep the state folder (logs) after a successful run.")
    loc.add_argument("--timeout", type=float, default=0.0,
                     help="Give up on the run after this many seconds (0 = never).")
    loc.add_argument("--startup-timeout", type=float, default=180.0,
                     help="Seconds the SuperLink and the SuperNodes may take to come up.")
    loc.add_argument("--shards", action="store_true",
                     help="Write each device's shard (as `fedkd shard`) to STATE/shards and start SuperNode i from "
                          "device-i: it reads only its own users' histories, not the data file.")
    loc.add_argument("--extra-node", type=Path, action="append", default=[], metavar="SHARD",
                     help="Start one more SuperNode, beyond the fleet, from this shard folder (a device whose data "
                          "may not be the fleet's: the ServerApp refuses it at the handshake, rejections.jsonl); "
                          "may repeat.")
    loc.add_argument("--weak-node", type=int, default=None, metavar="I",
                     help="Confine SuperNode I as a weak device: --weak-cpus (taskset -c) and --weak-memory-mb "
                          "(prlimit --data, per process); every node's peak memory and per-round times are reported.")
    loc.add_argument("--weak-cpus", default=WeakDevice.cpus, metavar="LIST",
                     help="CPUs the weak node may run on (taskset -c syntax).")
    loc.add_argument("--weak-memory-mb", type=int, default=WeakDevice.memory_mb, metavar="MB",
                     help="Data-memory limit (RLIMIT_DATA: heap and private writable memory) of each of the weak "
                          "node's processes, in MB (10^6 bytes).")
    loc.add_argument("--clientapp", choices=CLIENTAPP_MODES, default="worker",
                     help="worker: one long-lived ClientApp process per SuperNode (imports and data once; "
                          "--isolation process); flower: Flower's default, a new process per message.")
    loc.add_argument("--supernode-poll", type=float, default=SUPERNODE_POLL, metavar="S",
                     help="A SuperNode polls the SuperLink again S seconds after a message, then twice as late "
                          "each time nothing came, up to 1 s (Flower's: 3 s, fixed); 0 = Flower's own "
                          "flower-supernode.")
    add_config_options(loc, title="{section} settings (as in `fedkd run`; win over --config/--run-config)")

    crt = dsub.add_parser("certs", help="CA, SuperLink certificate, SuperNode key pairs; prints device commands.",
                          formatter_class=HelpFormatter)
    crt.add_argument("--out", type=Path, required=True, help="Folder for the files (created).")
    crt.add_argument("--nodes", type=int, required=True, help="SuperNode key pairs to create.")
    crt.add_argument("--host", action="append", default=[],
                     help="Extra name or IP of the SuperLink for the certificate (127.0.0.1, localhost, ::1 "
                          "are always in); may repeat.")
    crt.add_argument("--days", type=int, default=365, help="Validity of the certificates.")
    crt.add_argument("--superlink", default=None, metavar="HOST:PORT",
                     help=f"Address devices use in the printed commands (default: first --host:{DEVICE_PORT}).")
    crt.add_argument("--data-path", default=None, help="Path of the data file on each device (printed commands).")
    crt.add_argument("--force", action="store_true", help="Overwrite existing files in --out.")

    dev = dsub.add_parser("device-commands", help="Print the commands for a SuperLink and real devices.",
                          formatter_class=HelpFormatter)
    dev.add_argument("--superlink", required=True, metavar="HOST:PORT", help="SuperLink address devices reach.")
    dev.add_argument("--nodes", type=int, required=True, help="Devices (= edge clients).")
    dev.add_argument("--certs", type=Path, default=None, help="Folder of `fedkd deploy certs` (TLS + auth).")
    dev.add_argument("--data-path", default=None, help="Path of the data file on each device.")
    dev.add_argument("--device-dir", default="/home/pi/fedkd", help="Folder on each device for the CA and its key.")
    dev.add_argument("--shards", type=Path, default=None, metavar="DIR",
                     help="Shards of `fedkd shard --out DIR`: copy DIR/device-i to device i, which runs from it "
                          "alone (instead of --data-path).")


def main(args: argparse.Namespace) -> int:
    if args.deploy_command == "certs":
        paths = CertPaths(args.out)
        if paths.ca_cert.exists() and not args.force:
            raise ValueError(f"{paths.ca_cert} exists; use --force to replace the CA and every key")
        make_certs(args.out, nodes=args.nodes, hosts=args.host, days=args.days)
        print(f"wrote {paths.ca_cert}, {paths.server_cert} (+ keys), {args.nodes} SuperNode key pair(s) in "
              f"{paths.root / 'supernodes'}; keep ca.key and server.key on the server only.\n")
        host = args.host[0] if args.host else "127.0.0.1"
        print(device_commands(superlink=args.superlink or f"{host}:{DEVICE_PORT}", nodes=args.nodes,
                              certs_dir=args.out, data_path=args.data_path))
        return 0
    if args.deploy_command == "device-commands":
        print(device_commands(superlink=args.superlink, nodes=args.nodes, certs_dir=args.certs,
                              data_path=args.data_path, device_dir=args.device_dir, shards_dir=args.shards))
        return 0
    overrides = load_settings(args.config, args.run_config, config_values(args))
    try:
        weak = WeakDevice(cpus=args.weak_cpus, memory_mb=args.weak_memory_mb) if args.weak_node is not None else None
        out = deploy_local(overrides, nodes=args.nodes, certs=CertPaths(args.tls) if args.tls else None,
                           auth=args.auth, state_dir=args.state_dir, keep=args.keep, timeout=args.timeout,
                           startup_timeout=args.startup_timeout, shards=args.shards, extra_nodes=args.extra_node,
                           weak_node=args.weak_node, weak=weak, out=lambda s: print(s, flush=True),
                           clientapp=args.clientapp, supernode_poll=args.supernode_poll)
    except DeployError as exc:
        print(f"fedkd: error: deployment failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedkd: interrupted; every process of the deployment was stopped", file=sys.stderr)
        return 130
    from simulations.end_of_run import summary_lines
    print("\n".join(summary_lines(out)))
    return 0
