"""Invite-only accounts and API keys, through the real gateway and a real database."""

from __future__ import annotations

import datetime as dt
import hashlib

import sqlalchemy as sa
from fastapi.testclient import TestClient

from farm.accounts.store import AccountStore
from tests.api.conftest import ADMIN_KEY, new_tenant
from tests.api.test_gateway import error_of

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_invite_redeem_gives_an_account_and_a_strong_key(make_auth_app, db_url):
    client = TestClient(make_auth_app())
    invite = client.post("/v1/admin/invites", json={"note": "for ada", "expires_in": 3600}, headers=ADMIN).json()
    assert invite["code"].startswith("vf_inv_") and invite["status"] == "open"
    redeemed = client.post("/v1/invites/redeem", json={"code": invite["code"], "account_name": "ada"}).json()
    key = redeemed["api_key"]["key"]
    assert key.startswith("vf_sk_") and len(key.removeprefix("vf_sk_")) >= 43  # 32 random bytes, base64url
    assert redeemed["account"]["id"].startswith("acct_") and redeemed["account"]["name"] == "ada"
    # Single use: the same code again is refused, and says so without telling which check failed.
    err = error_of(client.post("/v1/invites/redeem", json={"code": invite["code"]}), 400)
    assert err["code"] == "invalid_invite" and err["param"] == "code"
    listed = client.get("/v1/admin/invites", headers=ADMIN).json()["data"]
    assert [i["status"] for i in listed] == ["redeemed"] and listed[0]["account_id"] == redeemed["account"]["id"]
    # Only hashes are stored: neither secret appears anywhere in the database.
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        dump = repr([conn.execute(sa.text(f"SELECT * FROM {t}")).all() for t in ("api_keys", "invites", "accounts")])
    engine.dispose()
    assert key not in dump and invite["code"] not in dump
    assert hashlib.sha256(key.encode()).hexdigest() in dump


