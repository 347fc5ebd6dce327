"""Files, batches and their request lines, schedules.

Revision ID: 0004b
Revises: 0004u
Create Date: 2026-12-02

The tables of ``farm.jobs.batch_tables``, frozen here. ``ix_batches_active`` and
``ix_schedules_due`` are partial (batches with work left; schedules not paused), spelled as
the runner's queries spell them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004b"
down_revision: str | Sequence[str] | None = "0004u"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TIME = sa.BigInteger()
_ACTIVE = "status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
_ARMED = "NOT paused"


def _where(predicate: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=True),
    )
    op.create_index("ix_files_owner_created", "files", ["owner", "created_at", "id"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ends_as", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("meta", _JSON, nullable=False),
        sa.Column("errors", _JSON, nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("invalid", sa.Integer(), nullable=False),
        sa.Column("output_file_id", sa.String(64), nullable=True),
        sa.Column("error_file_id", sa.String(64), nullable=True),
        sa.Column("schedule_id", sa.String(64), nullable=True),
        *(sa.Column(name, _TIME, nullable=name in _OPTIONAL_TIMES) for name in _TIMES),
        sa.CheckConstraint(
            "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', "
            "'cancelling', 'cancelled')", name="ck_batches_status"),
    )
    op.create_index("ix_batches_owner_created", "batches", ["owner", "created_at", "id"])
    op.create_index("ix_batches_active", "batches", ["created_at"], **_where(_ACTIVE))
    op.create_table(
        "batch_items",
        sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("line", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.String(512), nullable=True),
        sa.Column("video_id", sa.String(64), nullable=True),
        sa.Column("error", _JSON, nullable=True),
    )
    op.create_index("ix_batch_items_video", "batch_items", ["video_id"])
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("cron", sa.String(255), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("missed", sa.String(16), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", _TIME, nullable=False),
        sa.Column("last_run_at", _TIME, nullable=True),
        sa.Column("last_batch_id", sa.String(64), nullable=True),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
    )
    op.create_index("ix_schedules_owner_created", "schedules", ["owner", "created_at", "id"])
    op.create_index("ix_schedules_due", "schedules", ["next_run_at"], **_where(_ARMED))


_TIMES = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at")
_OPTIONAL_TIMES = set(_TIMES) - {"created_at", "expires_at"}


def downgrade() -> None:
    op.drop_table("schedules")
    op.drop_table("batch_items")
    op.drop_table("batches")
    op.drop_table("files")
