"""Queue positions, completion estimates and the poll hint on video objects; the event stream.

The gateway runs in-process over a real job store; the dispatcher's half of the queue view is a
snapshot the test writes (the dispatcher's own snapshot is tested in tests/jobs/test_dispatcher.py).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from farm.api.queue_view import QueueView
from farm.jobs.estimates import InFlight, ModelCosts, QueueSnapshot, estimate_queued, poll_after_ms
from tests.api.conftest import LiveServer

COSTS = ModelCosts(slots=2, encode_s=0.5, step_s=1.0, decode_s=1.0, finish_s=0.5)  # a 4-step job: 6 s


class Snapshots:
    """The dispatcher's half, as the test sets it; counts how often the view asked."""

    def __init__(self) -> None:
        self.current = QueueSnapshot(time.time(), {}, {"wan-tiny": COSTS})
        self.asked = 0

    async def __call__(self) -> QueueSnapshot:
        self.asked += 1
        return self.current


@pytest.fixture
def snapshots() -> Snapshots:
    return Snapshots()


def _app(make_app, jobs, snapshots, ttl_s=0.0, **overrides):
    queue = QueueView(jobs, snapshots, ttl_s=ttl_s)
    return make_app(queue=queue, poll_after_ms=700, poll_after_min_ms=200, poll_after_max_ms=5000,
                    events_tick_s=0.05, **overrides)


def test_queued_videos_carry_their_place_in_line_and_an_estimate(make_app, jobs, snapshots):
    client = TestClient(_app(make_app, jobs, snapshots))
    created = [client.post("/v1/videos", json={"prompt": f"fox {i}", "steps": 4}) for i in range(3)]
    # Another model's queue is another line.
    other = client.post("/v1/videos", json={"model": "wan-tiny-2x", "prompt": "owl"}).json()
    assert [c.json()["queue_position"] for c in created] == [0, 1, 2]
    assert other["queue_position"] == 0 and other["estimated_completion_at"] is None  # its costs: unmeasured

    at = snapshots.current.at
    for rank, reply in enumerate(created):
        video = client.get(f"/v1/videos/{reply.json()['id']}")
        body = video.json()
        # Two slots, 6 s a job: the ranks ahead share the slots, then its own run.
        expected = at + rank * 6 / 2 + 6
        assert body["queue_position"] == rank
        assert abs(body["estimated_completion_at"] - expected) <= 1
        hint = int(video.headers["openai-poll-after-ms"])
        # A quarter of the time left (the estimate is whole seconds: a quarter of that much slack).
        assert abs(hint - poll_after_ms(expected, time.time(), fallback_ms=700, min_ms=200, max_ms=5000)) <= 300
        assert 200 <= hint <= 5000

    # Listed videos carry them too (the SDK keeps unknown fields as extras: tests/serve checks it end to end).
    listed = {v["id"]: v for v in client.get("/v1/videos").json()["data"]}
    assert listed[created[2].json()["id"]]["queue_position"] == 2


def test_a_running_video_has_no_position_and_a_measured_remaining_time(make_app, jobs, snapshots):
    client = TestClient(_app(make_app, jobs, snapshots))
    ids = [client.post("/v1/videos", json={"prompt": f"cat {i}", "steps": 4}).json()["id"] for i in range(2)]
    running = jobs.claim_next("dispatcher:test", lease_s=60)
    assert running.id == ids[0]
    # The dispatcher drives it and one more job of the model that waits to start.
    snapshots.current = QueueSnapshot(time.time(), {
        running.id: InFlight("wan-tiny", "interactive", True, None, 0.0, 40.0),
        "video_waiting": InFlight("wan-tiny", "interactive", False, 0, 0.0, 6.0),
    }, {"wan-tiny": ModelCosts(**{**vars(COSTS), "backlog_s": 46.0})})
    body = client.get(f"/v1/videos/{running.id}")
    assert body.json()["queue_position"] is None
    assert abs(body.json()["estimated_completion_at"] - (snapshots.current.at + 40)) <= 1
    assert int(body.headers["openai-poll-after-ms"]) == 5000  # 40 s left: a quarter, capped at the maximum
    # The queued one: behind the in-flight job that has not started (position 1), after the backlog.
    queued = client.get(f"/v1/videos/{ids[1]}").json()
    expected = estimate_queued(snapshots.current, "wan-tiny", "interactive", 4, rank=0)
    assert queued["queue_position"] == expected.queue_position == 1
    assert abs(queued["estimated_completion_at"] - expected.completion_at) <= 1


