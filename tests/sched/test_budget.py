"""Budgets as data: the limit an account gets, when a day resets, and held bulk work in the policy."""

from __future__ import annotations

import datetime as dt

import pytest

from farm.sched import Scheduler
from farm.sched.budget import BudgetRule, exhausted, next_reset, spent_tenants, utc_day
from tests.sched.test_policy import jobs_of, shard


def test_an_accounts_limit_is_its_override_else_its_tier_else_the_default():
    rule = BudgetRule(default_daily_s=60.0, tiers={"gold": 3600.0, "unlimited": None})
    assert rule.limit() == 60.0
    assert rule.limit("gold") == 3600.0
    assert rule.limit("unlimited") is None
    assert rule.limit("gold", 5.0) == 5.0
    assert rule.limit("no-such-tier") == 60.0
    assert BudgetRule().limit() is None and not exhausted(1e9, None)
    assert exhausted(0.0, 0.0) and exhausted(60.0, 60.0) and not exhausted(59.9, 60.0)
    assert spent_tenants({"a": 61.0, "b": 10.0}, {"b": 5.0, "c": 0.0}, rule, {"d": "gold"}) == {"a", "b", "c"}


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "10"])
def test_a_budget_must_be_a_finite_non_negative_number(bad):
    with pytest.raises(ValueError, match="default_daily_s"):
        BudgetRule(default_daily_s=bad)
    with pytest.raises(ValueError, match=r"tiers\['gold'\]"):
        BudgetRule(tiers={"gold": bad})


def test_a_day_resets_at_the_next_utc_midnight_whatever_the_callers_zone():
    tokyo = dt.timezone(dt.timedelta(hours=9))
    now = dt.datetime(2026, 12, 3, 8, 30, tzinfo=tokyo)  # 2026-12-02 23:30 UTC
    assert utc_day(now) == dt.date(2026, 12, 2)
    assert next_reset(now) == dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
    assert next_reset(dt.datetime(2026, 12, 3, tzinfo=dt.UTC)) == dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        utc_day(dt.datetime(2026, 12, 3))


def test_held_tenants_bulk_shards_wait_aside_and_come_back_in_their_old_order():
    s = Scheduler()
    s.add_replica("r0", "p")
    s.submit(shard("a1", "a", queued_at=0.0), 0.0)
    s.submit(shard("a2", "a", queued_at=1.0), 1.0)
    s.submit(shard("b1", "b", queued_at=2.0), 2.0)
    s.hold_bulk({"a"}, 3.0)
    s.submit(shard("a3", "a", queued_at=3.0), 3.0)  # new bulk work of a held tenant waits aside too
    s.submit(shard("ai", "a", "interactive", queued_at=3.0), 3.0)  # interactive work is never held
    assert s.queue_depth("p").bulk == 1 and {x.job_id for x in s.held()} == {"a1", "a2", "a3"}
    assert jobs_of(s.schedule(4.0)) == [["ai"]]
    s.finished("r0")
    assert jobs_of(s.schedule(5.0)) == [["b1"]]
    s.finished("r0")
    assert s.schedule(6.0) == []  # only held work is left: the replica stays free
    assert s.cancel("a2") == 1 and {x.job_id for x in s.held()} == {"a1", "a3"}
    with pytest.raises(ValueError, match="already waiting"):
        s.submit(shard("a1", "a", queued_at=0.0), 6.0)
    s.hold_bulk(set(), 7.0)  # raised budget or a new day
    assert s.held() == ()
    order = []
    for t in (8.0, 9.0):
        [assignment] = s.schedule(t)
        order.append(assignment.shards[0].job_id)
        s.finished("r0")
    assert order == ["a1", "a3"]


def test_holding_leaves_running_shards_and_other_tenants_alone():
    s = Scheduler()
    s.add_replica("r0", "p")
    s.add_replica("r1", "p")
    s.submit(shard("a1", "a", queued_at=0.0), 0.0)
    [running] = s.schedule(0.0)
    s.hold_bulk(["a"], 1.0)
    assert s.running(running.replica_id)[0].job_id == "a1"  # it finishes; only its next shard is held
    s.finished(running.replica_id)
    s.submit(shard("a1", "a", start=4, end=8, queued_at=0.0), 2.0)
    s.submit(shard("b1", "b", queued_at=2.0), 2.0)
    assert jobs_of(s.schedule(2.0)) == [["b1"]]
    s.hold_bulk(["a"], 3.0)  # the same set again changes nothing
    assert [(x.job_id, x.start) for x in s.held()] == [("a1", 4)]
