"""Usage accounting and budgets in the dispatcher and the job store (SQLite and PostgreSQL).

A job's recorded seconds are exactly what its replicas reported for each completed shard, the
decode and the finish; a retried shard counts once (the lost run is not charged); a spent
budget holds the account's bulk work, queued or running, while its interactive work and other
accounts' bulk work go on; the day's spending starts again at 00:00 UTC.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from farm.jobs.dispatcher import Dispatcher
from farm.jobs.store import JobStore, Priority
from farm.sched.budget import BudgetRule, next_reset
from tests.jobs.test_dispatcher import DECODE_S, FAST, FINISH_S, POOL, SHARD_STEPS, STEPS, LocalStages, MemoryObjects


@pytest.fixture(scope="module")
def stages(tiny_spec):
    from farm.render.engine import DenoiserStage, TextEncoderStage

    return TextEncoderStage(tiny_spec, device="cpu"), DenoiserStage(tiny_spec, device="cpu")


def _create(store: JobStore, spec, prompt: str, owner: str, priority=Priority.INTERACTIVE) -> str:
    return store.create(model=spec.id, prompt=prompt, size="64x64", seconds=1, owner=owner, priority=priority,
                        params={"steps": STEPS, "seed": 1}).id


def _ledger(store: JobStore, job_id: str) -> dict[str, float]:
    import sqlalchemy as sa

    from farm.jobs.usage import USAGE

    with store._engine.begin() as conn:
        return {r.stage: r.seconds for r in conn.execute(sa.select(USAGE).where(USAGE.c.job_id == job_id))}


async def _drive(dispatcher: Dispatcher, until, timeout: float = 120.0) -> None:
    runner = asyncio.create_task(dispatcher.run())
    try:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.stop()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def test_a_job_sums_what_its_replicas_reported_and_a_retried_shard_counts_once(store, tiny_spec, stages):
    objects = MemoryObjects()
    clients = LocalStages(tiny_spec, stages, lose={1}, objects=objects)  # the second shard's replica dies mid-way
    dispatcher = Dispatcher(store, clients, [tiny_spec], objects=objects, shard_steps=SHARD_STEPS, policy=FAST)
    job_id = _create(store, tiny_spec, "a red fox runs through fresh snow", "acct_a")

    asyncio.run(_drive(dispatcher, lambda: store.get(job_id).terminal))

    assert store.get(job_id).status == "completed"
    assert [r.stage for r in dispatcher.retries] == ["shard 2-4"]
    reported = {stage: s for jid, stage, s in clients.reported if jid == job_id}
    assert sorted(reported) == ["decode", "finish", "shard 0-2", "shard 2-4", "shard 4-6"]
    assert _ledger(store, job_id) == pytest.approx(reported)  # one row per stage: the retry added none
    assert reported["decode"] == DECODE_S and reported["finish"] == FINISH_S
    [usage] = [store.usage_of_jobs([job_id])[job_id]]
    by_pool = {(line["pool"], line["device"]): line["seconds"] for line in usage}
    shards = sum(s for stage, s in reported.items() if stage.startswith("shard"))
    assert by_pool == pytest.approx({(POOL, "cpu"): shards, ("decode", "cpu"): DECODE_S, ("finish", "cpu"): FINISH_S})
    assert by_pool[(POOL, "cpu")] > 0
    day = store.now().date()
    assert sum(r["seconds"] for r in store.usage_by_day("acct_a", day, day)) == pytest.approx(sum(reported.values()))
    assert store.usage_by_day("acct_b", day, day) == []


def test_a_stage_is_recorded_once_and_only_by_its_lease_holder(store, tiny_spec):
    job_id = _create(store, tiny_spec, "waves", "acct_a")
    job = store.claim_next("dispatcher:one", 60)
    assert job.id == job_id
    assert store.record_usage(job_id, "dispatcher:one", "shard 0-2", POOL, "cuda:1", 1.5)
    # The same shard again (redone after a restart before its progress was written): not added.
    assert not store.record_usage(job_id, "dispatcher:one", "shard 0-2", POOL, "cuda:0", 2.0)
    assert not store.record_usage(job_id, "dispatcher:two", "decode", "decode", "cuda", 1.0)  # fenced out
    assert store.usage_of_jobs([job_id]) == {job_id: [{"pool": POOL, "device": "cuda", "seconds": 1.5, "stages": 1}]}
    with pytest.raises(ValueError, match="seconds"):
        store.record_usage(job_id, "dispatcher:one", "decode", "decode", "cpu", float("nan"))


def test_a_spent_budget_holds_bulk_work_not_interactive_until_it_is_raised(store, tiny_spec, stages):
    """acct_a's budget is spent: its queued bulk job is not claimed and its running bulk job's
    next shard waits, while its interactive job and acct_b's bulk job complete. Raising the
    budget lets both bulk jobs of acct_a finish."""
    release = asyncio.Event()
    running_bulk = "a bulk render already running"
    clients = LocalStages(tiny_spec, stages, denoisers=1, gates={(running_bulk, 0): release})
    dispatcher = Dispatcher(store, clients, [tiny_spec], shard_steps=SHARD_STEPS, policy=FAST, poll_s=0.05,
                            budgets=BudgetRule(default_daily_s=None), budget_poll_s=0.05)
    running = _create(store, tiny_spec, running_bulk, "acct_a", Priority.BULK)

    async def scenario():
        runner = asyncio.create_task(dispatcher.run())
        try:
            while clients.calls[running_bulk] == 0:  # in its first shard
                await asyncio.sleep(0.01)
            store.set_budget("acct_a", tier=None, daily_seconds=0.0)  # the operator stops acct_a
            while "acct_a" not in dispatcher.held:
                await asyncio.sleep(0.01)
            ids = {"queued_bulk": _create(store, tiny_spec, "queued bulk of a", "acct_a", Priority.BULK),
                   "interactive": _create(store, tiny_spec, "interactive of a", "acct_a"),
                   "other_bulk": _create(store, tiny_spec, "bulk of b", "acct_b", Priority.BULK)}
            dispatcher.wake()
            release.set()  # the running bulk shard ends: a shard boundary
            while not all(store.get(ids[k]).terminal for k in ("interactive", "other_bulk")):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # several budget reads and claims later
            held = {k: store.get(v).status for k, v in ids.items()} | {"running": store.get(running).status}
            assert held == {"queued_bulk": "queued", "interactive": "completed", "other_bulk": "completed",
                            "running": "in_progress"}
            assert store.get(running).step_index == SHARD_STEPS  # stopped at its shard boundary
            assert [s.job_id for s in dispatcher.placement.scheduler.held()] == [running]
            store.set_budget("acct_a", tier=None, daily_seconds=None)  # raised: back to unlimited
            while not (store.get(running).terminal and store.get(ids["queued_bulk"]).terminal):
                await asyncio.sleep(0.02)
            return ids
        finally:
            await dispatcher.stop()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    ids = asyncio.run(scenario())
    assert store.get(running).status == store.get(ids["queued_bulk"]).status == "completed"


def test_spending_counts_per_utc_day_and_resets_at_midnight(store, tiny_spec, clock):
    rule = BudgetRule(default_daily_s=10.0, tiers={"gold": 100.0, "free": 0.0})
    job_id = _create(store, tiny_spec, "fox", "acct_a")
    store.claim_next("w", 3600)
    store.record_usage(job_id, "w", "shard 0-2", POOL, "cuda", 12.0)
    today = store.budget_status("acct_a", rule)
    assert (today.spent_s, today.limit_s, today.exhausted) == (12.0, 10.0, True)
    assert today.resets_at == next_reset(clock()) and today.resets_at.time() == dt.time(0, 0)
    assert store.spent_accounts(rule) == {"acct_a"}
    store.set_budget("acct_a", tier="gold", daily_seconds=None)  # a tier with room
    assert not store.budget_status("acct_a", rule).exhausted and store.spent_accounts(rule) == frozenset()
    store.set_budget("acct_b", tier="free", daily_seconds=None)  # a zero tier stops an account outright
    assert store.spent_accounts(rule) == {"acct_b"}
    store.set_budget("acct_a", tier="gold", daily_seconds=12.0)  # the override wins over the tier
    assert store.spent_accounts(rule) == {"acct_a", "acct_b"}

    clock.advance((today.resets_at - clock()).total_seconds() + 1)  # just past 00:00 UTC
    tomorrow = store.budget_status("acct_a", rule)
    assert (tomorrow.spent_s, tomorrow.exhausted, tomorrow.day) == (0.0, False, today.day + dt.timedelta(days=1))
    assert store.spent_accounts(rule) == {"acct_b"}
    # The row stays on the day it was recorded on.
    assert store.usage_by_day("acct_a", today.day, tomorrow.day) == [
        {"date": today.day.isoformat(), "pool": POOL, "device": "cuda", "seconds": 12.0}]
