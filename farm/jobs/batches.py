"""The store of files, batches and their request lines (tables: ``farm.jobs.batch_tables``).

The gateway records files and batches here; the batch runner (``farm.jobs.batch_runner``, in
the leading dispatcher) reads and advances them. Every read an account makes is scoped to its
owner: another account's ids are "not found". Status changes the runner and the gateway can
race on (a cancel against the runner's next step) compare the status they expect in the same
UPDATE, so the loser's write misses instead of undoing the winner's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from farm.db import Database, utcnow
from farm.jobs.batch_tables import ACTIVE, BATCHES, FILES, ITEMS, SCHEDULES
from farm.jobs.job import TERMINAL_STATUSES, Job
from farm.jobs.tables import VIDEOS

ENDPOINT = "/v1/videos"
COMPLETION_WINDOW_S = {"24h": 24 * 3600}
# vision / user_data: images a video create reads as input_reference by file id (farm.api.image_refs).
FILE_PURPOSES = ("batch", "batch_output", "vision", "user_data")
BATCH_STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                  "cancelled")
BATCH_FINAL = frozenset({"failed", "completed", "expired", "cancelled"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclasses.dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str | None
    purpose: str
    filename: str
    bytes: int
    lines: int
    key: str
    created_at: dt.datetime
    expires_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    id: str
    owner: str | None
    status: str
    ends_as: str
    endpoint: str
    input_file_id: str
    completion_window: str
    meta: dict[str, Any]
    errors: dict[str, Any] | None
    total: int
    invalid: int
    output_file_id: str | None
    error_file_id: str | None
    schedule_id: str | None
    created_at: dt.datetime
    expires_at: dt.datetime
    in_progress_at: dt.datetime | None
    finalizing_at: dt.datetime | None
    completed_at: dt.datetime | None
    failed_at: dt.datetime | None
    expired_at: dt.datetime | None
    cancelling_at: dt.datetime | None
    cancelled_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Counts:
    """``request_counts``: refused lines count as failed, like videos that failed or were cancelled."""

    total: int
    completed: int
    failed: int


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """One request line and, once it became a video, that video."""

    line: int
    custom_id: str | None
    error: dict[str, Any] | None
    job: Job | None


def _record(cls, row) -> Any:
    return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


def _page(conn: Connection, table: sa.Table, where: Sequence[sa.ColumnElement[bool]],
          after: str | None, limit: int, order: str) -> tuple[list[Any], bool]:
    """A cursor page by (created_at, id); ``after`` must be one of the caller's own ids."""
    if order not in ("asc", "desc"):
        raise ValueError(f"order: {order!r} is not allowed; use 'asc' or 'desc'")
    c = table.c
    query = sa.select(table).where(*where)
    if after is not None:
        cursor = conn.execute(sa.select(c.created_at, c.id).where(c.id == after, *where)).first()
        if cursor is None:
            raise LookupError(f"after: no object {after!r}")
        at, last = cursor
        if order == "asc":
            query = query.where(sa.or_(c.created_at > at, sa.and_(c.created_at == at, c.id > last)))
        else:
            query = query.where(sa.or_(c.created_at < at, sa.and_(c.created_at == at, c.id < last)))
    keys = (c.created_at.asc(), c.id.asc()) if order == "asc" else (c.created_at.desc(), c.id.desc())
    rows = conn.execute(query.order_by(*keys).limit(limit + 1)).mappings().all()
    return list(rows[:limit]), len(rows) > limit


def _owned(table: sa.Table, owner: str | None) -> list[sa.ColumnElement[bool]]:
    """``owner=None``: unscoped (the runner, or a gateway without accounts)."""
    return [] if owner is None else [table.c.owner == owner]


