"""The tables of drafts and sharing, and of clip lifetimes (migration 0007v).

- ``video_shares``: one row per (video, account) its owner shared it with.
- ``video_links``: unlisted links; only the SHA-256 of a link's token is stored (as for API
  keys: the token has 256 random bits, so there is nothing to brute-force), and a revoked link
  keeps its row (``revoked_at``) so the owner's list shows what was published.
- ``account_lifetimes``: the operator's per-account override of how long clips are kept.

No foreign keys to ``videos``: the job store deletes a video's shares and links in the same
transaction as the video (``JobStore.delete``), and a later SQLite migration that rebuilds
``videos`` (drop and rename) would otherwise cascade-delete every share.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import Base


class VideoShare(Base):
    __tablename__ = "video_shares"

    video_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    created_at: Mapped[dt.datetime]

    # GET /v1/videos?shared=true: what was shared with one account, newest first.
    __table_args__ = (sa.Index("ix_video_shares_account", "account_id", "created_at", "video_id"),)


class VideoLink(Base):
    __tablename__ = "video_links"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    video_id: Mapped[str] = mapped_column(sa.String(64))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)  # sha256 hex of the token
    hint: Mapped[str] = mapped_column(sa.String(32))  # "vf_share_…wxyz"
    created_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]

    __table_args__ = (sa.Index("ix_video_links_video", "video_id", "created_at"),)


class AccountLifetime(Base):
    __tablename__ = "account_lifetimes"

    account_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    lifetime_s: Mapped[int] = mapped_column(sa.BigInteger)
    updated_at: Mapped[dt.datetime]

    __table_args__ = (sa.CheckConstraint("lifetime_s > 0", name="ck_account_lifetimes_positive"),)


SHARES = VideoShare.__table__
LINKS = VideoLink.__table__
LIFETIMES = AccountLifetime.__table__
