"""Drafts and sharing: who besides its owner may see a video.

A new video is a private draft: only its owner sees it. The owner can

- share it with named accounts (``video_shares``): they may retrieve it, follow its events,
  download every variant and remix it (the remix is theirs, a private draft of their own), but
  not delete, cancel or re-share it;
- publish unlisted links (``video_links``): anyone holding a link's token may retrieve the
  video and download its variants without an API key, until the owner revokes the link.

The owner of a cameo (``farm.policy.cameos``) may retrieve, download and delete every clip that
used it (``character_uses``), drafts of other accounts included: ``readable`` and
``cameo_owner_may_delete`` grant that here, so it is one more reason to read, not another path.

``videos.visibility`` says which applies — ``unlisted`` while a link is live, else ``shared``
while any account holds a share, else ``private`` — and is rewritten in the same transaction
as every share or link change, so reading a video costs no extra query. Tokens are
``vf_share_`` + 256 random bits; only their SHA-256 is stored (``farm.accounts.keys``).
Nothing here re-renders: every path serves the same stored, watermarked, signed objects.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from farm.accounts import keys
from farm.accounts.tables import Account
from farm.db import Database, unix, utcnow
from farm.jobs.job import Job
from farm.jobs.sharing_tables import LINKS, SHARES
from farm.jobs.tables import VIDEOS
from farm.policy.cameo_tables import CHARACTERS, USES

LINK_PREFIX = "vf_share_"
MAX_SHARES_PER_VIDEO = 100
MAX_LIVE_LINKS_PER_VIDEO = 20
_V, _C, _S, _L = VIDEOS, VIDEOS.c, SHARES.c, LINKS.c
_A = Account.__table__


class SharingRefused(ValueError):
    """A share or link the store will not make; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclasses.dataclass(frozen=True)
class Share:
    video_id: str
    account_id: str
    account_name: str
    created_at: dt.datetime

    def to_api(self) -> dict:
        return {"object": "video.share", "video_id": self.video_id, "account_id": self.account_id,
                "account_name": self.account_name, "created_at": unix(self.created_at)}


@dataclasses.dataclass(frozen=True)
class Link:
    id: str
    video_id: str
    hint: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    def to_api(self) -> dict:
        return {"id": self.id, "object": "video.link", "video_id": self.video_id, "hint": self.hint,
                "created_at": unix(self.created_at), "revoked_at": unix(self.revoked_at),
                "status": "revoked" if self.revoked_at else "active"}


