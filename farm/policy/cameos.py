"""Cameos (characters): a person's likeness, usable in prompts only with that person's consent.

An account registers a cameo from a video of itself (``farm.api.cameo_media`` extracts reference
frames; the video and frames live in S3 under ``characters/<id>/``). Its owner picks who may use
it — ``only_me``, ``approved`` (accounts the owner approved), ``everyone`` — answers other
accounts' requests, and can revoke: the setting falls back to ``only_me`` and every approval
becomes ``revoked``, so every later use by another account is refused. The owner may always use
their own cameo; a farm without accounts (``account=None``) has one tenant, which may use every
cameo.

A prompt uses a cameo by ``@name`` (``farm.policy.mentions``) or by listing its id in the create
body's ``characters``. ``resolve`` finds them (an unknown one is a 400), ``may_use`` decides, and
``admit`` — run by the job store inside the job's own insert transaction — checks again under the
same transaction (a revocation that commits first wins) and records each use (``character_uses``)
with a ``video.cameo_used`` event for the cameo's owner (the outbox the webhooks fan out).
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from farm.db import Database, unix, utcnow
from farm.jobs.job import Job
from farm.jobs.tables import EVENTS, VIDEOS
from farm.policy.cameo_tables import CHARACTERS, CONSENTS, GRANTS, USES
from farm.policy.mentions import MAX_NAME_CHARS, is_name, mentions, name_key

CAMEO_USED = "video.cameo_used"  # the event the owner gets for each use by another account
CHARACTER_PREFIX = "characters/"
MAX_CHARACTERS_PER_PROMPT = 4
_CH, _G, _U, _V = CHARACTERS.c, GRANTS.c, USES.c, VIDEOS.c


def character_prefix(character_id: str) -> str:
    return f"{CHARACTER_PREFIX}{character_id}/"


def new_character_id() -> str:
    return f"char_{uuid.uuid4().hex}"


class CameoRefused(ValueError):
    """A cameo request the store will not honour: HTTP ``status``, ``param`` and ``code`` say why."""

    def __init__(self, message: str, *, param: str | None, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclasses.dataclass(frozen=True)
class Character:
    id: str
    owner: str | None
    name: str
    consent: str
    public_figure_id: str | None
    video_key: str
    frame_keys: tuple[str, ...]
    width: int
    height: int
    created_at: dt.datetime
    updated_at: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def reference_key(self) -> str:
        """The frame a render from this cameo starts from: the middle one of its reference frames."""
        return self.frame_keys[len(self.frame_keys) // 2]

    def to_api(self, *, full: bool) -> dict:
        """The SDK's character object (``id``, ``name``, ``created_at``) plus farm fields; ``full``
        (its owner) adds the frames, the consent setting's history and the public-figure link."""
        out = {"id": self.id, "object": "character", "name": self.name, "created_at": unix(self.created_at),
               "consent": self.consent}
        if full:
            out |= {"owner": self.owner, "frames": len(self.frame_keys), "width": self.width, "height": self.height,
                    "public_figure_id": self.public_figure_id, "updated_at": unix(self.updated_at),
                    "revoked_at": unix(self.revoked_at)}
        return out


@dataclasses.dataclass(frozen=True)
class Grant:
    character_id: str
    account_id: str
    status: str
    requested_at: dt.datetime
    answered_at: dt.datetime | None

    def to_api(self) -> dict:
        return {"object": "character.request", "character_id": self.character_id, "account_id": self.account_id,
                "status": self.status, "requested_at": unix(self.requested_at), "answered_at": unix(self.answered_at)}


def _character(row) -> Character:
    frames = row["frames"] or {}
    return Character(row["id"], row["owner"], row["name"], row["consent"], row["public_figure_id"], row["video_key"],
                     tuple(frames.get("keys", ())), int(frames.get("width", 0)), int(frames.get("height", 0)),
                     row["created_at"], row["updated_at"], row["revoked_at"])


def _grant(row) -> Grant:
    return Grant(row["character_id"], row["account_id"], row["status"], row["requested_at"], row["answered_at"])


def check_name(name: object) -> str:
    if not isinstance(name, str) or not is_name(name):
        raise CameoRefused(f"name: {name!r} is not a cameo name; allowed: 1..{MAX_NAME_CHARS} ASCII letters, digits, "
                           "'_', '.' and '-', starting and ending with a letter, digit or '_' (prompts use it as "
                           "@name)", param="name", code="invalid_value")
    return name


def check_consent(consent: object) -> str:
    if consent not in CONSENTS:
        raise CameoRefused(f"consent: {consent!r} is not allowed; use one of {', '.join(CONSENTS)}", param="consent",
                           code="invalid_value")
    return consent  # type: ignore[return-value]


