"""Accounts, API keys and invites in the farm database.

The operator makes invites; redeeming one creates an account and its first key in one
transaction, so an invite can never open two accounts. Keys are checked on every request
(no cache), so a revoked key stops working at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Callable

import sqlalchemy as sa

from farm.accounts import keys
from farm.accounts.tables import Account, ApiKey, Invite
from farm.db import Database, unix, utcnow

log = logging.getLogger(__name__)
_A, _K, _I = Account.__table__, ApiKey.__table__, Invite.__table__
DEFAULT_INVITE_TTL_S = 7 * 24 * 3600
MAX_INVITE_TTL_S = 365 * 24 * 3600
# last_used_at is for people reading a key list; writing it on every request would make
# every read a write, so it is refreshed at most this often.
_LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
MAX_KEYS_PER_ACCOUNT = 100


class InviteRefused(ValueError):
    """The code is unknown, already used, or expired (one message for all: nothing to probe)."""


class TooManyKeys(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request is: the account, and the key it came with."""

    account_id: str
    key_id: str


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    id: str
    account_id: str
    name: str
    hint: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    def to_api(self) -> dict:
        return {"id": self.id, "object": "api_key", "name": self.name, "hint": self.hint,
                "created_at": unix(self.created_at), "last_used_at": unix(self.last_used_at),
                "revoked_at": unix(self.revoked_at), "status": "revoked" if self.revoked_at else "active"}


@dataclasses.dataclass(frozen=True)
class InviteInfo:
    id: str
    note: str
    created_at: dt.datetime
    expires_at: dt.datetime
    redeemed_at: dt.datetime | None
    account_id: str | None

    def status(self, now: dt.datetime) -> str:
        if self.redeemed_at is not None:
            return "redeemed"
        return "expired" if self.expires_at <= now else "open"

    def to_api(self, now: dt.datetime) -> dict:
        return {"id": self.id, "object": "invite", "note": self.note, "created_at": unix(self.created_at),
                "expires_at": unix(self.expires_at), "redeemed_at": unix(self.redeemed_at),
                "account_id": self.account_id, "status": self.status(now)}


