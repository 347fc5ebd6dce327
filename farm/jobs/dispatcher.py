"""The dispatcher: drives each job through its stages, from the job store's truth.

    claim (priority, then oldest) → prepare (text encoding, noise) → denoise shards
    → finish (decode, watermark, MP4, C2PA, upload) → completed

Ray Serve has no priorities and cancels only at an ``await``: both live here, at shard
boundaries. After every shard the state is checkpointed to S3 and progress written to
the store, so a dispatcher that dies and restarts resumes each job from its last shard.
A stage call that fails is retried by the policy in :mod:`farm.jobs.retry`: a dead
replica's shard is redone from the state it started with (the last checkpoint), a model
that fails gets ``shard_retries`` more tries, storage outages are waited out within a budget.
The stages are reached through :class:`StageClients`, so the same loop drives Serve
deployments on a cluster or in-process stages in tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from farm.jobs.retry import ReplicaLost, RetryPolicy, is_transient_storage_error, render_errors
from farm.jobs.store import Job, JobStore, Priority
from farm.render.denoise import DenoiseState, NonFiniteLatents, ShardPlan, plan_shards
from farm.render.registry import ModelSpec, RenderParams, parse_size
from farm.storage.s3 import checkpoint_prefix

log = logging.getLogger(__name__)
_HISTORY = 64  # jobs whose shard history and final latents are kept in memory
T = TypeVar("T")


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


@dataclass(frozen=True)
class RetryRecord:
    """One retried stage call, for `farm status` and tests."""

    job_id: str
    stage: str  # "prepare", "shard 4-8", "finish"
    reason: str  # an error code: replica_lost, non_finite_latents, out_of_memory
    retry: int
    delay_s: float
    error: str


class StageClients(Protocol):
    async def prepare(self, model_id: str, params: RenderParams) -> DenoiseState: ...

    async def run_shard(
        self, model_id: str, expert: str, state: DenoiseState, start: int, end: int, *, prompt: str = ""
    ) -> ShardOutcome: ...

    async def finish(self, job_id: str, model_id: str, params: RenderParams, latents) -> dict[str, str]: ...


class JobCancelled(Exception):
    pass


def checkpoint_key(job_id: str) -> str:
    return f"{checkpoint_prefix(job_id)}state.pt"


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
        policy: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.clients = clients
        self.models = {m.id: m for m in models}
        self.objects = objects  # an ObjectStore for checkpoints; None disables them
        self.policy = policy or RetryPolicy()
        self.max_active = max_active
        self.shard_steps = shard_steps
        self.lease_s = lease_s
        self.poll_s = poll_s
        # Leases carry role:instance. The role lets a restarted dispatcher take its jobs straight
        # back; the instance fences the old one, whose writes then miss (no job runs twice).
        self.role = worker or "dispatcher"
        self.worker = f"{self.role}:{uuid.uuid4().hex[:12]}"
        self.metrics = metrics  # a FarmMetrics, or None outside Ray
        self._depth_at = 0.0
        # Recent history for `farm status` and tests: shards per job, final latents.
        self.shards: dict[str, list[ShardRecord]] = defaultdict(list)
        self.final_latents: OrderedDict[str, object] = OrderedDict()
        self.retries: deque[RetryRecord] = deque(maxlen=200)
        self.resumed: deque[dict] = deque(maxlen=200)  # {"job_id", "step"}: jobs picked up from a checkpoint
        self._active: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._stopping = False

    # Lifecycle ------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Claim and drive jobs until :meth:`stop`."""
        log.info("dispatcher %s started (max_active=%d)", self.worker, self.max_active)
        for job_id, owner in await asyncio.to_thread(self.store.leases_of, self.role):
            # A dead predecessor's: back to the queue (the lost run counts as an attempt),
            # to resume from its checkpoint.
            await asyncio.to_thread(
                lambda: self.store.requeue(job_id, owner, f"taken back by {self.worker}", voluntary=False))
        while not self._stopping:
            await self._report_depth()
            claimed = False
            if len(self._active) < self.max_active:
                job = await asyncio.to_thread(
                    lambda: self.store.claim_next(self.worker, self.lease_s, max_attempts=self.policy.max_attempts))
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
        return {
            "worker": self.worker, "active": sorted(self._active), "max_active": self.max_active,
            "retries": [vars(r) for r in list(self.retries)[-20:]],
            "resumed": list(self.resumed)[-20:],
        }

    # One job ----------------------------------------------------------------------
    async def _drive(self, job: Job) -> None:
        lease = asyncio.create_task(self._keep_lease(job, asyncio.current_task()), name=f"lease-{job.id}")
        try:
            spec = self.models.get(job.model)
            if spec is None:
                await self._fail(job, "model_unavailable", f"model {job.model!r} is not served by this farm")
                return
            params = params_of(job, spec)
            state = await self._resume_or_prepare(job, spec, params)
            for plan in plan_shards(state, self.shard_steps):
                await self._check_cancel(job)
                # A failed shard is sent again with the same input state: the last checkpoint.
                outcome = await self._call_stage(
                    job, f"shard {plan.start}-{plan.end}",
                    lambda plan=plan, state=state: self._timed_shard(job, spec, plan, state),
                )
                state = outcome.state
                self.shards[job.id].append(ShardRecord(plan.start, plan.end, plan.expert, outcome.replica, outcome.seconds))
                await self._after_shard(job, state)
            await self._check_cancel(job)
            self._remember(job.id, state.latents)
            objects = await self._call_stage(
                job, "finish", lambda: self.clients.finish(job.id, spec.id, params, state.latents)
            )
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
            if await self._fail(job, _error_code(exc), f"{type(exc).__name__}: {exc}"):
                await self._drop_checkpoint(job)  # only while the job is still ours
        finally:
            lease.cancel()

    async def _keep_lease(self, job: Job, driver: asyncio.Task | None) -> None:
        """Renew the lease while the job waits (a storage outage, a slow finish), so the
        store never sees it as abandoned and hands it out a second time; stop driving the
        job at once if the lease is gone (taken back, deleted)."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if await asyncio.to_thread(self.store.renew, job.id, self.worker, self.lease_s):
                    continue
                current = await asyncio.to_thread(self.store.get, job.id)
            except Exception:  # the next shard's progress write renews it too
                log.warning("job %s: lease renewal failed", job.id, exc_info=True)
                continue
            if current is not None and current.lease_owner == self.worker:
                continue  # only a cancel request: the drive loop stops at the shard boundary
            log.warning("job %s: lease lost to %s; no longer driving it", job.id,
                        current.lease_owner if current else "a delete")
            if driver is not None:
                driver.cancel()
            return

    async def _timed_shard(self, job: Job, spec: ModelSpec, plan: ShardPlan, state: DenoiseState) -> ShardOutcome:
        sent = time.perf_counter()
        outcome = await self.clients.run_shard(spec.id, plan.expert, state, plan.start, plan.end, prompt=job.prompt)
        if self.metrics is not None:
            handoff = max(time.perf_counter() - sent - outcome.seconds, 0.0)
            self.metrics.shard_handoff.observe(handoff, tags={"pool": f"{spec.id}:{plan.expert}"})
        return outcome

    async def _call_stage(self, job: Job, stage: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retried by the policy: a lost replica up to ``replica_retries`` times,
        a render error up to ``shard_retries`` times, each after a growing delay."""
        lost = failed = 0
        while True:
            try:
                async with asyncio.timeout(self.policy.stage_timeout_s):
                    return await call()
            except TimeoutError:  # a hung replica is as good as lost
                lost += 1
                if lost > self.policy.replica_retries:
                    raise ReplicaLost(f"{stage} did not finish in {self.policy.stage_timeout_s:.0f}s") from None
                retry, error = lost, ReplicaLost(f"{stage} timed out after {self.policy.stage_timeout_s:.0f}s")
            except ReplicaLost as exc:
                lost += 1
                if lost > self.policy.replica_retries:
                    raise
                retry, error = lost, exc
            except render_errors() as exc:
                failed += 1
                if failed > self.policy.shard_retries:
                    raise
                retry, error = failed, exc
            delay = self.policy.delay(retry)
            reason = _error_code(error)
            first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            log.warning("job %s: %s failed (%s), retry %d in %.1fs: %s", job.id, stage, reason, retry, delay, first_line)
            self.retries.append(RetryRecord(job.id, stage, reason, retry, round(delay, 3), first_line))
            await asyncio.sleep(delay)
            await self._check_cancel(job)

    async def _resume_or_prepare(self, job: Job, spec: ModelSpec, params: RenderParams) -> DenoiseState:
        if job.checkpoint_key and self.objects is not None:
            data = await self.policy.storage_call_async(
                f"job {job.id}: read checkpoint", asyncio.to_thread, self.objects.get_bytes, job.checkpoint_key
            )
            state = DenoiseState.from_bytes(data)
            log.info("job %s resumes at step %d/%d from %s", job.id, state.step_index, state.num_steps, job.checkpoint_key)
            self.resumed.append({"job_id": job.id, "step": state.step_index})
            return state
        return await self._call_stage(job, "prepare", lambda: self.clients.prepare(spec.id, params))

    async def _after_shard(self, job: Job, state: DenoiseState) -> None:
        key = None
        if self.objects is not None and not state.done:
            key = checkpoint_key(job.id)
            await self.policy.storage_call_async(
                f"job {job.id}: write checkpoint", asyncio.to_thread,
                self.objects.put_bytes, key, state.to_bytes(), "application/octet-stream",
            )
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
        """Best effort: a leftover checkpoint costs storage, never correctness (a finished job is not resumed)."""
        if self.objects is None:
            return
        try:
            await self.policy.storage_call_async(
                f"job {job.id}: drop checkpoint", asyncio.to_thread, self.objects.delete_prefix, checkpoint_prefix(job.id)
            )
        except Exception:
            log.warning("job %s: its checkpoint was not deleted", job.id, exc_info=True)

    async def _fail(self, job: Job, code: str, message: str) -> bool:
        failed = await asyncio.to_thread(self.store.fail, job.id, self.worker, code, message[:500])
        if failed and self.metrics is not None:
            self.metrics.jobs_failed.inc(1, tags={"model": job.model, "reason": code})
        return failed


def _priority_name(priority: int) -> str:
    try:
        return Priority(priority).name.lower()
    except ValueError:
        return str(priority)


def _error_code(exc: BaseException) -> str:
    """The job's error code for a failure (isinstance also matches Ray's RayTaskError(cls) wrappers)."""
    if isinstance(exc, NonFiniteLatents):
        return "non_finite_latents"
    if isinstance(exc, torch.OutOfMemoryError) or "outofmemory" in type(exc).__name__.lower():
        return "out_of_memory"  # torch's, or Ray's memory monitor killing a worker
    if isinstance(exc, ReplicaLost):
        return "replica_lost"
    if is_transient_storage_error(exc):
        return "storage_unavailable"
    return "render_error"


async def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout``; used by callers waiting on jobs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()
