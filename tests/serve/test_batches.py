"""A batch on the real farm through the unmodified ``openai`` SDK: 20 lines, two bad, run to
``completed`` (18 outputs, 2 errors) while an interactive video submitted meanwhile overtakes it."""

from __future__ import annotations

import json
import time

import pytest

from tests.serve.farmkit import farm_cli, wait_for

pytestmark = pytest.mark.slow

POOL = "wan-tiny:transformer"


def _line(n: int) -> dict:
    # Cheap clips: 128x128, 1 s, 4 steps (one shard), each step stretched by the shared farm's chaos-slow
    # fault, so a replica stays busy for about a second: long enough that batch videos are still waiting for
    # one when the interactive video arrives (with unstretched clips this fast, they were all started).
    body = {"model": "wan-tiny", "prompt": f"a paper boat drifting, take {n} (chaos-slow)", "size": "128x128",
            "seconds": "1", "steps": 4, "seed": n}
    if n == 4:
        body["size"] = "999x999"  # not a size of the model
    if n == 13:
        body["style"] = "noir"  # not a field of POST /v1/videos
    return {"custom_id": f"req-{n}", "method": "POST", "url": "/v1/videos", "body": body}


def test_a_twenty_line_batch_completes_while_an_interactive_video_overtakes_it(shared_farm) -> None:
    farm = shared_farm
    farm.wait_idle()
    client = farm.client()
    store = farm.store()
    data = "".join(json.dumps(_line(n)) + "\n" for n in range(1, 21)).encode()
    started = time.monotonic()
    uploaded = client.files.create(file=("boats.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h")

    # Once the batch's videos occupy the farm, an interactive video arrives.
    wait_for(lambda: sum(v.status == "in_progress" for v in client.videos.list(limit=50)) >= 2, 120, interval=0.1,
             what="batch videos rendering")
    urgent = client.videos.create(model="wan-tiny", prompt="an urgent interactive fox", seconds="1", size="128x128",
                                  extra_body={"steps": 4, "seed": 99})
    urgent = wait_for(lambda: (lambda v: v if v.status in ("completed", "failed") else None)(
        client.videos.retrieve(urgent.id)), 120, interval=0.2, what="the interactive video")
    assert urgent.status == "completed", urgent.error
    batch = wait_for(lambda: (lambda b: b if b.status in ("completed", "failed", "cancelled", "expired") else None)(
        client.batches.retrieve(batch.id)), 300, interval=0.5, what="the batch to end")
    took = time.monotonic() - started

    assert batch.status == "completed", batch
    outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert batch.request_counts.model_dump() == {"total": 20, "completed": 18, "failed": 2}, errors
    assert [o["custom_id"] for o in outputs] == [f"req-{n}" for n in range(1, 21) if n not in (4, 13)]
    assert all(o["response"]["body"]["status"] == "completed" and o["response"]["body"]["priority"] == "bulk"
               for o in outputs)
    assert [(e["custom_id"], e["response"]["status_code"], e["response"]["body"]["error"]["param"]) for e in errors] \
        == [("req-4", 400, "body.size"), ("req-13", 400, "body.style")]

    # Overtaking: batch videos queued before the interactive one finished after it, and its shard began
    # before theirs did.
    videos = [store.get(o["response"]["body"]["id"]) for o in outputs]
    mine = store.get(urgent.id)
    earlier = [v for v in videos if v.created_at < mine.created_at]
    overtaken = [v for v in earlier if v.completed_at > mine.completed_at]
    calls = farm.status()["dispatcher"]["calls"]
    shard_start = {c["job_id"]: c["started"] for c in calls if c["stage"].startswith("shard") and c["pool"] == POOL}
    passed = [v for v in earlier if shard_start.get(v.id, 0) > shard_start[mine.id]]
    latency = (mine.completed_at - mine.created_at).total_seconds()
    print(f"batch of 20 (18 clips) in {took:.1f}s; interactive video {latency:.1f}s from create to completed; "
          f"{len(earlier)} batch videos were queued before it, {len(overtaken)} finished after it, "
          f"{len(passed)} began denoising after it")
    assert overtaken and passed, (len(earlier), [(v.id, v.completed_at) for v in earlier], mine.completed_at)
    assert latency < took / 2


def test_farm_schedule_commands_on_the_running_farm(shared_farm, tmp_path) -> None:
    farm = shared_farm
    key = farm.new_api_key("scheduler")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(_line(1)) + "\n")

    def cli(*args: str, check: bool = True):
        return farm_cli("schedule", *args, "--api-key", key, env=farm.env, timeout=120, check=check)

    added = cli("add", "--cron", "0 3 * * *", "--tz", "Asia/Tokyo", "--file", str(prompts), "--missed", "run_once")
    schedule_id = added.stdout.split()[1]
    assert schedule_id.startswith("sched_") and "T03:00:00+09:00" in added.stdout, added.stdout
    listed = cli("list").stdout
    assert schedule_id in listed and "armed" in listed and "Asia/Tokyo" in listed
    assert "paused" in cli("pause", schedule_id).stdout and "paused" in cli("list").stdout
    assert "armed, next run" in cli("resume", schedule_id).stdout
    files = [f.id for f in farm.client(api_key=key).files.list()]
    refused = cli("add", "--cron", "0 3 * *", "--file", str(prompts), check=False)
    assert refused.returncode == 2 and "cron: '0 3 * *' must have five fields" in refused.stderr, refused.stderr
    refused = cli("add", "--cron", "0 3 * * *", "--tz", "Tokyo", "--file", str(prompts), check=False)
    assert refused.returncode == 2 and "timezone: 'Tokyo' is not an IANA time zone" in refused.stderr
    assert [f.id for f in farm.client(api_key=key).files.list()] == files  # nothing uploaded for a typo
    assert cli("delete", schedule_id).stdout.strip() == f"deleted: {schedule_id}"
    assert schedule_id not in cli("list").stdout
    gone = cli("pause", schedule_id, check=False)
    assert gone.returncode == 2 and "not found" in gone.stderr
