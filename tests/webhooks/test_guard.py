"""The SSRF guard: refused destinations, the operator allowlist, pinned connections, redirects."""

from __future__ import annotations

import asyncio
import ipaddress

import pydantic
import pytest

from farm.webhooks.deliverer import new_client, send_signed
from farm.webhooks.guard import UrlGuard, UrlRefused, forbidden_reason, pinned_request
from farm.webhooks.settings import WebhookSettings
from farm.webhooks.signing import generate_secret, verify

REFUSED = [
    "http://127.0.0.1/hook",            # loopback
    "http://127.1.2.3:8080/",
    "http://localhost/hook",            # the name, never asked of DNS
    "http://api.localhost/",
    "http://[::1]/",
    "http://10.0.0.1/",                 # RFC 1918
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",               # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data/",  # link-local: cloud metadata
    "http://[fe80::1]/",
    "http://[fec0::1]/",  # site-local: is_global is True for it in Python 3.11
    "http://[fd00::1]/",                # unique local
    "http://0.0.0.0/",                  # unspecified
    "http://[::]/",
    "http://224.0.0.1/",                # multicast
    "http://[ff02::1]/",
    "http://240.0.0.1/",                # reserved
    "http://[::ffff:127.0.0.1]/",       # IPv4-mapped loopback
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a00:1]/",         # NAT64 of 10.0.0.1
    "http://[2002:a9fe:a9fe::]/",       # 6to4 of 169.254.169.254
    "http://2130706433/",               # 127.0.0.1 as one decimal number (the resolver accepts it)
    "http://0x7f000001/",               # ... and in hex
    "http://0177.0.0.1/",               # ... and in octal
    "ftp://8.8.8.8/",                   # scheme
    "file:///etc/passwd",
    "gopher://8.8.8.8/",
    "http://user:pw@8.8.8.8/",          # credentials
    "http://8.8.8.8@127.0.0.1/",
    "http://8.8.8.8:0/",                # port
    "http://8.8.8.8:70000/",
    "http://8.8.8.8/a b",               # whitespace
    "not a url",
]


def resolve(guard: UrlGuard, url: str):
    return asyncio.run(guard.resolve(url))


@pytest.mark.parametrize("url", REFUSED)
def test_refused_without_allowlist(url: str) -> None:
    with pytest.raises(UrlRefused):
        resolve(UrlGuard(), url)


@pytest.mark.parametrize("url", ["http://8.8.8.8/hook", "https://1.1.1.1:8443/x?y=1", "https://[2606:4700::1111]/"])
def test_public_addresses_pass(url: str) -> None:
    target = resolve(UrlGuard(), url)
    assert str(target.ip) in url.replace("[", "").replace("]", "")


def test_reasons_name_the_kind_of_address() -> None:
    assert forbidden_reason(ipaddress.ip_address("169.254.169.254")).startswith("link-local")
    assert forbidden_reason(ipaddress.ip_address("10.1.2.3")) == "private"
    assert "embeds 127.0.0.1" in forbidden_reason(ipaddress.ip_address("::ffff:127.0.0.1"))
    with pytest.raises(UrlRefused, match=r"169\.254\.169\.254 is not allowed \(link-local"):
        resolve(UrlGuard(), "http://169.254.169.254/")


def test_allowlist_admits_exactly_what_it_names() -> None:
    guard = UrlGuard(["127.0.0.0/8"])
    assert str(resolve(guard, "http://127.0.0.1:9/hook").ip) == "127.0.0.1"
    assert str(resolve(guard, "http://127.9.9.9/").ip) == "127.9.9.9"
    assert str(resolve(guard, "http://localhost:9/").ip) == "127.0.0.1"  # its ::1 is not allowlisted, skipped
    for url in ("http://[::1]/", "http://10.0.0.1/", "http://169.254.169.254/", "http://user:pw@127.0.0.1/"):
        with pytest.raises(UrlRefused):
            resolve(guard, url)
    by_name = UrlGuard(["localhost"])
    assert str(resolve(by_name, "http://LOCALHOST./").ip) == "127.0.0.1"
    with pytest.raises(UrlRefused):
        resolve(by_name, "http://127.0.0.1/")  # the name is allowed, not its address
    wildcard = UrlGuard(["*.localhost", "10.0.0.0/8"])
    assert str(resolve(wildcard, "http://hooks.localhost/").ip) == "127.0.0.1"
    assert str(resolve(wildcard, "http://10.2.3.4/").ip) == "10.2.3.4"


