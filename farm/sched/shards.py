"""The data the scheduling policy reads and returns: shard requests, decisions, its settings.

Everything here is a small frozen dataclass that the dispatcher (or the fleet simulator)
builds and the policy reads; nothing refers to Ray, torch, SQL or a clock. Times are plain
floats in seconds on whatever clock the caller uses (``time.monotonic()`` in the dispatcher,
the simulated clock in ``bench/fleet_sim.py``), passed in as ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Priority = Literal["interactive", "bulk"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "bulk")


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")


@dataclass(frozen=True)
class ShardRequest:
    """One ready step range ``[start, end)`` of one job, waiting for a replica of ``pool``.

    ``batch_key`` names what must match for shards to share a batch on one replica
    (model, expert, shape, step count: anything hashable). ``cost_s`` is the estimated
    run time on one replica; fair share charges it to the tenant, and queue positions
    add it up. ``queued_at`` is the job's place in line: the time the job was first
    queued. A job's later shards keep that time: within one tenant shards run in
    ``(queued_at, job_id, start)`` order, so a started clip finishes before a newer one
    starts, and a shard handed back by a lost replica keeps its place. It must not be
    later than the ``now`` it is submitted at. ``holder`` is the replica that already holds this job's state
    (it ran the previous shard), or None.
    """

    job_id: str
    tenant: str
    priority: Priority
    pool: str
    batch_key: Hashable
    start: int
    end: int
    cost_s: float
    queued_at: float
    holder: str | None = None

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("job_id must be a non-empty string")
        if not self.tenant:
            raise ValueError(f"job {self.job_id}: tenant must be a non-empty string")
        if self.priority not in PRIORITIES:
            raise ValueError(f"job {self.job_id}: priority must be one of {PRIORITIES}, got {self.priority!r}")
        if not self.pool:
            raise ValueError(f"job {self.job_id}: pool must be a non-empty string")
        if not (0 <= self.start < self.end):
            raise ValueError(f"job {self.job_id}: step range must satisfy 0 <= start < end, got [{self.start}, {self.end})")
        _finite(f"job {self.job_id}: cost_s", self.cost_s)
        if self.cost_s <= 0:
            raise ValueError(f"job {self.job_id}: cost_s must be > 0 (an estimated run time), got {self.cost_s!r}")
        _finite(f"job {self.job_id}: queued_at", self.queued_at)
        try:
            hash(self.batch_key)
        except TypeError:
            raise ValueError(f"job {self.job_id}: batch_key must be hashable (a tuple), got {self.batch_key!r}") from None


@dataclass(frozen=True)
class Assignment:
    """One decision: ``replica_id`` runs ``shards`` (1 to its ``max_batch``, all with the
    head's pool and batch key) as one batch. ``shards[0]`` is the head, the shard the
    policy chose; the rest rode along. ``aged`` is True when the head is a bulk shard
    let in ahead of waiting interactive work by the aging rule; ``affinity`` is True when
    the head went to the replica that holds its job's state."""

    replica_id: str
    pool: str
    shards: tuple[ShardRequest, ...]
    aged: bool = False
    affinity: bool = False


@dataclass(frozen=True)
class BatchTicket:
    """What each call of a batched :class:`Assignment` carries to its replica: the batch's id and how many
    calls it has, so the replica waits for all of them and runs them together."""

    id: str
    size: int


@dataclass(frozen=True)
class QueueDepth:
    """Waiting (not running) shards of one pool, by priority."""

    interactive: int
    bulk: int

    @property
    def total(self) -> int:
        return self.interactive + self.bulk


@dataclass(frozen=True)
class QueuePosition:
    """An estimate of what starts in ``pool`` before a job's next waiting shard.

    ``shards_ahead`` and ``cost_ahead_s`` assume no new arrivals and no aging beyond
    what is already due, and that each tenant's waiting shards cost their mean; divide
    ``cost_ahead_s`` by the pool's replica count for a rough wait.
    """

    pool: str
    priority: Priority
    shards_ahead: int
    cost_ahead_s: float


@dataclass(frozen=True)
class SchedulerConfig:
    """Settings of :class:`farm.sched.policy.Scheduler`.

    tenant_weights: fair-share weight per tenant (> 0); tenants not listed get ``default_weight``.
        Within one pool and priority, backlogged tenants are served cost in proportion to weight.
    default_weight: the weight of a tenant not in ``tenant_weights``.
    bulk_aging_s: how long bulk work may wait in a pool, with no bulk shard starting there,
        before the bulk class is let in once ahead of interactive work; None turns aging off
        (bulk then runs only when no interactive shard waits in its pool). The rule is spelled
        out in :mod:`farm.sched.policy`.
    max_batch: how many compatible shards one replica takes at once, unless the pool or the
        replica says otherwise. 1 turns batching off.
    pool_max_batch: per-pool overrides of ``max_batch``.
    batch_slack: how far ahead of its priority class's virtual time (in cost-seconds per unit
        weight) a tenant may be and still have a shard ride along in a batch. None: the batch
        size minus one, times the head shard's charge (``cost_s / weight``), enough for the
        head's tenant to fill a batch with its own equal-cost shards.
    """

    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    bulk_aging_s: float | None = 600.0
    max_batch: int = 1
    pool_max_batch: Mapping[str, int] = field(default_factory=dict)
    batch_slack: float | None = None

    def __post_init__(self) -> None:
        for tenant, weight in self.tenant_weights.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"tenant_weights[{tenant!r}] must be a finite number > 0, got {weight!r}")
        if not isinstance(self.default_weight, (int, float)) or not math.isfinite(self.default_weight) or self.default_weight <= 0:
            raise ValueError(f"default_weight must be a finite number > 0, got {self.default_weight!r}")
        if self.bulk_aging_s is not None:
            _finite("bulk_aging_s", self.bulk_aging_s)
            if self.bulk_aging_s < 0:
                raise ValueError(f"bulk_aging_s must be >= 0 or None (no aging), got {self.bulk_aging_s!r}")
        check_max_batch("max_batch", self.max_batch)
        for pool, size in self.pool_max_batch.items():
            check_max_batch(f"pool_max_batch[{pool!r}]", size)
        if self.batch_slack is not None:
            _finite("batch_slack", self.batch_slack)
            if self.batch_slack < 0:
                raise ValueError(f"batch_slack must be >= 0 or None, got {self.batch_slack!r}")
        # Frozen means frozen: a caller's later edits to its dicts must not change the policy.
        object.__setattr__(self, "tenant_weights", MappingProxyType(dict(self.tenant_weights)))
        object.__setattr__(self, "pool_max_batch", MappingProxyType(dict(self.pool_max_batch)))

    def weight(self, tenant: str) -> float:
        return float(self.tenant_weights.get(tenant, self.default_weight))

    def batch_limit(self, pool: str) -> int:
        return int(self.pool_max_batch.get(pool, self.max_batch))


def check_max_batch(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
