"""Tables of files, batches, their requests, and schedules (migration 0004b).

A file's bytes live in S3 (``files/{id}``); its row holds who owns it and what it is. A batch's
row holds its state and where its runner stands; ``batch_items`` has one row per request line
(the line's byte span in the input file, its ``custom_id``, and either the video it became or
the error that refused it). A schedule's ``next_run_at`` is the claim its firing compares and
sets (see ``farm.jobs.schedules``). Times are BIGINT microseconds since the Unix epoch.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from sqlalchemy.dialects.postgresql import JSONB

from farm.db import Base

# None is SQL NULL here (not JSON 'null'), so "IS NULL" finds the valid lines and error-free batches.
_OPTIONAL_JSON = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

# Batches the runner still has work on; literal for the partial index (see farm.jobs.tables).
ACTIVE = "status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
# Schedules that can fire.
ARMED = "NOT paused"


def _partial(predicate: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


class FileRow(Base):
    """An uploaded batch input file, or a batch's output or error file."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    purpose: Mapped[str] = mapped_column(sa.String(32))  # batch | batch_output | vision | user_data (images)
    filename: Mapped[str] = mapped_column(sa.String(512))
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    lines: Mapped[int]
    key: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime | None]

    __table_args__ = (sa.Index("ix_files_owner_created", "owner", "created_at", "id"),)


class BatchRow(Base):
    """One batch: its OpenAI fields and the runner's place in it."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    status: Mapped[str] = mapped_column(sa.String(16))
    # What the batch ends as once its last video ends: completed, cancelled or expired.
    ends_as: Mapped[str] = mapped_column(sa.String(16))
    endpoint: Mapped[str] = mapped_column(sa.String(64))
    input_file_id: Mapped[str] = mapped_column(sa.String(64))
    completion_window: Mapped[str] = mapped_column(sa.String(16))
    meta: Mapped[dict[str, Any]]
    errors: Mapped[dict[str, Any] | None] = mapped_column(_OPTIONAL_JSON)
    total: Mapped[int]
    invalid: Mapped[int]
    output_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    error_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    schedule_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    in_progress_at: Mapped[dt.datetime | None]
    finalizing_at: Mapped[dt.datetime | None]
    completed_at: Mapped[dt.datetime | None]
    failed_at: Mapped[dt.datetime | None]
    expired_at: Mapped[dt.datetime | None]
    cancelling_at: Mapped[dt.datetime | None]
    cancelled_at: Mapped[dt.datetime | None]

    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', "
            "'cancelling', 'cancelled')", name="ck_batches_status"),
        sa.Index("ix_batches_owner_created", "owner", "created_at", "id"),
        # The runner's scan: batches with work left, oldest first.
        sa.Index("ix_batches_active", "created_at", **_partial(ACTIVE)),
    )


class BatchItem(Base):
    """One request line of a batch: where it is in the input file, and what became of it."""

    __tablename__ = "batch_items"

    batch_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    line: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # 1-based, as BatchError.line
    start: Mapped[int] = mapped_column(sa.BigInteger)  # byte offset of the line in the input file
    length: Mapped[int]
    custom_id: Mapped[str | None] = mapped_column(sa.String(512))
    video_id: Mapped[str | None] = mapped_column(sa.String(64))
    # A refused line: {"status_code": 400, "body": {"error": {...}}}; null for a valid one.
    error: Mapped[dict[str, Any] | None] = mapped_column(_OPTIONAL_JSON)

    __table_args__ = (sa.Index("ix_batch_items_video", "video_id"),)


class ScheduleRow(Base):
    """A cron schedule whose every run is a batch of the same input file."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    name: Mapped[str] = mapped_column(sa.String(255))
    cron: Mapped[str] = mapped_column(sa.String(255))
    timezone: Mapped[str] = mapped_column(sa.String(64))
    input_file_id: Mapped[str] = mapped_column(sa.String(64))
    missed: Mapped[str] = mapped_column(sa.String(16))  # skip | run_once
    paused: Mapped[bool]
    next_run_at: Mapped[dt.datetime]
    last_run_at: Mapped[dt.datetime | None]
    last_batch_id: Mapped[str | None] = mapped_column(sa.String(64))
    runs: Mapped[int]
    skipped: Mapped[int]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]

    __table_args__ = (
        sa.Index("ix_schedules_owner_created", "owner", "created_at", "id"),
        # The firing scan: armed schedules by due time.
        sa.Index("ix_schedules_due", "next_run_at", **_partial(ARMED)),
    )


FILES = FileRow.__table__
BATCHES = BatchRow.__table__
ITEMS = BatchItem.__table__
SCHEDULES = ScheduleRow.__table__
