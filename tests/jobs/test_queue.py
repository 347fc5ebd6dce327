"""Claims read the runnable index; the reaper settles expired leases (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from farm.jobs.job import new_job
from farm.jobs.admission import depth_query, owner_depth_query
from farm.jobs.queue import claim_query, reap_query
from farm.jobs.store import PRIORITY_BULK, PRIORITY_INTERACTIVE, VIDEOS, JobStore
from tests.clock import Clock
from tests.jobs.test_store import LEASE_S, make


def insert_rows(store: JobStore, n: int, *, status: str, priority: int, owner: str | None = None) -> None:
    """``n`` rows in one executemany (not ``n`` creates), as old as their index says."""
    start = store._clock() - dt.timedelta(days=1)
    rows = []
    for i in range(n):
        job = new_job("wan-tiny", f"row {i}", "128x128", 2, {}, priority, owner, None, 3600.0,
                      start + dt.timedelta(microseconds=i))
        row = dataclasses.asdict(job) | {"status": status}
        if status == "in_progress":
            row |= {"lease_owner": "dispatcher:old", "lease_expires_at": start + dt.timedelta(hours=2), "attempts": 1}
        elif status != "queued":
            row |= {"completed_at": start + dt.timedelta(seconds=i)}
        rows.append(row)
    with store._writer.begin() as conn:
        conn.execute(sa.insert(VIDEOS), rows)


def plan_of(store: JobStore, query: sa.Executable) -> str:
    """The plan of ``query`` as the store's driver sends it (SQLite's EXPLAIN QUERY PLAN,
    PostgreSQL's EXPLAIN), one line per node."""
    sent = []
    with store._engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", lambda *args: sent.append(args[2:4]))
        conn.execute(query)  # run once to see the exact statement and processed parameters
        statement, parameters = sent[-1]
        explain = "EXPLAIN QUERY PLAN " if store._sqlite else "EXPLAIN "
        rows = conn.exec_driver_sql(explain + statement, parameters).all()
        conn.rollback()
    return "\n".join(str(r[-1] if store._sqlite else r[0]) for r in rows)


@pytest.fixture
def shaped(store: JobStore) -> JobStore:
    """A store shaped like a busy farm: mostly finished jobs, thousands queued, a few running."""
    insert_rows(store, 3000, status="completed", priority=PRIORITY_BULK)
    insert_rows(store, 400, status="queued", priority=PRIORITY_INTERACTIVE)  # anonymous
    insert_rows(store, 1600, status="queued", priority=PRIORITY_BULK, owner="acct_bulk")
    insert_rows(store, 8, status="in_progress", priority=PRIORITY_BULK)
    if not store._sqlite:
        with store._writer.begin() as conn:
            conn.exec_driver_sql("ANALYZE videos")
    return store


# -- the plan: claims and caps read the partial indexes ----------------------------------------


def test_claims_and_caps_read_the_runnable_index(shaped: JobStore) -> None:
    c = VIDEOS.c
    cases = {  # the store's own queries, as it runs them
        "claim": (claim_query(), "ix_videos_runnable"),
        "claim one class": (claim_query(c.priority == PRIORITY_BULK), "ix_videos_runnable"),
        "account cap": (owner_depth_query("acct_bulk"), "ix_videos_runnable_owner"),
        "anonymous account cap": (owner_depth_query(None), "ix_videos_runnable_owner"),
        "class cap": (depth_query(PRIORITY_BULK), "queue_depths"),  # one row, by its primary key
        "reap": (reap_query(shaped._clock()), "ix_videos_leased"),
    }
    for name, (query, index) in cases.items():
        plan = plan_of(shaped, query)
        assert re.search(rf"\b{index}\b", plan), f"{name}: {plan}"
        if shaped._sqlite:
            assert "TEMP B-TREE" not in plan and "SCAN videos\n" not in plan + "\n", f"{name}: {plan}"
        else:
            assert "Seq Scan" not in plan and "Sort" not in plan, f"{name}: {plan}"
    # The store's claim really is that query: it takes the oldest interactive row first.
    claimed = shaped.claim_next("w", LEASE_S)
    assert claimed.priority == PRIORITY_INTERACTIVE and claimed.prompt == "row 0"


# -- claim_next: classes, spent jobs --------------------------------------------------------------


