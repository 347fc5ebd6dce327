"""Admission: ``JobStore.create`` — queue caps, idempotency keys, and how creates run concurrently.

A create checks, in order: the idempotency key (a replay returns the earlier job, even when the
queues are full: it is not new work), the owner's queue cap, then the farm's cap for the job's
priority class, and inserts. Interactive and bulk jobs are counted apart, so a bulk flood never
gets an interactive create refused.

Concurrency. Each check-then-insert must not interleave with another create that could change
its answer, and with nothing else:

- The farm's cap per class reads that class's row of ``queue_depths`` (the number of runnable
  rows, kept exact by triggers on ``videos`` in the same transaction as every change) with
  ``SELECT ... FOR UPDATE``, then inserts: the row lock, held to commit, is the class's lock.
  Creates of one class take turns for the length of one insert; interactive creates never wait
  for bulk ones. Claims, requeues and cancellations move the same counter through the triggers
  (a short wait for the row, never a wrong count).
- The owner's cap and the idempotency lookup hold a PostgreSQL advisory lock on a hash of the
  owner (two-key form, a space apart from ``farm.db``'s one-key locks): only one owner's creates
  wait on each other. A hash collision only makes two owners share a lock. The owner's count
  reads the partial index of runnable rows by owner (``ix_videos_runnable_owner``), and the
  unique (owner, key) index stays as a backstop.
- Locks are taken owner first, then class, in every create, so two creates cannot deadlock; a
  create with no cap and no key takes neither.
- SQLite allows one writer at a time: ``BEGIN IMMEDIATE`` (``Database.writer``) takes that lock
  up front and serialises every write, creates included.

Why a trigger-kept counter and not a count under a lock: a count must read the class's whole
queue on every create (100,000 index entries at 100,000 queued), and bounding it with ``LIMIT``
invites PostgreSQL to choose a sequential scan that expects to stop early, which reads every
finished row first. Why triggers and not counter updates in Python: the counter must move on
every transition in and out of ``queued`` (create, claim, requeue, reap, cancel, delete, and any
future one); a trigger cannot be forgotten. Under PostgreSQL's READ COMMITTED a locked counter is
exact: ``FOR UPDATE`` waits for the previous holder and returns the row as it committed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from farm.db import Database
from farm.jobs.job import DEFAULT_EXPIRES_IN_S, Job, Priority, check_cap, new_job
from farm.jobs.tables import DEPTHS, VIDEOS, runnable
from farm.jobs.usage import BudgetExceeded
from farm.sched.budget import BudgetStatus

_V, _C, _D = VIDEOS, VIDEOS.c, DEPTHS
# PostgreSQL advisory lock, two-key form (a space apart from the one-key locks of farm.db):
# (namespace, hash of the owner). An arbitrary constant only this store uses.
_LOCK_OWNER = 0x7666_0003
# Retry-After when no job finished recently, and the window its estimate looks at.
_RETRY_AFTER_DEFAULT_S = 30.0
_THROUGHPUT_WINDOW_S = 600.0


class QueueFull(Exception):
    """``create`` refused: ``max_queued`` jobs are already waiting."""

    def __init__(self, retry_after_s: float, *, queued: int, max_queued: int, scope: str = "farm") -> None:
        super().__init__(f"{scope} queue is full: {queued} jobs queued, limit {max_queued}; "
                         f"retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s
        self.queued = queued
        self.max_queued = max_queued
        # "farm": every tenant's queued jobs of this priority class; "account": this owner's.
        self.scope = scope


class IdempotencyConflict(ValueError):
    """An idempotency key was reused for a different request."""


class Admission:
    """``JobStore``'s create."""

    _db: Database
    _writer: sa.Engine
    _clock: Callable[[], dt.datetime]

    def create(
        self,
        *,
        model: str,
        prompt: str,
        size: str,
        seconds: int,
        params: Mapping[str, Any],
        priority: int = Priority.INTERACTIVE,
        owner: str | None = None,
        max_queued: int | None = None,
        max_queued_per_owner: int | None = None,
        idempotency_key: str | None = None,
        expires_in_s: float = DEFAULT_EXPIRES_IN_S,
        budget: BudgetStatus | None = None,
        video_id: str | None = None,
        on_insert: Callable[[Connection, Job], None] | None = None,
    ) -> Job:
        """Queue a new job, or return the earlier one with the same ``idempotency_key``.

        ``max_queued`` caps the queued jobs of this job's priority class (the caller passes the
        cap of that class); ``max_queued_per_owner`` caps the owner's queued jobs of every class.
        Raises QueueFull (creating nothing) when a cap is reached, IdempotencyConflict when the
        key was used for a different request, BudgetExceeded when ``budget`` (the owner's day,
        read by the caller) is spent (a replay is still returned), and ValueError naming any bad
        argument. ``video_id`` is the new job's id when the caller drew it beforehand (to store the
        job's input objects under it); a replayed job keeps its own id. ``on_insert`` runs in the
        insert's transaction, after the row is written (not for a replay): what it writes commits with
        the job, and an exception from it creates nothing (the cameo store records uses this way).
        """
        job = new_job(
            model, prompt, size, seconds, params, priority, owner, idempotency_key, expires_in_s, self._clock(),
            video_id=video_id,
        )
        check_cap("max_queued", max_queued)
        check_cap("max_queued_per_owner", max_queued_per_owner)
        with self._writer.begin() as conn:
            if idempotency_key is not None or max_queued_per_owner is not None:
                self._pg_lock2(conn, _LOCK_OWNER, _hash32(owner or ""))
            if idempotency_key is not None:
                row = conn.execute(sa.select(_V).where(
                    sa.func.coalesce(_C.owner, "") == (owner or ""), _C.idempotency_key == idempotency_key
                )).mappings().first()
                if row is not None:
                    return _replay(Job.from_row(row), job)
            if budget is not None and budget.exhausted:
                raise BudgetExceeded(budget)
            if max_queued_per_owner is not None:
                mine = conn.scalar(owner_depth_query(owner))
                if mine >= max_queued_per_owner:
                    retry = _retry_after(conn, mine - max_queued_per_owner + 1, job.created_at)
                    raise QueueFull(retry, queued=mine, max_queued=max_queued_per_owner, scope="account")
            if max_queued is not None:
                queued = _lock_depth(conn, self._db.sqlite, job.priority)
                if queued >= max_queued:
                    retry = _retry_after(conn, queued - max_queued + 1, job.created_at)
                    raise QueueFull(retry, queued=queued, max_queued=max_queued)
            conn.execute(sa.insert(_V).values(**dataclasses.asdict(job)))
            if on_insert is not None:
                on_insert(conn, job)
        return job

    def _pg_lock2(self, conn: Connection, namespace: int, key: int) -> None:
        """A transaction-level advisory lock on (namespace, key) on PostgreSQL; nothing on SQLite,
        whose BEGIN IMMEDIATE already excludes every other writer."""
        if not self._db.sqlite:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
                sa.cast(sa.literal(namespace), sa.Integer), sa.cast(sa.literal(key), sa.Integer))))


