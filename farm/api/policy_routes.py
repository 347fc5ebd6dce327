"""The protected-name registry over HTTP: the operator's routes and the rights holders' own.

Who may call what (``farm.api.auth.AuthGate`` checks the key before any parameter is read):

    operator (admin key):   POST/GET /v1/admin/protected_names, GET/POST/DELETE /v1/admin/protected_names/{id}
                            POST/GET /v1/admin/rights_holders, DELETE /v1/admin/rights_holders/{account_id}
    rights holder (tenant   POST/GET /v1/protected_names, GET/POST/DELETE /v1/protected_names/{id}
    key, with the role):    works and characters of its own only; other entries answer 404

An account becomes a rights holder when the operator grants it the role under a holder name
(``POST /v1/admin/rights_holders``); other tenants get 403 ``permission_denied`` on the rights-holder
routes. Every change is enforced by this gateway at once and by every other within
``policy.refresh_s`` (``farm.policy.index.RegistryCache``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from farm.accounts.store import Principal
from farm.api.errors import ErrorResponse, Forbidden, InvalidRequest, NotFound
from farm.policy.index import RegistryCache
from farm.policy.registry import (
    MAX_ALIAS_CHARS, MAX_ALIASES, HolderGrant, NotRightsHolder, ProtectedEntry, RegistryError, UnknownAccount,
)

_PARAM = re.compile(r"^([a-z_]+(?:\[\d+\])?):")
_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse}, 403: {"model": ErrorResponse, "description": "Not a rights holder."},
    404: {"model": ErrorResponse, "description": "No such entry for this caller."}}
_ALIASES = Field(default=[], max_length=MAX_ALIASES, description=(
    "Other spellings, in any script (katakana, hiragana, Latin, …), each at most "
    f"{MAX_ALIAS_CHARS} characters. Prompts are folded before matching (width, case, kana, spacing, "
    "punctuation, long-vowel marks), so variants of one spelling need not be listed."))


class ProtectedNameCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["work", "character", "public_figure"] = Field(description="What the name is.")
    name: str = Field(min_length=1, max_length=255, description="The name; matched like an alias.")
    holder: str = Field(default="", max_length=255, description="The rights holder, or who asked for protection.")
    aliases: list[str] = _ALIASES


class HolderNameCreate(BaseModel):
    """A rights holder's entry: the holder is the name the operator granted, not chosen here."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["work", "character"] = Field(description="What the name is.")
    name: str = Field(min_length=1, max_length=255, description="The name; matched like an alias.")
    aliases: list[str] = _ALIASES


class ProtectedNameUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=255, description="A new name.")
    aliases: list[str] | None = Field(default=None, max_length=MAX_ALIASES,
                                      description="The complete new list of aliases.")
    holder: str | None = Field(default=None, max_length=255, description="Operator only: a new holder name.")


class HolderGrantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: str = Field(min_length=1, max_length=64, description="The account that manages the entries.")
    holder: str = Field(min_length=1, max_length=255, description="The rights holder it speaks for.")


def _refused(exc: RegistryError) -> InvalidRequest:
    match = _PARAM.match(str(exc))
    return InvalidRequest(str(exc), param=match.group(1) if match else None)


