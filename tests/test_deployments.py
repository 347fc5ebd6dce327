"""The Serve config files validate with the same typed config the farm runs on."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.builders import FarmAppArgs, build_app, default_pools, resolve_settings
from farm.cluster import FarmError, read_deployment

ROOT = Path(__file__).resolve().parent.parent


def _deployments(app) -> dict:
    """Name → Deployment of every node in a built (not deployed) application graph."""
    found, todo = {}, [app._bound_deployment]
    while todo:
        node = todo.pop()
        found[node.name] = node
        todo += [a._bound_deployment for a in list(node.init_args) + list(node.init_kwargs.values())
                 if hasattr(a, "_bound_deployment")]
        for arg in node.init_args:
            if isinstance(arg, dict):  # the dispatcher's pools: pool → [(replica name, bound deployment)]
                todo += [member[1]._bound_deployment for members in arg.values() if isinstance(members, list)
                         for member in members if isinstance(member, tuple) and len(member) == 2]
    return found


def test_local_yaml_is_a_valid_serve_config_and_builds():
    app = read_deployment(ROOT / "deployments" / "local.yaml")
    assert app.import_path == "farm.builders:build_app" and (app.host, app.port) == ("127.0.0.1", 8000)
    settings = resolve_settings(app.args)
    assert [p.replicas for p in settings.serve.pools if p.model == "wan-tiny"] == [2]
    nodes = _deployments(build_app(app.args))
    assert {"Gateway", "DispatcherDeployment", "Encoder:0", "Decoder:0", "Finisher", "Notifier",
            "Denoiser:wan-tiny:transformer:0", "Denoiser:wan-tiny:transformer:1",
            "Denoiser:wan-tiny-2x:transformer:0", "Denoiser:wan-tiny-2x:transformer_2:0"} <= set(nodes)
    # One deployment per replica: the dispatcher addresses each replica itself.
    assert all(nodes[name].num_replicas == 1 for name in nodes if name.startswith(("Denoiser:", "Encoder:")))


def test_gpu_yaml_describes_one_pool_per_expert_on_gpus():
    app = read_deployment(ROOT / "deployments" / "gpu.yaml")
    settings = resolve_settings(app.args)
    assert {m.id: m.path for m in settings.models} == {
        "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "wan2.2-t2v-a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        "wan2.1-i2v-14b-480p": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        "wan2.2-i2v-a14b": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        "wan2.2-ti2v-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        "ltx-2": "Lightricks/LTX-2",
    }
    assert settings.model("wan2.2-t2v-a14b").experts == settings.model("wan2.2-i2v-a14b").experts == 2
    # What each model takes, as GET /v1/models reports it: the T2V models remix, edit and extend too.
    assert {m.id: m.input_types for m in settings.models} == {
        "wan2.1-t2v-1.3b": ("text", "video"), "wan2.2-t2v-a14b": ("text", "video"),
        "wan2.1-i2v-14b-480p": ("text", "image"), "wan2.2-i2v-a14b": ("text", "image"),
        "wan2.2-ti2v-5b": ("text", "image"), "ltx-2": ("text",)}
    assert [m.id for m in settings.models if m.audio] == ["ltx-2"]  # the only one with an audio track
    assert settings.storage.mode == "external" and settings.database_url.startswith("postgresql+psycopg://")
    pools = {(p.model, tuple(p.experts)): p for p in settings.serve.pools}
    assert set(pools) == {("wan2.1-t2v-1.3b", ("transformer",)), ("wan2.2-t2v-a14b", ("transformer",)),
                          ("wan2.2-t2v-a14b", ("transformer_2",)), ("wan2.1-i2v-14b-480p", ("transformer",)),
                          ("wan2.2-i2v-a14b", ("transformer",)), ("wan2.2-i2v-a14b", ("transformer_2",)),
                          ("wan2.2-ti2v-5b", ("transformer",)), ("ltx-2", ("transformer",))}
    assert all(p.num_gpus >= 1 for p in pools.values())
    nodes = _deployments(build_app(app.args))
    high = [node for name, node in nodes.items() if name.startswith("Denoiser:wan2.2-t2v-a14b:transformer:")]
    assert len(high) == 4 and all(n.ray_actor_options["num_gpus"] == 1 and n.num_replicas == 1 for n in high)
    assert nodes["Decoder:0"].ray_actor_options["num_gpus"] > 0  # the VAE decodes on a GPU


def test_tiers_map_to_served_models_on_pools_that_exist():
    """sora-2 / sora-2-pro in both deployments: each names a served model, and no alias adds a pool (the
    local pro tier runs on wan-tiny-2x's pools, which local.yaml deploys anyway)."""
    local = resolve_settings(read_deployment(ROOT / "deployments" / "local.yaml").args)
    gpu = resolve_settings(read_deployment(ROOT / "deployments" / "gpu.yaml").args)
    assert {a.id: a.model for a in local.model_aliases} == {"sora-2": "wan-tiny", "sora-2-pro": "wan-tiny-2x"}
    assert {a.id: a.model for a in gpu.model_aliases} == {"sora-2": "wan2.1-t2v-1.3b", "sora-2-pro": "wan2.2-t2v-a14b"}
    for settings in (local, gpu):
        pooled = {p.model for p in settings.serve.pools}
        assert all(a.model in pooled for a in settings.model_aliases)
        standard, pro = (a.limits(settings.model(a.model)) for a in settings.model_aliases)
        assert pro.default_steps > standard.default_steps  # the pro tier: more steps, larger sizes
        area = lambda spec: max(int(w) * int(h) for w, h in (s.split("x") for s in spec.sizes))  # noqa: E731
        assert area(pro) > area(standard)
    assert gpu.model("wan2.2-t2v-a14b").experts == 2  # the pro tier's own pools, one per expert


def test_aliases_belong_to_the_models_they_name():
    """Null aliases: the embedded tiers only while both tiny models are served, so replacing the models
    needs no alias setting; an explicit empty list turns them off."""
    assert [a.id for a in resolve_settings(FarmAppArgs()).model_aliases] == ["sora-2", "sora-2-pro"]
    own = [{"id": "mine", "path": "/m", "sizes": ["128x128"], "seconds": [2]}]
    assert resolve_settings(FarmAppArgs(settings={"models": own})).model_aliases == []
    assert resolve_settings(FarmAppArgs(settings={"aliases": []})).model_aliases == []


def test_default_pools_give_each_expert_its_own_pool():
    settings = resolve_settings(FarmAppArgs())
    assert [(p.model, p.experts) for p in default_pools(settings)] == [
        ("wan-tiny", ["transformer"]), ("wan-tiny-2x", ["transformer"]), ("wan-tiny-2x", ["transformer_2"]),
        ("wan-tiny-i2v", ["transformer"]), ("ltx2-tiny", ["transformer"])]


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"serve": {"pools": [{"model": "nope", "experts": ["transformer"]}]}}, "model 'nope' is not in models"),
        ({"serve": {"pools": [{"model": "wan-tiny", "experts": ["transformer_3"]}]}}, "transformer_3"),
        ({"serve": {"max_queued": 0}}, "max_queued"),
        ({"serve": {"replicas_typo": 2}}, "replicas_typo"),
        ({"aliases": [{"id": "sora-2", "model": "wan-huge"}]}, "'sora-2' maps to model 'wan-huge', which is not in models"),
        ({"aliases": [{"id": "sora-2", "model": "wan-tiny", "sizes": ["720x1280"]}]}, "not served by model 'wan-tiny'"),
        ({"aliases": [{"id": "sora-2", "model": "wan-tiny", "mapping": "stretch"}]}, "mapping"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(patch, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_settings(FarmAppArgs(settings=patch))


def test_deployment_file_must_name_the_farm_builder(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("applications:\n  - name: x\n    import_path: other.module:app\n")
    with pytest.raises(FarmError, match="import_path must be farm.builders:build_app"):
        read_deployment(path)
    with pytest.raises(FarmError, match="does not exist"):
        read_deployment(tmp_path / "missing.yaml")


def test_farm_up_deploys_every_field_of_the_file(tmp_path, monkeypatch):
    """`farm up --deployment` hands Serve the whole file: proxy, HTTP, runtime_env, per-deployment
    options as written; the app's args carry the farm's own settings (secrets in the clear)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from farm.cluster import app_args, serve_config
    from farm.config import load_settings

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    config = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    config["proxy_location"] = "EveryNode"
    config["logging_config"] = {"log_level": "DEBUG"}
    app_config = config["applications"][0]
    app_config["runtime_env"] = {"env_vars": {"MARK": "1"}}
    app_config["deployments"] = [{"name": "Gateway", "max_ongoing_requests": 7, "ray_actor_options": {"num_cpus": 0.2}}]
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(config))

    app = read_deployment(path)
    settings = load_settings()
    settings = settings.model_validate({**settings.model_dump(), "auth": {"admin_key": "sk-admin"}})
    deployed = serve_config(app, app_args(app, settings), 18080)

    ServeDeploySchema.model_validate(deployed)
    assert deployed["proxy_location"] == "EveryNode" and deployed["logging_config"]["log_level"] == "DEBUG"
    assert deployed["http_options"] == {"host": "127.0.0.1", "port": 18080}
    out = deployed["applications"][0]
    assert out["runtime_env"] == {"env_vars": {"MARK": "1"}}
    assert out["deployments"] == app_config["deployments"]
    assert out["args"]["settings"]["state_dir"] == str(tmp_path)
    assert out["args"]["settings"]["auth"]["admin_key"] == "sk-admin"  # not '**********'
    assert out["args"]["settings"]["serve"]["pools"][0]["replicas"] == 2  # the file's own settings win
    assert resolve_settings(FarmAppArgs.model_validate(out["args"])).serve.max_queued == 200


def test_farm_up_refuses_settings_it_reads_before_the_file(tmp_path, monkeypatch):
    from farm.cluster import up
    from farm.config import load_settings

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    for patch, needle in [({"cluster": {"node_address": "10.1.2.3"}}, "cluster.node_address is a setting of `farm up`"),
                          ({"state_dir": "/elsewhere"}, "set FARM_HOME to it")]:
        from tests.serve.farmkit import deployment_with

        path = deployment_with(patch, tmp_path / "deployment.yaml")
        with pytest.raises(FarmError, match=needle):
            up(load_settings(), path)


SLOW = ("Deployment 'Finisher' in application 'videofarm' has 1 replicas that have taken more than 30s to be "
        "scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment to be "
        "installed. Resources required for each replica: {required}, total resources available: {available}. "
        "Use `ray status` for more details.")


def test_farm_up_refuses_only_a_replica_the_node_cannot_hold():
    """Serve's slow-scheduling message (as Ray 2.60 words it) comes both for a replica that does not
    fit and for one that fits but whose worker is slow to start on a loaded machine; `farm up` on its
    own node refuses only the first."""
    from farm.cluster import _cannot_place

    assert _cannot_place(SLOW.format(required='{"CPU": 0.25}', available='{"CPU": 0.05}'))
    assert _cannot_place(SLOW.format(required='{"CPU": 0.1, "GPU": 1.0}', available='{"CPU": 1.0}'))
    assert not _cannot_place(SLOW.format(required='{"CPU": 0.25}', available='{"CPU": 0.3}'))  # fits: wait on
    assert not _cannot_place("Deployment 'Finisher' has 1 replicas that have taken more than 30s to initialize.")
    assert not _cannot_place(SLOW.replace("Resources required", "Needs"))  # a wording we cannot read: wait on
