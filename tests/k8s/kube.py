"""Helpers for the k8s/ tests: build an overlay with kubectl, validate objects strictly.

KubeRay kinds validate against the CRDs' openAPIV3Schema in ``../shared/k8s-schemas`` (the
copy of shared/ that sits beside the repository), made strict: every object schema that lists
``properties`` and allows nothing else (no ``additionalProperties``, no
``x-kubernetes-preserve-unknown-fields``) rejects unknown fields, as ``kubectl apply
--validate=strict`` would. Built-in kinds validate with ``kubernetes-validate`` (schemas shipped
in the package, offline), also strict.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
# The Kubernetes version the built-in kinds are checked against (kubectl in the image is 1.32).
KUBE_VERSION = "1.31"
CRD_FILES = {
    "RayService": "ray.io_rayservices.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Invalid(AssertionError):
    """An object failed validation; the message lists every error with its path."""


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        raise AssertionError("kubectl is not on PATH: the k8s tests build overlays with `kubectl kustomize`")
    return found


@functools.cache
def build(overlay: str) -> tuple[dict, ...]:
    """``kubectl kustomize k8s/overlays/<overlay>``, parsed into objects."""
    done = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/overlays/{overlay} failed: {done.stderr.strip()}")
    return tuple(d for d in yaml.load_all(done.stdout, Loader=_Loader) if d)


def objects(overlay: str, kind: str | None = None) -> list[dict]:
    return [o for o in build(overlay) if kind is None or o["kind"] == kind]


def one(overlay: str, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects(overlay, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def load_script(name: str, path: Path):
    """Import a script that is not in a package (scripts/k8s-serve-config.py, k8s/base/jobs/…)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def serve_config_script():
    return load_script("k8s_serve_config", ROOT / "scripts" / "k8s-serve-config.py")


def submit_jsonl():
    return load_script("submit_jsonl", K8S / "base" / "jobs" / "submit_jsonl.py")


# Strict CRD schemas ---------------------------------------------------------------------
def schema_dir() -> Path:
    if not SCHEMAS.is_dir():
        raise AssertionError(f"KubeRay CRD schemas not found at {SCHEMAS} (shared/k8s-schemas beside the repo)")
    return SCHEMAS


def strict(schema: Any) -> Any:
    """A copy of an openAPIV3Schema in which closed objects reject unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = strict(value)
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd(kind: str) -> dict:
    """The CRD document for a KubeRay kind."""
    path = schema_dir() / CRD_FILES[kind]
    if not path.is_file():
        raise AssertionError(f"missing CRD schema {path}")
    return yaml.load(path.read_text(), Loader=_Loader)


@functools.cache
def crd_validator(kind: str, version: str = "v1"):
    import jsonschema

    doc = crd(kind)
    versions = {v["name"]: v for v in doc["spec"]["versions"]}
    if version not in versions:
        raise Invalid(f"{kind}: the CRD serves no version {version}; it has {sorted(versions)}")
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _errors(validator, obj: Any) -> list[str]:
    out = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in error.absolute_path) or "(root)"
        out.append(f"{where}: {error.message}")
    return out


def validate_kuberay(obj: dict) -> None:
    """Raise Invalid unless ``obj`` (RayService, RayJob, RayCronJob, RayCluster) fits its CRD strictly."""
    group, _, version = obj.get("apiVersion", "").partition("/")
    if group != "ray.io":
        raise Invalid(f"{obj.get('kind')}: apiVersion {obj.get('apiVersion')!r} is not ray.io/*")
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        raise Invalid(f"unknown KubeRay kind {kind!r}")
    errors = _errors(crd_validator(kind, version), obj)
    if errors:
        raise Invalid(f"{kind}/{obj.get('metadata', {}).get('name')}: " + "; ".join(errors))


@functools.cache
def raycluster_spec_validator():
    """The strict schema of a RayCluster's spec, for the cluster specs embedded in other kinds."""
    import jsonschema

    versions = {v["name"]: v for v in crd("RayCluster")["spec"]["versions"]}
    return jsonschema.Draft7Validator(strict(versions["v1"]["schema"]["openAPIV3Schema"]["properties"]["spec"]))


def validate_raycluster_spec(spec: dict, what: str) -> None:
    errors = _errors(raycluster_spec_validator(), spec)
    if errors:
        raise Invalid(f"{what}: " + "; ".join(errors))


# Built-in kinds -------------------------------------------------------------------------
def validate_builtin(obj: dict) -> None:
    """Strict validation of a built-in kind with kubernetes-validate (offline)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(root)"
        raise Invalid(f"{obj['kind']}/{obj['metadata'].get('name')}: {where}: {exc.message}") from None


def validate_pod_template(template: dict, what: str) -> None:
    """A pod template embedded in a KubeRay object, checked as a core/v1 PodTemplate strictly."""
    validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": what.replace("/", "-")},
                      "template": copy.deepcopy(template)})


# Pod templates of KubeRay objects -------------------------------------------------------
def cluster_specs(obj: dict) -> list[tuple[str, dict]]:
    """(label, RayCluster spec) of every cluster a KubeRay object describes."""
    spec = obj["spec"]
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] == "RayService":
        return [(name, spec["rayClusterConfig"])]
    if obj["kind"] == "RayJob":
        return [(name, spec["rayClusterSpec"])] if "rayClusterSpec" in spec else []
    if obj["kind"] == "RayCronJob":
        job = spec["jobTemplate"]
        return [(name, job["rayClusterSpec"])] if "rayClusterSpec" in job else []
    if obj["kind"] == "RayCluster":
        return [(name, spec)]
    return []


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(label, pod template) of the head and every worker group of a KubeRay object."""
    out = []
    for name, cluster in cluster_specs(obj):
        out.append((f"{name}/head", cluster["headGroupSpec"]["template"]))
        for group in cluster.get("workerGroupSpecs") or []:
            out.append((f"{name}/{group['groupName']}", group["template"]))
    return out
