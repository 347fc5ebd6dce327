"""Usage and budgets (farm extensions): the caller's accelerator-seconds, the operator's budgets.

    tenant:    GET /v1/usage?start_date=&end_date=           → today and a range of UTC days, by pool/device
    operator:  GET/POST /v1/admin/accounts/{id}/budget        → an account's tier and daily override

Seconds are what the replicas reported for each completed stage (``farm.jobs.usage``). A
tenant sees only its own account's figures. ``budget_refused`` is the create routes' answer when
``JobStore.create`` raises BudgetExceeded: 429 ``budget_exceeded`` (nothing is created) until the
next 00:00 UTC or a raised budget.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from farm.api.errors import ErrorResponse, InvalidRequest, NotFound, RateLimited
from farm.db import unix
from farm.sched.budget import BudgetRule, BudgetStatus

MAX_RANGE_DAYS = 366


class BudgetUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: str | None = Field(default=None, min_length=1, max_length=64,
                             description="One of the farm's budgets.tiers, or null for none.")
    daily_seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                                        description="Accelerator-seconds per UTC day for this account alone "
                                        "(overrides its tier); null: its tier's, else the farm's default.")


def budget_object(budget: BudgetStatus) -> dict[str, Any]:
    return {"daily_seconds": budget.limit_s, "spent_seconds": round(budget.spent_s, 6),
            "remaining_seconds": None if budget.remaining_s is None else round(budget.remaining_s, 6),
            "exhausted": budget.exhausted, "resets_at": unix(budget.resets_at)}


def budget_refused(budget: BudgetStatus, now: dt.datetime) -> RateLimited:
    """429 ``budget_exceeded``: the account's budget for today is spent; nothing was created."""
    resets = budget.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return RateLimited(
        f"your account's daily accelerator budget is spent: {budget.spent_s:.1f} of {budget.limit_s:g} "
        f"accelerator-seconds used on {budget.day.isoformat()} (UTC); nothing was created. It resets at "
        f"{resets}, or when the operator raises it",
        retry_after_s=(budget.resets_at - now).total_seconds(), code="budget_exceeded")


def _date(name: str, value: str | None, default: dt.date) -> dt.date:
    if value is None:
        return default
    try:
        return dt.date.fromisoformat(value) if len(value) == 10 else _bad(name, value)
    except ValueError:
        return _bad(name, value)


def _bad(name: str, value: str) -> dt.date:
    raise InvalidRequest(f"{name}: {value!r} is not a date; use YYYY-MM-DD (a UTC day)", param=name)


def add_usage_routes(app: FastAPI, store, rule: BudgetRule, *,
                     owner_of: Callable[[Request], Awaitable[str | None]], accounts=None) -> None:
    """``GET /v1/usage``; with ``accounts`` (auth on), the operator's budget routes too."""

    @app.get("/v1/usage", summary="The calling account's accelerator-seconds (farm extension)",
             operation_id="retrieveUsage", tags=["usage"], responses={400: {"model": ErrorResponse}})
    async def usage(
        request: Request,
        start_date: str | None = Query(None, max_length=10, description="First UTC day, YYYY-MM-DD; default today."),
        end_date: str | None = Query(None, max_length=10, description="Last UTC day, YYYY-MM-DD; default today."),
    ) -> dict[str, Any]:
        who = await owner_of(request)
        today = store.now().astimezone(dt.UTC).date()
        start, end = _date("start_date", start_date, today), _date("end_date", end_date, today)
        if end < start:
            raise InvalidRequest(f"end_date: {end} is before start_date {start}", param="end_date")
        if (end - start).days >= MAX_RANGE_DAYS:
            raise InvalidRequest(f"end_date: the range is {(end - start).days + 1} days; allowed: at most "
                                 f"{MAX_RANGE_DAYS}", param="end_date")
        in_range = await run_in_threadpool(store.usage_by_day, who, start, end)
        today_rows = await run_in_threadpool(store.usage_by_day, who, today, today)
        budget = await run_in_threadpool(store.budget_status, who, rule)
        return {
            "object": "usage",
            "today": {"date": today.isoformat(), "accelerator_seconds": _sum(today_rows),
                      "by_pool": [{k: r[k] for k in ("pool", "device", "seconds")} for r in today_rows],
                      "budget": budget_object(budget)},
            "range": {"start_date": start.isoformat(), "end_date": end.isoformat(),
                      "accelerator_seconds": _sum(in_range), "data": in_range},
        }

    if accounts is None:
        return

    async def account_budget(account_id: str) -> dict[str, Any]:
        tier, override = await run_in_threadpool(store.budget_of, account_id)
        budget = await run_in_threadpool(store.budget_status, account_id, rule)
        return {"object": "account.budget", "account_id": account_id, "tier": tier,
                "daily_seconds_override": override, **budget_object(budget)}

    async def known(account_id: str) -> None:
        if await run_in_threadpool(accounts.account, account_id) is None:
            raise NotFound(f"account {account_id!r} not found", param="account_id")

    @app.get("/v1/admin/accounts/{account_id}/budget", summary="An account's daily budget (operator)",
             operation_id="retrieveAccountBudget", tags=["accounts"], responses={404: {"model": ErrorResponse}})
    async def get_budget(account_id: str, request: Request) -> dict[str, Any]:
        await known(account_id)
        return await account_budget(account_id)

    @app.post("/v1/admin/accounts/{account_id}/budget", summary="Set an account's tier and daily budget (operator)",
              operation_id="updateAccountBudget", tags=["accounts"],
              responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def set_budget(account_id: str, body: BudgetUpdate, request: Request) -> dict[str, Any]:
        await known(account_id)
        if body.tier is not None and body.tier not in rule.tiers:
            allowed = ", ".join(sorted(rule.tiers)) or "none configured (budgets.tiers)"
            raise InvalidRequest(f"tier: {body.tier!r} is not a tier of this farm; allowed: {allowed}", param="tier")
        await run_in_threadpool(lambda: store.set_budget(account_id, tier=body.tier,
                                                         daily_seconds=body.daily_seconds))
        return await account_budget(account_id)


def _sum(rows: list[dict]) -> float:
    return round(sum(r["seconds"] for r in rows), 6)
