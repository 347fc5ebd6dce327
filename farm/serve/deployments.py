"""Ray Serve deployments: the render stages as pools of replicas, and the dispatcher.

Each replica loads its weights once in ``__init__``. Every replica of the encoder, denoiser
and decoder pools is a Serve deployment of its own (``Denoiser:<model>:<expert>:<i>``,
``Encoder:<i>``, ``Decoder:<i>``): the dispatcher's scheduling policy, not Serve's router,
decides which replica runs each call (Serve's router knows neither priorities nor which
replica holds a job's state), and it sends a replica one call at a time. Finishing (watermark,
MP4, C2PA, upload) runs on CPU in the ``Finisher`` deployment, which Serve routes.

States travel as Ray objects: a stage ``ray.put``s what it made and replies with a
:class:`ObjectBox` (a box, so Serve hands the reference on instead of resolving it), and the
next stage ``ray.get``s it — the dispatcher only passes boxes on. A denoiser writes the state
it made to S3 in the background while its reply is already on its way; ``checkpointed`` waits
for that write. The encoder writes a job's conditioning once.

Faults: :class:`ServeStages` turns Ray's "the replica died" errors into
:class:`~farm.jobs.retry.ReplicaLost` and "the state's holder died" into
:class:`~farm.jobs.dispatcher.StateLost` for the dispatcher's retry policy; the finisher
retries its upload while S3 is unreachable; the denoiser applies the operator's chaos faults
(``render.faults``) to its own model, so they run the real code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from farm.jobs.dispatcher import Decoded, Finished, Prepared, ShardOutcome, StateLost
from farm.jobs.retry import ReplicaLost
from farm.render.faults import FaultInjection, matching
from farm.render.plan import ShardPlan
from farm.render.registry import ModelSpec, RenderParams
from farm.serve.batching import BatchTicket, ShardBatcher
from farm.serve.loopback import bind_replica_grpc_to_node_address

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectBox:
    """A Ray object reference, boxed: Serve resolves top-level references in a call's arguments,
    and the state must reach the replica that reads it as a reference, not be fetched on the way."""

    ref: Any


def _put(value) -> ObjectBox:
    import ray

    return ObjectBox(ray.put(value))


def _get(box: ObjectBox):
    """The boxed value; StateLost when its holder (the replica that put it) is gone."""
    import ray
    from ray.exceptions import ObjectLostError

    try:
        return ray.get(box.ref)
    except ObjectLostError as exc:
        raise StateLost(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def _replica_id() -> str:
    try:
        return serve.get_replica_context().deployment
    except Exception:  # outside Serve (tests calling the class directly)
        return "local"


def _count_storage_errors(stage: str):
    """A RetryPolicy hook counting the transient S3 errors ``stage`` meets."""
    from farm.metrics import FarmMetrics

    metrics = FarmMetrics()
    return lambda: metrics.storage_errors.inc(1, tags={"stage": stage})


def _storage(settings: dict, stage: str):
    from farm.config import FarmSettings
    from farm.jobs.retry import RetryPolicy
    from farm.storage.connect import open_store

    parsed = FarmSettings.model_validate(settings)
    if not parsed.render.checkpoints:
        return parsed, None, None
    retry = RetryPolicy.from_settings(parsed.render, _count_storage_errors(stage))
    return parsed, open_store(parsed, start=False), retry


# One call at a time per replica (the dispatcher sends no more; a denoiser also answers
# `checkpointed` while its next shard runs). torch runs one thread per replica here.
@serve.deployment(max_ongoing_requests=1)
class Encoder:
    """Request → conditioning → the job's initial state, for every served model (the prompt, and the
    reference image read from S3 for a model that takes one); or a job's state read back from its
    last checkpoint."""

    def __init__(self, settings: dict) -> None:
        bind_replica_grpc_to_node_address()
        from farm.render.engine import configure_torch
        from farm.render.families import get_family

        configure_torch()
        self.settings, self.objects, self.retry = _storage(settings, "encoder")
        self.specs = {m.id: m for m in self.settings.models}
        # Each model's family brings its encoder stage (text only, or text + image encoder + VAE).
        self.stages = {mid: get_family(spec.family).load_encoder(spec) for mid, spec in self.specs.items()}
        # Video-to-video encoders (remix, edit, extend: the source's VAE encode), loaded on a model's
        # first such job: a farm that never derives holds no second VAE here.
        self.video_stages: dict[str, Any] = {}
        # Reference images and source clips are in S3 whether or not checkpoints are on.
        self.references = None
        if any(spec.takes_image or spec.takes_video for spec in self.specs.values()):
            from farm.jobs.retry import RetryPolicy
            from farm.storage.connect import open_store

            self.references = (open_store(self.settings, start=False),
                               RetryPolicy.from_settings(self.settings.render, _count_storage_errors("encoder")))

    async def start(self, job_id: str, model_id: str, params: RenderParams, resume_from: str | None) -> Prepared:
        return await asyncio.to_thread(self._start, job_id, model_id, params, resume_from)

    def _start(self, job_id: str, model_id: str, params: RenderParams, resume_from: str | None) -> Prepared:
        from farm.render.denoise import layout_of
        from farm.render.engine import initial_state
        from farm.serve.checkpoints import read_checkpoint, write_conditioning

        state = None
        if resume_from and self.objects is not None:
            state = read_checkpoint(self.objects, self.retry, job_id, resume_from)
        if state is None:
            if params.source_key is not None:
                conditioning = self._video_stage(model_id).encode_job(params, self._source(job_id, params))
            else:
                conditioning = self.stages[model_id].encode_job(params, self._reference(job_id, params))
            state = initial_state(self.specs[model_id], params, conditioning)
            if self.objects is not None:  # once per job: shard checkpoints leave it out
                write_conditioning(self.objects, self.retry, job_id, conditioning)
        return Prepared(_put(state), layout_of(state), state.step_index, _replica_id())

    def _video_stage(self, model_id: str):
        """The model's video-to-video encoder stage; ValueError for a model that cannot derive from video."""
        from farm.render.families import get_family

        spec = self.specs[model_id]
        if not spec.takes_video:
            raise ValueError(f"video: model {model_id!r} (family {spec.family!r}) does not render from a video")
        if model_id not in self.video_stages:
            self.video_stages[model_id] = get_family("wan-v2v").load_encoder(spec)
        return self.video_stages[model_id]

    def _source(self, job_id: str, params: RenderParams) -> bytes:
        """The source MP4 of a remix, edit or extension, read from S3 (a missing one fails the job by name)."""
        from farm.jobs.publish import SourceUnavailable
        from farm.storage.s3 import ObjectNotFound

        objects, retry = self.references
        try:
            return retry.storage_call(f"job {job_id}: read source video", objects.get_bytes, params.source_key)
        except ObjectNotFound:
            raise SourceUnavailable(f"video: the source clip {params.source_key} is no longer in the object store "
                             "(its video was deleted or expired before this job started)") from None

    def _reference(self, job_id: str, params: RenderParams):
        """The job's reference image (read from S3), or None for a job without one."""
        if params.reference_key is None:
            return None
        from farm.render.reference import open_reference

        if self.references is None:
            raise ValueError(f"job {job_id}: has a reference image, but none of this encoder's models takes one")
        objects, retry = self.references
        return open_reference(retry.storage_call(f"job {job_id}: read reference", objects.get_bytes,
                                                 params.reference_key))


