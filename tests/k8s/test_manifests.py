"""The KubeRay manifests in k8s/: they build, validate strictly, and say what the farm runs.

Both overlays are built with ``kubectl kustomize``; every KubeRay object is checked against the
KubeRay CRDs in ../shared/k8s-schemas with unknown fields rejected; built-in kinds with
kubernetes-validate (strict); the RayService's serveConfigV2 is the farm's own Serve config
(deployments/gpu.yaml for prod), checked with Serve's schema and the farm's typed args.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.k8s import kube
from tests.k8s.kube import OVERLAYS, ROOT, Invalid

KUBERAY = {"RayService", "RayJob", "RayCronJob", "RayCluster"}
MONITORING = {"PodMonitor", "PrometheusRule"}
NAMESPACE = "videofarm"
SCRIPT_DIR = "/opt/videofarm/jobs"

# Every Secret a farm pod reads, as (variable, secret, key): the variables are ones the code
# (farm/env.py) or the library under it reads — see NOT_FARM_VARIABLES.
FARM_SECRETS = {
    "FARM_ADMIN_KEY": ("videofarm-admin", "admin-key"),
    "AWS_ACCESS_KEY_ID": ("videofarm-s3", "access-key-id"),
    "AWS_SECRET_ACCESS_KEY": ("videofarm-s3", "secret-access-key"),
    "PGPASSWORD": ("videofarm-postgres", "password"),
}
# Variables the manifests set that farm/env.py does not read, and who reads them.
NOT_FARM_VARIABLES = {
    "AWS_ACCESS_KEY_ID": "boto3's credential chain",
    "AWS_SECRET_ACCESS_KEY": "boto3's credential chain",
    "PGPASSWORD": "libpq, under psycopg",
    "HF_HOME": "huggingface_hub's cache folder",
    "HF_TOKEN": "huggingface_hub's token",
    "HF_HUB_OFFLINE": "huggingface_hub's offline switch",
    "POSTGRES_USER": "the postgres image (dev)",
    "POSTGRES_DB": "the postgres image (dev)",
    "POSTGRES_PASSWORD": "the postgres image (dev)",
    "PGDATA": "the postgres image (dev)",
}


serve_config_script = kube.serve_config_script()
submit_jsonl = kube.submit_jsonl()
monitoring_script = kube.load_script("k8s_monitoring", ROOT / "scripts" / "k8s-monitoring.py")


def _unhash(name: str) -> str:
    """A generated name without kustomize's content-hash suffix."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def _rayservice(overlay: str) -> dict:
    return kube.one(overlay, "RayService", "videofarm")


def _serve_config(overlay: str) -> dict:
    return yaml.safe_load(_rayservice(overlay)["spec"]["serveConfigV2"])


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def _env(container: dict) -> dict[str, tuple]:
    out = {}
    for item in container.get("env") or []:
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        out[item["name"]] = ("secret", _unhash(ref["name"]), ref["key"]) if ref else ("value", item.get("value"))
    return out


def _quantity(text) -> float:
    text = str(text)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


# Build --------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_into_the_farm_namespace(overlay):
    objs = kube.build(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "RayService", "RayJob", "RayCronJob", "ConfigMap", "Service"} <= kinds
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
    assert (MONITORING <= kinds) == (overlay == "prod"), "monitoring is in prod; dev leaves it out (no CRDs on kind)"


def test_schemas_are_found_beside_the_repository():
    assert kube.SCHEMAS == ROOT.parent / "shared" / "k8s-schemas"
    for name in kube.CRD_FILES.values():
        assert (kube.schema_dir() / name).is_file(), f"missing {kube.SCHEMAS / name}"


