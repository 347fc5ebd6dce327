"""The denoiser replica's gathering of a batch's calls (farm.serve.batching), without Ray."""

from __future__ import annotations

import asyncio

import pytest

from farm.serve.batching import BatchTicket, ShardBatcher


def test_calls_of_a_ticket_run_as_one_batch_and_each_gets_its_own_result():
    runs = []

    def run(items):
        runs.append(list(items))
        return [ValueError(f"bad {x}") if x == "b" else x.upper() for x in items]

    async def scenario():
        batcher = ShardBatcher(run, wait_s=5)
        ticket = BatchTicket("r0#1", 3)
        return await asyncio.gather(*(batcher.join(ticket, x) for x in "abc"), return_exceptions=True)

    a, b, c = asyncio.run(scenario())
    assert runs == [["a", "b", "c"]]  # one run, not three
    assert (a.value, c.value, a.size) == ("A", "C", 3)
    assert isinstance(b, ValueError) and "bad b" in str(b)


def test_a_member_that_never_comes_does_not_hold_the_others_past_the_wait():
    runs = []

    async def scenario():
        batcher = ShardBatcher(lambda items: runs.append(list(items)) or list(items), wait_s=0.05)
        return await asyncio.wait_for(batcher.join(BatchTicket("r0#2", 2), "x"), 2)

    assert asyncio.run(scenario()).size == 1
    assert runs == [["x"]]


def test_a_shared_failure_reaches_every_member():
    def run(items):
        raise MemoryError("out of memory")

    async def scenario():
        batcher = ShardBatcher(run, wait_s=5)
        ticket = BatchTicket("r0#3", 2)
        return await asyncio.gather(batcher.join(ticket, 1), batcher.join(ticket, 2), return_exceptions=True)

    with pytest.raises(MemoryError):  # not an Exception: re-raised in the batch task too
        raise next(iter(asyncio.run(scenario())))
