"""Job-store fixtures: every test runs on SQLite and on PostgreSQL.

PostgreSQL needs a server: ``export FARM_TEST_POSTGRES_URL=$(scripts/ci-postgres.sh /tmp/pg)``.
Without one the PostgreSQL variants are skipped. Each test gets its own SQLite file,
or its own PostgreSQL schema (selected through the URL's ``search_path``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from farm import env
from farm.jobs.store import JobStore


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """The URL of a fresh, empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
        return
    base = env.postgres_test_url()
    if base is None:
        pytest.skip("no PostgreSQL server: export FARM_TEST_POSTGRES_URL=$(scripts/ci-postgres.sh /tmp/pg)")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(base, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class Clock:
    """Real time plus an offset that a test moves forward, e.g. to expire leases."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)


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
