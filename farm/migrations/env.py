"""Alembic environment for the farm database (jobs, accounts, webhooks).

``farm.db.Database.migrate()`` hands over an open connection, already inside a transaction
that holds the migration lock; the ``alembic`` command line (``sqlalchemy.url`` set
in an ini file or via ``farm.db.alembic_config(url)``) opens its own.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

import farm.accounts.tables  # noqa: F401  (each room registers its tables on Base.metadata)
import farm.jobs.batch_tables  # noqa: F401
import farm.jobs.store  # noqa: F401
import farm.policy.tables  # noqa: F401
import farm.secrets  # noqa: F401
import farm.webhooks.tables  # noqa: F401
from farm.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    # Batch mode lets later revisions ALTER tables on SQLite (copy-and-move).
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url set; use farm.db.alembic_config(url)")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
