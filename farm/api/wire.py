"""The OpenAI wire shape of a job: the ``video`` object the gateway sends (``VideoObject``).

The job store keeps bookkeeping (``farm.jobs.job.Job``); what a client sees of it is decided
here, at the edge. Farm extensions beside OpenAI's fields: ``prompt``, ``priority``, ``seed``,
``remixed_from_video_id``, ``cancel_requested``, ``served_model`` and ``mapped_from`` (for a job
asked for under an alias, ``model`` echoes the alias, as OpenAI echoes what it was sent;
``served_model`` is the model that renders it, ``mapped_from`` what the tier's mapping changed),
``queue_position`` and ``estimated_completion_at``
(see :mod:`farm.jobs.estimates`; null when unknown or finished), ``usage`` (replica-seconds per
pool and device, from the usage ledger), ``visibility`` (private, shared or unlisted:
:mod:`farm.jobs.sharing`) and ``expired`` (true from ``expires_at`` on, when content is refused:
:mod:`farm.jobs.expiry`; ``status`` keeps what the job ended as). The openai SDK keeps unknown fields as extra attributes.
"""

from __future__ import annotations

from typing import Any

import datetime as dt
import math

from farm.db import unix, utcnow
from farm.jobs.estimates import Estimate
from farm.jobs.expiry import expired
from farm.jobs.job import Job, Priority


def priority_name(priority: int) -> str:
    """"interactive" or "bulk"; the number itself for a class this build does not name."""
    try:
        return Priority(priority).name.lower()
    except ValueError:
        return str(priority)


def usage_object(lines: list[dict] | None) -> dict[str, Any]:
    """The ``usage`` field from a job's ledger lines (``JobStore.usage_of_jobs``)."""
    lines = lines or []
    return {"accelerator_seconds": round(sum(line["seconds"] for line in lines), 6),
            "by_pool": [{"pool": line["pool"], "device": line["device"], "seconds": round(line["seconds"], 6)}
                        for line in lines]}


def _mapped_from(asked: dict[str, str] | None) -> dict[str, str | None] | None:
    """Both fields, null where the tier rendered what was asked; None when nothing was mapped."""
    return {"size": asked.get("size"), "seconds": asked.get("seconds")} if asked else None


def video_object(job: Job, estimate: Estimate | None = None, usage: list[dict] | None = None,
                 now: dt.datetime | None = None) -> dict[str, Any]:
    """The ``video`` object of ``job``, as the routes return it: with its queue estimate if known,
    and ``usage`` from its ledger lines (None: not read, the field is null); ``now`` (default: the
    wall clock) decides ``expired``."""
    try:
        priority: str | int = Priority(job.priority).name.lower()
    except ValueError:
        priority = job.priority
    error = None
    if job.error_code is not None or job.error_message is not None:
        error = {"code": job.error_code, "message": job.error_message}
    return {
        "id": job.id,
        "object": "video",
        "model": job.params.get("requested_model") or job.model,  # what the client sent (an alias) or the model
        "served_model": job.model,
        "mapped_from": _mapped_from(job.params.get("mapped_from")),
        "status": job.status,
        "progress": job.progress,
        "created_at": unix(job.created_at),
        "completed_at": unix(job.completed_at),
        "expires_at": unix(job.expires_at),
        # An extension's clip is its source then the new part: OpenAI's `seconds` is the stitched total.
        "seconds": str(job.seconds + int(job.params.get("stitch_seconds") or 0)),
        "size": job.size,
        "error": error,
        "prompt": job.prompt,
        "priority": priority,
        "seed": job.params.get("seed"),
        "remixed_from_video_id": job.params.get("remixed_from_video_id"),
        # A running job whose cancellation was asked for stops at its next shard.
        "cancel_requested": job.cancel_requested,
        # Farm extensions from the scheduler's queue and measured stage costs; null when not known.
        "queue_position": estimate.queue_position if estimate else None,
        "estimated_completion_at": (math.ceil(estimate.completion_at)
                                    if estimate and estimate.completion_at is not None else None),
        "usage": None if usage is None else usage_object(usage),
        "visibility": job.visibility,
        "expired": expired(job, now or utcnow()),
    }