class CharacterStore:
    """Cameos, their consent and their uses, over the farm database (shared with the job store)."""

    def __init__(self, db: Database | str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.db = Database(db) if isinstance(db, str) else db
        self._clock = clock or utcnow

    # -- the owner's cameos ------------------------------------------------------------------

    def create(self, *, character_id: str, owner: str | None, name: str, consent: str, video_key: str,
               frame_keys: Sequence[str], width: int, height: int) -> Character:
        """A new cameo (its objects already stored); 409 ``character_name_taken`` when the name is held."""
        check_name(name)
        check_consent(consent)
        if not frame_keys:
            raise ValueError("frame_keys: a cameo needs at least one reference frame")
        now = self._clock()
        row = {"id": character_id, "owner": owner, "name": name, "name_key": name_key(name), "consent": consent,
               "public_figure_id": None, "video_key": video_key,
               "frames": {"keys": list(frame_keys), "width": width, "height": height},
               "created_at": now, "updated_at": now, "revoked_at": None}
        with self.db.writer.begin() as conn:
            self._name_free(conn, name, None)
            conn.execute(sa.insert(CHARACTERS).values(**row))
        return _character(row)

    def _name_free(self, conn: Connection, name: str, character_id: str | None) -> None:
        held = conn.scalar(sa.select(_CH.id).where(_CH.name_key == name_key(name)))
        if held is not None and held != character_id:
            raise CameoRefused(f"name: @{name} is taken by another cameo; choose another name", param="name",
                               code="character_name_taken", status=409)

    def get(self, character_id: str) -> Character | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(CHARACTERS).where(_CH.id == character_id)).mappings().first()
        return _character(row) if row is not None else None

    def owned(self, character_id: str, owner: str | None) -> Character | None:
        """The cameo if ``owner`` owns it (``owner=None``: one anonymous tenant, which owns all)."""
        found = self.get(character_id)
        return found if found is not None and (owner is None or found.owner == owner) else None

    def list_owned(self, owner: str | None, *, after: str | None = None,
                   limit: int = 20) -> tuple[builtins.list[Character], bool]:
        """A page of the owner's cameos, newest first (cursor: a cameo id)."""
        query = sa.select(CHARACTERS)
        if owner is not None:
            query = query.where(_CH.owner == owner)
        with self.db.engine.connect() as conn:
            if after is not None:
                cursor = conn.execute(sa.select(_CH.created_at, _CH.id).where(_CH.id == after)).first()
                if cursor is None or (owner is not None and self.owned(after, owner) is None):
                    raise ValueError(f"after: no cameo {after!r} of yours")
                query = query.where(sa.or_(_CH.created_at < cursor.created_at,
                                           sa.and_(_CH.created_at == cursor.created_at, _CH.id < cursor.id)))
            rows = conn.execute(query.order_by(_CH.created_at.desc(), _CH.id.desc()).limit(limit + 1)).mappings().all()
        return [_character(r) for r in rows[:limit]], len(rows) > limit

    def update(self, character_id: str, owner: str | None, *, name: str | None = None,
               consent: str | None = None) -> Character | None:
        """Rename or change the consent setting; None when the owner has no such cameo. Changing
        the setting takes no approval back (``revoke`` does)."""
        changes: dict = {}
        if name is not None:
            changes |= {"name": check_name(name), "name_key": name_key(name)}
        if consent is not None:
            changes["consent"] = check_consent(consent)
        with self.db.writer.begin() as conn:
            if not self._owned_for_update(conn, character_id, owner):
                return None
            if name is not None:
                self._name_free(conn, name, character_id)
            if changes:
                conn.execute(sa.update(CHARACTERS).where(_CH.id == character_id)
                             .values(**changes, updated_at=self._clock()))
        return self.get(character_id)

    def set_public_figure(self, character_id: str, entry_id: str | None) -> Character | None:
        """The operator's link between a cameo and a protected public figure (None: unlink)."""
        with self.db.writer.begin() as conn:
            done = conn.execute(sa.update(CHARACTERS).where(_CH.id == character_id)
                                .values(public_figure_id=entry_id, updated_at=self._clock())).rowcount
        return self.get(character_id) if done else None

    def delete(self, character_id: str, owner: str | None) -> Character | None:
        """Remove the cameo, its grants and its use rows (the clips stay, their owners' own), so the
        caller can delete its objects; None when the owner has no such cameo."""
        with self.db.writer.begin() as conn:
            if not self._owned_for_update(conn, character_id, owner):
                return None
            row = conn.execute(sa.delete(CHARACTERS).where(_CH.id == character_id).returning(*_CH)).mappings().first()
            conn.execute(sa.delete(GRANTS).where(_G.character_id == character_id))
            conn.execute(sa.delete(USES).where(_U.character_id == character_id))
        return _character(row)

    @staticmethod
    def _owned_for_update(conn: Connection, character_id: str, owner: str | None) -> bool:
        query = sa.select(_CH.id).where(_CH.id == character_id)
        if owner is not None:
            query = query.where(_CH.owner == owner)
        return conn.execute(query.with_for_update()).first() is not None

    # -- consent -----------------------------------------------------------------------------

    def request(self, character_id: str, account: str) -> Grant | None:
        """``account`` asks to use the cameo: a pending request (an approved one stays approved,
        a denied or revoked one is asked again); None when there is no such cameo."""
        with self.db.writer.begin() as conn:
            owner = conn.execute(sa.select(_CH.owner).where(_CH.id == character_id).with_for_update()).first()
            if owner is None:
                return None
            if owner.owner == account:
                raise CameoRefused("character_id: this cameo is yours; you may always use it", param="character_id",
                                   code="invalid_value")
            row = conn.execute(sa.select(GRANTS).where(_G.character_id == character_id,
                                                       _G.account_id == account)).mappings().first()
            if row is not None and row["status"] in ("pending", "approved"):
                return _grant(row)
            now = self._clock()
            values = {"status": "pending", "requested_at": now, "answered_at": None}
            if row is None:
                conn.execute(sa.insert(GRANTS).values(character_id=character_id, account_id=account, **values))
            else:
                conn.execute(sa.update(GRANTS).where(_G.character_id == character_id, _G.account_id == account)
                             .values(**values))
        return Grant(character_id, account, "pending", now, None)

    def answer(self, character_id: str, owner: str | None, account: str, *, approve: bool) -> Grant | None:
        """The owner approves or denies ``account``'s request (any status may be answered again);
        None when the owner has no such cameo or ``account`` never asked."""
        with self.db.writer.begin() as conn:
            if not self._owned_for_update(conn, character_id, owner):
                return None
            consent = conn.scalar(sa.select(_CH.consent).where(_CH.id == character_id))
            if approve and consent != "approved":
                raise CameoRefused(f"decision: this cameo's consent is {consent!r}, so an approval would change "
                                   "nothing; set consent to 'approved' first (POST /v1/videos/characters/"
                                   f"{character_id})", param="decision", code="consent_not_approved", status=409)
            done = conn.execute(sa.update(GRANTS).where(_G.character_id == character_id, _G.account_id == account)
                                .values(status="approved" if approve else "denied",
                                        answered_at=self._clock())).rowcount
            row = conn.execute(sa.select(GRANTS).where(_G.character_id == character_id,
                                                       _G.account_id == account)).mappings().first()
        return _grant(row) if done and row is not None else None

    def grants_of(self, character_id: str) -> builtins.list[Grant]:
        query = sa.select(GRANTS).where(_G.character_id == character_id).order_by(_G.requested_at, _G.account_id)
        with self.db.engine.connect() as conn:
            return [_grant(r) for r in conn.execute(query).mappings()]

    def grant_of(self, character_id: str, account: str) -> Grant | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(GRANTS).where(_G.character_id == character_id,
                                                       _G.account_id == account)).mappings().first()
        return _grant(row) if row is not None else None

    def revoke(self, character_id: str, owner: str | None) -> tuple[Character, builtins.list[str]] | None:
        """Take consent back: the setting becomes ``only_me`` and every approval ``revoked``; returns
        the cameo and the accounts whose approval was taken back. None when the owner has no such cameo."""
        now = self._clock()
        with self.db.writer.begin() as conn:
            if not self._owned_for_update(conn, character_id, owner):
                return None
            approved = conn.scalars(sa.select(_G.account_id).where(_G.character_id == character_id,
                                                                   _G.status == "approved")).all()
            conn.execute(sa.update(GRANTS).where(_G.character_id == character_id, _G.status == "approved")
                         .values(status="revoked", answered_at=now))
            conn.execute(sa.update(CHARACTERS).where(_CH.id == character_id)
                         .values(consent="only_me", revoked_at=now, updated_at=now))
        return self.get(character_id), sorted(approved)  # type: ignore[return-value]

    @staticmethod
    def _may_use(conn: Connection, character: Character, account: str | None) -> bool:
        if account is None or character.owner == account or character.consent == "everyone":
            return True
        if character.consent != "approved":
            return False
        status = conn.scalar(sa.select(_G.status).where(_G.character_id == character.id, _G.account_id == account))
        return status == "approved"

    def may_use(self, character: Character, account: str | None) -> bool:
        """Whether ``account`` may use the cameo now."""
        with self.db.engine.connect() as conn:
            return self._may_use(conn, character, account)

    # -- use in prompts ----------------------------------------------------------------------

    def resolve(self, prompt: str, ids: Iterable[str] = ()) -> builtins.list[Character]:
        """The cameos a request uses — ``@name`` mentions of ``prompt``, then listed ``ids`` — each
        once, in that order; 400 ``character_not_found`` names the first that does not exist."""
        names, ids = mentions(prompt), list(dict.fromkeys(ids))
        if not names and not ids:
            return []
        with self.db.engine.connect() as conn:
            keys = [name_key(n) for n in names]
            by_name = {r["name_key"]: _character(r) for r in conn.execute(
                sa.select(CHARACTERS).where(_CH.name_key.in_(keys))).mappings()} if keys else {}
            by_id = {r["id"]: _character(r) for r in conn.execute(
                sa.select(CHARACTERS).where(_CH.id.in_(ids))).mappings()} if ids else {}
        found: dict[str, Character] = {}
        for name in names:
            if name_key(name) not in by_name:
                raise CameoRefused(f"prompt: @{name} is not a cameo on this farm (cameo names are listed by their "
                                   "owners; write the @ apart from the name to mention no cameo)", param="prompt",
                                   code="character_not_found")
            character = by_name[name_key(name)]
            found.setdefault(character.id, character)
        for character_id in ids:
            if character_id not in by_id:
                raise CameoRefused(f"characters: no cameo {character_id!r}", param="characters",
                                   code="character_not_found")
            found.setdefault(character_id, by_id[character_id])
        if len(found) > MAX_CHARACTERS_PER_PROMPT:
            raise CameoRefused(f"characters: {len(found)} cameos in one request; allowed: at most "
                               f"{MAX_CHARACTERS_PER_PROMPT}", param="characters", code="invalid_value")
        return list(found.values())

    @staticmethod
    def refusal(character: Character) -> CameoRefused:
        """The 403 for a use without consent: it names the cameo and the way to ask."""
        return CameoRefused(
            f"prompt: @{character.name} ({character.id}) is a cameo you may not use: its owner has not consented; "
            f"ask with POST /v1/videos/characters/{character.id}/requests and wait for approval; nothing was "
            "created", param="prompt", code="cameo_consent_required", status=403)

    def check_use(self, characters: Sequence[Character], account: str | None) -> None:
        """403 ``cameo_consent_required`` for the first cameo ``account`` may not use."""
        with self.db.engine.connect() as conn:
            for character in characters:
                if not self._may_use(conn, character, account):
                    raise self.refusal(character)

    def admit(self, conn: Connection, job: Job, character_ids: Sequence[str]) -> None:
        """In the transaction that inserts ``job``: check consent again (re-reading each cameo, so a
        revocation or deletion that committed first refuses the job) and record each use, with a
        ``video.cameo_used`` event for its owner when another account used it."""
        now = self._clock()
        for character_id in character_ids:
            row = conn.execute(sa.select(CHARACTERS).where(_CH.id == character_id)).mappings().first()
            if row is None:
                raise CameoRefused(f"characters: the cameo {character_id!r} was deleted; nothing was created",
                                   param="characters", code="character_not_found")
            character = _character(row)
            if not self._may_use(conn, character, job.owner):
                raise self.refusal(character)
            conn.execute(sa.insert(USES).values(character_id=character_id, video_id=job.id, account_id=job.owner,
                                                created_at=now))
            if character.owner is not None and character.owner != job.owner:
                conn.execute(sa.insert(EVENTS).values(id=f"evt_{uuid.uuid4().hex}", type=CAMEO_USED, video_id=job.id,
                                                      owner=character.owner, created_at=now))

    def uses_of(self, character_id: str, *, after: str | None = None,
                limit: int = 20) -> tuple[builtins.list[Job], bool]:
        """A page of the clips that used the cameo, every account's (drafts included), newest first."""
        query = sa.select(VIDEOS).join(USES, _U.video_id == _V.id).where(_U.character_id == character_id)
        with self.db.engine.connect() as conn:
            if after is not None:
                cursor = conn.execute(sa.select(_U.created_at, _U.video_id).where(
                    _U.character_id == character_id, _U.video_id == after)).first()
                if cursor is None:
                    raise ValueError(f"after: no video {after!r} used this cameo")
                query = query.where(sa.or_(_U.created_at < cursor.created_at,
                                           sa.and_(_U.created_at == cursor.created_at, _U.video_id < cursor.video_id)))
            rows = conn.execute(query.order_by(_U.created_at.desc(), _U.video_id.desc())
                                .limit(limit + 1)).mappings().all()
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit

    def others_clips(self, character: Character) -> builtins.list[Job]:
        """Every clip other accounts made with the cameo (what a revocation with removal deletes)."""
        query = (sa.select(VIDEOS).join(USES, _U.video_id == _V.id)
                 .where(_U.character_id == character.id, sa.func.coalesce(_V.owner, "") != (character.owner or "")))
        with self.db.engine.connect() as conn:
            return [Job.from_row(r) for r in conn.execute(query).mappings()]