class BatchStore:
    """Files, batches and batch items in the farm's database; thread-safe."""

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self._db = Database(db) if isinstance(db, str) else db
        self._engine, self._writer = self._db.engine, self._db.writer
        self._clock = clock or utcnow

    def now(self) -> dt.datetime:
        return self._clock()

    # -- files ---------------------------------------------------------------------

    def add_file(self, *, id: str, owner: str | None, purpose: str, filename: str, size: int, lines: int,
                 key: str, expires_at: dt.datetime | None = None, conn: Connection | None = None) -> FileRecord:
        if purpose not in FILE_PURPOSES:
            raise ValueError(f"purpose: {purpose!r} is not allowed; allowed: {', '.join(FILE_PURPOSES)}")
        record = FileRecord(id=id, owner=owner, purpose=purpose, filename=filename, bytes=size, lines=lines,
                            key=key, created_at=self._clock(), expires_at=expires_at)
        if conn is not None:
            conn.execute(sa.insert(FILES).values(**dataclasses.asdict(record)))
        else:
            with self._writer.begin() as own:
                own.execute(sa.insert(FILES).values(**dataclasses.asdict(record)))
        return record

    def get_file(self, id: str, owner: str | None = None) -> FileRecord | None:
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(FILES).where(FILES.c.id == id, *_owned(FILES, owner))).mappings().first()
        return _record(FileRecord, row) if row is not None else None

    def list_files(self, *, owner: str | None = None, purpose: str | None = None, after: str | None = None,
                   limit: int = 20, order: str = "desc") -> tuple[list[FileRecord], bool]:
        where = _owned(FILES, owner) + ([FILES.c.purpose == purpose] if purpose is not None else [])
        with self._engine.begin() as conn:
            rows, more = _page(conn, FILES, where, after, limit, order)
        return [_record(FileRecord, r) for r in rows], more

    def file_users(self, id: str) -> list[str]:
        """Unfinished batches and schedules that read this file (it must not vanish under them)."""
        with self._engine.begin() as conn:
            batches = conn.scalars(sa.select(BATCHES.c.id).where(
                BATCHES.c.input_file_id == id, sa.text(ACTIVE)).limit(5)).all()
            schedules = conn.scalars(sa.select(SCHEDULES.c.id).where(SCHEDULES.c.input_file_id == id).limit(5)).all()
        return [*batches, *schedules]

    def delete_file(self, id: str, owner: str | None = None) -> FileRecord | None:
        with self._writer.begin() as conn:
            row = conn.execute(sa.delete(FILES).where(FILES.c.id == id, *_owned(FILES, owner))
                               .returning(*FILES.c)).mappings().first()
        return _record(FileRecord, row) if row is not None else None

    # -- batches: the gateway's side -------------------------------------------------

    def create_batch(self, *, owner: str | None, input_file_id: str, completion_window: str = "24h",
                     metadata: dict[str, str] | None = None, schedule_id: str | None = None,
                     conn: Connection | None = None) -> BatchRecord:
        """A new batch in ``validating``; the runner takes it from there."""
        if completion_window not in COMPLETION_WINDOW_S:
            raise ValueError(f"completion_window: {completion_window!r} is not allowed; allowed: "
                             f"{', '.join(COMPLETION_WINDOW_S)}")
        now = self._clock()
        record = BatchRecord(
            id=new_id("batch"), owner=owner, status="validating", ends_as="completed", endpoint=ENDPOINT,
            input_file_id=input_file_id, completion_window=completion_window, meta=dict(metadata or {}),
            errors=None, total=0, invalid=0, output_file_id=None, error_file_id=None, schedule_id=schedule_id,
            created_at=now, expires_at=now + dt.timedelta(seconds=COMPLETION_WINDOW_S[completion_window]),
            in_progress_at=None, finalizing_at=None, completed_at=None, failed_at=None, expired_at=None,
            cancelling_at=None, cancelled_at=None,
        )
        if conn is not None:
            conn.execute(sa.insert(BATCHES).values(**dataclasses.asdict(record)))
        else:
            with self._writer.begin() as own:
                own.execute(sa.insert(BATCHES).values(**dataclasses.asdict(record)))
        return record

    def get_batch(self, id: str, owner: str | None = None) -> BatchRecord | None:
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(BATCHES).where(BATCHES.c.id == id, *_owned(BATCHES, owner))).mappings().first()
        return _record(BatchRecord, row) if row is not None else None

    def list_batches(self, *, owner: str | None = None, after: str | None = None, limit: int = 20,
                     order: str = "desc") -> tuple[list[BatchRecord], bool]:
        with self._engine.begin() as conn:
            rows, more = _page(conn, BATCHES, _owned(BATCHES, owner), after, limit, order)
        return [_record(BatchRecord, r) for r in rows], more

    def counts(self, batches: Sequence[BatchRecord]) -> dict[str, Counts]:
        """``request_counts`` of each batch: one grouped query over its items' videos."""
        ids = [b.id for b in batches]
        done: dict[str, dict[str, int]] = {i: {} for i in ids}
        if ids:
            i, v = ITEMS.c, VIDEOS.c
            query = (sa.select(i.batch_id, v.status, sa.func.count()).select_from(ITEMS.join(VIDEOS, v.id == i.video_id))
                     .where(i.batch_id.in_(ids)).group_by(i.batch_id, v.status))
            with self._engine.begin() as conn:
                for batch_id, status, n in conn.execute(query):
                    done[batch_id][status] = n
        out = {}
        for b in batches:
            by = done[b.id]
            failed = b.invalid + by.get("failed", 0) + by.get("cancelled", 0)
            out[b.id] = Counts(total=b.total, completed=by.get("completed", 0), failed=failed)
        return out

    def request_cancel(self, id: str, owner: str | None = None) -> tuple[BatchRecord | None, list[str]]:
        """Move a validating or running batch to ``cancelling``; returns it and its unfinished videos,
        which the caller cancels through the job store's own cancel path."""
        now = self._clock()
        with self._writer.begin() as conn:
            changed = conn.execute(sa.update(BATCHES).where(
                BATCHES.c.id == id, *_owned(BATCHES, owner), BATCHES.c.status.in_(("validating", "in_progress")))
                .values(status="cancelling", ends_as="cancelled", cancelling_at=now)).rowcount
        batch = self.get_batch(id, owner)
        if batch is None or not changed and batch.status != "cancelling":
            return batch, []
        return batch, self.unfinished_videos(id)

    # -- batches: the runner's side ------------------------------------------------------

    def active_batches(self, limit: int = 100) -> list[BatchRecord]:
        """Batches with work left, oldest first."""
        with self._engine.begin() as conn:
            rows = conn.execute(sa.select(BATCHES).where(sa.text(ACTIVE)).order_by(BATCHES.c.created_at)
                                .limit(limit)).mappings().all()
        return [_record(BatchRecord, r) for r in rows]

    def restart_validation(self, batch_id: str) -> None:
        """Forget the items of a validation pass that did not finish (the runner starts it again)."""
        with self._writer.begin() as conn:
            conn.execute(sa.delete(ITEMS).where(ITEMS.c.batch_id == batch_id))

    def add_items(self, batch_id: str, items: Sequence[dict[str, Any]]) -> None:
        """Items of one validation chunk: dicts of ``line, start, length, custom_id, error``."""
        if items:
            with self._writer.begin() as conn:
                conn.execute(sa.insert(ITEMS), [{"batch_id": batch_id, "video_id": None} | it for it in items])

    def validated(self, batch_id: str, *, total: int, invalid: int, errors: list[dict[str, Any]] | None) -> bool:
        """End the validation pass: ``in_progress``, or ``failed`` with ``errors`` (no valid line, or the
        file was unusable). False when the batch left ``validating`` meanwhile (cancelled)."""
        now = self._clock()
        values: dict[str, Any] = {"total": total, "invalid": invalid}
        if errors is not None:
            values |= {"status": "failed", "failed_at": now, "errors": {"object": "list", "data": errors}}
        else:
            values |= {"status": "in_progress", "in_progress_at": now}
        return self._move(batch_id, ("validating",), **values)

    def _move(self, batch_id: str, expected: Sequence[str], **values: Any) -> bool:
        with self._writer.begin() as conn:
            return conn.execute(sa.update(BATCHES).where(BATCHES.c.id == batch_id, BATCHES.c.status.in_(expected))
                                .values(**values)).rowcount == 1

    def queued_of(self, batch_id: str) -> int:
        """The batch's videos still waiting in the queue (the runner's window)."""
        i, v = ITEMS.c, VIDEOS.c
        with self._engine.begin() as conn:
            return conn.scalar(sa.select(sa.func.count()).select_from(ITEMS.join(VIDEOS, v.id == i.video_id))
                               .where(i.batch_id == batch_id, v.status == "queued"))

    def pending_items(self, batch_id: str, limit: int) -> list[dict[str, Any]]:
        """Valid lines not yet turned into videos, in line order."""
        i = ITEMS.c
        with self._engine.begin() as conn:
            rows = conn.execute(sa.select(i.line, i.start, i.length, i.custom_id).where(
                i.batch_id == batch_id, i.video_id.is_(None), i.error.is_(None)).order_by(i.line).limit(limit))
            return [dict(r) for r in rows.mappings()]

    def feed(self, batch_id: str, jobs: Sequence[tuple[int, Job]], refused: Sequence[tuple[int, dict]] = ()) -> bool:
        """Queue ``jobs`` (line, new job) and record ``refused`` lines, in one transaction, only while the
        batch is still ``in_progress`` and each line still has no video: a cancel that came first wins,
        and a line is never queued twice."""
        i = ITEMS.c
        with self._writer.begin() as conn:
            state = conn.scalar(sa.select(BATCHES.c.status).where(BATCHES.c.id == batch_id).with_for_update())
            if state != "in_progress":
                return False
            for line, job in jobs:
                taken = conn.execute(sa.update(ITEMS).where(i.batch_id == batch_id, i.line == line,
                                                            i.video_id.is_(None)).values(video_id=job.id)).rowcount
                if taken:
                    conn.execute(sa.insert(VIDEOS).values(**dataclasses.asdict(job)))
            for line, error in refused:
                conn.execute(sa.update(ITEMS).where(i.batch_id == batch_id, i.line == line).values(error=error))
                conn.execute(sa.update(BATCHES).where(BATCHES.c.id == batch_id)
                             .values(invalid=BATCHES.c.invalid + 1))
        return True

    def unfinished_videos(self, batch_id: str, *, uncancelled: bool = False) -> list[str]:
        """The batch's videos that have not ended (``uncancelled``: and whose cancel was not asked for)."""
        i, v = ITEMS.c, VIDEOS.c
        where = [i.batch_id == batch_id, v.status.not_in(tuple(TERMINAL_STATUSES))]
        if uncancelled:
            where.append(sa.not_(v.cancel_requested))
        with self._engine.begin() as conn:
            return list(conn.scalars(sa.select(v.id).select_from(ITEMS.join(VIDEOS, v.id == i.video_id)).where(*where)))

    def finalize(self, batch_id: str, expected: Sequence[str]) -> bool:
        return self._move(batch_id, expected, status="finalizing", finalizing_at=self._clock())

    def expire(self, batch_id: str) -> bool:
        """Past its completion window: no more lines are queued; it ends ``expired`` once its videos end."""
        return self._move(batch_id, ("validating", "in_progress"), status="cancelling", ends_as="expired",
                          cancelling_at=self._clock())

    def finished(self, batch: BatchRecord, output_file: FileRecord | None, error_file: FileRecord | None) -> bool:
        """Record the output files and the final status (``ends_as``) together."""
        now = self._clock()
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[batch.ends_as]
        with self._writer.begin() as conn:
            for record in (output_file, error_file):
                if record is not None:
                    conn.execute(sa.insert(FILES).values(**dataclasses.asdict(record)))
            return conn.execute(sa.update(BATCHES).where(BATCHES.c.id == batch.id, BATCHES.c.status == "finalizing")
                                .values(status=batch.ends_as, **{stamp: now},
                                        output_file_id=output_file.id if output_file else None,
                                        error_file_id=error_file.id if error_file else None)).rowcount == 1

    def results(self, batch_id: str, page: int = 500) -> Iterator[ItemResult]:
        """Every line in order with its video, read a page at a time (never the whole batch at once)."""
        i = ITEMS.c
        last = 0
        while True:
            query = (sa.select(ITEMS, VIDEOS).select_from(ITEMS.outerjoin(VIDEOS, VIDEOS.c.id == i.video_id))
                     .where(i.batch_id == batch_id, i.line > last).order_by(i.line).limit(page))
            with self._engine.begin() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                m = row._mapping
                job = Job.from_row({c.name: m[VIDEOS.c[c.name]] for c in VIDEOS.c}) if m[VIDEOS.c.id] else None
                yield ItemResult(m[i.line], m[i.custom_id], m[i.error], job)
            if len(rows) < page:
                return
            last = rows[-1]._mapping[i.line]


__all__ = ["BATCH_FINAL", "BATCH_STATUSES", "BatchRecord", "BatchStore", "Counts", "ENDPOINT", "FileRecord",
           "ItemResult", "new_id"]
