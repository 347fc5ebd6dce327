"""Which failures are worth another try, and for how long.

Three kinds of failure reach the dispatcher, each with its own budget:

- **a lost replica** (:class:`ReplicaLost`: its process died or Serve cannot reach it) — the
  work is redone from the state the call started with, on whichever replica Serve picks,
  up to ``replica_retries`` times with exponential backoff;
- **a render error** (:data:`RENDER_ERRORS`: non-finite latents, out of memory) — retried up
  to ``shard_retries`` times, then the job fails with the error's code;
- **storage unreachable** (:func:`is_transient_storage_error`) — each storage operation
  retries with backoff until ``storage_retry_s`` seconds have passed, so an S3 outage
  neither fails jobs at once nor uses up the budgets above, and still ends.

Anything else (a bug, a bad request) fails the job at once: trying again would not help.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import tenacity

from farm.storage.s3 import StorageError, StorageUnavailable

if TYPE_CHECKING:
    from farm.config import RenderSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes a healthy store answers while it is starting, overloaded or failing over.
_TRANSIENT_S3_CODES = frozenset(
    {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "500", "502", "503", "504"}
)


class ReplicaLost(Exception):
    """A stage's replica died or could not be reached mid-call; the call did not complete.

    Stage clients raise it in place of their transport's errors (Ray's ``ActorDiedError`` …),
    so the dispatcher's policy does not depend on Ray.
    """


def is_render_error(exc: BaseException) -> bool:
    """A failure of the model itself (NaN latents, out of memory), worth ``shard_retries`` more tries.

    Matched by class name over the exception's MRO, so this module needs no torch, and Ray's
    ``RayTaskError(cls)`` re-raise of a replica's exception (a subclass of ``cls``) matches too.
    """
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "NonFiniteLatents" in names or "OutOfMemoryError" in names


def is_transient_storage_error(exc: BaseException) -> bool:
    """True for S3 being unreachable or briefly unwell; False for answers that will not change
    (missing object, denied, bad request)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # the cause chain: boto3 wraps twice
        seen.add(id(current))
        if isinstance(current, (StorageUnavailable, BotoConnectionError, HTTPClientError)):
            return True
        if isinstance(current, StorageError) and current.code in _TRANSIENT_S3_CODES:
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    shard_retries: int = 2
    replica_retries: int = 6
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    storage_retry_s: float = 120.0
    stage_timeout_s: float = 900.0
    max_attempts: int = 5
    # Called once per transient storage error a storage call meets (retried or not): the metric.
    on_storage_error: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_settings(
        cls, render: "RenderSettings", on_storage_error: Callable[[], None] | None = None
    ) -> "RetryPolicy":
        return cls(
            shard_retries=render.shard_retries,
            replica_retries=render.replica_retries,
            backoff_s=render.retry_backoff_s,
            backoff_max_s=render.retry_backoff_max_s,
            storage_retry_s=render.storage_retry_s,
            stage_timeout_s=render.stage_timeout_s,
            max_attempts=render.max_attempts,
            on_storage_error=on_storage_error,
        )

    def delay(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (1-based): doubling, capped, with ±25 % jitter
        so jobs that failed together do not retry in lockstep."""
        base = min(self.backoff_s * 2 ** (retry - 1), self.backoff_max_s)
        return base * random.uniform(0.75, 1.25)

    def _storage_retrying(self, what: str, retrying_cls):
        return retrying_cls(
            retry=tenacity.retry_if_exception(is_transient_storage_error),
            stop=tenacity.stop_after_delay(self.storage_retry_s),
            wait=tenacity.wait_exponential_jitter(multiplier=self.backoff_s, max=self.backoff_max_s),
            before_sleep=lambda rs: log.warning(
                "%s: storage unreachable (try %d, %.0fs so far): %s",
                what, rs.attempt_number, rs.seconds_since_start or 0.0, rs.outcome.exception(),
            ),
            after=lambda _rs: self.on_storage_error() if self.on_storage_error is not None else None,
            reraise=True,  # the caller sees the storage error itself, not tenacity's RetryError
        )

    def storage_call(self, what: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)``, retried while storage is unreachable, for at most ``storage_retry_s``."""
        return self._storage_retrying(what, tenacity.Retrying)(fn, *args, **kwargs)

    async def storage_call_async(self, what: str, fn: Callable[..., Awaitable[T]], *args, **kwargs) -> T:
        """The same for a coroutine function; waits are asyncio sleeps, so cancelling the caller stops them."""
        return await self._storage_retrying(what, tenacity.AsyncRetrying)(fn, *args, **kwargs)
