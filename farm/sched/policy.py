"""The scheduling policy: ready shards × free replicas → assignments. Pure: no Ray, torch,
SQL, asyncio or clock; the caller passes the time in as ``now``.

The caller (the dispatcher, or ``bench/fleet_sim.py``) tells the :class:`Scheduler` what
happens — replicas come and go, shards become ready, jobs are cancelled, replicas finish —
and calls :meth:`Scheduler.schedule` to learn what runs where next. Every free replica of a
pool with waiting work gets one :class:`~farm.sched.shards.Assignment` per call. A replica
takes a new assignment only when everything it was given has finished: a batch runs in
lockstep. The rules, in the order a decision applies them:

1. **Interactive first, at every shard boundary.** When a replica of a pool is free and an
   interactive shard waits for that pool, an interactive shard is the head — except for
   the one aged bulk shard of rule 2. A bulk job whose shard just finished simply waits with
   its state; its next shard is an ordinary waiting bulk shard.

2. **Bulk aging.** Each pool keeps a *bulk clock*: the time a bulk shard last started there,
   or the time bulk work last began waiting there, whichever is later. When the bulk clock
   plus ``bulk_aging_s`` is earlier than the ``queued_at`` of the oldest waiting interactive
   shard of the pool, the next free replica takes a bulk shard (the bulk class's fair-share
   choice) instead, and the bulk clock moves to ``now``. The aged bulk shard joins the
   interactive line as if it had been queued at that moment (ties go to interactive).

   *Interactive bound*: after an interactive shard X is submitted, at most **one** bulk
   shard starts in X's pool before X does. While X waits no bulk shard starts except by
   aging (and no bulk shard rides along in a batch while interactive work waits). Any
   aged start after X's submission moves the bulk clock to a time no earlier than that
   submission, and X's ``queued_at`` is no later than it, so the next aging would need the
   oldest interactive stamp, at most X's, to be later than clock plus ``bulk_aging_s``: it
   is not, while X waits. So at most the one aging already due can pass X. Counting the
   bulk shards already running when X arrived, X waits behind at most one bulk shard per
   replica of the pool, plus one.

   *Bulk never starves*: each interactive shard eventually starts (fair share serves every
   waiting tenant, and each tenant runs its shards oldest first), so the oldest interactive
   stamp passes clock plus ``bulk_aging_s`` and the bulk class gets a replica: at least one
   bulk shard per pool every ``bulk_aging_s`` plus the wait of interactive work queued
   before that deadline. Within the bulk class, fair share reaches every tenant.

3. **Weighted fair share** between tenants inside each (pool, priority class): stride
   scheduling charged ``cost_s / weight``, see :mod:`farm.sched.fair` for the bound.

4. **Affinity** changes only *where* a head runs, never *which* shard runs: the head goes to
   the replica named by its ``holder`` if that replica is free and in the pool; otherwise to a
   free replica that no waiting shard names as holder, if there is one, so the holder of a
   later shard stays free for it; otherwise to any free replica.

5. **Held bulk** (spent budgets): :meth:`Scheduler.hold_bulk` names tenants whose bulk shards
   must not start. Their waiting bulk shards leave the queues (as if cancelled) and wait aside,
   with their ``queued_at``; a held tenant's new bulk shards wait there too. Leaving a tenant out
   of a later call puts its shards back in line. Interactive shards are never held, and running
   shards finish. The caller decides who is held (``farm.sched.budget``) and passes it in.

6. **Batching**: a replica with ``max_batch`` b > 1 takes, beside the head, up to b - 1 more
   waiting shards of the same pool and batch key, in fair order, from tenants at most
   ``batch_slack`` ahead of their class's virtual time: interactive ones first, then bulk
   ones, but bulk ones only once no interactive shard waits in the pool.

A decision does a constant number of heap operations, amortized (lazy deletion, rebuilds
once dead entries outnumber live ones), each O(log n) in waiting shards; a batch fill adds
at most ``max_batch`` + 16 tenant look-ups. A :meth:`Scheduler.schedule` call adds O(pools).
No decision scans the queues.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from farm.sched.fair import ClassQueue, Entry, OpCount
from farm.sched.shards import (
    Assignment,
    Priority,
    QueueDepth,
    QueuePosition,
    SchedulerConfig,
    ShardRequest,
    check_max_batch,
)


@dataclass(frozen=True)
class SchedulerStats:
    """Work done so far: decisions made (assignments), and heap operations spent on everything."""

    decisions: int
    heap_ops: int


class _Replica:
    __slots__ = ("id", "pool", "max_batch", "running")

    def __init__(self, replica_id: str, pool: str, max_batch: int) -> None:
        self.id = replica_id
        self.pool = pool
        self.max_batch = max_batch
        self.running: list[ShardRequest] = []


class _Pool:
    """One pool's queues and free replicas. Free replicas are split by whether some waiting
    shard names them as holder (``wanted``), so a head without affinity can avoid them."""

    __slots__ = ("name", "queues", "free_plain", "free_wanted", "wanted", "bulk_clock", "replicas")

    def __init__(self, name: str, ops: OpCount) -> None:
        self.name = name
        self.queues: dict[Priority, ClassQueue] = {
            "interactive": ClassQueue("interactive", ops, track_oldest=True),
            "bulk": ClassQueue("bulk", ops, track_oldest=False),
        }
        self.free_plain: dict[str, None] = {}  # dicts as ordered sets: O(1) add, remove, popitem
        self.free_wanted: dict[str, None] = {}
        self.wanted: Counter[str] = Counter()
        self.bulk_clock = float("-inf")
        self.replicas = 0

    def waiting(self) -> int:
        return self.queues["interactive"].count + self.queues["bulk"].count

    def set_free(self, replica_id: str) -> None:
        (self.free_wanted if self.wanted[replica_id] else self.free_plain)[replica_id] = None

    def discard_free(self, replica_id: str) -> None:
        self.free_plain.pop(replica_id, None)
        self.free_wanted.pop(replica_id, None)


class Scheduler:
    """Holds the waiting shards of every running job and the free replicas of every pool,
    and decides what runs where next (the rules are in this module's docstring)."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._ops = OpCount()
        self._decisions = 0
        self._seq = 0
        self._now = float("-inf")
        self._pools: dict[str, _Pool] = {}
        self._replicas: dict[str, _Replica] = {}
        self._waiting: dict[str, list[Entry]] = {}  # job id → its waiting entries
        self._running: dict[tuple[str, int, int], str] = {}  # (job, start, end) → replica
        self._held: frozenset[str] = frozenset()  # tenants whose bulk shards wait aside
        self._parked: dict[str, list[ShardRequest]] = {}  # job id → its held bulk shards

    # Replicas ---------------------------------------------------------------------------
    def add_replica(self, replica_id: str, pool: str, max_batch: int | None = None) -> None:
        """A new, free replica of ``pool``. ``max_batch`` overrides the pool's batch limit."""
        if not replica_id or not pool:
            raise ValueError(f"replica id and pool must be non-empty strings, got {replica_id!r}, {pool!r}")
        if replica_id in self._replicas:
            raise ValueError(f"replica {replica_id!r} is already registered (pool {self._replicas[replica_id].pool!r})")
        size = self.config.batch_limit(pool) if max_batch is None else max_batch
        check_max_batch(f"replica {replica_id!r}: max_batch", size)
        self._replicas[replica_id] = _Replica(replica_id, pool, size)
        state = self._pool(pool)
        state.replicas += 1
        state.set_free(replica_id)

    def remove_replica(self, replica_id: str) -> tuple[ShardRequest, ...]:
        """Forget a replica (lost or scaled down). Returns the shards it was running, for the
        caller to submit again (from their last checkpoint)."""
        replica = self._replica(replica_id)
        del self._replicas[replica_id]
        state = self._pools[replica.pool]
        state.replicas -= 1
        state.discard_free(replica_id)
        for shard in replica.running:
            del self._running[(shard.job_id, shard.start, shard.end)]
        return tuple(replica.running)

    def finished(self, replica_id: str, job_ids: Iterable[str] | None = None) -> tuple[ShardRequest, ...]:
        """Shards of ``job_ids`` (all, if None) on this replica are done; the replica is free
        again once nothing it was given is still running. Returns the shards released."""
        replica = self._replica(replica_id)
        if job_ids is None:
            done, keep = replica.running, []
        else:
            wanted = set(job_ids)
            done = [s for s in replica.running if s.job_id in wanted]
            missing = wanted - {s.job_id for s in done}
            if missing:
                raise ValueError(f"replica {replica_id!r} is not running jobs {sorted(missing)}")
            keep = [s for s in replica.running if s.job_id not in wanted]
        for shard in done:
            del self._running[(shard.job_id, shard.start, shard.end)]
        replica.running = keep
        if not keep:
            pool = self._pools[replica.pool]
            if replica_id not in pool.free_plain and replica_id not in pool.free_wanted:
                pool.set_free(replica_id)
        return tuple(done)

    # Shards ------------------------------------------------------------------------------
    def submit(self, shard: ShardRequest, now: float) -> None:
        """A shard is ready to run (its job's previous shard finished, or it is the first)."""
        self._advance(now)
        if shard.queued_at > now:
            raise ValueError(f"job {shard.job_id}: queued_at {shard.queued_at} is later than now {now}")
        key = (shard.job_id, shard.start, shard.end)
        if key in self._running:
            raise ValueError(f"job {shard.job_id}: steps [{shard.start}, {shard.end}) are running on {self._running[key]!r}")
        parked = [(s.start, s.end) for s in self._parked.get(shard.job_id, ())]
        entries = self._waiting.setdefault(shard.job_id, [])
        for other in [(e.shard.start, e.shard.end) for e in entries] + parked:
            if other == (shard.start, shard.end):
                if not entries:
                    del self._waiting[shard.job_id]
                raise ValueError(f"job {shard.job_id}: steps [{shard.start}, {shard.end}) are already waiting")
        if shard.priority == "bulk" and shard.tenant in self._held:
            if not entries:
                del self._waiting[shard.job_id]
            self._parked.setdefault(shard.job_id, []).append(shard)
            return
        pool = self._pool(shard.pool)
        queue = pool.queues[shard.priority]
        if shard.priority == "bulk" and queue.count == 0:
            pool.bulk_clock = max(pool.bulk_clock, now)  # bulk begins waiting here now
        self._seq += 1
        entry = queue.push(shard, self._seq, self.config.weight(shard.tenant))
        entries.append(entry)
        holder = self._replicas.get(shard.holder) if shard.holder is not None else None
        if holder is not None and holder.pool == shard.pool:
            entry.wants = holder.id
            pool.wanted[holder.id] += 1
            if holder.id in pool.free_plain:
                del pool.free_plain[holder.id]
                pool.free_wanted[holder.id] = None

    def cancel(self, job_id: str) -> int:
        """Drop the job's waiting shards (a running one finishes; the caller discards it).
        Returns how many were dropped."""
        entries = self._waiting.pop(job_id, [])
        for entry in entries:
            pool = self._pools[entry.shard.pool]
            pool.queues[entry.shard.priority].cancel(entry)
            self._unwant(pool, entry)
        return len(entries) + len(self._parked.pop(job_id, ()))

    def hold_bulk(self, tenants: Iterable[str], now: float) -> None:
        """From now on, bulk shards of exactly ``tenants`` wait aside and do not start (rule 5);
        tenants held before and not named now get theirs back in line, in their old order.
        Costs O(waiting shards) when the set changes, nothing when it does not."""
        self._advance(now)
        held = frozenset(tenants)
        if held == self._held:
            return
        released, self._held = self._held - held, held
        for job_id, entries in list(self._waiting.items()):
            for entry in [e for e in entries if e.shard.priority == "bulk" and e.shard.tenant in held]:
                pool = self._pools[entry.shard.pool]
                pool.queues["bulk"].cancel(entry)
                self._unwant(pool, entry)
                entries.remove(entry)
                self._parked.setdefault(job_id, []).append(entry.shard)
            if not entries:
                del self._waiting[job_id]
        back = [s for shards in self._parked.values() for s in shards if s.tenant in released]
        for shard in back:
            shards = self._parked[shard.job_id]
            shards.remove(shard)
            if not shards:
                del self._parked[shard.job_id]
        for shard in sorted(back, key=lambda s: (s.queued_at, s.job_id, s.start)):
            self.submit(shard, now)

    def held(self) -> tuple[ShardRequest, ...]:
        """The bulk shards waiting aside because their tenant is held."""
        return tuple(s for shards in self._parked.values() for s in shards)

    # Deciding -------------------------------------------------------------------------------
    def schedule(self, now: float) -> list[Assignment]:
        """One assignment for every free replica whose pool has waiting work."""
        self._advance(now)
        decisions: list[Assignment] = []
        for pool in self._pools.values():
            while (pool.free_plain or pool.free_wanted) and pool.waiting():
                decisions.append(self._assign(pool, now))
        self._decisions += len(decisions)
        return decisions

    def _assign(self, pool: _Pool, now: float) -> Assignment:
        interactive, bulk = pool.queues["interactive"], pool.queues["bulk"]
        aged = bool(interactive.count and bulk.count and self._bulk_due(pool, interactive))
        queue = bulk if aged or not interactive.count else interactive
        head = queue.take_head()
        replica = self._replicas[self._pick_replica(pool, head.shard.holder)]
        batch = [head]
        room = replica.max_batch - 1
        if room:
            key = head.shard.batch_key
            slack = self.config.batch_slack
            if slack is None:
                slack = room * head.shard.cost_s / head.queue.weight
            if interactive.count:
                batch += interactive.take_key(key, room, slack)
            if queue is bulk and not interactive.count and len(batch) <= room:
                batch += bulk.take_key(key, room + 1 - len(batch), slack)
        if queue is bulk:
            pool.bulk_clock = now
        shards = []
        for entry in batch:
            shard = entry.shard
            self._waiting[shard.job_id].remove(entry)
            if not self._waiting[shard.job_id]:
                del self._waiting[shard.job_id]
            self._unwant(pool, entry)
            self._running[(shard.job_id, shard.start, shard.end)] = replica.id
            shards.append(shard)
        replica.running = shards
        return Assignment(replica.id, pool.name, tuple(shards), aged=aged, affinity=replica.id == head.shard.holder)

    def _bulk_due(self, pool: _Pool, interactive: ClassQueue) -> bool:
        aging = self.config.bulk_aging_s
        if aging is None:
            return False
        oldest = interactive.oldest()
        return oldest is not None and pool.bulk_clock + aging < oldest

    def _pick_replica(self, pool: _Pool, holder: str | None) -> str:
        if holder is not None:
            for free in (pool.free_plain, pool.free_wanted):
                if holder in free:
                    del free[holder]
                    return holder
        free = pool.free_plain or pool.free_wanted
        return free.popitem()[0]  # the most recently freed: warm caches, O(1)

    # Queries ------------------------------------------------------------------------------
    def queue_position(self, job_id: str) -> QueuePosition | None:
        """Estimated shards (and cost) that start in its pool before the job's next waiting
        shard, or None if it has none waiting. Bulk counts every waiting interactive shard of
        the pool as ahead; interactive counts one bulk shard if an aging is due before it.
        Costs O(tenants in its class + that tenant's waiting shards)."""
        entries = self._waiting.get(job_id)
        if not entries:
            return None
        entry = min(entries, key=lambda e: (e.shard.start, e.seq))  # the job's next step range
        shard = entry.shard
        pool = self._pools[shard.pool]
        n, cost = pool.queues[shard.priority].position(entry)
        interactive, bulk = pool.queues["interactive"], pool.queues["bulk"]
        if shard.priority == "bulk":
            n += interactive.count
            cost += interactive.cost
        elif bulk.count and self.config.bulk_aging_s is not None and pool.bulk_clock + self.config.bulk_aging_s < shard.queued_at:
            n += 1
            cost += bulk.cost / bulk.count
        return QueuePosition(shard.pool, shard.priority, n, cost)

    def queue_depth(self, pool: str) -> QueueDepth:
        """Waiting shards of ``pool`` by priority (zero for a pool never seen)."""
        state = self._pools.get(pool)
        if state is None:
            return QueueDepth(0, 0)
        return QueueDepth(state.queues["interactive"].count, state.queues["bulk"].count)

    def pools(self) -> tuple[str, ...]:
        return tuple(self._pools)

    def running(self, replica_id: str) -> tuple[ShardRequest, ...]:
        return tuple(self._replica(replica_id).running)

    def free_replicas(self, pool: str) -> int:
        state = self._pools.get(pool)
        return 0 if state is None else len(state.free_plain) + len(state.free_wanted)

    @property
    def stats(self) -> SchedulerStats:
        return SchedulerStats(self._decisions, self._ops.n)

    # Internals ------------------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"now={now} is earlier than a time already seen ({self._now}); time must not go backwards")
        self._now = now

    def _pool(self, name: str) -> _Pool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = _Pool(name, self._ops)
        return pool

    def _replica(self, replica_id: str) -> _Replica:
        replica = self._replicas.get(replica_id)
        if replica is None:
            raise ValueError(f"unknown replica {replica_id!r}")
        return replica

    def _unwant(self, pool: _Pool, entry: Entry) -> None:
        holder = entry.wants
        if holder is None:
            return
        entry.wants = None
        pool.wanted[holder] -= 1
        if pool.wanted[holder] <= 0:
            del pool.wanted[holder]
            if holder in pool.free_wanted:
                del pool.free_wanted[holder]
                pool.free_plain[holder] = None


__all__ = ["Scheduler", "SchedulerStats"]
