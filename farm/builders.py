"""Config → Ray Serve application. Pure functions; each deployment states its resources.

``deployments/local.yaml`` names ``farm.builders:build_app`` with typed ``args``
(:class:`FarmAppArgs`), so ``serve run``, ``serve deploy`` and ``farm up`` all build
the same application.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from farm.config import FarmSettings, PoolSettings, load_settings

if TYPE_CHECKING:
    from ray.serve import Application


class FarmAppArgs(BaseModel):
    """The Serve config's ``args``: a settings file, and/or settings inline."""

    model_config = ConfigDict(extra="forbid")

    config: Path | None = Field(default=None, description="YAML settings file; None: built-in defaults.")
    settings: dict = Field(default_factory=dict, description="Settings overriding the file, same schema.")


def resolve_settings(args: FarmAppArgs) -> FarmSettings:
    base = load_settings(args.config).model_dump()
    return FarmSettings.model_validate(merge_settings(base, args.settings))


def merge_settings(base: dict, override: dict) -> dict:
    """Deep-merge two settings mappings; ``override`` wins, section by section."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge_settings(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def default_pools(settings: FarmSettings) -> list[PoolSettings]:
    """One pool per expert of every model, so each pool keeps one expert resident."""
    names = ["transformer", "transformer_2"]
    return [PoolSettings(model=spec.id, experts=[e]) for spec in settings.models for e in names[: spec.experts]]


def pool_name(pool: PoolSettings) -> str:
    return f"Denoiser:{pool.model}:{'+'.join(pool.experts)}"


def build_app(args: FarmAppArgs | dict) -> "Application":
    """The whole farm as one Serve application: gateway → dispatcher → encoder, pools, finisher; notifier."""
    from farm.serve.deployments import Denoiser, DispatcherDeployment, Encoder, Finisher
    from farm.serve.gateway import Gateway
    from farm.serve.notifier import Notifier

    args = FarmAppArgs.model_validate(args) if isinstance(args, dict) else args
    settings = resolve_settings(args)
    # Python mode, not JSON: JSON masks SecretStr values (S3 secret, admin key) as '**********'.
    plain = settings.model_dump()
    models = [m.model_dump(mode="json") for m in settings.models]
    ss = settings.serve

    encoder = Encoder.options(
        num_replicas=ss.encoder_replicas, ray_actor_options={"num_cpus": 0.25, "num_gpus": ss.encoder_num_gpus}
    ).bind(models)
    finisher = Finisher.options(num_replicas=ss.finisher_replicas, ray_actor_options={"num_cpus": 0.25}).bind(plain)
    pools = []
    for pool in ss.pools or default_pools(settings):
        handle = Denoiser.options(
            name=pool_name(pool),
            num_replicas=pool.replicas,
            ray_actor_options={"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
        ).bind(settings.model(pool.model).model_dump(mode="json"), pool.experts)
        pools += [(pool.model, expert, handle) for expert in pool.experts]
    dispatcher = DispatcherDeployment.options(ray_actor_options={"num_cpus": 0.1}).bind(
        plain, encoder, pools, finisher, ss.max_active_jobs
    )
    notifier = Notifier.options(ray_actor_options={"num_cpus": 0.05}).bind(plain)
    return Gateway.options(num_replicas=ss.gateway_replicas, ray_actor_options={"num_cpus": 0.1}).bind(
        plain, dispatcher, notifier)
