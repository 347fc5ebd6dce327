"""The gateway's view of the queue: queue positions and completion estimates for video objects.

One view per gateway replica, shared by every request and refreshed at most every ``ttl_s``:
the dispatcher's :class:`~farm.jobs.estimates.QueueSnapshot` and the store's queued jobs in
claim order (one indexed read), fetched together. A retrieve costs a dictionary lookup, however
many clients poll; 2,000 clients polling cost one refresh per second, not 2,000 queries. A
refresh that fails (the dispatcher restarting) leaves estimates out until the next one works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from farm.api.wire import priority_name
from farm.jobs.estimates import Estimate, QueueSnapshot, estimate_in_flight, estimate_queued

if TYPE_CHECKING:
    from farm.jobs.store import Job, JobStore

log = logging.getLogger(__name__)


@dataclass
class _View:
    snapshot: QueueSnapshot
    ranks: dict[str, int] = field(default_factory=dict)  # queued job id -> jobs of its model ahead of it
    per_model: dict[str, int] = field(default_factory=dict)  # queued jobs per model (ranked ones)
    taken_at: float = 0.0
    failed: bool = False  # the refresh failed: no estimates until the next one


class QueueView:
    """``estimate(job)`` for the video objects the gateway sends."""

    def __init__(self, store: JobStore, snapshot: Callable[[], Awaitable[QueueSnapshot]], *,
                 ttl_s: float = 1.0, max_ranked: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self._snapshot, self.ttl_s, self.max_ranked = store, snapshot, ttl_s, max_ranked
        self._clock = clock
        self._view: _View | None = None
        self._lock = asyncio.Lock()

    async def estimate(self, job: Job) -> Estimate | None:
        """Queue position and completion estimate of a queued or running job; None for a finished one."""
        if job.status not in ("queued", "in_progress"):
            return None
        view = await self._current()
        if view is None:
            return None
        if job.status == "in_progress":
            return estimate_in_flight(view.snapshot, job.id)
        # Queued after the view was taken: behind every queued job of its model the view knows.
        rank = view.ranks.get(job.id, view.per_model.get(job.model, 0))
        steps = int((job.params or {}).get("steps") or 0)
        return estimate_queued(view.snapshot, job.model, priority_name(job.priority), steps, rank)

    async def _current(self) -> _View | None:
        view = self._view
        if view is not None and self._clock() - view.taken_at < self.ttl_s:
            return None if view.failed else view
        async with self._lock:  # one refresh at a time; the others wait for it, then read it
            view = self._view
            if view is not None and self._clock() - view.taken_at < self.ttl_s:
                return None if view.failed else view
            try:
                snapshot, order = await asyncio.gather(
                    self._snapshot(), run_in_threadpool(self.store.queued_order, self.max_ranked))
            except Exception as exc:
                log.warning("queue view refresh failed (%s: %s); estimates left out", type(exc).__name__, exc)
                self._view = _View(QueueSnapshot(time.time()), taken_at=self._clock(), failed=True)
                return None
            fresh = _View(snapshot, taken_at=self._clock())
            for job_id, model in order:
                fresh.ranks[job_id] = fresh.per_model.get(model, 0)
                fresh.per_model[model] = fresh.ranks[job_id] + 1
            self._view = fresh
            return fresh
