"""The job store against real databases: SQLite files and a PostgreSQL server."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from farm.api.wire import video_object
from farm.jobs.store import (
    PRIORITY_BULK,
    PRIORITY_INTERACTIVE,
    Base,
    IdempotencyConflict,
    Job,
    JobStore,
    QueueFull,
    Video,
    alembic_config,
)
from tests.jobs.conftest import Clock

REPO = Path(__file__).resolve().parents[2]
LEASE_S = 60.0


def make(store: JobStore, prompt: str = "a cat", **overrides) -> Job:
    kwargs = dict(model="wan-tiny", prompt=prompt, size="128x128", seconds=2, params={"steps": 8, "seed": 7})
    kwargs.update(overrides)
    return store.create(**kwargs)


def spawn(code: str, *args: str, setup: str = "") -> subprocess.Popen:
    """A Python child that runs ``setup``, prints 'ready', waits for a line on stdin, then runs ``code``."""
    prelude = "import sys, json\nfrom farm.jobs.store import JobStore\n" + setup
    prelude += "\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-c", prelude + code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def version_of(url: str) -> list[str]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        versions = list(conn.scalars(sa.text("SELECT version_num FROM alembic_version")))
    engine.dispose()
    return versions


# -- migrations ------------------------------------------------------------------------


def _head() -> str:
    """The one head revision of the migrations (several would be a branch nobody merged)."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, f"the migrations have several heads: {heads}"
    return heads[0]


def test_migrate_is_idempotent(store: JobStore, store_url: str) -> None:
    job = make(store)
    store.migrate()
    JobStore(store_url).migrate()
    assert version_of(store_url) == [_head()]
    assert store.get(job.id) == job


def test_migrate_concurrently_from_threads_and_processes(store_url: str) -> None:
    children = [spawn("JobStore(sys.argv[1]).migrate()", store_url) for _ in range(2)]
    barrier = threading.Barrier(3)

    def migrate() -> None:
        barrier.wait()
        JobStore(store_url).migrate()

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(migrate) for _ in range(3)]
        for child in children:
            go(child)
        for future in futures:
            future.result()
    for child in children:
        finish(child)
    assert version_of(store_url) == [_head()]
    store = JobStore(store_url)
    assert store.get(make(store).id) is not None


