"""A job as the farm passes it around: the ``Job`` snapshot, its priorities and statuses, and
the checks that turn ``create``'s arguments into a new one.

Nothing here touches the database; the job store's modules share these pieces. The OpenAI
wire shape of a job lives with the gateway (``farm.api.wire``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import re
import uuid
from collections.abc import Collection, Mapping
from typing import Any, Literal

DEFAULT_EXPIRES_IN_S = 7 * 24 * 3600
STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]

_SIZE = re.compile(r"^[1-9]\d*x[1-9]\d*$")


class Priority(enum.IntEnum):
    """Lower runs first."""

    INTERACTIVE = 0
    BULK = 1


PRIORITY_INTERACTIVE = Priority.INTERACTIVE
PRIORITY_BULK = Priority.BULK


@dataclasses.dataclass(frozen=True)
class Job:
    """A snapshot of one row, safe to pickle and send between processes.

    ``params`` and ``objects`` are plain dicts: treat them as read-only.
    """

    id: str
    model: str
    prompt: str
    size: str
    seconds: int
    params: dict[str, Any]
    priority: int
    created_at: dt.datetime
    updated_at: dt.datetime
    # Defaults: a new, queued job.
    owner: str | None = None
    status: str = "queued"
    progress: int = 0
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    step_index: int = 0
    num_steps: int = 0
    checkpoint_key: str | None = None
    objects: dict[str, str] = dataclasses.field(default_factory=dict)
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None
    visibility: str = "private"  # private, shared or unlisted (farm.jobs.sharing)
    expired_at: dt.datetime | None = None  # when the reaper removed its objects

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(**{name: row[name] for name in JOB_FIELDS})

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))


def new_video_id() -> str:
    return f"video_{uuid.uuid4().hex}"


_VIDEO_ID = re.compile(r"^video_[0-9a-f]{32}$")


def as_priority(value: int) -> int:
    """The Priority member for a stored value; unknown values pass through as plain ints."""
    try:
        return Priority(value)
    except ValueError:
        return value


def check_priorities(priorities: Collection[int] | None) -> tuple[int, ...] | None:
    """``claim_next``'s ``priorities``: None (every class), else the known classes it names, in run order."""
    if priorities is None:
        return None
    if isinstance(priorities, (str, bytes)) or not isinstance(priorities, Collection) or not priorities:
        raise ValueError(f"priorities: {priorities!r} must be a non-empty collection of priorities, or None")
    known = set(Priority)
    for p in priorities:
        if isinstance(p, bool) or p not in known:
            allowed = ", ".join(f"{q.value} ({q.name.lower()})" for q in Priority)
            raise ValueError(f"priorities: {p!r} is not known; allowed: {allowed}")
    return tuple(sorted({int(p) for p in priorities}))


def check_worker(worker: str) -> None:
    if not isinstance(worker, str) or not worker:
        raise ValueError(f"worker: {worker!r} must be a non-empty string")


def check_cap(name: str, cap: int | None) -> None:
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
        raise ValueError(f"{name}: {cap!r} must be a non-negative integer or None")


def lease_length(lease_s: float) -> dt.timedelta:
    if not isinstance(lease_s, (int, float)) or not math.isfinite(lease_s) or lease_s <= 0:
        raise ValueError(f"lease_s: {lease_s!r} must be a positive number of seconds")
    return dt.timedelta(seconds=lease_s)


def finished(status: str, now: dt.datetime) -> dict[str, Any]:
    """The column changes that end a job as ``status`` (completed, failed or cancelled)."""
    changes = {"status": status, "completed_at": now, "updated_at": now, "lease_owner": None, "lease_expires_at": None}
    if status == "cancelled":  # a terminal state with a code, like a failure, so clients need no special case
        changes.update(error_code="cancelled", error_message="cancelled at the owner's request; nothing was kept")
    return changes


def worker_lost(now: dt.datetime, max_attempts: int) -> dict[str, Any]:
    """The changes that fail a job whose workers died ``max_attempts`` times."""
    changes = finished("failed", now)
    changes.update(error_code="worker_lost", error_message=f"its worker was lost {max_attempts} times")
    return changes


def new_job(
    model: str,
    prompt: str,
    size: str,
    seconds: int,
    params: Mapping[str, Any],
    priority: int,
    owner: str | None,
    idempotency_key: str | None,
    expires_in_s: float,
    now: dt.datetime,
    video_id: str | None = None,
) -> Job:
    """Validate ``create``'s arguments into a new job; ValueError names the bad one.

    ``video_id`` is the new job's id when the caller drew it (:func:`new_video_id`) to store objects
    under it before the row exists; None draws one.
    """
    if video_id is not None and (not isinstance(video_id, str) or not _VIDEO_ID.match(video_id)):
        raise ValueError(f"video_id: {video_id!r} is not an id from new_video_id()")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: {model!r} must be a non-empty string")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: must not be empty")
    if not isinstance(size, str) or not _SIZE.match(size):
        raise ValueError(f"size: {size!r} must look like WIDTHxHEIGHT, e.g. 128x128")
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 1:
        raise ValueError(f"seconds: {seconds!r} must be a positive integer")
    if isinstance(priority, bool) or priority not in set(Priority):
        allowed = ", ".join(f"{p.value} ({p.name.lower()})" for p in Priority)
        raise ValueError(f"priority: {priority!r} is not known; allowed: {allowed}")
    if not isinstance(params, Mapping):
        raise ValueError(f"params: {params!r} must be a mapping")
    try:
        params = json.loads(json.dumps(dict(params)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params: not JSON-serialisable ({exc})") from None
    for name, value in (("owner", owner), ("idempotency_key", idempotency_key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{name}: {value!r} must be a non-empty string or None")
    if not isinstance(expires_in_s, (int, float)) or not math.isfinite(expires_in_s) or expires_in_s <= 0:
        raise ValueError(f"expires_in_s: {expires_in_s!r} must be a positive number of seconds")
    steps = params.get("steps")
    return Job(
        id=video_id or new_video_id(),
        owner=owner,
        model=model,
        prompt=prompt,
        size=size,
        seconds=seconds,
        params=params,
        priority=int(priority),
        created_at=now,
        updated_at=now,
        expires_at=now + dt.timedelta(seconds=expires_in_s),
        num_steps=steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 0,
        idempotency_key=idempotency_key,
    )
