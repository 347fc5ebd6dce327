"""Claims, caps and the reaper read partial indexes; queue depths kept by triggers; leader leases.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``ix_videos_claim`` and ``ix_videos_lease`` led with ``status`` and covered every row, finished
ones included. Claims now read ``ix_videos_runnable`` (queued, uncancelled rows in claim order),
the per-account cap counts ``ix_videos_runnable_owner``, and the reaper reads
``ix_videos_leased`` (running rows by lease expiry). The predicates are spelled exactly as the
queries spell them (``farm.jobs.tables``, frozen here): SQLite matches partial-index terms
literally. See ``farm.jobs.tables`` for why no index leads with ``status`` any more.

``queue_depths`` holds the number of runnable rows per priority class, seeded here from the
table and kept by row triggers on ``videos`` (a PL/pgSQL function on PostgreSQL, four SQL
triggers on SQLite). A later revision that rebuilds ``videos`` on SQLite (Alembic's batch
"move and copy") drops these triggers with the old table and must create them again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUNNABLE = "status = 'queued' AND NOT cancel_requested"
_LEASED = "status = 'in_progress'"
_PRIORITIES = (0, 1)  # farm.jobs.job.Priority when this revision was written
_TIME = sa.BigInteger()

_PG_TRIGGER = """
CREATE FUNCTION videos_queue_depth() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.status = 'queued' AND NOT OLD.cancel_requested THEN
        UPDATE queue_depths SET queued = queued - 1 WHERE priority = OLD.priority;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status = 'queued' AND NOT NEW.cancel_requested THEN
        INSERT INTO queue_depths (priority, queued) VALUES (NEW.priority, 1)
        ON CONFLICT (priority) DO UPDATE SET queued = queue_depths.queued + 1;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER videos_queue_depth AFTER INSERT OR DELETE OR UPDATE OF status, cancel_requested, priority
ON videos FOR EACH ROW EXECUTE FUNCTION videos_queue_depth();
"""

_SQLITE_ENTER = """
BEGIN
    INSERT OR IGNORE INTO queue_depths (priority, queued) VALUES (NEW.priority, 0);
    UPDATE queue_depths SET queued = queued + 1 WHERE priority = NEW.priority;
END"""
_SQLITE_LEAVE = """
BEGIN
    UPDATE queue_depths SET queued = queued - 1 WHERE priority = OLD.priority;
END"""
_NEW_RUNNABLE = "NEW.status = 'queued' AND NOT NEW.cancel_requested"
_OLD_RUNNABLE = "OLD.status = 'queued' AND NOT OLD.cancel_requested"
_UPDATE = "AFTER UPDATE OF status, cancel_requested, priority ON videos"
_SQLITE_TRIGGERS = {
    "videos_queue_depth_insert": f"AFTER INSERT ON videos WHEN {_NEW_RUNNABLE} {_SQLITE_ENTER}",
    "videos_queue_depth_delete": f"AFTER DELETE ON videos WHEN {_OLD_RUNNABLE} {_SQLITE_LEAVE}",
    "videos_queue_depth_enter": f"{_UPDATE} WHEN {_NEW_RUNNABLE} {_SQLITE_ENTER}",
    "videos_queue_depth_leave": f"{_UPDATE} WHEN {_OLD_RUNNABLE} {_SQLITE_LEAVE}",
}


def _where(predicate: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


def upgrade() -> None:
    op.create_index("ix_videos_runnable", "videos", ["priority", "created_at", "id"], **_where(_RUNNABLE))
    op.create_index("ix_videos_runnable_owner", "videos", ["owner"], **_where(_RUNNABLE))
    op.create_index("ix_videos_leased", "videos", ["lease_expires_at"], **_where(_LEASED))
    op.drop_index("ix_videos_claim", table_name="videos")
    op.drop_index("ix_videos_lease", table_name="videos")
    op.create_table(
        "queue_depths",
        sa.Column("priority", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("queued", sa.BigInteger(), nullable=False),
    )
    # Seed the depths, then keep them: the revision runs in one transaction (the migration lock).
    op.execute(f"INSERT INTO queue_depths (priority, queued) SELECT priority, count(*) FROM videos "
               f"WHERE {_RUNNABLE} GROUP BY priority")
    for priority in _PRIORITIES:
        op.execute(f"INSERT INTO queue_depths (priority, queued) SELECT {priority}, 0 "
                   f"WHERE NOT EXISTS (SELECT 1 FROM queue_depths WHERE priority = {priority})")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_TRIGGER)
    else:
        for name, body in _SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {body}")
    op.create_table(
        "leaders",
        sa.Column("role", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leaders")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER videos_queue_depth ON videos")
        op.execute("DROP FUNCTION videos_queue_depth()")
    else:
        for name in _SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("queue_depths")
    op.create_index("ix_videos_lease", "videos", ["status", "lease_expires_at"])
    op.create_index("ix_videos_claim", "videos", ["status", "priority", "created_at"])
    op.drop_index("ix_videos_leased", table_name="videos")
    op.drop_index("ix_videos_runnable_owner", table_name="videos")
    op.drop_index("ix_videos_runnable", table_name="videos")