# Strict validation --------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_objects_validate_strictly_against_the_crds(overlay):
    found = [o for o in kube.build(overlay) if o["kind"] in KUBERAY]
    assert {o["kind"] for o in found} == {"RayService", "RayJob", "RayCronJob"}
    for obj in found:
        kube.validate_kuberay(obj)
        for label, cluster in kube.cluster_specs(obj):
            kube.validate_raycluster_spec(cluster, f"{label} as a RayCluster spec")
        for label, template in kube.pod_templates(obj):
            kube.validate_pod_template(template, label)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_strictly(overlay):
    builtin = [o for o in kube.build(overlay) if o["kind"] not in KUBERAY | MONITORING]
    assert builtin
    for obj in builtin:
        kube.validate_builtin(obj)


def _head(obj):
    return obj["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _admin_ref(obj):
    return next(e for e in _head(obj)["env"] if e["name"] == "FARM_ADMIN_KEY")["valueFrom"]["secretKeyRef"]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda o: o["spec"].__setitem__("serveConfigV3", "x"), "serveConfigV3"),
        (lambda o: o["spec"]["rayClusterConfig"].__setitem__("enableInTreeAutoscalling", True),
         "enableInTreeAutoscalling"),
        (lambda o: _head(o).__setitem__("imagePullPolcy", "Always"), "imagePullPolcy"),
        (lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("minReplica", 1), "minReplica"),
        (lambda o: _admin_ref(o).__setitem__("nmae", "x"), "nmae"),
        (lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "4"), "'4'"),
    ],
    ids=["spec", "clusterConfig", "container", "workerGroup", "secretKeyRef", "wrong-type"],
)
def test_the_strict_validator_rejects_unknown_fields(mutate, needle):
    obj = copy.deepcopy(_rayservice("prod"))
    kube.validate_kuberay(obj)  # the unchanged object passes
    mutate(obj)
    with pytest.raises(Invalid, match=re.escape(needle)):
        kube.validate_kuberay(obj)


