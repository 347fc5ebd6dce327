"""Schedules: a cron expression in a time zone whose every run is a batch of one input file.

Cron arithmetic is ``cronsim``'s (the evaluator healthchecks.io runs, DST-aware: a time that a
spring-forward gap skips runs at the gap's end, a repeated autumn hour runs once), done in the
schedule's IANA time zone and stored as UTC.

Firing is a claim in the store: ``fire_due`` moves a due schedule's ``next_run_at`` on with a
compare-and-set (``UPDATE … WHERE id = ? AND next_run_at = <the value read>``) and inserts the
run's batch in the same transaction. Two dispatchers, or one restarted mid-firing, can both see
a schedule due; only one UPDATE matches, and a batch exists exactly when its claim committed, so
a run is never doubled and never lost. A run found due more than ``misfire_grace_s`` late (the
farm was down) follows the schedule's ``missed`` policy: ``skip`` moves on without a batch,
``run_once`` makes one batch however many runs were missed. Either way the next run is the first
cron time after now, so a farm that was down for a week does not catch up seven times.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import zoneinfo
from collections.abc import Callable
from typing import Literal

import sqlalchemy as sa
from cronsim import CronSim, CronSimError

from farm.db import Database, utcnow
from farm.jobs.batch_tables import ARMED, SCHEDULES
from farm.jobs.batches import BatchStore, _owned, _page, _record, new_id

log = logging.getLogger(__name__)

Missed = Literal["skip", "run_once"]
MISSED_POLICIES = ("skip", "run_once")


@dataclasses.dataclass(frozen=True)
class ScheduleRecord:
    id: str
    owner: str | None
    name: str
    cron: str
    timezone: str
    input_file_id: str
    missed: str
    paused: bool
    next_run_at: dt.datetime
    last_run_at: dt.datetime | None
    last_batch_id: str | None
    runs: int
    skipped: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Firing:
    """What ``fire_due`` did with one due schedule: a batch, or a skipped (missed) run."""

    schedule_id: str
    due_at: dt.datetime
    batch_id: str | None


def check_timezone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name``; ValueError naming the field otherwise."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(f"timezone: {name!r} is not an IANA time zone; e.g. 'UTC', 'Asia/Tokyo', "
                         "'Europe/Berlin'") from None


def check_cron(expr: str) -> str:
    """A five-field cron expression (minute hour day-of-month month day-of-week); ValueError otherwise."""
    if not isinstance(expr, str) or len(expr.split()) != 5:
        raise ValueError(f"cron: {expr!r} must have five fields: minute hour day-of-month month day-of-week, "
                         "e.g. '0 3 * * *'")
    try:
        CronSim(expr, dt.datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ValueError(f"cron: {expr!r} is not valid: {exc}") from None
    return expr


def next_run(expr: str, timezone: str, after: dt.datetime) -> dt.datetime:
    """The first time of ``expr`` in ``timezone`` strictly after ``after``, in UTC."""
    local = after.astimezone(check_timezone(timezone))
    try:
        return next(CronSim(expr, local)).astimezone(dt.UTC)
    except CronSimError as exc:
        raise ValueError(f"cron: {expr!r} is not valid: {exc}") from None
    except StopIteration:  # cronsim found no matching time in its search range
        raise ValueError(f"cron: {expr!r} never fires") from None


class _Lost(Exception):
    """The compare-and-set of ``next_run_at`` matched nothing."""


class ScheduleStore:
    """Schedules in the farm's database; firing creates batches through ``BatchStore``."""

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self._db = Database(db) if isinstance(db, str) else db
        self._engine, self._writer = self._db.engine, self._db.writer
        self._clock = clock or utcnow
        self.batches = BatchStore(self._db, clock=self._clock)

    def create(self, *, owner: str | None, cron: str, timezone: str, input_file_id: str, missed: str = "skip",
               name: str = "", max_per_owner: int | None = None) -> ScheduleRecord:
        """A new, armed schedule; ValueError names a bad field, LookupError a full account."""
        check_cron(cron)
        check_timezone(timezone)
        if missed not in MISSED_POLICIES:
            raise ValueError(f"missed: {missed!r} is not allowed; allowed: {', '.join(MISSED_POLICIES)}")
        now = self._clock()
        record = ScheduleRecord(
            id=new_id("sched"), owner=owner, name=name, cron=cron, timezone=timezone, input_file_id=input_file_id,
            missed=missed, paused=False, next_run_at=next_run(cron, timezone, now), last_run_at=None,
            last_batch_id=None, runs=0, skipped=0, created_at=now, updated_at=now)
        with self._writer.begin() as conn:
            if max_per_owner is not None:
                mine = conn.scalar(sa.select(sa.func.count()).select_from(SCHEDULES).where(*_owned(SCHEDULES, owner)))
                if mine >= max_per_owner:
                    raise LookupError(f"this account has {mine} schedules, the limit is {max_per_owner}; "
                                      "delete one first")
            conn.execute(sa.insert(SCHEDULES).values(**dataclasses.asdict(record)))
        return record

    def get(self, id: str, owner: str | None = None) -> ScheduleRecord | None:
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(SCHEDULES).where(SCHEDULES.c.id == id, *_owned(SCHEDULES, owner))
                               ).mappings().first()
        return _record(ScheduleRecord, row) if row is not None else None

    def list(self, *, owner: str | None = None, after: str | None = None, limit: int = 20,
             order: str = "desc") -> tuple[list[ScheduleRecord], bool]:
        with self._engine.begin() as conn:
            rows, more = _page(conn, SCHEDULES, _owned(SCHEDULES, owner), after, limit, order)
        return [_record(ScheduleRecord, r) for r in rows], more

    def set_paused(self, id: str, paused: bool, owner: str | None = None) -> ScheduleRecord | None:
        """Pause, or resume from now: the next run is the first cron time after the resume, so the
        runs a pause covered are not made up."""
        current = self.get(id, owner)
        if current is None:
            return None
        now = self._clock()
        values: dict = {"paused": paused, "updated_at": now}
        if not paused and current.paused:
            values["next_run_at"] = next_run(current.cron, current.timezone, now)
        with self._writer.begin() as conn:
            conn.execute(sa.update(SCHEDULES).where(SCHEDULES.c.id == id, *_owned(SCHEDULES, owner)).values(**values))
        return self.get(id, owner)

    def delete(self, id: str, owner: str | None = None) -> bool:
        with self._writer.begin() as conn:
            return conn.execute(sa.delete(SCHEDULES).where(SCHEDULES.c.id == id, *_owned(SCHEDULES, owner))
                                ).rowcount == 1

    def fire_due(self, misfire_grace_s: float, limit: int = 100) -> list[Firing]:
        """Claim every due schedule (compare-and-set of ``next_run_at``) and create its batch in the
        same transaction; returns what was fired or skipped."""
        now = self._clock()
        c = SCHEDULES.c
        with self._engine.begin() as conn:
            due = conn.execute(sa.select(SCHEDULES).where(sa.text(ARMED), c.next_run_at <= now)
                               .order_by(c.next_run_at).limit(limit)).mappings().all()
        fired = []
        for row in due:
            schedule = _record(ScheduleRecord, row)
            try:
                following = next_run(schedule.cron, schedule.timezone, now)
            except ValueError:
                log.exception("schedule %s cannot compute its next run; pausing it", schedule.id)
                self.set_paused(schedule.id, True)
                continue
            late = (now - schedule.next_run_at).total_seconds()
            run = late <= misfire_grace_s or schedule.missed == "run_once"
            try:
                batch_id = self._claim(schedule, now, following, run)
            except _Lost:  # another firing claimed it first: its batch stands, ours was rolled back
                continue
            if not run:
                log.warning("schedule %s: the run due %s was missed (%.0f s late) and is skipped", schedule.id,
                            schedule.next_run_at.isoformat(), late)
            fired.append(Firing(schedule.id, schedule.next_run_at, batch_id))
        return fired

    def _claim(self, schedule: ScheduleRecord, now: dt.datetime, following: dt.datetime, run: bool) -> str | None:
        """One transaction: the compare-and-set, and the run's batch when ``run``."""
        c = SCHEDULES.c
        with self._writer.begin() as conn:
            batch_id = None
            if run:
                batch_id = self.batches.create_batch(
                    owner=schedule.owner, input_file_id=schedule.input_file_id,
                    metadata={"schedule_id": schedule.id}, schedule_id=schedule.id, conn=conn).id
                values = {"runs": c.runs + 1, "last_run_at": now, "last_batch_id": batch_id}
            else:
                values = {"skipped": c.skipped + 1}
            claimed = conn.execute(sa.update(SCHEDULES).where(
                c.id == schedule.id, c.next_run_at == schedule.next_run_at, sa.text(ARMED))
                .values(next_run_at=following, updated_at=now, **values)).rowcount
            if claimed != 1:
                raise _Lost()  # leaving the block rolls the batch back
        return batch_id
