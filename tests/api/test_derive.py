"""Remix, edit and extend through the gateway: what each job records (``derived_from``, strength,
the stitched ``seconds``), and every refusal — a 4xx in the OpenAI shape that creates nothing."""

from __future__ import annotations

import io

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from farm.finish.media import encode_mp4
from farm.jobs.dispatcher import params_of
from farm.jobs.expiry import Lifetimes
from farm.render.registry import ModelSpec
from farm.storage.s3 import ClipLayout
from tests.api.conftest import LiveServer, mark_completed, new_tenant
from tests.api.test_gateway import error_of

I2V = ModelSpec(id="wan-tiny-i2v", family="wan-i2v", path="/models/wan-tiny-i2v", sizes=["128x128"],
                seconds=[1], default_steps=4, max_steps=50, max_sequence_length=512)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> bytes:
    """A real 2-second H.264 MP4 (33 frames at 16 fps), 64×48."""
    frames = np.stack([np.full((48, 64, 3), 7 * i, np.uint8) for i in range(33)])
    return encode_mp4(frames, 16, tmp_path_factory.mktemp("src") / "src.mp4").read_bytes()


@pytest.fixture
def http(make_app, objects, models):
    with TestClient(make_app(objects=objects, models=[*models, I2V])) as client:
        yield client


def _completed(http, jobs, **body) -> dict:
    video = http.post("/v1/videos", json={"prompt": "a street by day", "seed": 7, "size": "128x128",
                                          "seconds": 1} | body).json()
    mark_completed(jobs, video["id"])
    return video


def _count(jobs) -> int:
    return sum(jobs.counts_by_status().values())


def test_remix_renders_from_the_source_frames(http, jobs):
    source = _completed(http, jobs)
    response = http.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "the street at night", "strength": 0.5})
    assert response.status_code == 200, response.text
    remix = response.json()
    assert remix["remixed_from_video_id"] == source["id"] and remix["seed"] == 7 and remix["seconds"] == "1"
    job = jobs.get(remix["id"])
    assert job.params["derived_from"] == {"video_id": source["id"], "key": ClipLayout(source["id"]).key("video"),
                                          "action": "remix"}
    params = params_of(job, _spec(jobs, job))  # what the encoder stage is handed
    assert (params.source_key, params.strength, params.source_frames, params.stitch_seconds) == (
        ClipLayout(source["id"]).key("video"), 0.5, "clip", None)
    default = http.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "fog"}).json()
    assert jobs.get(default["id"]).params["strength"] == 0.6  # the documented default


def _spec(jobs, job) -> ModelSpec:
    return ModelSpec(id=job.model, path="/x", sizes=["128x128"], seconds=[1, 2], default_steps=4, max_steps=50)


@pytest.mark.parametrize("status", ["queued", "in_progress", "failed", "cancelled", "expired"])
def test_a_source_that_is_not_completed_is_refused_by_status(http, jobs, status):
    video = http.post("/v1/videos", json={"prompt": "a street", "size": "128x128", "seconds": 1}).json()
    vid = video["id"]
    if status == "in_progress":
        jobs.claim_next("w", lease_s=60)
    elif status == "failed":
        jobs.claim_next("w", lease_s=60)
        jobs.fail(vid, "w", "render_failed", "boom")
    elif status == "cancelled":
        jobs.request_cancel(vid)
    elif status == "expired":
        mark_completed(jobs, vid)
        Lifetimes(jobs.db, clock=jobs.now).mark_expired(vid)
    before = _count(jobs)
    for response, param in (
        (http.post(f"/v1/videos/{vid}/remix", json={"prompt": "at night"}), "video_id"),
        (http.post("/v1/videos/edits", json={"prompt": "at night", "video": {"id": vid}}), "video.id"),
        (http.post("/v1/videos/extensions", data={"prompt": "on", "seconds": "1", "video[id]": vid}), "video.id"),
    ):
        err = error_of(response, 400)
        code = "video_expired" if status == "expired" else "video_not_completed"
        assert (err["param"], err["code"]) == (param, code)
        assert (status if status != "expired" else "expired") in err["message"]
    assert _count(jobs) == before