class SharingStore:
    """Shares and links over the farm database (``Database``, shared with the job store)."""

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.db = Database(db) if isinstance(db, str) else db
        self._clock = clock or utcnow

    # -- reading with access -----------------------------------------------------------------

    def readable(self, video_id: str, account: str | None) -> Job | None:
        """The video if ``account`` owns it, it was shared with ``account`` or it used a cameo of
        ``account``'s; None otherwise (``account=None``: no accounts, one anonymous tenant, which
        sees every video)."""
        query = sa.select(_V).where(_C.id == video_id)
        if account is not None:
            shared = sa.exists().where(_S.video_id == _C.id, _S.account_id == account)
            query = query.where(sa.or_(_C.owner == account, shared, _used_cameo_of(account)))
        with self.db.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return Job.from_row(row) if row is not None else None

    def cameo_owner_may_delete(self, video_id: str, account: str) -> bool:
        """Whether the video used a cameo of ``account``'s (its owner may delete it, though not its maker)."""
        with self.db.engine.connect() as conn:
            return conn.execute(sa.select(_C.id).where(_C.id == video_id, _used_cameo_of(account))).first() is not None

    def by_token(self, token: str) -> tuple[Job, Link] | None:
        """The video a live link's token opens, and the link; None for unknown or revoked tokens."""
        if not isinstance(token, str) or not token.startswith(LINK_PREFIX) or len(token) > 200:
            return None
        query = (sa.select(_V, _L.id.label("link_id"), _L.hint, _L.created_at.label("link_created_at"))
                 .join(LINKS, _L.video_id == _C.id)
                 .where(_L.token_hash == keys.digest(token), _L.revoked_at.is_(None)))
        with self.db.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return Job.from_row(row), Link(row["link_id"], row["id"], row["hint"], row["link_created_at"], None)

    def list_shared_with(self, account: str, *, after: str | None = None, limit: int = 20,
                         order: str = "desc") -> tuple[builtins.list[Job], bool]:
        """A page of the videos shared with ``account``, by when each was shared (cursor: a video id)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order: {order!r} is not allowed; use 'asc' or 'desc'")
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit: {limit!r} is out of range; allowed: 1..1000")
        query = sa.select(_V).join(SHARES, _S.video_id == _C.id).where(_S.account_id == account)
        with self.db.engine.connect() as conn:
            if after is not None:
                cursor = conn.execute(sa.select(_S.created_at, _S.video_id)
                                      .where(_S.account_id == account, _S.video_id == after)).first()
                if cursor is None:
                    raise ValueError(f"after: no video {after!r} shared with you")
                at, last = cursor
                newer = sa.or_(_S.created_at > at, sa.and_(_S.created_at == at, _S.video_id > last))
                older = sa.or_(_S.created_at < at, sa.and_(_S.created_at == at, _S.video_id < last))
                query = query.where(newer if order == "asc" else older)
            keys_ = (_S.created_at.asc(), _S.video_id.asc()) if order == "asc" else (_S.created_at.desc(),
                                                                                    _S.video_id.desc())
            rows = conn.execute(query.order_by(*keys_).limit(limit + 1)).mappings().all()
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit

    # -- shares (the owner) ------------------------------------------------------------------

    def find_account(self, conn: Connection, ref: str) -> tuple[str, str] | None:
        """(id, name) of the account ``ref`` names, by id or else by name; SharingRefused when a
        name is held by several accounts (the caller must use the id)."""
        row = conn.execute(sa.select(_A.c.id, _A.c.name).where(_A.c.id == ref)).first()
        if row is not None:
            return row.id, row.name
        rows = conn.execute(sa.select(_A.c.id, _A.c.name).where(_A.c.name == ref).limit(2)).all()
        if len(rows) > 1:
            raise SharingRefused(f"account: several accounts are named {ref!r}; give the account id (acct_…)",
                                 "account", "ambiguous_account")
        return (rows[0].id, rows[0].name) if rows else None

    def share(self, video_id: str, owner: str, account_ref: str) -> Share | None:
        """Share the owner's video with an account (idempotent); None when the owner has no such video."""
        if not isinstance(account_ref, str) or not 1 <= len(account_ref) <= 255:
            raise SharingRefused("account: must be an account id or name of 1..255 characters", "account")
        with self.db.writer.begin() as conn:
            if not self._owned_for_update(conn, video_id, owner):
                return None
            found = self.find_account(conn, account_ref)
            if found is None:
                raise SharingRefused(f"account: no account {account_ref!r} (give an account id or name)", "account",
                                     "account_not_found")
            account_id, name = found
            if account_id == owner:
                raise SharingRefused("account: a video is always visible to its owner; share it with another "
                                     "account", "account")
            row = conn.execute(sa.select(_S.created_at).where(_S.video_id == video_id,
                                                               _S.account_id == account_id)).first()
            if row is not None:
                return Share(video_id, account_id, name, row.created_at)
            count = conn.scalar(sa.select(sa.func.count()).select_from(SHARES).where(_S.video_id == video_id))
            if count >= MAX_SHARES_PER_VIDEO:
                raise SharingRefused(f"account: this video is shared with {count} accounts, the most allowed; "
                                     "unshare one first", "account", "too_many_shares")
            now = self._clock()
            conn.execute(sa.insert(SHARES).values(video_id=video_id, account_id=account_id, created_at=now))
            _set_visibility(conn, video_id)
        return Share(video_id, account_id, name, now)

    def unshare(self, video_id: str, owner: str, account_ref: str) -> bool | None:
        """Take a share back; None when the owner has no such video, False when it was not shared
        with that account."""
        with self.db.writer.begin() as conn:
            if not self._owned_for_update(conn, video_id, owner):
                return None
            found = self.find_account(conn, account_ref)
            if found is None:
                return False
            gone = conn.execute(sa.delete(SHARES).where(_S.video_id == video_id, _S.account_id == found[0])).rowcount
            _set_visibility(conn, video_id)
        return gone > 0

    def shares_of(self, video_id: str) -> builtins.list[Share]:
        query = (sa.select(_S.video_id, _S.account_id, _A.c.name, _S.created_at)
                 .join(_A, _A.c.id == _S.account_id, isouter=True)
                 .where(_S.video_id == video_id).order_by(_S.created_at, _S.account_id))
        with self.db.engine.connect() as conn:
            return [Share(r.video_id, r.account_id, r.name or "", r.created_at) for r in conn.execute(query)]

    # -- links (the owner) -------------------------------------------------------------------

    def create_link(self, video_id: str, owner: str | None) -> tuple[Link, str] | None:
        """A new unlisted link and its token (shown once); None when the owner has no such video."""
        with self.db.writer.begin() as conn:
            if not self._owned_for_update(conn, video_id, owner):
                return None
            live = conn.scalar(sa.select(sa.func.count()).select_from(LINKS)
                               .where(_L.video_id == video_id, _L.revoked_at.is_(None)))
            if live >= MAX_LIVE_LINKS_PER_VIDEO:
                raise SharingRefused(f"video_id: this video has {live} live links, the most allowed; revoke one "
                                     "first", "video_id", "too_many_links")
            token, now = keys.new_secret(LINK_PREFIX), self._clock()
            link = Link(f"vlink_{uuid.uuid4().hex}", video_id, f"{LINK_PREFIX}…{token[-4:]}", now, None)
            conn.execute(sa.insert(LINKS).values(id=link.id, video_id=video_id, token_hash=keys.digest(token),
                                                 hint=link.hint, created_at=now, revoked_at=None))
            _set_visibility(conn, video_id)
        return link, token

    def revoke_link(self, video_id: str, owner: str | None, link_id: str) -> Link | None:
        """Revoke one of the video's links (idempotent); None when there is no such video or link."""
        with self.db.writer.begin() as conn:
            if not self._owned_for_update(conn, video_id, owner):
                return None
            conn.execute(sa.update(LINKS).where(_L.id == link_id, _L.video_id == video_id, _L.revoked_at.is_(None))
                         .values(revoked_at=self._clock()))
            row = conn.execute(sa.select(LINKS).where(_L.id == link_id, _L.video_id == video_id)).mappings().first()
            _set_visibility(conn, video_id)
        return _link(row) if row is not None else None

    def links_of(self, video_id: str) -> builtins.list[Link]:
        query = sa.select(LINKS).where(_L.video_id == video_id).order_by(_L.created_at, _L.id)
        with self.db.engine.connect() as conn:
            return [_link(r) for r in conn.execute(query).mappings()]

    @staticmethod
    def _owned_for_update(conn: Connection, video_id: str, owner: str | None) -> bool:
        """Lock the owner's video row (PostgreSQL; SQLite's writer lock already serialises), so two
        share changes of one video cannot both decide its visibility from a stale count."""
        query = sa.select(_C.id).where(_C.id == video_id)
        if owner is not None:
            query = query.where(_C.owner == owner)
        return conn.execute(query.with_for_update()).first() is not None


def _used_cameo_of(account: str) -> sa.Exists:
    """The video row used a cameo that ``account`` owns."""
    return sa.exists().where(USES.c.video_id == _C.id, USES.c.character_id == CHARACTERS.c.id,
                             CHARACTERS.c.owner == account)


def _set_visibility(conn: Connection, video_id: str) -> None:
    live = sa.exists().where(_L.video_id == video_id, _L.revoked_at.is_(None))
    shared = sa.exists().where(_S.video_id == video_id)
    visibility = sa.case((live, "unlisted"), (shared, "shared"), else_="private")
    conn.execute(sa.update(_V).where(_C.id == video_id).values(visibility=visibility))


def _link(row) -> Link:
    return Link(row["id"], row["video_id"], row["hint"], row["created_at"], row["revoked_at"])
