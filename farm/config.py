"""Typed settings: one schema for YAML files, Python callers and the CLI.

Each concern has its own small model (storage, watermark, signing, rendering);
components receive only the section they need, never the whole tree.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from farm import env
from farm.finish.provenance import SignerConfig
from farm.finish.watermark import WatermarkConfig
from farm.jobs.budget_settings import BudgetSettings
from farm.jobs.expiry_settings import ExpirySettings
from farm.policy.settings import CameoSettings, PolicySettings
from farm.render.faults import FaultInjection
from farm.render.registry import ModelSpec, find_model
from farm.render.tiers import ModelAlias, check_aliases
from farm.render.tiny import TINY_I2V_MODEL_ID, TINY_LTX2_MODEL_ID, TINY_MODEL_IDS, tiny_i2v_spec, tiny_spec
from farm.storage.s3 import S3Settings
from farm.webhooks.settings import WebhookSettings


class StorageSettings(BaseModel):
    """Where clips go: the embedded SeaweedFS server, or any S3 endpoint."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["embedded", "external"] = Field(
        default="embedded",
        description="'embedded' starts a SeaweedFS S3 server under the state folder; "
        "'external' uses the endpoint and credentials in 's3'.",
    )
    bucket: str = Field(default="videofarm", description="Bucket that holds videos/{id}/ objects.")
    s3: S3Settings | None = Field(default=None, description="Connection settings for mode 'external'.")

    @model_validator(mode="after")
    def _external_needs_s3(self) -> "StorageSettings":
        if self.mode == "external" and self.s3 is None:
            raise ValueError("storage.s3 must be set when storage.mode is 'external'")
        return self


class RenderSettings(BaseModel):
    """How jobs are rendered, independent of any one model."""

    model_config = ConfigDict(extra="forbid")

    shard_steps: int = Field(
        default=4, ge=1, le=1000, description="Steps per shard: the preemption and checkpoint granularity."
    )
    default_seconds: int = Field(default=2, ge=1, description="Clip length when a request names none.")
    default_size: str = Field(default="128x128", description="Clip size when a request names none.")
    checkpoints: bool = Field(
        default=True,
        description="Checkpoint every job to S3: its conditioning once (checkpoints/{id}/conditioning.pt), "
        "and after every shard but the last the state that shard made (checkpoints/{id}/state-NNNNNN.pt, "
        "written in the background by the replica that made it; the previous one is deleted), so a job "
        "resumes from its last acknowledged shard after a restart or `farm down`/`farm up`.",
    )
    max_jobs_in_flight: int = Field(
        default=64, ge=1, le=100_000,
        description="Jobs the dispatcher holds claimed at once, running or waiting at a shard boundary with "
        "their state in Ray's object store: the bound on the states the farm keeps in memory. Which of them "
        "runs on which replica, shard by shard, is the scheduling policy's choice.",
    )
    tenant_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Fair-share weight per account id (default 1.0): within each priority class, replicas "
        "are shared between accounts waiting for a pool in proportion to their weights.",
    )
    bulk_aging_s: float | None = Field(
        default=600.0, gt=0.0,
        description="Bulk work waiting this long behind newer interactive work gets the next free replica of "
        "its pool (one shard), so bulk never starves; null: strict priority.",
    )
    shard_retries: int = Field(
        default=2, ge=0, le=20,
        description="Retries of a stage call that failed with a render error (non-finite latents, out of "
        "memory) before the job fails with that error's code.",
    )
    replica_retries: int = Field(
        default=6, ge=0, le=100,
        description="Retries of a stage call whose replica died or became unreachable; each retry starts "
        "from the state before the call and goes to whichever replica the scheduling policy picks.",
    )
    retry_backoff_s: float = Field(
        default=0.5, gt=0.0, le=60.0, description="First retry delay; doubles with each retry (with jitter)."
    )
    retry_backoff_max_s: float = Field(default=10.0, gt=0.0, le=600.0, description="Longest delay between retries.")
    storage_retry_s: float = Field(
        default=120.0, gt=0.0, le=3600.0,
        description="Total seconds one storage operation (checkpoint write or read, clip upload) keeps "
        "retrying while S3 is unreachable; an outage does not use up shard_retries.",
    )
    stage_timeout_s: float = Field(
        default=900.0, gt=0.0,
        description="Longest one stage call (encode, a shard, decode, finish) may run on its replica before the "
        "replica counts as lost and the call is retried elsewhere (its wait for a replica is not counted): a "
        "hung GPU or deadlock must not hold a job forever.",
    )
    drain_s: float = Field(
        default=60.0, ge=0.0, le=3600.0,
        description="On a graceful stop of the dispatcher (a rolling update, `farm down`), how long running jobs "
        "go on to their next shard boundary before they are handed back to the queue; a job stopped at a "
        "boundary resumes from that checkpoint with nothing redone. Jobs still running after this resume "
        "from their last recorded checkpoint. Serve's graceful shutdown timeout of the dispatcher is set "
        "above it.",
    )
    leader_lease_s: float = Field(
        default=15.0, gt=1.0, le=600.0,
        description="The dispatcher's leader lease, renewed every third of it: one dispatcher drives jobs; a "
        "second replica (a rolling update's) waits until the leader hands over on a graceful stop, or until "
        "this long after the leader died.",
    )
    max_attempts: int = Field(
        default=5, ge=1, le=100,
        description="Times a job may be taken back from a worker that died before it fails with worker_lost.",
    )
    faults: list[FaultInjection] = Field(
        default_factory=list,
        description="Chaos testing: faults injected into the denoiser for jobs whose prompt matches "
        "(see farm/render/faults.py). Empty in production.",
    )


