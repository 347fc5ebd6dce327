"""``/v1/videos/characters``: cameos, as the ``openai`` SDK's ``create_character`` / ``get_character``
send them, plus the owner's list, update, delete, consent and uses.

    POST   /v1/videos/characters                       create (multipart: name, video; consent)
    GET    /v1/videos/characters                       the caller's cameos, newest first
    GET    /v1/videos/characters/{id}                  any account: id, name, created_at, consent
                                                       (the owner sees more; others their access)
    POST   /v1/videos/characters/{id}                  the owner renames or sets consent
    DELETE /v1/videos/characters/{id}                  the owner deletes it and its objects
    POST   /v1/videos/characters/{id}/requests         another account asks to use it
    GET    /v1/videos/characters/{id}/requests         the owner lists requests and their answers
    POST   /v1/videos/characters/{id}/requests/{acct}  the owner approves or denies
    POST   /v1/videos/characters/{id}/revoke           the owner takes consent back (remove_clips)
    GET    /v1/videos/characters/{id}/videos           the owner lists every clip that used it
    POST   /v1/admin/characters/{id}                   the operator links it to a public figure

The source video is checked and cut into reference frames on the gateway
(``farm.api.cameo_media``); the video and frames go to S3 under ``characters/<id>/`` before the
row is written, and are deleted again when the row is not. Another account's cameo is visible by
id (to ask for it, a prompt names it anyway); its frames and video never leave the farm.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from farm.api.cameo_media import read_cameo_video
from farm.api.errors import APIError, Conflict, ErrorResponse, Forbidden, InvalidRequest, NotFound, ServiceUnavailable
from farm.api.wire import video_object
from farm.policy.cameos import CameoRefused, Character, character_prefix, check_consent, check_name, new_character_id
from farm.storage.s3 import delete_clip

if TYPE_CHECKING:
    from farm.api.app import GatewayDeps

_RESPONSES = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}
_FORM_FIELDS = ("name", "video", "consent")


class CharacterUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=40, description="A new @name.")
    consent: Literal["only_me", "approved", "everyone"] | None = Field(default=None, description=(
        "Who may use the cameo: only_me, approved (accounts you approve) or everyone. Approvals are kept "
        "when it changes; revoke takes them back."))


class RequestAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "deny"] = Field(description="approve or deny the account's request.")


class Revocation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    remove_clips: bool = Field(default=False, description=(
        "Also remove every clip other accounts made with the cameo: finished and queued ones are deleted "
        "(their objects in S3 too), rendering ones are cancelled."))


class PublicFigureLink(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public_figure_id: str | None = Field(max_length=64, description=(
        "The protected_names entry (kind public_figure) this cameo is a consenting cameo of; null unlinks."))


def refused(exc: CameoRefused) -> APIError:
    """The store's refusal as the HTTP error of its status."""
    kind = {403: Forbidden, 404: NotFound, 409: Conflict}.get(exc.status, InvalidRequest)
    return kind(exc.message, param=exc.param, code=exc.code)


