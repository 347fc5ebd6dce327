"""Drafts and sharing (per-account shares, unlisted links), clip expiry, per-account lifetimes.

Revision ID: 0007v
Revises: 0004b
Create Date: 2026-12-03

The tables of ``farm.jobs.sharing_tables``, frozen here, and two columns on ``videos``:
``visibility`` (private, shared or unlisted; kept by the sharing store in the same transaction
as each share or link change) and ``expired_at`` (when the reaper removed the clip's objects;
the row stays). ``ix_videos_unreaped`` is partial — finished rows whose objects are still
stored — spelled as the reaper's query spells it, so its scan reads only clips it may reap.
Adding columns does not rebuild ``videos`` on SQLite, so the queue-depth triggers of 0003 stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007v"
down_revision: str | Sequence[str] | None = "0004b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.BigInteger()
_UNREAPED = "expired_at IS NULL AND status IN ('completed', 'failed', 'cancelled')"


def _where(predicate: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


def upgrade() -> None:
    op.add_column("videos", sa.Column("visibility", sa.String(16), nullable=False, server_default="private"))
    op.add_column("videos", sa.Column("expired_at", _TIME, nullable=True))
    op.create_index("ix_videos_unreaped", "videos", ["expires_at"], **_where(_UNREAPED))
    op.create_table(
        "video_shares",
        sa.Column("video_id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("created_at", _TIME, nullable=False),
    )
    op.create_index("ix_video_shares_account", "video_shares", ["account_id", "created_at", "video_id"])
    op.create_table(
        "video_links",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("video_id", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("hint", sa.String(32), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
    )
    op.create_index("ix_video_links_video", "video_links", ["video_id", "created_at"])
    op.create_table(
        "account_lifetimes",
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("lifetime_s", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.CheckConstraint("lifetime_s > 0", name="ck_account_lifetimes_positive"),
    )


def downgrade() -> None:
    op.drop_table("account_lifetimes")
    op.drop_index("ix_video_links_video", table_name="video_links")
    op.drop_table("video_links")
    op.drop_index("ix_video_shares_account", table_name="video_shares")
    op.drop_table("video_shares")
    op.drop_index("ix_videos_unreaped", table_name="videos")
    with op.batch_alter_table("videos", recreate="never") as batch:  # SQLite ≥ 3.35 drops columns in place
        batch.drop_column("expired_at")
        batch.drop_column("visibility")