def _hash32(text: str) -> int:
    """A stable signed 32-bit hash (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big", signed=True)


def depth_query(priority: int) -> sa.Select:
    """The class's queue length, its row locked until commit (PostgreSQL; SQLite renders no lock)."""
    return sa.select(_D.c.queued).where(_D.c.priority == priority).with_for_update()


def owner_depth_query(owner: str | None) -> sa.Select:
    """The owner's runnable rows, counted from ``ix_videos_runnable_owner``."""
    return sa.select(sa.func.count()).select_from(_V).where(
        runnable(), _C.owner == owner if owner else _C.owner.is_(None))


def _lock_depth(conn: Connection, sqlite: bool, priority: int) -> int:
    queued = conn.scalar(depth_query(priority))
    if queued is None:  # a class the migration did not seed: add its row, then lock it
        insert = (sqlite_dialect if sqlite else postgresql).insert(_D).values(priority=priority, queued=0)
        conn.execute(insert.on_conflict_do_nothing(index_elements=[_D.c.priority]))
        queued = conn.scalar(depth_query(priority))
    return queued


def _retry_after(conn: Connection, excess: int, now: dt.datetime) -> float:
    """Seconds until ``excess`` queue slots free up, at the recent finishing rate."""
    since = now - dt.timedelta(seconds=_THROUGHPUT_WINDOW_S)
    done = conn.scalar(sa.select(sa.func.count()).select_from(_V).where(_C.completed_at >= since))
    if not done:
        return _RETRY_AFTER_DEFAULT_S
    return float(min(max(math.ceil(excess * _THROUGHPUT_WINDOW_S / done), 1), _THROUGHPUT_WINDOW_S))


def _replay(existing: Job, request: Job) -> Job:
    """Same key, same request: the earlier job. Same key, another request: a conflict.

    A ``request_fingerprint`` in ``params`` (the gateway's hash of the request as the client sent
    it, before defaults such as a random seed) decides when both jobs have one."""
    mine, theirs = request.params.get("request_fingerprint"), existing.params.get("request_fingerprint")
    if mine is not None and mine == theirs:
        return existing
    fields = ("model", "prompt", "size", "seconds", "params", "priority")
    differing = [name for name in fields if getattr(existing, name) != getattr(request, name)]
    if mine is not None and "params" in differing:  # name what the client changed, not the fingerprint
        changed = {k for k in {*existing.params, *request.params} - {"request_fingerprint", "seed"}
                   if existing.params.get(k) != request.params.get(k)}
        differing = [d for d in differing if d != "params"] + sorted(changed) or ["parameters"]
    if differing:
        raise IdempotencyConflict(
            f"idempotency_key {existing.idempotency_key!r} was already used for video {existing.id} "
            f"with different {', '.join(differing)}"
        )
    return existing
