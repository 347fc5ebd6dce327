"""Leader leases: one holder per named role (``dispatcher``), so a standby waits while a leader lives.

A row per role names its holder, when the lease runs out, and an ``epoch`` that grows by one
each time the leadership changes hands. ``acquire_leadership`` is one statement, an upsert
whose update applies only when the lease is free (expired or released) or already the
caller's: on PostgreSQL the conflicting row is locked and the condition re-checked against its
newest version, on SQLite the writer's ``BEGIN IMMEDIATE`` excludes every other writer, so two
candidates can never both win. Holders name ``role:instance``, as the dispatcher's job leases
do; a new instance is a new holder, so a restarted leader bumps the epoch.

A leader must stop acting as one once its lease may have run out; renew well inside
``lease_s`` (a third of it, say). Expiry compares the writers' clocks, as job leases do.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from farm.db import Database
from farm.jobs.job import lease_length
from farm.jobs.tables import LEADERS

_L = LEADERS.c


@dataclasses.dataclass(frozen=True)
class Leader:
    role: str
    holder: str
    expires_at: dt.datetime
    epoch: int  # grows by one each time another holder takes the role


class Leadership:
    """``JobStore``'s leader leases."""

    _db: Database
    _engine: sa.Engine
    _writer: sa.Engine
    _clock: Callable[[], dt.datetime]

    def acquire_leadership(self, role: str, holder: str, lease_s: float) -> bool:
        """Take ``role`` for ``lease_s`` when it is free (never held, expired or released), or renew
        it when ``holder`` already has it; False (nothing changed) while another holder's lease lives."""
        _check_name("role", role, LEADERS.c.role.type.length)
        _check_name("holder", holder, LEADERS.c.holder.type.length)
        now = self._clock()
        expires = now + lease_length(lease_s)
        insert = (sqlite if self._db.sqlite else postgresql).insert(LEADERS)
        upsert = insert.values(role=role, holder=holder, expires_at=expires, epoch=1).on_conflict_do_update(
            index_elements=[_L.role],
            set_={
                "holder": insert.excluded.holder,
                "expires_at": insert.excluded.expires_at,
                "epoch": sa.case((_L.holder == insert.excluded.holder, _L.epoch), else_=_L.epoch + 1),
            },
            where=sa.or_(_L.holder == holder, _L.expires_at <= now),
        )
        with self._writer.begin() as conn:
            return conn.execute(upsert.returning(_L.epoch)).first() is not None

    def release_leadership(self, role: str, holder: str) -> bool:
        """End ``holder``'s lease on ``role`` now (a graceful hand-over: a standby need not wait it
        out); False when ``holder`` does not hold it."""
        _check_name("role", role, LEADERS.c.role.type.length)
        _check_name("holder", holder, LEADERS.c.holder.type.length)
        now = self._clock()
        ours = sa.and_(_L.role == role, _L.holder == holder, _L.expires_at > now)
        with self._writer.begin() as conn:
            return conn.execute(sa.update(LEADERS).where(ours).values(expires_at=now).returning(_L.role)).first() is not None

    def leader_of(self, role: str) -> Leader | None:
        """The live lease on ``role``, or None when nobody holds it."""
        _check_name("role", role, LEADERS.c.role.type.length)
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(LEADERS).where(_L.role == role, _L.expires_at > self._clock())).mappings().first()
        return Leader(**row) if row is not None else None


def _check_name(name: str, value: str, longest: int) -> None:
    if not isinstance(value, str) or not value or len(value) > longest:
        raise ValueError(f"{name}: {value!r} must be a non-empty string of at most {longest} characters")
