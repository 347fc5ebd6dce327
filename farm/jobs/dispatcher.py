"""The dispatcher: drives each job through its stages, from the job store's truth, scheduling
every stage call on a replica the policy picks.

    claim → encode (or resume from a checkpoint) → denoise shards → decode → finish → completed

Every stage that needs compute runs on a pool of replicas — the encoder pool, one pool per
(model, expert), the decode pool — and each call waits for a replica in
:class:`~farm.jobs.placement.Placement`, where the scheduling policy decides at every shard
boundary: interactive before bulk, fair share between tenants, affinity to the replica that
holds the job's state. A bulk job whose shard just ended gives its replica up to waiting
interactive work and resumes from exactly its state when it next gets one.

States never pass through here. Stage replicas hand each other *references* (Ray object refs
on a cluster): the encoder's reply carries a reference to the initial state, each denoiser's
reply a reference to the next one. The replica that made a state writes its checkpoint to S3
in the background; this process only waits for the write's acknowledgement, beside the next
shard, and records the key in the store, so a restarted dispatcher resumes from the last
acknowledged checkpoint. It holds keys, progress and leases; it imports no torch.

A stage call that fails is retried by :mod:`farm.jobs.retry`'s policy: a lost replica's call is
redone from the state it started with, a model that fails gets ``shard_retries`` more tries,
storage outages are waited out within a budget. ``stage_timeout_s`` counts a call's run on its
replica, never its wait for one. A state whose holder died before anyone read it is
reloaded from the last checkpoint, without counting as an attempt.

Usage: every denoise shard, decode and finish reply carries the replica's own wall time for the
work and its device; as each completes, the dispatcher records it in the store's usage ledger
(:mod:`farm.jobs.usage`, once per job and stage) and counts it in
``videofarm_accelerator_seconds_total``. Every ``budget_poll_s`` it reads which accounts have
spent today's budget (``budgets``): their queued bulk jobs are not claimed and their running
bulk jobs' next shards wait (``Placement.hold_bulk``) until the UTC day turns or the operator
raises the budget; interactive work runs on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from farm.jobs.estimates import InFlight, ModelCosts, QueueSnapshot
from farm.jobs.placement import DECODE_POOL, ENCODE_POOL, FINISH_POOL, Placement, StageRequest
from farm.jobs.retry import ReplicaLost, RetryPolicy, is_render_error, is_transient_storage_error
from farm.jobs.store import Job, JobStore, Priority
from farm.jobs.usage import device_kind
from farm.render.plan import HIGH_NOISE_EXPERT, ShardPlan, StepLayout, plan_shards
from farm.render.registry import DERIVED_FROM_PARAM, REFERENCE_KEY_PARAM, ModelSpec, RenderParams, parse_size
from farm.sched import BatchTicket, SchedulerConfig
from farm.sched.budget import BudgetRule
from farm.storage.s3 import checkpoint_prefix

log = logging.getLogger(__name__)
T = TypeVar("T")
FINISH_STAGE = "finish"  # the finisher is no pool (Serve routes it); its measured cost is kept under this name


@dataclass(frozen=True)
class Prepared:
    """The encoder's reply: a reference to the job's state and where in its schedule it stands."""

    state: Any  # an opaque state reference (a Ray object ref box on a cluster)
    layout: StepLayout  # which expert owns each step
    step_index: int  # 0, or the step of the checkpoint it resumed from
    replica: str = ""


@dataclass(frozen=True)
class ShardOutcome:
    """A denoiser's reply: a reference to the new state, who made it, and its checkpoint (pending)."""

    state: Any
    replica: str
    seconds: float  # the shard's run on its replica
    checkpoint: str | None = None  # key being written in the background; None: no checkpoint
    device: str = "cpu"  # where it ran: cpu, cuda, cuda:1 …


@dataclass(frozen=True)
class Decoded:
    """A decoder's reply: a reference to the frames, and the decode's run on its replica."""

    frames: Any
    seconds: float
    device: str = "cpu"


@dataclass(frozen=True)
class Finished:
    """The finisher's reply: the clip's object keys, and its run (watermark … upload) on its replica."""

    objects: dict[str, str]
    seconds: float
    device: str = "cpu"


@dataclass(frozen=True)
class RetryRecord:
    """One retried stage call, for `farm status` and tests."""

    job_id: str
    stage: str  # "encode", "shard 4-8", "decode", "finish"
    reason: str  # an error code: replica_lost, non_finite_latents, out_of_memory
    retry: int
    delay_s: float
    error: str


