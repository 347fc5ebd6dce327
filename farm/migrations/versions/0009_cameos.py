"""Cameos (characters), consent grants and uses.

Revision ID: 0009c
Revises: 0007p
Create Date: 2026-12-03

The tables of ``farm.policy.cameo_tables``, frozen here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009c"
down_revision: str | Sequence[str] | None = "0007p"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TIME = sa.BigInteger()


def upgrade() -> None:
    op.create_table(
        "characters",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("name_key", sa.String(64), nullable=False, unique=True),
        sa.Column("consent", sa.String(16), nullable=False),
        sa.Column("public_figure_id", sa.String(64), nullable=True),
        sa.Column("video_key", sa.String(512), nullable=False),
        sa.Column("frames", _JSON, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.CheckConstraint("consent IN ('only_me', 'approved', 'everyone')", name="ck_characters_consent"),
    )
    op.create_index("ix_characters_owner", "characters", ["owner", "created_at", "id"])
    op.create_table(
        "character_grants",
        sa.Column("character_id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", _TIME, nullable=False),
        sa.Column("answered_at", _TIME, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'approved', 'denied', 'revoked')",
                           name="ck_character_grants_status"),
    )
    op.create_index("ix_character_grants_account", "character_grants", ["account_id", "requested_at"])
    op.create_table(
        "character_uses",
        sa.Column("character_id", sa.String(64), primary_key=True),
        sa.Column("video_id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(255), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
    )
    op.create_index("ix_character_uses_video", "character_uses", ["video_id"])
    op.create_index("ix_character_uses_character", "character_uses", ["character_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_character_uses_character", table_name="character_uses")
    op.drop_index("ix_character_uses_video", table_name="character_uses")
    op.drop_table("character_uses")
    op.drop_index("ix_character_grants_account", table_name="character_grants")
    op.drop_table("character_grants")
    op.drop_index("ix_characters_owner", table_name="characters")
    op.drop_table("characters")