def test_the_strict_validator_keeps_open_maps_open():
    obj = copy.deepcopy(_rayservice("prod"))
    obj["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["any-ray-flag"] = "1"
    obj["metadata"]["labels"]["example.com/anything"] = "ok"
    kube.validate_kuberay(obj)


def test_builtin_and_pod_template_validation_reject_unknown_fields():
    deployment = copy.deepcopy(kube.one("dev", "Deployment", "postgres"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(Invalid, match="imagePullPolcy"):
        kube.validate_builtin(deployment)
    template = copy.deepcopy(_rayservice("dev")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])
    template["spec"]["volumes"][0]["emptyDri"] = {}
    with pytest.raises(Invalid, match="emptyDri"):
        kube.validate_pod_template(template, "mutated")


# serveConfigV2 ------------------------------------------------------------------------
def test_serve_config_patches_are_current():
    assert serve_config_script.stale() == [], "run: .venv/bin/python scripts/k8s-serve-config.py"


def test_prod_serve_config_is_deployments_gpu_yaml():
    assert _serve_config("prod") == yaml.safe_load((ROOT / "deployments" / "gpu.yaml").read_text())


def _flatten(data, prefix=()):
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out |= _flatten(value, (*prefix, key))
        return out
    return {prefix: data}


def test_dev_serve_config_is_local_yaml_changed_only_where_the_overrides_say():
    dev = _serve_config("dev")
    assert dev == serve_config_script.serve_config(serve_config_script.TARGETS["dev"])
    local = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    assert dev["applications"][0]["args"]["settings"]["serve"] == local["applications"][0]["args"]["settings"]["serve"]
    before = _flatten({**local, "applications": local["applications"][0]})
    after = _flatten({**dev, "applications": dev["applications"][0]})
    changed = sorted(".".join(map(str, k)) for k in set(before) | set(after) if before.get(k) != after.get(k))
    settings = "applications.args.settings"
    assert changed == ["applications.args.settings.database_url", f"{settings}.storage.bucket",
                       f"{settings}.storage.mode", f"{settings}.storage.s3.endpoint_url",
                       f"{settings}.storage.s3.region", "http_options.host"]


def test_the_generator_refuses_overrides_it_cannot_apply(tmp_path):
    (tmp_path / "deployments").mkdir()
    (tmp_path / "deployments" / "local.yaml").write_text((ROOT / "deployments" / "local.yaml").read_text())
    bad = tmp_path / "over.yaml"
    target = serve_config_script.Target("x", "deployments/local.yaml", "over.yaml", "out.yaml")
    bad.write_text("serve_config: {applications: []}\n")
    with pytest.raises(ValueError, match="must not replace 'applications'"):
        serve_config_script.serve_config(target, tmp_path)
    bad.write_text("setings: {}\n")
    with pytest.raises(ValueError, match="setings"):
        serve_config_script.serve_config(target, tmp_path)


def _settings_file(overlay: str, tmp_path: Path) -> Path | None:
    """The FARM_CONFIG file the overlay's pods read, written out as the pods would see it."""
    env = _env(_rayservice(overlay)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    if "FARM_CONFIG" not in env:
        return None
    mounted = Path(env["FARM_CONFIG"][1])
    cm = next(c for c in kube.objects(overlay, "ConfigMap") if _unhash(c["metadata"]["name"]) == "videofarm-settings")
    path = tmp_path / mounted.name
    path.write_text(cm["data"][mounted.name])
    return path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_validates_with_serve_schema_and_the_farm_args(overlay, tmp_path, monkeypatch):
    from farm.builders import build_app, resolve_settings
    from farm.cluster import read_deployment

    path = tmp_path / "serve.yaml"
    path.write_text(_rayservice(overlay)["spec"]["serveConfigV2"])
    app = read_deployment(path)  # Serve's ServeDeploySchema, then FarmAppArgs
    assert (app.host, app.port) == ("0.0.0.0", 8000), "the proxy must listen on the pod address"
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    settings_file = _settings_file(overlay, tmp_path)
    if settings_file:
        monkeypatch.setenv("FARM_CONFIG", str(settings_file))
    else:
        monkeypatch.delenv("FARM_CONFIG", raising=False)
    settings = resolve_settings(app.args)
    assert settings.storage.mode == "external" and settings.database_url.startswith("postgresql+psycopg://")
    assert "Gateway" in _deployments(build_app(app.args))
    if overlay == "prod":
        assert str(settings.state_dir) == "/var/lib/videofarm"
        assert settings.signer.has_credentials, "prod signs with the operator's certificate, not dev credentials"
    else:
        assert [m.id for m in settings.models] == ["wan-tiny", "wan-tiny-2x", "wan-tiny-i2v", "ltx2-tiny"]
        assert all(m.path.startswith(str(tmp_path / "home" / "models")) for m in settings.models)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_in_the_serve_config(overlay):
    import sqlalchemy as sa

    settings = _serve_config(overlay)["applications"][0]["args"]["settings"]
    s3 = settings["storage"]["s3"]
    assert "access_key_id" not in s3 and "secret_access_key" not in s3
    assert "admin_key" not in (settings.get("auth") or {})
    assert sa.make_url(settings["database_url"]).password is None
    assert "signer" not in settings


# Environment and Secrets --------------------------------------------------------------
def _farm_variables() -> set[str]:
    source = (ROOT / "farm" / "env.py").read_text()
    return set(re.findall(r"os\.environ\.get\(\"([A-Z0-9_]+)\"", source))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_set_is_one_the_code_reads(overlay):
    farm_reads = _farm_variables()
    assert {"FARM_HOME", "FARM_CONFIG", "FARM_ADMIN_KEY", "VIDEOFARM_API_KEY", "FARM_TORCH_THREADS"} <= farm_reads
    for obj in kube.build(overlay):
        templates = kube.pod_templates(obj) if obj["kind"] in KUBERAY else (
            [(obj["metadata"]["name"], obj["spec"]["template"])] if obj["kind"] == "Deployment" else [])
        for label, template in templates:
            for container in _containers(template):
                for name in _env(container):
                    assert name in farm_reads or name in NOT_FARM_VARIABLES, (
                        f"{label}/{container['name']} sets {name}, which nothing in the farm reads")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_farm_pod_gets_the_same_environment_and_mounts(overlay):
    templates = kube.pod_templates(_rayservice(overlay))
    assert len(templates) == (4 if overlay == "prod" else 2)
    envs, mounts = {}, {}
    for label, template in templates:
        container = template["spec"]["containers"][0]
        env = _env(container)
        for variable, (secret, key) in FARM_SECRETS.items():
            assert env.get(variable) == ("secret", secret, key), f"{label}: {variable}"
        assert env["FARM_HOME"] == ("value", "/var/lib/videofarm")
        envs[label] = env
        volumes = {v["name"]: {k: v[k] for k in v if k != "name"} for v in template["spec"]["volumes"]}
        mounts[label] = {m["mountPath"]: _unhash(str(volumes[m["name"]].get("configMap", volumes[m["name"]].get(
            "secret", {"emptyDir": True})))) for m in container["volumeMounts"]}
    first = next(iter(envs))
    for label in envs:
        assert envs[label] == envs[first], f"{label} and {first} differ in environment"
        assert set(mounts[label]) == set(mounts[first]), f"{label} and {first} differ in mounts"


def test_prod_creates_no_secrets_and_dev_only_dev_ones():
    assert kube.objects("prod", "Secret") == [], "prod Secrets are the operator's (k8s/README.md)"
    dev = {_unhash(s["metadata"]["name"]): s for s in kube.objects("dev", "Secret")}
    assert set(dev) == {"videofarm-admin", "videofarm-s3", "videofarm-postgres", "seaweedfs-s3-config"}


def _secret_data(secret: dict) -> dict[str, str]:
    import base64

    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def test_dev_secret_references_resolve():
    secrets = {_unhash(s["metadata"]["name"]): _secret_data(s) for s in kube.objects("dev", "Secret")}
    for obj in kube.build("dev"):
        templates = kube.pod_templates(obj) if obj["kind"] in KUBERAY else (
            [(obj["metadata"]["name"], obj["spec"]["template"])] if obj["kind"] == "Deployment" else [])
        for label, template in templates:
            for container in _containers(template):
                for name, ref in _env(container).items():
                    if ref[0] == "secret" and ref[1] != "videofarm-batch":  # the batch key comes after redeem
                        assert ref[2] in secrets[ref[1]], f"{label}: {name} names {ref[1]}/{ref[2]}"
    assert len(secrets["videofarm-admin"]["admin-key"]) >= 24, "the gateway refuses shorter admin keys"
    identity = yaml.safe_load(secrets["seaweedfs-s3-config"]["s3.json"])["identities"][0]["credentials"][0]
    assert (identity["accessKey"], identity["secretKey"]) == (
        secrets["videofarm-s3"]["access-key-id"], secrets["videofarm-s3"]["secret-access-key"])


def test_prod_signer_files_are_mounted_where_the_settings_file_says(tmp_path):
    settings = yaml.safe_load(_settings_file("prod", tmp_path).read_text())
    signer = settings["signer"]
    for label, template in kube.pod_templates(_rayservice("prod")):
        container = template["spec"]["containers"][0]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        for path in (signer["cert_chain_path"], signer["key_path"]):
            folder, key = str(Path(path).parent), Path(path).name
            assert mounted[folder]["secret"]["secretName"] == "videofarm-c2pa", f"{label}: {path}"
            assert "items" not in mounted[folder]["secret"], f"{label}: every key of the Secret is a file ({key})"


def test_dev_builds_the_tiny_models_where_local_yaml_finds_them():
    from farm.config import embedded_models

    for label, template in kube.pod_templates(_rayservice("dev")):
        if label.endswith("/head"):
            continue  # the head runs no replica (num-cpus 0)
        init = {c["name"]: c for c in template["spec"].get("initContainers") or []}["tiny-models"]
        script = " ".join(init["args"])
        home = _env(init)["FARM_HOME"][1]
        for spec in embedded_models(Path(home)):
            out = spec.path.replace(home, "$FARM_HOME")
            assert f'--out "{out}" --experts {spec.experts}' in script, f"{label}: {spec.id}"


# Capacity -----------------------------------------------------------------------------
def _groups(overlay: str) -> list[dict]:
    return _rayservice(overlay)["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _pod_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on one pod of a worker group (KubeRay passes the container limits)."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = float(group["rayStartParams"].get("num-cpus", _quantity(limits["cpu"])))
    return cpus, float(limits.get("nvidia.com/gpu", 0))


def _deployments(app) -> dict:
    """Name → Deployment of every node of a built (not deployed) application graph, wherever the
    builder passes them (arguments, lists, tuples, dicts)."""
    found, todo = {}, [app]
    while todo:
        item = todo.pop()
        if hasattr(item, "_bound_deployment"):
            node = item._bound_deployment
            if node.name not in found:
                found[node.name] = node
                todo += list(node.init_args) + list(node.init_kwargs.values())
        elif isinstance(item, (list, tuple)):
            todo += list(item)
        elif isinstance(item, dict):
            todo += list(item.values())
    return found


def _demand(overlay: str, tmp_path: Path) -> list[tuple[str, int, float, float]]:
    """(deployment, replicas, CPUs, GPUs per replica) of the application the serve config builds."""
    from farm.builders import build_app
    from farm.cluster import read_deployment

    path = tmp_path / f"{overlay}.yaml"
    path.write_text(_rayservice(overlay)["spec"]["serveConfigV2"])
    nodes = _deployments(build_app(read_deployment(path).args))
    return [(name, node.num_replicas or 1, node.ray_actor_options.get("num_cpus", 1),
             node.ray_actor_options.get("num_gpus", 0)) for name, node in nodes.items()]


def test_prod_autoscales_gpu_worker_groups():
    config = _rayservice("prod")["spec"]["rayClusterConfig"]
    assert config["enableInTreeAutoscaling"] is True
    assert config["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in _groups("prod") if _pod_resources(g)[1] > 0]
    assert [g["groupName"] for g in gpu_groups] == ["gpu-1x", "gpu-8x"]
    for group in _groups("prod"):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        if group in gpu_groups:
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]


@pytest.fixture
def farm_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FARM_CONFIG", raising=False)
    return tmp_path


def test_prod_gpu_groups_can_hold_what_gpu_yaml_asks_for(farm_env):
    demand = _demand("prod", farm_env)
    gpus_needed = sum(r * g for _, r, _, g in demand)
    assert gpus_needed > 0  # 11 when written: 2 + 4 + 4 denoisers, 2 x 0.5 encoders
    groups = [(g, *_pod_resources(g)) for g in _groups("prod")]
    assert sum(g["maxReplicas"] * gpus for g, _, gpus in groups) >= gpus_needed
    assert sum(g["maxReplicas"] * cpus for g, cpus, _ in groups) >= sum(r * c for _, r, c, _ in demand)
    # Serve may put any GPU replica on any GPU pod: each GPU group must fit the largest one.
    for group, cpus, gpus in groups:
        if gpus:
            for name, _, c, g in demand:
                assert gpus >= g and cpus >= c, f"{name} ({c} CPU, {g} GPU) does not fit {group['groupName']}"


def test_dev_is_cpu_only_and_fits_local_yaml(farm_env):
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(kube.build("dev")))
    demand = _demand("dev", farm_env)
    assert all(g == 0 for *_, g in demand)
    capacity = sum(g["maxReplicas"] * _pod_resources(g)[0] for g in _groups("dev"))
    assert capacity >= sum(r * c for _, r, c, _ in demand)


# Batch jobs ---------------------------------------------------------------------------
def _jobs(overlay: str) -> list[tuple[dict, dict]]:
    """(object, RayJob spec) of the RayJob and the RayCronJob."""
    return [(kube.one(overlay, "RayJob"), kube.one(overlay, "RayJob")["spec"]),
            (kube.one(overlay, "RayCronJob"), kube.one(overlay, "RayCronJob")["spec"]["jobTemplate"])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_entrypoints_run_the_mounted_script_with_arguments_it_takes(overlay):
    settings = _serve_config(overlay)["applications"][0]["args"]["settings"]
    port = _serve_config(overlay)["http_options"]["port"]
    scripts = {c["metadata"]["name"]: c for c in kube.objects(overlay, "ConfigMap")
               if _unhash(c["metadata"]["name"]) == "videofarm-jobs"}
    assert len(scripts) == 1
    [(cm_name, cm)] = scripts.items()
    assert cm["data"]["submit_jsonl.py"] == (ROOT / "k8s" / "base" / "jobs" / "submit_jsonl.py").read_text()
    for obj, job in _jobs(overlay):
        argv = shlex.split(job["entrypoint"])
        assert argv[:2] == ["python", f"{SCRIPT_DIR}/submit_jsonl.py"], obj["kind"]
        args = submit_jsonl.build_parser().parse_args(argv[2:])  # exits on an argument it does not take
        url = urlsplit(args.base_url)
        assert (url.hostname, url.port, url.path) == (f"{_rayservice(overlay)['metadata']['name']}-serve-svc."
                                                     f"{NAMESPACE}.svc", port, "/v1")
        assert args.input.startswith("s3://") and args.s3_endpoint_url == settings["storage"]["s3"]["endpoint_url"]
        template = job["rayClusterSpec"]["headGroupSpec"]["template"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        container = template["spec"]["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == SCRIPT_DIR)
        assert volumes[mount["name"]]["configMap"]["name"] == cm_name
        env = _env(container)
        assert env["VIDEOFARM_API_KEY"] == ("secret", "videofarm-batch", "api-key")
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[variable] == ("secret", *FARM_SECRETS[variable])
        assert job["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_are_created_suspended_and_share_one_cluster_shape(overlay):
    (job, job_spec), (cron, cron_spec) = _jobs(overlay)
    assert job["spec"]["suspend"] is True and cron["spec"]["suspend"] is True
    assert len(cron["spec"]["schedule"].split()) == 5
    assert job_spec["rayClusterSpec"] == cron_spec["rayClusterSpec"]
    args = submit_jsonl.build_parser().parse_args(shlex.split(cron_spec["entrypoint"])[2:])
    assert "{date}" in args.batch_id, "each scheduled run is its own batch; a same-day retry replays"


# Monitoring ---------------------------------------------------------------------------
def _metric_families() -> dict[str, set[str]]:
    """Name → tag keys of every metric farm/metrics.py defines (without Ray's ray_ prefix)."""
    source = (ROOT / "farm" / "metrics.py").read_text()
    out = {}
    for block in re.split(r"@cached_property", source)[1:]:
        name = re.search(r"\"(videofarm_[a-z_]+)\"", block)
        if name:
            tags = re.search(r"tag_keys=\(([^)]*)\)", block)
            out[name.group(1)] = set(re.findall(r"\"(\w+)\"", tags.group(1))) if tags else set()
    return out


def test_podmonitor_scrapes_the_metrics_port_of_every_ray_pod():
    monitor = kube.one("prod", "PodMonitor")
    assert set(monitor["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                                    "podTargetLabels", "sampleLimit"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
    config = _rayservice("prod")["spec"]["rayClusterConfig"]
    groups = [config["headGroupSpec"], *config["workerGroupSpecs"]]
    for group in groups:
        labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}  # KubeRay adds the last
        assert selector.items() <= labels.items()
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"]


def test_rules_are_well_formed_and_use_the_farms_metric_names():
    rule = kube.one("prod", "PrometheusRule")
    families = _metric_families()
    assert "videofarm_jobs_failed_total" in families and families["videofarm_queue_depth"] == {"priority"}
    recorded = {item["record"] for group in rule["spec"]["groups"] for item in group["rules"] if "record" in item}
    alerts = set()
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for item in group["rules"]:
            expr = item["expr"]
            if "record" in item:
                assert set(item) <= {"record", "expr", "labels"}, item
                assert re.fullmatch(r"videofarm:[a-z_]+:[a-z0-9_]+", item["record"]), item["record"]
                name = item["record"]
            else:
                assert set(item) <= {"alert", "expr", "for", "labels", "annotations"}, item
                name = item["alert"]
                assert name not in alerts and re.fullmatch(r"Videofarm[A-Za-z0-9]+", name)
                alerts.add(name)
                assert re.fullmatch(r"\d+[smh]", item["for"])
                assert item["labels"]["severity"] in {"warning", "critical"}
                assert {"summary", "description", "runbook"} <= set(item["annotations"]), name
            for opening, closing in ("()", "[]", "{}"):
                assert expr.count(opening) == expr.count(closing), f"{name}: unbalanced {opening}{closing}"
            used = re.findall(r"\b(ray_videofarm_[a-z_]+)(\{[^}]*\})?", expr)
            others = [r for r in recorded if r in expr] + re.findall(r"\bray_serve_[a-z_]+", expr)
            assert used or others, f"{name} uses no farm metric, recorded series or Ray Serve metric"
            for metric, selector in used:
                family = re.sub(r"_(bucket|count|sum)$", "", metric.removeprefix("ray_"))
                assert family in families, f"{name}: {metric} is not in farm/metrics.py"
                labels = set(re.findall(r"(\w+)\s*=~?", selector)) - {"le"}
                assert labels <= families[family], f"{name}: {metric} has no label {labels - families[family]}"
    assert len(alerts) >= 4


# The promtool checks and rule unit tests of these rules are in tests/monitoring/test_rules.py.
def test_monitoring_files_are_current():
    assert monitoring_script.stale() == [], "run: .venv/bin/python scripts/k8s-monitoring.py"


def test_prometheusrule_ships_the_rules_file():
    rule = kube.one("prod", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(monitoring_script.RULES.read_text())


def test_dashboard_configmap_is_the_dashboard_file():
    [configmap] = [o for o in kube.objects("prod", "ConfigMap")
                   if _unhash(o["metadata"]["name"]) == "videofarm-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {"videofarm.json": monitoring_script.DASHBOARD.read_text()}
    assert json.loads(configmap["data"]["videofarm.json"]) == monitoring_script.dashboard()


# README -------------------------------------------------------------------------------
def test_readme_names_every_secret_and_key_the_manifests_read():
    readme = (ROOT / "k8s" / "README.md").read_text()
    wanted = set()
    for overlay in OVERLAYS:
        for obj in kube.build(overlay):
            if obj["kind"] not in KUBERAY:
                continue
            for _, template in kube.pod_templates(obj):
                for container in _containers(template):
                    wanted |= {(ref[1], ref[2]) for ref in _env(container).values() if ref[0] == "secret"}
                for volume in template["spec"].get("volumes") or []:
                    if "secret" in volume:
                        wanted.add((_unhash(volume["secret"]["secretName"]), None))
    for secret, key in sorted(wanted, key=str):
        assert f"`{secret}`" in readme, f"k8s/README.md does not name Secret {secret}"
        if key:
            assert f"`{key}`" in readme, f"k8s/README.md does not name key {key} of {secret}"
    assert "v1.7.0" in readme, "k8s/README.md names the KubeRay version of the CRDs"
