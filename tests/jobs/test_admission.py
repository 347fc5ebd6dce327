"""Admission: per-class and per-account queue caps, idempotency, and creates racing each other."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from farm.jobs.admission import _LOCK_OWNER, _hash32
from farm.jobs.store import PRIORITY_BULK, PRIORITY_INTERACTIVE, VIDEOS, Job, JobStore, QueueFull
from tests.clock import Clock
from tests.jobs.test_queue import insert_rows
from tests.jobs.test_store import LEASE_S, make


def race(n: int, attempt) -> list:
    """``attempt(i)`` for i in 0..n-1 on n threads released together; results or exceptions."""
    barrier = threading.Barrier(n)

    def run(i: int):
        barrier.wait()
        try:
            return attempt(i)
        except Exception as exc:  # noqa: BLE001  (the outcome is what the test inspects)
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def true_depths(store: JobStore) -> dict[int, int]:
    """Runnable rows per class, counted from the table (what ``queue_depths`` must agree with)."""
    query = sa.select(VIDEOS.c.priority, sa.func.count()).where(sa.text("status = 'queued' AND NOT cancel_requested"))
    with store._engine.connect() as conn:
        counted = dict(conn.execute(query.group_by(VIDEOS.c.priority)).all())
    return {p: counted.get(p, 0) for p in (PRIORITY_INTERACTIVE, PRIORITY_BULK)}


# -- caps per class ------------------------------------------------------------------------------


def test_a_bulk_flood_never_refuses_interactive_creates(store: JobStore) -> None:
    insert_rows(store, 500, status="queued", priority=PRIORITY_BULK)  # far past the bulk cap
    with pytest.raises(QueueFull) as full:
        make(store, "one bulk too many", priority=PRIORITY_BULK, max_queued=100)
    assert (full.value.scope, full.value.queued, full.value.max_queued) == ("farm", 500, 100)
    interactive = [make(store, f"interactive {i}", max_queued=2) for i in range(2)]  # its own cap
    with pytest.raises(QueueFull):
        make(store, "interactive, one too many", max_queued=2)
    assert store.queue_depths() == {PRIORITY_INTERACTIVE: 2, PRIORITY_BULK: 500}
    # Freeing an interactive slot lets the next interactive create in; bulk stays full.
    assert store.claim_next("w", LEASE_S).id == interactive[0].id
    make(store, "interactive again", max_queued=2)
    with pytest.raises(QueueFull):
        make(store, "bulk", priority=PRIORITY_BULK, max_queued=100)


def test_account_caps_count_every_class_of_that_owner_only(store: JobStore) -> None:
    make(store, owner="alice", priority=PRIORITY_BULK, max_queued_per_owner=2)
    make(store, owner="alice", max_queued_per_owner=2)
    with pytest.raises(QueueFull) as full:
        make(store, owner="alice", max_queued_per_owner=2)
    assert (full.value.scope, full.value.queued) == ("account", 2)
    make(store, owner="bob", max_queued_per_owner=2)
    make(store, max_queued_per_owner=1)  # the anonymous owner is one owner of its own
    with pytest.raises(QueueFull):
        make(store, max_queued_per_owner=1)


def test_queue_depths_follow_every_transition(store: JobStore, clock: Clock) -> None:
    """The trigger-kept counters agree with a count of the table after each kind of change."""
    rng = random.Random(7)
    jobs = [make(store, f"clip {i}", owner=f"o{i % 3}", priority=i % 2) for i in range(24)]
    for step in range(120):
        action = rng.choice(["create", "claim", "requeue", "lost", "cancel", "delete", "finish", "reap"])
        if action == "create":
            jobs.append(make(store, f"more {step}", priority=rng.choice([0, 1])))
        elif action == "claim":
            store.claim_next("w", 5, max_attempts=3, priorities=rng.choice([None, [0], [1]]))
        elif action in ("requeue", "lost", "finish") and (held := store.held_by("w")):
            job_id = rng.choice(held)
            if action == "finish":
                store.complete(job_id, "w", {"video": "k"})
            else:
                store.requeue(job_id, "w", "test", voluntary=action == "requeue")
        elif action == "cancel":
            store.request_cancel(rng.choice(jobs).id)
        elif action == "delete":
            store.delete(rng.choice(jobs).id)
        elif action == "reap":
            clock.advance(6)
            store.reap(max_attempts=3)
        assert store.queue_depths() == true_depths(store), f"after step {step}: {action}"


# -- concurrency: caps are never exceeded, keys never doubled ------------------------------------


def test_concurrent_creates_never_exceed_either_class_cap(store: JobStore) -> None:
    caps = {PRIORITY_INTERACTIVE: 3, PRIORITY_BULK: 5}

    def attempt(i: int) -> Job:
        priority = i % 2
        return make(store, f"clip {i}", priority=priority, max_queued=caps[priority])

    outcomes = race(20, attempt)
    created = Counter(o.priority for o in outcomes if isinstance(o, Job))
    refused = [o for o in outcomes if not isinstance(o, Job)]
    assert created == {PRIORITY_INTERACTIVE: 3, PRIORITY_BULK: 5}
    assert len(refused) == 12 and all(isinstance(o, QueueFull) for o in refused)
    assert store.queue_depths() == true_depths(store) == caps


def test_concurrent_creates_never_exceed_account_caps_or_double_a_key(store: JobStore) -> None:
    owners = ["alice", "bob", "carol"]

    def attempt(i: int) -> Job:
        owner = owners[i % 3]
        if i % 2:  # the same key from every thread of this owner: one job
            return make(store, "keyed", owner=owner, idempotency_key="k", max_queued_per_owner=3, max_queued=100)
        return make(store, f"clip {i}", owner=owner, priority=i % 4 // 2, max_queued_per_owner=3, max_queued=100)

    outcomes = race(24, attempt)
    assert all(isinstance(o, (Job, QueueFull)) for o in outcomes), outcomes
    keyed = {o.owner: set() for o in outcomes if isinstance(o, Job)}
    for o in outcomes:
        if isinstance(o, Job) and o.idempotency_key == "k":
            keyed[o.owner].add(o.id)
    assert all(len(ids) <= 1 for ids in keyed.values())
    queued = Counter(job.owner for job in store.list(limit=100)[0])
    assert queued == {owner: 3 for owner in owners}  # each owner filled its cap, never more


# PostgreSQL only: SQLite has one writer at a time, so its creates serialise by design.
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_creates_lock_per_owner_and_per_class_not_globally(store: JobStore) -> None:
    """While one transaction holds alice's lock and the bulk class's counter, bob's creates and
    interactive creates go ahead; only the creates that could change that answer wait (a bulk insert
    waits too: the trigger moves the bulk counter it holds)."""
    pool = ThreadPoolExecutor(4)
    with store._writer.connect() as holder:
        holder.begin()
        try:
            holder.execute(sa.select(sa.func.pg_advisory_xact_lock(
                sa.cast(sa.literal(_LOCK_OWNER), sa.Integer), sa.cast(sa.literal(_hash32("alice")), sa.Integer))))
            holder.execute(sa.text("SELECT queued FROM queue_depths WHERE priority = 1 FOR UPDATE"))
            free = [
                pool.submit(make, store, owner="bob", max_queued_per_owner=5, idempotency_key="b1"),
                pool.submit(make, store, owner="bob", max_queued=5),  # interactive: another counter
                pool.submit(make, store, owner="carol"),  # interactive, no cap, no key: no lock at all
            ]
            for future in free:
                assert isinstance(future.result(timeout=10), Job)
            waiting = [
                pool.submit(make, store, owner="alice", idempotency_key="a1"),
                pool.submit(make, store, owner="bob", priority=PRIORITY_BULK, max_queued=5),
                pool.submit(make, store, owner="carol", priority=PRIORITY_BULK),
            ]
            time.sleep(0.5)
            assert not any(f.done() for f in waiting)
        finally:
            holder.rollback()  # before anything else: the waiting creates hold the pool's threads
    for future in waiting:
        assert isinstance(future.result(timeout=10), Job)
    pool.shutdown()


# -- the gateway passes the cap of the request's class ---------------------------------------------


def test_the_gateway_caps_each_class_apart(store: JobStore) -> None:
    from fastapi.testclient import TestClient

    from farm.api.app import GatewayDeps, create_app
    from farm.render.registry import ModelSpec

    spec = ModelSpec(id="wan-tiny", path="/models/wan-tiny", sizes=["128x128"], seconds=[2], default_steps=4,
                     max_steps=8)
    app = create_app(GatewayDeps(store=store, objects=lambda: None, models=[spec], max_queued=1, max_queued_bulk=2))
    with TestClient(app) as client:
        post = lambda priority: client.post("/v1/videos", json={"prompt": "a cat", "priority": priority})  # noqa: E731
        assert [post("bulk").status_code for _ in range(3)] == [200, 200, 429]
        refused = post("bulk")
        assert refused.json()["error"]["code"] == "queue_full" and "bulk" in refused.json()["error"]["message"]
        assert [post("interactive").status_code for _ in range(2)] == [200, 429]
    assert store.queue_depths() == {PRIORITY_INTERACTIVE: 1, PRIORITY_BULK: 2}
    with pytest.raises(ValueError, match="max_queued_bulk"):
        GatewayDeps(store=store, objects=lambda: None, models=[spec], max_queued_bulk=0)


# -- ids drawn by the caller ------------------------------------------------------------------


def test_a_caller_drawn_id_is_the_new_jobs_and_a_replay_keeps_its_own(store: JobStore) -> None:
    from farm.jobs.job import new_video_id

    drawn = new_video_id()
    job = make(store, "from an image", video_id=drawn, idempotency_key="img-1")
    assert job.id == drawn and store.get(drawn).prompt == "from an image"
    replay = make(store, "from an image", video_id=new_video_id(), idempotency_key="img-1")
    assert replay.id == drawn  # the earlier job, whatever id this attempt drew
    with pytest.raises(ValueError, match="video_id: 'videos/../x' is not an id from new_video_id"):
        make(store, "bad id", video_id="videos/../x")
    assert [j.id for j in store.list(limit=10)[0]] == [drawn]
