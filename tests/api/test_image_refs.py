"""``input_reference`` as ``{"image_url": …}`` and ``{"file_id": …}``: a real image server on loopback
(uvicorn), the SSRF guard with and without its allowlist, the Files API's image purposes through the
unmodified ``openai`` SDK, and every failure a 400 naming ``input_reference`` that creates nothing."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from farm.api.image_refs import ImageFetch
from farm.config import BatchSettings, ServeSettings
from farm.jobs.schedules import ScheduleStore
from farm.render.registry import REFERENCE_KEY_PARAM
from tests.api.conftest import LiveServer
from tests.api.test_gateway import error_of
from tests.api.test_image_to_video import I2V, T2V

LOOPBACK = ("127.0.0.0/8",)
MAX_BYTES = 4000  # the fetch limit the tests set: the test PNG is far below it


def _png(colour: str = "red", size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


class ImageServer:
    """A real HTTP server on 127.0.0.1 with one route per way a fetch can go; counts the requests."""

    def __init__(self) -> None:
        self.hits: list[str] = []

        def counted(handler):
            async def route(request):
                self.hits.append(request.url.path)
                return await handler(request)
            return route

        async def image(request):
            return Response(PNG, media_type="image/png")

        async def big(request):  # announces its size: refused before the body is read
            return Response(b"\x89PNG" + b"x" * (MAX_BYTES * 2), media_type="image/png")

        async def big_chunked(request):  # no Content-Length: refused while counting the stream
            async def chunks():
                for _ in range(20):
                    yield b"x" * 1000
            return StreamingResponse(chunks(), media_type="image/png")

        async def text(request):
            return Response(b"<html>not an image</html>", media_type="text/html")

        async def slow(request):
            await asyncio.sleep(3)
            return Response(PNG, media_type="image/png")

        async def gone(request):
            return Response(b"nope", status_code=404)

        async def to_image(request):
            return RedirectResponse("/image.png", status_code=302)

        async def to_private(request):  # a public-looking hop that points inside: each hop is checked
            return RedirectResponse("http://10.1.2.3/secret.png", status_code=302)

        async def loop(request):
            return RedirectResponse("/loop", status_code=302)

        routes = {"/image.png": image, "/big.png": big, "/chunked.png": big_chunked, "/page.html": text,
                  "/slow.png": slow, "/gone.png": gone, "/moved.png": to_image, "/inside.png": to_private,
                  "/loop": loop}
        self.app = Starlette(routes=[Route(path, counted(handler)) for path, handler in routes.items()])


@pytest.fixture
def image_server() -> Iterator[tuple[str, ImageServer]]:
    server = ImageServer()
    with LiveServer(server.app) as url:
        yield url, server


def _gateway(make_app, objects, fetch: ImageFetch) -> TestClient:
    return TestClient(make_app(objects=objects, models=[I2V, T2V], image_fetch=fetch))


def _create(client: TestClient, url: str, model: str = "wan-tiny-i2v"):
    return client.post("/v1/videos", json={"prompt": "the fox turns", "model": model,
                                           "input_reference": {"image_url": url}})


def test_an_image_url_is_fetched_and_stored_like_an_uploaded_image(make_app, objects, jobs, image_server):
    base, server = image_server
    with _gateway(make_app, objects, ImageFetch(allow_hosts=LOOPBACK, max_bytes=MAX_BYTES)) as client:
        for path in ("/image.png", "/moved.png"):  # directly, and through a redirect (checked again)
            response = _create(client, base + path)
            assert response.status_code == 200, response.text
            job = jobs.get(response.json()["id"])
            assert objects.get_bytes(job.params[REFERENCE_KEY_PARAM]) == PNG
            assert job.params["input_reference_sha256"] == hashlib.sha256(PNG).hexdigest()
        # Multipart, as the SDK sends it with extra_body: input_reference[image_url].
        response = client.post("/v1/videos", data={"prompt": "the fox turns", "model": "wan-tiny-i2v",
                                                   "input_reference[image_url]": base + "/image.png"})
        assert response.status_code == 200, response.text
        assert objects.get_bytes(jobs.get(response.json()["id"]).params[REFERENCE_KEY_PARAM]) == PNG
    assert server.hits == ["/image.png", "/moved.png", "/image.png", "/image.png"]


@pytest.mark.parametrize("path, code, fragment", [
    ("/big.png", "image_too_large", f"larger than {MAX_BYTES} bytes"),
    ("/chunked.png", "image_too_large", f"larger than {MAX_BYTES} bytes"),
    ("/page.html", "unsupported_image_format", "not an image"),
    ("/slow.png", "image_url_timeout", "timed out after 0.5 s"),
    ("/gone.png", "image_url_unreachable", "HTTP 404"),
    ("/inside.png", "image_url_refused", "address 10.1.2.3 is not allowed (private)"),
    ("/loop", "image_url_unreachable", "redirected more than 3 times"),
])
def test_each_failed_fetch_is_a_400_naming_input_reference_and_creates_nothing(
        make_app, objects, jobs, image_server, path, code, fragment):
    base, _ = image_server
    fetch = ImageFetch(allow_hosts=LOOPBACK, max_bytes=MAX_BYTES, timeout_s=0.5)
    with _gateway(make_app, objects, fetch) as client:
        err = error_of(_create(client, base + path), 400)
    assert (err["param"], err["code"], err["type"]) == ("input_reference", code, "invalid_request_error")
    assert fragment in err["message"], err["message"]
    assert jobs.list(limit=10)[0] == [] and list(objects.list_keys()) == []


def test_without_the_allowlist_loopback_urls_are_refused_before_any_request(make_app, objects, jobs, image_server):
    base, server = image_server
    port = httpx.URL(base).port
    with _gateway(make_app, objects, ImageFetch()) as client:
        for url in (base + "/image.png", f"http://localhost:{port}/image.png", "http://[::1]/a.png",
                    "http://169.254.169.254/latest/meta-data"):
            err = error_of(_create(client, url), 400)
            assert (err["param"], err["code"]) == ("input_reference", "image_url_refused"), err
            assert "serve.image_url_allow_hosts" in err["message"] or "is not allowed" in err["message"], err
        err = error_of(_create(client, "file:///etc/passwd"), 400)
        assert err["code"] == "image_url_refused" and "scheme 'file' is not allowed" in err["message"]
        # A text-only model refuses an image URL without fetching it, allowlist or not.
        err = error_of(_create(client, base + "/image.png", model="wan-tiny"), 400)
        assert (err["param"], err["code"]) == ("input_reference", "unsupported_parameter")
    assert server.hits == [] and jobs.list(limit=10)[0] == [] and list(objects.list_keys()) == []


def test_the_settings_carry_the_fetch_limits_and_refuse_a_bad_allowlist():
    ss = ServeSettings(image_url_allow_hosts=["127.0.0.1/32", "images.internal"], image_url_max_mb=2,
                       image_url_timeout_s=3)
    assert (ss.image_url_allow_hosts, ss.image_url_max_mb, ss.image_url_timeout_s) == (
        ["127.0.0.1/32", "images.internal"], 2, 3)
    with pytest.raises(ValueError, match="neither a CIDR"):
        ServeSettings(image_url_allow_hosts=["not a host!"])
    with pytest.raises(ValueError, match="image_url_timeout_s"):
        ServeSettings(image_url_timeout_s=0)


# -- by file id, through the SDK -----------------------------------------------------------------


@pytest.fixture
def sdk_gateway(make_auth_app, objects, jobs, db_url) -> Iterator[str]:
    schedules = ScheduleStore(db_url)
    app = make_auth_app(objects=objects, models=[I2V, T2V], batches=schedules.batches, schedules=schedules,
                        batch_settings=BatchSettings())
    with LiveServer(app) as url:
        yield url


def _tenant(accounts, base_url: str, name: str) -> openai.OpenAI:
    _, code = accounts.create_invite(note=name)
    _, _, key = accounts.redeem(code, name)
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks the Sora API deprecated
def test_a_file_id_names_the_callers_uploaded_image(sdk_gateway, accounts, jobs, objects):
    alice, bob = _tenant(accounts, sdk_gateway, "alice"), _tenant(accounts, sdk_gateway, "bob")
    uploaded = alice.files.create(file=("fox.png", PNG, "image/png"), purpose="vision")
    assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("vision", len(PNG), "fox.png")
    assert alice.files.content(uploaded.id).content == PNG
    # The SDK's create sends the JSON shape as the form fields input_reference[file_id] (extra_body:
    # its input_reference argument accepts only a file).
    video = alice.videos.create(prompt="the fox turns", model="wan-tiny-i2v",
                                extra_body={"input_reference": {"file_id": uploaded.id}})
    job = jobs.get(video.id)
    assert objects.get_bytes(job.params[REFERENCE_KEY_PARAM]) == PNG  # a copy under the video's own prefix
    assert job.params[REFERENCE_KEY_PARAM].startswith(f"videos/{video.id}/")
    # user_data is accepted too, as a JSON body.
    other = alice.files.create(file=("b.png", _png("blue"), "image/png"), purpose="user_data")
    reply = httpx.post(f"{sdk_gateway}/v1/videos", headers={"Authorization": f"Bearer {alice.api_key}"},
                       json={"prompt": "waves", "model": "wan-tiny-i2v", "input_reference": {"file_id": other.id}})
    assert reply.status_code == 200, reply.text
    assert objects.get_bytes(jobs.get(reply.json()["id"]).params[REFERENCE_KEY_PARAM]) == _png("blue")

    before = {key for key in objects.list_keys()}
    batch_file = alice.files.create(file=("in.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
    for client, file_id, code in [(bob, uploaded.id, "file_not_found"), (bob, "file_nope", "file_not_found"),
                                  (alice, batch_file.id, "invalid_file_purpose")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.videos.create(prompt="the fox turns", model="wan-tiny-i2v",
                                 extra_body={"input_reference": {"file_id": file_id}})
        body = refused.value.body
        assert (body["param"], body["code"]) == ("input_reference", code), body
    # Bob's answer for Alice's file is word for word the one for a file that never existed.
    with pytest.raises(openai.BadRequestError) as theirs:
        bob.videos.create(prompt="p", model="wan-tiny-i2v", extra_body={"input_reference": {"file_id": uploaded.id}})
    assert theirs.value.body["message"].replace(uploaded.id, "X") == (
        f"input_reference: file 'X' not found; upload it with POST /v1/files (purpose vision)")
    assert [v.id for v in bob.videos.list()] == []
    assert {key for key in objects.list_keys()} == before | {f"files/{batch_file.id}"}
    # An image purpose takes only an accepted image, checked as an uploaded input_reference is.
    with pytest.raises(openai.BadRequestError) as refused:
        alice.files.create(file=("notes.txt", b"hello", "text/plain"), purpose="vision")
    assert (refused.value.body["param"], refused.value.body["code"]) == ("file", "unsupported_image_format")
    assert len(alice.files.list(purpose="vision").data) == 1