def test_settings_reject_bad_allowlist_entries() -> None:
    assert WebhookSettings(allow_hosts=["127.0.0.0/8", "fd00::/8", "hooks.internal", "*.corp.example"])
    for bad in ("", "http://x/", "10.0.0.0/33", "a b"):
        with pytest.raises(pydantic.ValidationError, match="allow_hosts"):
            WebhookSettings(allow_hosts=[bad])
    with pytest.raises(pydantic.ValidationError, match="backoff_cap_s"):
        WebhookSettings(backoff_base_s=10, backoff_cap_s=1)
    with pytest.raises(pydantic.ValidationError):
        WebhookSettings(unknown=1)


def test_requests_go_to_the_checked_ip_with_the_original_host_and_sni() -> None:
    guard = UrlGuard(["localhost"])
    settings = WebhookSettings()

    async def build():
        target = await guard.resolve("https://localhost:8443/hook?x=1")
        async with new_client(settings) as client:
            return target, pinned_request(client, "POST", target, content=b"{}", headers={"a": "b"})

    target, request = asyncio.run(build())
    assert str(request.url) == "https://127.0.0.1:8443/hook?x=1"
    assert request.headers["host"] == "localhost:8443"
    assert request.extensions["sni_hostname"] == "localhost"
    assert target.extensions == {"sni_hostname": "localhost"}


def test_delivery_names_the_host_but_connects_to_the_checked_ip(make_receiver) -> None:
    receiver = make_receiver()
    settings = WebhookSettings(allow_hosts=["localhost"], timeout_s=5)
    outcome = _send(settings, f"http://localhost:{receiver.port}/hook")
    assert outcome.status_code == 200
    assert receiver.requests[0].host == f"localhost:{receiver.port}"


def _send(settings: WebhookSettings, url: str, secret: str = "whsec_" + "A" * 44):
    async def send():
        async with new_client(settings) as client:
            return await send_signed(client, UrlGuard.from_settings(settings), url=url, secret=secret,
                                     event_id="evt_1", payload='{"x":1}', settings=settings, timestamp=0)

    return asyncio.run(send())


@pytest.mark.parametrize("location", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "listener"])
def test_redirects_to_refused_addresses_are_not_followed(make_receiver, location: str) -> None:
    """The receiver is allowlisted (127.0.0.1 only); where it redirects to is checked afresh."""
    allowed = make_receiver("127.0.0.1")
    elsewhere = make_receiver("127.0.0.2")  # loopback too, but outside the allowlist: a real listener
    if location == "listener":
        location = elsewhere.url("/stolen")
    allowed.default = ("redirect", location, 307)
    settings = WebhookSettings(allow_hosts=["127.0.0.1/32"], timeout_s=5)
    outcome = _send(settings, allowed.url())
    assert outcome.status_code is None and outcome.error.startswith("destination refused")
    assert len(allowed.requests) == 1
    assert elsewhere.requests == []


def test_allowed_redirects_are_followed_with_the_same_signed_body(make_receiver) -> None:
    first, second = make_receiver(), make_receiver()
    first.default = ("redirect", second.url("/moved"), 308)
    settings = WebhookSettings(allow_hosts=["127.0.0.0/8"], timeout_s=5)
    secret = generate_secret()
    outcome = _send(settings, first.url(), secret)
    assert outcome.status_code == 200
    got = second.requests[0]
    assert got.path == "/moved" and got.body == first.requests[0].body
    verify(secret, got.headers, got.body, now=0)


def test_redirect_loops_stop_after_max_redirects(make_receiver) -> None:
    loop = make_receiver()
    loop.default = ("redirect", "/again", 302)
    settings = WebhookSettings(allow_hosts=["127.0.0.0/8"], timeout_s=5, max_redirects=2)
    outcome = _send(settings, loop.url())
    assert outcome.status_code == 302 and "more than 2 redirects" in outcome.error
    assert len(loop.requests) == 3
