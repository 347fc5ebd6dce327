"""Shared fixtures: tiny models built once per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

# One torch thread per process: on 2 shared cores more threads are slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from farm.render.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "wan-tiny", experts=1)


@pytest.fixture(scope="session")
def tiny_model_2x_dir(tmp_path_factory):
    from farm.render.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "wan-tiny-2x", experts=2)


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir):
    from farm.render.tiny import tiny_spec

    return tiny_spec(tiny_model_dir, experts=1)


@pytest.fixture(scope="session")
def tiny_spec_2x(tiny_model_2x_dir):
    from farm.render.tiny import tiny_spec

    return tiny_spec(tiny_model_2x_dir, experts=2)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.figures import LINES

    if LINES:
        terminalreporter.section("videofarm figures")
        for line in LINES:
            terminalreporter.write_line(line)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or its own schema on the PostgreSQL server named
    by ``FARM_TEST_POSTGRES_URL`` (``scripts/ci-postgres.sh DIR`` starts one; else skipped)."""
    import sqlalchemy as sa

    from farm import env

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'farm.sqlite3'}"
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
