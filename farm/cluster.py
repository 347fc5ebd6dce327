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
import json
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
from farm.builders import FarmAppArgs, merge_settings, resolve_settings
from farm.config import FarmSettings
from farm.runtime import RUNTIME_FILE, SERVE_CONFIG_FILE, FarmRuntime, healthy

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
    config: object  # the whole file as Serve's ServeDeploySchema: what `up` deploys


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
        config=schema,
    )


def _jsonable(value):
    """Settings as plain JSON values, secrets revealed (a JSON dump would mask them as '**********')."""
    from pydantic import SecretStr

    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def app_args(app: ServeApp, settings: FarmSettings) -> FarmAppArgs:
    """The app's ``args`` as deployed: with no settings file named, the farm's own settings
    (state folder, models: what `farm up` was given) lie under the file's inline settings."""
    if app.args.config is not None:
        return app.args
    return app.args.model_copy(update={"settings": merge_settings(_jsonable(settings.model_dump()), app.args.settings)})


def serve_config(app: ServeApp, args: FarmAppArgs, port: int) -> dict:
    """The deployment file as Serve will apply it: every field as written (proxy location,
    per-deployment options, runtime_env, …), ``args`` as the app's args, ``port`` as the HTTP port."""
    config = app.config.model_dump(mode="json", exclude_unset=True)
    config.setdefault("http_options", {})["port"] = port
    config["applications"][0]["args"] = _jsonable(args.model_dump())
    return config


