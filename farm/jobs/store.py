"""The durable job store: one SQL table of videos, the farm's source of truth.

The gateway creates jobs here; a dispatcher claims them under a *lease*, records
progress after each denoising shard, and finishes them. Any process may die: a
job whose lease runs out is claimable again and resumes from ``checkpoint_key``.

Backends: a SQLite file by default (WAL, so several processes share it) and
PostgreSQL by URL (``postgresql+psycopg://...``). Read-then-write transactions
must not interleave with another writer's:

- SQLite: every write transaction starts with ``BEGIN IMMEDIATE``, which takes
  the file's single write lock up front (a deferred BEGIN would fail with
  SQLITE_BUSY when its read snapshot goes stale).
- PostgreSQL: ``claim_next`` picks with ``SELECT ... FOR UPDATE SKIP LOCKED``;
  ``create`` with a queue cap or an idempotency key holds a transaction-level
  advisory lock across its count/lookup and its insert; ``migrate`` holds one
  across ``alembic upgrade``.

Times are stored as integer microseconds since the Unix epoch (UTC) in BIGINT
columns and surface as timezone-aware UTC datetimes: they sort, compare and
round-trip identically on both backends (SQLite has no timezone-aware type).
Lease expiry compares the writers' clocks, so hosts need NTP and ``lease_s``
should be far longer than any clock skew.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import enum
import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import JSON, Base, Database, alembic_config, sqlite_url, unix, utcnow  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DEFAULT_EXPIRES_IN_S = 7 * 24 * 3600
STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]

_SIZE = re.compile(r"^[1-9]\d*x[1-9]\d*$")
# PostgreSQL advisory-lock keys: arbitrary constants that only this store uses.
_LOCK_CREATE = 0x7666_0002
# Retry-After when no job finished recently, and the window its estimate looks at.
_RETRY_AFTER_DEFAULT_S = 30.0
_THROUGHPUT_WINDOW_S = 600.0


class Priority(enum.IntEnum):
    """Lower runs first."""

    INTERACTIVE = 0
    BULK = 1


PRIORITY_INTERACTIVE = Priority.INTERACTIVE
PRIORITY_BULK = Priority.BULK


class QueueFull(Exception):
    """``create`` refused: ``max_queued`` jobs are already waiting."""

    def __init__(self, retry_after_s: float, *, queued: int, max_queued: int, scope: str = "farm") -> None:
        super().__init__(f"{scope} queue is full: {queued} jobs queued, limit {max_queued}; "
                         f"retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s
        self.queued = queued
        self.max_queued = max_queued
        self.scope = scope  # "farm": every tenant's queued jobs; "account": this owner's


class IdempotencyConflict(ValueError):
    """An idempotency key was reused for a different request."""


class Video(Base):
    """One row per job: the OpenAI video object plus the farm's bookkeeping."""

    __tablename__ = "videos"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    status: Mapped[str] = mapped_column(sa.String(16))
    progress: Mapped[int]
    model: Mapped[str] = mapped_column(sa.String(255))
    prompt: Mapped[str] = mapped_column(sa.Text)
    size: Mapped[str] = mapped_column(sa.String(32))
    seconds: Mapped[int]
    params: Mapped[dict[str, Any]]
    priority: Mapped[int]
    created_at: Mapped[dt.datetime]
    started_at: Mapped[dt.datetime | None]
    completed_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime]
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    attempts: Mapped[int]
    step_index: Mapped[int]
    num_steps: Mapped[int]
    checkpoint_key: Mapped[str | None] = mapped_column(sa.Text)
    objects: Mapped[dict[str, Any]]
    lease_owner: Mapped[str | None] = mapped_column(sa.String(255))
    lease_expires_at: Mapped[dt.datetime | None]
    cancel_requested: Mapped[bool]
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255))

    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('queued', 'in_progress', 'completed', 'failed', 'cancelled')", name="ck_videos_status"
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 100", name="ck_videos_progress"),
        # Claiming: runnable rows in (priority, created_at) order.
        sa.Index("ix_videos_claim", "status", "priority", "created_at"),
        # Finding expired leases of running jobs.
        sa.Index("ix_videos_lease", "status", "lease_expires_at"),
        # Listing: per tenant and across tenants, cursor = (created_at, id).
        sa.Index("ix_videos_owner_created", "owner", "created_at", "id"),
        sa.Index("ix_videos_created", "created_at", "id"),
        # Recent throughput, for QueueFull's retry-after estimate.
        sa.Index("ix_videos_completed", "completed_at"),
    )