def test_without_a_working_snapshot_the_fields_are_null_and_the_hint_is_the_fallback(make_app, jobs):
    async def broken() -> QueueSnapshot:
        raise ConnectionError("dispatcher restarting")

    client = TestClient(make_app(queue=QueueView(jobs, broken, ttl_s=0.0), poll_after_ms=700))
    reply = client.post("/v1/videos", json={"prompt": "a heron"})
    assert reply.status_code == 200
    body = client.get(f"/v1/videos/{reply.json()['id']}")
    assert (body.json()["queue_position"], body.json()["estimated_completion_at"]) == (None, None)
    assert body.headers["openai-poll-after-ms"] == "700"


def test_the_view_is_shared_by_requests_within_its_lifetime(make_app, jobs, snapshots):
    client = TestClient(_app(make_app, jobs, snapshots, ttl_s=60.0))
    video = client.post("/v1/videos", json={"prompt": "a wren"}).json()
    for _ in range(20):
        client.get(f"/v1/videos/{video['id']}")
    assert snapshots.asked == 1  # one refresh serves every request until it is ttl_s old
    # Created after the view was taken: placed behind every queued job the view knows.
    later = client.post("/v1/videos", json={"prompt": "a robin"}).json()
    assert later["queue_position"] == 1


def _events(url: str, video_id: str, headers: dict[str, str] | None = None, timeout: float = 30) -> list[dict]:
    """Read the whole event stream (it ends on a terminal status): [{"event", "id", "data"}]."""
    events, current = [], {}
    with httpx.stream("GET", f"{url}/v1/videos/{video_id}/events", headers=headers or {}, timeout=timeout) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                current[name] = value.lstrip(" ")
    return events


def test_the_event_stream_follows_a_video_to_its_end_and_resumes_without_repeats(make_app, jobs, snapshots):
    app = _app(make_app, jobs, snapshots)
    with LiveServer(app) as url:
        video = httpx.post(f"{url}/v1/videos", json={"prompt": "a lantern", "steps": 4}).json()
        seen: list[dict] = []
        reader = threading.Thread(target=lambda: seen.extend(_events(url, video["id"])))
        reader.start()

        def wait_for(count: int) -> None:
            deadline = time.monotonic() + 20
            while len(seen) < count and reader.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)

        deadline = time.monotonic() + 20
        while not app.state.job_watch.watched and time.monotonic() < deadline:  # the stream is open
            time.sleep(0.02)
        job = jobs.claim_next("dispatcher:test", lease_s=60)
        jobs.record_progress(job.id, "dispatcher:test", step_index=2, num_steps=4, progress=47, lease_s=60)
        time.sleep(0.3)
        jobs.complete(job.id, "dispatcher:test", {"video": f"videos/{job.id}/video.mp4"})
        reader.join(timeout=30)
        assert not reader.is_alive(), "the stream did not end on the terminal status"
        wait_for(0)

    kinds = [e["event"] for e in seen]
    assert kinds[-1] == "video.completed" and set(kinds[:-1]) == {"video.updated"}
    bodies = [json.loads(e["data"]) for e in seen]
    assert bodies[0]["status"] == "queued" and bodies[0]["queue_position"] == 0
    assert [b["progress"] for b in bodies] == sorted(b["progress"] for b in bodies)  # never backwards
    assert 47 in [b["progress"] for b in bodies] and bodies[-1]["status"] == "completed"
    assert len({e["id"] for e in seen}) == len(seen)  # every event a new state

    # Resuming at the last event: only the final object again, then the end.
    with LiveServer(app) as url:
        again = _events(url, video["id"], {"Last-Event-ID": seen[-1]["id"]})
    assert [e["event"] for e in again] == ["video.completed"] and again[0]["id"] == seen[-1]["id"]


