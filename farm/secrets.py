"""Values every node of the farm must agree on, kept in the farm's database (the job store's).

The operator's admin key and the development C2PA signing credentials used to be generated per
state folder, that is per node: with gateways or finishers on two nodes an admin call succeeded
or failed depending on which replica answered, and clips were signed by different dev CAs.
Now the first process that needs a value makes it and stores it (insert if absent); every other
process, on any node, reads the stored one. A value is replaced only by compare-and-set, so two
processes renewing at once agree on one winner.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Mapped, mapped_column

from farm.db import Base, Database, utcnow


class FarmSecret(Base):
    __tablename__ = "farm_secrets"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(sa.LargeBinary)
    updated_at: Mapped[dt.datetime]


_S = FarmSecret.__table__


class SharedSecrets:
    """``get_or_create(name, make)`` and ``replace(name, old, new)`` over the ``farm_secrets`` table."""

    def __init__(self, db: Database | str) -> None:
        self.db = db if isinstance(db, Database) else Database(db)

    def get(self, name: str) -> bytes | None:
        with self.db.engine.connect() as conn:
            return conn.scalar(sa.select(_S.c.value).where(_S.c.name == name))

    def get_or_create(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The farm's value of ``name``; made by ``make`` (and stored) if no process stored one yet."""
        found = self.get(name)
        if found is not None:
            return found
        dialect = sqlite_dialect if self.db.sqlite else postgresql
        with self.db.writer.begin() as conn:
            conn.execute(dialect.insert(_S).values(name=name, value=make(), updated_at=utcnow())
                         .on_conflict_do_nothing(index_elements=[_S.c.name]))
        return self.get(name)  # ours, or the one another process stored first

    def replace(self, name: str, old: bytes, new: bytes) -> bytes:
        """Store ``new`` if the value is still ``old``; returns the value that stands."""
        with self.db.writer.begin() as conn:
            conn.execute(sa.update(_S).where(_S.c.name == name, _S.c.value == old)
                         .values(value=new, updated_at=utcnow()))
        return self.get(name)
