"""An embedded Redis for the gateways' shared rate limits: Debian's ``redis-server``, on loopback.

``farm up`` starts one when the deployment runs more than one gateway replica and names no
Redis of its own (``serve.redis_url``); ``farm down`` stops it. It keeps nothing on disk (rate
windows are short-lived), listens on 127.0.0.1 only and asks for a password generated once
under the state folder (0600). ``redis.json`` there records its pid and port, so every process
of the farm on this machine finds the same server.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

RUNTIME_FILE = "redis.json"
PASSWORD_FILE = "password"


class RedisError(RuntimeError):
    pass


@dataclass(frozen=True)
class RedisRuntime:
    pid: int
    port: int

    def url(self, password: str) -> str:
        return f"redis://:{password}@127.0.0.1:{self.port}/0"


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RedisError("redis-server is not installed: install Debian's 'redis-server' package "
                         "(scripts/install-system-packages.sh does), or set serve.redis_url to a Redis of your own")
    return found


class EmbeddedRedis:
    """The Redis of one state folder (``<state_dir>/redis``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def password(self) -> str:
        path = self.folder / PASSWORD_FILE
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_urlsafe(32))
            except FileExistsError:
                pass
        return path.read_text().strip()

    def running(self) -> RedisRuntime | None:
        path = self.folder / RUNTIME_FILE
        try:
            runtime = RedisRuntime(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return runtime if _alive(runtime.pid) and _answers(runtime.port) else None

    def url(self) -> str | None:
        """The running server's URL (password included), or None when none runs."""
        runtime = self.running()
        return None if runtime is None else runtime.url(self.password)

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server unless it runs; returns its URL."""
        runtime = self.running()
        if runtime is not None:
            return runtime.url(self.password)
        password = self.password
        port = _free_port()
        log_file = self.folder / "redis.log"
        command = [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "yes",
                   "--save", "", "--appendonly", "no", "--dir", str(self.folder), "--logfile", str(log_file),
                   "--requirepass", password]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                tail = log_file.read_text()[-500:] if log_file.exists() else ""
                raise RedisError(f"redis-server did not start on 127.0.0.1:{port}: {tail.strip()}")
            time.sleep(0.05)
        runtime = RedisRuntime(process.pid, port)
        (self.folder / RUNTIME_FILE).write_text(json.dumps({"pid": runtime.pid, "port": runtime.port}))
        return runtime.url(password)

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the server if it runs; True if one was stopped."""
        runtime = self.running()
        (self.folder / RUNTIME_FILE).unlink(missing_ok=True)
        if runtime is None:
            return False
        os.kill(runtime.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(runtime.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(runtime.pid):
            os.kill(runtime.pid, signal.SIGKILL)
        return True


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            reply = conn.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


def _free_port() -> int:
    """A free loopback port outside Ray's default worker range (10002–19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10_000 <= port < 20_000:
            return port