def test_a_resumed_stream_skips_the_state_it_already_saw(make_app, jobs, snapshots):
    app = _app(make_app, jobs, snapshots)
    with LiveServer(app) as url:
        video = httpx.post(f"{url}/v1/videos", json={"prompt": "a kite"}).json()
        first = {}
        with httpx.stream("GET", f"{url}/v1/videos/{video['id']}/events", timeout=10) as reply:
            for line in reply.iter_lines():
                if line.startswith("id:"):
                    first["id"] = line.partition(":")[2].strip()
                    break
        seen: list[dict] = []
        reader = threading.Thread(target=lambda: seen.extend(_events(url, video["id"], {"Last-Event-ID": first["id"]})))
        reader.start()
        time.sleep(0.5)  # several ticks of an unchanged queued job: nothing to send
        assert seen == []
        assert httpx.post(f"{url}/v1/videos/{video['id']}/cancel").json()["status"] == "cancelled"
        reader.join(timeout=20)
    assert [e["event"] for e in seen] == ["video.cancelled"]
    assert json.loads(seen[0]["data"])["error"]["code"] == "cancelled"


def test_many_streams_share_one_watcher_read_per_tick(make_app, jobs, snapshots, monkeypatch):
    app = _app(make_app, jobs, snapshots)
    reads = []
    real = jobs.get_many
    monkeypatch.setattr(jobs, "get_many", lambda ids: reads.append(len(ids)) or real(ids))
    with LiveServer(app) as url:
        ids = [httpx.post(f"{url}/v1/videos", json={"prompt": f"bee {i}"}).json()["id"] for i in range(3)]
        streams = [threading.Thread(target=_events, args=(url, vid), daemon=True) for vid in ids for _ in range(4)]
        for s in streams:
            s.start()
        deadline = time.monotonic() + 20
        while app.state.job_watch.watched < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        for vid in ids:
            httpx.post(f"{url}/v1/videos/{vid}/cancel")
        for s in streams:
            s.join(timeout=20)
        assert not any(s.is_alive() for s in streams)
    assert reads and max(reads) <= 3  # 12 streams, one read of at most 3 ids per tick


def test_a_long_stream_ends_at_its_bound_and_follow_resumes_it_to_the_end(make_app, jobs, snapshots):
    from farm.follow import follow

    app = _app(make_app, jobs, snapshots, event_stream_max_s=0.3)
    with LiveServer(app) as url:
        video = httpx.post(f"{url}/v1/videos", json={"prompt": "a heron", "steps": 4}).json()
        started = time.monotonic()
        first = _events(url, video["id"])  # the job stays queued: the gateway ends the stream at its bound
        assert time.monotonic() - started < 10
        assert [e["event"] for e in first] == ["video.updated"] and app.state.job_watch.watched == 0
        again = _events(url, video["id"], {"Last-Event-ID": first[-1]["id"]})
        assert again == []  # resumed: the same state is not sent twice

        # `farm submit --wait`'s follower resumes across many bounded streams (more than its failure
        # budget of reconnects) and ends on the final event, not by polling.
        updates: list[dict] = []

        def finish_later() -> None:
            time.sleep(1.5)  # five of the 0.3 s streams
            job = jobs.claim_next("dispatcher:test", lease_s=60)
            jobs.complete(job.id, "dispatcher:test", {"video": f"videos/{job.id}/video.mp4"})

        finisher = threading.Thread(target=finish_later)
        finisher.start()
        final, how = follow(url, "unused", video["id"], updates.append, timeout_s=30)
        finisher.join()
    assert (final["status"], how) == ("completed", "events")
    assert updates[-1]["status"] == "completed"
