"""The operator's admin key: from ``FARM_ADMIN_KEY``, else settings (``auth.admin_key``),
else a key generated once under the state folder (0600) — what `farm up` uses on one machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from farm import env
from farm.accounts import keys

ADMIN_KEY_FILE = "admin_key"


def read_admin_key(state_dir: Path) -> str:
    """The generated key of a farm's state folder (for the `farm` CLI and tests on that machine)."""
    path = Path(state_dir) / ADMIN_KEY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: start the farm (`farm up`) or set FARM_ADMIN_KEY")
    return path.read_text().strip()


def ensure_admin_key_file(state_dir: Path) -> Path:
    """Generate the state folder's admin key unless it exists (only the owner can read it)."""
    path = Path(state_dir) / ADMIN_KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path
        with os.fdopen(fd, "w") as handle:
            handle.write(keys.new_secret(keys.ADMIN_KEY_PREFIX))
    return path


def resolve_admin_key(state_dir: Path, configured: str | None) -> str:
    """The key the gateway accepts on /v1/admin routes."""
    chosen = env.admin_key() or configured
    if chosen:
        if len(chosen) < 24:
            raise ValueError("auth.admin_key: must be at least 24 characters of random text")
        return chosen
    ensure_admin_key_file(state_dir)
    return read_admin_key(state_dir)