class Drained(Exception):
    """The dispatcher is stopping: the job stopped at a shard boundary, its checkpoint current."""


class StateLost(Exception):
    """A state reference can no longer be read (its holder died): reload from the checkpoint."""


class StageClients(Protocol):
    """The stages, reached by replica id (ids come from :meth:`replicas`)."""

    def replicas(self) -> dict[str, list[str]]: ...

    async def start(self, replica: str, job_id: str, model_id: str, params: RenderParams,
                    resume_from: str | None) -> Prepared: ...

    async def run_shard(self, replica: str, job_id: str, model_id: str, state: Any, plan: ShardPlan, *,
                        checkpoint: str | None, prompt: str = "", batch: BatchTicket | None = None) -> ShardOutcome:
        """Steps ``plan`` of the job's state on ``replica``; ``batch`` names the batch the policy put the
        shard in (None: it runs alone)."""
        ...

    async def checkpointed(self, replica: str, key: str) -> bool: ...

    async def decode(self, replica: str, job_id: str, model_id: str, state: Any) -> Decoded: ...

    async def finish(self, job_id: str, model_id: str, params: RenderParams, frames: Any) -> Finished: ...


class JobCancelled(Exception):
    pass


def batch_key(spec: ModelSpec, params: RenderParams, plan: ShardPlan, job_id: str) -> tuple:
    """Which shards may share a batched forward (farm.sched's batch key): the same model and expert, latent
    shape (size, duration), shard length and kind of conditioning. A job with cache acceleration batches
    with nobody (a cache hook decides for a whole batch): its key names the job."""
    cached = (params.cache or spec.cache).kind != "off"
    return (spec.id, plan.expert, params.width, params.height, params.seconds, plan.end - plan.start,
            params.source_key is not None, params.reference_key is not None, job_id if cached else None)


def shard_checkpoint_key(job_id: str, step: int) -> str:
    return f"{checkpoint_prefix(job_id)}state-{step:06d}.pt"


def conditioning_key(job_id: str) -> str:
    return f"{checkpoint_prefix(job_id)}conditioning.pt"


def params_of(job: Job, spec: ModelSpec) -> RenderParams:
    """The job row's request, as the render stages take it."""
    width, height = parse_size(job.size)
    extra = job.params or {}
    # A remix, edit or extension renders video-to-video from its source (see farm.render.families.wan_v2v).
    derived = extra.get(DERIVED_FROM_PARAM) or {}
    extend = derived.get("action") == "extend"
    return RenderParams(
        prompt=job.prompt,
        width=width,
        height=height,
        seconds=int(job.seconds),
        steps=int(extra.get("steps") or spec.default_steps),
        seed=int(extra.get("seed") or 0),
        scheduler=extra.get("scheduler") or spec.schedulers[0],
        audio=bool(extra.get("audio", spec.audio)) and spec.audio,  # the gateway records it for audio models
        reference_key=extra.get(REFERENCE_KEY_PARAM),
        derived_from=extra.get("derived_from"),
        source_key=derived.get("key"),
        strength=extra.get("strength") if derived else None,
        source_frames="last" if extend else "clip",
        stitch_seconds=extra.get("stitch_seconds") if extend else None,
        cache=extra.get("cache"),  # the request's own cache setting; None: the model's default
    )


@dataclass
class _Flight:
    """A job this dispatcher is driving."""

    job: Job
    task: asyncio.Task
    checkpoints: list[asyncio.Task] = field(default_factory=list)  # acknowledgements awaited, in step order
    newest: str | None = None  # the key of the newest recorded checkpoint
    # Where it stands, for queue positions and estimates (``snapshot``).
    stage: str = "encode"  # encode | denoise | decode | finish: the stage it runs or waits for
    started: bool = False  # its first denoising shard has begun on a replica
    layout: StepLayout | None = None  # known once encoded
    step: int = 0  # steps done