def test_expired_and_unknown_invites_are_refused(make_auth_app, db_url, accounts):
    client = TestClient(make_auth_app())
    past = AccountStore(db_url, clock=lambda: dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    _, code = past.create_invite("old", ttl_s=3600)
    assert error_of(client.post("/v1/invites/redeem", json={"code": code}), 400)["code"] == "invalid_invite"
    assert error_of(client.post("/v1/invites/redeem", json={"code": "vf_inv_nope"}), 400)["code"] == "invalid_invite"
    assert accounts.list_accounts() == []


def test_admin_routes_need_the_admin_key(make_auth_app):
    client = TestClient(make_auth_app())
    tenant = new_tenant(client)
    for headers in ({}, tenant, {"Authorization": "Bearer vf_admin_wrong"}, {"Authorization": "Basic abc"}):
        err = error_of(client.post("/v1/admin/invites", json={}, headers=headers), 401)
        assert err["code"] == "invalid_api_key"
    assert client.get("/v1/admin/accounts", headers=ADMIN).status_code == 200


def test_requests_without_a_valid_key_get_401_in_the_openai_shape(make_auth_app):
    client = TestClient(make_auth_app())
    for headers in ({}, {"Authorization": "Bearer vf_sk_unknown"}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
        response = client.post("/v1/videos", json={"prompt": "a"}, headers=headers)
        err = error_of(response, 401)
        assert err["code"] == "invalid_api_key" and response.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/healthz").status_code == 200  # liveness stays public


def test_keys_are_listed_by_id_and_a_revoked_key_stops_at_once(make_auth_app, jobs):
    client = TestClient(make_auth_app())
    first = new_tenant(client, "ada")
    second = client.post("/v1/api_keys", json={"name": "ci"}, headers=first).json()
    assert second["key"].startswith("vf_sk_")
    listed = client.get("/v1/api_keys", headers=first).json()["data"]
    assert [k["name"] for k in listed] == ["default", "ci"]
    assert all("key" not in k and k["hint"].startswith("vf_sk_…") for k in listed)
    ci = {"Authorization": f"Bearer {second['key']}"}
    assert client.post("/v1/videos", json={"prompt": "a"}, headers=ci).status_code == 200
    revoked = client.delete(f"/v1/api_keys/{second['id']}", headers=first).json()
    assert revoked["status"] == "revoked"
    err = error_of(client.post("/v1/videos", json={"prompt": "b"}, headers=ci), 401)
    assert err["code"] == "invalid_api_key"
    assert client.get("/v1/videos", headers=first).json()["data"][0]["prompt"] == "a"  # the other key still works
    assert len(jobs.list(limit=10)[0]) == 1
    # Another account cannot revoke (or see) this account's keys.
    other = new_tenant(client, "bob")
    assert error_of(client.delete(f"/v1/api_keys/{listed[0]['id']}", headers=other), 404)
    assert [k["name"] for k in client.get("/v1/api_keys", headers=other).json()["data"]] == ["default"]


def test_rate_limit_per_key_with_headers(make_auth_app, jobs):
    client = TestClient(make_auth_app(rate_limit="3/minute"))
    ada, bob = new_tenant(client, "ada"), new_tenant(client, "bob")
    remaining = []
    for _ in range(3):
        response = client.get("/v1/videos", headers=ada)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    refused = client.post("/v1/videos", json={"prompt": "a"}, headers=ada)
    err = error_of(refused, 429)
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert jobs.list(limit=10)[0] == []  # refused means nothing was created
    assert client.get("/v1/videos", headers=bob).status_code == 200  # limits are per key


def test_per_account_queue_cap(make_auth_app, jobs):
    client = TestClient(make_auth_app(max_queued_per_account=2, max_queued=100))
    ada, bob = new_tenant(client, "ada"), new_tenant(client, "bob")
    for i in range(2):
        assert client.post("/v1/videos", json={"prompt": f"a{i}"}, headers=ada).status_code == 200
    refused = client.post("/v1/videos", json={"prompt": "a2"}, headers=ada)
    err = error_of(refused, 429)
    assert err["code"] == "account_queue_full" and "your account's" in err["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert client.post("/v1/videos", json={"prompt": "b"}, headers=bob).status_code == 200
    assert len(jobs.list(limit=10)[0]) == 3


def test_prompt_and_body_caps(make_auth_app, jobs):
    client = TestClient(make_auth_app(max_prompt_chars=50, max_body_bytes=4096))
    ada = new_tenant(client)
    err = error_of(client.post("/v1/videos", json={"prompt": "x" * 51}, headers=ada), 400)
    assert err["param"] == "prompt" and "at most 50" in err["message"]
    err = error_of(client.post("/v1/videos", json={"prompt": "x" * 5000}, headers=ada), 413)
    assert "4096" in err["message"]
    assert jobs.list(limit=10)[0] == []


def test_redeem_is_rate_limited_per_client_address(make_auth_app):
    client = TestClient(make_auth_app(anonymous_rate_limit="30/minute"))
    codes = [client.post("/v1/invites/redeem", json={"code": f"vf_inv_guess{i}"}).status_code for i in range(31)]
    assert codes[:30] == [400] * 30 and codes[30] == 429


def test_no_key_gets_401_before_any_parameter_is_read(make_auth_app):
    client = TestClient(make_auth_app())
    for response in (client.get("/v1/videos", params={"limit": "abc"}),
                     client.post("/v1/api_keys", json={"name": 5}),
                     client.post("/v1/admin/invites", json={"note": 5}),
                     client.post("/v1/videos/x/remix", json={})):
        assert error_of(response, 401)["code"] == "invalid_api_key"


def test_the_gate_holds_under_a_mount_prefix(make_auth_app):
    """Routing strips the app's root_path; the gate must judge the same route the router picks."""
    app = make_auth_app()
    plain = TestClient(app)
    tenant = new_tenant(plain)
    mounted = TestClient(app, root_path="/farm")
    err = error_of(mounted.post("/farm/v1/admin/invites", json={}, headers=tenant), 401)
    assert err["code"] == "invalid_api_key"
    assert mounted.get("/farm/healthz").status_code == 200
    assert mounted.post("/farm/v1/invites/redeem", json={"code": "vf_inv_x"}).status_code == 400  # no key needed
    assert mounted.get("/farm/v1/videos", headers=tenant).status_code == 200


def test_no_key_gets_401_even_for_a_malformed_body(make_auth_app):
    client = TestClient(make_auth_app())
    for path in ("/v1/api_keys", "/v1/admin/invites", "/v1/videos", "/v1/webhook_endpoints"):
        response = client.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert error_of(response, 401)["code"] == "invalid_api_key", path


def test_a_chunked_body_over_the_limit_is_a_413(make_auth_app):
    client = TestClient(make_auth_app(max_body_bytes=1024))
    tenant = new_tenant(client)

    def chunks():
        yield b'{"name": "'
        yield b"x" * 4096
        yield b'"}'

    for path in ("/v1/api_keys", "/v1/videos"):
        err = error_of(client.post(path, content=chunks(), headers={**tenant, "content-type": "application/json"}),
                       413)
        assert "1024" in err["message"], path


def test_guessing_keys_is_rate_limited_per_address(make_auth_app):
    client = TestClient(make_auth_app(anonymous_rate_limit="30/minute"))
    statuses = [client.get("/v1/videos", headers={"Authorization": f"Bearer vf_sk_guess{i}"}).status_code
                for i in range(31)]
    assert statuses[:30] == [401] * 30 and statuses[30] == 429


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_cached_and_a_revocation_elsewhere_ends_the_cache_within_the_check_interval(
        make_app, accounts, monkeypatch):
    """Two gateway replicas over one database: each caches the keys it looked up; a key revoked
    through one stops working on the other once that one's revocation check comes due."""
    from farm.api.auth import GatewayAuth

    clock = _Clock()
    replicas = [GatewayAuth(accounts, ADMIN_KEY, key_cache_s=60, revocation_check_s=1.0, clock=clock)
                for _ in range(2)]
    here, there = (TestClient(make_app(auth=a)) for a in replicas)
    lookups = []
    real = accounts.authenticate
    monkeypatch.setattr(accounts, "authenticate", lambda secret: lookups.append(secret) or real(secret))

    owner = new_tenant(here, "ada")
    ci_key = here.post("/v1/api_keys", json={"name": "ci"}, headers=owner).json()
    ci = {"Authorization": f"Bearer {ci_key['key']}"}
    lookups.clear()
    for _ in range(10):
        assert there.get("/v1/videos", headers=ci).status_code == 200
    assert lookups.count(ci_key["key"]) == 1  # looked up once, then served from the cache

    here.delete(f"/v1/api_keys/{ci_key['id']}", headers=owner)  # revoked through the other replica
    clock.now += 0.5
    assert there.get("/v1/videos", headers=ci).status_code == 200  # still cached: its check is not due
    clock.now += 0.6  # past revocation_check_s: the version moved, the cache is dropped
    assert error_of(there.get("/v1/videos", headers=ci), 401)["code"] == "invalid_api_key"
    assert here.get("/v1/videos", headers=owner).status_code == 200  # the owner's other key still works
    # Unknown keys are never cached: each attempt is looked up (and counted against the address).
    lookups.clear()
    for _ in range(3):
        there.get("/v1/videos", headers={"Authorization": "Bearer vf_sk_" + "x" * 43})
    assert len(lookups) == 3


def test_a_key_revoked_through_this_replica_stops_at_once(make_app, accounts):
    from farm.api.auth import GatewayAuth

    client = TestClient(make_app(auth=GatewayAuth(accounts, ADMIN_KEY, key_cache_s=60, revocation_check_s=60)))
    owner = new_tenant(client, "ada")
    ci_key = client.post("/v1/api_keys", json={"name": "ci"}, headers=owner).json()
    ci = {"Authorization": f"Bearer {ci_key['key']}"}
    assert client.get("/v1/videos", headers=ci).status_code == 200
    client.delete(f"/v1/api_keys/{ci_key['id']}", headers=owner)
    assert error_of(client.get("/v1/videos", headers=ci), 401)["code"] == "invalid_api_key"