def test_a_video_the_caller_cannot_read_is_404(make_auth_app, accounts, jobs, objects):
    with TestClient(make_auth_app(objects=objects)) as client:
        ada, bob = new_tenant(client, "ada"), new_tenant(client, "bob")
        video = client.post("/v1/videos", json={"prompt": "a fox", "size": "128x128", "seconds": 1},
                            headers=ada).json()
        mark_completed(jobs, video["id"])
        for response in (
            client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "mine"}, headers=bob),
            client.post("/v1/videos/edits", json={"prompt": "mine", "video": {"id": video["id"]}}, headers=bob),
            client.post("/v1/videos/extensions", json={"prompt": "mine", "seconds": 1, "video": {"id": video["id"]}},
                        headers=bob),
            client.post("/v1/videos/edits", json={"prompt": "x", "video": {"id": "video_nope"}}, headers=ada),
        ):
            assert error_of(response, 404)["param"] == "video_id"
        assert _count(jobs) == 1


@pytest.mark.parametrize("strength", [0, -1, 1.5, 0.1, "lots"])
def test_strength_out_of_range_is_refused(http, jobs, strength):
    source = _completed(http, jobs)  # 4 steps: 0.1 runs int(0.4) = 0 steps
    for response in (
        http.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "x", "strength": strength}),
        http.post("/v1/videos/edits", json={"prompt": "x", "video": {"id": source["id"]}, "strength": strength}),
    ):
        err = error_of(response, 400)
        assert err["param"] == "strength", err
        assert "(0, 1]" in err["message"] or "runs no step" in err["message"] or "number" in err["message"]
    assert _count(jobs) == 1


def test_edit_by_id_and_by_upload(http, jobs, objects, mp4):
    source = _completed(http, jobs)
    by_id = http.post("/v1/videos/edits", json={"prompt": "paint it red", "video": {"id": source["id"]}})
    assert by_id.status_code == 200, by_id.text
    assert jobs.get(by_id.json()["id"]).params["derived_from"]["action"] == "edit"
    upload = http.post("/v1/videos/edits", data={"prompt": "paint it blue", "size": "96x160"},
                       files={"video": ("clip.mp4", mp4, "video/mp4")})
    assert upload.status_code == 200, upload.text
    video = upload.json()
    job = jobs.get(video["id"])
    key = ClipLayout(video["id"]).source_key
    assert job.params["derived_from"] == {"video_id": None, "key": key, "action": "edit"}
    assert objects.get_bytes(key) == mp4 and video["size"] == "96x160" and video["remixed_from_video_id"] is None
    # By id, the source's own settings: a model or size is refused by name, nothing created.
    err = error_of(http.post("/v1/videos/edits", json={"prompt": "x", "video": {"id": source["id"]},
                                                       "size": "96x160"}), 400)
    assert (err["param"], err["code"]) == ("size", "unsupported_parameter")


@pytest.mark.parametrize("data, code", [
    (b"", "invalid_value"),
    (b"definitely not a video" * 10, "unsupported_video_format"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x40\x1f\x00\x00\x80\x3e\x00\x00\x02\x00\x10\x00"
     b"data\x00\x00\x00\x00", "unsupported_video_format"),
])
def test_a_bad_upload_is_refused_and_nothing_is_stored(http, jobs, objects, data, code):
    for path, extra in (("/v1/videos/edits", {}), ("/v1/videos/extensions", {"seconds": "1"})):
        err = error_of(http.post(path, data={"prompt": "x"} | extra, files={"video": ("a.mp4", data, "video/mp4")}),
                       400)
        assert (err["param"], err["code"]) == ("video", code), err
    assert _count(jobs) == 0 and list(objects.list_keys()) == []


