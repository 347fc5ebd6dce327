"""The dispatcher: drives each job through its stages, from the job store's truth.

    claim (priority, then oldest) → prepare (text encoding, noise) → denoise shards
    → finish (decode, watermark, MP4, C2PA, upload) → completed

Ray Serve has no priorities and cancels only at an ``await``: both live here, at shard
boundaries. After every shard the state is checkpointed to S3 and progress written to
the store, so a dispatcher that dies and restarts resumes each job from its last shard.
The stages are reached through :class:`StageClients`, so the same loop drives Serve
deployments on a cluster or in-process stages in tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Protocol

from farm.jobs.store import Job, JobStore, Priority
from farm.render.denoise import DenoiseState, plan_shards
from farm.render.registry import ModelSpec, RenderParams, parse_size

log = logging.getLogger(__name__)
_HISTORY = 64  # jobs whose shard history and final latents are kept in memory


@dataclass(frozen=True)
class ShardOutcome:
    """What a denoiser replica hands back: the new state and who ran it."""

    state: DenoiseState
    replica: str
    seconds: float


@dataclass(frozen=True)
class ShardRecord:
    start: int
    end: int
    expert: str
    replica: str
    seconds: float


class StageClients(Protocol):
    async def prepare(self, model_id: str, params: RenderParams) -> DenoiseState: ...

    async def run_shard(self, model_id: str, expert: str, state: DenoiseState, start: int, end: int) -> ShardOutcome: ...

    async def finish(self, job_id: str, model_id: str, params: RenderParams, latents) -> dict[str, str]: ...


class JobCancelled(Exception):
    pass


def checkpoint_key(job_id: str) -> str:
    return f"checkpoints/{job_id}/state.pt"


def params_of(job: Job, spec: ModelSpec) -> RenderParams:
    """The job row's request, as the render stages take it."""
    width, height = parse_size(job.size)
    extra = job.params or {}
    return RenderParams(
        prompt=job.prompt,
        width=width,
        height=height,
        seconds=int(job.seconds),
        steps=int(extra.get("steps") or spec.default_steps),
        seed=int(extra.get("seed") or 0),
        scheduler=extra.get("scheduler", "unipc"),
    )


