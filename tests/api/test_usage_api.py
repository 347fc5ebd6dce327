"""``GET /v1/usage``, the ``usage`` field and budgets at the gateway, with tenancy (SQLite and PostgreSQL).

A tenant sees its own seconds only; the operator sets budgets through the admin routes; an
account whose day is spent gets 429 ``budget_exceeded`` on create, until 00:00 UTC.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from farm.jobs.store import JobStore
from farm.sched.budget import BudgetRule
from tests.api.conftest import ADMIN_KEY, new_tenant
from tests.clock import Clock

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
POOL = "wan-tiny:transformer"
BODY = {"model": "wan-tiny", "prompt": "a fox", "size": "128x128", "seconds": "1"}


@pytest.fixture
def db_url(database_url: str) -> str:  # the api fixtures on both backends
    return database_url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jobs(db_url: str, clock: Clock) -> Iterator[JobStore]:
    store = JobStore(db_url, clock=clock)
    store.migrate()
    yield store
    store.close()


@pytest.fixture
def api(make_auth_app) -> Iterator[TestClient]:
    rule = BudgetRule(default_daily_s=None, tiers={"trial": 5.0})
    with TestClient(make_auth_app(budgets=rule)) as c:
        yield c


def _ran(jobs: JobStore, video_id: str, seconds: dict[str, float]) -> None:
    """What the dispatcher records as the video's stages complete."""
    job = jobs.claim_next("dispatcher:t", 600)
    assert job is not None and job.id == video_id
    for stage, s in seconds.items():
        pool = POOL if stage.startswith("shard") else stage
        assert jobs.record_usage(video_id, "dispatcher:t", stage, pool, "cuda:0" if pool != "finish" else "cpu", s)


def test_usage_is_the_callers_own_and_the_video_carries_it(api, jobs):
    alice, bob = new_tenant(api, "alice"), new_tenant(api, "bob")
    video = api.post("/v1/videos", json=BODY, headers=alice).json()
    assert video["usage"] == {"accelerator_seconds": 0, "by_pool": []}
    _ran(jobs, video["id"], {"shard 0-2": 1.5, "shard 2-4": 2.5, "decode": 0.75, "finish": 0.25})

    got = api.get(f"/v1/videos/{video['id']}", headers=alice).json()["usage"]
    assert got == {"accelerator_seconds": 5.0, "by_pool": [
        {"pool": "decode", "device": "cuda", "seconds": 0.75}, {"pool": "finish", "device": "cpu", "seconds": 0.25},
        {"pool": POOL, "device": "cuda", "seconds": 4.0}]}
    assert api.get("/v1/videos", headers=alice).json()["data"][0]["usage"] == got

    mine = api.get("/v1/usage", headers=alice).json()
    today = jobs.now().date().isoformat()
    assert mine["today"]["date"] == today and mine["today"]["accelerator_seconds"] == 5.0
    assert {(r["pool"], r["seconds"]) for r in mine["today"]["by_pool"]} == {("decode", 0.75), ("finish", 0.25),
                                                                             (POOL, 4.0)}
    assert mine["today"]["budget"]["daily_seconds"] is None and not mine["today"]["budget"]["exhausted"]
    assert mine["range"]["accelerator_seconds"] == 5.0

    theirs = api.get("/v1/usage", headers=bob).json()  # bob sees none of alice's seconds
    assert theirs["today"]["accelerator_seconds"] == 0 and theirs["today"]["by_pool"] == []
    assert theirs["range"]["data"] == []
    assert api.get(f"/v1/videos/{video['id']}", headers=bob).status_code == 404
    assert api.get("/v1/usage").status_code == 401


@pytest.mark.parametrize(("query", "param"), [
    ("start_date=yesterday", "start_date"), ("end_date=2026-13-01", "end_date"),
    ("start_date=2026-12-02&end_date=2026-12-01", "end_date"), ("start_date=2024-01-01&end_date=2026-01-01", "end_date"),
])
def test_bad_dates_are_named(api, query, param):
    answer = api.get(f"/v1/usage?{query}", headers=new_tenant(api))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


def test_a_spent_budget_refuses_creates_until_utc_midnight(api, jobs, clock):
    alice, bob = new_tenant(api, "alice"), new_tenant(api, "bob")
    account = api.get("/v1/account", headers=alice).json()["id"]
    video = api.post("/v1/videos", json=BODY, headers=alice).json()
    _ran(jobs, video["id"], {"shard 0-2": 3.0, "decode": 2.0})

    assert api.post(f"/v1/admin/accounts/{account}/budget", json={"tier": "gold"}, headers=ADMIN).json()["error"][
        "param"] == "tier"
    assert api.post(f"/v1/admin/accounts/{account}/budget", json={"tier": "trial"}, headers=alice).status_code == 401
    assert api.post("/v1/admin/accounts/acct_nobody/budget", json={"tier": "trial"}, headers=ADMIN).status_code == 404
    budget = api.post(f"/v1/admin/accounts/{account}/budget", json={"tier": "trial"}, headers=ADMIN).json()
    assert (budget["tier"], budget["daily_seconds"], budget["spent_seconds"], budget["exhausted"]) == (
        "trial", 5.0, 5.0, True)

    refused = api.post("/v1/videos", json=BODY | {"priority": "bulk"}, headers=alice)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "rate_limit_error"
    resets = jobs.budget_status(account, BudgetRule(tiers={"trial": 5.0})).resets_at
    assert "5 accelerator-seconds" in error["message"] and resets.strftime("%Y-%m-%dT00:00:00Z") in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    assert api.post("/v1/videos", json=BODY, headers=bob).status_code == 200  # bob's own day is untouched
    # A replay of an Idempotency-Key still returns its video; a new key is refused.
    replay = api.post("/v1/videos", json=BODY, headers=alice | {"Idempotency-Key": "k1"})
    assert replay.status_code == 429
    api.post(f"/v1/admin/accounts/{account}/budget", json={"daily_seconds": 600}, headers=ADMIN)
    first = api.post("/v1/videos", json=BODY, headers=alice | {"Idempotency-Key": "k1"}).json()
    api.post(f"/v1/admin/accounts/{account}/budget", json={"tier": "trial"}, headers=ADMIN)
    again = api.post("/v1/videos", json=BODY, headers=alice | {"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert api.get("/v1/usage", headers=alice).json()["today"]["budget"]["remaining_seconds"] == 0

    raised = api.post(f"/v1/admin/accounts/{account}/budget", json={"tier": "trial", "daily_seconds": 60},
                      headers=ADMIN).json()
    assert raised["daily_seconds"] == 60 and not raised["exhausted"]
    assert api.post("/v1/videos", json=BODY, headers=alice).status_code == 200
    api.post(f"/v1/admin/accounts/{account}/budget", json={"tier": "trial"}, headers=ADMIN)
    assert api.post("/v1/videos", json=BODY, headers=alice).status_code == 429

    clock.advance((resets - clock()).total_seconds() + 1)  # a new UTC day
    assert api.post("/v1/videos", json=BODY, headers=alice).status_code == 200
    assert api.get("/v1/usage", headers=alice).json()["today"]["accelerator_seconds"] == 0
