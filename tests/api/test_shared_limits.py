"""Many gateways, one set of rules: rate limits in a real Redis, shared by two gateway replicas."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from farm.api.auth import GatewayAuth
from farm.redis_server import EmbeddedRedis
from tests.api.conftest import ADMIN_KEY, new_tenant
from tests.api.test_gateway import error_of


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """Debian's redis-server on a free loopback port, as `farm up` starts it."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    yield url
    assert server.stop()
    assert server.running() is None


@pytest.fixture
def replicas(make_app, accounts, redis_url):
    """``replicas(**limits)``: two gateway replicas over one database and one Redis; each keeps one
    event loop for its life, as a Serve replica does (the Redis client's connections belong to it)."""
    opened = []

    def make(**limits):
        for _ in range(2):
            client = TestClient(make_app(auth=GatewayAuth(accounts, ADMIN_KEY, limits_url=redis_url, **limits)))
            opened.append(client.__enter__())
        return opened[-2:]

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def test_one_keys_limit_holds_across_two_gateway_replicas(replicas):
    a, b = replicas(rate_limit="6/minute")
    headers = new_tenant(a, "ada")
    answers = [(a if i % 2 else b).get("/v1/videos", headers=headers) for i in range(8)]
    assert [r.status_code for r in answers] == [200] * 6 + [429] * 2  # six in all, whichever replica answered
    err = error_of(answers[-1], 429)
    assert err["code"] == "rate_limit_exceeded"
    assert answers[5].headers["x-ratelimit-remaining-requests"] == "0"
    # Another key has its own window, on either replica.
    other = new_tenant(b, "bob")
    assert a.get("/v1/videos", headers=other).status_code == 200


def test_refused_keys_count_per_address_across_replicas(replicas):
    a, b = replicas(anonymous_rate_limit="4/minute")
    wrong = {"Authorization": "Bearer vf_sk_" + "g" * 43}
    codes = [(a if i % 2 else b).get("/v1/videos", headers=wrong).status_code for i in range(6)]
    assert codes == [401] * 4 + [429] * 2


def test_in_memory_limits_are_per_replica(make_app, accounts):
    """What Redis fixes: with the memory default, each replica counts alone."""
    a, b = (TestClient(make_app(auth=GatewayAuth(accounts, ADMIN_KEY, rate_limit="3/minute"))) for _ in range(2))
    headers = new_tenant(a, "cyd")
    assert [c.get("/v1/videos", headers=headers).status_code for c in (a, a, a, b, b, b)] == [200] * 6


def test_an_unreachable_redis_refuses_with_503_and_admits_nothing(make_app, accounts, jobs, tmp_path):
    server = EmbeddedRedis(tmp_path / "gone")
    url = server.start()
    with TestClient(make_app(auth=GatewayAuth(accounts, ADMIN_KEY, limits_url=url))) as replica:
        headers = new_tenant(replica, "dee")
        server.stop()
        reply = replica.post("/v1/videos", json={"prompt": "a fox"}, headers=headers)
    assert error_of(reply, 503)["code"] == "service_unavailable" and reply.headers["retry-after"] == "1"
    assert jobs.list(limit=5)[0] == []


def test_more_than_one_gateway_needs_shared_limits():
    from pydantic import ValidationError

    from farm.config import ServeSettings

    assert ServeSettings(gateway_replicas=2).shared_limits  # auto: Redis
    assert not ServeSettings().shared_limits
    with pytest.raises(ValidationError, match="rate_limit_store"):
        ServeSettings(gateway_replicas=2, rate_limit_store="memory")
