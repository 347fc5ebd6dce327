"""The policy room's tables: protected names, rights-holder accounts, and the registry's version.

``policy_version`` is one row whose counter every registry write moves in its own transaction,
so a gateway replica learns that its cached registry is stale from one primary-key read.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import JSON, Base

KINDS = ("work", "character", "public_figure")


class ProtectedName(Base):
    __tablename__ = "protected_names"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str] = mapped_column(sa.String(255))
    holder: Mapped[str] = mapped_column(sa.String(255))  # the rights holder, or who asked for a figure's entry
    aliases: Mapped[list[Any]] = mapped_column(JSON)  # spellings as given; matching folds them
    # The rights-holder account that manages the entry; NULL: the operator's.
    account_id: Mapped[str | None] = mapped_column(sa.String(64), sa.ForeignKey("accounts.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]

    __table_args__ = (
        sa.CheckConstraint("kind IN ('work', 'character', 'public_figure')", name="ck_protected_names_kind"),
        sa.Index("ix_protected_names_account", "account_id", "created_at", "id"),
        sa.Index("ix_protected_names_created", "created_at", "id"),
    )


class RightsHolder(Base):
    """An account the operator made a rights holder: it manages its own entries, under ``holder``."""

    __tablename__ = "rights_holders"

    account_id: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                                            primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(255))
    granted_at: Mapped[dt.datetime]


class PolicyVersion(Base):
    __tablename__ = "policy_version"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(sa.BigInteger)