# SQLite cannot reflect the expression index; alembic says so and skips it.
@pytest.mark.filterwarnings("ignore:.*expression-based index")
def test_migration_matches_models_and_downgrades(store: JobStore, store_url: str) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = sa.create_engine(store_url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    # The command-line path (no connection handed over) works both ways.
    command.downgrade(alembic_config(store_url), "base")
    assert not sa.inspect(engine).has_table("videos")
    command.upgrade(alembic_config(store_url), "head")
    assert sa.inspect(engine).has_table("videos")
    engine.dispose()


# -- create, get, list, delete ---------------------------------------------------------


def test_create_and_get_round_trip(store: JobStore) -> None:
    job = make(store, owner="alice", priority=PRIORITY_BULK)
    assert job.id.startswith("video_") and len(job.id) == len("video_") + 32
    assert (job.status, job.progress, job.attempts, job.num_steps) == ("queued", 0, 0, 8)
    assert job.created_at.tzinfo is not None and job.expires_at > job.created_at
    stored = store.get(job.id)
    assert stored == job
    assert pickle.loads(pickle.dumps(stored)) == stored
    assert {f.name for f in dataclasses.fields(Job)} == set(Video.__table__.c.keys())

    video = video_object(stored)
    assert video == {
        "id": job.id,
        "object": "video",
        "model": "wan-tiny",
        "served_model": "wan-tiny",  # no alias asked for
        "mapped_from": None,
        "status": "queued",
        "progress": 0,
        "created_at": int(job.created_at.timestamp()),
        "completed_at": None,
        "expires_at": int(job.expires_at.timestamp()),
        "seconds": "2",
        "size": "128x128",
        "error": None,
        "prompt": "a cat",
        "priority": "bulk",
        "seed": 7,
        "remixed_from_video_id": None,
        "cancel_requested": False,
        "queue_position": None,  # no estimate given (the gateway's queue view adds them)
        "estimated_completion_at": None,
        "usage": None,  # none given (the gateway reads the ledger)
        "visibility": "private",  # a draft until its owner shares it
        "expired": False,
    }
    assert store.get("video_" + "0" * 32) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", "128by128"),
        ("seconds", 0),
        ("priority", 5),
        ("model", ""),
        ("params", {"seed": object()}),
        ("owner", ""),
        ("expires_in_s", -1),
        ("max_queued", -1),
    ],
)
def test_create_rejects_bad_input_and_changes_nothing(store: JobStore, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        make(store, **{field: value})
    assert store.counts_by_status()["queued"] == 0


def test_list_pages_by_cursor(store: JobStore) -> None:
    jobs = [make(store, f"clip {i}", owner="alice") for i in range(5)]
    make(store, "someone else's", owner="bob")

    def walk(order: str) -> tuple[list[str], list[bool]]:
        ids, flags, after = [], [], None
        while True:
            page, has_more = store.list(owner="alice", after=after, limit=2, order=order)
            ids += [job.id for job in page]
            flags.append(has_more)
            if not has_more:
                return ids, flags
            after = page[-1].id

    ids = [job.id for job in jobs]
    assert walk("asc") == (ids, [True, True, False])
    assert walk("desc") == (ids[::-1], [True, True, False])
    page, has_more = store.list(owner="alice", limit=5, order="asc")
    assert [job.id for job in page] == ids and has_more is False
    everyone, has_more = store.list(limit=10)
    assert len(everyone) == 6 and everyone[0].owner == "bob" and not has_more
    for bad in (dict(order="sideways"), dict(limit=0), dict(after="video_missing")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            store.list(**bad)


def test_owners_see_only_their_own_jobs(store: JobStore) -> None:
    alice = make(store, owner="alice")
    bob = make(store, owner="bob")
    assert store.get(alice.id, owner="bob") is None
    assert store.get(alice.id, owner="alice") == alice
    assert store.get(alice.id) == alice  # unscoped: internal callers
    assert [job.id for job in store.list(owner="bob")[0]] == [bob.id]
    with pytest.raises(ValueError, match="after"):
        store.list(owner="bob", after=alice.id)
    assert store.delete(alice.id, owner="bob") is None
    assert store.request_cancel(alice.id, owner="bob") is None
    assert store.get(alice.id).status == "queued"
    deleted = store.delete(alice.id, owner="alice")
    assert deleted is not None and deleted.id == alice.id and deleted.prompt == alice.prompt
    assert store.get(alice.id) is None
    assert store.delete(alice.id) is None


# -- queue cap and idempotency ---------------------------------------------------------


def test_queue_cap_is_atomic_under_concurrency(store: JobStore) -> None:
    barrier = threading.Barrier(8)

    def attempt(i: int) -> Job | QueueFull:
        barrier.wait()
        try:
            return make(store, f"clip {i}", max_queued=3)
        except QueueFull as full:
            return full

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    created = [o for o in outcomes if isinstance(o, Job)]
    refused = [o for o in outcomes if isinstance(o, QueueFull)]
    assert (len(created), len(refused)) == (3, 5)
    assert all(full.retry_after_s > 0 and full.max_queued == 3 for full in refused)
    assert store.counts_by_status()["queued"] == 3


def test_queue_cap_counts_only_queued_jobs(store: JobStore) -> None:
    make(store, max_queued=1)
    with pytest.raises(QueueFull):
        make(store, max_queued=1)
    job = store.claim_next("w1", 60)
    store.complete(job.id, "w1", {"video": "k"})
    make(store, max_queued=1)  # the first one left the queue
    with pytest.raises(QueueFull) as full:
        make(store, max_queued=1)
    assert 1 <= full.value.retry_after_s <= 600  # estimated from the recent completion


def test_idempotency_key_is_unique_per_owner(store: JobStore) -> None:
    first = make(store, owner="alice", idempotency_key="k1")
    assert make(store, owner="alice", idempotency_key="k1") == first
    assert make(store, owner="alice", idempotency_key="k1", max_queued=0) == first  # a replay is not new work
    assert make(store, owner="bob", idempotency_key="k1").id != first.id
    anonymous = make(store, idempotency_key="k1")
    assert make(store, idempotency_key="k1") == anonymous
    with pytest.raises(IdempotencyConflict, match="prompt"):
        make(store, "a dog", owner="alice", idempotency_key="k1")
    assert store.counts_by_status()["queued"] == 3


def test_concurrent_creates_with_one_key_make_one_job(store: JobStore) -> None:
    barrier = threading.Barrier(6)

    def attempt(_: int) -> str:
        barrier.wait()
        return make(store, owner="alice", idempotency_key="same").id

    with ThreadPoolExecutor(6) as pool:
        assert len(set(pool.map(attempt, range(6)))) == 1
    assert store.counts_by_status()["queued"] == 1


# -- claiming and leases ---------------------------------------------------------------


def test_claim_order_is_priority_then_oldest(store: JobStore) -> None:
    bulk_old = make(store, "bulk old", priority=PRIORITY_BULK)
    interactive_old = make(store, "interactive old", priority=PRIORITY_INTERACTIVE)
    bulk_new = make(store, "bulk new", priority=PRIORITY_BULK)
    interactive_new = make(store, "interactive new")
    claimed = [store.claim_next("w1", 60) for _ in range(4)]
    assert [job.id for job in claimed] == [interactive_old.id, interactive_new.id, bulk_old.id, bulk_new.id]
    assert store.claim_next("w1", 60) is None
    job = claimed[0]
    assert (job.status, job.lease_owner, job.attempts) == ("in_progress", "w1", 1)
    assert job.started_at is not None and job.lease_expires_at > job.started_at
    assert store.get(job.id) == job


def test_concurrent_claims_never_double_claim(store: JobStore, store_url: str) -> None:
    total = 60
    for i in range(total):
        make(store, f"clip {i}", priority=i % 2)
    # Each claim is followed by a progress write, as a real worker's would be.
    child = spawn(
        "ids = []\n"
        "while (job := store.claim_next('child', 60)) is not None:\n"
        "    ids.append(job.id)\n"
        "    store.record_progress(job.id, 'child', step_index=1, num_steps=8, progress=12)\n"
        "print(json.dumps(ids))\n",
        store_url,
        setup="store = JobStore(sys.argv[1]); store.counts_by_status()",  # connected before the start
    )

    def worker(name: str) -> list[str]:
        ids = []
        while (job := store.claim_next(name, 60)) is not None:
            ids.append(job.id)
            store.record_progress(job.id, name, step_index=1, num_steps=8, progress=12)
        return ids

    go(child)
    # The threads start once the child holds a claim: on a loaded machine they could otherwise drain
    # the queue before the child process is scheduled at all, and the cross-process race never runs.
    deadline = time.monotonic() + 60
    while not any(job.lease_owner == "child" for job in store.list(limit=total)[0]) and time.monotonic() < deadline:
        time.sleep(0.005)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(worker, ["t0", "t1", "t2"]))
    child_ids = json.loads(finish(child))
    claimed = [job_id for ids in results for job_id in ids] + child_ids
    assert len(claimed) == total and len(set(claimed)) == total
    assert child_ids, "the second process never claimed anything; the race was not exercised"
    assert all(job.attempts == 1 for job in store.list(limit=total)[0])


def test_expired_lease_is_reclaimed_and_stale_writes_refused(store: JobStore, clock: Clock) -> None:
    job = make(store)
    first = store.claim_next("w1", LEASE_S)
    assert first.id == job.id
    assert store.claim_next("w2", 60) is None  # the lease still holds
    assert len(store.reap()) == 0  # and reaping leaves a live lease alone
    clock.advance(LEASE_S + 1)
    assert store.claim_next("w2", 60) is None  # a claim never looks at expired leases...
    assert store.reap().requeued == (job.id,)  # ...the reaper puts the job back in the queue
    assert store.get(job.id).status == "queued" and store.get(job.id).attempts == 1  # the lost run counted
    reclaimed = store.claim_next("w2", 60)
    assert (reclaimed.id, reclaimed.lease_owner, reclaimed.attempts) == (job.id, "w2", 2)
    assert reclaimed.started_at == first.started_at
    assert not store.renew(job.id, "w1", 60)
    assert not store.record_progress(job.id, "w1", step_index=4, num_steps=8, progress=50)
    assert not store.complete(job.id, "w1", {"video": "stale"})
    assert not store.fail(job.id, "w1", "x", "stale")
    assert not store.requeue(job.id, "w1", "stale")
    assert not store.finish_cancelled(job.id, "w1")
    assert store.get(job.id).progress == 0 and store.get(job.id).lease_owner == "w2"
    assert store.renew(job.id, "w2", 60)
    assert store.complete(job.id, "w2", {"video": "videos/a.mp4"})
    done = store.get(job.id)
    assert (done.status, done.progress, done.objects, done.lease_owner) == (
        "completed",
        100,
        {"video": "videos/a.mp4"},
        None,
    )
    assert not store.complete(job.id, "w2", {"video": "again"})  # nothing runs to completion twice


def test_lost_workers_exhaust_attempts(store: JobStore, clock: Clock) -> None:
    job = make(store)
    store.claim_next("w1", LEASE_S)
    clock.advance(LEASE_S + 1)
    assert store.reap(max_attempts=1).failed == (job.id,)
    assert store.claim_next("w2", 60, max_attempts=1) is None
    failed = store.get(job.id)
    assert (failed.status, failed.error_code) == ("failed", "worker_lost")
    assert video_object(failed)["error"]["code"] == "worker_lost"


def test_progress_never_goes_backwards(store: JobStore) -> None:
    job = make(store)
    store.claim_next("w1", 60)
    assert store.record_progress(job.id, "w1", step_index=4, num_steps=8, progress=50, checkpoint_key="ck/4")
    assert store.record_progress(job.id, "w1", step_index=2, num_steps=8, progress=25, checkpoint_key="ck/2")
    now = store.get(job.id)
    assert (now.progress, now.step_index, now.checkpoint_key) == (50, 4, "ck/4")
    assert store.record_progress(job.id, "w1", step_index=6, num_steps=8, progress=75, checkpoint_key="ck/6")
    assert store.record_progress(job.id, "w1", step_index=7, num_steps=8, progress=87)
    now = store.get(job.id)
    assert (now.progress, now.step_index, now.checkpoint_key) == (87, 7, "ck/6")
    for bad in (dict(progress=101), dict(step_index=9)):
        kwargs = dict(step_index=7, num_steps=8, progress=90) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            store.record_progress(job.id, "w1", **kwargs)


def test_recording_progress_can_extend_the_lease(store: JobStore) -> None:
    job = make(store)
    claimed = store.claim_next("w1", 5)
    assert store.record_progress(job.id, "w1", step_index=2, num_steps=8, progress=25, lease_s=600)
    extended = store.get(job.id).lease_expires_at
    assert (extended - claimed.lease_expires_at).total_seconds() > 500
    assert store.record_progress(job.id, "w1", step_index=3, num_steps=8, progress=30)  # no lease_s: unchanged
    assert store.get(job.id).lease_expires_at == extended
    assert not store.record_progress(job.id, "w2", step_index=4, num_steps=8, progress=40, lease_s=600)


def test_failure_is_reported_in_openai_shape(store: JobStore) -> None:
    job = make(store)
    store.claim_next("w1", 60)
    assert store.fail(job.id, "w1", "render_error", "the denoiser ran out of memory")
    video = video_object(store.get(job.id))
    assert video["status"] == "failed" and isinstance(video["completed_at"], int)
    assert video["error"] == {"code": "render_error", "message": "the denoiser ran out of memory"}


def test_requeue_keeps_the_checkpoint(store: JobStore) -> None:
    job = make(store)
    store.claim_next("w1", 60)
    store.record_progress(job.id, "w1", step_index=3, num_steps=8, progress=37, checkpoint_key="ck/3")
    assert store.requeue(job.id, "w1", "shutting down")
    queued = store.get(job.id)
    assert (queued.status, queued.lease_owner, queued.attempts, queued.checkpoint_key) == ("queued", None, 0, "ck/3")
    again = store.claim_next("w2", 60)
    assert (again.id, again.attempts, again.step_index, again.checkpoint_key) == (job.id, 1, 3, "ck/3")


# -- cancellation ----------------------------------------------------------------------


def test_cancel_flow(store: JobStore) -> None:
    queued = make(store, "queued")
    running = make(store, "running")
    store.claim_next("spare", 60)  # takes `queued`...
    store.requeue(queued.id, "spare", "test setup")  # ...and gives it back
    cancelled = store.request_cancel(queued.id)
    assert (cancelled.status, cancelled.cancel_requested) == ("cancelled", True)
    assert store.get(queued.id).completed_at is not None

    assert store.claim_next("w1", 60).id == running.id
    assert store.claim_next("w1", 60) is None  # the cancelled job is never claimed
    flagged = store.request_cancel(running.id)
    assert (flagged.status, flagged.cancel_requested) == ("in_progress", True)
    assert not store.renew(running.id, "w1", 60)  # the worker's signal to stop
    assert store.get(running.id).lease_owner == "w1"
    assert not store.finish_cancelled(running.id, "w2")
    assert store.finish_cancelled(running.id, "w1")
    assert store.get(running.id).status == "cancelled"
    assert store.request_cancel(running.id).status == "cancelled"  # finished jobs stay as they are


def test_cancelled_job_of_a_dead_worker_is_settled(store: JobStore, clock: Clock) -> None:
    job = make(store)
    store.claim_next("w1", LEASE_S)
    store.request_cancel(job.id)
    clock.advance(LEASE_S + 1)
    assert store.reap(max_attempts=1).cancelled == (job.id,)  # cancelled, not failed: it was asked for
    assert store.claim_next("w2", 60) is None
    assert store.get(job.id).status == "cancelled"
    assert [e.type for e in store.events_since(0)] == ["video.cancelled"]


def test_requeue_of_a_cancel_requested_job_cancels_it(store: JobStore) -> None:
    job = make(store)
    store.claim_next("w1", 60)
    store.request_cancel(job.id)
    assert store.requeue(job.id, "w1", "shutting down")
    assert store.get(job.id).status == "cancelled"


def test_deleting_a_running_job_stops_its_worker(store: JobStore) -> None:
    job = make(store)
    store.claim_next("w1", 60)
    assert store.delete(job.id).status == "in_progress"
    assert not store.record_progress(job.id, "w1", step_index=1, num_steps=8, progress=12)
    assert not store.complete(job.id, "w1", {"video": "k"})


# -- operator views --------------------------------------------------------------------


def test_queue_depths_counts_and_recent(store: JobStore) -> None:
    assert store.queue_depths() == {PRIORITY_INTERACTIVE: 0, PRIORITY_BULK: 0}
    jobs = [make(store, f"clip {i}", priority=PRIORITY_BULK if i >= 2 else PRIORITY_INTERACTIVE) for i in range(5)]
    store.claim_next("w1", 60)
    assert store.queue_depths() == {PRIORITY_INTERACTIVE: 1, PRIORITY_BULK: 3}
    assert store.counts_by_status() == {"queued": 4, "in_progress": 1, "completed": 0, "failed": 0, "cancelled": 0}
    assert [job.id for job in store.recent(2)] == [jobs[4].id, jobs[3].id]


# -- the event log (the webhooks' outbox) ------------------------------------------------


def test_terminal_transitions_are_logged_once_each(store: JobStore) -> None:
    done, failed, running_cancel, queued_cancel = (make(store, owner="acct_a", prompt=p) for p in "abcd")
    for job in (done, failed, running_cancel):
        assert store.claim_next("w", LEASE_S) is not None
    store.complete(done.id, "w", {"video": "videos/x/video.mp4"})
    store.fail(failed.id, "w", "render_error", "boom")
    store.request_cancel(queued_cancel.id)
    store.request_cancel(running_cancel.id)  # only flagged: no event until the worker stops it
    assert [e.type for e in store.events_since(0)] == ["video.completed", "video.failed", "video.cancelled"]
    store.finish_cancelled(running_cancel.id, "w")
    events = store.events_since(0)
    assert [(e.video_id, e.type) for e in events] == [
        (done.id, "video.completed"), (failed.id, "video.failed"), (queued_cancel.id, "video.cancelled"),
        (running_cancel.id, "video.cancelled")]
    assert all(e.owner == "acct_a" and e.id.startswith("evt_") for e in events)
    assert store.events_since(events[1].seq) == events[2:]
    # A refused write (not the lease holder) logs nothing.
    assert not store.complete(done.id, "w", {})
    assert len(store.events_since(0)) == 4
    cancelled = store.get(running_cancel.id)
    assert (cancelled.status, cancelled.error_code) == ("cancelled", "cancelled")


def test_a_taken_back_job_fences_its_old_worker_and_counts_the_attempt(store: JobStore) -> None:
    job = make(store)
    assert store.claim_next("dispatcher:old", LEASE_S).attempts == 1
    assert store.leases_of("dispatcher") == [(job.id, "dispatcher:old")]
    assert store.leases_of("dispatch") == []  # a role is matched whole, not as a prefix
    # The new instance takes it back (the old one died, or is being replaced) and runs it.
    assert store.requeue(job.id, "dispatcher:old", "taken back", voluntary=False)
    assert store.claim_next("dispatcher:new", LEASE_S).attempts == 2
    # The old instance, if it still runs, is fenced: none of its writes land.
    assert not store.record_progress(job.id, "dispatcher:old", step_index=2, num_steps=8, progress=20)
    assert not store.complete(job.id, "dispatcher:old", {})
    assert store.record_progress(job.id, "dispatcher:new", step_index=2, num_steps=8, progress=20)


def test_a_job_that_keeps_killing_its_workers_fails_as_worker_lost(store: JobStore) -> None:
    job = make(store)
    for attempt in range(1, 4):
        claimed = store.claim_next(f"dispatcher:{attempt}", LEASE_S, max_attempts=3)
        assert claimed is not None and claimed.attempts == attempt
        assert store.requeue(job.id, f"dispatcher:{attempt}", "died", voluntary=False)
    assert store.claim_next("dispatcher:4", LEASE_S, max_attempts=3) is None
    lost = store.get(job.id)
    assert (lost.status, lost.error_code) == ("failed", "worker_lost")
    assert [e.type for e in store.events_since(0)] == ["video.failed"]
