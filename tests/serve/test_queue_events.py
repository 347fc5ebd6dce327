"""Queue positions on a loaded farm, `farm submit --wait` following the event stream, and one
rate limit across the shared farm's two gateway replicas.

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
    at: list[float] = []

    def done() -> bool:
        video = client.videos.retrieve(last)
        extra = video.model_extra or {}
        # Jobs created within a gateway view's refresh interval (0.1 s) are not yet counted ahead:
        # readings start once the whole line is in the view.
        if time.monotonic() - created > 1.0:
            seen.append((video.status, extra.get("queue_position"), extra.get("estimated_completion_at")))
            at.append(time.monotonic())
        return video.status in ("completed", "failed", "cancelled")

    wait_for(done, 240, interval=0.2, what="the last job of the line to finish")
    assert seen[-1][0] == "completed", seen[-1]
    positions = [p for _, p, _ in seen]
    waiting = [p for p in positions if p is not None]
    assert waiting and waiting[0] >= 2, seen[:5]  # it started behind others (two replicas, six jobs)
    # Never moves back — against any reading older than a gateway replica's view can be (1 s:
    # the two replicas' views are refreshed apart, so readings a moment apart may come from either).
    timed = [(t, p) for t, (_, p, _) in zip(at, seen) if p is not None]
    assert all(p2 <= p1 for i, (t1, p1) in enumerate(timed) for t2, p2 in timed[i:] if t2 - t1 > 1.2), timed
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


def _gateway_requests(farm) -> dict[str, float]:
    """Requests each gateway replica handled, from Ray Serve's own per-replica counter."""
    with urllib.request.urlopen(farm.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_serve_deployment_request_counter") and 'deployment="Gateway"' in line:
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            counts[replica] = counts.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_one_keys_rate_limit_is_shared_by_both_gateway_replicas(shared_farm):
    """Two gateway replicas answer; the key's window is one, in Redis: every request, whichever
    replica answered it, takes exactly one from the same remaining count."""
    import httpx

    farm = shared_farm
    key = farm.new_api_key("two-gateways")
    before = _gateway_requests(farm)
    remaining = []
    with httpx.Client(base_url=farm.url, headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(40):
            reply = http.get("/v1/videos", params={"limit": 1})
            assert reply.status_code == 200, reply.text
            remaining.append(int(reply.headers["x-ratelimit-remaining-requests"]))
    limit = int(reply.headers["x-ratelimit-limit-requests"])
    assert remaining == list(range(limit - 1, limit - 41, -1))  # one window, counted once per request
    # Both replicas took part (Serve's counter is exported every few seconds).
    wait_for(lambda: sum(1 for r, n in _gateway_requests(farm).items() if n > before.get(r, 0.0)) == 2, 60,
             interval=1, what="requests on both gateway replicas")
