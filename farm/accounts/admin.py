"""The operator's admin key: from ``FARM_ADMIN_KEY``, else settings (``auth.admin_key``),
else one generated once for the whole farm and kept in its database (``farm.secrets``), with a
copy under each node's state folder (0600) for the `farm` CLI there.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

from farm import env
from farm.accounts import keys

if TYPE_CHECKING:
    from farm.secrets import SharedSecrets

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


def resolve_admin_key(state_dir: Path, configured: str | None, shared: SharedSecrets | None = None) -> str:
    """The key the gateway accepts on /v1/admin routes. Without one set, the farm's generated key:
    from ``shared`` (every node the same; this node's copy written to match), else this node's file."""
    chosen = env.admin_key() or configured
    if chosen:
        if len(chosen) < 24:
            raise ValueError("auth.admin_key: must be at least 24 characters of random text")
        return chosen
    if shared is None:
        ensure_admin_key_file(state_dir)
        return read_admin_key(state_dir)
    path = Path(state_dir) / ADMIN_KEY_FILE
    local = path.read_text().strip() if path.is_file() else None
    # A farm started before keys were shared keeps the key its operator already has.
    key = shared.get_or_create(ADMIN_KEY_FILE, lambda: (local or keys.new_secret(keys.ADMIN_KEY_PREFIX)).encode())
    key = key.decode()
    if local != key:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        os.replace(path.with_suffix(".tmp"), path)
    return key