class PoolSettings(BaseModel):
    """One denoiser pool: replicas holding one model's expert(s)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model id from the registry.")
    experts: list[Literal["transformer", "transformer_2"]] = Field(
        default_factory=lambda: ["transformer"],
        description="Experts each replica holds; a two-expert model gets one pool per expert.",
    )
    replicas: int = Field(default=1, ge=1, le=1024, description="Replicas in the pool.")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per replica (0 on CPU).")
    num_cpus: float = Field(default=0.25, gt=0.0, description="CPUs Ray reserves per replica.")
    max_batch: int = Field(
        default=1, ge=1, le=64,
        description="Step-level batching: how many compatible shards (same model, size, duration and shard "
        "length, no cache acceleration) one replica runs together, one forward pass per step for all of them; "
        "1 runs one shard at a time.",
    )


class ServeSettings(BaseModel):
    """The farm on Ray Serve: HTTP, limits, and the size of every pool."""

    model_config = ConfigDict(extra="forbid")

    max_queued: int = Field(
        default=200, ge=1,
        description="Queued interactive jobs beyond which interactive creates get 429 (bulk jobs have their own "
        "cap, max_queued_bulk, and never count against this one).",
    )
    max_queued_bulk: int = Field(
        default=10_000, ge=1,
        description="Queued bulk jobs beyond which bulk creates get 429 (interactive jobs never count against it).",
    )
    poll_after_ms: int = Field(default=500, ge=0, description=(
        "The openai-poll-after-ms hint sent with a video that has no completion estimate yet."))
    poll_after_min_ms: int = Field(default=250, ge=0, description=(
        "The shortest poll hint: with an estimate, the hint is a quarter of the time left, within min..max."))
    poll_after_max_ms: int = Field(default=10_000, ge=0, description="The longest poll hint (see poll_after_min_ms).")
    queue_view_s: float = Field(default=1.0, gt=0, le=60, description=(
        "How old a gateway replica's view of the queue (positions, estimates) may get before it is read again."))
    events_tick_s: float = Field(default=0.5, gt=0, le=60, description=(
        "How often a gateway replica reads the jobs its event streams (GET /v1/videos/{id}/events) follow."))
    event_stream_max_s: float = Field(default=600.0, gt=0, le=86_400, description=(
        "Longest one GET /v1/videos/{id}/events stream stays open: it then ends without a final event, and the "
        "client resumes it with Last-Event-ID (`farm submit --wait` does). Bounds how long a gateway replica holds "
        "one connection."))
    gateway_replicas: int = Field(default=1, ge=1, description="Gateway (HTTP ingress) replicas.")
    encoder_replicas: int = Field(default=1, ge=1, description="Text-encoder replicas.")
    encoder_num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per text-encoder replica.")
    encoder_num_cpus: float = Field(default=0.25, gt=0.0, description="CPUs Ray reserves per text-encoder replica.")
    decoder_replicas: int = Field(default=1, ge=1, description="Replicas of the decode pool (the VAE of every model).")
    decoder_num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per decode replica.")
    decoder_num_cpus: float = Field(default=0.25, gt=0.0, description="CPUs Ray reserves per decode replica.")
    finisher_replicas: int = Field(
        default=1, ge=1, description="Finisher replicas (CPU: watermark, H.264, thumbnail, C2PA, upload).")
    finisher_num_cpus: float = Field(default=0.25, gt=0.0, description="CPUs Ray reserves per finisher replica.")
    pools: list[PoolSettings] = Field(
        default_factory=list, description="Denoiser pools; empty: one pool per expert of every model, 1 replica each."
    )
    rate_limit: str = Field(
        default="1200/minute",
        description="Requests per API key, as a `limits` string ('1200/minute', '20/second'); "
        "enforced per gateway replica.",
    )
    anonymous_rate_limit: str = Field(
        default="30/minute",
        description="Per client address: invite redemptions and requests with a refused key (guessing).",
    )
    link_rate_limit: str = Field(
        default="600/minute",
        description="Per client address: requests to unlisted links (GET /v1/shared/{token}[/content]), which take "
        "no API key.",
    )
    rate_limit_store: Literal["auto", "memory", "redis"] = Field(default="auto", description=(
        "Where rate-limit windows live: 'memory' (each gateway replica its own; one replica only), 'redis' (shared "
        "by every replica), 'auto' (redis when gateway_replicas > 1)."))
    redis_url: SecretStr | None = Field(default=None, description=(
        "The Redis for shared rate limits (redis://[:password@]host:port/db); unset: `farm up` starts one on "
        "loopback (Debian's redis-server) when the limits are shared."))
    key_cache_s: float = Field(default=30.0, ge=0, le=3600, description=(
        "How long a gateway replica trusts an API key it looked up (0: look up every request). Revocations "
        "still take effect within revocation_check_s."))
    revocation_check_s: float = Field(default=1.0, ge=0, le=60, description=(
        "How often a gateway replica reads the store's revocation version, dropping its cached keys when it moved."))
    max_queued_per_account: int = Field(default=50, ge=1, description="Queued jobs per account beyond which creates get 429.")
    max_prompt_chars: int = Field(default=4000, ge=1, description="Longest prompt accepted, in characters.")
    max_body_mb: float = Field(default=16.0, gt=0, description="Largest request body accepted, in MiB.")
    max_upload_mb: float = Field(default=10.0, gt=0, description="Largest uploaded image (input_reference), in MiB.")
    content_redirect: bool = Field(default=False, description=(
        "Answer content downloads (GET /v1/videos/{id}/content, GET /v1/shared/{token}/content) with a 307 to a "
        "presigned S3 URL instead of relaying the bytes through the gateway. Only where clients can reach the S3 "
        "endpoint (storage settings) themselves; the embedded SeaweedFS listens on loopback."))
    content_redirect_s: int = Field(default=60, ge=1, le=3600, description=(
        "Seconds a redirect's presigned URL stays valid (content_redirect)."))
    max_upload_pixels: int = Field(
        default=4096 * 4096, ge=1, description="Most pixels an uploaded image may have (decompression-bomb guard)."
    )
    image_url_allow_hosts: list[str] = Field(default_factory=list, description=(
        "input_reference image URLs the gateway may fetch although they are not public: CIDRs ('10.0.0.0/8', "
        "'127.0.0.1/32') and host names ('images.internal', '*.corp.example'). Everything else must resolve to a "
        "public unicast address (the webhook SSRF guard). Farm-wide: every account may then read those hosts."))
    image_url_max_mb: float = Field(default=10.0, gt=0, description=(
        "Largest image fetched for an input_reference image_url, in MiB (the smaller of this and max_upload_mb "
        "applies); the fetch stops at the limit and the request gets 400 image_too_large."))
    image_url_timeout_s: float = Field(default=10.0, gt=0, le=120, description=(
        "Deadline of fetching an input_reference image_url, in seconds: DNS, connect, every redirect and the "
        "whole body; past it the request gets 400 image_url_timeout."))

    @field_validator("image_url_allow_hosts")
    @classmethod
    def _image_url_allow_hosts(cls, value: list[str]) -> list[str]:
        from farm.webhooks.guard import parse_allow_hosts

        parse_allow_hosts(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("rate_limit", "anonymous_rate_limit", "link_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(f"rate_limit: {value!r} is not a rate; use e.g. '1200/minute' or '20/second'") from None
        return value

    @property
    def shared_limits(self) -> bool:
        return self.rate_limit_store == "redis" or (self.rate_limit_store == "auto" and self.gateway_replicas > 1)

    @model_validator(mode="after")
    def _one_set_of_limits(self) -> "ServeSettings":
        if self.rate_limit_store == "memory" and self.gateway_replicas > 1:
            raise ValueError(f"serve.rate_limit_store: 'memory' keeps each of the {self.gateway_replicas} gateway "
                             "replicas' limits apart (every key would get that many times its limit); use 'redis' "
                             "or 'auto' with more than one gateway replica")
        return self

    @model_validator(mode="after")
    def _poll_hints_ordered(self) -> "ServeSettings":
        if self.poll_after_min_ms > self.poll_after_max_ms:
            raise ValueError(f"serve.poll_after_min_ms ({self.poll_after_min_ms}) must not exceed "
                             f"serve.poll_after_max_ms ({self.poll_after_max_ms})")
        return self


class BatchSettings(BaseModel):
    """Files and batches (``/v1/files``, ``/v1/batches``) and schedules (``/v1/schedules``)."""

    model_config = ConfigDict(extra="forbid")

    max_file_mb: float = Field(
        default=200.0, gt=0, le=10_240,
        description="Largest file accepted by POST /v1/files, in MiB; larger uploads get 413 naming 'file'. "
        "Uploads stream to S3 (spooled to a temporary file, never held whole in memory).",
    )
    max_lines: int = Field(
        default=50_000, ge=1, le=1_000_000,
        description="Most requests (non-empty lines) in a batch input file; more gets 400 naming 'file'.",
    )
    max_line_kb: float = Field(
        default=64.0, gt=0, le=10_240,
        description="Longest line of a batch input file, in KiB; a longer one gets 400 naming 'file' and its line.",
    )
    max_queued_per_batch: int = Field(
        default=4, ge=1, le=10_000,
        description="Jobs of one batch waiting in the queue at once: the batch runner creates the next ones as "
        "earlier ones are claimed. Queued batch jobs count against serve.max_queued_per_account, so this must "
        "stay below it, leaving the account room for its interactive creates.",
    )
    poll_s: float = Field(
        default=1.0, gt=0, le=60,
        description="How often the leading dispatcher advances batches and fires due schedules.",
    )
    misfire_grace_s: float = Field(
        default=300.0, ge=0, le=7 * 24 * 3600,
        description="A schedule's run found due later than this (the farm was down) is missed: its "
        "missed policy decides ('skip' it, or 'run_once' however many were missed).",
    )
    max_schedules_per_account: int = Field(default=100, ge=1, le=100_000, description="Schedules per account.")


class AuthSettings(BaseModel):
    """Invite-only access: the operator's admin key and invite lifetimes."""

    model_config = ConfigDict(extra="forbid")

    admin_key: SecretStr | None = Field(
        default=None, description="Key for /v1/admin routes; FARM_ADMIN_KEY wins; unset: generated under state_dir."
    )
    invite_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="Default lifetime of an invite code.")


