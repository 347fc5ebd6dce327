"""``/v1/webhook_endpoints``: the routes the ``openai`` SDK's ``client.webhooks`` calls.

Same paths and shapes as OpenAI's: create (the answer carries ``signing_secret``), list
(newest first, cursor ``after``), retrieve, update (POST), delete, ``rotate_secret`` (the
answer carries the new secret) and ``test`` (sends one signed sample event now and returns the
receiver's status code). Retrieve, list and update never show the secret, only
``signing_secret_hint``: a secret is shown once, when created or rotated, like an API key.

Farm extensions: event types ``video.cancelled`` and ``video.cameo_used`` (sent to a cameo's owner
when another account's clip uses it; ``data.id`` is that clip); an endpoint ``status`` (``enabled`` or
``disabled``; disabled endpoints keep their deliveries pending) settable on update with
``extra_body``. Unsupported: ``keep_old_secret_active_for_24_hours=true`` (400).

Every route is scoped to the caller's account: another account's endpoint is "not found".
URLs pass the SSRF guard (after DNS resolution) on create and update; a refused URL is a 400
with ``param="url"``. Delivery checks them again on every attempt.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from farm.api.errors import ERROR_RESPONSES, ErrorResponse, InvalidRequest, NotFound
from farm.db import unix, utcnow
from farm.webhooks.deliverer import new_client, send_signed
from farm.webhooks.guard import MAX_URL_CHARS, UrlGuard, UrlRefused
from farm.webhooks.settings import WebhookSettings
from farm.webhooks.store import MAX_NAME_CHARS, TooManyEndpoints, payload_json

if TYPE_CHECKING:
    from farm.webhooks.store import Endpoint, WebhookStore

EventType = Literal["video.completed", "video.failed", "video.cancelled", "video.cameo_used"]
_PARAM_PREFIX = re.compile(r"^([a-z_]+):")
_RESPONSES = {**ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "No such webhook endpoint for this caller."}}

# -- request and response models ------------------------------------------------------------


class CreateWebhookEndpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", title="CreateWebhookEndpointRequest")

    event_types: list[EventType] = Field(min_length=1, description="Event types delivered to this endpoint.")
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="A human-readable name.")
    url: str = Field(min_length=1, max_length=MAX_URL_CHARS, description="The http(s) URL that receives events.")


class UpdateWebhookEndpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", title="UpdateWebhookEndpointRequest")

    event_types: list[EventType] | None = Field(default=None, min_length=1, description="The complete new set.")
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS, description="A new name.")
    url: str | None = Field(default=None, min_length=1, max_length=MAX_URL_CHARS, description="A new URL.")
    status: Literal["enabled", "disabled"] | None = Field(
        default=None, description="Farm extension: 'disabled' pauses deliveries (they wait, pending)."
    )


class RotateSecretRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", title="RotateWebhookSecretRequest")

    keep_old_secret_active_for_24_hours: bool = Field(
        default=False, description="Not supported by this farm: the old secret stops working at once."
    )


class TestWebhookEndpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", title="TestWebhookEndpointRequest")

    event_type: EventType = Field(description="The type of the sample event to send.")


class WebhookEndpointObject(BaseModel):
    id: str = Field(description="The endpoint's id.")
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int = Field(description="Unix seconds when the endpoint was created.")
    updated_at: int | None = Field(default=None, description="Unix seconds of the last change.")
    event_types: list[str] = Field(description="Event types delivered to this endpoint.")
    name: str = Field(description="The endpoint's name.")
    url: str = Field(description="Where events are POSTed.")
    signing_secret_hint: str | None = Field(default=None, description="The secret's last characters.")
    status: Literal["enabled", "disabled"] = Field(description="Farm extension: whether deliveries are sent.")


class WebhookEndpointWithSecret(WebhookEndpointObject):
    signing_secret: str = Field(description="whsec_…: the signing secret, shown only on create and rotate.")


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointObject]
    first_id: str | None = Field(description="Id of the first endpoint on this page.")
    last_id: str | None = Field(description="Id of the last endpoint on this page.")
    has_more: bool = Field(description="Whether more endpoints follow this page.")


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool


class WebhookEndpointTestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    webhook_endpoint_id: str
    event_type: str
    status_code: int = Field(description="The receiver's HTTP status code.")
    success: Literal[True] = True


# -- routes ----------------------------------------------------------------------------------


def add_webhook_routes(
    app: FastAPI,
    *,
    store_of: Callable[[], WebhookStore],
    account_of: Callable[[Request], str | Awaitable[str]],
    guard: UrlGuard,
    settings: WebhookSettings | None = None,
) -> None:
    """Add the webhook endpoint routes to ``app``.

    ``store_of`` returns the store (it may build it on first use); ``account_of`` returns the
    caller's account id, or raises the gateway's 401; ``settings`` bound the test delivery
    and the number of endpoints per account.
    """
    limits = settings or WebhookSettings()

    async def account(request: Request) -> str:
        who = account_of(request)
        return await who if inspect.isawaitable(who) else who

    async def checked_url(url: str) -> str:
        try:
            async with asyncio.timeout(limits.timeout_s):  # a slow resolver must not hold the request
                await guard.resolve(url)
        except UrlRefused as exc:
            raise InvalidRequest(f"url: {url!r} is not allowed: {exc}", param="url", code="url_not_allowed") from None
        except TimeoutError:
            raise InvalidRequest(f"url: the host of {url!r} did not resolve within {limits.timeout_s}s", param="url",
                                 code="url_not_allowed") from None
        return url

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except TooManyEndpoints as exc:
            raise InvalidRequest(str(exc), code="too_many_webhook_endpoints") from None
        except ValueError as exc:  # the store's validation: "field: what is wrong; allowed: ..."
            match = _PARAM_PREFIX.match(str(exc))
            raise InvalidRequest(str(exc), param=match.group(1) if match else None) from None

    def not_found(endpoint_id: str) -> NotFound:
        return NotFound(f"webhook endpoint {endpoint_id!r} not found", param="webhook_endpoint_id")

    async def found(who: str, endpoint_id: str) -> Endpoint:
        endpoint = await call(store_of().get, who, endpoint_id)
        if endpoint is None:
            raise not_found(endpoint_id)
        return endpoint

    @app.post("/v1/webhook_endpoints", response_model=WebhookEndpointWithSecret, responses=_RESPONSES,
              summary="Create a webhook endpoint", operation_id="createWebhookEndpoint")
    async def create_endpoint(body: CreateWebhookEndpointRequest, request: Request) -> dict[str, Any]:
        who = await account(request)
        url = await checked_url(body.url)
        endpoint = await call(store_of().create, who, url=url, event_types=body.event_types, name=body.name,
                              max_endpoints=limits.max_endpoints_per_account)
        return endpoint.to_openai(with_secret=True)

    @app.get("/v1/webhook_endpoints", response_model=WebhookEndpointList, responses=_RESPONSES,
             summary="List webhook endpoints", operation_id="listWebhookEndpoints")
    async def list_endpoints(
        request: Request,
        after: str | None = Query(None, max_length=256, description="Id of the last endpoint of the previous page."),
        limit: int = Query(20, ge=1, le=100, description="Endpoints per page."),
    ) -> dict[str, Any]:
        who = await account(request)
        try:
            endpoints, has_more = await run_in_threadpool(store_of().list, who, after=after, limit=limit)
        except ValueError as exc:  # an `after` id that does not exist (for this caller)
            raise NotFound(str(exc), param="after") from None
        data = [e.to_openai() for e in endpoints]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    @app.get("/v1/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointObject,
             responses=_RESPONSES, summary="Retrieve a webhook endpoint", operation_id="retrieveWebhookEndpoint")
    async def retrieve_endpoint(webhook_endpoint_id: str, request: Request) -> dict[str, Any]:
        return (await found(await account(request), webhook_endpoint_id)).to_openai()

    @app.post("/v1/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointObject,
              responses=_RESPONSES, summary="Update a webhook endpoint", operation_id="updateWebhookEndpoint")
    async def update_endpoint(
        webhook_endpoint_id: str, body: UpdateWebhookEndpointRequest, request: Request
    ) -> dict[str, Any]:
        who = await account(request)
        await found(who, webhook_endpoint_id)  # 404 before a URL check can say anything about it
        url = await checked_url(body.url) if body.url is not None else None
        endpoint = await call(store_of().update, who, webhook_endpoint_id, url=url, event_types=body.event_types,
                              name=body.name, status=body.status)
        if endpoint is None:
            raise not_found(webhook_endpoint_id)
        return endpoint.to_openai()

    @app.delete("/v1/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointDeleted,
                responses=_RESPONSES, summary="Delete a webhook endpoint and its pending deliveries",
                operation_id="deleteWebhookEndpoint")
    async def delete_endpoint(webhook_endpoint_id: str, request: Request) -> dict[str, Any]:
        if not await call(store_of().delete, await account(request), webhook_endpoint_id):
            raise not_found(webhook_endpoint_id)
        return {"id": webhook_endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}

    @app.post("/v1/webhook_endpoints/{webhook_endpoint_id}/rotate_secret", response_model=WebhookEndpointWithSecret,
              responses=_RESPONSES, summary="Replace an endpoint's signing secret",
              operation_id="rotateWebhookEndpointSecret")
    async def rotate_secret(
        webhook_endpoint_id: str, request: Request, body: RotateSecretRequest | None = None
    ) -> dict[str, Any]:
        who = await account(request)
        if body is not None and body.keep_old_secret_active_for_24_hours:
            await found(who, webhook_endpoint_id)
            raise InvalidRequest(
                "keep_old_secret_active_for_24_hours: true is not supported by this farm; the new secret replaces "
                "the old one at once (allowed: false)", param="keep_old_secret_active_for_24_hours",
                code="unsupported_parameter",
            )
        endpoint = await call(store_of().rotate_secret, who, webhook_endpoint_id)
        if endpoint is None:
            raise not_found(webhook_endpoint_id)
        return endpoint.to_openai(with_secret=True)

    @app.post("/v1/webhook_endpoints/{webhook_endpoint_id}/test", response_model=WebhookEndpointTestResult,
              responses=_RESPONSES, summary="Send a signed sample event to an endpoint now",
              operation_id="testWebhookEndpoint")
    async def test_endpoint(
        webhook_endpoint_id: str, body: TestWebhookEndpointRequest, request: Request
    ) -> dict[str, Any]:
        endpoint = await found(await account(request), webhook_endpoint_id)
        now = utcnow()
        event_id = f"evt_test_{uuid.uuid4().hex}"
        # A sample: its video id names no real video.
        payload = payload_json(event_id=event_id, event_type=body.event_type, video_id="video_test", created_at=now)
        async with new_client(limits) as client:
            outcome = await send_signed(client, guard, url=endpoint.url, secret=endpoint.secret, event_id=event_id,
                                        payload=payload, settings=limits, timestamp=unix(now))
        if outcome.status_code is None:
            raise InvalidRequest(f"url: the test delivery to {endpoint.url!r} failed: {outcome.error}", param="url",
                                 code="webhook_test_failed")
        return {"object": "webhook_endpoint.test", "webhook_endpoint_id": endpoint.id,
                "event_type": body.event_type, "status_code": outcome.status_code, "success": True}
