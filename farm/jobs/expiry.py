"""How long a clip is kept, and the store side of the reaper that removes it afterwards.

A clip's lifetime is chosen when its job is created: the operator's override for the owner's
account (``account_lifetimes``, set with ``POST /v1/admin/accounts/{id}/lifetime``), else the
lifetime of the account's tier (the tier its budget is set with, ``account_budgets.tier``;
``expiry.tiers``), else ``expiry.default_lifetime_s``. The job store stores it as
``expires_at - created_at`` and restarts it when the job completes (``LeasedQueue.complete``),
so ``expires_at`` is completion plus the lifetime. A changed setting applies to clips created
after the change.

From ``expires_at`` on, the gateway answers every content variant with 404 ``video_expired``;
the reaper (``farm.jobs.reaper``) then deletes the clip's objects and sets ``expired_at``.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping

import sqlalchemy as sa

from farm.db import Database, utcnow
from farm.jobs.job import DEFAULT_EXPIRES_IN_S, Job
from farm.jobs.sharing_tables import LIFETIMES
from farm.jobs.tables import UNREAPED, VIDEOS
from farm.jobs.usage import BUDGETS

MAX_LIFETIME_S = 10 * 365 * 24 * 3600
MIN_LIFETIME_S = 60  # the floor unless the operator sets expiry.min_lifetime_s
_V, _C, _T, _B = VIDEOS, VIDEOS.c, LIFETIMES.c, BUDGETS.c


@dataclasses.dataclass(frozen=True)
class LifetimeRule:
    """The farm's lifetimes (from ``ExpirySettings``): a default, one per account tier, and the
    shortest an operator may give an account."""

    default_s: float = DEFAULT_EXPIRES_IN_S
    tiers: Mapping[str, float] = dataclasses.field(default_factory=dict)
    min_s: int = MIN_LIFETIME_S

    def lifetime_s(self, tier: str | None, override_s: float | None) -> float:
        if override_s is not None:
            return float(override_s)
        if tier is not None and tier in self.tiers:
            return float(self.tiers[tier])
        return float(self.default_s)


def expired(job: Job, now: dt.datetime) -> bool:
    """Whether the clip's assets are past their lifetime (content is refused from then on).

    The lifetime ends at the whole second the API shows as ``expires_at`` (unix seconds, the
    stored time's fraction dropped), not up to a second later at the stored microsecond: a client
    that waits until the advertised moment must find the content gone. The reaper, which reads
    the stored time, may remove the objects up to a second after that."""
    return job.expired_at is not None or (job.expires_at is not None and job.expires_at.replace(microsecond=0) <= now)


class Lifetimes:
    """Per-account lifetime overrides, and the lifetime a new job of an account gets."""

    def __init__(self, db: Database | str, rule: LifetimeRule | None = None, *,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.db = Database(db) if isinstance(db, str) else db
        self.rule = rule or LifetimeRule()
        self._clock = clock or utcnow

    def now(self) -> dt.datetime:
        return self._clock()

    def settings_of(self, account_id: str | None) -> tuple[str | None, int | None]:
        """(tier, lifetime override) of the account, in one read; (None, None) when neither is set."""
        if account_id is None:
            return None, None
        tier = sa.select(_B.tier).where(_B.account_id == account_id).scalar_subquery()
        override = sa.select(_T.lifetime_s).where(_T.account_id == account_id).scalar_subquery()
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(tier.label("tier"), override.label("override"))).one()
        return row.tier, row.override

    def lifetime_of(self, account_id: str | None) -> float:
        """Seconds a clip created now by ``account_id`` is kept after it completes."""
        return self.rule.lifetime_s(*self.settings_of(account_id))

    def set_override(self, account_id: str, lifetime_s: int | None) -> None:
        """The operator's lifetime for an account; None: back to its tier's or the default."""
        floor = self.rule.min_s
        if lifetime_s is not None and (isinstance(lifetime_s, bool) or not isinstance(lifetime_s, int)
                                       or not floor <= lifetime_s <= MAX_LIFETIME_S):
            raise ValueError(f"lifetime_s: {lifetime_s!r} is out of range; allowed: {floor}..{MAX_LIFETIME_S} or null")
        with self.db.writer.begin() as conn:
            conn.execute(sa.delete(LIFETIMES).where(_T.account_id == account_id))
            if lifetime_s is not None:
                conn.execute(sa.insert(LIFETIMES).values(account_id=account_id, lifetime_s=lifetime_s,
                                                         updated_at=self._clock()))

    # -- the reaper's store side --------------------------------------------------------------

    def due(self, limit: int = 100) -> builtins.list[Job]:
        """Up to ``limit`` finished jobs past ``expires_at`` whose objects were not removed yet, the
        longest expired first (read along the partial index ``ix_videos_unreaped``)."""
        query = (sa.select(_V).where(sa.text(UNREAPED), _C.expires_at <= self._clock())
                 .order_by(_C.expires_at, _C.id).limit(limit))
        with self.db.engine.connect() as conn:
            return [Job.from_row(r) for r in conn.execute(query).mappings()]

    def mark_expired(self, video_id: str) -> bool:
        """Record that the clip's objects are gone (the row stays); False when it was marked already
        or no longer exists (deleted meanwhile)."""
        now = self._clock()
        with self.db.writer.begin() as conn:
            done = conn.execute(sa.update(_V).where(_C.id == video_id, _C.expired_at.is_(None))
                                .values(expired_at=now, objects={}, checkpoint_key=None))
        return done.rowcount > 0
