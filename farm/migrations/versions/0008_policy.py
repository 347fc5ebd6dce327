"""Protected names (rights-holder opt-out, public figures), rights-holder accounts, the registry version.

Revision ID: 0007p
Revises: 0004b
Create Date: 2026-12-03

The tables of ``farm.policy.tables``, frozen here; ``policy_version`` starts with its one row.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007p"
down_revision: str | Sequence[str] | None = "0007v"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TIME = sa.BigInteger()


def upgrade() -> None:
    op.create_table(
        "protected_names",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("aliases", _JSON, nullable=False),
        sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.CheckConstraint("kind IN ('work', 'character', 'public_figure')", name="ck_protected_names_kind"),
    )
    op.create_index("ix_protected_names_account", "protected_names", ["account_id", "created_at", "id"])
    op.create_index("ix_protected_names_created", "protected_names", ["created_at", "id"])
    op.create_table(
        "rights_holders",
        sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("granted_at", _TIME, nullable=False),
    )
    version = op.create_table(
        "policy_version",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(version, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("policy_version")
    op.drop_table("rights_holders")
    op.drop_index("ix_protected_names_created", table_name="protected_names")
    op.drop_index("ix_protected_names_account", table_name="protected_names")
    op.drop_table("protected_names")
