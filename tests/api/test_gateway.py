"""The gateway against a real job store (SQLite) and a real S3 (SeaweedFS); the OpenAI SDK too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import openai
import pytest

from farm.jobs.store import PRIORITY_BULK
from farm.storage import ClipLayout
from tests.api.conftest import FINISHER, LiveServer, finish_job

VIDEO = os.urandom(2 * 1024 * 1024 + 123)  # over two 1 MiB stream chunks
THUMB = b"RIFF\x10\x00\x00\x00WEBPVP8 " + os.urandom(64)
SPRITES = b"\xff\xd8\xff\xe0" + os.urandom(256)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def create(client, **fields) -> dict:
    response = client.post("/v1/videos", json={"prompt": "a red fox in snow"} | fields)
    assert response.status_code == 200, response.text
    return response.json()


# -- create ---------------------------------------------------------------------------------


def test_create_json_queues_a_job_in_the_store(client, jobs):
    response = client.post("/v1/videos", json={"prompt": "a red fox", "model": "wan-tiny-2x", "seconds": 2,
                                               "seed": 7, "steps": 9, "priority": "bulk", "scheduler": "flow-euler"})
    assert response.status_code == 200, response.text
    assert response.headers["openai-poll-after-ms"] == "250"
    video = response.json()
    assert video["object"] == "video" and video["status"] == "queued" and video["progress"] == 0
    assert (video["model"], video["seconds"], video["size"], video["seed"]) == ("wan-tiny-2x", "2", "128x128", 7)
    job = jobs.get(video["id"])
    assert {k: v for k, v in job.params.items() if k != "request_fingerprint"} == {"seed": 7, "steps": 9, "scheduler": "flow-euler"}
    assert job.priority == PRIORITY_BULK and job.prompt == "a red fox"


def test_a_cache_setting_rides_with_the_job(client, jobs):
    response = client.post("/v1/videos", json={"prompt": "a red fox", "seconds": 1, "seed": 1,
                                               "cache": {"kind": "first_block", "threshold": 0.2}})
    assert response.status_code == 200, response.text
    assert jobs.get(response.json()["id"]).params["cache"] == {"kind": "first_block", "threshold": 0.2}
    response = client.post("/v1/videos", json={"prompt": "a red fox", "seconds": 1, "seed": 1, "cache": "off"})
    assert jobs.get(response.json()["id"]).params["cache"] == {"kind": "off", "threshold": 0.05}


def test_create_multipart_as_the_sdk_sends_it_with_defaults(client, jobs):
    response = client.post("/v1/videos", data={"prompt": "夜の東京、雨", "seconds": "1", "size": "96x160"})
    assert response.status_code == 200, response.text
    job = jobs.get(response.json()["id"])
    assert (job.model, job.seconds, job.size, job.prompt) == ("wan-tiny", 1, "96x160", "夜の東京、雨")
    assert job.params["steps"] == 4 and 0 <= job.params["seed"] < 2**63  # model default, random seed recorded


@pytest.mark.parametrize("fields, param, fragment", [
    ({"model": "sora-2"}, "model", "available: wan-tiny, wan-tiny-2x"),
    ({"size": "720x1280"}, "size", "allowed: 128x128, 96x160"),
    ({"size": "big"}, "size", "size"),
    ({"seconds": "4"}, "seconds", "allowed: 1, 2"),
    ({"seconds": "four"}, "seconds", "whole number"),
    ({"seconds": True}, "seconds", "whole number"),
    ({"model": "wan-tiny-2x", "seconds": 1}, "seconds", "allowed: 2"),
    ({"steps": 51}, "steps", "allowed: 1..50"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": ""}, "prompt", "prompt"),
    ({"prompt": "   "}, "prompt", "must not be empty"),
    ({"prompt": "a\x00b"}, "prompt", "NUL"),
    ({"prompt": "a\ud800"}, "prompt", "unicode string"),
    ({"prompt": "x" * 4001}, "prompt", "at most 4000"),
    ({"priority": "urgent"}, "priority", "'interactive' or 'bulk'"),
    ({"scheduler": "ddim"}, "scheduler", "'unipc' or 'flow-euler'"),
    ({"fps": 30}, "fps", "allowed: prompt, model, seconds"),
    # A text-only model refuses an image URL before fetching it.
    ({"input_reference": {"image_url": "https://example.invalid/a.png"}}, "input_reference",
     "renders from text only"),
    ({"input_reference": {}}, "input_reference", "exactly one of file_id or image_url"),
    ({"cache": "on"}, "cache", 'allowed: "off", "first_block", or an object'),
    ({"cache": {"kind": "tea"}}, "cache", "kind 'tea' is not known"),
    ({"cache": {"kind": "first_block", "threshold": 2}}, "cache", "out of range"),
    ({"cache": {"kind": "first_block", "every": 2}}, "cache", "unknown field(s) 'every'"),
])
def test_bad_create_is_a_400_naming_the_field_and_creates_nothing(client, jobs, fields, param, fragment):
    # json.dumps escapes lone surrogates, which a client's own JSON encoder would refuse to send.
    body = json.dumps({"prompt": "ok"} | fields)
    err = error_of(client.post("/v1/videos", content=body, headers={"content-type": "application/json"}), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert fragment in err["message"], err["message"]
    assert jobs.list(limit=10) == ([], False)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"json": {"seconds": "1"}}, "prompt: is required"),
    ({"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, "must be a JSON object"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "not valid JSON"),
    ({"data": {"prompt": "a", "seed": "x1"}}, "seed: must be a whole number"),
    ({"content": b'{"prompt": "a", "\\ud800": 1}', "headers": {"content-type": "application/json"}}, "\\ud800"),
])
def test_malformed_bodies_are_400s(client, kwargs, fragment):
    assert fragment in error_of(client.post("/v1/videos", **kwargs), 400)["message"]


def test_input_reference_file_is_refused_clearly(client, jobs):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    png = ("a.png", buf.getvalue(), "image/png")
    response = client.post("/v1/videos", data={"prompt": "a"}, files={"input_reference": png})
    err = error_of(response, 400)
    assert err["param"] == "input_reference" and "not supported by model 'wan-tiny'" in err["message"]
    assert jobs.list(limit=10)[0] == []


def test_body_limit_and_content_type(make_app, jobs):
    from fastapi.testclient import TestClient

    client = TestClient(make_app(max_body_bytes=1000))
    err = error_of(client.post("/v1/videos", json={"prompt": "x" * 2000}), 413)
    assert "exceeds the limit of 1000 bytes" in err["message"]
    # Without Content-Length (chunked), the limit is enforced while the body streams in.
    chunked = client.post("/v1/videos", content=iter([b'{"prompt": "', b"y" * 1500, b'"}']),
                          headers={"content-type": "application/json"})
    assert error_of(chunked, 413)["code"] == "payload_too_large"
    assert error_of(client.post("/v1/videos", content=b"prompt=a", headers={"content-type": "text/plain"}), 415)
    assert jobs.list(limit=10)[0] == []


def test_full_queue_is_a_429_with_retry_after_and_creates_nothing(make_app, jobs):
    from fastapi.testclient import TestClient

    client = TestClient(make_app(max_queued=2))
    create(client)
    create(client)
    response = client.post("/v1/videos", json={"prompt": "one too many"})
    err = error_of(response, 429)
    assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
    assert int(response.headers["retry-after"]) >= 1
    assert len(jobs.list(limit=10)[0]) == 2


def test_idempotency_key_replays_and_refuses_reuse(client, jobs):
    first = client.post("/v1/videos", json={"prompt": "a", "seed": 1}, headers={"Idempotency-Key": "k1"}).json()
    again = client.post("/v1/videos", json={"prompt": "a", "seed": 1}, headers={"Idempotency-Key": "k1"}).json()
    assert again["id"] == first["id"] and len(jobs.list(limit=10)[0]) == 1
    err = error_of(client.post("/v1/videos", json={"prompt": "b", "seed": 1}, headers={"Idempotency-Key": "k1"}), 409)
    assert err["code"] == "idempotency_key_reused" and "prompt" in err["message"]


def test_on_created_wakes_the_dispatcher_sync_or_async_and_its_failure_is_not_the_clients(make_app):
    from fastapi.testclient import TestClient

    woken: list[str] = []

    async def wake(video_id: str) -> None:
        woken.append(video_id)

    video = create(TestClient(make_app(on_created=wake)))
    assert woken == [video["id"]]
    create(TestClient(make_app(on_created=woken.append)))
    assert len(woken) == 2

    def broken(video_id: str) -> None:
        raise RuntimeError("dispatcher away")

    assert create(TestClient(make_app(on_created=broken)))["status"] == "queued"


def test_metrics_hooks_see_route_templates_statuses_and_creations(make_app):
    from fastapi.testclient import TestClient

    class Recorder:
        def __init__(self) -> None:
            self.requests: list[tuple] = []
            self.created: list[tuple] = []

        def request_finished(self, method, route, status, seconds):
            self.requests.append((method, route, status))

        def video_created(self, model, priority):
            self.created.append((model, priority))

    metrics = Recorder()
    client = TestClient(make_app(metrics=metrics))
    video = create(client, priority="bulk")
    client.get(f"/v1/videos/{video['id']}")
    client.get("/v1/videos/video_nope")
    assert metrics.created == [("wan-tiny", "bulk")]
    assert metrics.requests == [("POST", "/v1/videos", 200), ("GET", "/v1/videos/{video_id}", 200),
                                ("GET", "/v1/videos/{video_id}", 404)]


# -- read, list, cancel ---------------------------------------------------------------------


def test_retrieve_and_unknown_ids(client):
    video = create(client)
    response = client.get(f"/v1/videos/{video['id']}")
    assert response.json() == video and response.headers["openai-poll-after-ms"] == "250"
    for method, path in [("GET", "/v1/videos/video_nope"), ("DELETE", "/v1/videos/video_nope"),
                         ("POST", "/v1/videos/video_nope/cancel"), ("GET", "/v1/videos/video_nope/content")]:
        err = error_of(client.request(method, path), 404)
        assert err["code"] == "not_found" and "video_nope" in err["message"]


def test_list_pages_through_every_video_in_both_orders(client):
    ids = [create(client, prompt=f"clip {i}")["id"] for i in range(5)]
    for order, expected in (("asc", ids), ("desc", ids[::-1])):
        seen, after = [], None
        while True:
            page = client.get("/v1/videos", params={"limit": 2, "order": order} | ({"after": after} if after else {}))
            body = page.json()
            assert body["object"] == "list" and len(body["data"]) <= 2
            assert body["first_id"] == body["data"][0]["id"] and body["last_id"] == body["data"][-1]["id"]
            seen += [v["id"] for v in body["data"]]
            after = body["last_id"]
            if not body["has_more"]:
                break
        assert seen == expected
    default = client.get("/v1/videos").json()
    assert [v["id"] for v in default["data"]] == ids[::-1] and default["has_more"] is False


@pytest.mark.parametrize("params, param", [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "ten"}, "limit"),
    ({"order": "newest"}, "order"),
])
def test_bad_list_queries(client, params, param):
    assert error_of(client.get("/v1/videos", params=params), 400)["param"] == param
    assert error_of(client.get("/v1/videos", params={"after": "video_unknown"}), 404)["param"] == "after"


def test_cancel_queued_and_running_jobs(client, jobs):
    queued = create(client)
    cancelled = client.post(f"/v1/videos/{queued['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"] is True
    running = create(client)
    assert jobs.claim_next(FINISHER, lease_s=60).id == running["id"]
    flagged = client.post(f"/v1/videos/{running['id']}/cancel").json()
    assert flagged["status"] == "in_progress" and flagged["cancel_requested"] is True
    assert jobs.get(running["id"]).cancel_requested


# -- content and delete on a real S3 ----------------------------------------------------------


def test_content_streams_each_variant_once_completed(s3_client, jobs, objects, tmp_path):
    video = create(s3_client)
    err = error_of(s3_client.get(f"/v1/videos/{video['id']}/content"), 404)
    assert err["code"] == "video_not_ready" and "queued" in err["message"]
    finish_job(jobs, objects, video["id"], {"video": VIDEO, "thumbnail": THUMB}, tmp_path)
    done = s3_client.get(f"/v1/videos/{video['id']}").json()
    assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"] >= done["created_at"]

    response = s3_client.get(f"/v1/videos/{video['id']}/content")
    assert response.status_code == 200 and response.content == VIDEO
    assert response.headers["content-type"] == "video/mp4" and int(response.headers["content-length"]) == len(VIDEO)
    thumb = s3_client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
    assert thumb.content == THUMB and thumb.headers["content-type"] == "image/webp"
    missing = error_of(s3_client.get(f"/v1/videos/{video['id']}/content", params={"variant": "spritesheet"}), 404)
    assert missing["param"] == "variant"
    bad = error_of(s3_client.get(f"/v1/videos/{video['id']}/content", params={"variant": "gif"}), 400)
    assert bad["param"] == "variant" and "'video', 'thumbnail' or 'spritesheet'" in bad["message"]

    part = s3_client.get(f"/v1/videos/{video['id']}/content", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == VIDEO[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(VIDEO)}"
    beyond = s3_client.get(f"/v1/videos/{video['id']}/content", headers={"Range": f"bytes={len(VIDEO)}-"})
    assert error_of(beyond, 416) and beyond.headers["content-range"] == f"bytes */{len(VIDEO)}"


def test_delete_removes_the_row_and_every_object(s3_client, jobs, objects, tmp_path):
    video = create(s3_client)
    keep = create(s3_client)
    finish_job(jobs, objects, video["id"], {"video": VIDEO, "thumbnail": THUMB, "spritesheet": SPRITES}, tmp_path)
    objects.put_bytes(ClipLayout(keep["id"]).key("video"), b"other clip")
    assert len(objects.list_keys(f"videos/{video['id']}/")) == 4  # three variants and record.json

    response = s3_client.delete(f"/v1/videos/{video['id']}")
    assert response.json() == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert objects.list_keys(f"videos/{video['id']}/") == [] and jobs.get(video["id"]) is None
    assert error_of(s3_client.get(f"/v1/videos/{video['id']}"), 404)
    assert objects.get_bytes(ClipLayout(keep["id"]).key("video")) == b"other clip"  # a neighbour is untouched


def test_a_rendering_video_cannot_be_deleted(s3_client, jobs):
    video = create(s3_client)
    jobs.claim_next(FINISHER, lease_s=60)
    err = error_of(s3_client.delete(f"/v1/videos/{video['id']}"), 409)
    assert err["code"] == "video_in_progress" and "/cancel" in err["message"]
    assert jobs.get(video["id"]) is not None


# -- the edges ------------------------------------------------------------------------------


def test_unexpected_errors_are_500s_that_leak_nothing(make_app, jobs, monkeypatch):
    from fastapi.testclient import TestClient

    def broken(*args, **kwargs):
        raise RuntimeError("password=hunter2 at /srv/secret.db")

    monkeypatch.setattr(jobs, "get", broken)
    client = TestClient(make_app(), raise_server_exceptions=False)
    response = client.get("/v1/videos/video_x")
    err = error_of(response, 500)
    assert err["type"] == "server_error" and "hunter2" not in response.text and "secret" not in response.text


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert error_of(client.get("/v2/videos"), 404)["code"] == "not_found"
    response = client.put("/v1/videos")
    assert error_of(response, 405)["code"] == "method_not_allowed" and response.headers["allow"] == "GET, POST"


def test_healthz_and_openapi_describe_the_api(client):
    assert client.get("/healthz").json() == {"status": "ok", "models": ["wan-tiny", "wan-tiny-2x"]}
    spec = client.get("/openapi.json").json()
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content",
            "/v1/videos/{video_id}/cancel", "/healthz"} <= set(spec["paths"])
    create_op = spec["paths"]["/v1/videos"]["post"]
    assert set(create_op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"200", "400", "413", "429"} <= set(create_op["responses"])
    schemas = spec["components"]["schemas"]
    model = schemas["CreateVideoRequest"]["properties"]["model"]["anyOf"]
    assert model == [{"type": "string", "enum": ["wan-tiny", "wan-tiny-2x"]}, {"type": "null"}]
    form = schemas["CreateVideoForm"]["properties"]
    assert form["seed"]["type"] == "integer" and "null" not in json.dumps(form)  # no nulls in a form
    content = spec["paths"]["/v1/videos/{video_id}/content"]["get"]
    assert set(content["responses"]["200"]["content"]) >= {"video/mp4", "image/webp", "image/jpeg"}
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text  # validation errors are 400s in the OpenAI shape
    refs = {ref.split("/")[-1] for ref in _refs(spec)}
    assert refs <= set(schemas), refs - set(schemas)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_gateway_imports_neither_torch_nor_diffusers():
    code = "import sys, farm.api.app; print([m for m in ('torch', 'diffusers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- the real openai SDK over a real server ---------------------------------------------------


def test_openai_sdk_round_trip(make_app, jobs, objects, tmp_path):
    warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the videos API deprecated
    finished = threading.Event()

    def finisher(video_id: str) -> None:
        # Stands in for the dispatcher: the first job completes shortly after it is created.
        if not finished.is_set():
            finished.set()
            threading.Timer(0.3, finish_job, (jobs, objects, video_id, {"video": VIDEO, "spritesheet": SPRITES},
                                              tmp_path)).start()

    with LiveServer(make_app(objects=objects, on_created=finisher, max_queued=5, poll_after_ms=50)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        prompt = "桜の花びらが舞う京都の路地を歩く猫"
        video = client.videos.create_and_poll(prompt=prompt, model="wan-tiny", seconds="2", size="128x128")
        assert video.status == "completed" and video.prompt == prompt and video.seconds == "2"
        assert client.videos.download_content(video.id).read() == VIDEO
        assert client.videos.download_content(video.id, variant="spritesheet").read() == SPRITES

        others = [client.videos.create(prompt=f"clip {i}", seconds="1", extra_body={"seed": i}) for i in range(5)]
        assert client.videos.retrieve(others[0].id).status == "queued"
        page = client.videos.list(limit=2, order="asc")
        assert len(page.data) == 2 and page.has_more
        assert [v.id for v in page] == [video.id] + [o.id for o in others]  # auto-paging over 3 pages

        with pytest.raises(openai.BadRequestError) as bad:
            client.videos.create(prompt="x", size="1792x1024")
        assert bad.value.body["param"] == "size" and "allowed: 128x128, 96x160" in bad.value.message
        with pytest.raises(openai.NotFoundError) as missing:
            client.videos.retrieve("video_missing")
        assert missing.value.body["code"] == "not_found"
        with pytest.raises(openai.NotFoundError) as not_ready:
            client.videos.download_content(others[0].id)
        assert not_ready.value.body["code"] == "video_not_ready"
        with pytest.raises(openai.RateLimitError) as full:
            client.videos.create(prompt="the sixth queued job")
        assert full.value.body["code"] == "queue_full" and int(full.value.response.headers["retry-after"]) >= 1

        deleted = client.videos.delete(video.id)
        assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
        assert objects.list_keys(f"videos/{video.id}/") == []
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(video.id)
