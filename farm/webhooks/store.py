"""Webhook endpoints per account, and the delivery outbox the deliverer drains.

Endpoints are scoped by account: every read and write names the account, and another
account's endpoint is "not found". Deliveries are created by :meth:`WebhookStore.fan_out`
from the job store's event log (``video_events``), one per (event, subscribed endpoint); the
unique (endpoint, event) pair makes fan-out idempotent, so it can re-read recent events freely.

Delivery lifecycle: ``pending`` → (``due`` claims it for a short lease) → ``delivered``, or
``pending`` again with a later ``next_attempt_at`` (``mark_retry``), or ``failed`` after the
last attempt (``mark_failed``). A deliverer that dies mid-attempt loses only its lease: the
row comes due again, so every event reaches every subscribed endpoint at least once.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from farm.db import Database, unix, utcnow
from farm.webhooks.signing import generate_secret, secret_hint
from farm.webhooks.tables import WebhookCursor, WebhookDelivery, WebhookEndpoint

if TYPE_CHECKING:
    from farm.jobs.store import Event, JobStore

# video.cancelled and video.cameo_used (to a cameo's owner: another account's clip used it; data.id is
# that clip) are farm extensions: OpenAI's API sends only the first two.
EVENT_TYPES = ("video.completed", "video.failed", "video.cancelled", "video.cameo_used")
STATUSES = ("enabled", "disabled")
MAX_NAME_CHARS = 256
MAX_ERROR_CHARS = 1000
CURSOR_NAME = "video_events"
# PostgreSQL advisory-lock key (an arbitrary constant only this store uses): serialises
# the endpoint-count check with the insert.
_LOCK_ENDPOINTS = 0x7666_0101

_EP = WebhookEndpoint.__table__
_D = WebhookDelivery.__table__
_K = WebhookCursor.__table__


class TooManyEndpoints(ValueError):
    """The account already has the most endpoints it may register."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    id: str
    account_id: str
    url: str
    secret: str
    event_types: tuple[str, ...]
    name: str
    status: str
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> Endpoint:
        return cls(
            id=row["id"], account_id=row["account_id"], url=row["url"], secret=row["secret"],
            event_types=tuple((row["events"] or {}).get("types", ())), name=row["description"] or "",
            status=row["status"], created_at=row["created_at"], updated_at=row["updated_at"],
        )

    def to_openai(self, *, with_secret: bool = False) -> dict[str, Any]:
        """The SDK's ``WebhookEndpoint`` (``WebhookEndpointWithSecret`` with the secret);
        farm extension: ``status``."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "webhook_endpoint",
            "created_at": unix(self.created_at),
            "updated_at": unix(self.updated_at),
            "event_types": list(self.event_types),
            "name": self.name,
            "url": self.url,
            "signing_secret_hint": secret_hint(self.secret),
            "status": self.status,
        }
        if with_secret:
            body["signing_secret"] = self.secret
        return body


@dataclasses.dataclass(frozen=True)
class DueDelivery:
    """A claimed delivery with what it takes to send it (the endpoint's current URL and secret)."""

    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    payload: str
    attempts: int  # attempts made before this one
    url: str
    secret: str


@dataclasses.dataclass(frozen=True)
class Delivery:
    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    payload: str
    status: str
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None
    last_status_code: int | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None


def payload_json(*, event_id: str, event_type: str, video_id: str, created_at: dt.datetime) -> str:
    """The exact body of an event: OpenAI's event object, as minimal as OpenAI's (``data.id`` only)."""
    body = {"id": event_id, "object": "event", "created_at": unix(created_at), "type": event_type,
            "data": {"id": video_id}}
    return json.dumps(body, separators=(",", ":"))


def event_payload(event: Event) -> str:
    return payload_json(event_id=event.id, event_type=event.type, video_id=event.video_id,
                        created_at=event.created_at)


def check_event_types(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"event_types: {value!r} must be a list; allowed values: {', '.join(EVENT_TYPES)}")
    types = tuple(dict.fromkeys(value))
    if not types:
        raise ValueError(f"event_types: must name at least one of {', '.join(EVENT_TYPES)}")
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise ValueError(f"event_types: {unknown[0]!r} is not sent by this farm; allowed: {', '.join(EVENT_TYPES)}")
    return types


def check_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("name: must be a non-empty string")
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"name: is {len(value)} characters long; allowed: at most {MAX_NAME_CHARS}")
    if "\x00" in value or not _utf8(value):
        raise ValueError("name: must be valid Unicode text without NUL characters")
    return value


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates (JSON allows "\ud800") cannot be stored
    except UnicodeEncodeError:
        return False
    return True


