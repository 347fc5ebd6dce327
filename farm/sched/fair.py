"""Weighted fair queues: the waiting shards of one priority class in one pool.

Stride scheduling (start-time fair queueing) between tenants: each tenant has a *pass*,
a virtual time in cost-seconds per unit weight. The tenant with the lowest pass is served
next and its pass grows by ``cost_s / weight`` of the shard it got; the class's virtual
time V is the pass of the tenant last chosen as a batch head. A tenant that starts waiting
again resumes at ``max(its old pass, V)``, so idling banks no credit.

Every waiting tenant's pass stays within ``[V, V + slack + c_t / w_t]`` (``c_t`` its largest
shard cost, ``slack`` the batch slack in use, 0 without batching). Hence the fair-share
bound: over any interval in which tenants i and j both wait throughout,

    | served_i / w_i  -  served_j / w_j |  <=  c_i / w_i + c_j / w_j + 2 * slack

with ``served`` the ``cost_s`` of the shards taken in that interval.

Within one tenant, shards run in ``(queued_at, job_id, start)`` order: oldest job first,
ties by job id, so a job's next shard keeps its job's place and a started clip is finished
before a newer one starts.

Every structure is a binary heap with lazy deletion: a cancelled or taken shard is only
marked dead and dropped when it reaches the top, and a heap is rebuilt from its live
entries once dead ones outnumber them, so each operation costs O(log n) amortized in
waiting shards.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable

from farm.sched.shards import Priority, ShardRequest

_SCAN = 16  # tenants a batch fill may look at, beyond the ones it takes shards from
_SLACK_HEAP = 64  # a heap may hold this many dead entries beyond twice its live ones
_Item = tuple[float, str, int, int, "Entry"]  # (queued_at, job_id, start, seq, entry): a tenant's order


class OpCount:
    """Heap work done so far: one per push, pop, and entry copied in a rebuild."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Entry:
    """One waiting shard in its tenant's queue. ``live`` turns False when it is taken or cancelled."""

    __slots__ = ("shard", "seq", "live", "queue", "wants")

    def __init__(self, shard: ShardRequest, seq: int, queue: TenantQueue) -> None:
        self.shard = shard
        self.seq = seq
        self.live = True
        self.queue = queue
        self.wants: str | None = None  # the replica whose "wanted" count this entry holds (policy.py)


class TenantQueue:
    """One tenant's waiting shards of one class in one pool, oldest first.

    The per-batch-key index that batch fills read is built on the first fill that needs it
    and thrown away when dead entries swamp it, so pools that never batch never pay for it.
    """

    __slots__ = ("tenant", "weight", "pass_", "version", "active", "count", "cost", "heap", "by_key", "keyed_len")

    def __init__(self, tenant: str, weight: float, pass_: float) -> None:
        self.tenant = tenant
        self.weight = weight
        self.pass_ = pass_
        self.version = 0  # bumped whenever pass_ changes: older entries in the class heap are stale
        self.active = True
        self.count = 0
        self.cost = 0.0
        self.heap: list[_Item] = []
        self.by_key: dict[Hashable, list[_Item]] | None = None
        self.keyed_len = 0

    def push(self, entry: Entry, ops: OpCount) -> None:
        shard = entry.shard
        item = (shard.queued_at, shard.job_id, shard.start, entry.seq, entry)
        heapq.heappush(self.heap, item)
        ops.n += 1
        if self.by_key is not None:
            heapq.heappush(self.by_key.setdefault(entry.shard.batch_key, []), item)
            self.keyed_len += 1
            ops.n += 1
        self.count += 1
        self.cost += entry.shard.cost_s

    def pop_head(self, ops: OpCount) -> Entry:
        """Take the oldest live shard (the caller knows ``count > 0``)."""
        heap = self.heap
        while True:
            entry = heapq.heappop(heap)[4]
            ops.n += 1
            if entry.live:
                self._taken(entry)
                self._tidy(ops)
                return entry

    def pop_key(self, key: Hashable, ops: OpCount) -> Entry | None:
        """Take the oldest live shard with this batch key, or None."""
        if self.by_key is None:
            self._index(ops)
        heap = self.by_key.get(key)
        while heap:
            entry = heapq.heappop(heap)[4]
            self.keyed_len -= 1
            ops.n += 1
            if entry.live:
                self._taken(entry)
                self._tidy(ops)
                return entry
        if heap is not None:
            del self.by_key[key]
        return None

    def drop(self, entry: Entry, ops: OpCount) -> None:
        """Cancel a live entry: it stays in the heaps, dead, until popped or tidied away."""
        self._taken(entry)
        self._tidy(ops)

    def _taken(self, entry: Entry) -> None:
        entry.live = False
        self.count -= 1
        self.cost -= entry.shard.cost_s
        if self.count == 0:
            self.cost = 0.0  # no float drift left behind

    def _tidy(self, ops: OpCount) -> None:
        """Rebuild a heap once its dead entries outnumber its live ones (amortized O(1) per removal)."""
        if self.by_key is not None and self.keyed_len > 2 * self.count + _SLACK_HEAP:
            self.by_key = None  # rebuilt by the next batch fill, if one comes
            self.keyed_len = 0
        if len(self.heap) > 2 * self.count + _SLACK_HEAP:
            self.heap = [item for item in self.heap if item[4].live]
            heapq.heapify(self.heap)
            ops.n += len(self.heap)

    def _index(self, ops: OpCount) -> None:
        by_key: dict[Hashable, list[_Item]] = {}
        for item in self.heap:
            if item[4].live:
                by_key.setdefault(item[4].shard.batch_key, []).append(item)
        for heap in by_key.values():
            heapq.heapify(heap)
        self.by_key = by_key
        self.keyed_len = self.count
        ops.n += len(self.heap)

    def ahead_of(self, entry: Entry) -> tuple[int, float]:
        """Live shards of this tenant that run before ``entry``: count and cost (a scan of this tenant only)."""
        shard = entry.shard
        mark = (shard.queued_at, shard.job_id, shard.start, entry.seq)
        n, cost = 0, 0.0
        for queued_at, job_id, start, seq, other in self.heap:
            if other.live and (queued_at, job_id, start, seq) < mark:
                n += 1
                cost += other.shard.cost_s
        return n, cost


