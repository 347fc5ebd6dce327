"""The job store's event log (an outbox): one row per terminal transition of a job.

``emit`` writes the event in the caller's transaction, so it commits with the transition or
not at all; the webhook fan-out (``farm.webhooks.store.WebhookStore.fan_out``) reads them in
``seq`` order with ``events_since``. Only terminal transitions are logged: completed, failed,
cancelled; a job that is merely flagged for cancellation logs nothing until its worker stops it.
The cameo store adds one more kind, ``video.cameo_used`` (``farm.policy.cameos.CharacterStore.admit``):
its ``owner`` is the cameo's owner, not the clip's, so the fan-out delivers it to that account.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import uuid

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from farm.db import utcnow
from farm.jobs.tables import EVENTS

EVENT_TYPES = {"completed": "video.completed", "failed": "video.failed", "cancelled": "video.cancelled"}


@dataclasses.dataclass(frozen=True)
class Event:
    seq: int
    id: str
    type: str
    video_id: str
    owner: str | None
    created_at: dt.datetime


def emit(conn: Connection, status: str | None, videos: builtins.list[tuple[str, str | None]]) -> None:
    """Log a terminal transition to ``status`` of ``videos`` ((id, owner) pairs) in the caller's
    transaction; anything but a terminal status logs nothing."""
    kind = EVENT_TYPES.get(status or "")
    if kind is None or not videos:
        return
    now = utcnow()
    conn.execute(sa.insert(EVENTS), [
        {"id": f"evt_{uuid.uuid4().hex}", "type": kind, "video_id": vid, "owner": owner, "created_at": now}
        for vid, owner in videos
    ])


class EventLog:
    """``JobStore``'s reading side of the outbox."""

    _engine: sa.Engine

    def events_since(self, seq: int, limit: int = 100) -> builtins.list[Event]:
        """Terminal transitions after ``seq``, oldest first (the webhook fan-out's feed)."""
        query = sa.select(EVENTS).where(EVENTS.c.seq > seq).order_by(EVENTS.c.seq).limit(limit)
        with self._engine.connect() as conn:
            return [Event(**row) for row in conn.execute(query).mappings()]
