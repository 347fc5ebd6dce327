"""The farm's scheduling policy, pure: ready shards × free replicas → assignments.

No Ray, torch, SQL, asyncio or clock inside; the dispatcher and ``bench/fleet_sim.py``
drive the same :class:`Scheduler`. The rules (interactive first at shard boundaries,
bulk aging, weighted fair share, affinity, batching) are documented in
:mod:`farm.sched.policy`; the fair-share bound in :mod:`farm.sched.fair`.
"""

from farm.sched.policy import Scheduler, SchedulerStats
from farm.sched.shards import (
    PRIORITIES,
    Assignment,
    BatchTicket,
    Priority,
    QueueDepth,
    QueuePosition,
    SchedulerConfig,
    ShardRequest,
)

__all__ = [
    "PRIORITIES",
    "Assignment",
    "BatchTicket",
    "Priority",
    "QueueDepth",
    "QueuePosition",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "ShardRequest",
]
