"""The job store's tables: videos (one row per job), their event log, queue depths per priority
class, and named leader leases.

The indexes follow the store's hot paths; each says which query it serves. Three are partial:
runnable rows (queued, no cancellation asked for) in claim order and per owner, and running
rows by lease expiry. Claiming the next job, counting an account's queue against its cap and
reaping expired leases each read one small index, however many finished jobs the table keeps;
a class's queue length is one row of ``queue_depths``, kept by triggers.

Their predicates are literal SQL strings (``RUNNABLE``, ``LEASED``), used verbatim by the
queries too: SQLite uses a partial index only when the query's WHERE contains the index's
terms exactly, and never when they are bound parameters. No index leads with ``status``: on
SQLite, which plans without statistics, an equality on ``status`` would look more selective
than the partial indexes and win (reading every queued row and sorting them).

Times are BIGINT microseconds since the Unix epoch (see ``farm.db``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import Base

# Queued and not cancelled: the rows a claim may take and a queue cap counts. Running: the rows
# that hold a lease. Literal on purpose (see the module docstring); ``NOT cancel_requested``
# reads the same on SQLite and PostgreSQL.
RUNNABLE = "status = 'queued' AND NOT cancel_requested"
LEASED = "status = 'in_progress'"
# Finished and its objects not yet removed by the reaper (farm.jobs.reaper).
UNREAPED = "expired_at IS NULL AND status IN ('completed', 'failed', 'cancelled')"


def runnable() -> sa.TextClause:
    """``RUNNABLE`` as a WHERE clause."""
    return sa.text(RUNNABLE)


def leased() -> sa.TextClause:
    """``LEASED`` as a WHERE clause."""
    return sa.text(LEASED)


def _partial(predicate: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


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
    # Who may see it besides its owner (farm.jobs.sharing): private, shared or unlisted.
    visibility: Mapped[str] = mapped_column(sa.String(16))
    # When the reaper removed its objects (farm.jobs.reaper); the row stays.
    expired_at: Mapped[dt.datetime | None]

    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('queued', 'in_progress', 'completed', 'failed', 'cancelled')", name="ck_videos_status"
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 100", name="ck_videos_progress"),
        # Claiming (priority, then oldest first) and the per-class queue cap.
        sa.Index("ix_videos_runnable", "priority", "created_at", "id", **_partial(RUNNABLE)),
        # The per-account queue cap: one owner's runnable rows (the anonymous owner's too).
        sa.Index("ix_videos_runnable_owner", "owner", **_partial(RUNNABLE)),
        # Reaping expired leases; a role's or a worker's leases.
        sa.Index("ix_videos_leased", "lease_expires_at", **_partial(LEASED)),
        # Listing: per tenant and across tenants, cursor = (created_at, id).
        sa.Index("ix_videos_owner_created", "owner", "created_at", "id"),
        sa.Index("ix_videos_created", "created_at", "id"),
        # Recent throughput, for QueueFull's retry-after estimate.
        sa.Index("ix_videos_completed", "completed_at"),
        # The reaper: finished rows whose objects are still stored, by expiry.
        sa.Index("ix_videos_unreaped", "expires_at", **_partial(UNREAPED)),
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
    type: Mapped[str] = mapped_column(sa.String(64))  # video.completed | failed | cancelled | cameo_used
    video_id: Mapped[str] = mapped_column(sa.String(64))
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[dt.datetime]


class QueueDepth(Base):
    """Runnable rows per priority class, kept exact by triggers on ``videos`` (migration 0003):
    every insert, delete or update of a row that enters or leaves ``RUNNABLE`` adds or takes one,
    in the same transaction. The farm's per-class queue cap reads one row here instead of
    counting the queue, and a create locks that row (``FOR UPDATE``) to check and insert."""

    __tablename__ = "queue_depths"

    priority: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    queued: Mapped[int] = mapped_column(sa.BigInteger)


class LeaderLease(Base):
    """One named lease per role (``dispatcher``): who leads, until when, and how many times the
    leadership changed hands (``epoch``, a fencing token that only grows)."""

    __tablename__ = "leaders"

    role: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(255))
    expires_at: Mapped[dt.datetime]
    epoch: Mapped[int] = mapped_column(sa.BigInteger)


VIDEOS = Video.__table__
EVENTS = VideoEvent.__table__
DEPTHS = QueueDepth.__table__
LEADERS = LeaderLease.__table__