class ClassQueue:
    """All tenants' waiting shards of one priority class in one pool."""

    def __init__(self, priority: Priority, ops: OpCount, *, track_oldest: bool) -> None:
        self.priority = priority
        self.ops = ops
        self.vtime = 0.0
        self.count = 0
        self.cost = 0.0
        self.tenants: dict[str, TenantQueue] = {}
        self._heap: list[tuple[float, int, TenantQueue, int]] = []  # (pass, tie, tenant, version)
        self._tie = 0  # equal passes: the tenant queued into the heap first goes first (round robin)
        self._lead: dict[str, float] = {}  # passes of tenants that left while ahead of vtime
        self._fifo: list[tuple[float, int, Entry]] | None = [] if track_oldest else None

    # Adding and removing ----------------------------------------------------------------
    def push(self, shard: ShardRequest, seq: int, weight: float) -> Entry:
        tenant = self.tenants.get(shard.tenant)
        if tenant is None:
            pass_ = max(self._lead.pop(shard.tenant, self.vtime), self.vtime)
            tenant = self.tenants[shard.tenant] = TenantQueue(shard.tenant, weight, pass_)
            self._enqueue(tenant)
        entry = Entry(shard, seq, tenant)
        tenant.push(entry, self.ops)
        self.count += 1
        self.cost += shard.cost_s
        if self._fifo is not None:
            heapq.heappush(self._fifo, (shard.queued_at, seq, entry))
            self.ops.n += 1
        return entry

    def cancel(self, entry: Entry) -> None:
        tenant = entry.queue
        tenant.drop(entry, self.ops)
        self._removed(entry.shard.cost_s)
        if tenant.count == 0:
            self._retire(tenant)
        self._tidy_fifo()

    # Choosing ----------------------------------------------------------------------------
    def head_tenant(self) -> TenantQueue | None:
        """The waiting tenant with the lowest pass (dropping stale heap entries on the way)."""
        heap = self._heap
        while heap:
            _, _, tenant, version = heap[0]
            if tenant.active and tenant.version == version:
                return tenant
            heapq.heappop(heap)
            self.ops.n += 1
        return None

    def take_head(self) -> Entry:
        """Take the next shard in fair order (the caller knows ``count > 0``); it becomes a batch head."""
        tenant = self.head_tenant()
        if tenant is None:  # count > 0 guarantees a waiting tenant; reaching here is a bug
            raise RuntimeError(f"{self.priority} queue counts {self.count} waiting shards but has no waiting tenant")
        heapq.heappop(self._heap)
        self.ops.n += 1
        self.vtime = tenant.pass_
        entry = tenant.pop_head(self.ops)
        self._charge(tenant, entry)
        self._enqueue_or_retire(tenant)
        self._tidy_fifo()
        return entry

    def take_key(self, key: Hashable, n: int, slack: float) -> list[Entry]:
        """Up to ``n`` more shards with batch key ``key``, in fair order, from tenants whose pass
        is at most ``vtime + slack``; tenants without such shards are passed over, at most
        ``_SCAN`` of them, so a batch fill never walks the whole queue."""
        limit = self.vtime + slack
        taken: list[Entry] = []
        seen: list[TenantQueue] = []
        passed_over = 0
        while len(taken) < n and passed_over < _SCAN:
            tenant = self.head_tenant()
            if tenant is None or tenant.pass_ > limit:
                break
            heapq.heappop(self._heap)
            self.ops.n += 1
            seen.append(tenant)
            got = 0
            while len(taken) < n and tenant.pass_ <= limit:
                entry = tenant.pop_key(key, self.ops)
                if entry is None:
                    break
                self._charge(tenant, entry)
                taken.append(entry)
                got += 1
            if not got:
                passed_over += 1
        for tenant in seen:
            self._enqueue_or_retire(tenant)
        self._tidy_fifo()
        return taken

    def oldest(self) -> float | None:
        """The earliest ``queued_at`` among waiting shards (only for a queue built with ``track_oldest``)."""
        fifo = self._fifo
        if fifo is None:
            raise RuntimeError(f"the {self.priority} queue does not track its oldest shard")
        while fifo:
            if fifo[0][2].live:
                return fifo[0][0]
            heapq.heappop(fifo)
            self.ops.n += 1
        return None

    def position(self, entry: Entry) -> tuple[int, float]:
        """Estimated shards (and their cost) of this class that start before ``entry``.

        Its own tenant's older shards, plus, from every other tenant u whose pass is below the
        pass at which ``entry`` comes up, as many shards of u's mean cost as fit between u's
        pass and that one. Costs O(tenants + this tenant's waiting shards); a query, not a decision.
        """
        own = entry.queue
        n, cost = own.ahead_of(entry)
        target = own.pass_ + cost / own.weight
        for tenant in self.tenants.values():
            if tenant is own or tenant.count == 0 or tenant.pass_ >= target:
                continue
            mean = tenant.cost / tenant.count
            fits = math.ceil((target - tenant.pass_) * tenant.weight / mean - 1e-9)
            k = min(tenant.count, max(fits, 0))
            n += k
            cost += k * mean
        return n, cost

    # Bookkeeping ---------------------------------------------------------------------------
    def _charge(self, tenant: TenantQueue, entry: Entry) -> None:
        tenant.pass_ += entry.shard.cost_s / tenant.weight
        tenant.version += 1
        self._removed(entry.shard.cost_s)

    def _removed(self, cost: float) -> None:
        self.count -= 1
        self.cost -= cost
        if self.count == 0:
            self.cost = 0.0

    def _tidy_fifo(self) -> None:
        fifo = self._fifo
        if fifo is not None and len(fifo) > 2 * self.count + _SLACK_HEAP:
            self._fifo = [item for item in fifo if item[2].live]
            heapq.heapify(self._fifo)
            self.ops.n += len(self._fifo)

    def _enqueue(self, tenant: TenantQueue) -> None:
        self._tie += 1
        heapq.heappush(self._heap, (tenant.pass_, self._tie, tenant, tenant.version))
        self.ops.n += 1
        if len(self._heap) > 4 * len(self.tenants) + _SLACK_HEAP:
            self._heap = [(t.pass_, i, t, t.version) for i, t in enumerate(self.tenants.values())]
            self._tie = len(self._heap)  # ties keep their order within the rebuilt heap
            heapq.heapify(self._heap)
            self.ops.n += len(self._heap)

    def _enqueue_or_retire(self, tenant: TenantQueue) -> None:
        if tenant.count:
            tenant.version += 1  # its popped heap entry is gone; the fresh one carries a new version
            self._enqueue(tenant)
        else:
            self._retire(tenant)

    def _retire(self, tenant: TenantQueue) -> None:
        """A tenant with nothing left waiting leaves; a lead over vtime is remembered (no banking, no loss)."""
        tenant.active = False
        del self.tenants[tenant.tenant]
        if tenant.pass_ > self.vtime:
            self._lead[tenant.tenant] = tenant.pass_
            if len(self._lead) > 2 * len(self.tenants) + _SLACK_HEAP:
                self._lead = {name: p for name, p in self._lead.items() if p > self.vtime}
