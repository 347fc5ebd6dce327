"""A CI-sized load run: locust's scenarios (loadtests/locustfile.py) against the session's shared
`farm up` (tests/serve/conftest.py), as one tenant.

The shared farm's per-account queue cap is small, so the creators overload it within seconds.
The run passes when overload is answered with 429 and nothing else went wrong: no 5xx, no
connection error, no timeout, no unexpected status. It prints (and returns, for callers) the sustained create rate,
p99 create and retrieve latency and the number of 429s.

locust runs as a subprocess: it monkey-patches the standard library with gevent on import,
which must not happen inside pytest's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.figures import report as report_figure
from tests.serve.farmkit import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.load]

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
RUN_S = 20  # the cap is reached within seconds; 20 s of overload is plenty to judge
# Enough users to keep the queue at its cap on 2 cores (16 users once saw only 2 creates refused
# in 25 s: too close to none), few enough to leave headroom before the gateway is CPU-starved into
# timeouts (locust shares those cores; 32 users still ran clean, p99 create 1.8 s, on a machine
# loaded by other work).
USERS, SPAWN_RATE = 24, 6


@dataclass
class LoadFigures:
    seconds: float
    creates_ok: int
    creates_per_s: float
    p99_create_ms: float
    p99_retrieve_ms: float
    downloads_ok: int
    too_many_requests: int  # 429s, every route
    creates_refused: int  # of which creates (queue caps)
    server_errors: int  # 5xx
    failures: dict[str, int]  # everything locust counted as failed, by message

    def line(self) -> str:
        return (f"load: {self.seconds:.0f}s, {self.creates_ok} creates ({self.creates_per_s:.2f}/s sustained), "
                f"p99 create {self.p99_create_ms:.0f} ms, p99 retrieve {self.p99_retrieve_ms:.0f} ms, "
                f"{self.downloads_ok} downloads, {self.too_many_requests} × 429 ({self.creates_refused} creates), "
                f"{self.server_errors} × 5xx, "
                f"{sum(self.failures.values())} failures")


def read_figures(report: dict) -> LoadFigures:
    """Figures from the locustfile's JSON report (``VIDEOFARM_LOCUST_REPORT``)."""
    entries, seconds = report["entries"], report["seconds"]

    def ok(name: str) -> int:
        entry = entries.get(name)
        return entry["requests"] - entry["failures"] if entry else 0

    def p99(name: str) -> float:
        return float(entries[name]["p99_ms"]) if name in entries else float("nan")

    failures = {f"{e['method']} {e['name']}: {e['error']}": e["occurrences"] for e in report["errors"]}
    return LoadFigures(
        seconds=seconds, creates_ok=ok("POST /v1/videos"), creates_per_s=ok("POST /v1/videos") / seconds,
        p99_create_ms=p99("POST /v1/videos"), p99_retrieve_ms=p99("GET /v1/videos/{id}"),
        downloads_ok=sum(ok(n) for n in entries if n.startswith("GET /v1/videos/{id}/content") and "[429]" not in n),
        too_many_requests=sum(e["requests"] for n, e in entries.items() if n.endswith("[429]")),
        creates_refused=entries.get("POST /v1/videos [429]", {}).get("requests", 0),
        server_errors=sum(n for message, n in failures.items() if "5xx " in message),  # judge() names them
        failures=failures,
    )


def run_locust(url: str, api_key: str, out: Path, *, users: int = USERS, spawn_rate: int = SPAWN_RATE,
               run_s: int = RUN_S) -> LoadFigures:
    report = out / "locust-report.json"
    # 8 steps (4 shards) a job: the farm renders slower than the creators create on any machine, so
    # the queue cap is reached however fast the gateway answers (with 2 steps a busy gateway let the
    # farm keep up and no create was ever refused).
    env = {**os.environ, "VIDEOFARM_API_KEY": api_key, "VIDEOFARM_TIMEOUT_S": "20", "VIDEOFARM_STEPS": "8",
           "VIDEOFARM_LOCUST_REPORT": str(report)}
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
               "-u", str(users), "-r", str(spawn_rate), "-t", f"{run_s}s", "--stop-timeout", "10",
               "--only-summary", "--loglevel", "WARNING"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=run_s + 90, cwd=ROOT)
    print(done.stderr[-6000:])  # locust's summary tables
    # locust exits 1 when any request failed; the report says which, so read it either way.
    if not report.exists():
        raise AssertionError(f"locust exited {done.returncode} without a report: {done.stderr[-3000:]}")
    return read_figures(json.loads(report.read_text()))


def test_overload_is_answered_with_429_never_5xx_or_timeouts(shared_farm, tmp_path):
    farm = shared_farm
    farm.wait_idle()
    try:
        figures = run_locust(farm.url, farm.new_api_key("load"), tmp_path)
    finally:
        farm.wait_idle()  # what the run left queued renders before the next test
    report_figure(figures.line())
    assert figures.server_errors == 0, figures.failures
    assert not figures.failures, figures.failures  # connection errors, timeouts, unexpected statuses
    assert figures.too_many_requests > 0, "the queue cap was never reached: raise USERS"
    # Overload shows where it should: creates refused at the queue cap, not reads starved.
    assert figures.creates_refused > 0, figures.line()
    assert figures.creates_ok > 0 and figures.downloads_ok > 0, figures.line()
