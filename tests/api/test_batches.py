"""Files, batches and schedules through the unmodified ``openai`` SDK against the gateway (real uvicorn,
SQLite, SeaweedFS); the test drives the batch runner and plays the dispatcher."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from farm.accounts.store import AccountStore
from farm.api.batch_lines import BatchLineRules
from farm.config import BatchSettings
from farm.jobs.batch_runner import BatchRunner
from farm.jobs.schedules import ScheduleStore
from farm.jobs.store import JobStore
from farm.storage import ObjectStore
from tests.api.conftest import LiveServer
from tests.jobs.test_batch_runner import play_dispatcher, request, twenty_lines

SETTINGS = BatchSettings(max_file_mb=0.05, max_lines=25, max_line_kb=4)  # 51 KiB: the limits are easy to reach


@pytest.fixture
def schedules(jobs: JobStore, db_url: str) -> ScheduleStore:
    return ScheduleStore(db_url)


@pytest.fixture
def base_url(make_auth_app, objects: ObjectStore, schedules: ScheduleStore) -> Iterator[str]:
    app = make_auth_app(objects=objects, batches=schedules.batches, schedules=schedules, batch_settings=SETTINGS)
    with LiveServer(app) as url:
        yield url


@pytest.fixture
def runner(schedules: ScheduleStore, jobs: JobStore, objects: ObjectStore, models) -> BatchRunner:
    return BatchRunner(schedules.batches, schedules, jobs, objects, BatchLineRules(models), max_queued_per_batch=4)


def tenant(accounts: AccountStore, base_url: str, name: str) -> openai.OpenAI:
    _, code = accounts.create_invite(note=name)
    _, _, key = accounts.redeem(code, name)
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def test_the_sdk_runs_a_batch_to_completed(base_url, accounts, runner, jobs) -> None:
    client = tenant(accounts, base_url, "alice")
    uploaded = client.files.create(file=("prompts.jsonl", jsonl(twenty_lines())), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.filename) == ("file", "batch", "prompts.jsonl")
    assert uploaded.bytes == len(jsonl(twenty_lines())) and client.files.retrieve(uploaded.id).id == uploaded.id
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h",
                                  metadata={"run": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"run": "nightly"} and batch.expires_at

    for _ in range(20):
        runner.turn()
        play_dispatcher(jobs)
        batch = client.batches.retrieve(batch.id)
        if batch.status == "completed":
            break
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 20, "completed": 18, "failed": 2}
    outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert len(outputs) == 18 and all(o["response"]["body"]["status"] == "completed" for o in outputs)
    assert {o["response"]["body"]["id"] for o in outputs} == {v.id for v in client.videos.list(limit=50)}
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["body"]["error"]["param"]) for e in errors] == [
        ("req-4", "body.size"), ("req-13", "body.style")]
    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes > 0
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert {f.id for f in client.files.list()} == {uploaded.id, batch.output_file_id, batch.error_file_id}
    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]


def test_files_and_batches_belong_to_their_account(base_url, accounts, runner) -> None:
    alice, bob = tenant(accounts, base_url, "alice"), tenant(accounts, base_url, "bob")
    uploaded = alice.files.create(file=("a.jsonl", jsonl([request("x")])), purpose="batch")
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h")
    for call in (lambda: bob.files.retrieve(uploaded.id), lambda: bob.files.content(uploaded.id),
                 lambda: bob.files.delete(uploaded.id), lambda: bob.batches.retrieve(batch.id),
                 lambda: bob.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError) as refused:
        bob.batches.create(input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h")
    assert refused.value.body["param"] == "input_file_id"
    assert list(bob.batches.list()) == [] and list(bob.files.list()) == []
    assert alice.batches.retrieve(batch.id).status == "validating"


def test_bad_uploads_and_batch_requests_are_4xx_naming_the_field(base_url, accounts) -> None:
    client = tenant(accounts, base_url, "carol")
    cases = [
        (dict(file=("a.jsonl", jsonl([request("x")])), purpose="fine-tune"), openai.BadRequestError, "purpose"),
        (dict(file=("big.jsonl", b"x" * 60_000 + b"\n"), purpose="batch"), openai.APIStatusError, "file"),
        (dict(file=("many.jsonl", jsonl([request(f"r{n}") for n in range(26)])), purpose="batch"),
         openai.BadRequestError, "file"),
        (dict(file=("empty.jsonl", b"\n\n"), purpose="batch"), openai.BadRequestError, "file"),
        (dict(file=("long.jsonl", b'{"x": "' + b"y" * 5000 + b'"}\n'), purpose="batch"), openai.BadRequestError, "file"),
    ]
    for kwargs, error, param in cases:
        with pytest.raises(error) as refused:
            client.files.create(**kwargs)
        assert refused.value.status_code in (400, 413) and refused.value.body["param"] == param, refused.value.body
    assert list(client.files.list()) == []  # nothing was kept
    uploaded = client.files.create(file=("ok.jsonl", jsonl([request("x")])), purpose="batch")
    for kwargs, param in [(dict(endpoint="/v1/chat/completions"), "endpoint"), (dict(completion_window="48h"),
                                                                               "completion_window"),
                          (dict(input_file_id="file_nope"), "input_file_id")]:
        args = {"input_file_id": uploaded.id, "endpoint": "/v1/videos", "completion_window": "24h"} | kwargs
        with pytest.raises(openai.APIStatusError) as refused:
            client.batches.create(**args)
        assert refused.value.status_code in (400, 404) and refused.value.body["param"] == param, refused.value.body
        assert "allowed" in refused.value.body["message"] or "not found" in refused.value.body["message"]
    assert list(client.batches.list()) == []


def test_cancelling_through_the_sdk(base_url, accounts, runner, jobs) -> None:
    client = tenant(accounts, base_url, "dave")
    uploaded = client.files.create(file=("c.jsonl", jsonl([request(f"c{n}") for n in range(10)])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h")
    runner.turn()
    runner.turn()
    assert len(list(client.videos.list())) == 4
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at
    assert {v.status for v in client.videos.list()} == {"cancelled"}  # queued ones end at once
    runner.turn()
    runner.turn()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "cancelled" and batch.request_counts.failed == 4 and batch.output_file_id is None
    assert len(list(client.videos.list())) == 4


def test_schedules_over_the_api(base_url, accounts) -> None:
    client = tenant(accounts, base_url, "erin")
    other = tenant(accounts, base_url, "frank")
    uploaded = client.files.create(file=("s.jsonl", jsonl([request("s")])), purpose="batch")
    http = httpx.Client(base_url=f"{base_url}/v1", headers={"Authorization": f"Bearer {client.api_key}"})
    for body, param in [({"cron": "0 3 * *"}, "cron"), ({"timezone": "Mars/Base"}, "timezone"),
                        ({"missed": "later"}, "missed"), ({"input_file_id": "file_nope"}, "input_file_id")]:
        reply = http.post("/schedules", json={"cron": "0 3 * * *", "input_file_id": uploaded.id} | body)
        assert reply.status_code in (400, 404) and reply.json()["error"]["param"] == param, reply.text
    made = http.post("/schedules", json={"cron": "0 3 * * *", "timezone": "Asia/Tokyo", "input_file_id": uploaded.id,
                                          "missed": "run_once"}).json()
    assert made["object"] == "schedule" and made["next_run_at"] and not made["paused"]
    assert [s["id"] for s in http.get("/schedules").json()["data"]] == [made["id"]]
    assert http.post(f"/schedules/{made['id']}/pause").json()["paused"]
    assert not http.post(f"/schedules/{made['id']}/resume").json()["paused"]
    stranger = httpx.Client(base_url=f"{base_url}/v1", headers={"Authorization": f"Bearer {other.api_key}"})
    assert stranger.get(f"/schedules/{made['id']}").status_code == 404
    assert stranger.delete(f"/schedules/{made['id']}").status_code == 404
    with pytest.raises(openai.ConflictError) as in_use:
        client.files.delete(uploaded.id)
    assert in_use.value.body["code"] == "file_in_use"
    assert http.delete(f"/schedules/{made['id']}").json()["deleted"]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(uploaded.id)