class Dispatcher:
    """One per farm (a lease in the store keeps a second one from double-running a job)."""

    def __init__(
        self,
        store: JobStore,
        clients: StageClients,
        models: list[ModelSpec],
        *,
        objects=None,
        max_active: int = 2,
        shard_steps: int = 4,
        lease_s: float = 120.0,
        poll_s: float = 0.5,
        worker: str | None = None,
        metrics=None,
    ) -> None:
        self.store = store
        self.clients = clients
        self.models = {m.id: m for m in models}
        self.objects = objects  # an ObjectStore for checkpoints; None disables them
        self.max_active = max_active
        self.shard_steps = shard_steps
        self.lease_s = lease_s
        self.poll_s = poll_s
        # A stable name lets a restarted dispatcher take its own running jobs straight back.
        self.worker = worker or f"dispatcher-{uuid.uuid4().hex[:8]}"
        self.metrics = metrics  # a FarmMetrics, or None outside Ray
        self._depth_at = 0.0
        # Recent history for `farm status` and tests: shards per job, final latents.
        self.shards: dict[str, list[ShardRecord]] = defaultdict(list)
        self.final_latents: OrderedDict[str, object] = OrderedDict()
        self._active: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._stopping = False

    # Lifecycle ------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Claim and drive jobs until :meth:`stop`."""
        log.info("dispatcher %s started (max_active=%d)", self.worker, self.max_active)
        for job_id in await asyncio.to_thread(self.store.held_by, self.worker):
            # Ours from before a restart: back to the queue, to resume from its checkpoint.
            await asyncio.to_thread(self.store.requeue, job_id, self.worker, "dispatcher restarted")
        while not self._stopping:
            await self._report_depth()
            claimed = False
            if len(self._active) < self.max_active:
                job = await asyncio.to_thread(self.store.claim_next, self.worker, self.lease_s)
                if job is not None:
                    claimed = True
                    self._observe_claim(job)
                    task = asyncio.create_task(self._drive(job), name=job.id)
                    self._active[job.id] = task
                    task.add_done_callback(lambda _t, jid=job.id: self._done(jid))
            if not claimed:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
                except asyncio.TimeoutError:
                    pass

    async def _report_depth(self) -> None:
        if self.metrics is None or time.monotonic() - self._depth_at < 1.0:
            return
        self._depth_at = time.monotonic()
        for priority, depth in (await asyncio.to_thread(self.store.queue_depths)).items():
            self.metrics.queue_depth.set(depth, tags={"priority": _priority_name(priority)})

    def _observe_claim(self, job: Job) -> None:
        if self.metrics is not None and job.attempts == 1 and job.started_at is not None:
            wait = (job.started_at - job.created_at).total_seconds()
            self.metrics.queue_wait.observe(max(wait, 0.0), tags={"model": job.model, "priority": _priority_name(job.priority)})

    def _done(self, job_id: str) -> None:
        self._active.pop(job_id, None)
        self._wake.set()  # a slot freed up

    async def stop(self) -> None:
        """Stop claiming; give running jobs back to the queue (they resume from their checkpoint)."""
        self._stopping = True
        self._wake.set()
        active = dict(self._active)
        for task in active.values():
            task.cancel()  # interrupts at the next await: a shard boundary or a store call
        await asyncio.gather(*active.values(), return_exceptions=True)
        for job_id in active:
            await asyncio.to_thread(self.store.requeue, job_id, self.worker, "dispatcher stopping")

    def _remember(self, job_id: str, latents) -> None:
        self.final_latents[job_id] = latents
        while len(self.final_latents) > _HISTORY:
            evicted, _ = self.final_latents.popitem(last=False)
            self.shards.pop(evicted, None)

    def status(self) -> dict:
        return {"worker": self.worker, "active": sorted(self._active), "max_active": self.max_active}

    # One job ----------------------------------------------------------------------
    async def _drive(self, job: Job) -> None:
        try:
            spec = self.models.get(job.model)
            if spec is None:
                await self._fail(job, "model_unavailable", f"model {job.model!r} is not served by this farm")
                return
            params = params_of(job, spec)
            state = await self._resume_or_prepare(job, spec, params)
            for plan in plan_shards(state, self.shard_steps):
                await self._check_cancel(job)
                sent = time.perf_counter()
                outcome = await self.clients.run_shard(spec.id, plan.expert, state, plan.start, plan.end)
                if self.metrics is not None:
                    handoff = max(time.perf_counter() - sent - outcome.seconds, 0.0)
                    self.metrics.shard_handoff.observe(handoff, tags={"pool": f"{spec.id}:{plan.expert}"})
                state = outcome.state
                self.shards[job.id].append(ShardRecord(plan.start, plan.end, plan.expert, outcome.replica, outcome.seconds))
                await self._after_shard(job, state)
            await self._check_cancel(job)
            self._remember(job.id, state.latents)
            objects = await self.clients.finish(job.id, spec.id, params, state.latents)
            if not await asyncio.to_thread(self.store.complete, job.id, self.worker, objects):
                log.warning("job %s: lease lost before completion; another worker owns it", job.id)
            elif self.metrics is not None:
                self.metrics.jobs_completed.inc(1, tags={"model": job.model})
                done = await asyncio.to_thread(self.store.get, job.id)
                if done is not None and done.completed_at is not None:
                    latency = (done.completed_at - done.created_at).total_seconds()
                    self.metrics.job_latency.observe(latency, tags={"model": job.model})
            await self._drop_checkpoint(job)
        except JobCancelled:
            await asyncio.to_thread(self.store.finish_cancelled, job.id, self.worker)
            await self._drop_checkpoint(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one job's failure must not stop the farm
            log.exception("job %s failed", job.id)
            await self._fail(job, _error_code(exc), f"{type(exc).__name__}: {exc}")

    async def _resume_or_prepare(self, job: Job, spec: ModelSpec, params: RenderParams) -> DenoiseState:
        if job.checkpoint_key and self.objects is not None:
            data = await asyncio.to_thread(self.objects.get_bytes, job.checkpoint_key)
            state = DenoiseState.from_bytes(data)
            log.info("job %s resumes at step %d/%d from %s", job.id, state.step_index, state.num_steps, job.checkpoint_key)
            return state
        return await self.clients.prepare(spec.id, params)

    async def _after_shard(self, job: Job, state: DenoiseState) -> None:
        key = None
        if self.objects is not None and not state.done:
            key = checkpoint_key(job.id)
            await asyncio.to_thread(self.objects.put_bytes, key, state.to_bytes(), "application/octet-stream")
        # Denoising is 0–95 %; finishing takes the rest.
        progress = int(95 * state.step_index / state.num_steps)
        held = await asyncio.to_thread(
            self.store.record_progress,
            job.id,
            self.worker,
            step_index=state.step_index,
            num_steps=state.num_steps,
            progress=progress,
            checkpoint_key=key,
            lease_s=self.lease_s,
        )
        if not held:
            raise JobCancelled() if await self._cancel_requested(job) else RuntimeError("lease lost")

    async def _cancel_requested(self, job: Job) -> bool:
        current = await asyncio.to_thread(self.store.get, job.id)
        return current is None or current.cancel_requested

    async def _check_cancel(self, job: Job) -> None:
        if await self._cancel_requested(job):
            raise JobCancelled()

    async def _drop_checkpoint(self, job: Job) -> None:
        if self.objects is not None:
            await asyncio.to_thread(self.objects.delete_prefix, f"checkpoints/{job.id}/")

    async def _fail(self, job: Job, code: str, message: str) -> None:
        failed = await asyncio.to_thread(self.store.fail, job.id, self.worker, code, message[:500])
        if failed and self.metrics is not None:
            self.metrics.jobs_failed.inc(1, tags={"model": job.model, "reason": code})


def _priority_name(priority: int) -> str:
    try:
        return Priority(priority).name.lower()
    except ValueError:
        return str(priority)


def _error_code(exc: Exception) -> str:
    name = type(exc).__name__.lower()
    if "outofmemory" in name:
        return "out_of_memory"
    return "render_error"


async def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout``; used by callers waiting on jobs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()