@serve.deployment(max_ongoing_requests=2)
class Denoiser:
    """One replica of one (model, expert) pool: holds that expert resident, runs step ranges."""

    def __init__(self, settings: dict, model_id: str, experts: list[str]) -> None:
        bind_replica_grpc_to_node_address()
        from farm.metrics import FarmMetrics
        from farm.render.engine import DenoiserStage, configure_torch
        from farm.serve.checkpoints import CheckpointWriter

        configure_torch()
        self.settings, objects, retry = _storage(settings, "denoiser")
        self.stage = DenoiserStage(self.settings.model(model_id), tuple(experts))
        self.pool = f"{model_id}:{'+'.join(experts)}"
        self.writer = CheckpointWriter(objects, retry) if objects is not None else None
        self.metrics = FarmMetrics()
        self.batcher = ShardBatcher(self._run_batch)

    async def run_shard(self, box: ObjectBox, plan: ShardPlan, checkpoint: str | None,
                        faults: list[dict] | None = None, batch: BatchTicket | None = None) -> ShardOutcome:
        """Steps ``[plan.start, plan.end)`` of the boxed state; ``faults`` are chaos faults for this job.

        With a ``batch`` ticket (the policy gave this replica several shards at once) the call waits for
        the batch's other calls and runs with them, one forward pass per step for all
        (:class:`~farm.serve.batching.ShardBatcher`); its ``seconds`` are its share of the batch's time.
        A job with chaos faults runs alone (its fault would hit the whole batch).

        Raises NonFiniteLatents when the shard left NaN/Inf latents (the denoise loop checks),
        StateLost when the input state's holder is gone.
        """
        state = await asyncio.to_thread(_get, box)
        tags = {"pool": self.pool}
        if batch is not None and batch.size > 1 and not faults:
            shared = await self.batcher.join(batch, (state, plan.start, plan.end))
            new_state, size, seconds = shared.value, shared.size, shared.seconds / shared.size
        else:
            started = time.perf_counter()
            new_state = await asyncio.to_thread(self._run, state, plan, faults)
            size, seconds = 1, time.perf_counter() - started
            self.metrics.shard_latency.observe(seconds, tags=tags)
        self.metrics.batch_size.observe(size, tags=tags)
        if checkpoint is not None and self.writer is not None:
            self.writer.start(checkpoint, new_state)
        else:
            checkpoint = None
        self.metrics.step_latency.observe(seconds / (plan.end - plan.start), tags=tags)
        return ShardOutcome(_put(new_state), _replica_id(), seconds, checkpoint, self.stage.device)

    def _run_batch(self, shards: list) -> list:
        """A gathered batch on this replica's experts (in the batcher's worker thread)."""
        started = time.perf_counter()
        out = self.stage.run_batch(shards)
        self.metrics.shard_latency.observe(time.perf_counter() - started, tags={"pool": self.pool})
        return out

    def _run(self, state, plan: ShardPlan, faults: list[dict] | None):
        import torch

        from farm.render.faults import injected

        try:
            with injected(self.stage.experts, [FaultInjection.model_validate(f) for f in faults or ()]):
                return self.stage.run(state, plan.start, plan.end, on_cache=self._cache_counted)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the allocator's cache back before the next shard
            raise

    def _cache_counted(self, stats) -> None:
        self.metrics.cache_counted(self.stage.spec.id, stats.kind, stats.lookups, stats.hits)

    async def checkpointed(self, key: str) -> bool:
        """Wait for the background write of ``key``; True once it is in S3."""
        return self.writer is not None and await self.writer.done(key)


