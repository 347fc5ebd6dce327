"""The webhooks room's tables: endpoints per account, and one delivery row per (event, endpoint).

Deliveries are an outbox: the fan-out from ``video_events`` (the job store's event log) and
the cursor that records how far it got commit together, and the unique (endpoint, event)
pair makes a repeated fan-out harmless, so every event reaches every endpoint at least once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import Base


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("accounts.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(sa.Text)
    secret: Mapped[str] = mapped_column(sa.Text)  # whsec_…: the signing key must be readable to sign
    events: Mapped[dict[str, Any]]  # {"types": [...]}: the event types this endpoint receives
    description: Mapped[str | None] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16))  # enabled | disabled
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]

    __table_args__ = (sa.Index("ix_webhook_endpoints_account", "account_id", "created_at"),)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    event_id: Mapped[str] = mapped_column(sa.String(64))  # the webhook-id header: stable across retries
    event_type: Mapped[str] = mapped_column(sa.String(64))
    payload: Mapped[str] = mapped_column(sa.Text)  # the exact JSON body, so every retry signs the same bytes
    status: Mapped[str] = mapped_column(sa.String(16))  # pending | delivered | failed
    attempts: Mapped[int]
    next_attempt_at: Mapped[dt.datetime]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    last_status_code: Mapped[int | None]
    created_at: Mapped[dt.datetime]
    delivered_at: Mapped[dt.datetime | None]

    __table_args__ = (
        sa.UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
        sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )


class WebhookCursor(Base):
    """How far the fan-out has read ``video_events`` (by ``seq``)."""

    __tablename__ = "webhook_cursor"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger)
