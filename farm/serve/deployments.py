"""Ray Serve deployments: the render stages as replica pools, and the dispatcher.

Each replica loads its weights once in ``__init__``. Denoiser replicas take one
shard at a time (``max_ongoing_requests=1``): the dispatcher sends no more shards
than a pool has replicas, so queued work waits in the dispatcher, in priority order,
not inside Serve. States travel as Ray objects between replicas.

Faults: :class:`ServeStages` turns Ray's "the replica died" errors into
:class:`~farm.jobs.retry.ReplicaLost` for the dispatcher's retry policy; the finisher
retries its upload while S3 is unreachable; the denoiser applies the operator's chaos
faults (``render.faults``) to its own model, so they run the real code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path

from ray import serve

from farm.jobs.dispatcher import ShardOutcome
from farm.jobs.retry import ReplicaLost
from farm.render.faults import FaultInjection, matching
from farm.render.registry import ModelSpec, RenderParams
from farm.serve.loopback import bind_replica_grpc_to_node_address

log = logging.getLogger(__name__)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests calling the class directly)
        return "local"


# One request at a time per replica: torch runs one thread per replica here, and
# concurrent first imports inside diffusers' lazy modules are not thread-safe.
@serve.deployment(max_ongoing_requests=1)
class Encoder:
    """Prompt → conditioning → the job's initial denoise state, for every served model."""

    def __init__(self, models: list[dict]) -> None:
        bind_replica_grpc_to_node_address()
        from farm.render.engine import TextEncoderStage, configure_torch

        configure_torch()
        self.specs = {m["id"]: ModelSpec(**m) for m in models}
        self.stages = {mid: TextEncoderStage(spec) for mid, spec in self.specs.items()}

    def prepare(self, model_id: str, params: RenderParams):
        from farm.render.engine import initial_state

        spec = self.specs[model_id]
        conditioning = self.stages[model_id].encode(params.prompt)
        return initial_state(spec, params, conditioning)


@serve.deployment(max_ongoing_requests=1)
class Denoiser:
    """One pool per (model, expert): holds that expert resident, runs step ranges."""

    def __init__(self, model: dict, experts: list[str]) -> None:
        bind_replica_grpc_to_node_address()
        from farm.metrics import FarmMetrics
        from farm.render.engine import DenoiserStage, configure_torch

        configure_torch()
        self.stage = DenoiserStage(ModelSpec(**model), tuple(experts))
        self.pool = f"{model['id']}:{'+'.join(experts)}"
        self.metrics = FarmMetrics()

    def run_shard(self, state, start: int, end: int, faults: list[dict] | None = None) -> ShardOutcome:
        """Steps ``[start, end)``; ``faults`` are chaos faults (``render.faults``) for this job.

        Raises NonFiniteLatents when the shard left NaN/Inf latents (the denoise loop checks).
        """
        import torch

        from farm.render.faults import injected

        started = time.perf_counter()
        try:
            with injected(self.stage.experts, [FaultInjection.model_validate(f) for f in faults or ()]):
                new_state = self.stage.run(state, start, end)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the allocator's cache back before the next shard
            raise
        seconds = time.perf_counter() - started
        tags = {"pool": self.pool}
        self.metrics.shard_latency.observe(seconds, tags=tags)
        self.metrics.step_latency.observe(seconds / (end - start), tags=tags)
        return ShardOutcome(new_state, _replica_id(), seconds)


@serve.deployment(max_ongoing_requests=1)
class Finisher:
    """Decode, watermark, MP4, thumbnail, spritesheet, C2PA, then upload to S3."""

    def __init__(self, settings: dict) -> None:
        bind_replica_grpc_to_node_address()
        from farm.config import FarmSettings
        from farm.render.engine import configure_torch
        from farm.storage.connect import open_store

        configure_torch()
        self.settings = FarmSettings.model_validate(settings)
        from farm.render.engine import DecoderStage

        from farm.metrics import FarmMetrics

        self.store = open_store(self.settings, start=False)
        self.decoders = {spec.id: DecoderStage(spec) for spec in self.settings.models}
        self.metrics = FarmMetrics()

    def finish(self, job_id: str, model_id: str, params: RenderParams, latents) -> dict[str, str]:
        from farm.jobs.publish import clip_keys, clip_record, finish_frames

        spec = self.settings.model(model_id)
        started = time.perf_counter()
        frames = self.decoders[model_id].decode(latents)
        with tempfile.TemporaryDirectory(prefix="finish-") as tmp:
            clip = finish_frames(self.settings, spec, params, frames, job_id, Path(tmp))
            finished = time.perf_counter()
            self._upload(job_id, clip, clip_record(job_id, spec, params, int(frames.shape[0]), clip))
        tags = {"model": model_id}
        self.metrics.finish_latency.observe(finished - started, tags=tags)
        self.metrics.upload_latency.observe(time.perf_counter() - finished, tags=tags)
        for variant, size in (("video", clip.video_bytes), ("thumbnail", clip.thumbnail_bytes),
                              ("spritesheet", clip.spritesheet_bytes)):
            self.metrics.upload_bytes.inc(size, tags={"variant": variant})
        return clip_keys(job_id)

    def _upload(self, job_id: str, clip, record: dict) -> None:
        """Upload the clip, retrying while S3 is unreachable (for at most render.storage_retry_s).

        Every object goes to a fixed key, so an attempt after a partial one overwrites, never
        duplicates. A multipart upload cut off by an outage may stay open (its
        abort failed too), so once S3 answers again the clip's leftovers are aborted.
        """
        from farm.jobs.publish import upload_finished
        from farm.jobs.retry import RetryPolicy
        from farm.storage.s3 import ClipLayout

        policy = RetryPolicy.from_settings(self.settings.render)
        prefix = ClipLayout(job_id).prefix
        interrupted = False

        def attempt() -> None:
            nonlocal interrupted
            try:
                upload_finished(self.store, job_id, clip, record)
            except Exception:
                interrupted = True
                with contextlib.suppress(Exception):
                    self.store.abort_open_multipart_uploads(prefix)
                raise

        policy.storage_call(f"job {job_id}: upload", attempt)
        if interrupted:
            aborted = policy.storage_call(f"job {job_id}: abort leftovers", self.store.abort_open_multipart_uploads, prefix)
            if aborted:
                log.info("job %s: aborted %d multipart upload(s) left open by an outage", job_id, aborted)


