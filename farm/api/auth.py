"""Who is calling, and how often: API keys, the admin key, per-key rate limits.

Keys arrive as ``Authorization: Bearer <key>``, as the ``openai`` SDK sends them. A tenant key
found in the store is cached by this replica for ``key_cache_s``; every ``revocation_check_s``
the replica reads the store's revocation version (one small aggregate) and drops its cache when
it moved, so a key revoked anywhere stops working here within ``revocation_check_s`` (at once
when it is revoked through this replica). Unknown keys are never cached. The admin key is
compared in constant time. Rate limits are a moving window per key (the ``limits`` library): in the
replica's memory by default (one gateway replica), or in Redis (``limits_url``) shared by every
replica, so a key's limit holds however many gateways answer it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from farm.accounts import keys
from farm.accounts.store import AccountStore, Principal
from farm.api.errors import APIError, RateLimited, ServiceUnavailable

# Unauthenticated routes (redeeming an invite) are limited per client address instead.
ANONYMOUS_RATE_LIMIT = "30/minute"
# Route templates (as declared, whatever prefix the app is mounted under) by who may call them.
PUBLIC_ROUTES = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ANONYMOUS_ROUTES = frozenset({"/v1/invites/redeem"})
# Unlisted links (farm.api.sharing_routes): no key, a limit per client address of their own, since a
# player's Range requests would exhaust the redemption limit at once. Tokens carry 256 random bits:
# the limit bounds load, not guessing, which is hopeless anyway.
LINK_ROUTES = frozenset({"/v1/shared/{token}", "/v1/shared/{token}/content"})
LINK_RATE_LIMIT = "600/minute"
ADMIN_PREFIX = "/v1/admin/"


class Unauthorized(APIError):
    """401, as OpenAI answers a missing, unknown or revoked key."""

    status_code = 401
    default_code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="videofarm"'})


@dataclass
class GatewayAuth:
    accounts: AccountStore
    admin_key: str
    rate_limit: str = "1200/minute"
    anonymous_rate_limit: str = ANONYMOUS_RATE_LIMIT  # per address: invite redemptions, refused keys
    link_rate_limit: str = LINK_RATE_LIMIT  # per address: the unlisted-link routes
    # redis://…: rate windows shared by every replica; None: this replica's memory.
    limits_url: str | None = field(default=None, repr=False)
    key_cache_s: float = 30.0  # 0: look every key up on every request
    revocation_check_s: float = 1.0
    max_cached_keys: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _limit: RateLimitItem = field(init=False, repr=False)
    _anonymous: RateLimitItem = field(init=False, repr=False)
    _links: RateLimitItem = field(init=False, repr=False)
    _limiter: MovingWindowRateLimiter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._limit, self._anonymous = parse(self.rate_limit), parse(self.anonymous_rate_limit)
        self._links = parse(self.link_rate_limit)
        if self.limits_url is None:
            storage = MemoryStorage()
        else:  # async I/O on the event loop, never a blocking call there
            from redis.asyncio import BlockingConnectionPool

            url = self.limits_url.removeprefix("async+")
            # A bounded pool that makes a burst wait its turn for a connection (a plain pool
            # fails the request past its size).
            pool = BlockingConnectionPool.from_url(url, max_connections=128, timeout=10)
            storage = RedisStorage("async+" + url, implementation="redispy", key_prefix="videofarm",
                                   connection_pool=pool)
        self._limiter = MovingWindowRateLimiter(storage)
        if self.key_cache_s < 0 or self.revocation_check_s < 0:
            raise ValueError("GatewayAuth: key_cache_s and revocation_check_s must be >= 0")
        # digest of the secret -> (principal, cached at); touched only on the event loop.
        self._keys: dict[str, tuple[Principal, float]] = {}
        self._version: tuple | None = None
        self._checked_at = float("-inf")

    async def _principal(self, secret: str) -> Principal | None:
        """The key's principal: from this replica's cache while it is fresh and no key was revoked."""
        if self.key_cache_s <= 0:
            return await run_in_threadpool(self.accounts.authenticate, secret)
        now = self.clock()
        if now - self._checked_at >= self.revocation_check_s:
            self._checked_at = now  # first: concurrent requests do not all read it
            version = await run_in_threadpool(self.accounts.revocation_version)
            if version != self._version:
                self._keys.clear()
                self._version = version
        digest = keys.digest(secret)
        cached = self._keys.get(digest)
        if cached is not None and now - cached[1] < self.key_cache_s:
            return cached[0]
        principal = await run_in_threadpool(self.accounts.authenticate, secret)
        if principal is not None:
            if len(self._keys) >= self.max_cached_keys:
                self._keys.pop(next(iter(self._keys)))  # the oldest entry
            self._keys[digest] = (principal, now)
        return principal

    def forget_keys(self) -> None:
        """Drop every cached key now (a key was revoked through this replica)."""
        self._keys.clear()

    async def tenant(self, request: Request) -> Principal:
        """The caller's account and key, after its rate limit; 401 or 429 otherwise."""
        try:
            secret = _bearer(request)
            principal = await self._principal(secret)
        except Unauthorized:
            await self._failed(request)
            raise
        if principal is None:
            await self._failed(request)
            raise Unauthorized(f"Incorrect API key provided: {keys.hint(secret)}. Keys are issued by redeeming an "
                               "invite (POST /v1/invites/redeem); revoked keys stop working")
        await self._spend(request, self._limit, f"key:{principal.key_id}")
        return principal

    async def admin(self, request: Request) -> None:
        try:
            given = _bearer(request)
        except Unauthorized:
            await self._failed(request)
            raise
        if not keys.same(given, self.admin_key):
            await self._failed(request)
            raise Unauthorized("this route needs the operator's admin key")

    async def _failed(self, request: Request) -> None:
        """Refused keys count against the caller's address: guessing costs a lookup each, so it is limited."""
        host = request.client.host if request.client else "unknown"
        await self._spend(request, self._anonymous, f"refused:{host}")

    async def anonymous(self, request: Request) -> None:
        """Rate-limit an unauthenticated route by client address."""
        host = request.client.host if request.client else "unknown"
        await self._spend(request, self._anonymous, f"ip:{host}")

    async def link(self, request: Request) -> None:
        """Rate-limit an unlisted-link request by client address (no key is read)."""
        host = request.client.host if request.client else "unknown"
        await self._spend(request, self._links, f"link:{host}")

    async def _spend(self, request: Request, limit: RateLimitItem, bucket: str) -> None:
        try:
            allowed = await self._limiter.hit(limit, bucket)
            stats = await self._limiter.get_window_stats(limit, bucket)
        except Exception as exc:  # the shared store (Redis) is down: refuse rather than run unlimited
            raise ServiceUnavailable(f"the rate-limit store did not answer ({type(exc).__name__}); retry later",
                                     headers={"Retry-After": "1"}) from None
        reset_s = max(stats.reset_time - time.time(), 0.0)
        # OpenAI's header names; reset is a duration ("12s"), as theirs is.
        headers = {
            "x-ratelimit-limit-requests": str(limit.amount),
            "x-ratelimit-remaining-requests": str(stats.remaining),
            "x-ratelimit-reset-requests": f"{math.ceil(reset_s)}s",
        }
        request.state.response_headers = headers
        if not allowed:
            raise RateLimited(
                f"rate limit reached: {limit.amount} requests per {limit.get_expiry()} s for this key; "
                f"retry after {math.ceil(reset_s)} s", retry_after_s=reset_s, code="rate_limit_exceeded",
                headers=headers,
            )


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'; keys are "
                           "issued by redeeming an invite (POST /v1/invites/redeem)")
    return value.strip()


