"""Queue positions on a loaded farm, and `farm submit --wait` following the event stream.

On the shared farm (two replicas in the wan-tiny pool): a line of slowed jobs, the last one
polled as a client would. Its `queue_position` only counts down, to null once it renders; its
`estimated_completion_at` appears once the farm has measured every stage.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from tests.serve.farmkit import farm_cli, wait_for

pytestmark = pytest.mark.slow

CHEAP = {"model": "wan-tiny", "size": "64x64", "seconds": "1"}
EVENTS_ROUTE = 'route="/v1/videos/{video_id}/events"'


def test_queue_position_counts_down_on_a_loaded_farm(shared_farm):
    farm = shared_farm
    farm.wait_idle()
    client = farm.client()
    # chaos-slow stretches each forward pass (same frames): the line moves in seconds, not a race.
    ids = [client.videos.create(prompt=f"chaos-slow: lanterns on a river {i}", **CHEAP,
                                extra_body={"seed": i, "steps": 8}).id for i in range(6)]
    last, created = ids[-1], time.monotonic()
    seen: list[tuple[str, int | None, int | None]] = []

    def done() -> bool:
        video = client.videos.retrieve(last)
        extra = video.model_extra or {}
        # Jobs created within a gateway view's refresh interval (0.1 s) are not yet counted ahead:
        # readings start once the whole line is in the view.
        if time.monotonic() - created > 1.0:
            seen.append((video.status, extra.get("queue_position"), extra.get("estimated_completion_at")))
        return video.status in ("completed", "failed", "cancelled")

    wait_for(done, 240, interval=0.2, what="the last job of the line to finish")
    assert seen[-1][0] == "completed", seen[-1]
    positions = [p for _, p, _ in seen]
    waiting = [p for p in positions if p is not None]
    assert waiting and waiting[0] >= 2, seen[:5]  # it started behind others (two replicas, six jobs)
    assert waiting == sorted(waiting, reverse=True), positions  # never moves back
    assert len(set(waiting)) >= 2  # it moved up the line
    assert positions[-1] is None  # rendering, then done: no longer in line
    # Once the farm measured every stage, the waiting job carries a completion estimate in the future.
    estimates = [(p, eta) for _, p, eta in seen if p is not None and eta is not None]
    assert estimates, seen
    assert all(eta >= time.time() - 120 for _, eta in estimates)


def _events_streams(farm) -> float:
    with urllib.request.urlopen(farm.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ray_videofarm_http_request_seconds_count") and EVENTS_ROUTE in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_farm_submit_wait_follows_the_event_stream(shared_farm, tmp_path):
    farm = shared_farm
    key = farm.new_api_key("cli-follower")
    before = _events_streams(farm)
    out = tmp_path / "followed.mp4"
    done = farm_cli("-v", "submit", "a paper crane in the wind", "--model", "wan-tiny", "--size", "64x64", "--seconds", "1",
                    "--steps", "4", "--wait", "--out", str(out), "--api-key", key,
                    env=farm.env, timeout=300)
    assert re.search(r"video_id: video_\w+", done.stdout), done.stdout
    assert out.stat().st_size > 0
    assert "by events" in done.stderr, done.stderr[-2000:]  # the CLI's own account of how it followed
    # The gateway saw the stream (metrics are exported every few seconds).
    wait_for(lambda: _events_streams(farm) >= before + 1, 60, interval=1, what="the events route in the metrics")