def _lost_replica_errors() -> tuple[type[BaseException], ...]:
    """Ray's ways of saying the replica (its process, its node) is gone: the call never completed."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)


class ServeStages:
    """StageClients over Serve handles: what the dispatcher calls on a cluster."""

    def __init__(self, encoder, pools: dict[tuple[str, str], object], finisher, faults=()) -> None:
        self.encoder = encoder
        self.pools = pools
        self.finisher = finisher
        self.faults = [FaultInjection.model_validate(f) for f in faults]

    async def _call(self, what: str, response):
        try:
            return await response
        except _lost_replica_errors() as exc:
            raise ReplicaLost(f"{what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc

    async def prepare(self, model_id, params):
        return await self._call("encoder", self.encoder.prepare.remote(model_id, params))

    async def run_shard(self, model_id, expert, state, start, end, *, prompt=""):
        faults = [f.model_dump() for f in matching(self.faults, prompt)]
        pool = self.pools[(model_id, expert)]
        return await self._call(f"denoiser {model_id}:{expert}", pool.run_shard.remote(state, start, end, faults))

    async def finish(self, job_id, model_id, params, latents):
        return await self._call("finisher", self.finisher.finish.remote(job_id, model_id, params, latents))


@serve.deployment(num_replicas=1, max_ongoing_requests=16)
class DispatcherDeployment:
    """Hosts the dispatcher loop; the gateway wakes it when a job is created."""

    def __init__(self, settings: dict, encoder, pools: list[tuple[str, str, object]], finisher, max_active: int) -> None:
        bind_replica_grpc_to_node_address()
        from farm.config import FarmSettings
        from farm.jobs.dispatcher import Dispatcher
        from farm.jobs.retry import RetryPolicy
        from farm.jobs.store import JobStore
        from farm.metrics import FarmMetrics
        from farm.storage.connect import open_store

        self.settings = FarmSettings.model_validate(settings)
        store = JobStore(self.settings.job_store_url())
        store.migrate()
        render = self.settings.render
        stages = ServeStages(encoder, {(m, e): h for m, e, h in pools}, finisher, faults=render.faults)
        self.dispatcher = Dispatcher(
            store, stages, self.settings.models,
            objects=open_store(self.settings, start=False) if render.checkpoints else None,
            max_active=max_active, shard_steps=render.shard_steps,
            worker="dispatcher", metrics=FarmMetrics(), policy=RetryPolicy.from_settings(render),
        )
        self._task = asyncio.get_running_loop().create_task(self.dispatcher.run())

    def wake(self) -> None:
        self.dispatcher.wake()

    async def drain(self) -> None:
        """Stop claiming and hand running jobs back to the queue (first step of `farm down`)."""
        await self.dispatcher.stop()

    def status(self) -> dict:
        store = self.dispatcher.store
        return self.dispatcher.status() | {
            "queue_depths": {_name(p): n for p, n in store.queue_depths().items()},
            "counts": store.counts_by_status(),
            "recent": [
                {"id": j.id, "model": j.model, "status": j.status, "progress": j.progress}
                for j in store.recent(10)
            ],
        }

    def shard_history(self, job_id: str) -> list[dict]:
        return [vars(r) for r in self.dispatcher.shards.get(job_id, [])]

    def final_latents(self, job_id: str):
        return self.dispatcher.final_latents.get(job_id)

    async def __del__(self) -> None:  # Serve calls this on graceful replica shutdown
        await self.dispatcher.stop()


def _name(priority: int) -> str:
    from farm.jobs.store import Priority

    return Priority(priority).name.lower()