def test_an_upload_over_the_limit_is_413(make_app, objects, jobs, mp4):
    from farm.api.uploads import UploadLimits

    with TestClient(make_app(objects=objects, upload_limits=UploadLimits(max_bytes=len(mp4) - 1))) as client:
        err = error_of(client.post("/v1/videos/edits", data={"prompt": "x"},
                                   files={"video": ("a.mp4", mp4, "video/mp4")}), 413)
        assert err["param"] == "video"
    assert _count(jobs) == 0


def test_request_shape_errors(http, jobs, mp4):
    cases = [
        ({"json": {"prompt": "x"}}, "video", "/v1/videos/edits"),
        ({"json": {"prompt": "x", "video": "video_1"}}, "video", "/v1/videos/edits"),
        ({"json": {"prompt": "x", "video": {"id": "v", "url": "u"}}}, "video", "/v1/videos/edits"),
        ({"json": {"prompt": "x", "video": {"id": "v"}, "colour": 1}}, "colour", "/v1/videos/edits"),
        ({"json": {"prompt": "x", "video": {"id": "v"}}}, "seconds", "/v1/videos/extensions"),
        ({"data": {"prompt": "x", "video[id]": "v"}, "files": {"video": ("a.mp4", mp4, "video/mp4")}}, "video",
         "/v1/videos/edits"),
    ]
    for kwargs, param, path in cases:
        assert error_of(http.post(path, **kwargs), 400)["param"] == param, kwargs
    # A model that cannot render video-to-video (image-to-video) is named.
    err = error_of(http.post("/v1/videos/edits", data={"prompt": "x", "model": "wan-tiny-i2v"},
                             files={"video": ("a.mp4", mp4, "video/mp4")}), 400)
    assert (err["param"], err["code"]) == ("model", "unsupported_parameter")
    assert _count(jobs) == 0


def test_extension_seconds_are_the_stitched_total(http, jobs, mp4):
    source = _completed(http, jobs, seconds=2)
    ext = http.post("/v1/videos/extensions", json={"prompt": "it drives on", "seconds": 1,
                                                   "video": {"id": source["id"]}})
    assert ext.status_code == 200, ext.text
    video = ext.json()
    assert video["seconds"] == "3"  # 2 s of source + 1 s new
    job = jobs.get(video["id"])
    assert job.seconds == 1 and job.params["stitch_seconds"] == 2 and job.params["strength"] == 0.7
    params = params_of(job, _spec(jobs, job))
    assert (params.source_frames, params.stitch_seconds) == ("last", 2)
    # An extension of an extension stitches the whole stitched clip in front.
    mark_completed(jobs, video["id"])
    again = http.post("/v1/videos/extensions", json={"prompt": "and on", "seconds": 2, "video": {"id": video["id"]}})
    assert again.json()["seconds"] == "5"
    # An uploaded 2-second MP4.
    up = http.post("/v1/videos/extensions", data={"prompt": "on", "seconds": "1"},
                   files={"video": ("a.mp4", mp4, "video/mp4")})
    assert up.status_code == 200, up.text
    assert up.json()["seconds"] == "3"
    assert error_of(http.post("/v1/videos/extensions", json={"prompt": "x", "seconds": 3,
                                                             "video": {"id": source["id"]}}), 400)["param"] == "seconds"


