"""The usage ledger: accelerator-seconds per job stage, and per-account daily budgets.

The replica that runs a stage measures its own wall time and reports it in its reply; the
dispatcher records it here as the stage completes (``record_usage``). One row per (job, stage)
— ``shard A-B`` for a denoise step range, ``decode``, ``finish`` — so each stage counts exactly
once: a stage that runs again (its job resumed from a checkpoint after a crash, a dispatcher
that redid a shard it had not recorded) inserts nothing the second time. Only the run that
completed is reported: the time a replica spent on a call that failed (it died, the latents
went NaN, it ran out of memory) is not charged to the tenant.

Rows carry the owner and the UTC day they were recorded on, and outlive their video. Budgets
(``account_budgets``) hold the operator's per-account tier and override; the limits themselves
are computed by :mod:`farm.sched.budget` from the farm's settings.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import Base
from farm.jobs.tables import VIDEOS
from farm.sched.budget import BudgetRule, BudgetStatus, spent_tenants, status, utc_day


class UsageRow(Base):
    """One completed stage of one job: where it ran and for how long (the replica's own clock)."""

    __tablename__ = "usage"

    job_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    stage: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    pool: Mapped[str] = mapped_column(sa.String(255))
    device: Mapped[str] = mapped_column(sa.String(32))
    seconds: Mapped[float] = mapped_column(sa.Float)
    day: Mapped[str] = mapped_column(sa.String(10))  # ISO date, UTC
    recorded_at: Mapped[dt.datetime]

    __table_args__ = (
        sa.CheckConstraint("seconds >= 0", name="ck_usage_seconds"),
        # GET /v1/usage and the budget check: one account's days.
        sa.Index("ix_usage_owner_day", "owner", "day"),
        # The dispatcher's budget refresh: today's rows of every account.
        sa.Index("ix_usage_day", "day"),
    )


class AccountBudget(Base):
    """The operator's budget settings for one account (absent: the farm's defaults)."""

    __tablename__ = "account_budgets"

    account_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tier: Mapped[str | None] = mapped_column(sa.String(64))
    daily_seconds: Mapped[float | None] = mapped_column(sa.Float)
    updated_at: Mapped[dt.datetime]

    __table_args__ = (
        sa.CheckConstraint("daily_seconds IS NULL OR daily_seconds >= 0", name="ck_account_budgets_daily"),
    )


class BudgetExceeded(Exception):
    """The owner's daily budget is spent: ``create`` made nothing (``budget`` says how much, until when)."""

    def __init__(self, budget: BudgetStatus) -> None:
        super().__init__(f"daily budget spent: {budget.spent_s:.1f} of {budget.limit_s:g} accelerator-seconds "
                         f"on {budget.day.isoformat()} (UTC)")
        self.budget = budget


USAGE = UsageRow.__table__
BUDGETS = AccountBudget.__table__
_U, _B = USAGE.c, BUDGETS.c


def device_kind(device: str) -> str:
    """``cuda:1`` → ``cuda``: usage is summed per kind of device, not per device index."""
    return (device or "cpu").split(":", 1)[0]


class UsageLedger:
    """``JobStore``'s usage and budget reads and writes."""

    _engine: sa.Engine
    _writer: sa.Engine
    _clock: Callable[[], dt.datetime]

    def now(self) -> dt.datetime:
        return self._clock()

    def record_usage(self, job_id: str, worker: str, stage: str, pool: str, device: str, seconds: float) -> bool:
        """Record one completed stage of a job the worker still holds. True if this call added
        it; False when the stage was already recorded, or the lease is not the worker's (a
        fenced-out dispatcher charges nothing)."""
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds: {seconds!r} must be a finite number >= 0")
        if not stage or not pool:
            raise ValueError(f"stage and pool must be non-empty, got {stage!r}, {pool!r}")
        now = self._clock()
        with self._writer.begin() as conn:
            # The job's row, locked: concurrent recorders of one job take turns (PostgreSQL).
            job = conn.execute(sa.select(VIDEOS.c.owner, VIDEOS.c.lease_owner).where(VIDEOS.c.id == job_id)
                               .with_for_update()).first()
            if job is None or job.lease_owner != worker:
                return False
            if conn.execute(sa.select(_U.job_id).where(_U.job_id == job_id, _U.stage == stage)).first():
                return False
            conn.execute(sa.insert(USAGE).values(
                job_id=job_id, stage=stage, owner=job.owner, pool=pool, device=device_kind(device),
                seconds=float(seconds), day=utc_day(now).isoformat(), recorded_at=now))
        return True

    def usage_of_jobs(self, job_ids: Iterable[str]) -> dict[str, list[dict]]:
        """Per job: seconds per (pool, device), summed over its stages, pools in name order."""
        ids = list(job_ids)
        found: dict[str, list[dict]] = {i: [] for i in ids}
        if not ids:
            return found
        query = (sa.select(_U.job_id, _U.pool, _U.device, sa.func.sum(_U.seconds), sa.func.count())
                 .where(_U.job_id.in_(ids)).group_by(_U.job_id, _U.pool, _U.device)
                 .order_by(_U.job_id, _U.pool, _U.device))
        with self._engine.begin() as conn:
            for job_id, pool, device, seconds, stages in conn.execute(query):
                found[job_id].append({"pool": pool, "device": device, "seconds": float(seconds), "stages": stages})
        return found

    def usage_by_day(self, owner: str | None, start: dt.date, end: dt.date) -> list[dict]:
        """One account's seconds per (day, pool, device) for the days ``start``..``end`` inclusive."""
        if end < start:
            raise ValueError(f"end {end} is before start {start}")
        who = _U.owner.is_(None) if owner is None else _U.owner == owner
        query = (sa.select(_U.day, _U.pool, _U.device, sa.func.sum(_U.seconds))
                 .where(who, _U.day >= start.isoformat(), _U.day <= end.isoformat())
                 .group_by(_U.day, _U.pool, _U.device).order_by(_U.day, _U.pool, _U.device))
        with self._engine.begin() as conn:
            return [{"date": day, "pool": pool, "device": device, "seconds": float(seconds)}
                    for day, pool, device, seconds in conn.execute(query)]

    # -- budgets -------------------------------------------------------------------------

    def set_budget(self, account_id: str, *, tier: str | None, daily_seconds: float | None) -> None:
        """The operator's tier and override for an account (both None: back to the defaults)."""
        if daily_seconds is not None and (not math.isfinite(daily_seconds) or daily_seconds < 0):
            raise ValueError(f"daily_seconds: {daily_seconds!r} must be a finite number >= 0, or null")
        now = self._clock()
        with self._writer.begin() as conn:
            conn.execute(sa.delete(BUDGETS).where(_B.account_id == account_id))
            if tier is not None or daily_seconds is not None:
                conn.execute(sa.insert(BUDGETS).values(account_id=account_id, tier=tier,
                                                       daily_seconds=daily_seconds, updated_at=now))

    def budget_of(self, account_id: str | None) -> tuple[str | None, float | None]:
        """(tier, override) the operator set for the account; (None, None) when unset."""
        if account_id is None:
            return None, None
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(_B.tier, _B.daily_seconds).where(_B.account_id == account_id)).first()
        return (row.tier, row.daily_seconds) if row is not None else (None, None)

    def budget_status(self, owner: str | None, rule: BudgetRule) -> BudgetStatus:
        """The account's limit and spending today (UTC, on the store's clock)."""
        now = self._clock()
        day = utc_day(now).isoformat()
        who = _U.owner.is_(None) if owner is None else _U.owner == owner
        with self._engine.begin() as conn:
            spent = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(_U.seconds), 0.0))
                                 .where(who, _U.day == day)).scalar_one()
        tier, override = self.budget_of(owner)
        return status(now, float(spent), rule.limit(tier, override))

    def spent_accounts(self, rule: BudgetRule) -> frozenset[str]:
        """Accounts whose budget for today (UTC, on the store's clock) is spent."""
        day = utc_day(self._clock()).isoformat()
        with self._engine.begin() as conn:
            spent = {owner: float(s) for owner, s in conn.execute(
                sa.select(_U.owner, sa.func.sum(_U.seconds)).where(_U.day == day, _U.owner.is_not(None))
                .group_by(_U.owner))}
            rows = conn.execute(sa.select(_B.account_id, _B.tier, _B.daily_seconds)).all()
        limits = {r.account_id: r.daily_seconds for r in rows}
        tiers = {r.account_id: r.tier for r in rows}
        return spent_tenants(spent, limits, rule, tiers)
