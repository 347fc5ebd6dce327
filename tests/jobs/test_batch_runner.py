"""The batch runner without a farm: a real job store (SQLite and PostgreSQL) and a real SeaweedFS;
the test plays the dispatcher (claims and finishes the videos the runner queues)."""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections.abc import Iterator

import pytest

from farm.api.batch_lines import BatchLineRules
from farm.jobs.batch_runner import BatchRunner, file_key, lines_of
from farm.jobs.job import PRIORITY_BULK
from farm.jobs.schedules import ScheduleStore
from farm.jobs.store import JobStore
from farm.render.registry import ModelSpec
from farm.storage import ObjectStore
from tests.clock import Clock
from tests.storage.conftest import seaweed  # noqa: F401  (the session's real SeaweedFS server)

MODELS = [ModelSpec(id="wan-tiny", path="/models/wan-tiny", sizes=["128x128"], seconds=[1, 2], default_steps=4,
                    max_steps=50)]
WORKER = "dispatcher:test"


@pytest.fixture
def objects(seaweed) -> Iterator[ObjectStore]:  # noqa: F811
    s3 = ObjectStore(seaweed.settings(bucket=f"batch-{uuid.uuid4().hex[:12]}"))
    s3.ensure_bucket()
    yield s3
    for key in s3.list_keys():
        s3.delete(key)
    s3.client.delete_bucket(Bucket=s3.bucket)


@pytest.fixture
def schedules(store: JobStore, store_url: str, clock: Clock) -> ScheduleStore:
    return ScheduleStore(store_url, clock=clock)


@pytest.fixture
def runner(schedules: ScheduleStore, store: JobStore, objects: ObjectStore) -> BatchRunner:
    return BatchRunner(schedules.batches, schedules, store, objects, BatchLineRules(MODELS), max_queued_per_batch=4,
                       max_line_bytes=4096)


def request(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/videos",
            "body": {"model": "wan-tiny", "prompt": f"clip {custom_id}", "size": "128x128", "seconds": "1",
                     "steps": 4} | body}


def twenty_lines() -> list[dict]:
    """20 requests; lines 4 and 13 are bad (a size the model lacks, an unknown field)."""
    lines = [request(f"req-{n}") for n in range(1, 21)]
    lines[3]["body"]["size"] = "999x999"
    lines[12]["body"]["style"] = "noir"
    return lines


def upload(schedules: ScheduleStore, objects: ObjectStore, lines: list, owner: str = "acct_a") -> str:
    data = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines).encode()
    file_id = f"file_{uuid.uuid4().hex}"
    objects.put_bytes(file_key(file_id), data)
    schedules.batches.add_file(id=file_id, owner=owner, purpose="batch", filename="in.jsonl", size=len(data),
                               lines=len(lines), key=file_key(file_id))
    return file_id


def play_dispatcher(store: JobStore, fail_custom_ids: set[str] = frozenset()) -> int:
    """Claim every queued video; fail those whose custom_id is listed, complete the rest."""
    done = 0
    while (job := store.claim_next(WORKER, 60)) is not None:
        if job.params.get("custom_id") in fail_custom_ids:
            store.fail(job.id, WORKER, "render_error", "the model broke")
        else:
            store.complete(job.id, WORKER, {})
        done += 1
    return done


def read_jsonl(objects: ObjectStore, schedules: ScheduleStore, file_id: str) -> list[dict]:
    record = schedules.batches.get_file(file_id)
    return [json.loads(line) for line in objects.get_bytes(record.key).decode().splitlines()]


def test_lines_of_splits_any_chunking_with_exact_offsets() -> None:
    data = b'{"a": 1}\n\n{"b": "x"}\r\n' + b"y" * 50 + b"\nlast"
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 10)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        lines = list(lines_of(iter(chunks), max_line_bytes=20))
        assert [(l.number, l.start, l.length) for l in lines] == [(1, 0, 8), (2, 9, 0), (3, 10, 11), (4, 22, 50),
                                                                   (5, 73, 4)]
        for line in lines:
            assert data[line.start:line.start + line.length].startswith(line.data[:20])
        assert len(lines[3].data) == 21  # cut one byte past the limit: enough to refuse it


def test_a_batch_runs_to_completed_with_outputs_and_errors(
        runner: BatchRunner, schedules: ScheduleStore, store: JobStore, objects: ObjectStore) -> None:
    batches = schedules.batches
    batch = batches.create_batch(owner="acct_a", input_file_id=upload(schedules, objects, twenty_lines()))
    runner.turn()
    batch = batches.get_batch(batch.id)
    assert (batch.status, batch.total, batch.invalid) == ("in_progress", 20, 2)
    rounds, most_queued = 0, 0
    while batch.status not in ("completed", "failed"):
        runner.turn()
        most_queued = max(most_queued, batches.queued_of(batch.id))
        play_dispatcher(store, fail_custom_ids={"req-7"})
        batch = batches.get_batch(batch.id)
        rounds += 1
        assert rounds < 20, batch
    assert most_queued == 4  # the window: never more of the batch in the queue at once
    counts = batches.counts([batch])[batch.id]
    assert (counts.total, counts.completed, counts.failed) == (20, 17, 3)
    assert batch.completed_at and batch.finalizing_at and batch.in_progress_at

    out = read_jsonl(objects, schedules, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"req-{n}" for n in range(1, 21) if n not in (4, 7, 13)]  # line order
    for o in out:
        video = o["response"]["body"]
        assert o["error"] is None and o["response"]["status_code"] == 200 and video["object"] == "video"
        assert video["status"] == "completed" and video["priority"] == "bulk" and video["prompt"] == f"clip {o['custom_id']}"
        assert store.get(video["id"]).params["batch_id"] == batch.id
    errors = {e["custom_id"]: e for e in read_jsonl(objects, schedules, batch.error_file_id)}
    assert sorted(errors) == ["req-13", "req-4", "req-7"]
    size = errors["req-4"]["response"]
    assert size["status_code"] == 400 and size["body"]["error"]["param"] == "body.size"
    assert "allowed: 128x128" in size["body"]["error"]["message"]
    style = errors["req-13"]["response"]["body"]["error"]
    assert (style["param"], style["code"]) == ("body.style", "unknown_parameter")
    assert errors["req-7"]["error"] == {"code": "render_error", "message": "the model broke"}
    assert errors["req-7"]["response"]["body"]["status"] == "failed"
    assert all(j.priority == PRIORITY_BULK for j in store.list(limit=100)[0])
    assert len(store.list(limit=100)[0]) == 18  # one video per valid line, none twice


