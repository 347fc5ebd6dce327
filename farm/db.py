"""The farm's one SQL database: jobs, accounts and webhooks share it, each room its own tables.

Backends: a SQLite file by default (WAL, so several processes share it) and PostgreSQL by
URL (``postgresql+psycopg://...``). Read-then-write transactions take the write lock first:

- SQLite: write transactions (``Database.writer``) start with ``BEGIN IMMEDIATE``, taking the
  file's single write lock up front (a deferred BEGIN fails with SQLITE_BUSY when its read
  snapshot goes stale).
- PostgreSQL: rows with ``SELECT ... FOR UPDATE [SKIP LOCKED]``; check-then-insert sequences
  with a transaction-level advisory lock (``Database.pg_lock``).

Times are integer microseconds since the Unix epoch (UTC) in BIGINT columns, surfacing as
timezone-aware datetimes: they sort and compare identically on both backends. One Alembic
history (``farm/migrations``) covers every table.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_S = 30.0
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# PostgreSQL advisory-lock keys: arbitrary constants that only this farm uses.
LOCK_MIGRATE = 0x7666_0001


class UtcMicros(sa.TypeDecorator[dt.datetime]):
    """A timezone-aware datetime stored as BIGINT microseconds since the epoch."""

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> int | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the database needs timezone-aware times")
        return (value - _EPOCH) // dt.timedelta(microseconds=1)

    def process_result_value(self, value: int | None, dialect: sa.Dialect) -> dt.datetime | None:
        return None if value is None else _EPOCH + dt.timedelta(microseconds=value)


JSON = sa.JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UtcMicros(), dict[str, Any]: JSON}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def unix(when: dt.datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


def sqlite_url(path: str | Path) -> str:
    """The SQLAlchemy URL of a SQLite database file."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def alembic_config(url: str | None = None):  # -> alembic.config.Config
    """An Alembic config for the farm's migrations, without an alembic.ini.

    Also for developers: ``command.revision(alembic_config(url), "msg", autogenerate=True)``.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # configparser interpolates '%', which URL-encoded passwords contain.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


class Database:
    """An engine for one database URL, plus a writer that takes the write lock up front."""

    def __init__(self, url: str) -> None:
        parsed = sa.make_url(url)
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(
                f"database url: backend {backend!r} is not supported; use sqlite:///PATH or postgresql+psycopg://..."
            )
        self.url = parsed
        self.sqlite = backend == "sqlite"
        connect_args = {"timeout": SQLITE_BUSY_S} if self.sqlite else {}
        self.engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        if self.sqlite:
            _install_sqlite_hooks(self.engine)
        # Same pool; the option tells the SQLite begin hook to take the write lock up front.
        self.writer = self.engine.execution_options(farm_write=True)

    def migrate(self) -> None:
        """Bring the schema to the newest revision; idempotent, safe to run concurrently."""
        from alembic import command

        cfg = alembic_config()
        with self.writer.begin() as conn:
            # SQLite: BEGIN IMMEDIATE already serialises concurrent migrators.
            self.pg_lock(conn, LOCK_MIGRATE)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def pg_lock(self, conn: Connection, key: int) -> None:
        """A transaction-level advisory lock on PostgreSQL; SQLite's BEGIN IMMEDIATE already excludes writers."""
        if not self.sqlite:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))

    def close(self) -> None:
        self.engine.dispose()


def _install_sqlite_hooks(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # SQLAlchemy emits BEGIN itself (below); the sqlite3 module's own implicit
        # BEGIN would skip SELECTs and DDL and could not be IMMEDIATE.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_S * 1000)}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("farm_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _enable_wal(cursor: Any) -> None:
    """Switch the file to WAL (a persistent setting), waiting out other connections.

    The switch needs an exclusive lock and SQLite fails it at once, without calling
    the busy handler, while another connection is mid-transaction: retry until the
    busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_S
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        if mode.lower() != "wal":  # an in-memory database: one connection, nothing to share
            log.warning("SQLite journal_mode is %r, not WAL: other processes cannot share this store", mode)
            return
