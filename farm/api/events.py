"""Streamed progress: ``GET /v1/videos/{id}/events`` as Server-Sent Events.

Every open stream of a gateway replica is fed by one watcher (:class:`JobWatch`): each tick it
reads every watched job in one query and hands each stream its row, so N streams cost one read
per tick, not N polls. A stream sends an event only when what a client sees changes (status,
progress, queue position, or the completion estimate by ``eta_step_s`` or more): ``video.updated``
while the job waits or runs, then one final event named after the terminal status
(``video.completed``, ``video.failed``, ``video.cancelled``) carrying the final object, and ends.

Event ids are the state they describe (``<updated_at µs>.<position>.<eta>``): a client that
reconnects with ``Last-Event-ID`` gets the current state only if it differs from the last one it
saw, so a resumed stream repeats no update (the final event is always sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool


if TYPE_CHECKING:
    from farm.jobs.store import Job, JobStore

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled")


class JobWatch:
    """One poller for every stream of this replica: ``follow(job)`` yields the job's row each tick."""

    def __init__(self, store: JobStore, tick_s: float = 0.5) -> None:
        self.store, self.tick_s = store, tick_s
        self._streams: dict[str, set[asyncio.Queue]] = {}
        self._poller: asyncio.Task | None = None

    @property
    def watched(self) -> int:
        return len(self._streams)

    async def follow(self, job: Job) -> AsyncIterator[Job | None]:
        """``job`` now, then its row every tick until it is terminal; None if it was deleted."""
        yield job
        if job.status in TERMINAL:
            return
        inbox: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._streams.setdefault(job.id, set()).add(inbox)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="job-watch")
        try:
            while True:
                row = await inbox.get()
                yield row
                if row is None or row.status in TERMINAL:
                    return
        finally:
            streams = self._streams.get(job.id)
            if streams is not None:
                streams.discard(inbox)
                if not streams:
                    del self._streams[job.id]

    async def _poll(self) -> None:
        while self._streams:
            await asyncio.sleep(self.tick_s)
            ids = list(self._streams)
            try:
                rows = await run_in_threadpool(self.store.get_many, ids)
            except Exception as exc:  # a store hiccup: the streams wait for the next tick
                log.warning("job watch: read of %d jobs failed: %s", len(ids), exc)
                continue
            for job_id in ids:
                for inbox in list(self._streams.get(job_id, ())):
                    if inbox.full():  # a slow reader gets the newest row, not a backlog
                        inbox.get_nowait()
                    inbox.put_nowait(rows.get(job_id))


def event_id(job: Job, shown: dict[str, Any], eta_step_s: int) -> str:
    """The id of the state a client sees: changes exactly when an event is due."""
    eta = shown.get("estimated_completion_at")
    position = shown.get("queue_position")
    updated_us = round(job.updated_at.timestamp() * 1_000_000)
    return (f"{updated_us}.{'' if position is None else position}."
            f"{'' if eta is None else eta // max(eta_step_s, 1)}")


async def video_events(watch: JobWatch, job: Job, last_event_id: str | None,
                       show: Callable[[Job], Awaitable[dict[str, Any]]], eta_step_s: int = 2, *,
                       max_s: float | None = None) -> AsyncIterator[dict[str, str]]:
    """The event stream of one video, as sse-starlette sends it (``event``, ``id``, ``data``).

    After ``max_s`` seconds (checked at each of the watcher's ticks) a stream whose video is still
    going ends without a final event; the client resumes it with ``Last-Event-ID``."""
    last = last_event_id
    deadline = None if max_s is None else time.monotonic() + max_s
    async with contextlib.aclosing(watch.follow(job)) as rows:
        async for row in rows:
            event = await _event_of(job, row, last, show, eta_step_s)
            if event is not None:
                yield event
                if event["event"] != "video.updated":  # final, or the video was deleted
                    return
                last = event["id"]
            if deadline is not None and time.monotonic() >= deadline:
                return


async def _event_of(job: Job, row: Job | None, last: str | None, show: Callable[[Job], Awaitable[dict[str, Any]]],
                    eta_step_s: int) -> dict[str, str] | None:
    """The event ``row`` makes after the state ``last``; None when the client saw that state already."""
    if row is None:
        return {"event": "error", "data": json.dumps({"error": {
            "message": f"video {job.id!r} was deleted", "type": "invalid_request_error",
            "param": "video_id", "code": "video_deleted"}})}
    shown = await show(row)
    current = event_id(row, shown, eta_step_s)
    terminal = row.status in TERMINAL
    if current == last and not terminal:  # the final object always, so a resumed stream ends knowing it
        return None
    return {"event": f"video.{row.status}" if terminal else "video.updated", "id": current, "data": json.dumps(shown)}