def test_cancelling_a_batch_cancels_its_videos_and_queues_no_more(
        runner: BatchRunner, schedules: ScheduleStore, store: JobStore, objects: ObjectStore) -> None:
    batches = schedules.batches
    batch = batches.create_batch(owner="acct_a", input_file_id=upload(schedules, objects,
                                                                     [request(f"c{n}") for n in range(10)]))
    runner.turn()
    runner.turn()  # validated, then four queued
    running = store.claim_next(WORKER, 60)
    cancelled, videos = batches.request_cancel(batch.id, owner="acct_a")
    assert cancelled.status == "cancelling" and sorted(videos) == sorted(j.id for j in store.list(limit=50)[0])
    runner.cancel_videos(videos)
    states = {j.id: j.status for j in store.list(limit=50)[0]}
    assert sorted(states.values()) == ["cancelled"] * 3 + ["in_progress"]  # the running one stops at its shard end
    runner.turn()
    assert batches.get_batch(batch.id).status == "cancelling"  # waits for the running video
    assert store.finish_cancelled(running.id, WORKER)
    runner.turn()
    runner.turn()
    batch = batches.get_batch(batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.output_file_id is None
    assert len(read_jsonl(objects, schedules, batch.error_file_id)) == 4
    assert len(store.list(limit=50)[0]) == 4  # nothing was queued after the cancel
    assert batches.counts([batch])[batch.id].failed == 4


def test_a_batch_past_its_window_expires(runner: BatchRunner, schedules: ScheduleStore, store: JobStore,
                                         objects: ObjectStore, clock: Clock) -> None:
    batches = schedules.batches
    batch = batches.create_batch(owner=None, input_file_id=upload(schedules, objects, [request(f"e{n}") for n in range(6)]))
    runner.turn()
    runner.turn()
    play_dispatcher(store)  # four done
    clock.advance(25 * 3600)
    for _ in range(4):
        runner.turn()
    batch = batches.get_batch(batch.id)
    assert batch.status == "expired" and batch.expired_at
    assert batches.counts([batch])[batch.id].completed == 4
    assert len(read_jsonl(objects, schedules, batch.output_file_id)) == 4


def test_a_batch_with_no_valid_line_fails_listing_the_errors(
        runner: BatchRunner, schedules: ScheduleStore, objects: ObjectStore) -> None:
    batches = schedules.batches
    lines = ["not json", request("u"), {"custom_id": "m", "method": "GET", "url": "/v1/videos"}, request("s", size="1x1")]
    lines[1]["url"] = "/v1/images"
    batch = batches.create_batch(owner=None, input_file_id=upload(schedules, objects, lines))
    runner.turn()
    batch = batches.get_batch(batch.id)
    assert batch.status == "failed" and batch.failed_at
    errors = batch.errors["data"]
    assert [(e["line"], e["param"], e["code"]) for e in errors] == [
        (1, None, "invalid_json"), (2, "url", "invalid_value"), (3, "method", "invalid_value"),
        (4, "body.size", "invalid_value")]


def test_duplicate_custom_ids_and_interactive_priority_are_refused(
        runner: BatchRunner, schedules: ScheduleStore, objects: ObjectStore) -> None:
    batches = schedules.batches
    lines = [request("same"), request("same"), request("urgent", priority="interactive"), request("ok", priority="bulk")]
    batch = batches.create_batch(owner=None, input_file_id=upload(schedules, objects, lines))
    runner.turn()
    items = {r.line: r for r in batches.results(batch.id)}
    assert items[1].error is None and items[4].error is None
    assert items[2].error["body"]["error"]["code"] == "duplicate_custom_id"
    assert items[3].error["body"]["error"]["param"] == "body.priority"


def test_a_schedule_run_is_a_batch_the_runner_takes_through(
        runner: BatchRunner, schedules: ScheduleStore, store: JobStore, objects: ObjectStore, clock: Clock) -> None:
    clock.freeze()
    file_id = upload(schedules, objects, [request("s1"), request("s2")])
    made = schedules.create(owner="acct_a", cron="0 3 * * *", timezone="Asia/Tokyo", input_file_id=file_id)
    clock.advance((made.next_run_at - clock()).total_seconds())
    runner.turn()  # fires and validates
    [batch] = schedules.batches.list_batches()[0]
    assert batch.schedule_id == made.id and batch.status == "in_progress" and batch.owner == "acct_a"
    runner.turn()
    play_dispatcher(store)
    runner.turn()
    runner.turn()
    assert schedules.batches.get_batch(batch.id).status == "completed"
    runner.turn()
    assert len(schedules.batches.list_batches()[0]) == 1  # no second run of the same time
    assert schedules.get(made.id).next_run_at == made.next_run_at + dt.timedelta(days=1)
