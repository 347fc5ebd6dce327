"""Schedules: cron in a time zone, firing as a compare-and-set claim (never doubled, across restarts and
two firing processes), the missed-run policies, pause/resume, tenancy. SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from farm.jobs.schedules import ScheduleStore, check_cron, check_timezone, next_run
from farm.jobs.store import JobStore
from tests.clock import Clock

UTC = dt.UTC
TOKYO_3AM = ("0 3 * * *", "Asia/Tokyo")


@pytest.fixture
def schedules(store: JobStore, store_url: str, clock: Clock) -> ScheduleStore:
    clock.freeze()
    return ScheduleStore(store_url, clock=clock)


def _batches(s: ScheduleStore, schedule_id: str) -> list:
    return [b for b in s.batches.list_batches(limit=100)[0] if b.schedule_id == schedule_id]


def _to(clock: Clock, when: dt.datetime) -> None:
    clock.advance((when - clock()).total_seconds())


def test_cron_and_timezone_are_checked_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^cron: '0 3 \* \*' must have five fields"):
        check_cron("0 3 * *")
    with pytest.raises(ValueError, match=r"^cron: '61 3 \* \* \*' is not valid"):
        check_cron("61 3 * * *")
    with pytest.raises(ValueError, match=r"^timezone: 'Mars/Olympus' is not an IANA time zone"):
        check_timezone("Mars/Olympus")


def test_next_run_is_computed_in_the_schedules_time_zone() -> None:
    # 03:00 in Tokyo is 18:00 UTC the day before.
    assert next_run(*TOKYO_3AM, dt.datetime(2026, 12, 2, 0, 0, tzinfo=UTC)) == dt.datetime(2026, 12, 2, 18, 0, tzinfo=UTC)
    assert next_run(*TOKYO_3AM, dt.datetime(2026, 12, 2, 18, 0, tzinfo=UTC)) == dt.datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
    # Berlin's clocks go forward at 02:00 on 2027-03-28: 02:30 local does not exist that day; the runs
    # before and after keep their local time, an hour apart in UTC.
    before = next_run("30 2 * * *", "Europe/Berlin", dt.datetime(2027, 3, 26, 12, tzinfo=UTC))
    assert before == dt.datetime(2027, 3, 27, 1, 30, tzinfo=UTC)  # 02:30 CET
    on = next_run("30 2 * * *", "Europe/Berlin", before)
    after = next_run("30 2 * * *", "Europe/Berlin", on)
    assert on.date() == dt.date(2027, 3, 28) and after == dt.datetime(2027, 3, 29, 0, 30, tzinfo=UTC)  # 02:30 CEST
    with pytest.raises(ValueError, match=r"^cron: '0 0 30 2 \*' is not valid: Bad day-of-month"):
        check_cron("0 0 30 2 *")  # 30 February never comes


def test_a_schedule_fires_once_per_run_on_a_fake_clock_and_survives_a_restart(
        schedules: ScheduleStore, store_url: str, clock: Clock) -> None:
    made = schedules.create(owner="acct_a", cron=TOKYO_3AM[0], timezone=TOKYO_3AM[1], input_file_id="file_x")
    assert made.next_run_at == next_run(*TOKYO_3AM, clock())
    assert schedules.fire_due(300) == []  # not due yet
    _to(clock, made.next_run_at + dt.timedelta(seconds=1))
    [fired] = schedules.fire_due(300)
    assert fired.schedule_id == made.id and fired.due_at == made.next_run_at and fired.batch_id
    assert schedules.fire_due(300) == []  # the same run, again: nothing
    # A restart: a new store (a new dispatcher) over the same database, at the same instant.
    restarted = ScheduleStore(store_url, clock=clock)
    assert restarted.fire_due(300) == []
    [batch] = _batches(restarted, made.id)
    assert batch.id == fired.batch_id and batch.status == "validating" and batch.owner == "acct_a"
    assert batch.input_file_id == "file_x" and batch.meta == {"schedule_id": made.id}
    now = restarted.get(made.id)
    assert now.runs == 1 and now.last_batch_id == batch.id and now.next_run_at == made.next_run_at + dt.timedelta(days=1)
    # The next day's run fires on the restarted store, once.
    _to(clock, now.next_run_at)
    assert len(restarted.fire_due(300)) == 1 and restarted.fire_due(300) == []
    assert len(_batches(restarted, made.id)) == 2


def test_two_firing_processes_make_one_batch_per_run(schedules: ScheduleStore, store_url: str, clock: Clock) -> None:
    made = [schedules.create(owner=None, cron="*/5 * * * *", timezone="UTC", input_file_id=f"file_{i}")
            for i in range(5)]
    _to(clock, max(m.next_run_at for m in made))
    stores = [ScheduleStore(store_url, clock=clock) for _ in range(4)]
    start = threading.Barrier(len(stores))
    fired: list = []

    def fire(s: ScheduleStore) -> None:
        start.wait()
        fired.extend(s.fire_due(300))

    threads = [threading.Thread(target=fire, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(f.schedule_id for f in fired) == sorted(m.id for m in made)  # each claimed exactly once
    for m in made:
        assert len(_batches(schedules, m.id)) == 1 and schedules.get(m.id).runs == 1


@pytest.mark.parametrize("missed, batches", [("skip", 0), ("run_once", 1)])
def test_missed_runs_follow_the_policy_and_never_catch_up(
        schedules: ScheduleStore, clock: Clock, missed: str, batches: int) -> None:
    made = schedules.create(owner="a", cron="0 * * * *", timezone="UTC", input_file_id="f", missed=missed)
    # The farm was down for a day and a half: 36 hourly runs were missed.
    _to(clock, made.next_run_at + dt.timedelta(hours=36, minutes=10))
    [fired] = schedules.fire_due(misfire_grace_s=300)
    assert (fired.batch_id is not None) == bool(batches)
    assert schedules.fire_due(misfire_grace_s=300) == []
    now = schedules.get(made.id)
    assert len(_batches(schedules, made.id)) == batches
    assert (now.runs, now.skipped) == (batches, 1 - batches)
    assert clock() < now.next_run_at <= clock() + dt.timedelta(hours=1)  # the next run after now, not a backlog


def test_late_within_grace_still_runs_under_skip(schedules: ScheduleStore, clock: Clock) -> None:
    made = schedules.create(owner="a", cron="0 * * * *", timezone="UTC", input_file_id="f", missed="skip")
    _to(clock, made.next_run_at + dt.timedelta(seconds=120))
    [fired] = schedules.fire_due(misfire_grace_s=300)
    assert fired.batch_id is not None


def test_pause_and_resume_from_now(schedules: ScheduleStore, clock: Clock) -> None:
    made = schedules.create(owner="a", cron="0 3 * * *", timezone="UTC", input_file_id="f", missed="run_once")
    assert schedules.set_paused(made.id, True, owner="a").paused
    _to(clock, made.next_run_at + dt.timedelta(days=3))
    assert schedules.fire_due(300) == []  # paused: nothing fires, even under run_once
    resumed = schedules.set_paused(made.id, False, owner="a")
    assert not resumed.paused and clock() < resumed.next_run_at <= clock() + dt.timedelta(days=1)
    assert schedules.fire_due(300) == []  # what the pause covered is not made up


def test_schedules_are_per_account(schedules: ScheduleStore) -> None:
    made = schedules.create(owner="a", cron="0 3 * * *", timezone="UTC", input_file_id="f")
    assert schedules.get(made.id, owner="b") is None
    assert schedules.set_paused(made.id, True, owner="b") is None
    assert not schedules.delete(made.id, owner="b")
    assert schedules.list(owner="b")[0] == [] and [s.id for s in schedules.list(owner="a")[0]] == [made.id]
    with pytest.raises(LookupError, match="limit is 1"):
        schedules.create(owner="a", cron="0 4 * * *", timezone="UTC", input_file_id="f", max_per_owner=1)
    with pytest.raises(ValueError, match="^missed: 'later' is not allowed; allowed: skip, run_once"):
        schedules.create(owner="a", cron="0 4 * * *", timezone="UTC", input_file_id="f", missed="later")
    assert schedules.delete(made.id, owner="a") and schedules.get(made.id) is None
