"""The gateway's view of the queue: queue positions and completion estimates for video objects.

One view per gateway replica, shared by every request and refreshed once it is ``ttl_s`` old
(or, for a job newer than the view, once it is ``min_refresh_s`` old):
the dispatcher's :class:`~farm.jobs.estimates.QueueSnapshot` and the store's queued jobs in
claim order (one indexed read), fetched together. A retrieve costs a dictionary lookup, however
many clients poll; 2,000 clients polling cost one refresh per second, not 2,000 queries. A
refresh that fails (the dispatcher restarting) leaves estimates out until the next one works.
A job newer than the view is placed behind every job the view knows, so jobs created less than
``min_refresh_s`` before it are not yet counted ahead of it.
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
                 ttl_s: float = 1.0, min_refresh_s: float = 0.1, max_ranked: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self._snapshot, self.ttl_s, self.max_ranked = store, snapshot, ttl_s, max_ranked
        self.min_refresh_s = min(min_refresh_s, ttl_s)
        self._clock = clock
        self._view: _View | None = None
        self._lock = asyncio.Lock()

    async def estimate(self, job: Job) -> Estimate | None:
        """Queue position and completion estimate of a queued or running job; None for a finished one."""
        if job.status not in ("queued", "in_progress"):
            return None
        view = await self._current()
        if view is not None and self._unknown(view, job) and job.updated_at.timestamp() > view.snapshot.at:
            # Created or claimed after the view was taken: read it again rather than guess (at most
            # every min_refresh_s, so a burst of new jobs costs a few refreshes, not one each).
            view = await self._current(max_age_s=self.min_refresh_s)
        if view is None:
            return None
        steps = int((job.params or {}).get("steps") or 0)
        if job.status == "in_progress":
            known = estimate_in_flight(view.snapshot, job.id)
            if known is not None:
                return known
            # Claimed after the view was taken: in line behind the in-flight jobs that have not started.
            return estimate_queued(view.snapshot, job.model, priority_name(job.priority), steps, 0)
        # Queued after the view was taken: behind every queued job of its model the view knows.
        rank = view.ranks.get(job.id, view.per_model.get(job.model, 0))
        return estimate_queued(view.snapshot, job.model, priority_name(job.priority), steps, rank)

    @staticmethod
    def _unknown(view: _View, job: Job) -> bool:
        return job.id not in view.ranks and job.id not in view.snapshot.jobs

    async def _current(self, max_age_s: float | None = None) -> _View | None:
        max_age_s = self.ttl_s if max_age_s is None else max_age_s
        view = self._view
        if view is not None and self._clock() - view.taken_at < max_age_s:
            return None if view.failed else view
        async with self._lock:  # one refresh at a time; the others wait for it, then read it
            view = self._view
            if view is not None and self._clock() - view.taken_at < max_age_s:
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
