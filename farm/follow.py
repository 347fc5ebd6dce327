"""Following one video to its end, as a client: the event stream, else polling.

``follow(base_url, api_key, video_id, on_update)`` reads ``GET /v1/videos/{id}/events``
(Server-Sent Events) and calls ``on_update(video)`` with each object it carries; if the stream
cannot be opened or breaks before a terminal event, it reconnects with ``Last-Event-ID`` a few
times (a stream the gateway ended after ``serve.event_stream_max_s`` is resumed as often as it
takes), then polls ``GET /v1/videos/{id}``, waiting what each reply's ``openai-poll-after-ms``
asks. Returns the final video object (a dict).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled")
_RECONNECTS = 3  # failed or short-lived streams before falling back to polling
_SHORT_STREAM_S = 0.25  # a stream the gateway held at least this long ended at its bound, not in a fault


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Events ({"event", "id", "data"}) from the lines of a ``text/event-stream`` (comments skipped)."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            event[name] = event[name] + "\n" + value if name == "data" and "data" in event else value


def follow(base_url: str, api_key: str, video_id: str, on_update: Callable[[dict[str, Any]], None], *,
           timeout_s: float = 3600.0) -> tuple[dict[str, Any], str]:
    """The video's final object and how it was followed ("events" or "polling")."""
    headers = {"Authorization": f"Bearer {api_key}"}
    deadline = time.monotonic() + timeout_s
    last_id = None
    with httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(30.0, read=60.0)) as http:
        failures = 0
        while failures < _RECONNECTS:
            opened = time.monotonic()
            try:
                extra = {"Last-Event-ID": last_id} if last_id else {}
                with http.stream("GET", f"/v1/videos/{video_id}/events", headers=extra) as reply:
                    if reply.status_code != 200 or not reply.headers.get("content-type", "").startswith(
                            "text/event-stream"):
                        log.info("event stream refused (%s); polling instead", reply.status_code)
                        break
                    for event in sse_events(reply.iter_lines()):
                        if event.get("event") == "error":
                            failures += 1
                            break
                        video = json.loads(event["data"])
                        last_id = event.get("id", last_id)
                        on_update(video)
                        if video.get("status") in TERMINAL:
                            return video, "events"
                    else:
                        # The gateway ends a long stream (serve.event_stream_max_s): resume where it left off.
                        # One that ends at once, over and over, is a fault like a broken one.
                        if time.monotonic() - opened < _SHORT_STREAM_S:
                            failures += 1
            except httpx.HTTPError as exc:
                log.info("event stream broke (%s); reconnecting", exc)
                failures += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"video {video_id} did not finish in {timeout_s:.0f} s")
        return _poll(http, video_id, on_update, deadline), "polling"


def _poll(http: httpx.Client, video_id: str, on_update: Callable[[dict[str, Any]], None], deadline: float) -> dict:
    while True:
        reply = http.get(f"/v1/videos/{video_id}")
        reply.raise_for_status()
        video = reply.json()
        on_update(video)
        if video.get("status") in TERMINAL:
            return video
        if time.monotonic() > deadline:
            raise TimeoutError(f"video {video_id} did not finish in time")
        time.sleep(int(reply.headers.get("openai-poll-after-ms", "500")) / 1000)
