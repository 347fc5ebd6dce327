"""The batch runner: advances every batch, and fires due schedules, from the leading dispatcher.

Each turn (every ``batches.poll_s``, in a worker thread so the dispatcher's loop never waits for
it) it fires due schedules (``ScheduleStore.fire_due``), then takes each batch with work left one
step along ``validating → in_progress → finalizing → completed`` (or ``cancelling → cancelled``,
or ``expired`` past its completion window):

- **validating**: one streaming pass over the input file in S3. Every line is checked as
  ``POST /v1/videos`` checks a body (``LineRules.check``); the pass records each line's byte span
  and ``custom_id``, or the error that refused it, in ``batch_items``, a chunk at a time.
- **in_progress**: keeps up to ``batches.max_queued_per_batch`` of the batch's videos queued,
  creating the next ones (bulk priority) from their lines, read back from S3 by byte range, as
  the dispatcher claims earlier ones. The scheduling policy does the rest: bulk work yields to
  interactive work at every shard boundary.
- **finalizing**: once every video has ended, writes the output file (completed videos) and the
  error file (refused lines, failed or cancelled videos) line by line to temporary files, uploads
  them, and records them with the final status in one transaction.
- **cancelling**: cancels the batch's unfinished videos through the job store's cancel path,
  then finalizes with what completed.

Nothing is held whole in memory: the input is read in chunks and by ranges, results a page at a
time. Every step is idempotent (a restarted runner redoes at most the step it was in), and the
writes that could race a cancel or a second runner compare what they expect.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from farm.jobs.batches import BatchRecord, BatchStore, FileRecord
from farm.jobs.job import DEFAULT_EXPIRES_IN_S, PRIORITY_BULK, Job, new_job
from farm.jobs.schedules import ScheduleStore
from farm.storage.s3 import ObjectNotFound, checkpoint_prefix

log = logging.getLogger(__name__)

_CHUNK_LINES = 500  # validation writes its items this many at a time
_MAX_ERRORS_SHOWN = 10  # a batch that fails outright lists this many line errors


@dataclass(frozen=True)
class LineVerdict:
    """One request line, checked: its ``custom_id`` and either the video to create or the error."""

    custom_id: str | None
    video: Any = None  # a farm.api.video_requests.CheckedVideo
    error: dict[str, Any] | None = None  # {"status_code": 400, "body": {"error": {...}}}


class LineRules(Protocol):
    """What the runner needs from the gateway's rules (``farm.api.batch_lines``)."""

    def check(self, raw: bytes, owner: str | None = None) -> LineVerdict: ...

    def video(self, job: Job) -> dict[str, Any]: ...


def file_key(file_id: str) -> str:
    return f"files/{file_id}"


@dataclass(frozen=True)
class Line:
    number: int  # from 1, as BatchError.line counts
    start: int  # byte offset in the file
    length: int  # bytes, without the newline
    data: bytes  # the line, cut at max_line_bytes + 1 bytes (enough to tell that it is too long)


def lines_of(chunks: Iterator[bytes], max_line_bytes: int) -> Iterator[Line]:
    """Every line of a byte stream, holding at most one (cut) line in memory."""
    number, offset, size, kept = 1, 0, 0, bytearray()
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            stop = len(chunk) if end < 0 else end
            room = max_line_bytes + 1 - len(kept)
            if room > 0:
                kept += chunk[start:min(stop, start + room)]
            size += stop - start
            if end < 0:
                break
            yield Line(number, offset, size, bytes(kept))
            offset, number, size, kept, start = offset + size + 1, number + 1, 0, bytearray(), end + 1
    if size:
        yield Line(number, offset, size, bytes(kept))


def _request_id(batch_id: str, line: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:32]


def _result_file_id(batch_id: str, kind: str) -> str:
    # Derived from the batch: a finalizing pass redone after a crash overwrites the same objects.
    return "file_" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