class ClusterSettings(BaseModel):
    """Where the Ray head that `farm up` starts listens (a joined cluster, `farm up --address`, keeps its own)."""

    model_config = ConfigDict(extra="forbid")

    node_address: str = Field(
        default="127.0.0.1",
        description="The address the embedded Ray head binds and advertises. A loopback address (the default) "
        "keeps every Ray port on this machine (GCS, raylet, workers, client server, metrics, dashboard); a "
        "routable address of this machine lets other nodes join with `ray start --address`.",
    )

    @field_validator("node_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value == "localhost":
            return "127.0.0.1"
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"cluster.node_address: {value!r} is not an IP address; e.g. 127.0.0.1 or 10.0.0.5") from None
        return value

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.node_address).is_loopback


class FarmSettings(BaseModel):
    """The whole farm's settings. Sections are handed to components one by one."""

    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Field(description="Folder for embedded S3 data, signing credentials, built models, renders.")
    models: list[ModelSpec] = Field(description="The model registry; the first entry is the default model.")
    aliases: list[ModelAlias] | None = Field(
        default=None,
        description="Model names clients may send besides the model ids, each a tier of a served model with "
        "its own sizes, durations and steps (OpenAI's 'sora-2', 'sora-2-pro'; see farm/render/tiers.py). An "
        "alias naming a model not in `models` is refused at load. Null: the built-in tiers of the embedded tiny "
        "models (sora-2 -> wan-tiny, sora-2-pro -> wan-tiny-2x) when both are served, else none; [] for none.",
    )
    storage: StorageSettings = Field(default_factory=StorageSettings)
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig)
    signer: SignerConfig = Field(default_factory=SignerConfig)
    render: RenderSettings = Field(default_factory=RenderSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    expiry: ExpirySettings = Field(default_factory=ExpirySettings, description=(
        "How long finished clips are kept (per account, per tier, default) and the reaper that removes them."))
    batches: BatchSettings = Field(default_factory=BatchSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings, description=(
        "Content policy: the moderation rules every create passes and how fresh the protected-name registry is."))
    cameos: CameoSettings = Field(default_factory=CameoSettings, description=(
        "Cameos (POST /v1/videos/characters): limits on their source videos and the reference frames kept."))
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    database_url: str = Field(
        default="", description="SQLAlchemy URL of the job store; empty: a SQLite file in the state folder."
    )

    @model_validator(mode="after")
    def _check_pools(self) -> "FarmSettings":
        known = {m.id for m in self.models}
        for pool in self.serve.pools:
            if pool.model not in known:
                raise ValueError(f"serve.pools: model {pool.model!r} is not in models; known: {sorted(known)}")
        return self

    @model_validator(mode="after")
    def _check_aliases(self) -> "FarmSettings":
        check_aliases(self.models, self.model_aliases)
        return self

    @property
    def model_aliases(self) -> list[ModelAlias]:
        """The aliases in force: the configured ones, or (``aliases`` null) the embedded models' tiers."""
        if self.aliases is not None:
            return self.aliases
        served = {m.id for m in self.models}
        return embedded_aliases() if set(TINY_MODEL_IDS.values()) <= served else []

    @model_validator(mode="after")
    def _batch_window(self) -> "FarmSettings":
        if self.batches.max_queued_per_batch >= self.serve.max_queued_per_account:
            raise ValueError(
                f"batches.max_queued_per_batch ({self.batches.max_queued_per_batch}) must be below "
                f"serve.max_queued_per_account ({self.serve.max_queued_per_account}): a batch would fill the "
                "account's queue and refuse its interactive creates")
        return self

    @model_validator(mode="after")
    def _unique_model_ids(self) -> "FarmSettings":
        if not self.models:
            raise ValueError("models must list at least one model")
        ids = [m.id for m in self.models]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"model ids must be unique; repeated: {duplicated}")
        return self

    @model_validator(mode="after")
    def _expiry_tiers_known(self) -> "FarmSettings":
        unknown = sorted(set(self.expiry.tiers) - set(self.budgets.tiers))
        if unknown:
            raise ValueError(f"expiry.tiers: {unknown} are not tiers of budgets.tiers (accounts are put in a tier "
                             f"through their budget); known: {sorted(self.budgets.tiers)}")
        return self

    def model(self, model_id: str | None) -> ModelSpec:
        """Look a model up by id (None: the default); ValueError lists the known ids."""
        return find_model(self.models, model_id)

    def job_store_url(self) -> str:
        """The job store's URL; by default a SQLite file in the state folder (created if missing)."""
        if self.database_url:
            return self.database_url
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.state_dir / 'jobs.sqlite'}"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def redis_dir(self) -> Path:
        return self.state_dir / "redis"

    @property
    def seaweed_dir(self) -> Path:
        return self.state_dir / "seaweedfs"