class AuthGate:
    """ASGI middleware: who may call which route, decided before the route reads anything.

    The route is found the way the router finds it (``route.matches``, which strips the app's
    ``root_path``), so a mount prefix cannot make a tenant route look like another; a request
    with no key learns nothing about its parameters (no 400 before the 401). The principal goes
    into ``request.state.principal`` for the routes.
    """

    def __init__(self, app: ASGIApp, auth: GatewayAuth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        template = _route_template(scope)
        if template is not None and template not in PUBLIC_ROUTES:
            request = Request(scope)
            try:
                if template in ANONYMOUS_ROUTES:
                    await self.auth.anonymous(request)
                elif template in LINK_ROUTES:
                    await self.auth.link(request)
                elif template.startswith(ADMIN_PREFIX):
                    await self.auth.admin(request)
                else:
                    request.state.principal = await self.auth.tenant(request)
            except APIError as exc:
                from starlette.responses import JSONResponse

                response = JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers or None)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _route_template(scope: Scope) -> str | None:
    """The declared path of the route this request goes to (None: no route, a 404)."""
    app = scope.get("app")
    partial = None
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", None)
        if match == Match.PARTIAL and partial is None:  # right path, other method: a 405 still needs a key
            partial = getattr(route, "path", None)
    return partial
