"""The tables of cameos (characters) and their consent (migration 0009c).

- ``characters``: one row per cameo: its owner, its ``@name`` (unique, case-insensitive through
  ``name_key``), the owner's consent setting, the operator's public-figure link, and the S3 keys
  of its source video and reference frames.
- ``character_grants``: one row per (cameo, account) that asked to use it: ``pending`` until the
  owner answers ``approved`` or ``denied``; a revocation turns ``approved`` rows into ``revoked``.
- ``character_uses``: one row per (cameo, clip) that used it, written in the same transaction as
  the clip's job (``CharacterStore.admit``): the owner's list of uses and their read access.

No foreign keys to ``videos`` (as for shares, ``farm.jobs.sharing_tables``): the job store deletes
a video's use rows in the same transaction as the video.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import Base

CONSENTS = ("only_me", "approved", "everyone")
GRANT_STATUSES = ("pending", "approved", "denied", "revoked")


class Character(Base):
    __tablename__ = "characters"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    name: Mapped[str] = mapped_column(sa.String(64))
    name_key: Mapped[str] = mapped_column(sa.String(64), unique=True)  # name.casefold(): @Alice is @alice
    consent: Mapped[str] = mapped_column(sa.String(16))
    public_figure_id: Mapped[str | None] = mapped_column(sa.String(64))  # a protected_names entry (operator)
    video_key: Mapped[str] = mapped_column(sa.String(512))
    frames: Mapped[dict[str, Any]]  # {"keys": [...], "width": w, "height": h}
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]  # the owner's last revocation

    __table_args__ = (
        sa.Index("ix_characters_owner", "owner", "created_at", "id"),
        sa.CheckConstraint("consent IN ('only_me', 'approved', 'everyone')", name="ck_characters_consent"),
    )


class CharacterGrant(Base):
    __tablename__ = "character_grants"

    character_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(16))
    requested_at: Mapped[dt.datetime]
    answered_at: Mapped[dt.datetime | None]

    __table_args__ = (
        sa.Index("ix_character_grants_account", "account_id", "requested_at"),
        sa.CheckConstraint("status IN ('pending', 'approved', 'denied', 'revoked')",
                           name="ck_character_grants_status"),
    )


class CharacterUse(Base):
    __tablename__ = "character_uses"

    character_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    video_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    account_id: Mapped[str | None] = mapped_column(sa.String(255))  # who made the clip
    created_at: Mapped[dt.datetime]

    # The owner's readable-video lookup goes by video; the list of uses by cameo, newest first.
    __table_args__ = (
        sa.Index("ix_character_uses_video", "video_id"),
        sa.Index("ix_character_uses_character", "character_id", "created_at"),
    )


CHARACTERS = Character.__table__
GRANTS = CharacterGrant.__table__
USES = CharacterUse.__table__
