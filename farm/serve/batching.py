"""A denoiser replica's side of step-level batching: the shard calls of one batch, gathered into one run.

The dispatcher's policy (:mod:`farm.sched.policy`, rule 6) gives one replica several compatible
shards at once; each job's own task then calls the replica with the same :class:`BatchTicket`
(the batch's id and size). :class:`ShardBatcher` holds the calls of a ticket until all of them
have arrived — or until ``wait_s`` after the first, when a member never comes (its job was
cancelled between the policy's decision and its call) — and runs them as one batch in a thread.
Each call gets its own result back, or the exception its shard alone raised. A call that arrives
after its batch left runs as a batch of one. Torch-free and Ray-free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.sched import BatchTicket

__all__ = ["BatchResult", "BatchTicket", "ShardBatcher"]


@dataclass(frozen=True)
class BatchResult:
    """One call's share of a batch run: its result, the batch's wall time and the batch's size."""

    value: Any
    seconds: float
    size: int


@dataclass
class _Gathering:
    size: int
    items: list = field(default_factory=list)
    futures: list = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class ShardBatcher:
    """Gathers the calls of each :class:`BatchTicket`; ``run`` runs one batch (in a worker thread) and
    returns one entry per item: a result, or an exception for that item alone."""

    def __init__(self, run: Callable[[list], Sequence[Any]], *, wait_s: float = 1.0) -> None:
        self.run = run
        self.wait_s = wait_s
        self._open: dict[str, _Gathering] = {}

    async def join(self, ticket: BatchTicket, item) -> BatchResult:
        """Add ``item`` to its batch and wait for the batch's run; raises the item's own exception."""
        gathering = self._open.get(ticket.id)
        if gathering is None:
            gathering = self._open[ticket.id] = _Gathering(max(ticket.size, 1))
            gathering.timer = asyncio.get_running_loop().call_later(self.wait_s, self._launch, ticket.id)
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        gathering.items.append(item)
        gathering.futures.append(future)
        if len(gathering.items) >= gathering.size:
            self._launch(ticket.id)
        return await future

    def _launch(self, batch_id: str) -> None:
        gathering = self._open.pop(batch_id, None)
        if gathering is None:  # already launched (full) before its timer fired
            return
        if gathering.timer is not None:
            gathering.timer.cancel()
        asyncio.get_running_loop().create_task(self._run(gathering), name=f"batch-{batch_id}")

    async def _run(self, gathering: _Gathering) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.run, gathering.items)
        except BaseException as exc:  # the shared run failed: every member sees it
            for future in gathering.futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        seconds = time.perf_counter() - started
        size = len(gathering.items)
        for future, value in zip(gathering.futures, results):
            if future.done():  # its caller went away
                continue
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(BatchResult(value, seconds, size))
