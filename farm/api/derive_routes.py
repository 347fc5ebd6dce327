"""Remix, edit and extend: new clips rendered video-to-video from a source clip's pixels.

- ``POST /v1/videos/{id}/remix`` (``prompt``; farm extension ``strength``): the source's model, size,
  duration, steps, scheduler and seed, the source's frames as the start, a new prompt.
- ``POST /v1/videos/edits`` (``prompt``, ``video``): ``video`` is ``{"id": …}`` of a completed video
  the caller can read (JSON, or the form field ``video[id]``), or an uploaded MP4 (a file part
  ``video``). By id it renders like a remix; an upload renders on ``model`` (default: the first
  served) at ``size`` (default: its first) and ``seconds`` (default: its first).
- ``POST /v1/videos/extensions`` (``prompt``, ``seconds``, ``video``): renders ``seconds`` more from the
  source's last frame and stitches source + new part into one clip; the video object's ``seconds``
  is the stitched total. Why video-to-video from the last frame rather than image-to-video: it runs
  on the text-to-video model the farm serves (an I2V model need not be served at all), so every
  Wan model can extend, and the new part starts from the source's pixels without a second model.

The strength rule (:func:`farm.render.registry.check_strength`): of the job's ``steps``, the last
``int(steps × strength)`` run, from the source's latents noised to the first of them; defaults are
:data:`farm.render.registry.DEFAULT_STRENGTH` (remix and edit 0.6, extend 0.7).

A source that is not ``completed`` (queued, in progress, failed, cancelled), or whose content has
expired, is a 400 naming its status; a video the caller cannot read is a 404. Every route goes
through the gateway's one create path (``_create_job``): the tier, the model's limits, the content
policy (paths ``remix``, ``edit``, ``extend``), budgets, the queue caps and ``Idempotency-Key``.
Each job records ``derived_from`` = ``{"video_id", "key", "action"}`` in its params: the source's id
(None for an upload), the object key of its MP4, and ``remix`` / ``edit`` / ``extend``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from farm.api.errors import ErrorResponse, InvalidRequest, UnsupportedMediaType, from_pydantic
from farm.api.schemas import CreateVideoRequest, RemixVideoRequest, VideoObject, _whole_number
from farm.api.sources import CheckedSource, check_source
from farm.jobs.expiry import expired
from farm.render.registry import DEFAULT_STRENGTH, check_strength
from farm.storage.s3 import ClipLayout

if TYPE_CHECKING:
    from farm.api.app import GatewayDeps
    from farm.jobs.store import Job
    from farm.render.tiers import Target

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_RESPONSES = {400: {"model": ErrorResponse, "description": "The source is not completed, or a field is not allowed."},
              404: {"model": ErrorResponse, "description": "No such video for this caller."},
              409: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
              429: {"model": ErrorResponse, "description": "Queue full or rate limited; retry later."}}


class EditVideoRequest(BaseModel):
    """``POST /v1/videos/edits`` besides ``video``: the prompt, and farm extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="How to change the source video.")
    strength: float | None = Field(default=None, description="Farm extension: in (0, 1]; default 0.6 for an edit, "
                                   "0.7 for an extension.")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Farm extension: for an uploaded source; "
                             "by id the source's seed is kept.")
    model: str | None = Field(default=None, description="Farm extension, uploads only: the model or tier to render "
                              "on; by id the source's.")
    size: str | None = Field(default=None, description="Farm extension, uploads only: WIDTHxHEIGHT; by id the "
                             "source's.")
    seconds: int | None = Field(default=None, description="Uploads only: the clip's duration (edits; by id the "
                                "source's), or the new part's (extensions, required).")

    @field_validator("seed", "seconds", mode="before")
    @classmethod
    def _numbers(cls, value: Any, info: Any) -> Any:
        return _whole_number(info.field_name, value)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return CreateVideoRequest._prompt(value)


