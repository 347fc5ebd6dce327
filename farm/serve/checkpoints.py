"""Checkpoints as the stage replicas write and read them.

A job's checkpoint is two objects under ``checkpoints/<id>/``: its conditioning, written once
by the encoder (``conditioning.pt``), and the state after its latest acknowledged shard
without the conditioning (``state-NNNNNN.pt``), written by the denoiser that made it. The
dispatcher records the newest acknowledged key in the job store and deletes the one it
replaces. Every S3 call waits out outages within ``render.storage_retry_s``.
"""

from __future__ import annotations

import asyncio
import logging

from farm.jobs.dispatcher import conditioning_key
from farm.jobs.retry import RetryPolicy

log = logging.getLogger(__name__)


class CheckpointWriter:
    """Background writes of the states a replica made, each acknowledged by its key."""

    def __init__(self, objects, retry: RetryPolicy) -> None:
        self.objects = objects
        self.retry = retry
        self._writes: dict[str, asyncio.Task] = {}

    def start(self, key: str, state) -> None:
        """Begin writing ``state`` (conditioning left out) to ``key``; call from the event loop."""

        def write() -> None:
            data = state.to_bytes(include_conditioning=False)
            self.retry.storage_call(f"write {key}", self.objects.put_bytes, key, data, "application/octet-stream")

        self._writes[key] = asyncio.get_running_loop().create_task(asyncio.to_thread(write))

    async def done(self, key: str) -> bool:
        """Wait for the write of ``key``: True once it is stored, False if this writer never began it;
        the write's error when it failed."""
        task = self._writes.pop(key, None)
        if task is None:
            return False
        await task
        return True


def write_conditioning(objects, retry: RetryPolicy, job_id: str, conditioning) -> None:
    retry.storage_call(f"job {job_id}: write conditioning", objects.put_bytes, conditioning_key(job_id),
                       conditioning.to_bytes(), "application/octet-stream")


def read_checkpoint(objects, retry: RetryPolicy, job_id: str, key: str):
    """The job's state at checkpoint ``key``, its conditioning joined back; None when either is gone."""
    from farm.render.denoise import Conditioning, DenoiseState
    from farm.storage.s3 import ObjectNotFound

    try:
        data = retry.storage_call(f"job {job_id}: read checkpoint", objects.get_bytes, key)
        if key.endswith("/state.pt"):  # a whole state, as checkpoints were written before
            return DenoiseState.from_bytes(data)
        conditioning = Conditioning.from_bytes(
            retry.storage_call(f"job {job_id}: read conditioning", objects.get_bytes, conditioning_key(job_id)))
        return DenoiseState.from_bytes(data, conditioning=conditioning)
    except ObjectNotFound:
        log.warning("job %s: checkpoint %s is gone; the job starts afresh", job_id, key)
        return None