@serve.deployment(max_ongoing_requests=1)
class Decoder:
    """One replica of the decode pool: the VAE of every served model (on a GPU when given one)."""

    def __init__(self, settings: dict) -> None:
        bind_replica_grpc_to_node_address()
        from farm.config import FarmSettings
        from farm.metrics import FarmMetrics
        from farm.render.engine import configure_torch
        from farm.render.families import get_family

        configure_torch()
        self.settings = FarmSettings.model_validate(settings)
        self.families = {spec.id: get_family(spec.family) for spec in self.settings.models}
        self.decoders = {spec.id: self.families[spec.id].load_decoder(spec) for spec in self.settings.models}
        self.metrics = FarmMetrics()

    async def decode(self, model_id: str, box: ObjectBox) -> Decoded:
        """The boxed final state → a boxed :class:`~farm.render.families.base.DecodedClip` (uint8 frames
        F×H×W×3, and the waveform where the model makes audio), and the decode's own time.

        A model with audio always decodes it (its VAE and vocoder are cheap beside the video VAE); the
        finisher drops it for a job that asked for none."""
        state = await asyncio.to_thread(_get, box)
        started = time.perf_counter()
        decoder = self.decoders[model_id]
        clip = await asyncio.to_thread(self.families[model_id].decode_clip, decoder, state)
        seconds = time.perf_counter() - started
        self.metrics.decode_latency.observe(seconds, tags={"model": model_id})
        return Decoded(_put(clip), seconds, decoder.device)


