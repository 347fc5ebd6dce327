"""Who is calling, and how often: API keys, the admin key, per-key rate limits.

Keys arrive as ``Authorization: Bearer <key>``, as the ``openai`` SDK sends them. Tenant keys
are looked up on every request (a revoked key stops at once); the admin key is compared in
constant time. Rate limits are a moving window per key (the ``limits`` library), kept in
each gateway replica's memory: with N gateway replicas a key gets at most N times its limit,
which is why local deployments run one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from farm.accounts import keys
from farm.accounts.store import AccountStore, Principal
from farm.api.errors import APIError, RateLimited

# Unauthenticated routes (redeeming an invite) are limited per client address instead.
ANONYMOUS_RATE_LIMIT = "30/minute"


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
    _limit: RateLimitItem = field(init=False, repr=False)
    _anonymous: RateLimitItem = field(init=False, repr=False)
    _limiter: MovingWindowRateLimiter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._limit, self._anonymous = parse(self.rate_limit), parse(ANONYMOUS_RATE_LIMIT)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def tenant(self, request: Request) -> Principal:
        """The caller's account and key, after its rate limit; 401 or 429 otherwise."""
        secret = _bearer(request)
        principal = await run_in_threadpool(self.accounts.authenticate, secret)
        if principal is None:
            raise Unauthorized(f"Incorrect API key provided: {keys.hint(secret)}. Keys are issued by redeeming an "
                               "invite (POST /v1/invites/redeem); revoked keys stop working at once")
        self._spend(request, self._limit, f"key:{principal.key_id}")
        return principal

    def admin(self, request: Request) -> None:
        if not keys.same(_bearer(request), self.admin_key):
            raise Unauthorized("this route needs the operator's admin key")

    def anonymous(self, request: Request) -> None:
        """Rate-limit an unauthenticated route by client address."""
        host = request.client.host if request.client else "unknown"
        self._spend(request, self._anonymous, f"ip:{host}")

    def _spend(self, request: Request, limit: RateLimitItem, bucket: str) -> None:
        allowed = self._limiter.hit(limit, bucket)
        stats = self._limiter.get_window_stats(limit, bucket)
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
