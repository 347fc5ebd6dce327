"""``farm up`` / ``farm down`` / ``farm status``: the farm's lifecycle on one machine or a cluster.

Callers set up Ray's auth token first (``env.use_ray_token``): Ray reads it at import.

``up`` starts (or joins) a Ray cluster, the embedded S3 store and the job store, then
deploys the Serve application described by a Serve config file
(``deployments/local.yaml``: ``import_path`` + typed ``args``). What it started is
written to ``<state>/farm.json`` so ``down`` stops exactly that, and ``status``
knows where to look.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from farm import env
from farm.builders import FarmAppArgs, build_app, merge_settings
from farm.config import FarmSettings
from farm.runtime import RUNTIME_FILE, FarmRuntime, healthy

log = logging.getLogger(__name__)

class FarmError(RuntimeError):
    """A lifecycle step failed; the message says which and why."""


@dataclass(frozen=True)
class ServeApp:
    """One application of a Serve config file, with its ``args`` validated."""

    name: str
    route_prefix: str
    import_path: str
    args: FarmAppArgs
    host: str
    port: int


def read_deployment(path: Path) -> ServeApp:
    """Parse a Serve config file with Serve's own schema, then our typed args."""
    from ray.serve.schema import ServeDeploySchema

    if not path.is_file():
        raise FarmError(f"deployment file {str(path)!r} does not exist")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    if len(schema.applications) != 1:
        raise FarmError(f"{path}: expected exactly one application, found {len(schema.applications)}")
    app = schema.applications[0]
    if app.import_path != "farm.builders:build_app":
        raise FarmError(f"{path}: import_path must be farm.builders:build_app, got {app.import_path!r}")
    return ServeApp(
        name=app.name,
        route_prefix=app.route_prefix or "/",
        import_path=app.import_path,
        args=FarmAppArgs.model_validate(app.args),
        host=schema.http_options.host,
        port=schema.http_options.port,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _ensure_models(settings: FarmSettings) -> None:
    from farm.render.tiny import TINY_MODEL_IDS, build_tiny_wan, is_built

    for spec in settings.models:
        path = Path(spec.path)
        if is_built(path) or not path.is_absolute() or spec.id not in TINY_MODEL_IDS.values():
            continue
        log.info("building tiny model %s at %s", spec.id, path)
        build_tiny_wan(path, experts=spec.experts)


def up(
    settings: FarmSettings,
    deployment_file: Path,
    *,
    address: str | None = None,
    port: int | None = None,
    metrics_port: int | None = None,
    timeout_s: float = 300.0,
) -> FarmRuntime:
    """Start storage, job store and Ray (or join ``address``), then deploy the farm."""
    import ray
    from ray import serve

    from farm.accounts.admin import ensure_admin_key_file
    from farm.jobs.store import JobStore
    from farm.storage.connect import open_store

    app = read_deployment(deployment_file)
    port = port or app.port
    existing = FarmRuntime.load(settings.state_dir)
    if existing is not None:
        if healthy(existing.http_url):
            log.info("the farm for %s is already up at %s", settings.state_dir, existing.http_url)
            return existing
        log.warning("farm.json names a farm that does not answer; cleaning it up before starting anew")
        down(settings)

    # 1. The parts the farm stands on: models, object storage, job store.
    _ensure_models(settings)
    open_store(settings)  # starts the embedded SeaweedFS when that is the mode; creates the bucket
    store = JobStore(settings.job_store_url())
    store.migrate()
    store.close()
    if settings.auth.admin_key is None and env.admin_key() is None:
        ensure_admin_key_file(settings.state_dir)  # the operator's key on a one-machine farm

    # 2. Ray: start a head node here, or join the given cluster.
    started_ray = address is None
    metrics_url = ray_temp_dir = None
    if started_ray:
        ray_port, metrics_port = _free_port(), metrics_port or _free_port()
        ray_temp_dir = ray_temp_dir_for(settings)
        cmd = [_ray_bin(), "start", "--head", f"--port={ray_port}", f"--metrics-export-port={metrics_port}",
               "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               f"--temp-dir={ray_temp_dir}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env.ray_head_env())
        if done.returncode != 0:
            raise FarmError(f"`ray start` failed: {done.stderr.strip()[-800:]}")
        address = f"127.0.0.1:{ray_port}"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    # 3. The Serve application, built from the deployment file's typed args.
    args = app.args
    if args.config is None:
        args = args.model_copy(update={"settings": merge_settings(settings.model_dump(), args.settings)})
    runtime = FarmRuntime(app.name, address, started_ray, f"http://{app.host}:{port}", metrics_url,
                          str(deployment_file), ray_temp_dir)
    runtime.save(settings.state_dir)
    try:
        ray.init(address=address, namespace="videofarm", log_to_driver=False)
        serve.start(http_options={"host": app.host, "port": port})
        serve.run(build_app(args), name=app.name, route_prefix=app.route_prefix)
        _waithealthy(runtime.http_url, timeout_s)
    except BaseException:
        ray.shutdown()
        down(settings)
        raise
    ray.shutdown()  # the application lives on in the cluster; this driver leaves
    return runtime


def _waithealthy(http_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{http_url}/healthz", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise FarmError(f"the gateway at {http_url} did not become healthy in {timeout_s:.0f}s ({last})")


def down(settings: FarmSettings, *, grace_s: int = 15) -> bool:
    """Stop what ``up`` started: the Serve app, Ray (if ours), the embedded store. True if a farm was up."""
    from farm.storage.connect import running_embedded

    runtime = FarmRuntime.load(settings.state_dir)
    if runtime is not None:
        if runtime.started_ray:
            # Serve's graceful shutdown lets the dispatcher requeue its running jobs first.
            _serve_shutdown(runtime)
            if runtime.ray_temp_dir:
                _stop_ray_processes(runtime.ray_temp_dir, grace_s)
            else:
                log.warning("farm.json names no Ray temp dir; stop that Ray cluster by hand (`ray stop`)")
        else:
            _serve_shutdown(runtime, delete_only=True)
        (settings.state_dir / RUNTIME_FILE).unlink(missing_ok=True)
    server = running_embedded(settings) if settings.storage.mode == "embedded" else None
    if server is not None:
        server.stop()
    return runtime is not None or server is not None


def ray_temp_dir_for(settings: FarmSettings) -> str:
    """A short per-farm Ray temp dir (Unix socket paths cap at ~107 bytes), stable for a state folder."""
    digest = hashlib.sha256(str(settings.state_dir).encode()).hexdigest()[:10]
    return f"/tmp/videofarm-ray-{digest}"


def _stop_ray_processes(temp_dir: str, grace_s: float) -> None:
    """Stop only this farm's Ray: its daemons name ``temp_dir`` on their command lines; workers are their children.

    ``ray stop`` would end every Ray cluster on the machine, other farms' included.
    """
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    victims = {p.pid: p for p in roots}
    for root in roots:
        try:
            victims.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    for proc in victims.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _serve_shutdown(runtime: FarmRuntime, delete_only: bool = False) -> None:
    import ray
    from ray import serve

    try:
        ray.init(address=runtime.ray_address, namespace="videofarm", log_to_driver=False)
        # Drain first: running jobs go back to the queue at once, with their checkpoints.
        dispatcher = serve.get_deployment_handle("DispatcherDeployment", app_name=runtime.app_name)
        dispatcher.drain.remote().result(timeout_s=60)
        if delete_only:
            serve.delete(runtime.app_name)
        else:
            serve.shutdown()
    except Exception as exc:  # a dead cluster must not stop `down` from cleaning the rest
        log.warning("serve shutdown: %s", exc)
    finally:
        ray.shutdown()


def status(settings: FarmSettings) -> dict:
    """Pools, replicas, queue depths and recent jobs of the running farm."""
    import ray
    from ray import serve

    runtime = FarmRuntime.load(settings.state_dir)
    if runtime is None:
        raise FarmError(f"no farm is up for {settings.state_dir}; start one with `farm up`")
    ray.init(address=runtime.ray_address, namespace="videofarm", log_to_driver=False)
    try:
        app = serve.status().applications.get(runtime.app_name)
        deployments = {}
        if app is not None:
            for name, dep in app.deployments.items():
                deployments[name] = {"status": str(dep.status.value), "replicas": dict(dep.replica_states)}
        dispatcher = serve.get_deployment_handle("DispatcherDeployment", app_name=runtime.app_name)
        farm = dispatcher.status.remote().result(timeout_s=30)
    finally:
        ray.shutdown()
    return {
        "http": runtime.http_url,
        "metrics": runtime.metrics_url,
        "app": runtime.app_name,
        "app_status": str(app.status.value) if app is not None else "missing",
        "deployments": deployments,
        "dispatcher": farm,
    }


def default_deployment_file() -> Path:
    """``deployments/local.yaml`` in the working directory, else the copy beside the package's source."""
    here = Path("deployments/local.yaml")
    if here.is_file():
        return here
    return Path(__file__).resolve().parent.parent / "deployments" / "local.yaml"


__all__ = ["FarmError", "FarmRuntime", "down", "read_deployment", "status", "up", "default_deployment_file"]