async def read_derive_request(request: Request, max_file_bytes: int) -> tuple[EditVideoRequest, str | None,
                                                                               bytes | None]:
    """The body of an edit or extension (JSON or multipart), the source's video id, and an uploaded MP4's
    bytes (read to one byte past ``max_file_bytes``); exactly one of id and upload, else 400 on ``video``."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data: dict[str, Any] = {}
    video_id: str | None = None
    upload: bytes | None = None
    if media in _FORM_TYPES:
        async with request.form(max_files=2, max_fields=32) as form:
            for key, value in form.multi_items():
                if key in data or (key.startswith("video") and (video_id is not None or upload is not None)):
                    raise InvalidRequest(f"{key}: given more than once", param=key)
                if key == "video" and isinstance(value, UploadFile):
                    upload = await value.read(max_file_bytes + 1)
                elif key == "video[id]" and isinstance(value, str):
                    video_id = value
                elif isinstance(value, UploadFile):
                    raise InvalidRequest(f"{key}: file uploads are only accepted for video", param=key)
                elif key == "video":
                    raise InvalidRequest("video: send {\"id\": ...} (the form field video[id]) or an MP4 file part",
                                         param="video")
                else:
                    data[key] = value
    elif media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted; send application/json or "
                                   "multipart/form-data")
    else:
        raw = await request.body()
        try:
            data = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object", code="invalid_json")
        video = data.pop("video", None)
        if video is not None:
            if not isinstance(video, dict) or set(video) != {"id"} or not isinstance(video["id"], str):
                raise InvalidRequest("video: must be {\"id\": \"<video id>\"} in JSON (an MP4 goes as a multipart "
                                     "file part)", param="video")
            video_id = video["id"]
    if video_id is None and upload is None:
        raise InvalidRequest("video: required; send {\"id\": ...} of a completed video or an MP4 file part",
                             param="video", code="missing_required_parameter")
    if video_id is not None and not video_id:
        raise InvalidRequest("video.id: must not be empty", param="video.id")
    try:
        body = EditVideoRequest.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, allowed=("video", *EditVideoRequest.model_fields)) from None
    return body, video_id, upload


def completed_source(job: Job, now: Any, param: str, action: str) -> Job:
    """``job`` if its clip can be derived from now; a 400 naming its status (or its expiry) otherwise."""
    if job.status != "completed":
        raise InvalidRequest(f"{param}: video {job.id!r} is {job.status}; only a completed video can be {action}ed "
                             "(wait until it completes, or pick another)", param=param, code="video_not_completed")
    if expired(job, now):
        raise InvalidRequest(f"{param}: video {job.id!r} has expired; its content is no longer kept, so it cannot "
                             f"be {action}ed", param=param, code="video_expired")
    return job


def derive_target(target: Target) -> Target:
    """``target`` if its model renders video-to-video; 400 on ``model`` otherwise."""
    if not target.spec.takes_video:
        raise InvalidRequest(f"model: {target.spec.id!r} (family {target.spec.family!r}) does not render from a "
                             "video; remix, edit and extend need a Wan text-to-video model", param="model",
                             code="unsupported_parameter")
    return target


def strength_of(asked: float | None, action: str, steps: int) -> float:
    """The request's strength or the action's default, checked against the job's steps (400 on ``strength``)."""
    try:
        return check_strength(DEFAULT_STRENGTH[action] if asked is None else asked, steps)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="strength") from None


CreateJob = Callable[..., Awaitable["Job"]]


def _body_schemas(extend: bool) -> dict[str, Any]:
    """The OpenAPI request body of an edit or extension: JSON with ``video`` = ``{"id"}``, or multipart
    with ``video`` as an MP4 file part (or the field ``video[id]``)."""
    base = EditVideoRequest.model_json_schema()
    base.pop("$defs", None)
    required = ["prompt", "video"] + (["seconds"] if extend else [])
    by_id = {"type": "object", "properties": {"id": {"type": "string", "minLength": 1}}, "required": ["id"],
             "additionalProperties": False, "description": "A completed video you can read."}
    as_json = base | {"properties": base["properties"] | {"video": by_id}, "required": required}
    form_props = dict(base["properties"]) | {
        "video": {"type": "string", "format": "binary", "description": "An MP4 file (video/mp4)."},
        "video[id]": {"type": "string", "minLength": 1, "description": "Instead of a file: a video id."}}
    as_form = {"type": "object", "properties": form_props, "required": ["prompt"] + (["seconds"] if extend else [])}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": as_json},
                                                          "multipart/form-data": {"schema": as_form}}}}


