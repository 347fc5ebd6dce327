"""A test clock: real time plus an offset a test moves forward (leases expire, retries come due)."""

from __future__ import annotations

import datetime as dt

from farm.db import utcnow


class Clock:
    """Real time plus an offset that a test moves forward (to make retries come due);
    ``freeze()`` stops it, so a test can compare schedules exactly."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()
        self.frozen: dt.datetime | None = None

    def __call__(self) -> dt.datetime:
        return (self.frozen or utcnow()) + self.offset

    def freeze(self) -> None:
        self.frozen = utcnow()

    def advance(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)