# NULL owners are distinct in a plain unique index on both backends; coalesce makes
# "no owner" one owner, so the key is unique per owner including the anonymous one.
sa.Index(
    "uq_videos_owner_idempotency",
    sa.func.coalesce(Video.__table__.c.owner, ""),
    Video.__table__.c.idempotency_key,
    unique=True,
)

class VideoEvent(Base):
    """The job store's event log: one row per terminal transition, written in the same
    transaction as the transition itself (an outbox), read by the webhook fan-out."""

    __tablename__ = "video_events"

    seq: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    type: Mapped[str] = mapped_column(sa.String(64))  # video.completed | video.failed | video.cancelled
    video_id: Mapped[str] = mapped_column(sa.String(64))
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[dt.datetime]


@dataclasses.dataclass(frozen=True)
class Event:
    seq: int
    id: str
    type: str
    video_id: str
    owner: str | None
    created_at: dt.datetime


EVENT_TYPES = {"completed": "video.completed", "failed": "video.failed", "cancelled": "video.cancelled"}

_V = Video.__table__
_C = _V.c
_E = VideoEvent.__table__


@dataclasses.dataclass(frozen=True)
class Job:
    """A snapshot of one row, safe to pickle and send between processes.

    ``params`` and ``objects`` are plain dicts: treat them as read-only.
    """

    id: str
    model: str
    prompt: str
    size: str
    seconds: int
    params: dict[str, Any]
    priority: int
    created_at: dt.datetime
    updated_at: dt.datetime
    # Defaults: a new, queued job.
    owner: str | None = None
    status: str = "queued"
    progress: int = 0
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    step_index: int = 0
    num_steps: int = 0
    checkpoint_key: str | None = None
    objects: dict[str, str] = dataclasses.field(default_factory=dict)
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(**{name: row[name] for name in _JOB_FIELDS})

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``video`` object; farm extensions: ``prompt``, ``priority``, ``seed``."""
        try:
            priority: str | int = Priority(self.priority).name.lower()
        except ValueError:
            priority = self.priority
        error = None
        if self.error_code is not None or self.error_message is not None:
            error = {"code": self.error_code, "message": self.error_message}
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": _unix(self.created_at),
            "completed_at": _unix(self.completed_at),
            "expires_at": _unix(self.expires_at),
            "seconds": str(self.seconds),
            "size": self.size,
            "error": error,
            "prompt": self.prompt,
            "priority": priority,
            "seed": self.params.get("seed"),
            "remixed_from_video_id": self.params.get("remixed_from_video_id"),
        }


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))


def new_video_id() -> str:
    return f"video_{uuid.uuid4().hex}"


class JobStore:
    """Jobs in a SQL database; thread-safe, and safe to share between processes."""

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        """``db``: a URL, or a ``Database`` shared with the other stores of this process.
        ``clock`` (timezone-aware UTC now) is for tests that move time forward."""
        self._db = Database(db) if isinstance(db, str) else db
        self.url = self._db.url
        self._sqlite = self._db.sqlite
        self._engine, self._writer = self._db.engine, self._db.writer
        self._clock = clock or _now

    def __repr__(self) -> str:
        return f"JobStore({self.url.render_as_string(hide_password=True)!r})"

    # -- lifecycle ---------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision; idempotent, safe to run concurrently."""
        self._db.migrate()

    def close(self) -> None:
        self._engine.dispose()

    # -- the gateway's side --------------------------------------------------------

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
    ) -> Job:
        """Queue a new job, or return the earlier one with the same ``idempotency_key``.

        Raises QueueFull (creating nothing) when ``max_queued`` jobs already wait,
        IdempotencyConflict when the key was used for a different request, and
        ValueError naming any bad argument.
        """
        job = _new_job(
            model, prompt, size, seconds, params, priority, owner, idempotency_key, expires_in_s, self._clock()
        )
        for name, cap in (("max_queued", max_queued), ("max_queued_per_owner", max_queued_per_owner)):
            if cap is not None and (not isinstance(cap, int) or cap < 0):
                raise ValueError(f"{name}: {cap!r} must be a non-negative integer or None")
        with self._writer.begin() as conn:
            if max_queued is not None or max_queued_per_owner is not None or idempotency_key is not None:
                self._pg_lock(conn, _LOCK_CREATE)
            if idempotency_key is not None:
                row = (
                    conn.execute(
                        sa.select(_V).where(
                            sa.func.coalesce(_C.owner, "") == (owner or ""), _C.idempotency_key == idempotency_key
                        )
                    )
                    .mappings()
                    .first()
                )
                if row is not None:
                    return _replay(Job.from_row(row), job)
            if max_queued is not None:
                queued = conn.scalar(sa.select(sa.func.count()).select_from(_V).where(_C.status == "queued"))
                if queued >= max_queued:
                    retry = self._retry_after(conn, queued - max_queued + 1, job.created_at)
                    raise QueueFull(retry, queued=queued, max_queued=max_queued)
            if max_queued_per_owner is not None:
                mine = conn.scalar(sa.select(sa.func.count()).select_from(_V).where(
                    _C.status == "queued", sa.func.coalesce(_C.owner, "") == (owner or "")))
                if mine >= max_queued_per_owner:
                    retry = self._retry_after(conn, mine - max_queued_per_owner + 1, job.created_at)
                    raise QueueFull(retry, queued=mine, max_queued=max_queued_per_owner, scope="account")
            conn.execute(sa.insert(_V).values(**dataclasses.asdict(job)))
        return job

    def get(self, id: str, owner: str | None = None) -> Job | None:
        """The job, or None when it does not exist or belongs to another owner.

        ``owner=None`` means unscoped (internal callers); any other value must match.
        """
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(_V).where(_owned(id, owner))).mappings().first()
        return Job.from_row(row) if row is not None else None

    def list(
        self, *, owner: str | None = None, after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> tuple[builtins.list[Job], bool]:
        """A page of jobs by ``created_at`` and whether more follow; ``after`` is the last id seen."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order: {order!r} is not allowed; use 'asc' or 'desc'")
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit: {limit!r} is out of range; allowed: 1..1000")
        query = sa.select(_V)
        if owner is not None:
            query = query.where(_C.owner == owner)
        with self._engine.begin() as conn:
            if after is not None:
                cursor = conn.execute(sa.select(_C.created_at, _C.id).where(_owned(after, owner))).first()
                if cursor is None:
                    raise ValueError(f"after: no video {after!r}")
                at, last = cursor
                if order == "asc":
                    query = query.where(sa.or_(_C.created_at > at, sa.and_(_C.created_at == at, _C.id > last)))
                else:
                    query = query.where(sa.or_(_C.created_at < at, sa.and_(_C.created_at == at, _C.id < last)))
            keys = (_C.created_at.asc(), _C.id.asc()) if order == "asc" else (_C.created_at.desc(), _C.id.desc())
            rows = conn.execute(query.order_by(*keys).limit(limit + 1)).mappings().all()
        return [Job.from_row(row) for row in rows[:limit]], len(rows) > limit

    def delete(self, id: str, owner: str | None = None) -> Job | None:
        """Remove the row and return it, so the caller can delete its objects; a running
        job's worker finds its writes refused and stops."""
        with self._writer.begin() as conn:
            row = conn.execute(sa.delete(_V).where(_owned(id, owner)).returning(*_C)).mappings().first()
        return Job.from_row(row) if row is not None else None

    def request_cancel(self, id: str, owner: str | None = None) -> Job | None:
        """Cancel a queued job now, or flag a running one for its worker; finished jobs are
        returned unchanged. None when the job does not exist or is not the owner's."""
        now = self._clock()
        with self._writer.begin() as conn:
            row = conn.execute(sa.select(_V).where(_owned(id, owner)).with_for_update()).mappings().first()
            if row is None:
                return None
            job = Job.from_row(row)
            if job.status == "queued":
                changes = _finished("cancelled", now)
            elif job.status == "in_progress":
                changes = {"cancel_requested": True, "updated_at": now}
            else:
                return job
            changes["cancel_requested"] = True
            conn.execute(sa.update(_V).where(_C.id == id).values(**changes))
            _emit(conn, changes.get("status"), [(job.id, job.owner)])
        return dataclasses.replace(job, **changes)

    # -- the dispatcher's side -----------------------------------------------------

    def claim_next(self, worker: str, lease_s: float, *, max_attempts: int | None = None) -> Job | None:
        """Take the best runnable job under a lease: queued, or running with an expired lease.

        Order: priority, then oldest first. Before picking, running jobs whose lease
        expired are settled: cancelled if cancellation was requested, failed with
        ``worker_lost`` once ``attempts`` reached ``max_attempts``.
        """
        _check_worker(worker)
        lease = _lease(lease_s)
        now = self._clock()
        expired = sa.and_(_C.status == "in_progress", _C.lease_expires_at < now)
        with self._writer.begin() as conn:
            self._settle(conn, sa.and_(expired, _C.cancel_requested.is_(True)), _finished("cancelled", now))
            if max_attempts is not None:
                lost = _finished("failed", now)
                lost.update(error_code="worker_lost", error_message=f"its worker was lost {max_attempts} times")
                # Expired leases, and jobs taken back from dead workers (queued, attempts kept).
                spent = sa.or_(expired, sa.and_(_C.status == "queued", _C.cancel_requested.is_(False)))
                self._settle(conn, sa.and_(spent, _C.attempts >= max_attempts), lost)
            runnable = sa.and_(_C.cancel_requested.is_(False), sa.or_(_C.status == "queued", expired))
            pick = sa.select(_V).where(runnable).order_by(_C.priority, _C.created_at, _C.id).limit(1)
            # FOR UPDATE SKIP LOCKED on PostgreSQL; SQLAlchemy renders nothing on SQLite,
            # where BEGIN IMMEDIATE already excludes every other writer.
            row = conn.execute(pick.with_for_update(skip_locked=True)).mappings().first()
            if row is None:
                return None
            changes = {
                "status": "in_progress",
                "lease_owner": worker,
                "lease_expires_at": now + lease,
                "started_at": row["started_at"] or now,
                "attempts": row["attempts"] + 1,
                "updated_at": now,
            }
            conn.execute(sa.update(_V).where(_C.id == row["id"]).values(**changes))
        if row["status"] == "in_progress":
            log.warning("reclaimed %s from %s (lease expired)", row["id"], row["lease_owner"])
        return dataclasses.replace(Job.from_row(row), **changes)

    def renew(self, id: str, worker: str, lease_s: float) -> bool:
        """Extend the lease; False when it is no longer ours (reclaimed, deleted, finished)
        or cancellation was requested (``get`` tells which; then ``finish_cancelled``)."""
        now = self._clock()
        changes = {"lease_expires_at": now + _lease(lease_s), "updated_at": now}
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
            changes["lease_expires_at"] = self._clock() + _lease(lease_s)
        return self._write_held(id, worker, changes)

    def complete(self, id: str, worker: str, objects: Mapping[str, str]) -> bool:
        """Mark done with its stored objects (variant → S3 key); False unless we hold the lease."""
        changes = _finished("completed", self._clock())
        changes.update(progress=100, objects=dict(objects))
        return self._write_held(id, worker, changes)

    def fail(self, id: str, worker: str, code: str, message: str) -> bool:
        """Mark failed with an OpenAI-style error; False unless we hold the lease."""
        changes = _finished("failed", self._clock())
        changes.update(error_code=code, error_message=message)
        return self._write_held(id, worker, changes)

    def finish_cancelled(self, id: str, worker: str) -> bool:
        """The worker stopped a job whose cancellation was requested; False unless we hold the lease."""
        return self._write_held(id, worker, _finished("cancelled", self._clock()))

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
                changes = _finished("cancelled", now)
            else:
                changes = {
                    "status": "queued",
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "attempts": max(row["attempts"] - 1, 0) if voluntary else row["attempts"],
                    "updated_at": now,
                }
            conn.execute(sa.update(_V).where(_C.id == id).values(**changes))
            _emit(conn, changes["status"], [(id, row["owner"])])
        log.info("requeued %s from %s: %s", id, worker, reason)
        return True

    def leases_of(self, role: str) -> builtins.list[tuple[str, str]]:
        """(id, lease owner) of running jobs leased by ``role`` or any ``role:<instance>``.

        Workers lease under a per-instance name (a fencing token: a stale instance's writes
        miss); a restarted worker of the same role takes these back."""
        _check_worker(role)
        with self._engine.connect() as conn:
            query = sa.select(_C.id, _C.lease_owner).where(
                _C.status == "in_progress",
                sa.or_(_C.lease_owner == role, _C.lease_owner.startswith(f"{role}:", autoescape=True)),
            )
            return [(r.id, r.lease_owner) for r in conn.execute(query.order_by(_C.priority, _C.created_at))]

    def held_by(self, worker: str) -> builtins.list[str]:
        """Ids of running jobs whose lease names ``worker`` (a restarted worker takes them back)."""
        _check_worker(worker)
        with self._engine.connect() as conn:
            query = sa.select(_C.id).where(_C.status == "in_progress", _C.lease_owner == worker)
            return list(conn.scalars(query.order_by(_C.priority, _C.created_at)).all())

    # -- operators -------------------------------------------------------------------

    def queue_depths(self) -> dict[int, int]:
        """Queued jobs per priority (every Priority present, zeros included)."""
        depths: dict[int, int] = {p: 0 for p in Priority}
        query = sa.select(_C.priority, sa.func.count()).where(_C.status == "queued").group_by(_C.priority)
        with self._engine.begin() as conn:
            for priority, count in conn.execute(query):
                depths[_as_priority(priority)] = count
        return depths

    def counts_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        with self._engine.begin() as conn:
            for status, count in conn.execute(sa.select(_C.status, sa.func.count()).group_by(_C.status)):
                counts[status] = count
        return counts

    def recent(self, limit: int = 20) -> builtins.list[Job]:
        """The newest jobs of every owner, newest first."""
        return self.list(limit=limit, order="desc")[0]

    # -- internals -------------------------------------------------------------------

    def _pg_lock(self, conn: Connection, key: int) -> None:
        self._db.pg_lock(conn, key)

    def _write_held(self, id: str, worker: str, changes: dict[str, Any], *extra: sa.ColumnElement[bool]) -> bool:
        with self._writer.begin() as conn:
            row = conn.execute(
                sa.update(_V).where(_held(id, worker), *extra).values(**changes).returning(_C.id, _C.owner)
            ).first()
            if row is not None:
                _emit(conn, changes.get("status"), [(row.id, row.owner)])
        return row is not None

    # -- the event log ------------------------------------------------------------------

    def events_since(self, seq: int, limit: int = 100) -> builtins.list[Event]:
        """Terminal transitions after ``seq``, oldest first (the webhook fan-out's feed)."""
        query = sa.select(_E).where(_E.c.seq > seq).order_by(_E.c.seq).limit(limit)
        with self._engine.connect() as conn:
            return [Event(**row) for row in conn.execute(query).mappings()]

    def _settle(self, conn: Connection, where: sa.ColumnElement[bool], changes: dict[str, Any]) -> None:
        # SKIP LOCKED: rows another claimer is working on are left to it (no waits, no deadlocks).
        rows = conn.execute(sa.select(_C.id, _C.owner).where(where).with_for_update(skip_locked=True)).all()
        ids = [r.id for r in rows]
        if ids:
            conn.execute(sa.update(_V).where(_C.id.in_(ids), where).values(**changes))
            _emit(conn, changes["status"], [(r.id, r.owner) for r in rows])
            log.warning("settled %d job(s) with expired leases as %s: %s", len(ids), changes["status"], ids)

    @staticmethod
    def _retry_after(conn: Connection, excess: int, now: dt.datetime) -> float:
        """Seconds until ``excess`` queue slots free up, at the recent finishing rate."""
        since = now - dt.timedelta(seconds=_THROUGHPUT_WINDOW_S)
        done = conn.scalar(sa.select(sa.func.count()).select_from(_V).where(_C.completed_at >= since))
        if not done:
            return _RETRY_AFTER_DEFAULT_S
        return float(min(max(math.ceil(excess * _THROUGHPUT_WINDOW_S / done), 1), _THROUGHPUT_WINDOW_S))


_now = utcnow
_unix = unix


def _owned(id: str, owner: str | None) -> sa.ColumnElement[bool]:
    return _C.id == id if owner is None else sa.and_(_C.id == id, _C.owner == owner)


def _held(id: str, worker: str) -> sa.ColumnElement[bool]:
    return sa.and_(_C.id == id, _C.lease_owner == worker, _C.status == "in_progress")


def _finished(status: str, now: dt.datetime) -> dict[str, Any]:
    changes = {"status": status, "completed_at": now, "updated_at": now, "lease_owner": None, "lease_expires_at": None}
    if status == "cancelled":  # a terminal state with a code, like a failure, so clients need no special case
        changes.update(error_code="cancelled", error_message="cancelled at the owner's request; nothing was kept")
    return changes


def _emit(conn: Connection, status: str | None, videos: builtins.list[tuple[str, str | None]]) -> None:
    """Log a terminal transition in the caller's transaction: the event commits with it or not at all."""
    kind = EVENT_TYPES.get(status or "")
    if kind is None or not videos:
        return
    now = _now()
    conn.execute(sa.insert(_E), [
        {"id": f"evt_{uuid.uuid4().hex}", "type": kind, "video_id": vid, "owner": owner, "created_at": now}
        for vid, owner in videos
    ])


def _check_worker(worker: str) -> None:
    if not isinstance(worker, str) or not worker:
        raise ValueError(f"worker: {worker!r} must be a non-empty string")


def _lease(lease_s: float) -> dt.timedelta:
    if not isinstance(lease_s, (int, float)) or not math.isfinite(lease_s) or lease_s <= 0:
        raise ValueError(f"lease_s: {lease_s!r} must be a positive number of seconds")
    return dt.timedelta(seconds=lease_s)


def _as_priority(value: int) -> int:
    try:
        return Priority(value)
    except ValueError:
        return value


def _new_job(
    model: str,
    prompt: str,
    size: str,
    seconds: int,
    params: Mapping[str, Any],
    priority: int,
    owner: str | None,
    idempotency_key: str | None,
    expires_in_s: float,
    now: dt.datetime,
) -> Job:
    """Validate ``create``'s arguments into a new job; ValueError names the bad one."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: {model!r} must be a non-empty string")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: must not be empty")
    if not isinstance(size, str) or not _SIZE.match(size):
        raise ValueError(f"size: {size!r} must look like WIDTHxHEIGHT, e.g. 128x128")
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 1:
        raise ValueError(f"seconds: {seconds!r} must be a positive integer")
    if isinstance(priority, bool) or priority not in set(Priority):
        allowed = ", ".join(f"{p.value} ({p.name.lower()})" for p in Priority)
        raise ValueError(f"priority: {priority!r} is not known; allowed: {allowed}")
    if not isinstance(params, Mapping):
        raise ValueError(f"params: {params!r} must be a mapping")
    try:
        params = json.loads(json.dumps(dict(params)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params: not JSON-serialisable ({exc})") from None
    for name, value in (("owner", owner), ("idempotency_key", idempotency_key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{name}: {value!r} must be a non-empty string or None")
    if not isinstance(expires_in_s, (int, float)) or not math.isfinite(expires_in_s) or expires_in_s <= 0:
        raise ValueError(f"expires_in_s: {expires_in_s!r} must be a positive number of seconds")
    steps = params.get("steps")
    return Job(
        id=new_video_id(),
        owner=owner,
        model=model,
        prompt=prompt,
        size=size,
        seconds=seconds,
        params=params,
        priority=int(priority),
        created_at=now,
        updated_at=now,
        expires_at=now + dt.timedelta(seconds=expires_in_s),
        num_steps=steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 0,
        idempotency_key=idempotency_key,
    )


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
