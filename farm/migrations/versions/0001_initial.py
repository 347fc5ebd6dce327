"""Initial schema: the videos table.

Revision ID: 0001
Revises:
Create Date: 2025-11-25

A frozen snapshot: later schema changes go in new revisions, never here. Times are
BIGINT microseconds since the Unix epoch (UTC); see farm.jobs.store.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "videos",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("size", sa.String(32), nullable=False),
        sa.Column("seconds", sa.Integer(), nullable=False),
        sa.Column("params", _JSON, nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("completed_at", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("num_steps", sa.Integer(), nullable=False),
        sa.Column("checkpoint_key", sa.Text(), nullable=True),
        sa.Column("objects", _JSON, nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.BigInteger(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'in_progress', 'completed', 'failed', 'cancelled')", name="ck_videos_status"
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 100", name="ck_videos_progress"),
    )
    op.create_index("ix_videos_claim", "videos", ["status", "priority", "created_at"])
    op.create_index("ix_videos_lease", "videos", ["status", "lease_expires_at"])
    op.create_index("ix_videos_owner_created", "videos", ["owner", "created_at", "id"])
    op.create_index("ix_videos_created", "videos", ["created_at", "id"])
    op.create_index("ix_videos_completed", "videos", ["completed_at"])
    op.create_index(
        "uq_videos_owner_idempotency",
        "videos",
        [sa.text("coalesce(owner, '')"), "idempotency_key"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_table("videos")  # drops its indexes with it
