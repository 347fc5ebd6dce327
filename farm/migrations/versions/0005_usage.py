"""Accelerator-seconds per job stage (the usage ledger) and per-account daily budgets.

Revision ID: 0004u
Revises: 0004s
Create Date: 2026-12-02

``usage`` holds one row per (job, stage) that completed: the replica's own wall time for a
denoise shard (stage ``shard A-B``), the decode or the finish, with the pool, the device kind
and the UTC day it was recorded on. The primary key (job_id, stage) is what makes a stage count
once however often it ran. ``ix_usage_owner_day`` serves ``GET /v1/usage`` and the dispatcher's
budget check (today's sum per account). Rows outlive their video, so a deleted video's seconds
still count towards its account's day. ``account_budgets`` holds the operator's per-account tier
and daily budget override; an account without a row uses the settings' defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004u"
down_revision: str | Sequence[str] | None = "0004s"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.BigInteger()


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("stage", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("pool", sa.String(255), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("recorded_at", _TIME, nullable=False),
        sa.CheckConstraint("seconds >= 0", name="ck_usage_seconds"),
    )
    op.create_index("ix_usage_owner_day", "usage", ["owner", "day"])
    op.create_index("ix_usage_day", "usage", ["day"])
    op.create_table(
        "account_budgets",
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("tier", sa.String(64), nullable=True),
        sa.Column("daily_seconds", sa.Float(), nullable=True),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.CheckConstraint("daily_seconds IS NULL OR daily_seconds >= 0", name="ck_account_budgets_daily"),
    )


def downgrade() -> None:
    op.drop_table("account_budgets")
    op.drop_index("ix_usage_day", table_name="usage")
    op.drop_index("ix_usage_owner_day", table_name="usage")
    op.drop_table("usage")
