"""The protected-name registry in the farm database: works, characters and public figures.

Who manages an entry: the operator (admin key) manages every entry; an account the operator made
a rights holder (``grant_holder``) creates works and characters under its holder name and
manages only those (``account_id`` scopes every call). Public figures are the operator's alone.
Revoking the role leaves the account's entries in force, managed by the operator from then on:
a protection does not lapse because an account changed hands.

Every write moves the one-row ``policy_version`` counter in the same transaction, so gateways
that cache the registry (``farm.policy.cache``) see a change with one primary-key read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Sequence

import sqlalchemy as sa

from farm.db import Database, unix, utcnow
from farm.policy.normalize import alias_problem, fold
from farm.policy.tables import KINDS, PolicyVersion, ProtectedName, RightsHolder

_N, _H, _V = ProtectedName.__table__, RightsHolder.__table__, PolicyVersion.__table__
HOLDER_KINDS = ("work", "character")  # what a rights holder may register; public figures are the operator's
MAX_ALIASES = 50
MAX_ALIAS_CHARS = 200
MAX_ENTRIES_PER_HOLDER = 1000


class RegistryError(ValueError):
    """A refused registry write; the message starts with the field at fault ('aliases[2]: …')."""


class NotRightsHolder(Exception):
    """The account was not granted the rights-holder role."""


class UnknownAccount(Exception):
    """No account has that id."""


@dataclasses.dataclass(frozen=True)
class ProtectedEntry:
    id: str
    kind: str
    name: str
    holder: str
    aliases: tuple[str, ...]
    account_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    def spellings(self) -> tuple[str, ...]:
        """Everything a prompt is matched against: the name and every alias."""
        return (self.name, *self.aliases)

    def to_api(self) -> dict:
        return {"id": self.id, "object": "protected_name", "kind": self.kind, "name": self.name,
                "holder": self.holder, "aliases": list(self.aliases), "account_id": self.account_id,
                "created_at": unix(self.created_at), "updated_at": unix(self.updated_at)}


@dataclasses.dataclass(frozen=True)
class HolderGrant:
    account_id: str
    holder: str
    granted_at: dt.datetime

    def to_api(self) -> dict:
        return {"object": "rights_holder", "account_id": self.account_id, "holder": self.holder,
                "granted_at": unix(self.granted_at)}


def _entry(row) -> ProtectedEntry:
    return ProtectedEntry(row["id"], row["kind"], row["name"], row["holder"], tuple(row["aliases"]),
                          row["account_id"], row["created_at"], row["updated_at"])


def _text(field: str, value: object, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or (not empty and not value.strip()):
        raise RegistryError(f"{field}: must be a string of {0 if empty else 1}..{limit} characters")
    return value.strip()


def check_kind(kind: object, allowed: Sequence[str] = KINDS) -> str:
    if kind not in allowed:
        raise RegistryError(f"kind: {kind!r} is not allowed; allowed: {', '.join(allowed)}")
    return str(kind)


def _spellings(name: str, aliases: Sequence[object]) -> tuple[str, ...]:
    """The aliases checked, trimmed, and without spellings that fold like the name or an earlier alias."""
    if not isinstance(aliases, (list, tuple)) or len(aliases) > MAX_ALIASES:
        raise RegistryError(f"aliases: must be a list of at most {MAX_ALIASES} strings")
    problem = alias_problem(name)
    if problem:
        raise RegistryError(f"name: {problem}")
    seen, kept = {fold(name)}, []
    for i, alias in enumerate(aliases):
        text = _text(f"aliases[{i}]", alias, MAX_ALIAS_CHARS)
        problem = alias_problem(text)
        if problem:
            raise RegistryError(f"aliases[{i}]: {problem}")
        if fold(text) not in seen:
            seen.add(fold(text))
            kept.append(text)
    return tuple(kept)


class PolicyStore:
    """Thread-safe; shares the farm database (``Database``) with the job and account stores."""

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.db = Database(db) if isinstance(db, str) else db
        self._clock = clock or utcnow

    # -- entries -------------------------------------------------------------------------------

    def create(self, *, kind: str, name: str, aliases: Sequence[str] = (), holder: str = "",
               account_id: str | None = None) -> ProtectedEntry:
        """A new entry. With ``account_id`` (a rights holder) only works and characters, under the
        holder name the operator granted that account; ``holder`` is then ignored."""
        kind = check_kind(kind, HOLDER_KINDS if account_id is not None else KINDS)
        name = _text("name", name, 255)
        spellings = _spellings(name, aliases)
        now = self._clock()
        with self.db.writer.begin() as conn:
            if account_id is not None:
                granted = conn.execute(sa.select(_H.c.holder).where(_H.c.account_id == account_id)).scalar()
                if granted is None:
                    raise NotRightsHolder("this account is not a rights holder")
                owned = conn.scalar(sa.select(sa.func.count()).select_from(_N).where(_N.c.account_id == account_id))
                if owned >= MAX_ENTRIES_PER_HOLDER:
                    raise RegistryError(f"name: this rights holder has {owned} entries, the most allowed; "
                                        "add aliases to existing entries or ask the operator")
                holder = granted
            row = {"id": f"pn_{uuid.uuid4().hex}", "kind": kind, "name": name,
                   "holder": _text("holder", holder, 255, empty=True), "aliases": list(spellings),
                   "account_id": account_id, "created_at": now, "updated_at": now}
            conn.execute(sa.insert(_N).values(**row))
            self._bump(conn)
        return _entry(row)

    def get(self, entry_id: str, *, account_id: str | None = None) -> ProtectedEntry | None:
        """The entry; with ``account_id`` only that rights holder's own (others are None, as if absent)."""
        query = sa.select(_N).where(_N.c.id == entry_id)
        if account_id is not None:
            query = query.where(_N.c.account_id == account_id)
        with self.db.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _entry(row) if row is not None else None

    def list(self, *, kind: str | None = None, account_id: str | None = None, after: str | None = None,
             limit: int = 100) -> tuple[list[ProtectedEntry], bool]:
        """Oldest first, a page of ``limit`` after the entry ``after``; and whether more follow."""
        query = sa.select(_N)
        if kind is not None:
            query = query.where(_N.c.kind == check_kind(kind))
        if account_id is not None:
            query = query.where(_N.c.account_id == account_id)
        with self.db.engine.connect() as conn:
            if after is not None:
                mark = conn.execute(query.where(_N.c.id == after)).mappings().first()
                if mark is None:
                    raise RegistryError(f"after: no protected name {after!r}")
                query = query.where(sa.tuple_(_N.c.created_at, _N.c.id) > (mark["created_at"], mark["id"]))
            rows = conn.execute(query.order_by(_N.c.created_at, _N.c.id).limit(limit + 1)).mappings().all()
        return [_entry(r) for r in rows[:limit]], len(rows) > limit

    def all_entries(self) -> tuple[int, list[ProtectedEntry]]:
        """The registry's version and every entry, read in one transaction (what a cache loads)."""
        with self.db.engine.begin() as conn:
            version = conn.execute(sa.select(_V.c.version).where(_V.c.id == 1)).scalar_one()
            rows = conn.execute(sa.select(_N).order_by(_N.c.created_at, _N.c.id)).mappings().all()
        return version, [_entry(r) for r in rows]

    def update(self, entry_id: str, *, name: str | None = None, aliases: Sequence[str] | None = None,
               holder: str | None = None, account_id: str | None = None) -> ProtectedEntry | None:
        """Replace the fields given (``aliases`` as a whole list); None when there is no such entry
        (for ``account_id``: none of its own). A rights holder cannot change its holder name."""
        with self.db.writer.begin() as conn:
            query = sa.select(_N).where(_N.c.id == entry_id)
            if account_id is not None:
                query = query.where(_N.c.account_id == account_id)
            row = conn.execute(query).mappings().first()
            if row is None:
                return None
            changes: dict = {"updated_at": self._clock()}
            new_name = _text("name", name, 255) if name is not None else row["name"]
            if name is not None or aliases is not None:
                changes["name"] = new_name
                changes["aliases"] = list(_spellings(new_name, row["aliases"] if aliases is None else aliases))
            if holder is not None:
                if account_id is not None:
                    raise RegistryError("holder: set by the operator when granting the rights-holder role")
                changes["holder"] = _text("holder", holder, 255, empty=True)
            conn.execute(sa.update(_N).where(_N.c.id == entry_id).values(**changes))
            self._bump(conn)
            return _entry({**row, **changes})

    def delete(self, entry_id: str, *, account_id: str | None = None) -> bool:
        with self.db.writer.begin() as conn:
            query = sa.delete(_N).where(_N.c.id == entry_id)
            if account_id is not None:
                query = query.where(_N.c.account_id == account_id)
            gone = conn.execute(query).rowcount > 0
            if gone:
                self._bump(conn)
        return gone

    def version(self) -> int:
        """Moves on every change to the registry (one primary-key read)."""
        with self.db.engine.connect() as conn:
            return conn.execute(sa.select(_V.c.version).where(_V.c.id == 1)).scalar_one()

    @staticmethod
    def _bump(conn: sa.Connection) -> None:
        conn.execute(sa.update(_V).where(_V.c.id == 1).values(version=_V.c.version + 1))

    # -- the rights-holder role ----------------------------------------------------------------

    def grant_holder(self, account_id: str, holder: str) -> HolderGrant:
        """Make the account a rights holder named ``holder`` (again: renames it; its entries follow)."""
        from farm.accounts.tables import Account

        holder = _text("holder", holder, 255)
        now = self._clock()
        with self.db.writer.begin() as conn:
            accounts = Account.__table__
            if conn.execute(sa.select(accounts.c.id).where(accounts.c.id == account_id)).first() is None:
                raise UnknownAccount(f"account_id: no account {account_id!r}")
            updated = conn.execute(sa.update(_H).where(_H.c.account_id == account_id).values(holder=holder)).rowcount
            if not updated:
                conn.execute(sa.insert(_H).values(account_id=account_id, holder=holder, granted_at=now))
            granted = conn.execute(sa.select(_H).where(_H.c.account_id == account_id)).mappings().one()
            if conn.execute(sa.update(_N).where(_N.c.account_id == account_id).values(holder=holder)).rowcount:
                self._bump(conn)
        return HolderGrant(granted["account_id"], granted["holder"], granted["granted_at"])

    def holder_of(self, account_id: str) -> HolderGrant | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(_H).where(_H.c.account_id == account_id)).mappings().first()
        return HolderGrant(row["account_id"], row["holder"], row["granted_at"]) if row is not None else None

    def list_holders(self) -> list[HolderGrant]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(sa.select(_H).order_by(_H.c.granted_at, _H.c.account_id)).mappings().all()
        return [HolderGrant(r["account_id"], r["holder"], r["granted_at"]) for r in rows]

    def revoke_holder(self, account_id: str) -> bool:
        """Take the role away; the account's entries stay in force, managed by the operator."""
        with self.db.writer.begin() as conn:
            gone = conn.execute(sa.delete(_H).where(_H.c.account_id == account_id)).rowcount > 0
            if conn.execute(sa.update(_N).where(_N.c.account_id == account_id).values(account_id=None)).rowcount:
                self._bump(conn)
        return gone