def add_character_routes(app: FastAPI, deps: GatewayDeps, owner_of: Callable[[Request], Awaitable[str | None]]) -> None:
    characters, limits = deps.characters, deps.cameo_limits

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(lambda: fn(*args, **kwargs))
        except CameoRefused as exc:
            raise refused(exc) from None

    async def owned(character_id: str, who: str | None) -> Character:
        found = await call(characters.owned, character_id, who)
        if found is None:
            raise NotFound(f"character {character_id!r} not found", param="character_id")
        return found

    def account(who: str | None) -> str:
        if who is None:
            raise InvalidRequest("this farm runs without accounts: there is no one else to ask or answer",
                                 code="accounts_required")
        return who

    @app.post("/v1/videos/characters", summary="Create a character (cameo) from a video", tags=["characters"],
              operation_id="createCharacter",
              responses={**_RESPONSES, 413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["name", "video"], "properties": {
                      "name": {"type": "string", "description": "The @name prompts use it by."},
                      "video": {"type": "string", "format": "binary", "description": "A video of the person."},
                      "consent": {"type": "string", "enum": ["only_me", "approved", "everyone"],
                                  "description": "Farm extension: who may use it; default approved (accounts "
                                                 "you approve)."}}}}}}})
    async def create_character(request: Request) -> dict[str, Any]:
        who = await owner_of(request)
        fields, video = await _read_form(request, limits.max_bytes)
        try:
            name, consent = check_name(fields.get("name")), check_consent(fields.get("consent", "approved"))
        except CameoRefused as exc:
            raise refused(exc) from None
        if video is None:
            raise InvalidRequest("video: required (a file part)", param="video", code="missing_required_parameter")
        checked = await run_in_threadpool(read_cameo_video, video, limits)
        character_id = new_character_id()
        prefix = character_prefix(character_id)
        video_key = f"{prefix}source"
        frame_keys = [f"{prefix}frame_{i}.png" for i in range(len(checked.frames))]

        def store_objects() -> None:
            objects = deps.object_store()
            objects.put_bytes(video_key, video, checked.content_type)
            for key, frame in zip(frame_keys, checked.frames):
                objects.put_bytes(key, frame, "image/png")

        try:
            await run_in_threadpool(store_objects)
        except Exception as exc:
            await _drop(deps, prefix)
            raise ServiceUnavailable(f"video: the object store did not answer ({type(exc).__name__}); nothing was "
                                     "created, retry later", param="video") from None
        try:
            made = await call(characters.create, character_id=character_id, owner=who, name=name, consent=consent,
                              video_key=video_key, frame_keys=frame_keys, width=checked.width, height=checked.height)
        except BaseException:
            await _drop(deps, prefix)
            raise
        return made.to_api(full=True)

    @app.get("/v1/videos/characters", summary="List your characters", tags=["characters"],
             operation_id="listCharacters", responses=_RESPONSES)
    async def list_characters(request: Request, after: str | None = Query(None, max_length=64),
                              limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        who = await owner_of(request)
        try:
            found, more = await run_in_threadpool(lambda: characters.list_owned(who, after=after, limit=limit))
        except ValueError as exc:
            raise NotFound(str(exc), param="after") from None
        data = [c.to_api(full=True) for c in found]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.get("/v1/videos/characters/{character_id}", summary="Retrieve a character", tags=["characters"],
             operation_id="getCharacter", responses=_RESPONSES)
    async def get_character(character_id: str, request: Request) -> dict[str, Any]:
        who = await owner_of(request)
        found = await call(characters.get, character_id)
        if found is None:
            raise NotFound(f"character {character_id!r} not found", param="character_id")
        if who is None or found.owner == who:
            return found.to_api(full=True)
        grant = await call(characters.grant_of, character_id, who)
        return found.to_api(full=False) | {"access": {
            "may_use": await call(characters.may_use, found, who), "request": grant.status if grant else None}}

    @app.post("/v1/videos/characters/{character_id}", summary="Rename a character or set its consent",
              tags=["characters"], operation_id="updateCharacter", responses=_RESPONSES)
    async def update_character(character_id: str, body: CharacterUpdate, request: Request) -> dict[str, Any]:
        who = await owner_of(request)
        found = await call(characters.update, character_id, who, name=body.name, consent=body.consent)
        if found is None:
            raise NotFound(f"character {character_id!r} not found", param="character_id")
        return found.to_api(full=True)

    @app.delete("/v1/videos/characters/{character_id}", summary="Delete a character and its objects",
                tags=["characters"], operation_id="deleteCharacter", responses=_RESPONSES)
    async def delete_character(character_id: str, request: Request) -> dict[str, Any]:
        who = await owner_of(request)
        await owned(character_id, who)
        # Objects first: if this fails the row survives and a retried delete finishes the job.
        await run_in_threadpool(lambda: deps.object_store().delete_prefix(character_prefix(character_id)))
        if await call(characters.delete, character_id, who) is None:
            raise NotFound(f"character {character_id!r} not found", param="character_id")
        return {"id": character_id, "object": "character.deleted", "deleted": True}

    @app.post("/v1/videos/characters/{character_id}/requests", summary="Ask to use another account's character",
              tags=["characters"], operation_id="requestCharacter", responses=_RESPONSES)
    async def request_character(character_id: str, request: Request) -> dict[str, Any]:
        who = account(await owner_of(request))
        grant = await call(characters.request, character_id, who)
        if grant is None:
            raise NotFound(f"character {character_id!r} not found", param="character_id")
        return grant.to_api()

    @app.get("/v1/videos/characters/{character_id}/requests", summary="List requests to use your character",
             tags=["characters"], operation_id="listCharacterRequests", responses=_RESPONSES)
    async def list_requests(character_id: str, request: Request) -> dict[str, Any]:
        await owned(character_id, await owner_of(request))
        return {"object": "list", "data": [g.to_api() for g in await call(characters.grants_of, character_id)]}

    @app.post("/v1/videos/characters/{character_id}/requests/{account_id}", summary="Approve or deny a request",
              tags=["characters"], operation_id="answerCharacterRequest", responses=_RESPONSES)
    async def answer_request(character_id: str, account_id: str, body: RequestAnswer,
                             request: Request) -> dict[str, Any]:
        who = account(await owner_of(request))
        await owned(character_id, who)
        grant = await call(characters.answer, character_id, who, account_id, approve=body.decision == "approve")
        if grant is None:
            raise NotFound(f"account {account_id!r} has not asked to use this character", param="account_id")
        return grant.to_api()

    @app.post("/v1/videos/characters/{character_id}/revoke", summary="Take consent back", tags=["characters"],
              operation_id="revokeCharacter", responses=_RESPONSES)
    async def revoke_character(character_id: str, request: Request,
                               body: Revocation | None = None) -> dict[str, Any]:
        who = await owner_of(request)
        done = await call(characters.revoke, character_id, who)
        if done is None:
            raise NotFound(f"character {character_id!r} not found", param="character_id")
        character, accounts = done
        deleted, cancelled = [], []
        if body is not None and body.remove_clips:
            for job in await call(characters.others_clips, character):
                if job.status == "in_progress":  # its worker stops at the next shard boundary
                    await run_in_threadpool(lambda j=job: deps.store.request_cancel(j.id))
                    cancelled.append(job.id)
                    continue
                await run_in_threadpool(lambda j=job: delete_clip(deps.object_store(), j.id))
                if await run_in_threadpool(lambda j=job: deps.store.delete(j.id)) is not None:
                    deleted.append(job.id)
        return {"object": "character.revocation", "character": character.to_api(full=True),
                "revoked_accounts": accounts, "deleted_video_ids": deleted, "cancelled_video_ids": cancelled}

    @app.get("/v1/videos/characters/{character_id}/videos", summary="Every clip that used your character",
             tags=["characters"], operation_id="listCharacterVideos", responses=_RESPONSES)
    async def list_uses(character_id: str, request: Request, after: str | None = Query(None, max_length=64),
                        limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        await owned(character_id, await owner_of(request))
        try:
            jobs, more = await run_in_threadpool(lambda: characters.uses_of(character_id, after=after, limit=limit))
        except ValueError as exc:
            raise NotFound(str(exc), param="after") from None
        now = deps.store.now()
        data = [video_object(j, None, None, now=now) | {"owner": j.owner} for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.post("/v1/admin/characters/{character_id}", summary="Link a character to a public figure (operator)",
              tags=["characters"], operation_id="linkCharacterPublicFigure", responses=_RESPONSES)
    async def link_public_figure(character_id: str, body: PublicFigureLink) -> dict[str, Any]:
        if body.public_figure_id is not None and deps.policy_registry is not None:
            entry = await run_in_threadpool(deps.policy_registry.store.get, body.public_figure_id)
            if entry is None or entry.kind != "public_figure":
                raise InvalidRequest(f"public_figure_id: no public_figure entry {body.public_figure_id!r} "
                                     "(GET /v1/admin/protected_names?kind=public_figure lists them)",
                                     param="public_figure_id")
        found = await call(characters.set_public_figure, character_id, body.public_figure_id)
        if found is None:
            raise NotFound(f"character {character_id!r} not found", param="character_id")
        return found.to_api(full=True)


async def _read_form(request: Request, max_bytes: int) -> tuple[dict[str, str], bytes | None]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data":
        from farm.api.errors import UnsupportedMediaType

        raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted; send multipart/form-data with name "
                                   "and a video file part")
    fields: dict[str, str] = {}
    video = None
    async with request.form(max_files=1, max_fields=8) as form:
        for key, value in form.multi_items():
            if key not in _FORM_FIELDS:
                raise InvalidRequest(f"{key}: unknown field; allowed: {', '.join(_FORM_FIELDS)}", param=key,
                                     code="unknown_parameter")
            if key in fields or (key == "video" and video is not None):
                raise InvalidRequest(f"{key}: given more than once", param=key)
            if key == "video":
                if not isinstance(value, UploadFile):
                    raise InvalidRequest("video: must be a file part", param="video")
                video = await value.read(max_bytes + 1)
            elif isinstance(value, UploadFile):
                raise InvalidRequest(f"{key}: must be a text field, not a file", param=key)
            else:
                fields[key] = value
    return fields, video


async def _drop(deps: GatewayDeps, prefix: str) -> None:
    try:
        await run_in_threadpool(lambda: deps.object_store().delete_prefix(prefix))
    except Exception:  # best effort: the objects are orphans no row names
        import logging

        logging.getLogger(__name__).warning("could not delete the unowned cameo objects under %s", prefix,
                                            exc_info=True)