def add_derive_routes(app: FastAPI, deps: GatewayDeps, *, owner: Callable[[Request], Awaitable[str | None]],
                      get_readable: Callable[[str, str | None], Awaitable[Job]],
                      shown: Callable[..., Awaitable[dict[str, Any]]], create_job: CreateJob,
                      priority_name: Callable[[int], str]) -> None:
    """Register the three routes on ``app`` (the gateway's own helpers passed in, so the checks are its)."""

    def source_target(source: Job) -> Target:
        # Under the alias the source was asked for (the derived clip echoes it too), if this farm still has it.
        requested = source.params.get("requested_model")
        return derive_target(deps.target(requested if any(a.id == requested for a in deps.aliases)
                                         else source.model))

    async def from_video(request: Request, response: Response, who: str | None, source: Job, *, prompt: str,
                         strength: float | None, action: str, seconds: int | None = None) -> dict[str, Any]:
        """A job derived from a farm video: its model, size and settings (an extension: ``seconds`` more)."""
        target = source_target(source)
        steps = int(source.params.get("steps") or target.spec.default_steps)
        params: dict[str, Any] = {k: source.params.get(k) for k in ("seed", "steps", "scheduler")}
        params["strength"] = strength_of(strength, action, steps)
        # The source's whole clip: an extension's MP4 holds its source too.
        total = int(source.seconds) + int(source.params.get("stitch_seconds") or 0)
        if action == "extend":
            params["stitch_seconds"] = total
        else:
            params["remixed_from_video_id"] = source.id
        derived = {"video_id": source.id, "key": ClipLayout(source.id).key("video"), "action": action}
        job = await create_job(deps, request, who, target, prompt, source.size,
                               seconds if action == "extend" else total, params,
                               priority_name(source.priority), path=action, source_video_id=source.id,
                               derived=derived)
        return await shown(job, response)

    async def from_upload(request: Request, response: Response, who: str | None, body: EditVideoRequest,
                          upload: bytes, *, action: str) -> dict[str, Any]:
        """A job derived from an uploaded MP4, on ``body.model`` at ``body.size`` and ``body.seconds``."""
        checked: CheckedSource = await run_in_threadpool(check_source, upload, deps.upload_limits)
        target = derive_target(deps.target(body.model))
        steps = target.limits.default_steps
        params: dict[str, Any] = {"seed": body.seed, "steps": None, "scheduler": None,
                                  "strength": strength_of(body.strength, action, steps)}
        if action == "extend":
            params["stitch_seconds"] = checked.whole_seconds
        derived = {"video_id": None, "key": None, "action": action}  # the key once stored under the new job
        job = await create_job(deps, request, who, target, body.prompt, body.size, body.seconds, params,
                               "interactive", path=action, derived=derived, upload=checked)
        return await shown(job, response)

    def only_for_uploads(body: EditVideoRequest, action: str) -> None:
        for name in ("model", "size", "seed") + (("seconds",) if action == "edit" else ()):
            if getattr(body, name) is not None:
                raise InvalidRequest(f"{name}: only for an uploaded source; an {action} of a video id keeps the "
                                     f"source's {name}", param=name, code="unsupported_parameter")

    @app.post("/v1/videos/{video_id}/remix", response_model=VideoObject, operation_id="remixVideo",
              summary="Remix a completed video with a new prompt (video-to-video from its frames)",
              responses=_RESPONSES)
    async def remix_video(video_id: str, body: RemixVideoRequest, request: Request,
                          response: Response) -> dict[str, Any]:
        """The source's frames, noised to ``strength``, start the render under the new prompt. A video
        shared with the caller may be remixed too; the remix is the caller's own private draft."""
        who = await owner(request)
        source = completed_source(await get_readable(video_id, who), deps.store.now(), "video_id", "remix")
        return await from_video(request, response, who, source, prompt=body.prompt, strength=body.strength,
                                action="remix")

    @app.post("/v1/videos/edits", response_model=VideoObject, operation_id="editVideo",
              summary="Edit a completed video or an uploaded MP4 with a prompt", responses=_RESPONSES,
              openapi_extra=_body_schemas(extend=False))
    async def edit_video(request: Request, response: Response) -> dict[str, Any]:
        who = await owner(request)
        body, video_id, upload = await read_derive_request(request, deps.upload_limits.max_bytes)
        if upload is not None:
            return await from_upload(request, response, who, body, upload, action="edit")
        only_for_uploads(body, "edit")
        source = completed_source(await get_readable(video_id, who), deps.store.now(), "video.id", "edit")
        return await from_video(request, response, who, source, prompt=body.prompt, strength=body.strength,
                                action="edit")

    @app.post("/v1/videos/extensions", response_model=VideoObject, operation_id="extendVideo",
              summary="Extend a completed video or an uploaded MP4 by `seconds`, stitched into one clip",
              responses=_RESPONSES, openapi_extra=_body_schemas(extend=True))
    async def extend_video(request: Request, response: Response) -> dict[str, Any]:
        who = await owner(request)
        body, video_id, upload = await read_derive_request(request, deps.upload_limits.max_bytes)
        if body.seconds is None:
            raise InvalidRequest("seconds: required; the length of the new part", param="seconds",
                                 code="missing_required_parameter")
        if upload is not None:
            return await from_upload(request, response, who, body, upload, action="extend")
        only_for_uploads(body, "extend")
        source = completed_source(await get_readable(video_id, who), deps.store.now(), "video.id", "extend")
        return await from_video(request, response, who, source, prompt=body.prompt, strength=body.strength,
                                action="extend", seconds=body.seconds)
