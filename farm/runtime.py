"""Where a running farm is: ``<state>/farm.json``, written by ``farm up``. Ray-free, for clients."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from farm.config import FarmSettings

RUNTIME_FILE = "farm.json"
SERVE_CONFIG_FILE = "serve-config.yaml"  # the Serve config `farm up` deployed, as applied


@dataclass
class FarmRuntime:
    """What ``farm up`` started, as saved in ``farm.json``."""

    app_name: str
    ray_address: str
    started_ray: bool
    http_url: str
    metrics_url: str | None
    deployment_file: str
    ray_temp_dir: str | None = None  # marks the Ray processes this farm started (and only those)

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / RUNTIME_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> "FarmRuntime | None":
        path = state_dir / RUNTIME_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def healthy(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http_url}/healthz", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def running_farm(settings: "FarmSettings") -> FarmRuntime | None:
    """The farm that is up for this state folder and answering, else None."""
    runtime = FarmRuntime.load(settings.state_dir)
    return runtime if runtime is not None and healthy(runtime.http_url) else None
