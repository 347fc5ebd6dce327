"""Daily accelerator budgets, as data: which limit applies to an account and whether it is spent.

Pure (no SQL, clock or Ray): the caller reads today's spending from the usage ledger
(``farm.jobs.usage``) and passes the time in. A budget is accelerator-seconds per UTC day; the
day's spending starts again at 00:00 UTC. An account's limit is its own override, else its
tier's, else the farm's default; None means unlimited. The dispatcher turns the spent accounts
into ``Scheduler.hold_bulk`` (their bulk shards wait) and leaves their queued bulk jobs
unclaimed; the gateway refuses their creates.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field


def _check_seconds(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name}: {value!r} must be a finite number of seconds >= 0, or None (unlimited)")


@dataclass(frozen=True)
class BudgetRule:
    """The farm's budget settings: ``default_daily_s`` for accounts without a tier or override,
    ``tiers`` (name → daily seconds, None unlimited) for accounts the operator put in a tier."""

    default_daily_s: float | None = None
    tiers: Mapping[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_seconds("default_daily_s", self.default_daily_s)
        for name, seconds in self.tiers.items():
            _check_seconds(f"tiers[{name!r}]", seconds)

    def limit(self, tier: str | None = None, override: float | None = None) -> float | None:
        """The daily limit of an account with this tier and override (None: unlimited)."""
        if override is not None:
            return override
        if tier is not None and tier in self.tiers:
            return self.tiers[tier]
        return self.default_daily_s


@dataclass(frozen=True)
class BudgetStatus:
    """One account's day: its limit, what it spent, and when the day (and the spending) ends."""

    day: dt.date
    limit_s: float | None
    spent_s: float
    resets_at: dt.datetime

    @property
    def exhausted(self) -> bool:
        return exhausted(self.spent_s, self.limit_s)

    @property
    def remaining_s(self) -> float | None:
        return None if self.limit_s is None else max(self.limit_s - self.spent_s, 0.0)


def exhausted(spent_s: float, limit_s: float | None) -> bool:
    """Spent once the day's seconds reach the limit; a limit of 0 stops the account outright."""
    return limit_s is not None and spent_s >= limit_s


def utc_day(now: dt.datetime) -> dt.date:
    """The UTC day ``now`` (timezone-aware) falls on: what a budget is counted per."""
    if now.tzinfo is None:
        raise ValueError(f"now: {now!r} must be timezone-aware")
    return now.astimezone(dt.UTC).date()


def next_reset(now: dt.datetime) -> dt.datetime:
    """The next 00:00 UTC after ``now``: when a spent budget is available again."""
    return dt.datetime.combine(utc_day(now) + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def status(now: dt.datetime, spent_s: float, limit_s: float | None) -> BudgetStatus:
    return BudgetStatus(utc_day(now), limit_s, spent_s, next_reset(now))


def spent_tenants(spent: Mapping[str, float], limits: Mapping[str, float | None], rule: BudgetRule,
                  tiers: Mapping[str, str | None] | None = None) -> frozenset[str]:
    """Accounts whose day is spent, among those named in ``spent`` (today's seconds per
    account), ``limits`` (the operator's overrides) or ``tiers`` (the operator's tier choices).
    An account named only by the operator, with a limit of 0, is spent without spending."""
    tiers = tiers or {}
    names = set(spent) | set(limits) | set(tiers)
    return frozenset(t for t in names
                     if exhausted(spent.get(t, 0.0), rule.limit(tiers.get(t), limits.get(t))))