@dataclasses.dataclass(frozen=True)
class AccountInfo:
    id: str
    name: str
    created_at: dt.datetime

    def to_api(self) -> dict:
        return {"id": self.id, "object": "account", "name": self.name, "created_at": unix(self.created_at)}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class AccountStore:
    """Thread-safe; shares the farm database (``Database``) with the job store."""

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.db = Database(db) if isinstance(db, str) else db
        self._clock = clock or utcnow

    def now(self) -> dt.datetime:
        return self._clock()

    # -- invites (operator) ----------------------------------------------------------------

    def create_invite(self, note: str = "", ttl_s: float = DEFAULT_INVITE_TTL_S) -> tuple[InviteInfo, str]:
        """A single-use invite; returns it and its code (shown once, stored only as a hash)."""
        if not isinstance(ttl_s, (int, float)) or not 60 <= ttl_s <= MAX_INVITE_TTL_S:
            raise ValueError(f"expires_in: {ttl_s!r} seconds is out of range; allowed: 60..{MAX_INVITE_TTL_S}")
        if not isinstance(note, str) or len(note) > 255:
            raise ValueError("note: must be a string of at most 255 characters")
        code, now = keys.new_secret(keys.INVITE_PREFIX), self._clock()
        row = {"id": _new_id("inv"), "code_hash": keys.digest(code), "note": note, "created_at": now,
               "expires_at": now + dt.timedelta(seconds=ttl_s), "redeemed_at": None, "account_id": None}
        with self.db.writer.begin() as conn:
            conn.execute(sa.insert(_I).values(**row))
        return _invite(row), code

    def list_invites(self, limit: int = 100) -> list[InviteInfo]:
        query = sa.select(_I).order_by(_I.c.created_at.desc()).limit(limit)
        with self.db.engine.connect() as conn:
            return [_invite(r) for r in conn.execute(query).mappings()]

    def redeem(self, code: str, account_name: str, key_name: str = "default") -> tuple[AccountInfo, KeyInfo, str]:
        """Spend an invite: a new account and its first key (returned with the secret, once)."""
        now = self._clock()
        with self.db.writer.begin() as conn:
            # One UPDATE decides: of two concurrent redeemers, exactly one changes the row.
            spent = conn.execute(
                sa.update(_I)
                .where(_I.c.code_hash == keys.digest(code), _I.c.redeemed_at.is_(None), _I.c.expires_at > now)
                .values(redeemed_at=now)
                .returning(_I.c.id)
            ).first()
            if spent is None:
                raise InviteRefused("code: this invite code is not valid (unknown, already used, or expired)")
            account = {"id": _new_id("acct"), "name": account_name, "created_at": now, "invite_id": spent.id}
            conn.execute(sa.insert(_A).values(**account))
            conn.execute(sa.update(_I).where(_I.c.id == spent.id).values(account_id=account["id"]))
            key, secret = self._insert_key(conn, account["id"], key_name, now)
        return AccountInfo(account["id"], account_name, now), key, secret

    # -- keys (tenants) ----------------------------------------------------------------------

    def authenticate(self, secret: str) -> Principal | None:
        """The key's principal, or None for an unknown or revoked key."""
        if not secret.startswith(keys.API_KEY_PREFIX) or len(secret) > 200:
            return None
        with self.db.engine.connect() as conn:
            row = conn.execute(
                sa.select(_K.c.id, _K.c.account_id, _K.c.last_used_at)
                .where(_K.c.secret_hash == keys.digest(secret), _K.c.revoked_at.is_(None))
            ).first()
        if row is None:
            return None
        now = self._clock()
        if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
            try:  # a hint for people reading key lists: never worth failing the request over
                with self.db.engine.begin() as conn:
                    conn.execute(sa.update(_K).where(_K.c.id == row.id).values(last_used_at=now))
            except sa.exc.SQLAlchemyError:
                log.warning("could not record last use of key %s", row.id, exc_info=True)
        return Principal(row.account_id, row.id)

    def revocation_version(self) -> tuple[int, int, int | None]:
        """Changes whenever a key stops being valid (revoked, or removed with its account): gateways
        that cache keys compare it to drop their caches. Keys are never un-revoked, so (keys,
        revoked keys, newest revocation) moves on every such change."""
        query = sa.select(sa.func.count(), sa.func.count(_K.c.revoked_at), sa.func.max(_K.c.revoked_at))
        with self.db.engine.connect() as conn:
            keys, revoked, newest = conn.execute(query).one()
        return keys, revoked, None if newest is None else int(newest.timestamp() * 1_000_000)

    def create_key(self, account_id: str, name: str = "default") -> tuple[KeyInfo, str]:
        with self.db.writer.begin() as conn:
            active = conn.scalar(sa.select(sa.func.count()).select_from(_K)
                                 .where(_K.c.account_id == account_id, _K.c.revoked_at.is_(None)))
            if active >= MAX_KEYS_PER_ACCOUNT:
                raise TooManyKeys(f"this account has {active} active keys, the most allowed; revoke one first")
            return self._insert_key(conn, account_id, name, self._clock())

    def list_keys(self, account_id: str) -> list[KeyInfo]:
        query = sa.select(_K).where(_K.c.account_id == account_id).order_by(_K.c.created_at, _K.c.id)
        with self.db.engine.connect() as conn:
            return [_key(r) for r in conn.execute(query).mappings()]

    def revoke_key(self, account_id: str, key_id: str) -> KeyInfo | None:
        """Revoke one of the account's keys (idempotent); None when it has no such key."""
        now = self._clock()
        with self.db.writer.begin() as conn:
            conn.execute(sa.update(_K).where(_K.c.id == key_id, _K.c.account_id == account_id,
                                             _K.c.revoked_at.is_(None)).values(revoked_at=now))
            row = conn.execute(sa.select(_K).where(_K.c.id == key_id, _K.c.account_id == account_id)).mappings().first()
        return _key(row) if row is not None else None

    def account(self, account_id: str) -> AccountInfo | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(_A).where(_A.c.id == account_id)).mappings().first()
        return AccountInfo(row["id"], row["name"], row["created_at"]) if row is not None else None

    def list_accounts(self, limit: int = 100) -> list[AccountInfo]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(sa.select(_A).order_by(_A.c.created_at.desc()).limit(limit)).mappings()
            return [AccountInfo(r["id"], r["name"], r["created_at"]) for r in rows]

    @staticmethod
    def _insert_key(conn: sa.Connection, account_id: str, name: str, now: dt.datetime) -> tuple[KeyInfo, str]:
        if not isinstance(name, str) or not 1 <= len(name) <= 255:
            raise ValueError("name: must be 1..255 characters")
        secret = keys.new_secret(keys.API_KEY_PREFIX)
        row = {"id": _new_id("key"), "account_id": account_id, "name": name, "secret_hash": keys.digest(secret),
               "hint": keys.hint(secret), "created_at": now, "last_used_at": None, "revoked_at": None}
        conn.execute(sa.insert(_K).values(**row))
        return _key(row), secret


def _key(row) -> KeyInfo:
    return KeyInfo(row["id"], row["account_id"], row["name"], row["hint"], row["created_at"],
                   row["last_used_at"], row["revoked_at"])


def _invite(row) -> InviteInfo:
    return InviteInfo(row["id"], row["note"], row["created_at"], row["expires_at"], row["redeemed_at"],
                      row["account_id"])
