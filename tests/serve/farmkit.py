"""A real `farm up` for tests: its own state folder, ports and deployment file; tenants with keys.

    with running_farm(tmp_path, settings={"render": {"shard_steps": 4}}) as farm:
        client = farm.client()            # a new tenant (invite → redeem) and the openai SDK with its key
        farm.down(); farm.up()            # the same farm again, same state and port
        farm.store().get(video_id)        # the job store, read directly

Every fault test and load test starts its farm through this, so each one runs what users run:
the `farm` command in a subprocess, never an in-process shortcut.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
LOCAL_DEPLOYMENT = ROOT / "deployments" / "local.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def farm_cli(*args: str, env: dict[str, str], timeout: float = 400, check: bool = True) -> subprocess.CompletedProcess:
    farm = Path(sys.executable).parent / "farm"
    done = subprocess.run([str(farm), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"farm {' '.join(args)} exited {done.returncode}: {done.stderr[-3000:]}")
    return done


def deployment_with(settings: dict[str, Any], path: Path, extras: dict[str, Any] | None = None) -> Path:
    """A copy of deployments/local.yaml with ``settings`` deep-merged into its app's args and
    ``extras`` (other application fields: runtime_env, deployments, …) set on the app."""
    from farm.builders import merge_settings

    config = yaml.safe_load(LOCAL_DEPLOYMENT.read_text())
    app = config["applications"][0]
    app["args"]["settings"] = merge_settings(app["args"].get("settings") or {}, settings)
    app.update(extras or {})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Farm:
    home: Path
    port: int
    metrics_port: int
    deployment: Path
    env: dict[str, str]
    is_up: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    # -- lifecycle ----------------------------------------------------------------------
    def up(self) -> None:
        farm_cli("up", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                 "--deployment", str(self.deployment), env=self.env)
        self.is_up = True

    def down(self) -> None:
        farm_cli("down", env=self.env)
        self.is_up = False

    # -- what tests read ------------------------------------------------------------------
    def settings(self):
        from farm.builders import FarmAppArgs, resolve_settings
        from farm.cluster import read_deployment

        os.environ.setdefault("FARM_HOME", str(self.home))
        args: FarmAppArgs = read_deployment(self.deployment).args
        return resolve_settings(args.model_copy(update={"settings": {**args.settings, "state_dir": str(self.home)}}))

    def store(self):
        from farm.jobs.store import JobStore

        return JobStore(f"sqlite:///{self.home / 'jobs.sqlite'}")

    def objects(self):
        from farm.storage.connect import open_store

        return open_store(self.settings(), start=False)

    def admin_key(self) -> str:
        from farm.accounts.admin import read_admin_key

        return read_admin_key(self.home)

    def admin(self, method: str, path: str, body: dict | None = None) -> dict:
        """Call an operator route with the admin key."""
        request = urllib.request.Request(
            f"{self.url}{path}", method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.admin_key()}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read() or b"{}")

    def new_api_key(self, name: str = "test") -> str:
        """A new tenant: the operator makes an invite, the tenant redeems it; returns its first key."""
        invite = self.admin("POST", "/v1/admin/invites", {"note": name})
        request = urllib.request.Request(
            f"{self.url}/v1/invites/redeem", method="POST",
            data=json.dumps({"code": invite["code"], "account_name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())["api_key"]["key"]

    def status(self) -> dict:
        """`farm status --json`: deployments, replica states, the dispatcher's status (retries included)."""
        return json.loads(farm_cli("status", "--json", env=self.env, timeout=120).stdout)

    def wait_idle(self, timeout: float = 300.0) -> None:
        """Until no job of any test is queued or in progress: tests that watch replicas or timings
        on the shared farm start from an idle one, not beside an earlier test's leftovers."""
        store = self.store()

        def idle() -> bool:
            counts = store.counts_by_status()
            return counts["queued"] == 0 and counts["in_progress"] == 0

        wait_for(idle, timeout, interval=0.5, what="the shared farm to be idle")

    def replica_pids(self, deployment: str, app: str = "videofarm") -> dict[int, bool]:
        """Pids of this farm's replicas of ``deployment`` (e.g. ``DispatcherDeployment``), or of a
        pool's replicas (``Denoiser:wan-tiny:transformer``: each replica is a deployment
        ``…:transformer:<i>``), each with whether it is running a request now.

        Ray titles a replica's process ``ray::ServeReplica:<app>:<deployment>``, and appends
        ``.<method>`` while a request runs in it. Only processes whose environment carries this
        farm's FARM_HOME count, so other farms on the machine are never touched.
        """
        import re

        import psutil

        title = re.compile(rf"ray::ServeReplica:{re.escape(app)}:{re.escape(deployment)}(:\d+)?(\.\w+)?")
        found: dict[int, bool] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            match = title.fullmatch(cmdline[0]) if cmdline else None
            if match is None:
                continue
            try:
                if proc.environ().get("FARM_HOME") != str(self.home):
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            found[proc.info["pid"]] = match.group(2) is not None
        return found

    def processes(self) -> dict[int, str]:
        """Every process this farm started, found by what it is, not by its name: `farm up` ran with
        FARM_HOME=home, and each process it started (Ray's daemons, agents and client server, which
        rename themselves or are re-parented to pid 1; SeaweedFS; the replicas) inherits that
        environment. Their descendants count too. Other farms on the machine have other homes.
        Returns pid → command line."""
        import psutil

        found: dict[int, str] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.environ().get("FARM_HOME") != str(self.home) or proc.pid == os.getpid():
                    continue
                found[proc.pid] = " ".join(proc.info["cmdline"] or ())
                for child in proc.children(recursive=True):
                    found[child.pid] = " ".join(child.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def client(self, api_key: str | None = None, **options):
        import openai

        options.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.new_api_key(), **options)


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; returns its value, or fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    value = predicate()
    if not value:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
    return value


