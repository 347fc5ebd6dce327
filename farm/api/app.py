"""The HTTP gateway: OpenAI-compatible ``/v1/videos`` routes over the job store and S3.

``create_app(deps)`` builds a plain FastAPI app; the Ray Serve ingress mounts it. The gateway
validates, records jobs in the store (the source of truth), wakes the dispatcher, and
streams finished clips from the object store. It never imports torch or diffusers.
Store and boto3 calls are blocking, so they run in the thread pool, never on the event loop;
content downloads are relayed from S3 by async HTTP, on the loop, holding no thread (or, with
``content_redirect_s``, answered with a 307 to a presigned URL). Who may read a video — its owner,
the accounts it was shared with, holders of an unlisted link — is ``farm.jobs.sharing``'s.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from fastapi import FastAPI, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from farm import __version__
from farm.accounts.store import Principal
from farm.api.auth import AuthGate, GatewayAuth
from farm.api.events import JobWatch, video_events
from farm.api.queue_view import QueueView
from farm.api.errors import (
    ERROR_RESPONSES,
    Conflict,
    ErrorResponse,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    VideoNotReady,
    install_error_handlers,
)
from farm.api.schemas import (
    VARIANTS,
    Health,
    Order,
    Variant,
    VideoDeleted,
    VideoList,
    VideoObject,
    create_body_schemas,
    read_create_request,
)
from farm.api.cameo_media import CameoLimits
from farm.api.character_routes import add_character_routes, refused
from farm.api.derive_routes import add_derive_routes
from farm.api.image_refs import ImageFetch, ImageSources, needs_fetching
from farm.api.model_routes import add_model_routes
from farm.api.references import REFERENCE_SHA256_PARAM, drop_unowned, reference_digest, store_reference
from farm.api.sources import SOURCE_SHA256_PARAM, CheckedSource, store_source
from farm.api.uploads import CheckedImage, UploadLimits
from farm.api.usage_routes import add_usage_routes, budget_refused
from farm.api.video_requests import (
    ContentPolicyViolation, cache_param, check_reference, check_render, find_target, moderate, param_of,
    place_request, text_only, tier_params,
)
from farm.api.wire import video_object
from farm.jobs.estimates import poll_after_ms
from farm.jobs.expiry import Lifetimes, expired
from farm.jobs.sharing import SharingStore
from farm.jobs.store import PRIORITY_BULK, PRIORITY_INTERACTIVE, BudgetExceeded, IdempotencyConflict, QueueFull
from farm.jobs.job import new_video_id
from farm.policy.cameos import CameoRefused, Character, CharacterStore
from farm.policy.mentions import mentions
from farm.policy.moderation import CreatePath, ModerationRequest
from farm.render.registry import DERIVED_FROM_PARAM, REFERENCE_KEY_PARAM, ModelSpec
from farm.render.tiers import ModelAlias, Target, check_aliases
from farm.sched.budget import BudgetRule
from farm.storage.s3 import ClipLayout, checkpoint_prefix, delete_clip

if TYPE_CHECKING:
    from farm.config import BatchSettings
    from farm.jobs.batches import BatchStore
    from farm.jobs.schedules import ScheduleStore
    from farm.jobs.store import Job, JobStore
    from farm.policy.index import RegistryCache
    from farm.policy.moderation import Moderator
    from farm.storage.s3 import ObjectStore
    from farm.webhooks.settings import WebhookSettings
    from farm.webhooks.store import WebhookStore

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d{1,18})-(\d{0,18})$")
# OpenAPI links: what a created video's id opens (lets fuzzers walk create → read → delete).
_VIDEO_LINKS = {
    name: {"operationId": op, "parameters": {"video_id": "$response.body#/id"}}
    for name, op in [("retrieve", "retrieveVideo"), ("cancel", "cancelVideo"),
                     ("content", "downloadVideoContent"), ("delete", "deleteVideo")]
}


class GatewayMetrics(Protocol):
    """Optional observer; the farm's Prometheus metrics implement it."""

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None: ...

    def video_created(self, model: str, priority: str) -> None: ...

    def video_refused(self, rule: str, kind: str, path: str) -> None: ...


