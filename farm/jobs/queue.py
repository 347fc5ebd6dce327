"""The queue and its leases: the dispatcher's side of the job store.

A dispatcher claims the best runnable job under a *lease* (``claim_next``), writes progress
after each shard while it holds it (every write names the holder and misses once the lease is
someone else's: a fencing token), and finishes the job or gives it back (``requeue``).

Claiming reads one index and nothing else: the partial index of runnable rows (queued, no
cancellation asked for) in (priority, created_at, id) order, so a claim costs the same with
100,000 jobs queued as with one. Leases that ran out are *not* looked at by claims; ``reap``,
which the dispatcher calls on a timer, settles them: a job whose cancellation was asked for is
cancelled, one whose workers died ``max_attempts`` times fails with ``worker_lost``, and any
other goes back to ``queued`` with the lost run counted as an attempt. Only expired leases are
ever taken back, so a live sibling's jobs are never touched.

Locking: on PostgreSQL a claim picks with ``FOR UPDATE SKIP LOCKED`` (concurrent claimers take
different rows); its status change then moves the class's ``queue_depths`` counter through the
trigger, so claims and creates of one priority class take turns on that row for the rest of
their transactions (measured in ``bench/bench_store.py``), while the other class goes on. On
SQLite the writer's ``BEGIN IMMEDIATE`` excludes every other writer. Lease expiry compares the
writers' clocks, so hosts need NTP and ``lease_s`` should be far longer than any clock skew.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

import sqlalchemy as sa

from farm.jobs.job import (
    Job,
    Priority,
    check_priorities,
    check_worker,
    finished,
    lease_length,
    worker_lost,
)
from farm.jobs.outbox import emit
from farm.jobs.tables import VIDEOS, leased, runnable

log = logging.getLogger(__name__)

_V, _C = VIDEOS, VIDEOS.c


@dataclasses.dataclass(frozen=True)
class ReapReport:
    """What one ``reap`` did with the expired leases it found (ids of the jobs)."""

    requeued: tuple[str, ...] = ()  # back to queued, the lost run counted as an attempt
    cancelled: tuple[str, ...] = ()  # cancellation had been asked for
    failed: tuple[str, ...] = ()  # workers lost max_attempts times: failed as worker_lost

    def __len__(self) -> int:
        return len(self.requeued) + len(self.cancelled) + len(self.failed)


class LeasedQueue:
    """``JobStore``'s claims, leases and finishing writes."""

    _engine: sa.Engine
    _writer: sa.Engine
    _clock: Callable[[], dt.datetime]

    def claim_next(
        self,
        worker: str,
        lease_s: float,
        *,
        max_attempts: int | None = None,
        priorities: Collection[int] | None = None,
        hold_bulk_of: Collection[str] = (),
    ) -> Job | None:
        """Take the best queued job under a lease for ``worker``; None when none is queued.

        Order: priority, then oldest first. ``priorities`` limits the claim to those classes
        (None: every class). Bulk jobs of the owners in ``hold_bulk_of`` (accounts whose daily
        budget is spent) are passed over; they stay queued. A queued job that already used
        ``max_attempts`` attempts (taken back from dead workers that many times) fails with
        ``worker_lost`` instead of running, and the claim moves on to the next. Running jobs whose lease expired are not claimable until
        ``reap`` puts them back in the queue.
        """
        check_worker(worker)
        lease = lease_length(lease_s)
        classes = check_priorities(priorities)
        _check_attempts(max_attempts)
        now = self._clock()
        # One index probe per class named (equality on the index's first column keeps its order),
        # or one ordered read of the whole index when every class may run.
        where = []
        if hold_bulk_of:
            held = sorted(set(hold_bulk_of))
            where.append(sa.not_(sa.and_(_C.priority == Priority.BULK, _C.owner.in_(held))))
        picks = [claim_query(*where)] if classes is None else [claim_query(_C.priority == p, *where) for p in classes]
        with self._writer.begin() as conn:
            for pick in picks:
                while (row := conn.execute(pick).mappings().first()) is not None:
                    if max_attempts is None or row["attempts"] < max_attempts:
                        changes = {
                            "status": "in_progress",
                            "lease_owner": worker,
                            "lease_expires_at": now + lease,
                            "started_at": row["started_at"] or now,
                            "attempts": row["attempts"] + 1,
                            "updated_at": now,
                        }
                        conn.execute(sa.update(_V).where(_C.id == row["id"]).values(**changes))
                        return dataclasses.replace(Job.from_row(row), **changes)
                    conn.execute(sa.update(_V).where(_C.id == row["id"]).values(**worker_lost(now, max_attempts)))
                    emit(conn, "failed", [(row["id"], row["owner"])])
                    log.warning("failed %s: its worker was lost %d times", row["id"], row["attempts"])
        return None

    def reap(self, max_attempts: int | None = None) -> ReapReport:
        """Settle running jobs whose lease expired: cancelled if cancellation was requested,
        failed with ``worker_lost`` once ``attempts`` reached ``max_attempts``, else queued again
        (attempts kept: the lost run counts, as when ``requeue(voluntary=False)`` takes a job back).

        Only expired leases are touched, never a live one. Safe to run from several processes at
        once: rows another reaper or claimer holds are skipped (PostgreSQL ``SKIP LOCKED``).
        """
        _check_attempts(max_attempts)
        now = self._clock()
        expired = _expired(now)
        found: dict[str, list[tuple[str, str | None]]] = {"queued": [], "cancelled": [], "failed": []}
        with self._writer.begin() as conn:
            rows = conn.execute(reap_query(now)).all()
            for row in rows:
                if row.cancel_requested:
                    fate = "cancelled"
                elif max_attempts is not None and row.attempts >= max_attempts:
                    fate = "failed"
                else:
                    fate = "queued"
                found[fate].append((row.id, row.owner))
            for fate, videos in found.items():
                if not videos:
                    continue
                if fate == "cancelled":
                    changes = finished("cancelled", now)
                elif fate == "failed":
                    changes = worker_lost(now, max_attempts or 0)
                else:
                    changes = {"status": "queued", "lease_owner": None, "lease_expires_at": None, "updated_at": now}
                conn.execute(sa.update(_V).where(_C.id.in_([v for v, _ in videos]), expired).values(**changes))
                emit(conn, changes["status"], videos)
        if rows:
            holders = sorted({r.lease_owner for r in rows if r.lease_owner})
            log.warning("reaped %d expired lease(s) of %s: %s", len(rows), ", ".join(holders),
                        {fate: [v for v, _ in videos] for fate, videos in found.items() if videos})
        return ReapReport(*(tuple(v for v, _ in found[f]) for f in ("queued", "cancelled", "failed")))

    def renew(self, id: str, worker: str, lease_s: float) -> bool:
        """Extend the lease; False when it is no longer ours (reclaimed, deleted, finished)
        or cancellation was requested (``get`` tells which; then ``finish_cancelled``)."""
        now = self._clock()
        changes = {"lease_expires_at": now + lease_length(lease_s), "updated_at": now}
        return self._write_held(id, worker, changes, _C.cancel_requested.is_(False))

    def record_progress(
        self,
        id: str,
        worker: str,
        *,
        step_index: int,
        num_steps: int,
        progress: int,
        checkpoint_key: str | None = None,
        lease_s: float | None = None,
    ) -> bool:
        """Record a finished shard; False (nothing written) unless ``worker`` holds the lease.

        With ``lease_s`` the same write also extends the lease (one write per shard, not two).

        ``progress`` and ``step_index`` never go backwards; a checkpoint older than the
        recorded step does not replace a newer one.
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: {num_steps!r} must be a positive integer")
        if not isinstance(step_index, int) or not 0 <= step_index <= num_steps:
            raise ValueError(f"step_index: {step_index!r} is out of range; allowed: 0..{num_steps}")
        if not isinstance(progress, int) or not 0 <= progress <= 100:
            raise ValueError(f"progress: {progress!r} is out of range; allowed: 0..100")
        changes: dict[str, Any] = {
            "progress": sa.case((_C.progress < progress, progress), else_=_C.progress),
            "step_index": sa.case((_C.step_index < step_index, step_index), else_=_C.step_index),
            "num_steps": num_steps,
            "updated_at": self._clock(),
        }
        if checkpoint_key is not None:
            changes["checkpoint_key"] = sa.case((_C.step_index <= step_index, checkpoint_key), else_=_C.checkpoint_key)
        if lease_s is not None:
            changes["lease_expires_at"] = self._clock() + lease_length(lease_s)
        return self._write_held(id, worker, changes)

    def record_checkpoint(self, id: str, worker: str, key: str) -> bool:
        """Make ``key`` the job's checkpoint, the one a restart resumes from; False (nothing written)
        unless ``worker`` holds the lease. The dispatcher records a job's checkpoints in step
        order, each once its writer acknowledged it, so the newest recorded is the newest written."""
        return self._write_held(id, worker, {"checkpoint_key": key, "updated_at": self._clock()})

    def complete(self, id: str, worker: str, objects: Mapping[str, str]) -> bool:
        """Mark done with its stored objects (variant → S3 key); False unless we hold the lease.

        The clip's lifetime (``expires_at - created_at``, chosen at create) starts now: its
        assets are kept that long after they exist, however long the job waited in the queue."""
        now = self._clock()
        changes = finished("completed", now)
        changes.update(progress=100, objects=dict(objects), expires_at=_restarted_expiry(now))
        return self._write_held(id, worker, changes)

    def fail(self, id: str, worker: str, code: str, message: str) -> bool:
        """Mark failed with an OpenAI-style error; False unless we hold the lease."""
        changes = finished("failed", self._clock())
        changes.update(error_code=code, error_message=message)
        return self._write_held(id, worker, changes)

    def finish_cancelled(self, id: str, worker: str) -> bool:
        """The worker stopped a job whose cancellation was requested; False unless we hold the lease."""
        return self._write_held(id, worker, finished("cancelled", self._clock()))

    def requeue(self, id: str, worker: str, reason: str, *, voluntary: bool = True) -> bool:
        """Give the job back to the queue (shutdown, preemption), keeping its checkpoint.

        A voluntary release does not count as an attempt; taking a job back from a worker that
        died (``voluntary=False``) does, so a job that keeps killing its workers runs out of
        attempts. A job whose cancellation was requested is cancelled instead. False unless
        ``worker`` holds the lease.
        """
        now = self._clock()
        with self._writer.begin() as conn:
            row = conn.execute(sa.select(_V).where(_held(id, worker)).with_for_update()).mappings().first()
            if row is None:
                return False
            if row["cancel_requested"]:
                changes = finished("cancelled", now)
            else:
                changes = {
                    "status": "queued",
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "attempts": max(row["attempts"] - 1, 0) if voluntary else row["attempts"],
                    "updated_at": now,
                }
            conn.execute(sa.update(_V).where(_C.id == id).values(**changes))
            emit(conn, changes["status"], [(id, row["owner"])])
        log.info("requeued %s from %s: %s", id, worker, reason)
        return True

    def leases_of(self, role: str) -> builtins.list[tuple[str, str]]:
        """(id, lease owner) of running jobs leased by ``role`` or any ``role:<instance>``, live
        leases included (to take back only expired ones, use ``reap``).

        Workers lease under a per-instance name (a fencing token: a stale instance's writes
        miss); a restarted worker of the same role can take these back."""
        check_worker(role)
        with self._engine.connect() as conn:
            query = sa.select(_C.id, _C.lease_owner).where(
                leased(),
                sa.or_(_C.lease_owner == role, _C.lease_owner.startswith(f"{role}:", autoescape=True)),
            )
            return [(r.id, r.lease_owner) for r in conn.execute(query.order_by(_C.priority, _C.created_at))]

    def held_by(self, worker: str) -> builtins.list[str]:
        """Ids of running jobs whose lease names ``worker`` (a restarted worker takes them back)."""
        check_worker(worker)
        with self._engine.connect() as conn:
            query = sa.select(_C.id).where(leased(), _C.lease_owner == worker)
            return list(conn.scalars(query.order_by(_C.priority, _C.created_at)).all())

    def _write_held(self, id: str, worker: str, changes: dict[str, Any], *extra: sa.ColumnElement[bool]) -> bool:
        with self._writer.begin() as conn:
            row = conn.execute(
                sa.update(_V).where(_held(id, worker), *extra).values(**changes).returning(_C.id, _C.owner)
            ).first()
            if row is not None:
                emit(conn, changes.get("status"), [(row.id, row.owner)])
        return row is not None


def _restarted_expiry(now: dt.datetime) -> sa.ColumnElement:
    """``now + (expires_at - created_at)`` in SQL (null stays null), on the stored microseconds."""
    start = sa.literal(_C.created_at.type.process_bind_param(now, None), sa.BigInteger)
    return start + sa.type_coerce(_C.expires_at, sa.BigInteger) - sa.type_coerce(_C.created_at, sa.BigInteger)


def claim_query(*where: sa.ColumnElement[bool]) -> sa.Select:
    """A claim's pick: the first runnable row in (priority, created_at, id) order, read from the
    partial index ``ix_videos_runnable`` (the plan test and the benchmark run it as it is)."""
    # FOR UPDATE SKIP LOCKED on PostgreSQL; SQLAlchemy renders nothing on SQLite,
    # where BEGIN IMMEDIATE already excludes every other writer.
    return (
        sa.select(_V)
        .where(runnable(), *where)
        .order_by(_C.priority, _C.created_at, _C.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )


def reap_query(now: dt.datetime) -> sa.Select:
    """The reaper's pick: running rows whose lease ran out by ``now``, from ``ix_videos_leased``;
    rows another reaper or claimer holds are skipped (PostgreSQL)."""
    return (
        sa.select(_C.id, _C.owner, _C.attempts, _C.cancel_requested, _C.lease_owner)
        .where(_expired(now))
        .order_by(_C.lease_expires_at)
        .with_for_update(skip_locked=True)
    )


def _expired(now: dt.datetime) -> sa.ColumnElement[bool]:
    return sa.and_(leased(), _C.lease_expires_at < now)


def _held(id: str, worker: str) -> sa.ColumnElement[bool]:
    return sa.and_(_C.id == id, _C.lease_owner == worker, _C.status == "in_progress")


def _check_attempts(max_attempts: int | None) -> None:
    if max_attempts is not None and (not isinstance(max_attempts, int) or isinstance(max_attempts, bool)
                                     or max_attempts < 1):
        raise ValueError(f"max_attempts: {max_attempts!r} must be a positive integer or None")