def count_line(submitted: int, jobs: list, rows: int, events: list | None = None,
               missing: tuple[str, ...] = ()) -> tuple[str, int, int]:
    """The fault tests' report: ``submitted N, completed N, failed N (reasons), lost N, duplicated N``.

    lost: jobs that never reached an end, or completed without their clip in S3 (``missing``);
    duplicated: rows beyond those submitted, and videos whose end was recorded more than once
    (``events``, the job store's log of terminal transitions: a job run twice ends twice).
    """
    ids = {j.id for j in jobs}
    completed = sum(j.status == "completed" and j.id not in missing for j in jobs)
    failed = [j for j in jobs if j.status in ("failed", "cancelled")]
    reasons: dict[str, int] = {}
    for j in failed:
        reasons[j.error_code or j.status] = reasons.get(j.error_code or j.status, 0) + 1
    lost = submitted - completed - len(failed)
    ends: dict[str, int] = {}
    for event in events or ():
        if event.video_id in ids:
            ends[event.video_id] = ends.get(event.video_id, 0) + 1
    duplicated = (rows - submitted) + sum(n - 1 for n in ends.values() if n > 1)
    why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none"
    line = f"submitted {submitted}, completed {completed}, failed {len(failed)} ({why}), lost {lost}, duplicated {duplicated}"
    return line, lost, duplicated


@contextmanager
def running_farm(tmp_path: Path, *, settings: dict[str, Any] | None = None, extras: dict[str, Any] | None = None,
                 start: bool = True, models: dict[str, Path] | None = None) -> Iterator[Farm]:
    """`farm up` in a fresh state folder; always `farm down` afterwards. ``models`` (model id →
    a saved tiny model, e.g. the session's) are copied into the folder first, so `farm up` need
    not build them again (it builds the ones missing, as on a newcomer's machine)."""
    import shutil

    home = tmp_path / "farm-home"
    home.mkdir(parents=True, exist_ok=True)
    for model_id, source in (models or {}).items():
        shutil.copytree(source, home / "models" / model_id)
    env = {**os.environ, "FARM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("FARM_CONFIG", None)
    farm = Farm(home, free_port(), free_port(),
                deployment_with(settings or {}, tmp_path / "deployment.yaml", extras), env)
    try:
        if start:
            farm.up()
        yield farm
    finally:
        farm_cli("down", env=env, check=False)
