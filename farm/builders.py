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


def pool_batch_limits(settings: FarmSettings) -> dict[str, int]:
    """Each denoiser pool's step-level batch limit (``PoolSettings.max_batch``), by the policy's pool name."""
    from farm.jobs.placement import denoise_pool

    return {denoise_pool(p.model, "+".join(p.experts)): p.max_batch
            for p in settings.serve.pools or default_pools(settings)}


def pool_name(pool: PoolSettings) -> str:
    return f"Denoiser:{pool.model}:{'+'.join(pool.experts)}"


def replica_name(pool_deployment: str, index: int) -> str:
    """Each replica of a scheduled pool is a deployment of its own, so the dispatcher can address it."""
    return f"{pool_deployment}:{index}"


def build_app(args: FarmAppArgs | dict) -> "Application":
    """The whole farm as one Serve application: gateway → dispatcher → the encoder, denoiser and
    decode pools (one deployment per replica, scheduled by the dispatcher) and the finisher; notifier."""
    from farm.jobs.placement import DECODE_POOL, ENCODE_POOL, denoise_pool
    from farm.serve.deployments import Decoder, Denoiser, DispatcherDeployment, Encoder, Finisher
    from farm.serve.gateway import Gateway
    from farm.serve.notifier import Notifier

    args = FarmAppArgs.model_validate(args) if isinstance(args, dict) else args
    settings = resolve_settings(args)
    # Python mode, not JSON: JSON masks SecretStr values (S3 secret, admin key) as '**********'.
    plain = settings.model_dump()
    ss = settings.serve

    def members(deployment, name: str, count: int, actor_options: dict, *bind_args,
                **options) -> list[tuple[str, object]]:
        return [(replica_name(name, i), deployment.options(name=replica_name(name, i), num_replicas=1,
                                                            ray_actor_options=actor_options, **options).bind(*bind_args))
                for i in range(count)]

    replicas: dict[str, list[tuple[str, object]]] = {
        ENCODE_POOL: members(Encoder, "Encoder", ss.encoder_replicas,
                             {"num_cpus": ss.encoder_num_cpus, "num_gpus": ss.encoder_num_gpus}, plain),
        DECODE_POOL: members(Decoder, "Decoder", ss.decoder_replicas,
                             {"num_cpus": ss.decoder_num_cpus, "num_gpus": ss.decoder_num_gpus}, plain),
    }
    for pool in ss.pools or default_pools(settings):
        options = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
        replicas[denoise_pool(pool.model, "+".join(pool.experts))] = members(
            Denoiser, pool_name(pool), pool.replicas, options, plain, pool.model, pool.experts,
            # a batch's calls at once, and `checkpointed` beside them
            max_ongoing_requests=pool.max_batch + 1)
    finisher = Finisher.options(num_replicas=ss.finisher_replicas, ray_actor_options={"num_cpus": ss.finisher_num_cpus}).bind(plain)
    # Serve waits this long for the dispatcher's graceful stop: its jobs drain to a shard boundary first.
    dispatcher = DispatcherDeployment.options(
        ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_timeout_s=settings.render.drain_s + 30.0,
    ).bind(plain, replicas, finisher)
    notifier = Notifier.options(ray_actor_options={"num_cpus": 0.05}).bind(plain)
    return Gateway.options(num_replicas=ss.gateway_replicas, ray_actor_options={"num_cpus": 0.1}).bind(
        plain, dispatcher, notifier)