def test_idempotency_replays_and_refused_uploads_leave_nothing(http, jobs, objects, mp4):
    headers = {"Idempotency-Key": "edit-1"}
    first = http.post("/v1/videos/edits", data={"prompt": "x", "seed": "5"}, headers=headers,
                      files={"video": ("a.mp4", mp4, "video/mp4")})
    second = http.post("/v1/videos/edits", data={"prompt": "x", "seed": "5"}, headers=headers,
                       files={"video": ("a.mp4", mp4, "video/mp4")})
    assert first.status_code == second.status_code == 200 and first.json()["id"] == second.json()["id"]
    assert sorted(objects.list_keys()) == [ClipLayout(first.json()["id"]).source_key]  # the replay's copy is gone
    other = http.post("/v1/videos/edits", data={"prompt": "x", "seed": "5"}, headers=headers,
                      files={"video": ("b.mp4", mp4 + b"\x00", "video/mp4")})
    assert error_of(other, 409)["param"] == "Idempotency-Key"
    assert _count(jobs) == 1 and len(list(objects.list_keys())) == 1


def test_the_openai_sdk_remixes_edits_and_extends(make_app, objects, jobs, mp4):
    with LiveServer(make_app(objects=objects)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        source = client.videos.create(prompt="a street", size="128x128", seconds="1")
        with pytest.raises(openai.BadRequestError) as caught:  # still queued
            client.videos.remix(source.id, prompt="at night")
        assert caught.value.body["code"] == "video_not_completed"
        mark_completed(jobs, source.id)
        remix = client.videos.remix(source.id, prompt="at night", extra_body={"strength": 0.4})
        assert remix.remixed_from_video_id == source.id
        edit = client.videos.edit(prompt="snow", video=("a.mp4", io.BytesIO(mp4), "video/mp4"))
        assert jobs.get(edit.id).params["derived_from"]["action"] == "edit"
        ext = client.videos.extend(prompt="on", seconds="1",  # type: ignore[arg-type]  (the tiny model's)
                                   video=("a.mp4", io.BytesIO(mp4), "video/mp4"))
        assert ext.seconds == "3"
        with pytest.raises(openai.BadRequestError) as caught:
            client.videos.edit(prompt="snow", video=("a.mp4", io.BytesIO(b"nope" * 30), "video/mp4"))
        assert caught.value.body["param"] == "video"


def test_the_literal_routes_advertise_their_own_methods(http):
    for path in ("/v1/videos/edits", "/v1/videos/extensions"):
        response = http.put(path, json={})
        assert response.status_code == 405 and response.headers["allow"] == "POST", response.headers
    assert http.put("/v1/videos/video_1", json={}).headers["allow"] == "DELETE, GET"


class WordModerator:
    """An operator's classifier in miniature (the Moderator protocol): refuses prompts naming a word,
    and records which create path asked; the built-in rules are tested in test_moderation.py."""

    def __init__(self, word: str) -> None:
        self.word, self.asked = word, []

    def check(self, request):
        from farm.policy.moderation import Decision

        self.asked.append((request.path, request.source_video_id))
        if self.word in request.prompt.lower():
            return Decision.refuse("classifier", "word", f"prompt: names {self.word!r}")
        return Decision.allow()


def test_every_route_passes_the_moderation_hook_with_its_path(make_app, objects, jobs, mp4):
    moderator = WordModerator("godzilla")
    with TestClient(make_app(objects=objects, moderator=moderator)) as client:
        source = _completed(client, jobs)
        sid = source["id"]
        calls = [
            lambda p: client.post(f"/v1/videos/{sid}/remix", json={"prompt": p}),
            lambda p: client.post("/v1/videos/edits", json={"prompt": p, "video": {"id": sid}}),
            lambda p: client.post("/v1/videos/extensions", data={"prompt": p, "seconds": "1"},
                                  files={"video": ("a.mp4", mp4, "video/mp4")}),
        ]
        for call in calls:
            err = error_of(call("now with GODZILLA"), 400)
            assert (err["param"], err["code"]) == ("prompt", "content_policy_violation")
        assert _count(jobs) == 1 and [k for k in objects.list_keys()] == []  # no upload kept either
        assert moderator.asked == [("create", None), ("remix", sid), ("edit", sid), ("extend", None)]
        assert all(call("now at dusk").status_code == 200 for call in calls)
