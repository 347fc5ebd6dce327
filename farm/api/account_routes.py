"""Invite-only onboarding and key management (farm extensions to the OpenAI API).

Who may call which route is decided by the gateway's ``farm.api.auth.AuthGate``, before
any parameter is read:

    operator:  POST /v1/admin/invites          (admin key)  → a single-use, expiring code
    newcomer:  POST /v1/invites/redeem         (no key)     → an account and its first API key
    tenant:    GET/POST /v1/api_keys, DELETE /v1/api_keys/{id}, GET /v1/account
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from farm.accounts.store import MAX_INVITE_TTL_S, InviteRefused, Principal, TooManyKeys
from farm.api.auth import GatewayAuth
from farm.api.errors import Conflict, ErrorResponse, InvalidRequest, NotFound

_NAME = Field(default="default", min_length=1, max_length=255)


class InviteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(default="", max_length=255, description="Who the invite is for (shown to operators only).")
    expires_in: int | None = Field(default=None, ge=60, le=MAX_INVITE_TTL_S,
                                   description="Seconds until the code expires; default: auth.invite_ttl_s.")


class Redeem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=200, description="The invite code (vf_inv_…).")
    account_name: str = Field(default="account", min_length=1, max_length=255)
    key_name: str = _NAME


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = _NAME


def add_account_routes(app: FastAPI, auth: GatewayAuth, invite_ttl_s: int,
                       tenant: Callable[[Request], Awaitable[Principal]]) -> None:
    accounts = auth.accounts

    @app.post("/v1/admin/invites", summary="Create an invite code (operator)", operation_id="createInvite",
              tags=["accounts"], responses={401: {"model": ErrorResponse}})
    async def create_invite(body: InviteCreate, request: Request) -> dict[str, Any]:
        invite, code = await run_in_threadpool(accounts.create_invite, body.note, body.expires_in or invite_ttl_s)
        return invite.to_api(accounts.now()) | {"code": code}

    @app.get("/v1/admin/invites", summary="List invites (operator)", operation_id="listInvites",
             tags=["accounts"], responses={401: {"model": ErrorResponse}})
    async def list_invites(request: Request) -> dict[str, Any]:
        invites = await run_in_threadpool(accounts.list_invites)
        return {"object": "list", "data": [i.to_api(accounts.now()) for i in invites]}

    @app.get("/v1/admin/accounts", summary="List accounts (operator)", operation_id="listAccounts",
             tags=["accounts"], responses={401: {"model": ErrorResponse}})
    async def list_accounts(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [a.to_api() for a in await run_in_threadpool(accounts.list_accounts)]}

    @app.post("/v1/invites/redeem", summary="Redeem an invite: a new account and its first API key",
              operation_id="redeemInvite", tags=["accounts"],
              responses={400: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})
    async def redeem(body: Redeem, request: Request) -> dict[str, Any]:
        try:
            account, key, secret = await run_in_threadpool(accounts.redeem, body.code, body.account_name,
                                                           body.key_name)
        except InviteRefused as exc:
            raise InvalidRequest(str(exc), param="code", code="invalid_invite") from None
        return {"account": account.to_api(), "api_key": key.to_api() | {"key": secret}}

    @app.get("/v1/account", summary="The calling account", operation_id="retrieveAccount", tags=["accounts"])
    async def account(request: Request) -> dict[str, Any]:
        who = await tenant(request)
        info = await run_in_threadpool(accounts.account, who.account_id)
        if info is None:  # the account was removed under a live key
            raise NotFound("account not found")
        return info.to_api() | {"api_key_id": who.key_id}

    @app.get("/v1/api_keys", summary="List this account's API keys", operation_id="listApiKeys", tags=["accounts"])
    async def list_keys(request: Request) -> dict[str, Any]:
        who = await tenant(request)
        return {"object": "list", "data": [k.to_api() for k in await run_in_threadpool(accounts.list_keys,
                                                                                        who.account_id)]}

    @app.post("/v1/api_keys", summary="Create an API key (shown once)", operation_id="createApiKey",
              tags=["accounts"], responses={409: {"model": ErrorResponse}})
    async def create_key(body: KeyCreate, request: Request) -> dict[str, Any]:
        who = await tenant(request)
        try:
            key, secret = await run_in_threadpool(accounts.create_key, who.account_id, body.name)
        except TooManyKeys as exc:
            raise Conflict(str(exc), code="too_many_keys") from None
        return key.to_api() | {"key": secret}

    @app.delete("/v1/api_keys/{key_id}", summary="Revoke an API key (this gateway at once, others within "
                "serve.revocation_check_s)", operation_id="revokeApiKey",
                tags=["accounts"], responses={404: {"model": ErrorResponse}})
    async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
        who = await tenant(request)
        key = await run_in_threadpool(accounts.revoke_key, who.account_id, key_id)
        if key is None:
            raise NotFound(f"api key {key_id!r} not found", param="key_id")
        auth.forget_keys()
        return key.to_api()
