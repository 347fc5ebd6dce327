"""Drafts and sharing, and clip lifetimes (farm extensions).

    owner:     POST/GET /v1/videos/{id}/shares, DELETE /v1/videos/{id}/shares/{account}
               POST/GET /v1/videos/{id}/links,  DELETE /v1/videos/{id}/links/{link_id}
    anyone:    GET /v1/shared/{token}, GET /v1/shared/{token}/content?variant=   (no API key)
    operator:  GET/POST /v1/admin/accounts/{id}/lifetime

Only a video's owner manages its shares and links; for anyone else the video does not exist
(404, as for an id that never existed). An unlisted link needs no account: whoever holds the
token can read the video object (without its ``usage``) and download every variant, Range
included, from the same stored objects the owner downloads. A wrong or revoked token is a 404.
The share routes are served only with accounts (``GatewayDeps.auth``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from farm.api.errors import ErrorResponse, InvalidRequest, NotFound
from farm.api.schemas import VARIANTS, Variant, VideoObject
from farm.api.wire import video_object
from farm.jobs.expiry import MAX_LIFETIME_S
from farm.jobs.sharing import SharingRefused
from farm.storage.s3 import ClipLayout

if TYPE_CHECKING:
    from farm.accounts.store import AccountStore
    from farm.api.app import GatewayDeps

_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No such video of yours (or no such share or link)."}}


class ShareRequest(BaseModel):
    """``POST /v1/videos/{id}/shares``: the account to share with."""

    model_config = ConfigDict(extra="forbid")

    account: str = Field(min_length=1, max_length=255, description="The account's id (acct_…) or name.")


class LifetimeUpdate(BaseModel):
    """``POST /v1/admin/accounts/{id}/lifetime``."""

    model_config = ConfigDict(extra="forbid")

    lifetime_s: int | None = Field(
        default=None, ge=1, le=MAX_LIFETIME_S,
        description="Seconds this account's clips are kept after they complete (applies to clips created from now "
        "on), at least the farm's expiry.min_lifetime_s (60 unless set); null: its tier's lifetime, else the farm's "
        "default.")


def _refused(exc: SharingRefused) -> InvalidRequest:
    return InvalidRequest(str(exc), param=exc.param, code=exc.code)


def add_sharing_routes(app: FastAPI, deps: GatewayDeps, owner_of: Callable[[Request], Awaitable[str | None]],
                       accounts: AccountStore | None) -> None:
    """Register the routes above; the share and lifetime routes only when ``accounts`` is given."""
    from farm.api.app import _stream, check_content

    sharing = deps.sharing

    async def owned(video_id: str, request: Request) -> tuple[str | None, Any]:
        who = await owner_of(request)
        job = await run_in_threadpool(deps.store.get, video_id, owner=who)
        if job is None:
            raise NotFound(f"video {video_id!r} not found", param="video_id")
        return who, job

    # -- unlisted links ---------------------------------------------------------------------

    @app.post("/v1/videos/{video_id}/links", summary="Publish an unlisted link to a video",
              operation_id="createVideoLink", tags=["sharing"], responses=_NOT_FOUND)
    async def create_link(video_id: str, request: Request) -> dict[str, Any]:
        """A new link; its ``token`` and ``url`` are shown only in this answer (only a hash is kept)."""
        who, _ = await owned(video_id, request)
        try:
            made = await run_in_threadpool(sharing.create_link, video_id, who)
        except SharingRefused as exc:
            raise _refused(exc) from None
        if made is None:  # deleted meanwhile
            raise NotFound(f"video {video_id!r} not found", param="video_id")
        link, token = made
        return link.to_api() | {"token": token, "url": str(request.url_for("retrieveSharedVideo", token=token))}

    @app.get("/v1/videos/{video_id}/links", summary="List a video's unlisted links", operation_id="listVideoLinks",
             tags=["sharing"], responses=_NOT_FOUND)
    async def list_links(video_id: str, request: Request) -> dict[str, Any]:
        await owned(video_id, request)
        links = await run_in_threadpool(sharing.links_of, video_id)
        return {"object": "list", "data": [link.to_api() for link in links]}

    @app.delete("/v1/videos/{video_id}/links/{link_id}", summary="Revoke an unlisted link",
                operation_id="revokeVideoLink", tags=["sharing"], responses=_NOT_FOUND)
    async def revoke_link(video_id: str, link_id: str, request: Request) -> dict[str, Any]:
        who, _ = await owned(video_id, request)
        link = await run_in_threadpool(sharing.revoke_link, video_id, who, link_id)
        if link is None:
            raise NotFound(f"link {link_id!r} of video {video_id!r} not found", param="link_id")
        return link.to_api()

    async def by_token(token: str) -> Any:
        found = await run_in_threadpool(sharing.by_token, token)
        if found is None:  # unknown and revoked read the same: nothing to probe
            raise NotFound("this link is not valid (unknown or revoked)", param="token", code="link_not_found")
        return found[0]

    @app.get("/v1/shared/{token}", response_model=VideoObject, summary="Retrieve a video through an unlisted link",
             operation_id="retrieveSharedVideo", name="retrieveSharedVideo", tags=["sharing"],
             responses={404: {"model": ErrorResponse, "description": "Unknown or revoked link."}})
    async def retrieve_shared(token: str) -> dict[str, Any]:
        """No API key needed. The video object without ``usage`` (the owner's accounting)."""
        return video_object(await by_token(token), now=deps.store.now())

    @app.get("/v1/shared/{token}/content", summary="Download a video's content through an unlisted link",
             operation_id="downloadSharedVideoContent", tags=["sharing"], response_class=StreamingResponse,
             responses={200: {"content": {"video/mp4": {}, "image/webp": {}, "image/jpeg": {}},
                              "description": "The bytes of the requested variant."},
                        206: {"description": "The requested byte range."},
                        307: {"description": "With serve.content_redirect: a short-lived presigned S3 URL of the bytes."},
                        404: {"model": ErrorResponse, "description": "Unknown or revoked link, or no content."}})
    async def download_shared(
        token: str, request: Request,
        variant: Variant = Query("video", description=f"Which asset: {', '.join(VARIANTS)}."),
    ) -> StreamingResponse:
        """No API key needed; the same objects (watermark and manifest included) the owner downloads."""
        job = await by_token(token)
        check_content(job, deps.store.now())
        return await _stream(deps, ClipLayout(job.id), variant, request.headers.get("range"))

    if accounts is None:
        return

    # -- shares with named accounts -------------------------------------------------------------

    @app.post("/v1/videos/{video_id}/shares", summary="Share a video with another account",
              operation_id="createVideoShare", tags=["sharing"], responses=_NOT_FOUND)
    async def create_share(video_id: str, body: ShareRequest, request: Request) -> dict[str, Any]:
        """The account may then retrieve it, follow its events, download it and remix it; not delete,
        cancel or re-share it. Idempotent."""
        who, _ = await owned(video_id, request)
        try:
            share = await run_in_threadpool(sharing.share, video_id, who, body.account)
        except SharingRefused as exc:
            raise _refused(exc) from None
        if share is None:
            raise NotFound(f"video {video_id!r} not found", param="video_id")
        return share.to_api()

    @app.get("/v1/videos/{video_id}/shares", summary="List the accounts a video is shared with",
             operation_id="listVideoShares", tags=["sharing"], responses=_NOT_FOUND)
    async def list_shares(video_id: str, request: Request) -> dict[str, Any]:
        await owned(video_id, request)
        shares = await run_in_threadpool(sharing.shares_of, video_id)
        return {"object": "list", "data": [share.to_api() for share in shares]}

    @app.delete("/v1/videos/{video_id}/shares/{account}", summary="Stop sharing a video with an account",
                operation_id="deleteVideoShare", tags=["sharing"], responses=_NOT_FOUND)
    async def delete_share(video_id: str, account: str, request: Request) -> dict[str, Any]:
        who, _ = await owned(video_id, request)
        gone = await run_in_threadpool(sharing.unshare, video_id, who, account)
        if not gone:
            raise NotFound(f"video {video_id!r} is not shared with {account!r}", param="account")
        return {"object": "video.share.deleted", "video_id": video_id, "account": account, "deleted": True}

    # -- per-account lifetimes (operator) -------------------------------------------------------

    lifetimes = deps.lifetimes

    async def lifetime_object(account_id: str) -> dict[str, Any]:
        if await run_in_threadpool(accounts.account, account_id) is None:
            raise NotFound(f"account {account_id!r} not found", param="account_id")
        tier, override = await run_in_threadpool(lifetimes.settings_of, account_id)
        return {"object": "account.lifetime", "account_id": account_id, "tier": tier,
                "lifetime_s_override": override, "lifetime_s": int(lifetimes.rule.lifetime_s(tier, override))}

    @app.get("/v1/admin/accounts/{account_id}/lifetime", summary="How long an account's clips are kept (operator)",
             operation_id="retrieveAccountLifetime", tags=["accounts"], responses={404: {"model": ErrorResponse}})
    async def get_lifetime(account_id: str) -> dict[str, Any]:
        return await lifetime_object(account_id)

    @app.post("/v1/admin/accounts/{account_id}/lifetime", summary="Set how long an account's clips are kept "
              "(operator)", operation_id="updateAccountLifetime", tags=["accounts"],
              responses={404: {"model": ErrorResponse}})
    async def set_lifetime(account_id: str, body: LifetimeUpdate) -> dict[str, Any]:
        await lifetime_object(account_id)  # 404 for an unknown account, before writing
        try:
            await run_in_threadpool(lifetimes.set_override, account_id, body.lifetime_s)
        except ValueError as exc:  # below the farm's expiry.min_lifetime_s
            raise InvalidRequest(str(exc), param="lifetime_s") from exc
        return await lifetime_object(account_id)