def _checked_args(app: ServeApp, settings: FarmSettings, deployment_file: Path) -> tuple[FarmAppArgs, FarmSettings]:
    """The app's args as deployed and the settings the app will run with (`up` prepares the same
    storage, store and models); refuses settings that `farm up` itself reads before the file."""
    args = app_args(app, settings)
    deployed = resolve_settings(args)
    if deployed.cluster != settings.cluster:
        raise FarmError(f"{deployment_file}: cluster.node_address is a setting of `farm up` itself, read before the "
                        "deployment file; set it in the settings file (FARM_CONFIG) or with --node-address")
    if deployed.state_dir != settings.state_dir:
        raise FarmError(f"{deployment_file}: state_dir {str(deployed.state_dir)!r} differs from this farm's "
                        f"{str(settings.state_dir)!r}, where `farm down` and `farm status` look; set FARM_HOME to it")
    return args, deployed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _ensure_models(settings: FarmSettings) -> None:
    from farm.render.tiny import build_tiny_by_id, is_built, is_tiny_id

    for spec in settings.models:
        path = Path(spec.path)
        if is_built(path) or not path.is_absolute() or not is_tiny_id(spec.id):
            continue
        log.info("building tiny model %s at %s", spec.id, path)
        build_tiny_by_id(spec.id, path)


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

    from farm.accounts.admin import resolve_admin_key
    from farm.finish.provenance import ensure_dev_credentials
    from farm.secrets import SharedSecrets
    from farm.jobs.store import JobStore
    from farm.storage.connect import open_store

    app = read_deployment(deployment_file)
    port = port or app.port
    args, settings = _checked_args(app, settings, deployment_file)
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
    # One admin key and one set of dev signing credentials for every node, from the database;
    # this node's copies written to match (the `farm` CLI and `farm verify` read them here).
    shared = SharedSecrets(settings.job_store_url())
    configured = settings.auth.admin_key.get_secret_value() if settings.auth.admin_key else None
    resolve_admin_key(settings.state_dir, configured, shared)
    if not settings.signer.has_credentials:
        ensure_dev_credentials(settings.state_dir / "c2pa", shared)
    shared.db.close()
    if settings.serve.shared_limits and settings.serve.redis_url is None:
        from farm.redis_server import EmbeddedRedis

        EmbeddedRedis(settings.redis_dir).start()  # the gateways' shared rate limits

    # 2. Ray: start a head node here, or join the given cluster.
    started_ray = address is None
    metrics_url = ray_temp_dir = None
    if started_ray:
        node = settings.cluster
        ray_port, metrics_port = _free_port(), metrics_port or _free_port()
        ray_temp_dir = ray_temp_dir_for(settings)
        cmd = [_ray_bin(), "start", "--head", f"--port={ray_port}", f"--metrics-export-port={metrics_port}",
               f"--ray-client-server-port={_free_port()}", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={ray_temp_dir}"]
        if not node.loopback:
            cmd.append(f"--node-ip-address={node.node_address}")  # Ray maps a loopback address to the routable one
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                                  env=env.ray_head_env(ray_temp_dir, loopback=node.loopback))
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0:
            # A head that timed out starting leaves its GCS and agents running, and no farm.json
            # names them: stop what carries this farm's Ray mark before giving up.
            _stop_ray_processes(ray_temp_dir, 5)
            why = "timed out after 180s" if done is None else done.stderr.strip()[-800:]
            raise FarmError(f"`ray start` failed: {why}")
        address = f"{node.node_address}:{ray_port}"
        metrics_url = f"http://{node.node_address}:{metrics_port}/metrics"

    # 3. The Serve application: the deployment file, applied whole by Serve's controller.
    config = serve_config(app, args, port)
    (settings.state_dir / SERVE_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    runtime = FarmRuntime(app.name, address, started_ray, f"http://{app.host}:{port}", metrics_url,
                          str(deployment_file), ray_temp_dir)
    runtime.save(settings.state_dir)
    try:
        ray.init(address=address, namespace="videofarm", log_to_driver=False)
        deploy(config)
        _wait_running(app.name, runtime.http_url, timeout_s, fixed_resources=started_ray)
    except BaseException:
        ray.shutdown()
        down(settings)
        raise
    ray.shutdown()  # the application lives on in the cluster; this driver leaves
    return runtime


def redeploy(settings: FarmSettings, deployment_file: Path, *, timeout_s: float = 300.0) -> FarmRuntime:
    """Apply ``deployment_file`` to the running farm: Serve updates in place what changed (a rolling
    update), the rest keeps running. The HTTP port stays the running farm's."""
    import ray

    runtime = FarmRuntime.load(settings.state_dir)
    if runtime is None or not healthy(runtime.http_url):
        raise FarmError(f"no farm is up for {settings.state_dir}; start one with `farm up`")
    app = read_deployment(deployment_file)
    if app.name != runtime.app_name:
        raise FarmError(f"{deployment_file}: application {app.name!r} is not the running farm's {runtime.app_name!r}")
    args, settings = _checked_args(app, settings, deployment_file)
    config = serve_config(app, args, int(runtime.http_url.rsplit(":", 1)[1]))
    (settings.state_dir / SERVE_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    ray.init(address=runtime.ray_address, namespace="videofarm", log_to_driver=False)
    try:
        deploy(config)
        time.sleep(1.0)  # the controller marks the app DEPLOYING once it takes the new config
        _wait_running(app.name, runtime.http_url, timeout_s, fixed_resources=runtime.started_ray)
    finally:
        ray.shutdown()
    return FarmRuntime(runtime.app_name, runtime.ray_address, runtime.started_ray, runtime.http_url,
                       runtime.metrics_url, str(deployment_file), runtime.ray_temp_dir)


def deploy(config: dict) -> None:
    """Apply a Serve config (a ``ServeDeploySchema`` mapping) the way ``serve run CONFIG`` does:
    start Serve with the file's proxy, HTTP, gRPC and controller options, then hand the whole
    config to the controller, which builds each app from its import path and applies the
    per-deployment overrides and runtime_env. A changed config redeploys in place (Serve's
    rolling update). Needs a connected Ray driver."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
        controller_options=schema.controller_options,
    )
    client.deploy_apps(schema, _blocking=False)


def _wait_running(app_name: str, http_url: str, timeout_s: float, *, fixed_resources: bool = False) -> None:
    """Until the app is RUNNING and its gateway answers; a failed deploy raises with Serve's reason.
    ``fixed_resources``: the farm's own one-node Ray, which no autoscaler grows, so a replica that
    does not fit (the reservations add up to more than the node has) never will: that fails as
    soon as Serve reports it (its slow-scheduling message, after 30 s), naming what it needs."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise FarmError(f"the Serve app {app_name!r} failed to deploy: {_one_line(app.message)}")
        if app is not None and app.status.value == "RUNNING":
            break
        unplaced = [d.message for d in (app.deployments.values() if app else ()) if _cannot_place(d.message)]
        if fixed_resources and unplaced:
            raise FarmError(f"the Serve app {app_name!r} cannot start on this node: {_one_line(unplaced[0])} "
                            "Lower the replicas or their num_cpus/num_gpus in the deployment file.")
        time.sleep(0.5)
    else:
        app = serve.status().applications.get(app_name)
        waiting = {n: d.message or d.status.value for n, d in (app.deployments.items() if app else ())
                   if d.status.value != "HEALTHY"}
        raise FarmError(f"the Serve app {app_name!r} is not running after {timeout_s:.0f}s; not ready: "
                        + ("; ".join(f"{n}: {_one_line(m)}" for n, m in waiting.items()) or "no deployment yet"))
    _waithealthy(http_url, max(5.0, deadline - time.monotonic()))


def _cannot_place(message: str) -> bool:
    """Whether Serve's slow-scheduling message says a replica needs more of a resource than the
    node has left. The same message comes for a replica that fits and merely waits for its worker
    process to start (seconds on a loaded machine): that one is not refused."""
    import re

    found = re.search(r"required for each replica: (\{.*?\}), total resources available: (\{.*?\})", message)
    if "to be scheduled" not in message or found is None:
        return False
    try:
        required, available = (json.loads(part) for part in found.groups())
        return any(float(need) > float(available.get(name, 0.0)) + 1e-9 for name, need in required.items())
    except (ValueError, TypeError, AttributeError):
        return False


def _one_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no reason given"


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
    """Stop what ``up`` started: the Serve app, Ray (if ours), the embedded store and Redis. True if a
    farm was up."""
    from farm.storage.connect import running_embedded

    runtime = FarmRuntime.load(settings.state_dir)
    if runtime is not None:
        if runtime.started_ray:
            # Serve's graceful shutdown lets the dispatcher requeue its running jobs first.
            _serve_shutdown(runtime, drain_timeout_s=settings.render.drain_s + 60)
            if runtime.ray_temp_dir:
                _stop_ray_processes(runtime.ray_temp_dir, grace_s)
            else:
                log.warning("farm.json names no Ray temp dir; stop that Ray cluster by hand (`ray stop`)")
        else:
            _serve_shutdown(runtime, delete_only=True, drain_timeout_s=settings.render.drain_s + 60)
        (settings.state_dir / RUNTIME_FILE).unlink(missing_ok=True)
    server = running_embedded(settings) if settings.storage.mode == "embedded" else None
    if server is not None:
        server.stop()
    from farm.redis_server import EmbeddedRedis

    redis = EmbeddedRedis(settings.redis_dir).stop()
    return runtime is not None or server is not None or redis


def ray_temp_dir_for(settings: FarmSettings) -> str:
    """A short per-farm Ray temp dir (Unix socket paths cap at ~107 bytes), stable for a state folder."""
    digest = hashlib.sha256(str(settings.state_dir).encode()).hexdigest()[:10]
    return f"/tmp/videofarm-ray-{digest}"


def farm_ray_processes(temp_dir: str) -> list:
    """Every live process of the Ray that ``up`` started with ``temp_dir``: those whose environment
    carries its mark (:func:`farm.env.ray_head_env`: daemons, agents, the client server, workers,
    whatever they call themselves), those naming ``temp_dir`` on their command line, and all
    their descendants."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            ours = env.process_ray_mark(proc.environ()) == temp_dir or any(
                temp_dir in part for part in proc.info["cmdline"] or [])
            if ours:
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def _stop_ray_processes(temp_dir: str, grace_s: float) -> None:
    """Stop only this farm's Ray (``ray stop`` would end every Ray cluster on the machine).

    The GCS goes last: sent SIGTERM beside its raylet and monitor, it (and the monitor) linger
    for the whole grace period; after them it exits in about a second."""
    import psutil

    def is_gcs(proc) -> bool:
        try:
            return Path((proc.cmdline() or [""])[0]).name == "gcs_server"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def send(procs: list, action: str) -> None:
        for proc in procs:
            try:
                getattr(proc, action)()
            except psutil.NoSuchProcess:
                pass

    victims = farm_ray_processes(temp_dir)
    gcs = [p for p in victims if is_gcs(p)]
    for group in ([p for p in victims if p not in gcs], gcs):
        send(group, "terminate")
        _, alive = psutil.wait_procs(group, timeout=grace_s)
        send(alive, "kill")
        psutil.wait_procs(alive, timeout=10)
    left = farm_ray_processes(temp_dir)  # any started while we stopped the rest (a worker a dying raylet spawned)
    send(left, "kill")
    psutil.wait_procs(left, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _reachable(address: str, timeout_s: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _serve_shutdown(runtime: FarmRuntime, delete_only: bool = False, drain_timeout_s: float = 120.0) -> None:
    import ray
    from ray import serve

    if not _reachable(runtime.ray_address):  # ray.init would wait for a dead GCS for minutes
        log.warning("Ray at %s does not answer; skipping the Serve shutdown", runtime.ray_address)
        return
    try:
        ray.init(address=runtime.ray_address, namespace="videofarm", log_to_driver=False)
        # Drain first: running jobs go back to the queue at their next shard boundary, checkpointed.
        dispatcher = serve.get_deployment_handle("DispatcherDeployment", app_name=runtime.app_name)
        dispatcher.drain.remote().result(timeout_s=drain_timeout_s)
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


__all__ = ["FarmError", "FarmRuntime", "down", "read_deployment", "redeploy", "status", "up", "default_deployment_file"]
