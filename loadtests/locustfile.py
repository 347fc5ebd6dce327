"""Load scenarios for a running farm: creators, pollers, dashboards, downloaders (see README.md).

    VIDEOFARM_API_KEY=vf_... locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

What counts as what in locust's statistics:
- 429 is the farm's correct answer to overload (queue cap, per-key rate limit). It is reported
  as a success under its own name, ``<name> [429]``, so it neither hides latency nor counts as
  a failure.
- Any 5xx, connection error or timeout is a failure, named ``5xx ...`` / ``no response ...``.
- Any other status a scenario does not expect (401, 404 on a video it just created, ...) is a
  failure too: the scenarios only send requests a correct farm answers with 2xx or 429.

Jobs are tiny (model ``wan-tiny``, 64x64, 1 s, 2 steps) so the farm's throughput, not the
render cost, is what the run measures. Environment knobs (all optional but the key):
VIDEOFARM_API_KEY, VIDEOFARM_MODEL, VIDEOFARM_SIZE, VIDEOFARM_SECONDS, VIDEOFARM_STEPS,
VIDEOFARM_TIMEOUT_S (per request, default 30), VIDEOFARM_LOCUST_REPORT (a JSON file the final
figures are written to when locust quits; tests/serve/test_load.py reads it).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import OrderedDict, deque

from locust import HttpUser, between, constant, events, task
from locust.stats import StatsError

API_KEY = os.environ.get("VIDEOFARM_API_KEY", "")
MODEL = os.environ.get("VIDEOFARM_MODEL", "wan-tiny")
SIZE = os.environ.get("VIDEOFARM_SIZE", "64x64")
SECONDS = os.environ.get("VIDEOFARM_SECONDS", "1")
STEPS = int(os.environ.get("VIDEOFARM_STEPS", "2"))
TIMEOUT_S = float(os.environ.get("VIDEOFARM_TIMEOUT_S", "30"))
REPORT = os.environ.get("VIDEOFARM_LOCUST_REPORT")
TERMINAL = {"completed", "failed", "cancelled"}
PROMPTS = ["a red fox runs through fresh snow", "夕焼けの海辺を走る犬", "rain on a neon street at night",
           "a paper boat drifts down a stream", "雪の森を走る赤いキツネ", "a lighthouse in a storm"]


class Videos:
    """Videos this locust process created, shared by its users (gevent: one thread, no locks).

    ``watching`` maps an unfinished video id to the time it may next be polled, which is
    what the farm's ``openai-poll-after-ms`` header said; ``completed`` feeds the downloaders.
    """

    watching: OrderedDict[str, float] = OrderedDict()
    completed: deque[str] = deque(maxlen=500)

    @classmethod
    def created(cls, video_id: str) -> None:
        cls.watching[video_id] = 0.0

    @classmethod
    def next_due(cls) -> tuple[str | None, float]:
        """The video whose poll is due (or None) and how long until the next one is."""
        now, soonest = time.monotonic(), float("inf")
        for video_id, due in cls.watching.items():
            if due <= now:
                return video_id, 0.0
            soonest = min(soonest, due - now)
        return None, soonest


def poll_after_s(response, default_ms: int = 1000) -> float:
    try:
        return max(int(response.headers.get("openai-poll-after-ms", default_ms)), 0) / 1000
    except ValueError:
        return default_ms / 1000


def judge(response, expected: tuple[int, ...] = (200,)) -> bool:
    """Mark a ``catch_response`` response; True when the scenario may use its body."""
    status = response.status_code
    if status in expected:
        response.success()
        return True
    if status == 429:  # overload answered correctly: counted on its own, not as a failure
        response.request_meta["name"] = f"{response.request_meta['name']} [429]"
        response.success()
    elif status == 0:  # requests raised: refused, reset, or over TIMEOUT_S
        response.failure(f"no response (connection error or timeout): {type(response.error).__name__}")
    elif status >= 500:
        response.failure(f"5xx {status}: {response.text[:200]}")
    else:
        response.failure(f"unexpected {status}: {response.text[:200]}")
    return False


def retry_after_s(response, cap: float = 2.0) -> float:
    try:
        return min(float(response.headers.get("Retry-After", 1)), cap)
    except ValueError:
        return cap


class FarmUser(HttpUser):
    abstract = True

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def create(self, priority: str) -> str | None:
        body = {"model": MODEL, "prompt": random.choice(PROMPTS), "size": SIZE, "seconds": SECONDS,
                "steps": STEPS, "seed": random.randrange(2**31), "priority": priority}
        with self.client.post("/v1/videos", json=body, name="POST /v1/videos", timeout=TIMEOUT_S,
                              catch_response=True) as response:
            if judge(response):
                video_id = response.json()["id"]
                Videos.created(video_id)
                return video_id
            if response.status_code == 429:  # a polite client waits (a little) before trying again
                time.sleep(retry_after_s(response))
        return None

    def retrieve(self, video_id: str) -> tuple[dict | None, float]:
        with self.client.get(f"/v1/videos/{video_id}", name="GET /v1/videos/{id}", timeout=TIMEOUT_S,
                             catch_response=True) as response:
            if judge(response):
                return response.json(), poll_after_s(response)
            return None, retry_after_s(response) if response.status_code == 429 else 1.0

    def download(self, video_id: str, variant: str) -> None:
        with self.client.get(f"/v1/videos/{video_id}/content", params={"variant": variant}, timeout=TIMEOUT_S,
                             name=f"GET /v1/videos/{{id}}/content?variant={variant}", catch_response=True) as response:
            if judge(response):
                body = response.content
                if variant == "video" and body[4:8] != b"ftyp":  # every MP4 starts with its ftyp box
                    response.failure(f"content of {video_id} is not an MP4 ({len(body)} bytes)")
                elif not body:
                    response.failure(f"{variant} of {video_id} is empty")


class Creator(FarmUser):
    """API-heavy batch client: submits jobs back to back (a third of them bulk), never waits for them."""

    weight = 4
    wait_time = between(0.2, 1.0)

    @task
    def submit(self) -> None:
        self.create("bulk" if random.random() < 0.35 else "interactive")


class Interactive(FarmUser):
    """What ``client.videos.create_and_poll`` does: create, poll at the farm's pace, download."""

    weight = 2
    wait_time = between(0.5, 2.0)

    @task
    def render_one(self) -> None:
        video_id = self.create("interactive")
        deadline = time.monotonic() + 120
        while video_id and time.monotonic() < deadline:
            video, wait = self.retrieve(video_id)
            if video and video["status"] in TERMINAL:
                Videos.watching.pop(video_id, None)
                if video["status"] == "completed":
                    Videos.completed.append(video_id)
                    self.download(video_id, "video")
                return
            time.sleep(wait)