@serve.deployment(max_ongoing_requests=1)
class Finisher:
    """Watermark, MP4, thumbnail, spritesheet, C2PA, then upload to S3: CPU work beside decode."""

    def __init__(self, settings: dict) -> None:
        bind_replica_grpc_to_node_address()
        from farm.config import FarmSettings
        from farm.metrics import FarmMetrics
        from farm.storage.connect import open_store

        self.settings = FarmSettings.model_validate(settings)
        self.store = open_store(self.settings, start=False)
        self.metrics = FarmMetrics()
        if not self.settings.signer.has_credentials:
            # The farm's one dev CA (from its database) into this node's state folder, so a
            # finisher on any node signs with the chain `farm verify` trusts.
            from farm.finish.provenance import ensure_dev_credentials
            from farm.secrets import SharedSecrets

            shared = SharedSecrets(self.settings.job_store_url())
            ensure_dev_credentials(self.settings.state_dir / "c2pa", shared)
            shared.db.close()

    def finish(self, job_id: str, model_id: str, params: RenderParams, frames: ObjectBox) -> Finished:
        """The clip's object keys, and this replica's time for it (finishing and upload; CPU).

        ``frames`` boxes the decoder's DecodedClip: its frames, and its waveform (muxed as AAC when
        ``params.audio``)."""
        from farm.jobs.publish import audio_of, clip_keys, clip_record, finish_frames
        from farm.jobs.retry import RetryPolicy

        spec = self.settings.model(model_id)
        decoded = _get(frames)
        frames, audio = decoded.frames, audio_of(decoded)
        started = time.perf_counter()
        if params.stitch_seconds:  # an extension: the source first, then the new part
            frames = self._stitched(job_id, spec, params, frames)
        # A derived job's source clip is read from S3 (retried through outages) for its manifest.
        retry = RetryPolicy.from_settings(self.settings.render, _count_storage_errors("finisher"))
        with tempfile.TemporaryDirectory(prefix="finish-") as tmp:
            clip = finish_frames(self.settings, spec, params, frames, job_id, Path(tmp), self.store, retry,
                                 audio=audio)
            finished = time.perf_counter()
            self._upload(job_id, clip, clip_record(job_id, spec, params, int(frames.shape[0]), clip))
        tags = {"model": model_id}
        self.metrics.finish_latency.observe(finished - started, tags=tags)
        self.metrics.upload_latency.observe(time.perf_counter() - finished, tags=tags)
        for variant, size in (("video", clip.video_bytes), ("thumbnail", clip.thumbnail_bytes),
                              ("spritesheet", clip.spritesheet_bytes)):
            self.metrics.upload_bytes.inc(size, tags={"variant": variant})
        return Finished(clip_keys(job_id), time.perf_counter() - started, "cpu")

    def _stitched(self, job_id: str, spec: ModelSpec, params: RenderParams, frames):
        """The source resampled to ``stitch_seconds × fps + 1`` frames of the clip's size, then the new
        frames without their first (it stands where the source's last frame is): one clip of
        ``(stitch_seconds + seconds) × fps + 1`` frames."""
        from farm.jobs.retry import RetryPolicy
        from farm.render.source import stitch_extension

        policy = RetryPolicy.from_settings(self.settings.render, _count_storage_errors("finisher"))
        data = policy.storage_call(f"job {job_id}: read source video", self.store.get_bytes, params.source_key)
        return stitch_extension(data, frames, spec.num_frames(params.stitch_seconds))

    def _upload(self, job_id: str, clip, record: dict) -> None:
        """Upload the clip, retrying while S3 is unreachable (for at most render.storage_retry_s).

        Every object goes to a fixed key, so an attempt after a partial one overwrites, never
        duplicates. A multipart upload cut off by an outage may stay open (its
        abort failed too), so once S3 answers again the clip's leftovers are aborted.
        """
        from farm.jobs.publish import upload_finished
        from farm.jobs.retry import RetryPolicy
        from farm.storage.s3 import ClipLayout

        policy = RetryPolicy.from_settings(self.settings.render, _count_storage_errors("finisher"))
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
    """StageClients over Serve handles, one handle per replica: what the dispatcher calls on a cluster."""

    def __init__(self, replicas: dict[str, list[tuple[str, object]]], finisher, faults=()) -> None:
        self.pools = {pool: [rid for rid, _ in members] for pool, members in replicas.items()}
        self.handles = {rid: handle for members in replicas.values() for rid, handle in members}
        self.finisher = finisher
        self.faults = [FaultInjection.model_validate(f) for f in faults]

    def replicas(self) -> dict[str, list[str]]:
        return self.pools

    async def _call(self, what: str, response):
        from ray.exceptions import ObjectLostError

        try:
            return await response
        except _lost_replica_errors() as exc:
            raise ReplicaLost(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from exc
        except ObjectLostError as exc:
            raise StateLost(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from exc

    async def start(self, replica, job_id, model_id, params, resume_from):
        return await self._call(replica, self.handles[replica].start.remote(job_id, model_id, params, resume_from))

    async def run_shard(self, replica, job_id, model_id, state, plan, *, checkpoint, prompt="", batch=None):
        faults = [f.model_dump() for f in matching(self.faults, prompt)]
        return await self._call(replica, self.handles[replica].run_shard.remote(state, plan, checkpoint, faults,
                                                                                 batch))

    async def checkpointed(self, replica, key):
        return await self._call(replica, self.handles[replica].checkpointed.remote(key))

    async def decode(self, replica, job_id, model_id, state):
        return await self._call(replica, self.handles[replica].decode.remote(model_id, state))

    async def finish(self, job_id, model_id, params, frames):
        return await self._call("finisher", self.finisher.finish.remote(job_id, model_id, params, frames))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@serve.deployment(num_replicas=1, max_ongoing_requests=16)
class DispatcherDeployment:
    """Hosts the dispatcher loop; the gateway wakes it when a job is created."""

    def __init__(self, settings: dict, replicas: dict[str, list[tuple[str, object]]], finisher) -> None:
        bind_replica_grpc_to_node_address()
        from farm.builders import pool_batch_limits
        from farm.config import FarmSettings
        from farm.db import Database
        from farm.jobs.dispatcher import Dispatcher
        from farm.jobs.retry import RetryPolicy
        from farm.jobs.store import JobStore
        from farm.metrics import FarmMetrics
        from farm.sched import SchedulerConfig
        from farm.storage.connect import open_store

        self.settings = FarmSettings.model_validate(settings)
        db = Database(self.settings.job_store_url())  # one pool for the jobs and the batches
        store = JobStore(db)
        render = self.settings.render
        stages = ServeStages(replicas, finisher, faults=render.faults)
        self.batches = _batch_runner(self.settings, db, store, leading=lambda: self.dispatcher.leading,
                                     wake=lambda: self.dispatcher.wake())
        self.reaper = _clip_reaper(self.settings, db, leading=lambda: self.dispatcher.leading)
        self.dispatcher = Dispatcher(
            store, stages, self.settings.models,
            objects=open_store(self.settings, start=False) if render.checkpoints else None,
            max_in_flight=render.max_jobs_in_flight, shard_steps=render.shard_steps,
            worker="dispatcher", metrics=FarmMetrics(),
            policy=RetryPolicy.from_settings(render, _count_storage_errors("dispatcher")),
            scheduling=SchedulerConfig(tenant_weights=dict(render.tenant_weights), bulk_aging_s=render.bulk_aging_s,
                                       pool_max_batch=pool_batch_limits(self.settings)),
            leader_lease_s=render.leader_lease_s, budgets=self.settings.budgets.rule(),
            leader_work=self._leader_work,
        )
        self._task = asyncio.get_running_loop().create_task(self.dispatcher.run())

    def _leader_work(self) -> None:
        """What only the leader does besides jobs, on every turn of its loop (each starts its own
        thread at its own pace): batches and schedules, and the reaper of expired clips."""
        self.batches.tick()
        self.reaper.tick()

    def wake(self) -> None:
        self.dispatcher.wake()

    def snapshot(self):
        """Where the jobs it drives stand, for the gateways' queue positions and estimates."""
        return self.dispatcher.snapshot()

    async def drain(self) -> None:
        """Stop claiming and hand running jobs back to the queue at their next shard boundary
        (first step of `farm down`)."""
        await self.dispatcher.stop(drain_s=self.settings.render.drain_s)

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

    async def __del__(self) -> None:  # Serve calls this on graceful replica shutdown (rolling update)
        await self.dispatcher.stop(drain_s=self.settings.render.drain_s)


def _batch_runner(settings, db, store, *, leading, wake):
    """Batches advance and schedules fire in the dispatcher that leads: the one process the leader
    lease already makes unique, so a standby takes both over with the jobs."""
    from farm.api.batch_lines import BatchLineRules
    from farm.api.uploads import UploadLimits
    from farm.jobs.batch_runner import BatchRunner
    from farm.jobs.expiry import Lifetimes
    from farm.jobs.schedules import ScheduleStore
    from farm.metrics import FarmMetrics
    from farm.policy.index import RegistryCache
    from farm.policy.cameos import CharacterStore
    from farm.policy.moderation import build_moderator
    from farm.policy.registry import PolicyStore
    from farm.storage.connect import open_store

    b, ss = settings.batches, settings.serve
    schedules = ScheduleStore(db)
    # Batch lines (and so every schedule run) pass the same content policy as POST /v1/videos.
    # With the cameo store, so a batch line that uses a cameo is refused by name (farm.policy.moderation).
    moderator = build_moderator(settings.policy, RegistryCache(PolicyStore(db), refresh_s=settings.policy.refresh_s),
                                CharacterStore(db))
    metrics = FarmMetrics()
    rules = BatchLineRules(settings.models, max_prompt_chars=ss.max_prompt_chars, upload_limits=UploadLimits(
        max_bytes=int(ss.max_upload_mb * 1024 * 1024), max_pixels=ss.max_upload_pixels),
        aliases=settings.model_aliases, moderator=moderator,
        on_refused=lambda rule, kind: metrics.video_refused(rule, kind, "batch"))
    return BatchRunner(schedules.batches, schedules, store, lambda: open_store(settings, start=False), rules,
                       max_queued_per_batch=b.max_queued_per_batch, max_line_bytes=int(b.max_line_kb * 1024),
                       poll_s=b.poll_s, misfire_grace_s=b.misfire_grace_s, leading=leading, on_queued=wake,
                       lifetime_of=Lifetimes(db, settings.expiry.rule()).lifetime_of)


def _clip_reaper(settings, db, *, leading):
    """Expired clips are reaped in the dispatcher that leads, for the batch runner's reason: the
    leader lease makes it one process on one node."""
    from farm.jobs.expiry import Lifetimes
    from farm.jobs.reaper import ClipReaper
    from farm.metrics import FarmMetrics
    from farm.storage.connect import open_store

    e = settings.expiry
    return ClipReaper(Lifetimes(db, e.rule()), lambda: open_store(settings, start=False), batch=e.reaper_batch,
                      poll_s=e.reaper_poll_s, leading=leading, metrics=FarmMetrics())


def _name(priority: int) -> str:
    from farm.jobs.store import Priority

    return Priority(priority).name.lower()