class BatchRunner:
    """Advances batches and fires schedules; ``tick()`` from the leader's loop starts one turn."""

    def __init__(self, batches: BatchStore, schedules: ScheduleStore, jobs, objects, rules: LineRules, *,
                 max_queued_per_batch: int = 4, max_line_bytes: int = 64 * 1024, poll_s: float = 1.0,
                 misfire_grace_s: float = 300.0, leading: Callable[[], bool] = lambda: True,
                 on_queued: Callable[[], None] | None = None,
                 lifetime_of: Callable[[str | None], float] | None = None) -> None:
        """``jobs``: the JobStore (its cancel path); ``objects``: an ObjectStore, or a factory of one;
        ``lifetime_of``: an owner's clip lifetime in seconds (``Lifetimes.lifetime_of``; default 7 days)."""
        self.batches, self.schedules, self.jobs = batches, schedules, jobs
        self._objects = objects
        self.rules = rules
        self.window = max_queued_per_batch
        self.max_line_bytes = max_line_bytes
        self.poll_s = poll_s
        self.misfire_grace_s = misfire_grace_s
        self.leading = leading
        self.on_queued = on_queued
        self.lifetime_of = lifetime_of or (lambda _owner: DEFAULT_EXPIRES_IN_S)
        self._turn: asyncio.Future | None = None
        self._turned_at = float("-inf")

    @property
    def objects(self):
        if callable(self._objects):
            self._objects = self._objects()
        return self._objects

    # -- driving ---------------------------------------------------------------------

    def tick(self) -> None:
        """Start a turn in a worker thread unless one runs or the last began under ``poll_s`` ago.
        Never blocks: the dispatcher's loop calls it on every pass."""
        if self._turn is not None and not self._turn.done():
            return
        if time.monotonic() - self._turned_at < self.poll_s:
            return
        self._turned_at = time.monotonic()
        self._turn = asyncio.ensure_future(asyncio.to_thread(self.turn))

    async def stop(self) -> None:
        """Wait for the turn in progress (its thread cannot be interrupted; each step is short or chunked)."""
        if self._turn is not None:
            await asyncio.gather(self._turn, return_exceptions=True)

    def turn(self) -> None:
        """Fire due schedules, then move every active batch one step."""
        try:
            for firing in self.schedules.fire_due(self.misfire_grace_s):
                log.info("schedule %s due %s: %s", firing.schedule_id, firing.due_at.isoformat(),
                         firing.batch_id or "missed, skipped")
        except Exception:
            log.exception("firing schedules failed; the next turn retries")
        for batch in self.batches.active_batches():
            if not self.leading():
                return
            try:
                self.advance(batch)
            except Exception:  # one batch's trouble must not stall the others
                log.exception("batch %s: step %s failed; the next turn retries", batch.id, batch.status)

    def advance(self, batch: BatchRecord) -> None:
        """One step of ``batch``."""
        if batch.status in ("validating", "in_progress") and self.batches.now() >= batch.expires_at:
            if self.batches.expire(batch.id):
                log.info("batch %s expired (completion window %s)", batch.id, batch.completion_window)
            return
        if batch.status == "validating":
            self._validate(batch)
        elif batch.status == "in_progress":
            self._feed(batch)
        elif batch.status == "cancelling":
            self._wind_down(batch)
        elif batch.status == "finalizing":
            self._finalize(batch)

    # -- validating ------------------------------------------------------------------------

    def _validate(self, batch: BatchRecord) -> None:
        source = self.batches.get_file(batch.input_file_id)
        if source is None:
            self.batches.validated(batch.id, total=0, invalid=0, errors=[{
                "code": "file_not_found", "line": None, "param": "input_file_id",
                "message": f"input_file_id: file {batch.input_file_id!r} no longer exists"}])
            return
        self.batches.restart_validation(batch.id)  # a pass a restart interrupted starts over
        seen: dict[str, int] = {}  # custom_id -> line: ids must be unique within a batch
        chunk: list[dict[str, Any]] = []
        total = invalid = 0
        shown: list[dict[str, Any]] = []
        try:
            stream = self.objects.stream(source.key)
        except ObjectNotFound:
            self.batches.validated(batch.id, total=0, invalid=0, errors=[{
                "code": "file_not_found", "line": None, "param": "input_file_id",
                "message": f"input_file_id: the content of file {source.id!r} is gone"}])
            return
        with stream:
            for line in lines_of(iter(stream), self.max_line_bytes):
                if not line.data.strip():
                    continue  # blank lines (a trailing newline) are no requests
                total += 1
                verdict = self._check(line, batch.owner)
                error = verdict.error
                if error is None and verdict.custom_id in seen:
                    error = _line_error(f"custom_id: {verdict.custom_id!r} is also the custom_id of line "
                                        f"{seen[verdict.custom_id]}; each request needs its own", "custom_id",
                                        "duplicate_custom_id")
                if error is None:
                    seen[verdict.custom_id] = line.number
                else:
                    invalid += 1
                    if len(shown) < _MAX_ERRORS_SHOWN:
                        detail = error["body"]["error"]
                        shown.append({"code": detail.get("code"), "line": line.number, "param": detail.get("param"),
                                      "message": detail.get("message")})
                chunk.append({"line": line.number, "start": line.start, "length": line.length,
                              "custom_id": verdict.custom_id, "error": error})
                if len(chunk) >= _CHUNK_LINES:
                    if not self.leading():
                        return  # the new leader redoes the pass
                    self.batches.add_items(batch.id, chunk)
                    chunk = []
        self.batches.add_items(batch.id, chunk)
        if total == 0:
            shown = [{"code": "empty_file", "line": None, "param": "input_file_id",
                      "message": f"input_file_id: file {source.id!r} has no request lines"}]
        failed = shown if total == invalid else None  # no line can run: the batch fails, as OpenAI's does
        if self.batches.validated(batch.id, total=total, invalid=invalid, errors=failed):
            log.info("batch %s: %d requests, %d refused", batch.id, total, invalid)

    def _check(self, line: Line, owner: str | None) -> LineVerdict:
        if line.length > self.max_line_bytes:
            return LineVerdict(None, error=_line_error(
                f"line {line.number}: {line.length} bytes is too long; allowed: at most {self.max_line_bytes}",
                None, "line_too_long"))
        return self.rules.check(line.data, owner)

    # -- in_progress -------------------------------------------------------------------------

    def _feed(self, batch: BatchRecord) -> None:
        room = self.window - self.batches.queued_of(batch.id)
        pending = self.batches.pending_items(batch.id, room) if room > 0 else []
        if not pending:
            if room > 0 and not self.batches.unfinished_videos(batch.id):
                self.batches.finalize(batch.id, ("in_progress",))
            return
        source = self.batches.get_file(batch.input_file_id)
        if source is None:
            raise RuntimeError(f"input file {batch.input_file_id} was deleted under a running batch")
        first, last = pending[0]["start"], pending[-1]["start"] + pending[-1]["length"] - 1
        # The span of at most `window` lines the validation pass measured: one ranged GET.
        with self.objects.stream(source.key, byte_range=(first, last)) as body:
            span = b"".join(body)
        now, lifetime_s = self.batches.now(), self.lifetime_of(batch.owner)
        jobs: list[tuple[int, Job]] = []
        refused: list[tuple[int, dict]] = []
        for item in pending:
            raw = span[item["start"] - first:item["start"] - first + item["length"]]
            verdict = self.rules.check(raw, batch.owner)  # again: settings may have changed; a seed is drawn now
            if verdict.error is not None:
                refused.append((item["line"], verdict.error))
                continue
            video = verdict.video
            params = {**video.params, "batch_id": batch.id, "custom_id": item["custom_id"]}
            jobs.append((item["line"], new_job(video.model, video.prompt, video.size, video.seconds, params,
                                               PRIORITY_BULK, batch.owner, None, lifetime_s, now)))
        if self.batches.feed(batch.id, jobs, refused) and jobs and self.on_queued is not None:
            self.on_queued()

    # -- cancelling / expiring -----------------------------------------------------------------

    def cancel_videos(self, video_ids: list[str]) -> None:
        """The job store's cancel path for each (a queued one ends now, a running one at its next shard);
        a queued job's checkpoint from before a restart is deleted, as the cancel route does."""
        for video_id in video_ids:
            job = self.jobs.request_cancel(video_id)
            if job is not None and job.status == "cancelled" and job.checkpoint_key:
                self.objects.delete_prefix(checkpoint_prefix(video_id))

    def _wind_down(self, batch: BatchRecord) -> None:
        left = self.batches.unfinished_videos(batch.id, uncancelled=True)
        if left:
            self.cancel_videos(left)
        if not self.batches.unfinished_videos(batch.id):
            self.batches.finalize(batch.id, ("cancelling",))

    # -- finalizing --------------------------------------------------------------------------

    def _finalize(self, batch: BatchRecord) -> None:
        with tempfile.TemporaryDirectory(prefix="farm-batch-") as tmp:
            out_path, err_path = Path(tmp) / "output.jsonl", Path(tmp) / "errors.jsonl"
            counts = {"output": 0, "error": 0}
            with out_path.open("w", encoding="utf-8") as out, err_path.open("w", encoding="utf-8") as err:
                for item in self.batches.results(batch.id):
                    record = self._result_line(batch, item)
                    if record is None:
                        continue
                    kind, line = record
                    (out if kind == "output" else err).write(json.dumps(line, ensure_ascii=False) + "\n")
                    counts[kind] += 1
            files = {kind: self._upload(batch, kind, path, counts[kind])
                     for kind, path in (("output", out_path), ("error", err_path))}
        if self.batches.finished(batch, files["output"], files["error"]):
            log.info("batch %s %s: %d outputs, %d errors", batch.id, batch.ends_as, counts["output"], counts["error"])

    def _result_line(self, batch: BatchRecord, item) -> tuple[str, dict[str, Any]] | None:
        base = {"id": _request_id(batch.id, item.line), "custom_id": item.custom_id}
        if item.error is not None:
            return "error", base | {"response": {"status_code": item.error["status_code"], "request_id": None,
                                                 "body": item.error["body"]}, "error": None}
        if item.job is None:
            return None  # never queued: the batch was cancelled or expired first
        response = {"status_code": 200, "request_id": item.job.id, "body": self.rules.video(item.job)}
        if item.job.status == "completed":
            return "output", base | {"response": response, "error": None}
        return "error", base | {"response": response,
                                "error": {"code": item.job.error_code, "message": item.job.error_message}}

    def _upload(self, batch: BatchRecord, kind: str, path: Path, lines: int) -> FileRecord | None:
        if lines == 0:
            return None  # OpenAI's batches leave output_file_id / error_file_id null when there is nothing
        file_id = _result_file_id(batch.id, kind)
        self.objects.put_file(file_key(file_id), path, content_type="application/jsonl")
        return FileRecord(id=file_id, owner=batch.owner, purpose="batch_output",
                          filename=f"{batch.id}_{kind}.jsonl", bytes=path.stat().st_size, lines=lines,
                          key=file_key(file_id), created_at=self.batches.now(), expires_at=None)


def _line_error(message: str, param: str | None, code: str) -> dict[str, Any]:
    return {"status_code": 400, "body": {"error": {"message": message, "type": "invalid_request_error",
                                                   "param": param, "code": code}}}