class Poller(FarmUser):
    """A status page: follows every unfinished video, each no sooner than its openai-poll-after-ms."""

    weight = 2
    wait_time = constant(0)

    @task
    def poll_due(self) -> None:
        video_id, wait = Videos.next_due()
        if video_id is None:
            time.sleep(min(wait, 0.5))
            return
        Videos.watching[video_id] = time.monotonic() + 1.0  # claimed: other pollers skip it meanwhile
        video, wait = self.retrieve(video_id)
        if video is None:
            Videos.watching[video_id] = time.monotonic() + wait
        elif video["status"] in TERMINAL:
            Videos.watching.pop(video_id, None)
            if video["status"] == "completed":
                Videos.completed.append(video_id)
        else:
            Videos.watching[video_id] = time.monotonic() + wait


class Dashboard(FarmUser):
    """Lists recent videos, sometimes paging on with ``after``."""

    weight = 1
    wait_time = between(1.0, 3.0)

    @task
    def list_recent(self) -> None:
        with self.client.get("/v1/videos", params={"limit": 20}, name="GET /v1/videos", timeout=TIMEOUT_S,
                             catch_response=True) as response:
            if not judge(response):
                return
            page = response.json()
        if page.get("has_more") and random.random() < 0.5:
            with self.client.get("/v1/videos", params={"limit": 20, "after": page["last_id"]}, timeout=TIMEOUT_S,
                                 name="GET /v1/videos?after", catch_response=True) as response:
                judge(response)


class Downloader(FarmUser):
    """Fetches finished clips and their thumbnails, newest first."""

    weight = 1
    wait_time = between(0.5, 2.0)

    @task
    def fetch(self) -> None:
        if not Videos.completed:
            time.sleep(0.5)
            return
        video_id = Videos.completed[-1] if random.random() < 0.5 else random.choice(Videos.completed)
        self.download(video_id, random.choice(["video", "thumbnail"]))


@events.quitting.add_listener
def write_report(environment, **_) -> None:
    """The final figures as JSON, by request name, with every failure's message (``--csv`` lags a second)."""
    if not REPORT:
        return
    stats = environment.stats
    entries = {e.name: {"method": e.method, "requests": e.num_requests, "failures": e.num_failures,
                        "p50_ms": e.get_response_time_percentile(0.5), "p99_ms": e.get_response_time_percentile(0.99)}
               for e in stats.entries.values()}
    errors = [{"name": e.name, "method": e.method, "error": StatsError.parse_error(e.error),
               "occurrences": e.occurrences} for e in stats.errors.values()]
    seconds = max((stats.total.last_request_timestamp or 0) - stats.total.start_time, 0.0)
    with open(REPORT, "w") as f:
        json.dump({"seconds": seconds, "entries": entries, "errors": errors}, f, indent=1)
