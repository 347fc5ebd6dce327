"""EmbeddedSeaweed: a real `weed server` process, started, found, stopped and restarted."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import farm
from farm.storage import (
    EmbeddedSeaweed,
    ObjectStore,
    SeaweedConfig,
    SeaweedError,
    SeaweedPorts,
    StorageUnavailable,
    weed_binary,
)

REPO = Path(farm.__file__).resolve().parents[1]


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _in_subprocess(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter (another process, as `farm down` would be)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# -- no server needed ---------------------------------------------------------------------


def test_weed_binary_is_found_and_runs() -> None:
    binary = weed_binary()
    assert os.access(binary, os.X_OK)
    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30).stdout
    assert "version" in out


def test_free_ports_include_free_grpc_twins() -> None:
    ports = SeaweedPorts.pick_free()
    ports.check()
    assert len(set(ports.all())) == 8
    assert ports.busy() == {}
    assert SeaweedPorts.pick_free(s3=ports.s3).s3 == ports.s3
    with pytest.raises(ValueError, match="collide"):
        SeaweedPorts(master=9333, volume=19333, filer=8888, s3=8333).check()  # 19333 = master gRPC
    with pytest.raises(ValueError, match="s3 port 60000"):
        SeaweedPorts(master=9333, volume=8080, filer=8888, s3=60000).check()


def test_config_is_strict_and_documented() -> None:
    assert all(field.description for field in SeaweedConfig.model_fields.values())
    with pytest.raises(ValueError, match="extra"):
        SeaweedConfig(data_dri="/tmp/x")


def test_busy_explicit_port_is_refused_before_launch(tmp_path: Path) -> None:
    ports = SeaweedPorts.pick_free()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.s3))
        squatter.listen()
        server = EmbeddedSeaweed(SeaweedConfig(
            data_dir=tmp_path, master_port=ports.master, volume_port=ports.volume,
            filer_port=ports.filer, s3_port=ports.s3,
        ))
        with pytest.raises(SeaweedError, match=f"'s3': {ports.s3}"):
            server.start()
    assert not (tmp_path / EmbeddedSeaweed.PID_FILE).exists()


def test_start_failure_reports_exit_code_and_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'F0101 boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = EmbeddedSeaweed(SeaweedConfig(data_dir=tmp_path / "data", binary=fake))
    with pytest.raises(SeaweedError, match=r"(?s)exited \(code 3\).*boom: cannot start"):
        server.start(timeout=10)
    assert not server.is_running()


def test_stop_without_a_server_is_a_no_op(tmp_path: Path) -> None:
    assert EmbeddedSeaweed(SeaweedConfig(data_dir=tmp_path / "never-created")).stop() is False
    assert EmbeddedSeaweed.find_running(tmp_path / "never-created") is None
    with pytest.raises(SeaweedError, match="no SeaweedFS server is running"):
        EmbeddedSeaweed(SeaweedConfig(data_dir=tmp_path)).settings()


# -- the session server -------------------------------------------------------------------


def test_secrets_are_private_and_services_loopback_only(seaweed: EmbeddedSeaweed) -> None:
    data = seaweed.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in (EmbeddedSeaweed.IDENTITIES_FILE, EmbeddedSeaweed.SECURITY_FILE):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    access, secret = seaweed.credentials()
    assert access.startswith("VF") and len(secret) >= 32

    ports = seaweed.runtime.ports
    assert all(_port_open(port) for port in ports.all())
    # The internal HTTP APIs demand JWTs (security.toml): data only flows through S3 auth.
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"http://127.0.0.1:{ports.filer}/buckets/", timeout=5)
    assert denied.value.code == 401

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks our address
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no non-loopback address to probe")
    assert not any(_port_open(port, address) for port in ports.all())


def test_two_servers_run_side_by_side(seaweed: EmbeddedSeaweed, tmp_path: Path) -> None:
    other = EmbeddedSeaweed(SeaweedConfig(data_dir=tmp_path))
    runtime = other.start(wait=False)
    try:
        other.wait_ready(timeout=60)
        assert runtime.endpoint_url != seaweed.runtime.endpoint_url
        assert other.credentials() != seaweed.credentials()
        bucket = f"only-{uuid.uuid4().hex[:8]}"
        mine = ObjectStore(other.settings(bucket=bucket))
        mine.ensure_bucket()
        mine.put_bytes("k", b"other")
        theirs = ObjectStore(seaweed.settings(bucket=bucket))
        assert theirs.ensure_bucket() is True  # not visible on the session server
        theirs.client.delete_bucket(Bucket=bucket)
    finally:
        assert other.stop() is True
    assert EmbeddedSeaweed.find_running(seaweed.data_dir) is not None


# -- a server of its own: stop, restart, persistence ---------------------------------------


def test_lifecycle_across_processes_restarts_and_outages(tmp_path: Path) -> None:
    data_dir = tmp_path / "sw"
    server = EmbeddedSeaweed(SeaweedConfig(data_dir=data_dir))
    began = time.monotonic()
    first = server.start()
    assert time.monotonic() - began < 30
    credentials = server.credentials()
    store = ObjectStore(server.settings(max_attempts=2, connect_timeout=1))
    store.ensure_bucket()
    store.put_bytes("keep/me", b"persisted")

    # 1. Starting again (same data dir) reuses the running server; conflicting ports refuse.
    assert EmbeddedSeaweed(SeaweedConfig(data_dir=data_dir)).start().pid == first.pid
    with pytest.raises(SeaweedError, match="already runs"):
        EmbeddedSeaweed(SeaweedConfig(data_dir=data_dir, s3_port=first.ports.s3 + 1)).start()

    # 2. Another process finds it and stops it via the pidfile.
    find = (
        "import sys; from farm.storage import EmbeddedSeaweed as E; "
        "r = E.find_running(sys.argv[1]); print(r.pid if r else 'none')"
    )
    assert _in_subprocess(find, str(data_dir)) == str(first.pid)
    stop = (
        "import sys; from farm.storage import EmbeddedSeaweed as E, SeaweedConfig as C; "
        "print(E(C(data_dir=sys.argv[1])).stop())"
    )
    assert _in_subprocess(stop, str(data_dir)) == "True"
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid, 0)
    assert not any(_port_open(port) for port in first.ports.all())
    assert EmbeddedSeaweed.find_running(data_dir) is None
    assert not (data_dir / EmbeddedSeaweed.PID_FILE).exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{first.ports.s3}.sock"))
    assert _in_subprocess(find, str(data_dir)) == "none"

    # 3. While it is down, a write fails fast with an error that names the endpoint.
    began = time.monotonic()
    with pytest.raises(StorageUnavailable, match=f"{first.endpoint_url}.*did not answer after 2 attempt"):
        store.put_bytes("during/outage", b"x")
    assert time.monotonic() - began < 15

    # 4. Restart: same ports (when free), same credentials, data intact, old clients work.
    second = server.start()
    assert second.pid != first.pid and second.ports == first.ports
    assert server.credentials() == credentials
    assert store.get_bytes("keep/me") == b"persisted"
    store.put_bytes("after/outage", b"ok")
    assert EmbeddedSeaweed.find_running(data_dir) == second
    assert server.stop() is True
    assert server.stop() is False  # already stopped

    # 5. Restart on other ports: the master starts a fresh raft dir; objects still there.
    new = SeaweedPorts.pick_free()
    moved = EmbeddedSeaweed(SeaweedConfig(
        data_dir=data_dir, master_port=new.master, volume_port=new.volume, filer_port=new.filer, s3_port=new.s3,
    ))
    try:
        assert moved.start().ports == new
        assert moved.credentials() == credentials
        moved_store = ObjectStore(moved.settings())
        assert moved_store.get_bytes("keep/me") == b"persisted"
        assert moved_store.get_bytes("after/outage") == b"ok"
        moved_store.put_bytes("moved/write", b"ok")
    finally:
        moved.stop()
