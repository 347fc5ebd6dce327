"""Files and batches the OpenAI way, and schedules (a farm extension), for ``/v1/videos``.

    POST /v1/files (multipart: file, purpose=batch|vision|user_data)   GET /v1/files   GET|DELETE /v1/files/{id}
    GET /v1/files/{id}/content
    POST /v1/batches   GET /v1/batches   GET /v1/batches/{id}   POST /v1/batches/{id}/cancel
    POST /v1/schedules   GET /v1/schedules   GET|DELETE /v1/schedules/{id}
    POST /v1/schedules/{id}/pause   POST /v1/schedules/{id}/resume

The shapes are the ``openai`` SDK's ``FileObject``, ``FileDeleted``, ``Batch`` (with
``request_counts``, ``errors``) and cursor pages. An upload streams from the request to S3: the
multipart parser spools it to a temporary file (memory up to 1 MiB, disk beyond), one pass counts
its bytes, lines and longest line against ``batches.*`` limits, and the upload to S3 reads it in
parts. A file of purpose ``vision`` or ``user_data`` must be an image within the upload limits of
``input_reference`` (``serve.max_upload_mb``, ``serve.max_upload_pixels``; checked as an uploaded
image is): a video create names it as ``input_reference: {"file_id": …}`` (``farm.api.image_refs``).
Every object belongs to the account that made it; another account's ids are 404.
The gateway only records and cancels: the leading dispatcher's batch runner
(``farm.jobs.batch_runner``) validates lines, queues videos and writes the result files.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from farm.api.errors import Conflict, ErrorResponse, InvalidRequest, NotFound, PayloadTooLarge, RateLimited
from farm.api.image_refs import IMAGE_PURPOSES
from farm.api.uploads import ALLOWED_FORMATS, UploadLimits, check_image
from farm.db import unix
from farm.jobs.batch_runner import file_key, lines_of
from farm.jobs.batches import COMPLETION_WINDOW_S, ENDPOINT, BatchRecord, BatchStore, Counts, FileRecord, new_id
from farm.jobs.schedules import ScheduleRecord, ScheduleStore, check_cron, check_timezone
from farm.storage.s3 import ObjectNotFound, checkpoint_prefix

if TYPE_CHECKING:
    from farm.config import BatchSettings
    from farm.jobs.store import JobStore
    from farm.storage.s3 import ObjectStore

MiB = 1024 * 1024
_READ = MiB


@dataclass
class BatchDeps:
    """What these routes talk to."""

    batches: BatchStore
    schedules: ScheduleStore
    jobs: JobStore
    settings: BatchSettings
    object_store: Callable[[], ObjectStore]  # blocking: call in the thread pool
    owner: Callable[[Request], Awaitable[str | None]]
    wake: Callable[[], Awaitable[None]] | None = None  # the dispatcher, so a new batch starts now
    image_limits: UploadLimits = field(default_factory=UploadLimits)  # files of the image purposes

    @property
    def max_file_bytes(self) -> int:
        return int(self.settings.max_file_mb * MiB)


# -- request and response models -------------------------------------------------------------


class CreateBatchRequest(BaseModel):
    """``client.batches.create``'s body."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64, description="A file uploaded with purpose 'batch'.")
    endpoint: str = Field(description=f"Must be {ENDPOINT!r}: every line is a video create.")
    completion_window: str = Field(description="Must be '24h'.")
    metadata: dict[str, str] | None = Field(default=None, description="Up to 16 key-value pairs kept with the batch.")
    output_expires_after: dict[str, Any] | None = Field(
        default=None, description="Accepted for compatibility; result files are kept until deleted.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value != ENDPOINT:
            raise ValueError(f"endpoint: {value!r} is not served by this farm; allowed: {ENDPOINT}")
        return value

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if value not in COMPLETION_WINDOW_S:
            raise ValueError(f"completion_window: {value!r} is not allowed; allowed: {', '.join(COMPLETION_WINDOW_S)}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError(f"metadata: {len(value)} keys; allowed: at most 16")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError(f"metadata: key {key[:64]!r}: keys may have 64 characters, values 512")
        return value


class CreateScheduleRequest(BaseModel):
    """``POST /v1/schedules``: every run of ``cron`` in ``timezone`` is a batch of ``input_file_id``."""

    model_config = ConfigDict(extra="forbid")

    cron: str = Field(min_length=1, max_length=255, description="Five cron fields, e.g. '0 3 * * *'.")
    timezone: str = Field(default="UTC", min_length=1, max_length=64, description="IANA zone, e.g. 'Asia/Tokyo'.")
    input_file_id: str = Field(min_length=1, max_length=64, description="A file uploaded with purpose 'batch'.")
    missed: Literal["skip", "run_once"] = Field(
        default="skip", description="A run missed while the farm was down: 'skip' it, or 'run_once' on start.")
    name: str = Field(default="", max_length=255, description="A label for people.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        check_timezone(value)
        return value


def file_object(record: FileRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "file", "bytes": record.bytes, "created_at": unix(record.created_at),
            "filename": record.filename, "purpose": record.purpose, "status": "processed",
            "expires_at": unix(record.expires_at), "status_details": None}


def batch_object(batch: BatchRecord, counts: Counts) -> dict[str, Any]:
    times = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
             "expired_at", "cancelling_at", "cancelled_at")
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window, "status": batch.status, "errors": batch.errors,
        "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": batch.meta or None,
        **{name: unix(getattr(batch, name)) for name in times},
    }


def schedule_object(record: ScheduleRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "schedule", "name": record.name, "cron": record.cron,
            "timezone": record.timezone, "input_file_id": record.input_file_id, "missed": record.missed,
            "paused": record.paused, "next_run_at": unix(record.next_run_at), "last_run_at": unix(record.last_run_at),
            "last_batch_id": record.last_batch_id, "runs": record.runs, "skipped": record.skipped,
            "created_at": unix(record.created_at)}


def _list(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


# -- the upload scan ---------------------------------------------------------------------------


def scan_upload(handle: BinaryIO, settings: BatchSettings) -> tuple[int, int]:
    """(bytes, request lines) of an uploaded batch file, read once in chunks; the first limit it breaks
    is a 4xx naming ``file``. Leaves the handle at its start, for the upload."""
    max_bytes, max_line = int(settings.max_file_mb * MiB), int(settings.max_line_kb * 1024)
    handle.seek(0)
    size = 0

    def chunks():
        nonlocal size
        while chunk := handle.read(_READ):
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"file: more than {max_bytes} bytes; allowed: at most {settings.max_file_mb:g} "
                                      "MiB (batches.max_file_mb)", param="file")
            yield chunk

    requests = 0
    for line in lines_of(chunks(), max_line):
        if line.length > max_line:
            raise InvalidRequest(f"file: line {line.number} has {line.length} bytes; allowed: at most {max_line} "
                                 "(batches.max_line_kb)", param="file", code="line_too_long")
        if line.data.strip():
            requests += 1
            if requests > settings.max_lines:
                raise InvalidRequest(f"file: more than {settings.max_lines} request lines; allowed: at most "
                                     f"{settings.max_lines} (batches.max_lines)", param="file", code="too_many_lines")
    if requests == 0:
        raise InvalidRequest("file: has no request lines; a batch file has one JSON request per line", param="file",
                             code="empty_file")
    handle.seek(0)
    return size, requests


# -- the routes --------------------------------------------------------------------------------


def add_batch_routes(app: FastAPI, deps: BatchDeps) -> None:
    batches, schedules = deps.batches, deps.schedules
    not_found = {404: {"model": ErrorResponse}}

    async def my_file(file_id: str, who: str | None) -> FileRecord:
        record = await run_in_threadpool(batches.get_file, file_id, who)
        if record is None:
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        return record

    async def my_batch(batch_id: str, who: str | None) -> BatchRecord:
        record = await run_in_threadpool(batches.get_batch, batch_id, who)
        if record is None:
            raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
        return record

    async def my_schedule(schedule_id: str, who: str | None) -> ScheduleRecord:
        record = await run_in_threadpool(schedules.get, schedule_id, who)
        if record is None:
            raise NotFound(f"schedule {schedule_id!r} not found", param="schedule_id")
        return record

    async def batch_input(file_id: str, who: str | None) -> FileRecord:
        record = await run_in_threadpool(batches.get_file, file_id, who)
        if record is None:
            raise NotFound(f"input_file_id: file {file_id!r} not found", param="input_file_id")
        if record.purpose != "batch":
            raise InvalidRequest(f"input_file_id: file {file_id!r} has purpose {record.purpose!r}; allowed: batch",
                                 param="input_file_id")
        return record

    async def wake() -> None:
        if deps.wake is not None:
            await deps.wake()

    # -- files --

    @app.post("/v1/files", summary="Upload a batch input file", operation_id="createFile", tags=["batches"],
              responses={413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}})
    async def create_file(request: Request) -> dict[str, Any]:
        who = await deps.owner(request)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "multipart/form-data":
            raise InvalidRequest(f"Content-Type {media!r}: upload files as multipart/form-data with the fields file "
                                 "and purpose", param="file", code="unsupported_media_type")
        async with request.form(max_files=1, max_fields=8) as form:
            upload, purpose = None, None
            for key, value in form.multi_items():
                if key == "file" and isinstance(value, UploadFile):
                    upload = value
                elif key == "purpose" and isinstance(value, str):
                    purpose = value
                elif key.startswith("expires_after"):
                    raise InvalidRequest(f"{key}: not supported; this farm keeps files until they are deleted",
                                         param="expires_after", code="unsupported_parameter")
                else:
                    raise InvalidRequest(f"{key}: unknown field; allowed: file, purpose", param=key,
                                         code="unknown_parameter")
            if upload is None:
                raise InvalidRequest("file: is required (a multipart file part)", param="file",
                                     code="missing_required_parameter")
            if purpose != "batch" and purpose not in IMAGE_PURPOSES:
                raise InvalidRequest(f"purpose: {purpose!r} is not accepted by this farm; allowed: batch, "
                                     f"{', '.join(IMAGE_PURPOSES)} (images for input_reference)", param="purpose",
                                     code="missing_required_parameter" if purpose is None else None)
            file_id = new_id("file")
            if purpose == "batch":
                size, lines = await run_in_threadpool(scan_upload, upload.file, deps.settings)
                await run_in_threadpool(lambda: deps.object_store().put_stream(file_key(file_id), upload.file,
                                                                               "application/jsonl"))
            else:  # an image, checked as an uploaded input_reference is, before anything is stored
                data = await upload.read(deps.image_limits.max_bytes + 1)
                image = await run_in_threadpool(check_image, data, deps.image_limits, "file")
                size, lines = len(data), 0
                await run_in_threadpool(lambda: deps.object_store().put_bytes(file_key(file_id), data,
                                                                              ALLOWED_FORMATS[image.format]))
            filename = (upload.filename or ("batch.jsonl" if purpose == "batch" else "image"))[:512]
        record = await run_in_threadpool(lambda: batches.add_file(
            id=file_id, owner=who, purpose=purpose, filename=filename, size=size, lines=lines,
            key=file_key(file_id)))
        return file_object(record)

    @app.get("/v1/files", summary="List files", operation_id="listFiles", tags=["batches"])
    async def list_files(
        request: Request, after: str | None = Query(None, max_length=64), limit: int = Query(20, ge=1, le=10_000),
        order: Literal["asc", "desc"] = Query("desc"), purpose: str | None = Query(None, max_length=32),
    ) -> dict[str, Any]:
        who = await deps.owner(request)
        try:
            records, more = await run_in_threadpool(
                lambda: batches.list_files(owner=who, purpose=purpose, after=after, limit=limit, order=order))
        except LookupError as exc:
            raise NotFound(str(exc), param="after") from None
        return _list([file_object(r) for r in records], more)

    @app.get("/v1/files/{file_id}", summary="Retrieve a file", operation_id="retrieveFile", tags=["batches"],
             responses=not_found)
    async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
        return file_object(await my_file(file_id, await deps.owner(request)))

    @app.get("/v1/files/{file_id}/content", summary="Download a file", operation_id="downloadFile",
             tags=["batches"], response_class=StreamingResponse,
             responses={200: {"content": {"application/jsonl": {}}}, **not_found})
    async def file_content(file_id: str, request: Request) -> StreamingResponse:
        record = await my_file(file_id, await deps.owner(request))
        try:
            body = await run_in_threadpool(lambda: deps.object_store().stream(record.key))
        except ObjectNotFound:
            raise NotFound(f"the content of file {file_id!r} is not stored", param="file_id") from None
        # A sync iterator: Starlette pulls it in the thread pool, a chunk at a time.
        return StreamingResponse(iter(body), media_type=body.content_type or "application/jsonl",
                                 headers={"Content-Length": str(body.content_length)})

    @app.delete("/v1/files/{file_id}", summary="Delete a file", operation_id="deleteFile", tags=["batches"],
                responses={409: {"model": ErrorResponse}, **not_found})
    async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
        who = await deps.owner(request)
        record = await my_file(file_id, who)
        users = await run_in_threadpool(batches.file_users, file_id)
        if users:
            raise Conflict(f"file {file_id!r} is the input of {', '.join(users)}; delete the schedule or wait for "
                           "the batch to end first", param="file_id", code="file_in_use")
        # The object first: if this fails the row survives and a retried delete finishes the job.
        await run_in_threadpool(lambda: deps.object_store().delete(record.key))
        await run_in_threadpool(batches.delete_file, file_id, who)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches --

    @app.post("/v1/batches", summary="Create a batch of video requests", operation_id="createBatch",
              tags=["batches"], responses=not_found)
    async def create_batch(body: CreateBatchRequest, request: Request) -> dict[str, Any]:
        who = await deps.owner(request)
        await batch_input(body.input_file_id, who)
        record = await run_in_threadpool(lambda: batches.create_batch(
            owner=who, input_file_id=body.input_file_id, completion_window=body.completion_window,
            metadata=body.metadata))
        await wake()
        return batch_object(record, Counts(0, 0, 0))

    @app.get("/v1/batches", summary="List batches", operation_id="listBatches", tags=["batches"])
    async def list_batches(request: Request, after: str | None = Query(None, max_length=64),
                           limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        who = await deps.owner(request)
        try:
            records, more = await run_in_threadpool(lambda: batches.list_batches(owner=who, after=after, limit=limit))
        except LookupError as exc:
            raise NotFound(str(exc), param="after") from None
        counts = await run_in_threadpool(batches.counts, records)
        return _list([batch_object(r, counts[r.id]) for r in records], more)

    @app.get("/v1/batches/{batch_id}", summary="Retrieve a batch", operation_id="retrieveBatch", tags=["batches"],
             responses=not_found)
    async def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
        record = await my_batch(batch_id, await deps.owner(request))
        counts = await run_in_threadpool(batches.counts, [record])
        return batch_object(record, counts[record.id])

    @app.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch", operation_id="cancelBatch",
              tags=["batches"], responses=not_found)
    async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
        who = await deps.owner(request)
        await my_batch(batch_id, who)
        record, videos = await run_in_threadpool(batches.request_cancel, batch_id, who)
        if record is None:
            raise NotFound(f"batch {batch_id!r} not found", param="batch_id")

        def cancel_all() -> None:
            # The videos' own cancel path: queued ones end now, running ones at their next shard.
            for video_id in videos:
                job = deps.jobs.request_cancel(video_id, owner=who)
                if job is not None and job.status == "cancelled" and job.checkpoint_key:
                    deps.object_store().delete_prefix(checkpoint_prefix(video_id))

        await run_in_threadpool(cancel_all)
        await wake()
        counts = await run_in_threadpool(batches.counts, [record])
        return batch_object(record, counts[record.id])

    # -- schedules (farm extension) --

    @app.post("/v1/schedules", summary="Create a schedule (farm extension)", operation_id="createSchedule",
              tags=["schedules"], responses={429: {"model": ErrorResponse}, **not_found})
    async def create_schedule(body: CreateScheduleRequest, request: Request) -> dict[str, Any]:
        who = await deps.owner(request)
        await batch_input(body.input_file_id, who)
        try:
            record = await run_in_threadpool(lambda: schedules.create(
                owner=who, cron=body.cron, timezone=body.timezone, input_file_id=body.input_file_id,
                missed=body.missed, name=body.name, max_per_owner=deps.settings.max_schedules_per_account))
        except LookupError as exc:
            raise RateLimited(str(exc), retry_after_s=3600, code="too_many_schedules") from None
        except ValueError as exc:  # e.g. a cron that never fires
            raise InvalidRequest(str(exc), param="cron") from None
        await wake()
        return schedule_object(record)

    @app.get("/v1/schedules", summary="List schedules (farm extension)", operation_id="listSchedules",
             tags=["schedules"])
    async def list_schedules(request: Request, after: str | None = Query(None, max_length=64),
                             limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        who = await deps.owner(request)
        try:
            records, more = await run_in_threadpool(lambda: schedules.list(owner=who, after=after, limit=limit))
        except LookupError as exc:
            raise NotFound(str(exc), param="after") from None
        return _list([schedule_object(r) for r in records], more)

    @app.get("/v1/schedules/{schedule_id}", summary="Retrieve a schedule (farm extension)",
             operation_id="retrieveSchedule", tags=["schedules"], responses=not_found)
    async def retrieve_schedule(schedule_id: str, request: Request) -> dict[str, Any]:
        return schedule_object(await my_schedule(schedule_id, await deps.owner(request)))

    for action, paused in (("pause", True), ("resume", False)):
        def route(paused: bool = paused):
            async def set_paused(schedule_id: str, request: Request) -> dict[str, Any]:
                who = await deps.owner(request)
                record = await run_in_threadpool(schedules.set_paused, schedule_id, paused, who)
                if record is None:
                    raise NotFound(f"schedule {schedule_id!r} not found", param="schedule_id")
                return schedule_object(record)
            return set_paused

        app.post(f"/v1/schedules/{{schedule_id}}/{action}", summary=f"{action.capitalize()} a schedule (farm "
                 "extension)", operation_id=f"{action}Schedule", tags=["schedules"], responses=not_found)(route())

    @app.delete("/v1/schedules/{schedule_id}", summary="Delete a schedule (farm extension)",
                operation_id="deleteSchedule", tags=["schedules"], responses=not_found)
    async def delete_schedule(schedule_id: str, request: Request) -> dict[str, Any]:
        who = await deps.owner(request)
        if not await run_in_threadpool(schedules.delete, schedule_id, who):
            raise NotFound(f"schedule {schedule_id!r} not found", param="schedule_id")
        return {"id": schedule_id, "object": "schedule.deleted", "deleted": True}


__all__ = ["BatchDeps", "add_batch_routes", "batch_object", "file_object", "schedule_object", "scan_upload"]