class Dispatcher:
    """Claims jobs and drives them; one per farm (the store's leases fence a second one)."""

    def __init__(
        self,
        store: JobStore,
        clients: StageClients,
        models: list[ModelSpec],
        *,
        objects=None,
        max_in_flight: int = 64,
        shard_steps: int = 4,
        lease_s: float = 120.0,
        poll_s: float = 0.5,
        worker: str | None = None,
        metrics=None,
        policy: RetryPolicy | None = None,
        scheduling: SchedulerConfig | None = None,
        leader_lease_s: float = 15.0,
        budgets: BudgetRule | None = None,
        budget_poll_s: float = 2.0,
        leader_work: Callable[[], None] | None = None,
    ) -> None:
        """``leader_work`` runs on every turn of the loop while this dispatcher leads (the batch
        runner's and the clip reaper's ``tick``): it must not block, and starts its own work."""
        self.store = store
        self.clients = clients
        self.models = {m.id: m for m in models}
        self.objects = objects  # an ObjectStore for checkpoints; None disables them
        self.policy = policy or RetryPolicy()
        self.max_in_flight = max_in_flight
        self.shard_steps = shard_steps
        self.lease_s = lease_s
        self.leader_lease_s = leader_lease_s
        self.poll_s = poll_s
        self.leader_work = leader_work
        # Leases carry role:instance. The role lets a restarted dispatcher take its jobs straight
        # back; the instance fences the old one, whose writes then miss (no job runs twice).
        self.role = worker or "dispatcher"
        self.worker = f"{self.role}:{uuid.uuid4().hex[:12]}"
        self.metrics = metrics  # a FarmMetrics, or None outside Ray
        self.placement = Placement(clients.replicas(), scheduling)
        self._depth_at = 0.0
        self._busy_exported: dict[str, float] = {}  # replica → busy seconds already added to the counter
        self.retries: deque[RetryRecord] = deque(maxlen=200)
        self.resumed: deque[dict] = deque(maxlen=200)  # {"job_id", "step"}: jobs picked up from a checkpoint
        # Where recent stage calls ran, for `farm status`: which replica, what priority, when, how long.
        self.calls: deque[dict] = deque(maxlen=200)
        # The stage calls running now, keyed by job: what `farm status` shows as running where.
        self.running: dict[str, dict] = {}
        self._flights: dict[str, _Flight] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._leading = False
        self._led_at = self._reaped_at = float("-inf")
        self.budgets = budgets  # None: no budgets, nothing held
        self.budget_poll_s = budget_poll_s
        self.held: frozenset[str] = frozenset()  # accounts whose bulk work waits: today's budget is spent
        self._budgets_at = float("-inf")

    # Lifecycle ------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    @property
    def leading(self) -> bool:
        return self._leading

    async def run(self) -> None:
        """Lead (or stand by until the leader's lease lapses), claim and drive jobs until :meth:`stop`."""
        log.info("dispatcher %s started (pools %s)", self.worker, self.placement.pools())
        while not self._stopping:
            if not await self._lead():
                await self._idle()  # a standby: the leader lives
                continue
            await self._report_metrics()
            await self._maybe_reap()
            await self._refresh_budgets()
            if self.leader_work is not None:
                self.leader_work()
            claimed = False
            if len(self._flights) < self.max_in_flight:
                job = await asyncio.to_thread(
                    lambda: self.store.claim_next(self.worker, self.lease_s, max_attempts=self.policy.max_attempts,
                                                  hold_bulk_of=self.held))
                if job is not None:
                    claimed = True
                    self._observe_claim(job)
                    task = asyncio.create_task(self._drive(job), name=job.id)
                    self._flights[job.id] = _Flight(job, task)
                    task.add_done_callback(lambda _t, jid=job.id: self._done(jid))
            if not claimed:
                await self._idle()

    async def _idle(self) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
        except asyncio.TimeoutError:
            pass

    async def _lead(self) -> bool:
        """Hold the farm's one leader lease, renewing it every third of its length. At most one
        dispatcher drives jobs: a second replica (a rolling update's, a standby) waits here until
        the leader releases the lease (a graceful stop) or stops renewing it (it died)."""
        if self._leading and time.monotonic() - self._led_at < self.leader_lease_s / 3:
            return True
        held = await asyncio.to_thread(self.store.acquire_leadership, self.role, self.worker, self.leader_lease_s)
        if not held:
            if self._leading:  # another took over while we stalled: our writes are fenced; stop driving
                log.warning("dispatcher %s lost the leader lease; abandoning %d job(s)", self.worker, len(self._flights))
                self._leading = False
                for flight in list(self._flights.values()):
                    flight.task.cancel()
            return False
        self._led_at = time.monotonic()
        if not self._leading:
            self._leading = True
            log.info("dispatcher %s leads", self.worker)
            # Jobs still leased by another instance of this role belong to a leader that died (a live
            # one releases the lease only after handing its jobs back): back to the queue, the lost
            # run counted as an attempt, to resume from their checkpoints.
            for job_id, owner in await asyncio.to_thread(self.store.leases_of, self.role):
                if owner != self.worker:
                    await asyncio.to_thread(
                        lambda: self.store.requeue(job_id, owner, f"taken back by {self.worker}", voluntary=False))
        return True

    async def _keep_leading(self) -> None:
        """Renew the leader lease until cancelled (the run loop, which renews it, has stopped)."""
        while self._leading:
            await self._lead()
            await asyncio.sleep(self.leader_lease_s / 6)

    async def _maybe_reap(self) -> None:
        """Settle expired job leases now and then (a timer, not every claim)."""
        if time.monotonic() - self._reaped_at < max(self.lease_s / 4, 1.0):
            return
        self._reaped_at = time.monotonic()
        await asyncio.to_thread(self.store.reap, self.policy.max_attempts)

    async def _refresh_budgets(self) -> None:
        """Now and then, read whose budget is spent today and hold their bulk work (in claims
        and in the policy); a raised budget or a new UTC day lets it go on at the next read."""
        if self.budgets is None or time.monotonic() - self._budgets_at < self.budget_poll_s:
            return
        self._budgets_at = time.monotonic()
        try:
            held = await asyncio.to_thread(self.store.spent_accounts, self.budgets)
        except Exception:  # keep the last answer; the next read tries again
            log.warning("budgets not read", exc_info=True)
            return
        if held != self.held:
            log.info("bulk work held for spent budgets: %s", sorted(held) or "none")
            self.held = held
            self.placement.hold_bulk(held)

    async def _charge(self, job: Job, stage: str, pool: str, device: str, seconds: float) -> None:
        """Record a completed stage's replica time, once per (job, stage), and count it."""
        added = await asyncio.to_thread(self.store.record_usage, job.id, self.worker, stage, pool, device, seconds)
        if added and self.metrics is not None:
            self.metrics.accelerator_seconds.inc(seconds, tags={
                "tenant": job.owner or "anonymous", "pool": pool, "device": device_kind(device)})

    async def _report_metrics(self) -> None:
        if self.metrics is None or time.monotonic() - self._depth_at < 1.0:
            return
        self._depth_at = time.monotonic()
        for priority, depth in (await asyncio.to_thread(self.store.queue_depths)).items():
            self.metrics.queue_depth.set(depth, tags={"priority": _priority_name(priority)})
        # Ray counters only go up by positive amounts: export what each replica's busy time grew by.
        for replica, seconds in list(self.placement.replica_busy_s.items()):
            grown = seconds - self._busy_exported.get(replica, 0.0)
            if grown > 0:
                self.metrics.replica_busy.inc(grown, tags={"pool": self.placement.pool_of(replica), "replica": replica})
                self._busy_exported[replica] = seconds

    def _observe_claim(self, job: Job) -> None:
        if self.metrics is not None and job.attempts == 1 and job.started_at is not None:
            wait = (job.started_at - job.created_at).total_seconds()
            self.metrics.queue_wait.observe(max(wait, 0.0), tags={"model": job.model, "priority": _priority_name(job.priority)})

    def _done(self, job_id: str) -> None:
        self._flights.pop(job_id, None)
        self._wake.set()  # room for another job

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop claiming; give running jobs back to the queue (they resume from their last checkpoint).

        For up to ``drain_s`` seconds, running jobs go on to their next shard boundary (a job past
        its last shard finishes), so the checkpoint they resume from is where they stopped and no
        work is redone (a rolling update, `farm down`). What is still running then is interrupted
        and resumes from its last recorded checkpoint."""
        self._stopping = True
        self._wake.set()
        flights = dict(self._flights)
        if flights and drain_s > 0 and self._leading:
            # Still the leader while jobs drain: a standby taking over now would count them lost.
            keep = asyncio.create_task(self._keep_leading())
            try:
                await asyncio.wait([f.task for f in flights.values()], timeout=drain_s)
            finally:
                keep.cancel()
                await asyncio.gather(keep, return_exceptions=True)
        for flight in flights.values():
            flight.task.cancel()  # interrupts at the next await: a wait for a replica, a call, a store write
        await asyncio.gather(*(f.task for f in flights.values()), return_exceptions=True)
        for job_id in flights:
            await asyncio.to_thread(self.store.requeue, job_id, self.worker, "dispatcher stopping")
        if self._leading:  # hand over at once: a standby need not wait the lease out
            await asyncio.to_thread(self.store.release_leadership, self.role, self.worker)
            self._leading = False

    def status(self) -> dict:
        return {
            "worker": self.worker, "leading": self._leading, "active": sorted(self._flights),
            "max_in_flight": self.max_in_flight,
            "pools": self.placement.pools(), "waiting": self.placement.depths(),
            "busy_s": {pool: round(s, 3) for pool, s in self.placement.busy_s.items()},
            "retries": [vars(r) for r in list(self.retries)[-20:]],
            "resumed": list(self.resumed)[-20:],
            "calls": list(self.calls),
            "running": sorted(self.running.values(), key=lambda c: c["started"]),
            "held_bulk": sorted(self.held),  # accounts whose bulk work waits: today's budget is spent
        }

    def snapshot(self) -> QueueSnapshot:
        """Where every job it drives stands, and each model's measured costs (``farm.jobs.estimates``).
        One pass over the jobs in flight; no store or replica is asked."""
        pools = self.placement.pools()
        jobs: dict[str, InFlight] = {}
        backlog: dict[str, float] = {}
        # Not started yet (in line): ordered as claims and the policy order them, priority then age.
        in_line = sorted((f for f in self._flights.values() if not f.started and f.job.model in self.models),
                         key=lambda f: (f.job.priority, f.job.created_at, f.job.id))
        for job_id, flight in self._flights.items():
            spec = self.models.get(flight.job.model)
            if spec is None:
                continue
            position = self.placement.queue_position(job_id)
            wait_s = 0.0 if position is None else position.cost_ahead_s / max(len(pools.get(position.pool, ())), 1)
            remaining = self._remaining_s(flight, spec)
            ahead = None if flight.started else self._ahead(flight, position, in_line)
            jobs[job_id] = InFlight(spec.id, _priority_name(flight.job.priority), flight.started, ahead, wait_s,
                                    remaining)
            backlog[spec.id] = backlog.get(spec.id, 0.0) + (remaining or 0.0)
        models = {}
        for spec in self.models.values():
            own = [p for p in pools if p.rpartition(":")[0] == spec.id]
            models[spec.id] = ModelCosts(
                slots=min((len(pools[p]) for p in own), default=0),
                encode_s=self._measured(ENCODE_POOL), decode_s=self._measured(DECODE_POOL),
                finish_s=self._measured(FINISH_STAGE), step_s=self._step_s(own),
                backlog_s=backlog.get(spec.id, 0.0))
        return QueueSnapshot(time.time(), jobs, models)

    def _ahead(self, flight: _Flight, position, in_line: list[_Flight]) -> int:
        """Jobs that start rendering before this one, which has not: waiting in its model's denoiser
        pool, the policy's count of shards ahead of it there; before it gets there (encoding), every
        shard waiting in that pool at its priority or a more urgent one, and the jobs of its model
        still in line before it that are not in the pool yet."""
        if position is not None and position.pool not in (ENCODE_POOL, DECODE_POOL):
            return position.shards_ahead
        model = flight.job.model
        try:
            depth = self.placement.depths()[self.placement.denoiser_pool(model, HIGH_NOISE_EXPERT)]
        except KeyError:  # no pool serves it: the job will fail, nobody is ahead
            depth = {}
        waiting = depth.get("interactive", 0) + (depth.get("bulk", 0) if flight.job.priority == Priority.BULK else 0)
        before = 0
        for other in in_line:
            if other is flight:
                break
            other_position = self.placement.queue_position(other.job.id)
            in_pool = other_position is not None and other_position.pool not in (ENCODE_POOL, DECODE_POOL)
            before += other.job.model == model and not in_pool
        return waiting + before

    def _measured(self, pool: str, steps: int = 1) -> float | None:
        return self.placement.estimate(pool, steps) if self.placement.measured(pool) else None

    def _step_s(self, pools: list[str]) -> float | None:
        measured = [self.placement.estimate(p, 1) for p in pools if self.placement.measured(p)]
        return sum(measured) / len(measured) if measured and len(measured) == len(pools) else None

    def _remaining_s(self, flight: _Flight, spec: ModelSpec) -> float | None:
        """The measured cost of what the job has left: the stage it is in and every later one."""
        stages = ("encode", "denoise", "decode", FINISH_STAGE)
        left = stages[stages.index(flight.stage):]
        total = 0.0
        for stage in left:
            if stage == "denoise":
                if flight.layout is not None:
                    plans = plan_shards(flight.layout, flight.step, self.shard_steps)
                    parts = [self._measured(self.placement.denoiser_pool(spec.id, p.expert), p.end - p.start)
                             for p in plans]
                else:
                    own = [p for p in self.placement.pools() if p.rpartition(":")[0] == spec.id]
                    step_s = self._step_s(own)
                    parts = [None if step_s is None else step_s * params_of(flight.job, spec).steps]
            else:
                parts = [self._measured(ENCODE_POOL if stage == "encode" else DECODE_POOL if stage == "decode"
                                        else FINISH_STAGE)]
            if any(p is None for p in parts):
                return None
            total += sum(parts)  # type: ignore[arg-type]
        return total

    def _set_stage(self, job_id: str, stage: str) -> None:
        if (flight := self._flights.get(job_id)) is not None:
            flight.stage = stage

    # One job ----------------------------------------------------------------------
    async def _drive(self, job: Job) -> None:
        lease = asyncio.create_task(self._keep_lease(job, asyncio.current_task()), name=f"lease-{job.id}")
        try:
            spec = self.models.get(job.model)
            if spec is None:
                await self._fail(job, "model_unavailable", f"model {job.model!r} is not served by this farm")
                return
            params = params_of(job, spec)
            outcome, held = await self._denoise(job, spec, params)
            try:
                await self._check_cancel(job)
            except BaseException:
                self.placement.release(held, job.id)
                raise
            self._set_stage(job.id, "decode")
            decoded, held = await self._call_stage(
                job, "decode", DECODE_POOL, 0, 1, outcome.replica,
                lambda replica: self.clients.decode(replica, job.id, spec.id, outcome.state), holding=held)
            await self._charge(job, "decode", DECODE_POOL, decoded.device, decoded.seconds)
            self._set_stage(job.id, FINISH_STAGE)
            finished, _ = await self._call_stage(
                job, "finish", None, 0, 1, None,
                lambda _r: self.clients.finish(job.id, spec.id, params, decoded.frames), holding=held)
            await self._charge(job, "finish", FINISH_POOL, finished.device, finished.seconds)
            objects = finished.objects
            await self._settle_checkpoints(job)
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
            await self._settle_checkpoints(job)
            await asyncio.to_thread(self.store.finish_cancelled, job.id, self.worker)
            await self._drop_checkpoint(job)
        except Drained:  # `stop` gives it back to the queue
            await self._settle_checkpoints(job)
        except asyncio.CancelledError:
            await self._settle_checkpoints(job)
            raise
        except Exception as exc:  # one job's failure must not stop the farm
            log.exception("job %s failed", job.id)
            await self._settle_checkpoints(job)
            if await self._fail(job, _error_code(exc), f"{type(exc).__name__}: {exc}"):
                await self._drop_checkpoint(job)  # only while the job is still ours
        finally:
            lease.cancel()

    async def _denoise(self, job: Job, spec: ModelSpec, params: RenderParams) -> tuple[ShardOutcome, str]:
        """Encode (or resume), then every shard. Returns the last shard's outcome and the replica that
        ran it, still held: a job hands its replica on only once its next call is queued, so at a
        shard boundary the policy chooses between it and everyone else waiting."""
        reloads = 0
        while True:
            held = None
            try:
                prepared, held = await self._start(job, spec, params)
                state, holder = prepared.state, prepared.replica
                if (flight := self._flights.get(job.id)) is not None:
                    flight.stage, flight.layout, flight.step = "denoise", prepared.layout, prepared.step_index
                plans = plan_shards(prepared.layout, prepared.step_index, self.shard_steps)
                outcome = ShardOutcome(state, holder, 0.0)
                for plan in plans:
                    await self._check_cancel(job)
                    if self._stopping:
                        raise Drained()  # at a boundary: the last shard's checkpoint is on its way
                    last = plan.end >= prepared.layout.num_steps
                    key = None if last or self.objects is None else shard_checkpoint_key(job.id, plan.end)
                    # A failed shard is sent again with the same input state. The call releases
                    # the replica this job holds once the shard is queued.
                    previous, held = held, None
                    pool = self.placement.denoiser_pool(spec.id, plan.expert)
                    stage = f"shard {plan.start}-{plan.end}"
                    outcome, held = await self._call_stage(
                        job, stage, pool, plan.start, plan.end, holder,
                        lambda replica, plan=plan, state=state, key=key: self.clients.run_shard(
                            replica, job.id, spec.id, state, plan, checkpoint=key, prompt=job.prompt,
                            batch=self.placement.ticket(job.id)),
                        holding=previous, batch_key=batch_key(spec, params, plan, job.id),
                    )
                    state, holder = outcome.state, outcome.replica
                    await self._charge(job, stage, pool, outcome.device, outcome.seconds)
                    await self._after_shard(job, plan.end, prepared.layout.num_steps, outcome)
                return outcome, held
            except StateLost as exc:
                if held is not None:
                    self.placement.release(held, job.id)
                reloads += 1
                if reloads > self.policy.replica_retries:
                    raise ReplicaLost(f"job {job.id}: its state was lost {reloads} times") from exc
                log.warning("job %s: state lost (%s); reloading from the last checkpoint", job.id, exc)
                await self._settle_checkpoints(job)
                job = await asyncio.to_thread(self.store.get, job.id) or job
            except BaseException:
                if held is not None:
                    self.placement.release(held, job.id)
                raise

    async def _start(self, job: Job, spec: ModelSpec, params: RenderParams) -> tuple[Prepared, str]:
        resume_from = job.checkpoint_key if self.objects is not None else None
        prepared, held = await self._call_stage(
            job, "encode", ENCODE_POOL, 0, 1, None,
            lambda replica: self.clients.start(replica, job.id, spec.id, params, resume_from))
        # A video-to-video job starts past step 0 (its schedule is strength-trimmed): only a job that had
        # a checkpoint to resume from counts as resumed.
        if resume_from is not None and prepared.step_index > 0:
            log.info("job %s resumes at step %d/%d from %s", job.id, prepared.step_index,
                     prepared.layout.num_steps, resume_from)
            self.resumed.append({"job_id": job.id, "step": prepared.step_index})
        return prepared, held

    async def _keep_lease(self, job: Job, driver: asyncio.Task | None) -> None:
        """Renew the lease while the job waits (for a replica, a storage outage, a slow finish), so
        the store never sees it as abandoned and hands it out a second time; stop driving the
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

    async def _call_stage(self, job: Job, stage: str, pool: str | None, start: int, end: int,
                          holder: str | None, call: Callable[[str | None], Awaitable[T]], *,
                          holding: str | None = None, batch_key: tuple = ()) -> tuple[T, str | None]:
        """``call(replica)`` on a replica of ``pool`` the policy picks (None: no pool, a CPU stage
        Serve routes), retried by the retry policy: a lost replica up to ``replica_retries``
        times, a render error up to ``shard_retries`` times, each after a growing delay.

        ``holding`` is the replica of the job's previous call, released once this call is queued.
        Returns the result and the replica that produced it, still held by the job: the caller
        hands it to its next call, or releases it."""
        lost = failed = 0
        while True:
            replica = None
            try:
                if pool is not None:
                    replica = await self.placement.acquire(StageRequest(
                        job.id, job.owner or "anonymous", _priority_name(job.priority), pool, start, end,
                        job.created_at.timestamp(), batch_key=batch_key, holder=holder), releasing=holding)
                elif holding is not None:
                    self.placement.release(holding, job.id)
                holding = None
                try:
                    if replica is not None:
                        await self._check_cancel(job)  # it may have been asked while the call waited
                    sent = time.perf_counter()
                    if stage.startswith("shard") and (flight := self._flights.get(job.id)) is not None:
                        flight.started = True  # rendering: out of the queue (encoding is preparation)
                    running = self.running[job.id] = {
                        "job_id": job.id, "stage": stage, "pool": pool, "replica": replica,
                        "priority": _priority_name(job.priority), "started": time.time()}
                    async with asyncio.timeout(self.policy.stage_timeout_s):
                        result = await call(replica)
                except BaseException:
                    if replica is not None:
                        self.placement.release(replica, job.id)
                    raise
                finally:
                    self.running.pop(job.id, None)
                took = time.perf_counter() - sent
                self.placement.observe(pool or FINISH_STAGE, end - start, took)
                if pool is not None:
                    self._observe_handoff(pool, sent, result)
                    self.calls.append(running | {"seconds": round(took, 4)})
                return result, replica
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
            except StateLost:
                raise
            except Exception as exc:
                if not is_render_error(exc):
                    raise
                failed += 1
                if failed > self.policy.shard_retries:
                    raise
                retry, error = failed, exc
            holder = None  # a retry may run anywhere
            delay = self.policy.delay(retry)
            reason = _error_code(error)
            first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            log.warning("job %s: %s failed (%s), retry %d in %.1fs: %s", job.id, stage, reason, retry, delay, first_line)
            self.retries.append(RetryRecord(job.id, stage, reason, retry, round(delay, 3), first_line))
            await asyncio.sleep(delay)
            await self._check_cancel(job)

    def _observe_handoff(self, pool: str, sent: float, result: Any) -> None:
        seconds = getattr(result, "seconds", None)
        if self.metrics is not None and seconds is not None and pool not in (ENCODE_POOL, DECODE_POOL):
            handoff = max(time.perf_counter() - sent - seconds, 0.0)
            self.metrics.shard_handoff.observe(handoff, tags={"pool": pool})

    async def _after_shard(self, job: Job, step: int, num_steps: int, outcome: ShardOutcome) -> None:
        """Record progress now; the checkpoint's key once its writer acknowledges it, beside the next shard."""
        # Denoising is 0–95 %; decoding and finishing take the rest.
        held = await asyncio.to_thread(
            self.store.record_progress, job.id, self.worker, step_index=step, num_steps=num_steps,
            progress=int(95 * step / num_steps), lease_s=self.lease_s,
        )
        if not held:
            raise JobCancelled() if await self._cancel_requested(job) else RuntimeError("lease lost")
        flight = self._flights.get(job.id)
        if flight is not None:
            flight.step = step
        if outcome.checkpoint is not None and flight is not None:
            previous = flight.checkpoints[-1] if flight.checkpoints else None
            flight.checkpoints.append(asyncio.create_task(self._confirm_checkpoint(job, step, outcome, previous)))

    async def _confirm_checkpoint(self, job: Job, step: int, outcome: ShardOutcome,
                                  previous: asyncio.Task | None) -> None:
        """Record the checkpoint once its writer acknowledges it, after the earlier ones (in step
        order), then delete the one it supersedes: a job keeps one checkpoint."""
        try:
            written = await self.clients.checkpointed(outcome.replica, outcome.checkpoint)
        except Exception as exc:  # the writer died or S3 refused: the previous checkpoint stays the one
            log.warning("job %s: checkpoint at step %d not written: %s", job.id, step, exc)
            written = False
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        if not written or not await asyncio.to_thread(self.store.record_checkpoint, job.id, self.worker,
                                                      outcome.checkpoint):
            return
        flight = self._flights.get(job.id)
        stale = job.checkpoint_key
        if flight is not None:
            stale, flight.newest = flight.newest or stale, outcome.checkpoint
        if stale and stale != outcome.checkpoint and stale.startswith(checkpoint_prefix(job.id)):
            try:
                await asyncio.to_thread(self.objects.delete, stale)
            except Exception:
                log.warning("job %s: superseded checkpoint %s not deleted", job.id, stale, exc_info=True)

    async def _settle_checkpoints(self, job: Job) -> None:
        """Wait for the job's checkpoint writes in flight, so none lands after its prefix is dropped."""
        flight = self._flights.get(job.id)
        if flight is not None and flight.checkpoints:
            await asyncio.gather(*flight.checkpoints, return_exceptions=True)
            flight.checkpoints.clear()

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
    """The job's error code for a failure (class names, so Ray's RayTaskError(cls) wrappers match too)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "NonFiniteLatents" in names:
        return "non_finite_latents"
    if "OutOfMemoryError" in names or any("outofmemory" in n.lower() for n in names):
        return "out_of_memory"  # torch's, or Ray's memory monitor killing a worker
    if isinstance(exc, ReplicaLost):
        return "replica_lost"
    if is_transient_storage_error(exc):
        return "storage_unavailable"
    if "SourceUnavailable" in names:
        return "source_unavailable"  # a derived job's source clip is gone: never signed without it
    return "render_error"


async def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout``; used by callers waiting on jobs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()