def test_claim_can_be_limited_to_priority_classes(store: JobStore) -> None:
    bulk = make(store, "bulk", priority=PRIORITY_BULK)
    interactive = make(store, "interactive")
    assert store.claim_next("w", 60, priorities={PRIORITY_BULK}).id == bulk.id  # bulk, though interactive waits
    assert store.claim_next("w", 60, priorities=[PRIORITY_BULK]) is None
    later = make(store, "bulk later", priority=PRIORITY_BULK)
    assert store.claim_next("w", 60, priorities=(PRIORITY_BULK, PRIORITY_INTERACTIVE)).id == interactive.id
    assert store.claim_next("w", 60, priorities=[PRIORITY_INTERACTIVE]) is None
    assert store.claim_next("w", 60).id == later.id
    for bad in ([], [5], "0", [True]):
        with pytest.raises(ValueError, match="priorities"):
            store.claim_next("w", 60, priorities=bad)
    with pytest.raises(ValueError, match="max_attempts"):
        store.claim_next("w", 60, max_attempts=0)


def test_a_claim_fails_spent_jobs_and_takes_the_next(store: JobStore) -> None:
    spent = make(store, "keeps killing its workers")
    fine = make(store, "fine")
    for attempt in range(1, 3):
        assert store.claim_next(f"d:{attempt}", LEASE_S, max_attempts=2).id == spent.id
        assert store.requeue(spent.id, f"d:{attempt}", "died", voluntary=False)
    assert store.claim_next("d:3", LEASE_S, max_attempts=2).id == fine.id  # in the same call
    assert (store.get(spent.id).status, store.get(spent.id).error_code) == ("failed", "worker_lost")
    assert [(e.video_id, e.type) for e in store.events_since(0)] == [(spent.id, "video.failed")]


# -- reap: only expired leases, each settled once --------------------------------------------------


def test_reap_takes_back_only_expired_leases(store: JobStore, clock: Clock) -> None:
    dead, live = make(store, "dead sibling's"), make(store, "live sibling's")
    assert store.claim_next("dispatcher:a", 10).id == dead.id
    assert store.claim_next("dispatcher:b", 600).id == live.id
    assert store.record_progress(dead.id, "dispatcher:a", step_index=3, num_steps=8, progress=37, checkpoint_key="ck/3")
    clock.advance(11)
    report = store.reap()
    assert (report.requeued, report.cancelled, report.failed) == ((dead.id,), (), ())
    # The live sibling is untouched and keeps writing; the dead one is fenced.
    assert store.record_progress(live.id, "dispatcher:b", step_index=1, num_steps=8, progress=12)
    assert store.leases_of("dispatcher") == [(live.id, "dispatcher:b")]
    assert not store.record_progress(dead.id, "dispatcher:a", step_index=4, num_steps=8, progress=50)
    back = store.get(dead.id)
    assert (back.status, back.lease_owner, back.attempts, back.checkpoint_key) == ("queued", None, 1, "ck/3")
    again = store.claim_next("dispatcher:c", 60)
    assert (again.id, again.attempts, again.step_index, again.started_at) == (dead.id, 2, 3, back.started_at)
    assert len(store.reap()) == 0 and store.events_since(0) == []  # a requeue is not a terminal event


def test_reap_cancels_or_fails_what_it_must(store: JobStore, clock: Clock) -> None:
    asked, spent, retried = make(store, "asked to stop"), make(store, "spent"), make(store, "again")
    for job in (asked, spent, retried):
        store.claim_next("w", LEASE_S)
    store.request_cancel(asked.id)
    store.requeue(spent.id, "w", "died", voluntary=False)  # attempt 1 lost
    store.claim_next("w", LEASE_S)  # attempt 2 of `spent`
    clock.advance(LEASE_S + 1)
    report = store.reap(max_attempts=2)
    assert (report.cancelled, report.failed, report.requeued) == ((asked.id,), (spent.id,), (retried.id,))
    assert len(report) == 3
    assert store.get(spent.id).error_code == "worker_lost" and store.get(asked.id).status == "cancelled"
    assert sorted((e.video_id, e.type) for e in store.events_since(0)) == sorted(
        [(asked.id, "video.cancelled"), (spent.id, "video.failed")])


def test_concurrent_reapers_settle_each_job_once(store: JobStore, clock: Clock) -> None:
    jobs = [make(store, f"clip {i}") for i in range(12)]
    for _ in jobs:
        store.claim_next("w", LEASE_S)
    for job in jobs[:6]:
        store.request_cancel(job.id)
    clock.advance(LEASE_S + 1)
    barrier = threading.Barrier(4)

    def reap(_: int):
        barrier.wait()
        return store.reap(max_attempts=5)

    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(reap, range(4)))
    requeued = [i for r in reports for i in r.requeued]
    cancelled = [i for r in reports for i in r.cancelled]
    assert sorted(requeued) == sorted(j.id for j in jobs[6:])
    assert sorted(cancelled) == sorted(j.id for j in jobs[:6])
    assert len(store.events_since(0)) == 6
    assert store.counts_by_status() == {"queued": 6, "in_progress": 0, "completed": 0, "failed": 0, "cancelled": 6}