@dataclass
class GatewayDeps:
    """What the gateway talks to, and its limits."""

    store: JobStore
    objects: ObjectStore | Callable[[], ObjectStore]  # a factory defers the boto3 client
    models: list[ModelSpec]
    # Names clients may send besides the model ids (OpenAI's tiers: farm.render.tiers).
    aliases: list[ModelAlias] = field(default_factory=list)
    # Queue caps per priority class, each counted apart (a bulk flood never refuses interactive
    # creates): queued interactive jobs beyond which interactive creates get 429, and the same
    # for bulk. None: no cap for that class.
    max_queued: int | None = None
    max_queued_bulk: int | None = None
    # The openai-poll-after-ms hint the SDK's poll() honours: a quarter of a job's estimated time
    # left, within [poll_after_min_ms, poll_after_max_ms]; poll_after_ms when there is no estimate.
    poll_after_ms: int = 1000
    poll_after_min_ms: int = 250
    poll_after_max_ms: int = 10_000
    # Queue positions and completion estimates (None: the objects carry nulls).
    queue: QueueView | None = None
    events_tick_s: float = 0.5  # how often the event streams' watcher reads the watched jobs
    event_stream_max_s: float = 600.0  # one event stream's longest life; the client resumes with Last-Event-ID
    on_created: Callable[[str], Awaitable[None] | None] | None = None  # wakes the dispatcher
    # API keys and rate limits; None serves one anonymous tenant (embedding, unit tests).
    auth: GatewayAuth | None = None
    max_queued_per_account: int | None = None
    invite_ttl_s: int = 7 * 24 * 3600
    # Per-account webhook endpoints (needs ``auth``: endpoints belong to accounts).
    webhooks: WebhookStore | None = None
    webhook_settings: WebhookSettings | None = None
    metrics: GatewayMetrics | None = None
    # Files, batches and schedules (farm.api.batch_routes); None: those routes are not served.
    batches: BatchStore | None = None
    schedules: ScheduleStore | None = None
    batch_settings: BatchSettings | None = None
    max_prompt_chars: int = 4000
    max_body_bytes: int = 16 * 1024 * 1024
    upload_limits: UploadLimits = field(default_factory=UploadLimits)
    # Daily accelerator budgets (farm.sched.budget); None: unlimited, and no budget routes.
    budgets: BudgetRule | None = None
    # Shares and unlisted links (farm.jobs.sharing), clip lifetimes (farm.jobs.expiry); None: built
    # over the job store's database with the default lifetimes.
    sharing: SharingStore | None = None
    lifetimes: Lifetimes | None = None
    # Seconds a presigned S3 URL lives when content downloads answer 307 to it (clients then fetch
    # from S3 directly, so it must be reachable by them); None: the gateway relays the bytes.
    content_redirect_s: int | None = None
    # The content policy every create passes (farm.policy.moderation); None: no moderation.
    moderator: Moderator | None = None
    # The protected-name registry behind the operator and rights-holder routes (needs ``auth``);
    # its cache is invalidated on every change made through this gateway. None: no such routes.
    policy_registry: RegistryCache | None = None
    # Cameos (farm.policy.cameos) and their source videos' limits; None: built over the job store's
    # database. Their consent is checked again when each job is stored, moderator or not.
    characters: CharacterStore | None = None
    cameo_limits: CameoLimits = field(default_factory=CameoLimits)
    # input_reference as {"image_url": "https://…"}: the SSRF guard's allowlist, byte and time limits of
    # the fetch (farm.api.image_refs). {"file_id": …} reads the caller's files in ``batches``.
    image_fetch: ImageFetch = field(default_factory=ImageFetch)
    _objects: ObjectStore | None = field(default=None, init=False, repr=False)
    _http: tuple[Any, httpx.AsyncClient] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("GatewayDeps.models must list at least one model")
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"GatewayDeps.models: model ids must be unique, got {ids}")
        check_aliases(self.models, self.aliases)
        for name in ("poll_after_ms", "max_prompt_chars", "max_body_bytes"):
            if getattr(self, name) < (0 if name == "poll_after_ms" else 1):
                raise ValueError(f"GatewayDeps.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.poll_after_min_ms <= self.poll_after_max_ms:
            raise ValueError(f"GatewayDeps: poll_after_min_ms ({self.poll_after_min_ms}) must be >= 0 and at most "
                             f"poll_after_max_ms ({self.poll_after_max_ms})")
        for name in ("max_queued", "max_queued_bulk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"GatewayDeps.{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.sharing is None:
            self.sharing = SharingStore(self.store.db, clock=self.store.now)
        if self.lifetimes is None:
            self.lifetimes = Lifetimes(self.store.db, clock=self.store.now)
        if self.characters is None:
            self.characters = CharacterStore(self.store.db, clock=self.store.now)

    def object_store(self) -> ObjectStore:
        """The object store, built by the factory on first use (blocking: call it off the event loop)."""
        with self._lock:
            if self._objects is None:
                self._objects = self.objects() if callable(self.objects) else self.objects
            return self._objects

    def http_client(self) -> httpx.AsyncClient:
        """The async HTTP client content downloads relay S3 through, one per event loop."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._http[0] is not loop:
            self._http = (loop, httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0),
                                                  limits=httpx.Limits(max_connections=512)))
        return self._http[1]

    def target(self, name: str | None) -> Target:
        """A request's ``model`` (a model id or an alias); 400 ``model_not_found`` lists every name."""
        return find_target(self.models, self.aliases, name)


# -- middleware ----------------------------------------------------------------------------


class _BodyLimit:
    """413 for bodies over ``limit``: by Content-Length up front, else by counting the stream."""

    def __init__(self, app: ASGIApp, limit: int, paths: dict[str, int] | None = None,
                 params: dict[str, str] | None = None) -> None:
        self.app, self.default, self.paths, self.params = app, limit, paths or {}, params or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.paths.get(scope["path"], self.default)  # a route with its own limit (file uploads)
        param = self.params.get(scope["path"], "file") if scope["path"] in self.paths else None
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            exc = PayloadTooLarge(f"request body of {int(length)} bytes exceeds the limit of {limit} bytes",
                                  param=param)
            return await _send_json(send, exc.status_code, exc.body())
        seen, over = 0, False
        too_large = PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", param=param)

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                over = True
                raise too_large
            return message

        async def answered(message: Message) -> None:
            # Whatever the route made of the interrupted body (FastAPI calls it a parse error,
            # a 400), the client hears why: 413. Nothing was sent yet, since reading came first.
            if not over:
                return await send(message)
            if message["type"] == "http.response.start":
                await _send_json(send, too_large.status_code, too_large.body())

        await self.app(scope, counted, answered)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class _ResponseHeaders:
    """Adds headers a route decided early (rate-limit state) to whatever response it ends with."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = (scope.get("state") or {}).get("response_headers") or {}
                present = {name.lower() for name, _ in message.get("headers", [])}
                added = [(k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, with_headers)


class _Timing:
    """Reports each request's route template, status and duration to ``GatewayMetrics``."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # a template, so labels stay few
            try:
                self.metrics.request_finished(scope["method"], route, status, time.perf_counter() - start)
            except Exception:  # a broken metrics hook must not break requests
                log.exception("metrics hook failed")


# -- request parsing -----------------------------------------------------------------------




class _RangeNotSatisfiable(InvalidRequest):
    status_code = 416
    default_code = "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"Range: not satisfiable for an object of {size} bytes",
                         headers={"Content-Range": f"bytes */{size}"})


# -- the routes ----------------------------------------------------------------------------


def _add_routes(app: FastAPI, deps: GatewayDeps) -> None:
    # Routes go on the app itself, not an included router, so a 405 can list every method of a path.

    async def owner(request: Request) -> str | None:
        """The caller's account id, as the auth gate (``AuthGate``) established it; None without auth."""
        return request.state.principal.account_id if deps.auth else None

    async def shown(job: Job, response: Response | None = None, *, usage: list[dict] | None = None,
                    read_usage: bool = True) -> dict[str, Any]:
        """The video object with its queue estimate and usage (``usage`` given, else read from the
        ledger unless ``read_usage`` is False: the field is then null); sets the poll hint on ``response``."""
        if usage is None and read_usage:
            # A job never claimed has run nothing: no ledger read on the hot path of queued polls.
            usage = [] if job.attempts == 0 else (await run_in_threadpool(deps.store.usage_of_jobs, [job.id]))[job.id]
        estimate = await deps.queue.estimate(job) if deps.queue is not None else None
        if response is not None:
            response.headers["openai-poll-after-ms"] = str(poll_after_ms(
                estimate.completion_at if estimate else None, time.time(), fallback_ms=deps.poll_after_ms,
                min_ms=deps.poll_after_min_ms, max_ms=deps.poll_after_max_ms))
        return video_object(job, estimate, usage, now=deps.store.now())

    async def streamed(job: Job) -> dict[str, Any]:
        """An event's video object: usage read for the final event only (updates carry null), so
        N open streams cost no ledger reads per tick."""
        return await shown(job, read_usage=job.terminal)

    watch = JobWatch(deps.store, deps.events_tick_s)
    app.state.job_watch = watch
    image_sources = ImageSources(deps.image_fetch, deps.batches, deps.object_store, deps.upload_limits.max_bytes)

    async def get_job(video_id: str, who: str | None) -> Job:
        """The caller's own video (what deleting, cancelling and sharing need); 404 otherwise."""
        job = await run_in_threadpool(deps.store.get, video_id, owner=who)
        if job is None:
            raise NotFound(f"video {video_id!r} not found", param="video_id")
        return job

    async def get_readable(video_id: str, who: str | None) -> Job:
        """The caller's video or one shared with the caller (reading, downloading, remixing); 404
        otherwise, worded as for an id that never existed."""
        job = await run_in_threadpool(deps.store.get, video_id, owner=who)  # the common case: one's own
        if job is None and who is not None:
            job = await run_in_threadpool(deps.sharing.readable, video_id, who)
        if job is None:
            raise NotFound(f"video {video_id!r} not found", param="video_id")
        return job

    @app.post(
        "/v1/videos", response_model=VideoObject, summary="Create a video job", operation_id="createVideo",
        responses={200: {"links": _VIDEO_LINKS}, 413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
                   409: {"model": ErrorResponse, "description": "Idempotency-Key reused for a different request."},
                   429: {"model": ErrorResponse, "description": "Queue full; retry after Retry-After seconds."}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/CreateVideoRequest"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/CreateVideoForm"}},
        }}},
    )
    async def create_video(request: Request, response: Response) -> dict[str, Any]:
        who = await owner(request)
        body, upload = await read_create_request(request, deps.upload_limits.max_bytes)
        target = deps.target(body.model)
        # Checked first (format, size, pixel count), so a bad upload is named as such; then kept for a
        # model that renders from an image, refused for one that renders from text only.
        # A request that uses a cameo and sends no image renders from the cameo's frame instead.
        cameo_only = (upload is None and body.input_reference is None
                      and bool(body.characters or mentions(body.prompt)))
        linked = body.input_reference
        if upload is None and linked is not None and needs_fetching(linked):
            # A file id or a URL is read only for a model that renders from an image: a text-only model
            # refuses it before anything is fetched. Its bytes then pass the upload's checks.
            if not target.limits.takes_image:
                raise text_only(target.limits)
            upload, linked = await image_sources.bytes_of(linked, who), None
        reference = None if cameo_only else await run_in_threadpool(
            check_reference, target.limits, upload, linked, deps.upload_limits)
        params = {"seed": body.seed, "steps": body.steps, "scheduler": body.scheduler,
                  "audio": body.audio} | cache_param(body.cache)
        return await shown(await _create_job(deps, request, who, target, body.prompt, body.size, body.seconds,
                                             params, body.priority, path="create", reference=reference,
                                             characters=body.characters or ()), response)

    # Remix, edit, extend: video-to-video from a source clip, through the same create path.
    add_derive_routes(app, deps, owner=owner, get_readable=get_readable, shown=shown, create_job=_create_job,
                      priority_name=_priority_name)

    @app.get("/v1/videos", response_model=VideoList, summary="List videos", operation_id="listVideos",
             responses={404: {"model": ErrorResponse, "description": "No video with the `after` id."}})
    async def list_videos(
        request: Request,
        after: str | None = Query(None, max_length=256, description="Id of the last video of the previous page."),
        limit: int = Query(20, ge=1, le=100, description="Videos per page."),
        order: Order = Query("desc", description="By creation time: 'desc' newest first, 'asc' oldest first."),
        shared: bool = Query(False, description=(
            "Farm extension: list the videos other accounts shared with you (by when each was shared) "
            "instead of your own.")),
    ) -> dict[str, Any]:
        who = await owner(request)
        try:
            if shared and who is not None:
                jobs, has_more = await run_in_threadpool(
                    lambda: deps.sharing.list_shared_with(who, after=after, limit=limit, order=order))
            elif shared:  # one anonymous tenant: nobody to share with
                jobs, has_more = [], False
            else:
                jobs, has_more = await run_in_threadpool(
                    lambda: deps.store.list(owner=who, after=after, limit=limit, order=order)
                )
        except ValueError as exc:  # an `after` id that does not exist (for this caller)
            raise NotFound(str(exc), param="after") from None
        usage = await run_in_threadpool(deps.store.usage_of_jobs, [j.id for j in jobs])
        data = [await shown(j, usage=usage[j.id]) for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    @app.get("/v1/videos/{video_id}", response_model=VideoObject, summary="Retrieve a video job",
             operation_id="retrieveVideo")
    async def retrieve_video(video_id: str, request: Request, response: Response) -> dict[str, Any]:
        return await shown(await get_readable(video_id, await owner(request)), response)

    @app.get(
        "/v1/videos/{video_id}/events", summary="Follow a video job as Server-Sent Events",
        operation_id="streamVideoEvents", response_class=EventSourceResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": (
            "`video.updated` events (the video object) whenever its status, progress, queue position or "
            "estimate changes, then one `video.completed`, `video.failed` or `video.cancelled` with the final "
            "object; the stream then ends. Send `Last-Event-ID` to resume without repeats.")}},
    )
    async def stream_events(video_id: str, request: Request) -> EventSourceResponse:
        job = await get_readable(video_id, await owner(request))
        events = video_events(watch, job, request.headers.get("last-event-id"), streamed,
                              max_s=deps.event_stream_max_s)
        return EventSourceResponse(events, ping=15, headers={"Cache-Control": "no-store"})

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, summary="Delete a video and its assets",
                operation_id="deleteVideo",
                responses={409: {"model": ErrorResponse, "description": "The video is still rendering."}})
    async def delete_video(video_id: str, request: Request) -> dict[str, Any]:
        """The owner deletes a video; so may the owner of a cameo it used (farm.jobs.sharing)."""
        who = await owner(request)
        job = await run_in_threadpool(deps.store.get, video_id, owner=who)
        if job is None and who is not None and await run_in_threadpool(deps.sharing.cameo_owner_may_delete,
                                                                       video_id, who):
            job, who = await run_in_threadpool(deps.store.get, video_id), None  # deleted whoever made it
        if job is None:
            raise NotFound(f"video {video_id!r} not found", param="video_id")
        if job.status == "in_progress":
            raise Conflict(f"video {video_id!r} is in_progress; cancel it (POST /v1/videos/{video_id}/cancel) "
                           "or wait until it finishes", param="video_id", code="video_in_progress")
        # Objects first: if this fails the row survives and a retried delete finishes the job.
        await run_in_threadpool(lambda: delete_clip(deps.object_store(), video_id))
        if await run_in_threadpool(lambda: deps.store.delete(video_id, owner=who)) is None:
            raise NotFound(f"video {video_id!r} not found", param="video_id")
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.post("/v1/videos/{video_id}/cancel", response_model=VideoObject, summary="Ask to cancel a video job",
              operation_id="cancelVideo")
    async def cancel_video(video_id: str, request: Request) -> dict[str, Any]:
        who = await owner(request)
        job = await run_in_threadpool(lambda: deps.store.request_cancel(video_id, owner=who))
        if job is None:
            raise NotFound(f"video {video_id!r} not found", param="video_id")
        if job.status == "cancelled" and job.checkpoint_key:
            # A queued job may hold a checkpoint (it was running before a restart): keep nothing.
            # (A running job's dispatcher drops its own when it stops at the shard boundary.)
            await run_in_threadpool(lambda: deps.object_store().delete_prefix(checkpoint_prefix(video_id)))
        return await shown(job)

    @app.get(
        "/v1/videos/{video_id}/content", summary="Download a finished video or a preview",
        operation_id="downloadVideoContent",
        response_class=StreamingResponse,
        responses={200: {"content": {"video/mp4": {}, "image/webp": {}, "image/jpeg": {}},
                         "description": "The bytes of the requested variant."},
                   206: {"description": "The requested byte range."},
                   307: {"description": "With serve.content_redirect: a short-lived presigned S3 URL of the bytes."},
                   416: {"model": ErrorResponse, "description": "The byte range is outside the object."}},
    )
    async def download_content(
        video_id: str, request: Request,
        variant: Variant = Query("video", description=f"Which asset: {', '.join(VARIANTS)}."),
    ) -> StreamingResponse:
        job = await get_readable(video_id, await owner(request))
        check_content(job, deps.store.now())
        return await _stream(deps, ClipLayout(video_id), variant, request.headers.get("range"))


