"""Debian's ``prometheus`` for tests: on loopback, a free port, its own data folder, given rule files.

    with running_prometheus(tmp, targets=["127.0.0.1:9100"], rule_files=[RULES]) as prom:
        prom.query_range('up', start, end)

A server that cannot start raises :class:`PrometheusError` with its exit status and the tail of
its log; the tests fail with that, never skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.serve.farmkit import free_port

SCRAPE_S = 2  # fast enough to see a short load; Ray's agent refreshes its values every few seconds


class PrometheusError(AssertionError):
    """Prometheus is missing, did not start, or answered an error."""


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log: Path

    def _get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with Prometheus' own error
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float = SCRAPE_S) -> list[dict]:
        """The matrix ``expr`` gives over [start, end]: a list of {metric, values: [[t, "v"], …]}."""
        return self._get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                         step=str(step))["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["activeTargets"]

    def rule_groups(self) -> list[dict]:
        return self._get("/api/v1/rules")["groups"]

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusError("prometheus is not installed: scripts/install-system-packages.sh installs Debian's "
                              "'prometheus' package")
    return found


@contextmanager
def running_prometheus(folder: Path, *, targets: Sequence[str], rule_files: Sequence[Path] = (),
                       ready_s: float = 60.0, config: dict | None = None) -> Iterator[Prometheus]:
    """A Prometheus scraping ``targets`` every SCRAPE_S seconds and evaluating ``rule_files`` as
    often; stopped (SIGTERM, then SIGKILL) afterwards. ``config`` replaces the generated one."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path, log = folder / "prometheus.yml", folder / "prometheus.log"
    config = config if config is not None else {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "videofarm", "static_configs": [{"targets": list(targets)}]}],
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [binary(), f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
            stdout=out, stderr=subprocess.STDOUT, cwd=folder,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(prom, ready_s)
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _wait_ready(prom: Prometheus, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prom.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with status {prom.process.returncode} before it was ready:\n"
                                  f"{prom.log_tail()}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise PrometheusError(f"prometheus was not ready after {timeout:.0f}s:\n{prom.log_tail()}")
