"""Where each stage call runs: the scheduling policy (:mod:`farm.sched`) over the farm's replicas.

The dispatcher drives every job as an asyncio task. Each stage call of a job (encode, each
denoise shard, decode) first asks :meth:`Placement.acquire` for a replica of the stage's pool;
the call waits there, not inside Ray Serve, until the policy assigns it one — interactive work
first at every shard boundary, weighted fair share between tenants, affinity to the replica
that holds the job's state. When the call returns (or fails), :meth:`Placement.release` frees
the replica and the policy runs again. Torch-free and Ray-free: the clock is
``time.monotonic`` and nothing else.

Cost estimates (``cost_s``) are what fair share charges and what queue positions count: a
moving average of measured seconds per step (per call for encode and decode) for each pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from farm.sched import Assignment, BatchTicket, QueuePosition, Scheduler, SchedulerConfig, ShardRequest

log = logging.getLogger(__name__)

ENCODE_POOL = "encode"
DECODE_POOL = "decode"
FINISH_POOL = "finish"  # not scheduled here (Serve routes the finisher); named in usage
_EMA = 0.2  # weight of the newest measurement in a pool's moving average


def denoise_pool(model_id: str, experts: str) -> str:
    """A denoiser pool's name: the model and the expert(s) its replicas hold (``wan:transformer``,
    ``wan:transformer+transformer_2`` for replicas holding both)."""
    return f"{model_id}:{experts}"


@dataclass(frozen=True)
class StageRequest:
    """One stage call of one job, as the policy sees it."""

    job_id: str
    tenant: str
    priority: str  # "interactive" | "bulk"
    pool: str
    start: int  # step range; 0, 0 for encode and decode
    end: int
    queued_at_wall: float  # the job's creation, epoch seconds: its place in line
    batch_key: Hashable = ()
    holder: str | None = None  # the replica that holds the job's state, if any


class Placement:
    """The policy's scheduler, fed by asyncio: ``replicas`` maps each pool to its replica ids."""

    def __init__(self, replicas: Mapping[str, list[str]], config: SchedulerConfig | None = None) -> None:
        self.scheduler = Scheduler(config or SchedulerConfig())
        self._pool_of: dict[str, str] = {}
        for pool, ids in replicas.items():
            for replica in ids:
                self.scheduler.add_replica(replica, pool)
                self._pool_of[replica] = pool
        self._waiting: dict[tuple[str, str, int], asyncio.Future[str]] = {}
        self._step_s: dict[str, float] = {}
        self._started = time.monotonic()
        self._last_now = 0.0
        self.busy_s: dict[str, float] = dict.fromkeys(replicas, 0.0)  # seconds replicas of a pool ran calls
        self.replica_busy_s: dict[str, float] = {}  # the same per replica, for the busy-fraction metric
        self._since: dict[str, float] = {}
        self._held: set[str] = set()  # replicas assigned and not yet released
        self._members: dict[str, set[str]] = {}  # the jobs each held replica runs (several: a batch)
        self._tickets: dict[str, BatchTicket] = {}  # a batched job's ticket, until it takes it
        self._batches = 0

    # The policy's clock: seconds since this Placement began, never going backwards.
    def _now(self) -> float:
        self._last_now = max(self._last_now, time.monotonic() - self._started)
        return self._last_now

    def pools(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for replica, pool in self._pool_of.items():
            found.setdefault(pool, []).append(replica)
        return found

    def pool_of(self, replica: str) -> str:
        return self._pool_of[replica]

    def serves(self, pool: str) -> bool:
        return pool in self.busy_s

    def denoiser_pool(self, model_id: str, expert: str) -> str:
        """The pool whose replicas hold ``expert`` of ``model_id``; KeyError naming the pools when none does."""
        for pool in self.busy_s:
            model, _, experts = pool.rpartition(":")
            if model == model_id and expert in experts.split("+"):
                return pool
        raise KeyError(f"no pool holds {model_id}:{expert}; pools: {sorted(self.busy_s)}")

    def estimate(self, pool: str, steps: int) -> float:
        """Expected seconds of a call on ``pool`` covering ``steps`` steps (1 for encode/decode)."""
        return self._step_s.get(pool, 1.0) * max(steps, 1)

    def measured(self, pool: str) -> bool:
        """Whether a call on ``pool`` has been measured (``estimate`` is a default until then)."""
        return pool in self._step_s

    def observe(self, pool: str, steps: int, seconds: float) -> None:
        per_step = seconds / max(steps, 1)
        old = self._step_s.get(pool)
        self._step_s[pool] = per_step if old is None else (1 - _EMA) * old + _EMA * per_step

    async def acquire(self, request: StageRequest, *, releasing: str | None = None) -> str:
        """Wait until the policy assigns ``request`` a replica; returns its id.

        ``releasing`` is a replica the job holds (its previous call's): it is released once this
        request is queued, so the policy sees the job's next call before the replica is free."""
        try:
            if not self.serves(request.pool):
                raise KeyError(f"no replicas serve pool {request.pool!r}; served: {sorted(self.busy_s)}")
            now = self._now()
            queued_at = min(now, now - max(time.time() - request.queued_at_wall, 0.0))
            shard = ShardRequest(
                job_id=request.job_id, tenant=request.tenant, priority=request.priority, pool=request.pool,
                batch_key=request.batch_key or (request.pool,), start=request.start, end=request.end,
                cost_s=self.estimate(request.pool, request.end - request.start), queued_at=queued_at,
                holder=request.holder,
            )
            key = (request.job_id, request.pool, request.start)
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._waiting[key] = future
            self.scheduler.submit(shard, now)
        finally:
            if releasing is not None:
                self.release(releasing, request.job_id)  # and dispatch
        if releasing is None:
            self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            if self._waiting.pop(key, None) is not None:
                self.scheduler.cancel(request.job_id)
            elif future.done() and not future.cancelled():
                self.release(future.result(), request.job_id)  # assigned as we were cancelled
            raise

    def ticket(self, job_id: str) -> BatchTicket | None:
        """The batch ticket of the job's latest assignment (None: it runs alone); taken once."""
        return self._tickets.pop(job_id, None)

    def release(self, replica: str, job_id: str) -> None:
        """The job is done with ``replica`` (its call returned or failed). The replica takes new work once
        every job of its batch has released it."""
        self._tickets.pop(job_id, None)
        members = self._members.get(replica, set())
        members.discard(job_id)
        self.scheduler.finished(replica, [job_id])
        if not members:
            self._free(replica)
        self._dispatch()

    def _free(self, replica: str) -> None:
        self._members.pop(replica, None)
        self._held.discard(replica)
        started = self._since.pop(replica, None)
        if started is not None:
            held = time.monotonic() - started
            self.busy_s[self._pool_of[replica]] += held
            self.replica_busy_s[replica] = self.replica_busy_s.get(replica, 0.0) + held

    def hold_bulk(self, tenants) -> None:
        """Bulk calls of these tenants (their budget is spent) wait until a later call leaves them out."""
        self.scheduler.hold_bulk(tenants, self._now())
        self._dispatch()

    def queue_position(self, job_id: str) -> QueuePosition | None:
        return self.scheduler.queue_position(job_id)

    def depths(self) -> dict[str, dict[str, int]]:
        """Waiting stage calls per pool and priority."""
        out = {}
        for pool in self.busy_s:
            depth = self.scheduler.queue_depth(pool)
            out[pool] = {"interactive": depth.interactive, "bulk": depth.bulk}
        return out

    def _dispatch(self) -> None:
        for assignment in self.scheduler.schedule(self._now()):
            self._hand_out(assignment)

    def _hand_out(self, assignment: Assignment) -> None:
        replica = assignment.replica_id
        live = []
        for shard in assignment.shards:
            future = self._waiting.pop((shard.job_id, shard.pool, shard.start), None)
            if future is None or future.done():
                # Its waiter is gone (cancelled between submit and now): its slot is not taken.
                self.scheduler.finished(replica, [shard.job_id])
            else:
                live.append((shard, future))
        if not live:
            self._dispatch()  # the replica is free again
            return
        self._since[replica] = time.monotonic()
        self._held.add(replica)
        self._members[replica] = {shard.job_id for shard, _ in live}
        ticket = None
        if len(live) > 1:
            self._batches += 1
            ticket = BatchTicket(f"{replica}#{self._batches}", len(live))
        for shard, future in live:
            if ticket is not None:
                self._tickets[shard.job_id] = ticket
            future.set_result(replica)