def check_status(value: Any) -> str:
    if value not in STATUSES:
        raise ValueError(f"status: {value!r} is not allowed; use one of {', '.join(STATUSES)}")
    return value


class WebhookStore:
    """Endpoints and deliveries in the farm's SQL database; thread-safe, shareable between processes.

    The store does not check URLs: callers pass them through the SSRF guard first.
    """

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        """``db``: a URL, or a ``Database`` shared with the other stores of this process.
        ``clock`` (timezone-aware UTC now) is for tests that move time forward."""
        self._db = Database(db) if isinstance(db, str) else db
        self._clock = clock or utcnow

    def __repr__(self) -> str:
        return f"WebhookStore({self._db.url.render_as_string(hide_password=True)!r})"

    def migrate(self) -> None:
        self._db.migrate()

    def close(self) -> None:
        self._db.close()

    # -- endpoints (the API's side) -------------------------------------------------------

    def create(
        self, account_id: str, *, url: str, event_types: Sequence[str], name: str,
        max_endpoints: int | None = None,
    ) -> Endpoint:
        """A new enabled endpoint with a fresh secret; TooManyEndpoints past ``max_endpoints``."""
        types, name = check_event_types(event_types), check_name(name)
        now = self._clock()
        row = {
            "id": f"we_{uuid.uuid4().hex}", "account_id": account_id, "url": url, "secret": generate_secret(),
            "events": {"types": list(types)}, "description": name, "status": "enabled",
            "created_at": now, "updated_at": now,
        }
        with self._db.writer.begin() as conn:
            if max_endpoints is not None:
                self._db.pg_lock(conn, _LOCK_ENDPOINTS)
                count = conn.scalar(sa.select(sa.func.count()).select_from(_EP).where(_EP.c.account_id == account_id))
                if count >= max_endpoints:
                    raise TooManyEndpoints(
                        f"this account already has {count} webhook endpoints; allowed: at most {max_endpoints}"
                    )
            conn.execute(sa.insert(_EP).values(**row))
        return Endpoint.from_row(row)

    def get(self, account_id: str, endpoint_id: str) -> Endpoint | None:
        with self._db.engine.connect() as conn:
            row = conn.execute(sa.select(_EP).where(_mine(account_id, endpoint_id))).mappings().first()
        return Endpoint.from_row(row) if row is not None else None

    def list(
        self, account_id: str, *, after: str | None = None, limit: int = 20
    ) -> tuple[builtins.list[Endpoint], bool]:
        """A page of the account's endpoints, newest first, and whether more follow."""
        if not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ValueError(f"limit: {limit!r} is out of range; allowed: 1..100")
        query = sa.select(_EP).where(_EP.c.account_id == account_id)
        with self._db.engine.connect() as conn:
            if after is not None:
                cursor = conn.execute(sa.select(_EP.c.created_at, _EP.c.id).where(_mine(account_id, after))).first()
                if cursor is None:
                    raise ValueError(f"after: no webhook endpoint {after!r}")
                at, last = cursor
                query = query.where(sa.or_(_EP.c.created_at < at, sa.and_(_EP.c.created_at == at, _EP.c.id < last)))
            query = query.order_by(_EP.c.created_at.desc(), _EP.c.id.desc()).limit(limit + 1)
            rows = conn.execute(query).mappings().all()
        return [Endpoint.from_row(r) for r in rows[:limit]], len(rows) > limit

    def update(
        self, account_id: str, endpoint_id: str, *, url: str | None = None,
        event_types: Sequence[str] | None = None, name: str | None = None, status: str | None = None,
    ) -> Endpoint | None:
        """Change the given fields; ``updated_at`` moves only when something changed."""
        changes: dict[str, Any] = {}
        if url is not None:
            changes["url"] = url
        if event_types is not None:
            changes["events"] = {"types": list(check_event_types(event_types))}
        if name is not None:
            changes["description"] = check_name(name)
        if status is not None:
            changes["status"] = check_status(status)
        with self._db.writer.begin() as conn:
            row = conn.execute(sa.select(_EP).where(_mine(account_id, endpoint_id)).with_for_update()).mappings().first()
            if row is None:
                return None
            changes = {k: v for k, v in changes.items() if row[k] != v}
            if not changes:
                return Endpoint.from_row(row)
            changes["updated_at"] = self._clock()
            conn.execute(sa.update(_EP).where(_EP.c.id == endpoint_id).values(**changes))
        return Endpoint.from_row({**row, **changes})

    def rotate_secret(self, account_id: str, endpoint_id: str) -> Endpoint | None:
        """A new secret, effective at once: pending retries are signed with it too."""
        changes = {"secret": generate_secret(), "updated_at": self._clock()}
        with self._db.writer.begin() as conn:
            row = conn.execute(
                sa.update(_EP).where(_mine(account_id, endpoint_id)).values(**changes).returning(*_EP.c)
            ).mappings().first()
        return Endpoint.from_row(row) if row is not None else None

    def delete(self, account_id: str, endpoint_id: str) -> bool:
        """Remove the endpoint and (by cascade) its deliveries."""
        with self._db.writer.begin() as conn:
            return conn.execute(sa.delete(_EP).where(_mine(account_id, endpoint_id))).rowcount > 0

    # -- fan-out: events → deliveries ----------------------------------------------------------

    def cursor(self) -> int:
        with self._db.engine.connect() as conn:
            return conn.scalar(sa.select(_K.c.seq).where(_K.c.name == CURSOR_NAME)) or 0

    def fan_out(self, jobs: JobStore, *, settle_s: float = 30.0, limit: int = 500) -> int:
        """Create a delivery for each new event and each endpoint (enabled or not) of its owner that
        subscribes to its type; returns how many were created.

        The cursor moves only past events older than ``settle_s``: younger ones are read
        again next time (the unique (endpoint, event) pair drops the repeats), because on
        PostgreSQL an event with a lower ``seq`` can commit after one with a higher ``seq``.
        Safe to run concurrently: repeats are dropped and the cursor only moves forward.
        """
        start = self.cursor()
        events = jobs.events_since(start, limit)
        if not events:
            return 0
        settled_before = self._clock() - dt.timedelta(seconds=settle_s)
        new_cursor = start
        for event in events:
            if event.created_at > settled_before:
                break
            new_cursor = event.seq
        now = self._clock()
        created = 0
        with self._db.writer.begin() as conn:
            owners = {e.owner for e in events if e.owner is not None}
            endpoints = self._subscribers(conn, owners)
            for event in events:
                payload = event_payload(event)
                for endpoint in endpoints.get(event.owner, ()):
                    if event.type not in endpoint.event_types:
                        continue
                    row = {
                        "id": f"wdl_{uuid.uuid4().hex}", "endpoint_id": endpoint.id, "event_id": event.id,
                        "event_type": event.type, "payload": payload, "status": "pending", "attempts": 0,
                        "next_attempt_at": now, "created_at": now,
                    }
                    insert = self._insert_ignore(_D, ("endpoint_id", "event_id")).values(**row)
                    # RETURNING yields the row only when it was inserted (rowcount is -1 on psycopg here).
                    created += len(conn.execute(insert.returning(_D.c.id)).all())
            if new_cursor > start:
                self._advance_cursor(conn, new_cursor)
        return created

    def _subscribers(self, conn: Connection, owners: set[str]) -> dict[str, builtins.list[Endpoint]]:
        if not owners:
            return {}
        rows = conn.execute(
            # Disabled endpoints too: their deliveries wait, pending, and go out once re-enabled.
            sa.select(_EP).where(_EP.c.account_id.in_(sorted(owners)))
        ).mappings()
        by_owner: dict[str, builtins.list[Endpoint]] = {}
        for row in rows:
            by_owner.setdefault(row["account_id"], []).append(Endpoint.from_row(row))
        return by_owner

    def _advance_cursor(self, conn: Connection, seq: int) -> None:
        stmt = self._insert_ignore(_K, ("name",)).values(name=CURSOR_NAME, seq=seq)
        conn.execute(stmt)
        # Forward only: a concurrent fan-out may already have moved it further.
        conn.execute(sa.update(_K).where(_K.c.name == CURSOR_NAME, _K.c.seq < seq).values(seq=seq))

    def _insert_ignore(self, table: sa.Table, keys: tuple[str, ...]):
        dialect = sqlite if self._db.sqlite else postgresql
        return dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys))

    # -- deliveries (the deliverer's side) ------------------------------------------------------

    def due(self, limit: int, *, lease_s: float) -> builtins.list[DueDelivery]:
        """Claim up to ``limit`` pending deliveries whose time has come, for ``lease_s``:
        other deliverers skip them meanwhile, and they come due again if this one dies."""
        now = self._clock()
        query = (
            sa.select(_D.c.id, _D.c.endpoint_id, _D.c.event_id, _D.c.event_type, _D.c.payload, _D.c.attempts,
                      _EP.c.url, _EP.c.secret)
            .join(_EP, _EP.c.id == _D.c.endpoint_id)
            # A disabled endpoint's deliveries wait, pending, until it is enabled again.
            .where(_D.c.status == "pending", _D.c.next_attempt_at <= now, _EP.c.status == "enabled")
            .order_by(_D.c.next_attempt_at, _D.c.id)
            .limit(limit)
            .with_for_update(of=_D, skip_locked=True)
        )
        with self._db.writer.begin() as conn:
            rows = conn.execute(query).mappings().all()
            if rows:
                conn.execute(
                    sa.update(_D).where(_D.c.id.in_([r["id"] for r in rows]))
                    .values(next_attempt_at=now + dt.timedelta(seconds=lease_s))
                )
        return [DueDelivery(**r) for r in rows]

    def backlog(self) -> int:
        """Pending deliveries whose attempt time has passed on enabled endpoints: due, and not
        claimed (``due`` moves a claimed one's time past its lease)."""
        query = (
            sa.select(sa.func.count()).select_from(_D).join(_EP, _EP.c.id == _D.c.endpoint_id)
            .where(_D.c.status == "pending", _D.c.next_attempt_at <= self._clock(), _EP.c.status == "enabled")
        )
        with self._db.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def mark_delivered(self, delivery_id: str, *, status_code: int) -> None:
        self._mark(delivery_id, status="delivered", last_status_code=status_code, delivered_at=self._clock())

    def mark_retry(
        self, delivery_id: str, *, next_at: dt.datetime, error: str, status_code: int | None = None
    ) -> None:
        self._mark(delivery_id, next_attempt_at=next_at, last_error=error[:MAX_ERROR_CHARS],
                   last_status_code=status_code)

    def mark_failed(self, delivery_id: str, *, error: str, status_code: int | None = None) -> None:
        self._mark(delivery_id, status="failed", last_error=error[:MAX_ERROR_CHARS], last_status_code=status_code)

    def _mark(self, delivery_id: str, **changes: Any) -> None:
        with self._db.writer.begin() as conn:
            conn.execute(
                sa.update(_D).where(_D.c.id == delivery_id, _D.c.status == "pending")
                .values(attempts=_D.c.attempts + 1, **changes)
            )

    # -- inspection (operators, tests) ----------------------------------------------------------

    def deliveries(self, *, endpoint_id: str | None = None, event_id: str | None = None) -> builtins.list[Delivery]:
        query = sa.select(_D).order_by(_D.c.created_at, _D.c.id)
        if endpoint_id is not None:
            query = query.where(_D.c.endpoint_id == endpoint_id)
        if event_id is not None:
            query = query.where(_D.c.event_id == event_id)
        with self._db.engine.connect() as conn:
            return [Delivery(**row) for row in conn.execute(query).mappings()]


def _mine(account_id: str, endpoint_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(_EP.c.id == endpoint_id, _EP.c.account_id == account_id)
