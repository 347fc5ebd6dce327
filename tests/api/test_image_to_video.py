"""Image-to-video requests: the checked image is stored under the job's prefix before the job is
queued, its key recorded in the job's params, and nothing is left behind when no job owns it."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from farm.api.errors import InvalidRequest
from farm.api.uploads import UploadLimits
from farm.api.video_requests import check_create_body
from farm.jobs.dispatcher import params_of
from farm.render.registry import REFERENCE_KEY_PARAM, ModelSpec
from farm.storage.s3 import ClipLayout
from tests.api.conftest import mark_completed
from tests.api.test_gateway import error_of

I2V = ModelSpec(id="wan-tiny-i2v", family="wan-i2v", path="/models/wan-tiny-i2v", sizes=["128x128", "128x96"],
                seconds=[1, 2], default_steps=4, max_steps=50, max_sequence_length=512)
T2V = ModelSpec(id="wan-tiny", path="/models/wan-tiny", sizes=["128x128"], seconds=[1], default_steps=4)


def _png(colour: str = "red", size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def i2v_client(make_app, objects):
    with TestClient(make_app(objects=objects, models=[I2V, T2V])) as client:
        yield client


def _create_multipart(client, image: bytes, headers=None, **fields):
    form = {"prompt": "the fox turns", "model": "wan-tiny-i2v"} | fields
    return client.post("/v1/videos", data=form, files={"input_reference": ("ref.png", image, "image/png")},
                       headers=headers or {})


def test_multipart_image_is_stored_under_the_job_and_named_in_its_params(i2v_client, jobs, objects):
    image = _png()
    response = _create_multipart(i2v_client, image, size="128x96")
    assert response.status_code == 200, response.text
    job = jobs.get(response.json()["id"])
    key = job.params[REFERENCE_KEY_PARAM]
    assert key == ClipLayout(job.id).prefix + "input_reference.png"
    assert objects.get_bytes(key) == image  # the bytes as sent: the encoder fits them to the size
    assert job.params["input_reference_sha256"] == hashlib.sha256(image).hexdigest()
    assert params_of(job, I2V).reference_key == key  # what the encoder stage is handed


def test_data_url_image_is_stored_too(i2v_client, jobs, objects):
    image = _png("blue")
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    response = i2v_client.post("/v1/videos", json={"prompt": "waves", "model": "wan-tiny-i2v",
                                                   "input_reference": {"image_url": url}})
    assert response.status_code == 200, response.text
    assert objects.get_bytes(jobs.get(response.json()["id"]).params[REFERENCE_KEY_PARAM]) == image


def test_an_image_model_without_an_image_is_refused_and_nothing_is_created(i2v_client, jobs, objects):
    err = error_of(i2v_client.post("/v1/videos", json={"prompt": "waves", "model": "wan-tiny-i2v"}), 400)
    assert (err["param"], err["code"]) == ("input_reference", "missing_required_parameter")
    assert "'wan-tiny-i2v' renders from an image" in err["message"]
    # A text-only model still refuses an image, after checking it.
    err = error_of(_create_multipart(i2v_client, _png(), model="wan-tiny"), 400)
    assert (err["param"], err["code"]) == ("input_reference", "unsupported_parameter")
    assert jobs.list(limit=10)[0] == [] and list(objects.list_keys()) == []


def test_a_refused_create_leaves_no_image_behind(make_app, objects, jobs):
    with TestClient(make_app(objects=objects, models=[I2V], max_queued=1)) as client:
        assert _create_multipart(client, _png("red")).status_code == 200
        assert error_of(_create_multipart(client, _png("green")), 429)["code"] == "queue_full"
    (only,) = jobs.list(limit=10)[0]
    assert list(objects.list_keys()) == [only.params[REFERENCE_KEY_PARAM]]


def test_idempotent_retries_keep_one_image_and_another_image_is_another_request(i2v_client, jobs, objects):
    key = {"Idempotency-Key": "fox-1"}
    first = _create_multipart(i2v_client, _png("red"), headers=key)
    again = _create_multipart(i2v_client, _png("red"), headers=key)
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    err = error_of(_create_multipart(i2v_client, _png("green"), headers=key), 409)
    assert err["code"] == "idempotency_key_reused"
    assert list(objects.list_keys()) == [jobs.get(first.json()["id"]).params[REFERENCE_KEY_PARAM]]


def test_deleting_the_video_deletes_its_image(i2v_client, objects):
    video_id = _create_multipart(i2v_client, _png()).json()["id"]
    assert list(objects.list_keys())
    assert i2v_client.delete(f"/v1/videos/{video_id}").status_code == 200
    assert list(objects.list_keys()) == []


def test_batch_lines_for_an_image_model_are_refused_by_name():
    with pytest.raises(InvalidRequest) as caught:
        check_create_body({"prompt": "waves", "model": "wan-tiny-i2v"}, [T2V, I2V], max_prompt_chars=100,
                          upload_limits=UploadLimits())
    assert caught.value.param == "model" and "batch lines cannot carry" in caught.value.message


def test_a_remix_of_an_image_to_video_clip_is_refused_until_remix_carries_images(i2v_client, jobs, objects):
    video_id = _create_multipart(i2v_client, _png()).json()["id"]
    mark_completed(jobs, video_id)
    # A remix renders video-to-video, which the image-to-video family does not.
    err = error_of(i2v_client.post(f"/v1/videos/{video_id}/remix", json={"prompt": "at night"}), 400)
    assert (err["param"], err["code"]) == ("model", "unsupported_parameter")
    assert len(jobs.list(limit=10)[0]) == 1 and len(list(objects.list_keys())) == 1


def test_the_create_schema_advertises_input_reference_when_a_model_takes_images(i2v_client, client):
    def create_schemas(c):
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
        return schemas["CreateVideoRequest"]["properties"], schemas["CreateVideoForm"]["properties"]

    body, form = create_schemas(i2v_client)
    shapes = body["input_reference"]["anyOf"][0]
    assert set(shapes["properties"]) == {"file_id", "image_url"} and "$ref" not in str(body["input_reference"])
    assert form["input_reference"]["format"] == "binary"
    body, form = create_schemas(client)  # text-only models: not advertised (and refused if sent)
    assert "input_reference" not in body and "input_reference" not in form