def embedded_models(state_dir: Path) -> list[ModelSpec]:
    """The models a fresh install serves: tiny models built under the state folder (Wan text-to-video
    with one and two experts, Wan 2.1 image-to-video, and LTX-2 text-to-video with audio)."""
    from farm.render.tiny_ltx2 import tiny_ltx2_spec

    models = state_dir / "models"
    return [tiny_spec(models / "wan-tiny", experts=1), tiny_spec(models / "wan-tiny-2x", experts=2),
            tiny_i2v_spec(models / TINY_I2V_MODEL_ID), tiny_ltx2_spec(models / TINY_LTX2_MODEL_ID)]


def embedded_aliases() -> list[ModelAlias]:
    """OpenAI's tier names over the embedded tiny models, on the pools they already have.

    sora-2 is the standard tier on wan-tiny (what `make demo` renders); sora-2-pro runs on
    wan-tiny-2x, the two-expert model whose two pools every local farm deploys anyway (no pool
    is added for it), with twice the steps and a larger size. Portrait first and 4 s first, as
    OpenAI's defaults (720x1280, 4 s) are; OpenAI's sizes map to these by orientation.
    """
    return [
        ModelAlias(id="sora-2", model=TINY_MODEL_IDS[1], sizes=["96x128", "128x96", "128x128"], seconds=[4, 2],
                   default_steps=8),
        ModelAlias(id="sora-2-pro", model=TINY_MODEL_IDS[2], sizes=["96x128", "128x96", "128x128", "256x256"],
                   seconds=[4, 2], default_steps=16),
    ]


def load_settings(path: Path | None = None) -> FarmSettings:
    """Defaults, overlaid with a YAML file (``path`` or ``FARM_CONFIG``) when one is given."""
    path = path or env.config_file()
    data: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        data = loaded or {}
    state_dir = Path(data.get("state_dir") or env.state_dir())
    data["state_dir"] = state_dir
    data.setdefault("models", [m.model_dump() for m in embedded_models(state_dir)])
    return FarmSettings.model_validate(data)
