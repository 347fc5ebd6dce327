"""The durable job store: SQL tables of videos, the farm's source of truth.

The gateway creates jobs here; a dispatcher claims them under a *lease*, records progress
after each denoising shard, and finishes them. Any process may die: a job whose lease runs
out is put back in the queue by ``reap`` and resumes from ``checkpoint_key``.

``JobStore`` is one object over several rooms, each its own module:

- ``farm.jobs.tables``: the tables and their indexes;
- ``farm.jobs.job``: the ``Job`` snapshot, priorities, statuses, argument checks;
- ``farm.jobs.admission``: ``create`` — queue caps per class and per account, idempotency;
- ``farm.jobs.queue``: claims, leases, progress, finishing, ``reap``;
- ``farm.jobs.leader``: named leader leases (one dispatcher leads);
- ``farm.jobs.outbox``: the event log of terminal transitions (the webhooks' feed);
- ``farm.jobs.usage``: accelerator-seconds per job stage, per-account daily budgets;
- here: reads (get, list), the owner's delete and cancel, operator views.

Backends: a SQLite file by default (WAL, so several processes share it) and PostgreSQL by URL
(``postgresql+psycopg://...``); ``farm.db`` says how each takes its write locks. Times are
integer microseconds since the Unix epoch (UTC) in BIGINT columns and surface as
timezone-aware UTC datetimes. The OpenAI wire shape of a job is the gateway's
(``farm.api.wire``).
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
from collections.abc import Callable, Collection

import sqlalchemy as sa

from farm.db import JSON, Base, Database, alembic_config, sqlite_url, unix, utcnow  # noqa: F401  (re-exported)
from farm.jobs.admission import Admission, IdempotencyConflict, QueueFull  # noqa: F401
from farm.jobs.job import (  # noqa: F401
    DEFAULT_EXPIRES_IN_S,
    PRIORITY_BULK,
    PRIORITY_INTERACTIVE,
    STATUSES,
    TERMINAL_STATUSES,
    Job,
    Priority,
    Status,
    as_priority,
    finished,
    new_video_id,
)
from farm.jobs.leader import Leader, Leadership  # noqa: F401
from farm.jobs.outbox import EVENT_TYPES, Event, EventLog, emit  # noqa: F401
from farm.jobs.queue import LeasedQueue, ReapReport  # noqa: F401
from farm.jobs.sharing_tables import LINKS, SHARES
from farm.policy.cameo_tables import USES
from farm.jobs.tables import DEPTHS, VIDEOS, LeaderLease, QueueDepth, Video, VideoEvent, runnable  # noqa: F401
from farm.jobs.usage import BudgetExceeded, UsageLedger  # noqa: F401

_V, _C = VIDEOS, VIDEOS.c


class JobStore(Admission, LeasedQueue, Leadership, EventLog, UsageLedger):
    """Jobs in a SQL database; thread-safe, and safe to share between processes."""

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        """``db``: a URL, or a ``Database`` shared with the other stores of this process.
        ``clock`` (timezone-aware UTC now) is for tests that move time forward."""
        self._db = Database(db) if isinstance(db, str) else db
        self.url = self._db.url
        self._sqlite = self._db.sqlite
        self._engine, self._writer = self._db.engine, self._db.writer
        self._clock = clock or utcnow

    @property
    def db(self) -> Database:
        """The database this store uses, for the stores that share it (sharing, lifetimes)."""
        return self._db

    def __repr__(self) -> str:
        return f"JobStore({self.url.render_as_string(hide_password=True)!r})"

    # -- lifecycle ---------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision; idempotent, safe to run concurrently."""
        self._db.migrate()

    def close(self) -> None:
        self._engine.dispose()

    # -- the gateway's side (create: farm.jobs.admission) --------------------------

    def get(self, id: str, owner: str | None = None) -> Job | None:
        """The job, or None when it does not exist or belongs to another owner.

        ``owner=None`` means unscoped (internal callers); any other value must match.
        """
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(_V).where(_owned(id, owner))).mappings().first()
        return Job.from_row(row) if row is not None else None

    def get_many(self, ids: Collection[str]) -> dict[str, Job]:
        """The jobs of ``ids`` that exist (unscoped: the caller checked ownership), in one read."""
        found: dict[str, Job] = {}
        ids = builtins.list(ids)
        with self._engine.begin() as conn:
            for chunk in range(0, len(ids), 500):  # bounded IN lists
                for row in conn.execute(sa.select(_V).where(_C.id.in_(ids[chunk:chunk + 500]))).mappings():
                    found[row["id"]] = Job.from_row(row)
        return found

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
        """Remove the row, its shares, its links and its cameo uses, and return it, so the caller can
        delete its objects; a running job's worker finds its writes refused and stops."""
        with self._writer.begin() as conn:
            row = conn.execute(sa.delete(_V).where(_owned(id, owner)).returning(*_C)).mappings().first()
            if row is not None:  # in the same transaction: a link never outlives its video
                conn.execute(sa.delete(SHARES).where(SHARES.c.video_id == id))
                conn.execute(sa.delete(LINKS).where(LINKS.c.video_id == id))
                conn.execute(sa.delete(USES).where(USES.c.video_id == id))  # its cameo uses (farm.policy.cameos)
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
                changes = finished("cancelled", now)
            elif job.status == "in_progress":
                changes = {"cancel_requested": True, "updated_at": now}
            else:
                return job
            changes["cancel_requested"] = True
            conn.execute(sa.update(_V).where(_C.id == id).values(**changes))
            emit(conn, changes.get("status"), [(job.id, job.owner)])
        return dataclasses.replace(job, **changes)

    def queued_order(self, limit: int = 10_000) -> builtins.list[tuple[str, str]]:
        """(id, model) of the first ``limit`` runnable jobs in claim order — the order ``claim_next``
        takes them in — read along the partial index ``ix_videos_runnable``."""
        query = sa.select(_C.id, _C.model).where(runnable()).order_by(_C.priority, _C.created_at, _C.id).limit(limit)
        with self._engine.begin() as conn:
            return [(row.id, row.model) for row in conn.execute(query)]

    # -- operators -------------------------------------------------------------------

    def queue_depths(self) -> dict[int, int]:
        """Queued jobs per priority (every Priority present, zeros included): one row per class
        of ``queue_depths``, not a count of the queue."""
        depths: dict[int, int] = {p: 0 for p in Priority}
        with self._engine.begin() as conn:
            for priority, queued in conn.execute(sa.select(DEPTHS.c.priority, DEPTHS.c.queued)):
                depths[as_priority(priority)] = queued
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


def _owned(id: str, owner: str | None) -> sa.ColumnElement[bool]:
    return _C.id == id if owner is None else sa.and_(_C.id == id, _C.owner == owner)
