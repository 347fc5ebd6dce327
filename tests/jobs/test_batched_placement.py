"""Step-level batching, dispatcher side: the policy's batched assignments reach every member's call
as one ticket, and the replica is free only once every member is done."""

from __future__ import annotations

import asyncio
import time

from farm.jobs.placement import Placement, StageRequest
from farm.sched import SchedulerConfig

POOL = "wan-tiny:transformer"


def _request(job: str, start: int = 0, key: tuple = ("k",)) -> StageRequest:
    return StageRequest(job, "tenant", "interactive", POOL, start, start + 4, time.time(), batch_key=key)


async def _acquire_all(placement: Placement, requests):
    return await asyncio.gather(*(placement.acquire(r) for r in requests))


def test_a_batch_shares_one_ticket_and_holds_its_replica_until_all_release():
    async def scenario():
        placement = Placement({POOL: ["r0"]}, SchedulerConfig(pool_max_batch={POOL: 4}))
        # Occupy the replica so the next four wait together and are handed out as one batch.
        first = await placement.acquire(_request("j0"))
        assert placement.ticket("j0") is None  # alone: no ticket
        waiting = asyncio.ensure_future(_acquire_all(placement, [_request(f"j{i}") for i in range(1, 5)]))
        await asyncio.sleep(0.01)
        placement.release(first, "j0")
        replicas = await waiting
        assert replicas == ["r0"] * 4
        tickets = [placement.ticket(f"j{i}") for i in range(1, 5)]
        assert len({t.id for t in tickets}) == 1 and tickets[0].size == 4
        assert placement.ticket("j1") is None  # taken once

        # A fifth job waits: the batch holds r0 until its last member releases it.
        late = asyncio.ensure_future(placement.acquire(_request("j5")))
        for i in range(1, 4):
            placement.release("r0", f"j{i}")
            await asyncio.sleep(0.01)
            assert not late.done()
        placement.release("r0", "j4")
        assert await asyncio.wait_for(late, 1) == "r0"
        assert placement.ticket("j5") is None

    asyncio.run(scenario())


def test_shards_with_different_batch_keys_never_share_a_batch():
    async def scenario():
        placement = Placement({POOL: ["r0"]}, SchedulerConfig(pool_max_batch={POOL: 4}))
        first = await placement.acquire(_request("j0"))
        a = asyncio.ensure_future(placement.acquire(_request("a", key=("64x64",))))
        b = asyncio.ensure_future(placement.acquire(_request("b", key=("128x128",))))
        await asyncio.sleep(0.01)
        placement.release(first, "j0")
        await asyncio.sleep(0.01)
        assert a.done() != b.done()  # one of them runs, alone
        winner, loser = ("a", b) if a.done() else ("b", a)
        assert placement.ticket(winner) is None
        placement.release("r0", winner)
        await asyncio.wait_for(loser, 1)

    asyncio.run(scenario())