def check_content(job: Job, now: Any) -> None:
    """Raise unless ``job`` has content to download now: 404 ``video_failed``/``video_cancelled``,
    ``video_not_ready`` while it renders, ``video_expired`` from ``expires_at`` on."""
    status = job.status
    if status in ("failed", "cancelled"):
        raise NotFound(f"video {job.id!r} is {status}; it has no content", param="video_id", code=f"video_{status}")
    if status != "completed":
        raise VideoNotReady(f"video {job.id!r} is not ready yet (status {status}); download it once it is "
                            "completed", param="video_id")
    if expired(job, now):
        when = job.expires_at or job.expired_at
        raise NotFound(f"video {job.id!r} expired at {when.isoformat()}; its content is no longer kept (the "
                       "video object stays)", param="video_id", code="video_expired")


def _priority_name(priority: int) -> str:
    return "bulk" if priority == PRIORITY_BULK else "interactive"


async def _create_job(
    deps: GatewayDeps, request: Request, who: str | None, target: Target, prompt: str,
    size: str | None, seconds: int | None, extra: dict[str, Any], priority: str,
    *, path: CreatePath, source_video_id: str | None = None, reference: CheckedImage | None = None,
    derived: dict[str, Any] | None = None, upload: CheckedSource | None = None,
    characters: Sequence[str] = (),
) -> Job:
    """Validate against the model (or the tier an alias names: its defaults for a size or duration not
    given, its mapping of OpenAI's) and the content policy, then queue (or replay an Idempotency-Key's
    earlier job). A refusal creates nothing: no job, no idempotency record, no usage.

    A ``reference`` image is stored under the new job's id before the job is queued, and deleted
    again when no new job owns it (see :mod:`farm.api.references`); so is an uploaded source clip
    (``upload``, :mod:`farm.api.sources`), whose key then completes ``derived`` (the job's
    ``derived_from``: what a remix, edit or extension renders from).

    Cameos (``@name`` in the prompt, ids in ``characters``) render through image-to-video from the
    first one's reference frame: a text-only ``target`` is replaced by the first image-to-video model
    this farm serves (``model`` still echoes what was asked); each use is recorded with the job."""
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise InvalidRequest(f"Idempotency-Key: {len(idempotency_key)} characters; allowed: 1..255",
                             param="Idempotency-Key")
    asked_model = target.name
    cameos = await _cameos(deps, prompt, characters)
    if cameos:
        if derived is not None:  # video-to-video renders from its source clip, not from an image
            raise InvalidRequest(f"prompt: a {path} renders from its source video and cannot use a cameo; use the "
                                 "cameo in POST /v1/videos", param="prompt", code="unsupported_parameter")
        if reference is not None:
            raise InvalidRequest("input_reference: a video that uses a cameo renders from the cameo's frame; send "
                                 "an image or a cameo, not both", param="input_reference",
                                 code="unsupported_parameter")
        if not target.spec.takes_image:
            target = _image_target(deps, target)
        extra = extra | {"characters": [c.id for c in cameos]}
    spec, placement = target.spec, place_request(target, size, seconds)
    size, seconds = placement.size, placement.seconds
    # A remix of an image-to-video clip has no image of its own (unless it uses a cameo).
    if spec.takes_image and reference is None and not cameos:
        raise InvalidRequest(f"input_reference: model {spec.id!r} renders from an image and needs one",
                             param="input_reference", code="missing_required_parameter")
    if reference is not None:  # the image is part of what was asked: another image is another request
        extra = extra | {REFERENCE_SHA256_PARAM: reference_digest(reference)}
    if derived is not None:  # so is the source: its id, or an upload's digest
        extra = extra | {DERIVED_FROM_PARAM: dict(derived)}
    if upload is not None:
        extra = extra | {SOURCE_SHA256_PARAM: upload.sha256}
    # What the client asked for, before defaults: a retry without a seed is the same request,
    # though this attempt would draw another random seed.
    asked = {"model": target.name, "prompt": prompt, "size": size, "seconds": seconds, "priority": priority, **extra}
    if placement.mapped_from:
        asked["mapped_from"] = placement.mapped_from
    fingerprint = hashlib.sha256(json.dumps(asked, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    params, stored = check_render(target.limits, prompt, size, seconds, extra, deps.max_prompt_chars)
    stored |= tier_params(target, placement)
    stored["request_fingerprint"] = fingerprint
    if cameos:
        stored[REFERENCE_KEY_PARAM] = cameos[0].reference_key
        if target.name != asked_model:  # routed to an image model: the video object echoes the request
            stored["requested_model"] = asked_model
    await _moderate(deps, ModerationRequest(params.prompt, who, spec.id, path, source_video_id,
                                            characters=tuple(characters)))
    lifetime_s = await run_in_threadpool(deps.lifetimes.lifetime_of, who)
    # Read before the create; the create refuses on it after replaying an Idempotency-Key's job.
    budget = None if deps.budgets is None else await run_in_threadpool(deps.store.budget_status, who, deps.budgets)
    bulk = priority == "bulk"
    video_id = reference_key = source_key = job = None
    if reference is not None:
        video_id = new_video_id()
        reference_key = await run_in_threadpool(lambda: store_reference(deps.object_store(), video_id, reference))
        stored[REFERENCE_KEY_PARAM] = reference_key
    if upload is not None:
        video_id = video_id or new_video_id()
        source_key = await run_in_threadpool(lambda: store_source(deps.object_store(), video_id, upload))
        stored[DERIVED_FROM_PARAM] = stored[DERIVED_FROM_PARAM] | {"key": source_key}
    try:
        job = await run_in_threadpool(
            lambda: deps.store.create(
                model=spec.id, prompt=params.prompt, size=size, seconds=seconds, params=stored,
                priority=PRIORITY_BULK if bulk else PRIORITY_INTERACTIVE, owner=who,
                max_queued=deps.max_queued_bulk if bulk else deps.max_queued,  # the cap of this class
                max_queued_per_owner=deps.max_queued_per_account,
                idempotency_key=idempotency_key, budget=budget, expires_in_s=lifetime_s, video_id=video_id,
                on_insert=(lambda conn, new: deps.characters.admit(conn, new, [c.id for c in cameos])) if cameos
                else None,
            )
        )
    except CameoRefused as exc:  # consent taken back (or the cameo deleted) since it was checked
        raise refused(exc) from None
    except BudgetExceeded as exc:
        raise budget_refused(exc.budget, deps.store.now()) from None
    except QueueFull as exc:
        whose = "your account's" if exc.scope == "account" else f"the farm's {priority}"
        raise RateLimited(f"{whose} render queue is full ({exc.queued} jobs waiting, limit {exc.max_queued}); "
                          "nothing was created, retry later", retry_after_s=exc.retry_after_s,
                          code="account_queue_full" if exc.scope == "account" else "queue_full") from None
    except IdempotencyConflict as exc:
        raise Conflict(str(exc), param="Idempotency-Key", code="idempotency_key_reused") from None
    except ValueError as exc:  # the store's own checks; ours ran first, so this is rare
        raise InvalidRequest(str(exc), param=param_of(str(exc))) from None
    finally:
        if reference_key is not None and (job is None or job.id != video_id):  # refused, or a replay
            await run_in_threadpool(lambda: drop_unowned(deps.object_store(), reference_key))
        if source_key is not None and (job is None or job.id != video_id):
            await run_in_threadpool(lambda: drop_unowned(deps.object_store(), source_key))
    await _notify(deps, job.id)
    if deps.metrics:
        try:
            deps.metrics.video_created(spec.id, priority)
        except Exception:  # the job exists; a broken metrics hook must not turn that into an error
            log.exception("metrics hook failed")
    return job


async def _cameos(deps: GatewayDeps, prompt: str, ids: Sequence[str]) -> list[Character]:
    """The cameos a request uses (400 ``character_not_found`` for one that does not exist)."""
    if not ids and "@" not in prompt:
        return []
    try:
        return await run_in_threadpool(deps.characters.resolve, prompt, ids)
    except CameoRefused as exc:
        raise refused(exc) from None


def _image_target(deps: GatewayDeps, asked: Target) -> Target:
    """Where a cameo renders when the model asked for renders from text only: the first image-to-video
    model of this farm's ``models``, in their configured order; 400 when it serves none."""
    for spec in deps.models:
        if spec.takes_image:
            return deps.target(spec.id)
    raise InvalidRequest(f"model: {asked.name!r} renders from text only and this farm serves no image-to-video "
                         "model, which cameos render through", param="model", code="cameo_model_unavailable")


async def _moderate(deps: GatewayDeps, request: ModerationRequest) -> None:
    """The content policy, off the event loop (a registry refresh reads the database)."""
    if deps.moderator is None:
        return
    try:
        await run_in_threadpool(moderate, deps.moderator, request)
    except ContentPolicyViolation as exc:
        if deps.metrics:
            try:
                deps.metrics.video_refused(exc.rule, exc.kind, request.path)
            except Exception:  # the refusal stands; a broken metrics hook must not turn it into a 500
                log.exception("metrics hook failed")
        raise
    except Exception as exc:
        log.exception("the moderator failed on a %s request", request.path)
        raise ServiceUnavailable(f"the content policy check did not answer ({type(exc).__name__}); nothing was "
                                 "created, retry later") from None


async def _stream(deps: GatewayDeps, layout: ClipLayout, variant: str, range_header: str | None) -> StreamingResponse:
    """The object's bytes, relayed from S3 on the event loop (an async HTTP GET of a presigned URL):
    a slow client holds a socket and a buffer, never a thread-pool thread the store calls need."""
    objects, key = await run_in_threadpool(deps.object_store), layout.key(variant)
    if deps.content_redirect_s is not None:
        return await _redirect(objects, layout, variant, deps.content_redirect_s)
    byte_range = _requested_range(range_header)
    headers = {} if byte_range is None else {"Range": f"bytes={byte_range[0]}-{'' if byte_range[1] is None else byte_range[1]}"}
    http = deps.http_client()
    try:
        reply = await http.send(http.build_request("GET", objects.presigned_get(key, 60), headers=headers), stream=True)
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(f"the object store did not answer ({type(exc).__name__}); retry later") from None
    if reply.status_code in (200, 206):
        out = {"Content-Length": reply.headers["content-length"], "Accept-Ranges": "bytes"}
        if reply.status_code == 206:
            out["Content-Range"] = reply.headers["content-range"]
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code,
                                 media_type=layout.content_type(variant), headers=out,
                                 background=BackgroundTask(reply.aclose))
    await reply.aclose()
    if reply.status_code == 404:
        raise NotFound(f"variant {variant!r} of video {layout.video_id!r} is not stored", param="variant")
    if reply.status_code == 416:  # the range starts past the end: say how long the object is
        info = await run_in_threadpool(objects.head, key)
        raise _RangeNotSatisfiable(info.size if info is not None else 0)
    log.warning("object store answered %d for GET %s", reply.status_code, key)
    raise ServiceUnavailable(f"the object store answered {reply.status_code}; retry later")


async def _redirect(objects: ObjectStore, layout: ClipLayout, variant: str, lifetime_s: int) -> Response:
    """307 to a presigned URL of the object (the client sends its ``Range`` there). The object is
    looked up first, so a missing variant is still a 404 in the OpenAI shape, not S3's XML."""
    key = layout.key(variant)
    try:
        info = await run_in_threadpool(objects.head, key)
        url = objects.presigned_get(key, lifetime_s)
    except Exception as exc:  # the store's own errors, after its retries
        raise ServiceUnavailable(f"the object store did not answer ({type(exc).__name__}); retry later") from None
    if info is None:
        raise NotFound(f"variant {variant!r} of video {layout.video_id!r} is not stored", param="variant")
    return Response(status_code=307, headers={"Location": url, "Cache-Control": f"private, max-age={lifetime_s}"})


def _requested_range(header: str | None) -> tuple[int, int | None] | None:
    """(first, last or None) of a single-range ``Range`` header; None means the whole object
    (absent, multi-range and suffix ranges: RFC 9110 allows sending it whole). The object store
    clamps ``last`` to the object and refuses a range past its end (416)."""
    match = _RANGE.match(header.strip()) if header else None
    if not match:
        return None
    first, last = int(match.group(1)), int(match.group(2)) if match.group(2) else None
    if last is not None and last < first:
        return None  # not a valid range: ignored, as RFC 9110 says
    return first, last


async def _notify(deps: GatewayDeps, video_id: str) -> None:
    """Wake the dispatcher. The job is already durable, so a failure here is logged, not raised."""
    if deps.on_created is None:
        return
    try:
        result = deps.on_created(video_id)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("on_created(%s) failed; the dispatcher will find the job on its next scan", video_id)


# -- assembly ------------------------------------------------------------------------------


def _openapi(app: FastAPI, deps: GatewayDeps) -> dict[str, Any]:
    """FastAPI's schema plus the create body (read by hand, so declared here) with this farm's limits."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    # FastAPI documents its 422 validation errors; this gateway answers them as 400s.
    for path in schema["paths"].values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in json.dumps(response):
                del operation["responses"]["422"]
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components.update(create_body_schemas(deps.models, deps.max_prompt_chars, deps.aliases))
    if deps.auth is not None:
        # Every route but the public ones takes a key; /v1/admin/* takes the operator's.
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        public = {"/healthz", "/v1/invites/redeem", "/v1/shared/{token}", "/v1/shared/{token}/content"}
        for path, item in schema["paths"].items():
            for operation in item.values():
                if path not in public:
                    operation["security"] = [{"bearer": []}]
                    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
                    responses = operation.setdefault("responses", {})
                    responses["401"] = {"description": "Missing, unknown or revoked API key.", "content": error}
                    responses.setdefault("429", {"description": "Rate limit reached (per key; refused keys per "
                                                                "address); retry after Retry-After seconds.",
                                                 "content": error})
    app.openapi_schema = schema
    return schema


def _owner_of(deps: GatewayDeps) -> Callable[[Request], Awaitable[str | None]]:
    async def owner(request: Request) -> str | None:
        return request.state.principal.account_id if deps.auth else None

    return owner


def create_app(deps: GatewayDeps) -> FastAPI:
    """The gateway app; no work happens until it serves a request."""
    app = FastAPI(
        title="videofarm", version=__version__,
        description="OpenAI-compatible text-to-video API of a videofarm render farm.", responses=ERROR_RESPONSES,
    )
    install_error_handlers(app)
    # Before the video routes: GET /v1/videos/{video_id} would otherwise take /v1/videos/characters.
    add_character_routes(app, deps, _owner_of(deps))
    _add_routes(app, deps)
    if deps.auth is not None:
        from farm.api.account_routes import add_account_routes

        auth = deps.auth

        async def principal(request: Request) -> Principal:
            return request.state.principal

        add_account_routes(app, auth, deps.invite_ttl_s, principal)
        if deps.webhooks is not None:
            from farm.api.webhook_routes import add_webhook_routes
            from farm.webhooks.guard import UrlGuard
            from farm.webhooks.settings import WebhookSettings

            hooks, hook_settings = deps.webhooks, deps.webhook_settings or WebhookSettings()

            async def account_id(request: Request) -> str:
                return request.state.principal.account_id

            add_webhook_routes(app, store_of=lambda: hooks, account_of=account_id,
                               guard=UrlGuard.from_settings(hook_settings), settings=hook_settings)
        if deps.policy_registry is not None:
            from farm.api.policy_routes import add_policy_routes

            add_policy_routes(app, deps.policy_registry, principal)

    from farm.api.sharing_routes import add_sharing_routes

    add_sharing_routes(app, deps, _owner_of(deps), deps.auth.accounts if deps.auth is not None else None)
    add_model_routes(app, deps.models, deps.aliases)
    add_usage_routes(app, deps.store, deps.budgets or BudgetRule(), owner_of=_owner_of(deps),
                     accounts=deps.auth.accounts if deps.auth is not None else None)
    body_limits = {"/v1/videos/characters": deps.cameo_limits.max_bytes + 1024 * 1024}  # the video and framing
    if deps.batches is not None and deps.schedules is not None and deps.batch_settings is not None:
        from farm.api.batch_routes import BatchDeps, add_batch_routes

        async def caller(request: Request) -> str | None:
            return request.state.principal.account_id if deps.auth else None

        batch_deps = BatchDeps(deps.batches, deps.schedules, deps.store, deps.batch_settings, deps.object_store,
                               caller, wake=lambda: _notify(deps, "batch"), image_limits=deps.upload_limits)
        add_batch_routes(app, batch_deps)
        body_limits["/v1/files"] = batch_deps.max_file_bytes + 1024 * 1024  # the multipart framing besides the file

    @app.get("/healthz", response_model=Health, summary="Liveness", operation_id="healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": [m.id for m in deps.models]}

    app.openapi = lambda: _openapi(app, deps)  # type: ignore[method-assign]
    app.add_middleware(_ResponseHeaders)
    if deps.auth is not None:  # outside the routes: no route reads a request the gate refused
        app.add_middleware(AuthGate, auth=deps.auth)
    app.add_middleware(_BodyLimit, limit=deps.max_body_bytes, paths=body_limits,
                       params={"/v1/videos/characters": "video"})
    if deps.metrics is not None:
        app.add_middleware(_Timing, metrics=deps.metrics)
    app.state.deps = deps
    return app


__all__ = ["GatewayDeps", "GatewayMetrics", "create_app"]