def _page(entries: list[ProtectedEntry], has_more: bool) -> dict[str, Any]:
    data = [e.to_api() for e in entries]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def add_policy_routes(app: FastAPI, registry: RegistryCache,
                      tenant: Callable[[Request], Awaitable[Principal]]) -> None:
    store = registry.store

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(lambda: fn(*args, **kwargs))
        except RegistryError as exc:
            raise _refused(exc) from None
        except NotRightsHolder as exc:
            raise Forbidden(f"{exc}; the operator grants the role (POST /v1/admin/rights_holders)") from None

    async def changed(result: Any) -> Any:
        registry.invalidate()  # enforced by this gateway from the next create on
        return result

    async def holder_account(request: Request) -> str:
        who = await tenant(request)
        if await run_in_threadpool(store.holder_of, who.account_id) is None:
            raise Forbidden("this account is not a rights holder; the operator grants the role "
                            "(POST /v1/admin/rights_holders)")
        return who.account_id

    def found(entry: ProtectedEntry | None, entry_id: str) -> dict[str, Any]:
        if entry is None:
            raise NotFound(f"protected name {entry_id!r} not found", param="protected_name_id")
        return entry.to_api()

    def deleted(gone: bool, entry_id: str) -> dict[str, Any]:
        if not gone:
            raise NotFound(f"protected name {entry_id!r} not found", param="protected_name_id")
        return {"id": entry_id, "object": "protected_name.deleted", "deleted": True}

    limit_q = Query(100, ge=1, le=1000, description="Entries per page.")
    after_q = Query(None, max_length=64, description="Id of the last entry of the previous page.")

    # -- operator --------------------------------------------------------------------------------

    @app.post("/v1/admin/protected_names", summary="Register a protected name (operator)", tags=["policy"],
              operation_id="createProtectedName", responses=_RESPONSES)
    async def create_name(body: ProtectedNameCreate) -> dict[str, Any]:
        entry = await call(store.create, kind=body.kind, name=body.name, holder=body.holder, aliases=body.aliases)
        return await changed(entry.to_api())

    @app.get("/v1/admin/protected_names", summary="List protected names (operator)", tags=["policy"],
             operation_id="listProtectedNames", responses=_RESPONSES)
    async def list_names(kind: Literal["work", "character", "public_figure"] | None = Query(None),
                         after: str | None = after_q, limit: int = limit_q) -> dict[str, Any]:
        return _page(*await call(store.list, kind=kind, after=after, limit=limit))

    @app.get("/v1/admin/protected_names/{protected_name_id}", summary="Retrieve a protected name (operator)",
             tags=["policy"], operation_id="retrieveProtectedName", responses=_RESPONSES)
    async def get_name(protected_name_id: str) -> dict[str, Any]:
        return found(await call(store.get, protected_name_id), protected_name_id)

    @app.post("/v1/admin/protected_names/{protected_name_id}", summary="Update a protected name (operator)",
              tags=["policy"], operation_id="updateProtectedName", responses=_RESPONSES)
    async def update_name(protected_name_id: str, body: ProtectedNameUpdate) -> dict[str, Any]:
        entry = await call(store.update, protected_name_id, name=body.name, aliases=body.aliases, holder=body.holder)
        return await changed(found(entry, protected_name_id))

    @app.delete("/v1/admin/protected_names/{protected_name_id}", summary="Delete a protected name (operator)",
                tags=["policy"], operation_id="deleteProtectedName", responses=_RESPONSES)
    async def delete_name(protected_name_id: str) -> dict[str, Any]:
        return await changed(deleted(await call(store.delete, protected_name_id), protected_name_id))

    @app.post("/v1/admin/rights_holders", summary="Make an account a rights holder (operator)", tags=["policy"],
              operation_id="grantRightsHolder", responses=_RESPONSES)
    async def grant(body: HolderGrantCreate) -> dict[str, Any]:
        try:
            granted: HolderGrant = await call(store.grant_holder, body.account_id, body.holder)
        except UnknownAccount as exc:
            raise NotFound(str(exc), param="account_id") from None
        return await changed(granted.to_api())

    @app.get("/v1/admin/rights_holders", summary="List rights-holder accounts (operator)", tags=["policy"],
             operation_id="listRightsHolders", responses=_RESPONSES)
    async def list_holders() -> dict[str, Any]:
        return {"object": "list", "data": [g.to_api() for g in await call(store.list_holders)]}

    @app.delete("/v1/admin/rights_holders/{account_id}", summary="Take the rights-holder role away (operator; "
                "its entries stay, managed by the operator)", tags=["policy"], operation_id="revokeRightsHolder",
                responses=_RESPONSES)
    async def revoke(account_id: str) -> dict[str, Any]:
        if not await call(store.revoke_holder, account_id):
            raise NotFound(f"account {account_id!r} is not a rights holder", param="account_id")
        return await changed({"account_id": account_id, "object": "rights_holder.deleted", "deleted": True})

    # -- rights holders: their own works and characters --------------------------------------------

    @app.post("/v1/protected_names", summary="Register a work or character (rights holder)", tags=["policy"],
              operation_id="createOwnProtectedName", responses=_RESPONSES)
    async def create_own(body: HolderNameCreate, request: Request) -> dict[str, Any]:
        account = await holder_account(request)
        entry = await call(store.create, kind=body.kind, name=body.name, aliases=body.aliases, account_id=account)
        return await changed(entry.to_api())

    @app.get("/v1/protected_names", summary="List this rights holder's entries", tags=["policy"],
             operation_id="listOwnProtectedNames", responses=_RESPONSES)
    async def list_own(request: Request, after: str | None = after_q, limit: int = limit_q) -> dict[str, Any]:
        account = await holder_account(request)
        return _page(*await call(store.list, account_id=account, after=after, limit=limit))

    @app.get("/v1/protected_names/{protected_name_id}", summary="Retrieve one of this rights holder's entries",
             tags=["policy"], operation_id="retrieveOwnProtectedName", responses=_RESPONSES)
    async def get_own(protected_name_id: str, request: Request) -> dict[str, Any]:
        account = await holder_account(request)
        return found(await call(store.get, protected_name_id, account_id=account), protected_name_id)

    @app.post("/v1/protected_names/{protected_name_id}", summary="Update one of this rights holder's entries",
              tags=["policy"], operation_id="updateOwnProtectedName", responses=_RESPONSES)
    async def update_own(protected_name_id: str, body: ProtectedNameUpdate, request: Request) -> dict[str, Any]:
        account = await holder_account(request)
        entry = await call(store.update, protected_name_id, name=body.name, aliases=body.aliases,
                           holder=body.holder, account_id=account)
        return await changed(found(entry, protected_name_id))

    @app.delete("/v1/protected_names/{protected_name_id}", summary="Delete one of this rights holder's entries",
                tags=["policy"], operation_id="deleteOwnProtectedName", responses=_RESPONSES)
    async def delete_own(protected_name_id: str, request: Request) -> dict[str, Any]:
        account = await holder_account(request)
        return await changed(deleted(await call(store.delete, protected_name_id, account_id=account),
                                     protected_name_id))
