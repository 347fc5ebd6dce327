"""The webhook deliverer: fans events out into deliveries and sends the due ones, signed.

One loop per farm (beside the dispatcher; several are safe, since ``due`` claims rows under a
lease). Each pass: fan out new events, claim due deliveries, POST them concurrently (at most
``concurrency`` in flight), then record each outcome. A 2xx response delivers; anything else
(another status, a timeout, a refused destination) schedules a retry with exponential backoff
and jitter, until ``max_attempts``, then the delivery is ``failed``.

Every attempt resolves the destination through the SSRF guard and connects to the checked
address; redirects are followed by hand (re-POSTing the same signed body) and each hop is
checked again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from farm import __version__
from farm.db import utcnow
from farm.webhooks.guard import UrlGuard, UrlRefused, pinned_request
from farm.webhooks.settings import WebhookSettings
from farm.webhooks.signing import sign_headers

if TYPE_CHECKING:
    from farm.jobs.store import JobStore
    from farm.webhooks.store import DueDelivery, WebhookStore

log = logging.getLogger(__name__)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Extra lease beyond one attempt's deadline before a claimed delivery comes due again.
_LEASE_MARGIN_S = 30.0
USER_AGENT = f"videofarm-webhooks/{__version__}"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one attempt got: a status code, or an error and no code."""

    status_code: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def backoff_s(attempt: int, *, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Delay after failed attempt number ``attempt`` (1-based): "equal jitter" backoff.

    Half of ``min(cap, base * 2**(attempt-1))`` plus a random part up to the other half:
    jitter spreads the retries of many deliveries that failed together (an endpoint outage),
    and each delay is at least the previous one's ceiling's half, so the schedule still grows.
    """
    ceiling = min(cap_s, base_s * 2 ** min(attempt - 1, 62))
    return ceiling / 2 + rand() * ceiling / 2


def new_client(settings: WebhookSettings) -> httpx.AsyncClient:
    """The HTTP client deliveries use.

    No environment proxies (a proxy would connect to the name, not the checked IP), no
    automatic redirects (each hop must pass the guard), and no kept-alive connections: a
    pooled TLS connection is keyed by IP, so reusing it for another host name at the same IP
    would skip that name's certificate check.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.timeout_s),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=0),
        headers={"User-Agent": USER_AGENT},
    )


async def send_signed(
    client: httpx.AsyncClient, guard: UrlGuard, *, url: str, secret: str, event_id: str, payload: str,
    settings: WebhookSettings, timestamp: int,
) -> Outcome:
    """One signed POST of ``payload`` to ``url`` through the guard, following redirects by hand."""
    body = payload.encode("utf-8")
    headers = {"Content-Type": "application/json", **sign_headers(secret, event_id, body, timestamp=timestamp)}
    try:
        async with asyncio.timeout(settings.timeout_s):
            current = httpx.URL(url)
            for _hop in range(settings.max_redirects + 1):
                target = await guard.resolve(current)
                response = await client.send(pinned_request(client, "POST", target, content=body, headers=headers),
                                             stream=True)
                await response.aclose()  # only the status matters; never read an unbounded body
                location = response.headers.get("location")
                if response.status_code not in _REDIRECTS or not location:
                    return Outcome(response.status_code)
                current = current.join(location)
            return Outcome(response.status_code, f"more than {settings.max_redirects} redirects")
    except UrlRefused as exc:
        return Outcome(None, f"destination refused: {exc}")
    except TimeoutError:
        return Outcome(None, f"timed out after {settings.timeout_s}s")
    except httpx.InvalidURL as exc:  # e.g. a Location header httpx cannot parse
        return Outcome(None, f"invalid redirect: {exc}")
    except httpx.HTTPError as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class WebhookDeliverer:
    """Drains the webhook outbox: ``await run()`` until ``stop()``; ``run_once()`` for one pass."""

    def __init__(
        self,
        store: WebhookStore,
        jobs: JobStore,
        settings: WebhookSettings | None = None,
        *,
        guard: UrlGuard | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``clock`` (timezone-aware UTC now) and ``rand`` (jitter in [0, 1)) are for tests."""
        self.store = store
        self.jobs = jobs
        self.settings = settings or WebhookSettings()
        self.guard = guard or UrlGuard.from_settings(self.settings)
        self._clock = clock or utcnow
        self._rand = rand
        self._client: httpx.AsyncClient | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Deliver until ``stop()`` (a stopped deliverer stays stopped; build a new one to restart).

        A failing pass (the database down) is logged and retried after ``poll_s``."""
        try:
            while not self._stop.is_set():
                busy = False
                try:
                    busy = await self.run_once() > 0
                except Exception:
                    log.exception("webhook delivery pass failed; retrying in %.1fs", self.settings.poll_s)
                if not busy:
                    await self._sleep(self.settings.poll_s)
        finally:
            await self.aclose()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Look for events now rather than at the next poll (e.g. after a job finished).

        Call it on the deliverer's event loop (``loop.call_soon_threadsafe(d.wake)`` from elsewhere)."""
        self._wake.set()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def run_once(self) -> int:
        """One pass: fan out new events, then send what is due; returns the attempts made."""
        s = self.settings
        await asyncio.to_thread(self.store.fan_out, self.jobs, settle_s=s.settle_s)
        due = await asyncio.to_thread(self.store.due, s.concurrency, lease_s=s.timeout_s + _LEASE_MARGIN_S)
        if not due:
            return 0
        if self._client is None:
            self._client = new_client(s)
        results = await asyncio.gather(*(self._attempt(d) for d in due), return_exceptions=True)
        for d, result in zip(due, results):
            if isinstance(result, BaseException):  # e.g. the database blinked: the lease runs out, it comes due again
                log.error("could not record the attempt of %s: %r", d.id, result)
        return len(due)

    async def _attempt(self, d: DueDelivery) -> None:
        try:
            outcome = await send_signed(
                self._client, self.guard, url=d.url, secret=d.secret, event_id=d.event_id, payload=d.payload,
                settings=self.settings, timestamp=int(self._clock().timestamp()),
            )
        except Exception as exc:  # a bug must cost an attempt, not retry this delivery forever uncounted
            log.exception("sending %s failed unexpectedly", d.id)
            outcome = Outcome(None, f"internal error: {type(exc).__name__}")
        attempt = d.attempts + 1
        if outcome.ok:
            await asyncio.to_thread(self.store.mark_delivered, d.id, status_code=outcome.status_code)
            log.info("delivered %s (%s) to %s on attempt %d", d.event_id, d.event_type, d.endpoint_id, attempt)
            return
        error = outcome.error or f"HTTP {outcome.status_code}"
        if attempt >= self.settings.max_attempts:
            await asyncio.to_thread(self.store.mark_failed, d.id, error=error, status_code=outcome.status_code)
            log.warning("gave up on %s to %s after %d attempts: %s", d.event_id, d.endpoint_id, attempt, error)
            return
        delay = backoff_s(attempt, base_s=self.settings.backoff_base_s, cap_s=self.settings.backoff_cap_s,
                          rand=self._rand)
        next_at = self._clock() + dt.timedelta(seconds=delay)
        await asyncio.to_thread(
            self.store.mark_retry, d.id, next_at=next_at, error=error, status_code=outcome.status_code
        )
        log.info("attempt %d of %s to %s failed (%s); retry in %.1fs", attempt, d.event_id, d.endpoint_id, error, delay)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass
        self._wake.clear()
