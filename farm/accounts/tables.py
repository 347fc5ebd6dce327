"""The accounts room's tables: accounts (tenants), their API keys, and operator invites.

Secrets (API keys, invite codes) are never stored: only their SHA-256, which is safe for
values with ≥128 random bits (nothing to brute-force, so no slow hash is needed).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import Base


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[dt.datetime]
    invite_id: Mapped[str | None] = mapped_column(sa.String(64))


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(255))
    secret_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)  # sha256 hex of the whole key
    hint: Mapped[str] = mapped_column(sa.String(32))  # "vf_sk_…wxyz": enough to recognise, useless to use
    created_at: Mapped[dt.datetime]
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]

    __table_args__ = (sa.Index("ix_api_keys_account", "account_id", "created_at"),)


class Invite(Base):
    __tablename__ = "invites"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    code_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    note: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    redeemed_at: Mapped[dt.datetime | None]
    account_id: Mapped[str | None] = mapped_column(sa.String(64))
