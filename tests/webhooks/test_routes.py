"""/v1/webhook_endpoints through the openai SDK against a real uvicorn: shapes, scoping, SSRF refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request

from farm.api.errors import APIError, install_error_handlers
from farm.api.webhook_routes import add_webhook_routes
from farm.webhooks.guard import UrlGuard
from farm.webhooks.settings import WebhookSettings
from farm.webhooks.store import WebhookStore
from tests.webhooks.conftest import ACCOUNT_A, ACCOUNT_B

KEYS = {"key-a": ACCOUNT_A, "key-b": ACCOUNT_B}


class Unauthorized(APIError):
    status_code = 401
    default_code = "invalid_api_key"


def account_of(request: Request) -> str:
    """The test's stand-in for the gateway's API-key auth."""
    key = request.headers.get("authorization", "").removeprefix("Bearer ")
    if key not in KEYS:
        raise Unauthorized("invalid API key")
    return KEYS[key]


@pytest.fixture
def base_url(db_url: str) -> Iterator[str]:
    store = WebhookStore(db_url)
    settings = WebhookSettings(allow_hosts=["127.0.0.0/8"], timeout_s=5, max_endpoints_per_account=3)
    app = FastAPI()
    install_error_handlers(app)
    add_webhook_routes(app, store_of=lambda: store, account_of=account_of, guard=UrlGuard.from_settings(settings),
                       settings=settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


def sdk(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


def test_crud_through_the_sdk_shows_the_secret_only_on_create_and_rotate(base_url: str, receiver) -> None:
    a = sdk(base_url, "key-a")
    created = a.webhooks.create(name="renders", url=receiver.url(), event_types=["video.completed", "video.failed"])
    assert created.id.startswith("we_") and created.object == "webhook_endpoint"
    assert created.signing_secret.startswith("whsec_")
    assert created.signing_secret_hint.endswith(created.signing_secret[-4:])
    assert created.event_types == ["video.completed", "video.failed"] and created.url == receiver.url()

    raw = httpx.get(f"{base_url}/webhook_endpoints/{created.id}", headers={"Authorization": "Bearer key-a"}).json()
    assert "signing_secret" not in raw and raw["status"] == "enabled"
    assert a.webhooks.retrieve(created.id).name == "renders"

    updated = a.webhooks.update(created.id, name="renamed", event_types=["video.cancelled"])
    assert (updated.name, updated.event_types) == ("renamed", ["video.cancelled"])
    same = a.webhooks.update(created.id, name="renamed")
    assert same.updated_at == updated.updated_at  # an unchanged update does not advance it

    rotated = a.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret.startswith("whsec_") and rotated.signing_secret != created.signing_secret
    with pytest.raises(openai.BadRequestError) as exc:
        a.webhooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True)
    assert exc.value.body["param"] == "keep_old_secret_active_for_24_hours"

    second = a.webhooks.create(name="two", url=receiver.url("/2"), event_types=["video.failed"])
    page = a.webhooks.list(limit=1)
    assert [e.id for e in page.data] == [second.id] and page.has_more
    assert [e.id for e in a.webhooks.list()] == [second.id, created.id]  # newest first, pages followed
    assert [e.id for e in a.webhooks.list(after=second.id)] == [created.id]

    deleted = a.webhooks.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "webhook_endpoint.deleted")
    with pytest.raises(openai.NotFoundError):
        a.webhooks.retrieve(created.id)


def test_test_event_is_signed_and_reports_the_receivers_status(base_url: str, receiver) -> None:
    a = sdk(base_url, "key-a")
    created = a.webhooks.create(name="t", url=receiver.url(), event_types=["video.completed"])
    receiver.default = 204
    result = a.webhooks.test(created.id, event_type="video.completed")
    assert (result.status_code, result.success, result.webhook_endpoint_id) == (204, True, created.id)
    got = receiver.requests[0]
    event = a.webhooks.unwrap(got.body, got.headers, secret=created.signing_secret)
    assert event.type == "video.completed" and event.id == got.headers["webhook-id"]


def test_another_account_cannot_see_or_touch_an_endpoint(base_url: str, receiver) -> None:
    a, b = sdk(base_url, "key-a"), sdk(base_url, "key-b")
    mine = a.webhooks.create(name="a's", url=receiver.url(), event_types=["video.completed"])
    for call in (
        lambda: b.webhooks.retrieve(mine.id),
        lambda: b.webhooks.update(mine.id, url="http://127.0.0.1:1/steal"),
        lambda: b.webhooks.delete(mine.id),
        lambda: b.webhooks.rotate_secret(mine.id),
        lambda: b.webhooks.test(mine.id, event_type="video.completed"),
        lambda: b.webhooks.list(after=mine.id).data,
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert b.webhooks.list().data == []
    still = a.webhooks.retrieve(mine.id)
    assert (still.url, still.name) == (receiver.url(), "a's")
    assert receiver.requests == []
    with pytest.raises(openai.AuthenticationError):
        sdk(base_url, "nobody").webhooks.list()


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/hook", "http://[::1]/", "http://[fd00::1]/",
    "http://0x0a000001/", "ftp://127.0.0.1/", "http://user:pw@127.0.0.1/", "http://[fe80::1]/",
])
def test_refused_urls_are_400_naming_url(base_url: str, url: str) -> None:
    a = sdk(base_url, "key-a")
    with pytest.raises(openai.BadRequestError) as exc:
        a.webhooks.create(name="x", url=url, event_types=["video.completed"])
    assert exc.value.body["param"] == "url" and exc.value.body["code"] == "url_not_allowed"
    assert "not allowed" in exc.value.body["message"]


def test_bad_fields_and_limits_are_400s(base_url: str, receiver) -> None:
    a = sdk(base_url, "key-a")
    created = a.webhooks.create(name="ok", url=receiver.url(), event_types=["video.completed"])
    with pytest.raises(openai.BadRequestError) as exc:
        a.webhooks.update(created.id, url="http://169.254.169.254/")
    assert exc.value.body["param"] == "url"
    with pytest.raises(openai.BadRequestError) as exc:
        a.webhooks.create(name="x", url=receiver.url(), event_types=["batch.completed"])
    assert exc.value.body["param"] == "event_types" and "video.completed" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        a.webhooks.create(name="x", url=receiver.url(), event_types=[])
    assert exc.value.body["param"] == "event_types"
    for field, value in (("name", "\\ud800"), ("url", "http://127.0.0.1/\\udfff")):  # JSON escapes: lone surrogates
        body = {"name": '"x"', "url": f'"{receiver.url()}"', "event_types": '["video.failed"]', field: f'"{value}"'}
        raw = httpx.post(f"{base_url}/webhook_endpoints", headers={"Authorization": "Bearer key-a",
                         "Content-Type": "application/json"},
                         content="{" + ",".join(f'"{k}":{v}' for k, v in body.items()) + "}")
        assert raw.status_code == 400 and raw.json()["error"]["param"] == field, raw.text
    a.webhooks.create(name="2", url=receiver.url(), event_types=["video.failed"])
    a.webhooks.create(name="3", url=receiver.url(), event_types=["video.failed"])
    with pytest.raises(openai.BadRequestError, match="at most 3"):
        a.webhooks.create(name="4", url=receiver.url(), event_types=["video.failed"])
    assert sdk(base_url, "key-b").webhooks.create(name="b", url=receiver.url(), event_types=["video.failed"])
