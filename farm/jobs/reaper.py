"""The clip reaper: removes expired clips' objects from S3 and marks their records expired.

It runs in the leading dispatcher (``Dispatcher.leader_work``, beside the batch runner), the
one process the leader lease makes unique, so two nodes never reap at once and a standby takes
over with the jobs. Every ``expiry.reaper_poll_s`` a turn runs in a worker thread (the
dispatcher's loop never waits for S3): it reads up to ``expiry.reaper_batch`` finished jobs past
``expires_at`` that still have objects (``Lifetimes.due``), and for each deletes every object
under its prefix and its checkpoint (``delete_clip``), then sets ``expired_at``. Objects go
first: a turn that dies between the two redoes a delete that finds nothing, so a turn is
idempotent. A clip whose delete fails (S3 down) is left unmarked and retried next turn; the
others go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from farm.jobs.expiry import Lifetimes
from farm.storage.s3 import delete_clip

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReapTurn:
    """What one turn did: clips marked expired, objects deleted, clips whose delete failed."""

    reaped: int = 0
    objects: int = 0
    failed: int = 0


class ClipReaper:
    """``tick()`` from the leader's loop starts a turn; ``turn()`` is one turn, synchronously."""

    def __init__(self, lifetimes: Lifetimes, objects: Any, *, batch: int = 100, poll_s: float = 60.0,
                 leading: Callable[[], bool] = lambda: True, metrics: Any = None) -> None:
        """``objects``: an ObjectStore, or a factory of one (built on the first turn, in its thread);
        ``metrics``: a ``FarmMetrics`` (its ``clips_reaped`` counters), or None."""
        if batch < 1 or poll_s <= 0:
            raise ValueError(f"ClipReaper: batch ({batch}) must be >= 1 and poll_s ({poll_s}) > 0")
        self.lifetimes, self._objects = lifetimes, objects
        self.batch, self.poll_s, self.leading, self.metrics = batch, poll_s, leading, metrics
        self._turn: asyncio.Future | None = None
        self._turned_at = float("-inf")

    @property
    def objects(self):
        if callable(self._objects):
            self._objects = self._objects()
        return self._objects

    def tick(self) -> None:
        """Start a turn in a worker thread unless one runs or the last began under ``poll_s`` ago.
        Never blocks."""
        if self._turn is not None and not self._turn.done():
            return
        if time.monotonic() - self._turned_at < self.poll_s:
            return
        self._turned_at = time.monotonic()
        self._turn = asyncio.ensure_future(asyncio.to_thread(self._guarded_turn))

    async def stop(self) -> None:
        if self._turn is not None:
            await asyncio.gather(self._turn, return_exceptions=True)

    def _guarded_turn(self) -> ReapTurn:
        try:
            return self.turn()
        except Exception:  # the store itself failed: the next turn retries
            log.exception("reaping expired clips failed; the next turn retries")
            return ReapTurn()

    def turn(self) -> ReapTurn:
        """Reap one batch of expired clips."""
        reaped = removed = failed = 0
        for job in self.lifetimes.due(self.batch):
            if not self.leading():
                break
            try:
                count = delete_clip(self.objects, job.id)
            except Exception as exc:  # S3 trouble: leave it unmarked, the next turn tries again
                failed += 1
                log.warning("could not remove expired clip %s (%s: %s); retrying next turn",
                            job.id, type(exc).__name__, exc)
                continue
            removed += count
            if self.lifetimes.mark_expired(job.id):
                reaped += 1
        result = ReapTurn(reaped, removed, failed)
        if self.metrics is not None and (reaped or removed or failed):
            try:
                self.metrics.clips_reaped_observe(result.reaped, result.objects, result.failed)
            except Exception:  # a broken metrics hook must not stop the reaper
                log.exception("metrics hook failed")
        if reaped or failed:
            log.info("reaper: %d clip(s) expired, %d object(s) removed, %d failed", reaped, removed, failed)
        return result
