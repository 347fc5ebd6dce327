"""What bench_baseline.py and bench_preempt.py share: a real farm (`farm up` with its own FARM_HOME on
free ports, the embedded SeaweedFS it starts, an account redeemed through the API), and small helpers.

Nothing here imports ray: each bench decides which Ray its own process talks to, and Ray reads its
environment (auth token, loopback switch) at import.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEPLOYMENT = ROOT / "deployments" / "local.yaml"
# The openai SDK warns on every videos call that OpenAI's hosted Sora API will shut down; the farm serves its own.
warnings.filterwarnings("ignore", message="The Sora API")
APP_SETTINGS_NOTE = "serve.rate_limit and queue caps raised so the bench's own polling is never refused"


class BenchError(Exception):
    """A step of the bench failed; printed as one line, exit status 1."""


def one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())[:600] or type(exc).__name__


# Child processes count from their parent's start.
_T0 = float(os.environ.setdefault("BENCH_T0", str(time.time())))


def log(message: str) -> None:
    """Progress on stderr (a full-size run takes minutes); the figures go to stdout."""
    print(f"[{time.time() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    """The value at rank round(q * (n - 1)) (as bench_farm.py): p50 of 5 values is the median, p95 of 16 the 15th."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def process_env(threads: int) -> dict[str, str]:
    """The same thread budget for every process of every contestant (the farm's Ray workers read
    OMP_NUM_THREADS and FARM_TORCH_THREADS; a bench's own Ray workers inherit these too)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never let `farm` join another Ray
    env.update(OMP_NUM_THREADS=str(threads), FARM_TORCH_THREADS=str(threads), HF_HUB_OFFLINE="1")
    return env


class Farm:
    """One `farm up` in ``home``: the default deployment file with ``overrides`` merged into its
    app settings. Use as a context manager: `farm down` runs on the way out, whatever happened."""

    def __init__(self, home: Path, overrides: dict, *, threads: int, deployment: Path = DEFAULT_DEPLOYMENT) -> None:
        self.home = Path(home)
        self.overrides = overrides
        self.deployment = deployment
        self.env = process_env(threads) | {"FARM_HOME": str(self.home)}
        self.port = free_port()
        self.client = None
        self.app_settings: dict = {}
        self.pools: list[dict] = []

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run([str(Path(sys.executable).parent / "farm"), *args], env=self.env,
                                  capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise BenchError(f"`farm {' '.join(args)}` did not finish in {timeout:.0f}s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise BenchError(f"`farm {' '.join(args)}` failed: {lines[-1] if lines else f'exit {done.returncode}'}")
        return done

    def __enter__(self) -> "Farm":
        from farm.builders import merge_settings

        self.home.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(self.deployment.read_text())
        app = config["applications"][0].setdefault("args", {})
        app["settings"] = merge_settings(app.get("settings") or {}, self.overrides)
        self.app_settings = app["settings"]  # the deployed file's inline settings, overrides merged
        self.pools = self.app_settings.get("serve", {}).get("pools", [])
        written = self.home / "bench-deployment.yaml"
        written.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        log(f"farm up ({self.home.name})")
        try:
            self.cli("up", "--port", str(self.port), "--deployment", str(written))
            code = self.cli("invite", "create", "-q").stdout.strip()
            self.cli("redeem", code, "--name", "bench")
        except BaseException:
            try:
                self.down()  # `farm up` cleans up after itself; this catches an invite or redeem failure
            except BenchError:
                pass
            raise
        import openai

        key = (self.home / "api_key").read_text().strip()
        # No retries: a retried create could make a second job.
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            self.down()
        except BenchError:
            if exc_type is None:
                raise  # else the bench's own failure is the one worth reporting

    def down(self) -> None:
        log(f"farm down ({self.home.name})")
        # `farm down` drains the dispatcher (running jobs go back to the queue) and stops Ray and S3.
        self.cli("down", timeout=300)

    # What the bench reads from the running farm ---------------------------------------------------
    def settings(self):
        """The farm's settings as `farm up` saw them (state folder, models, storage, signer)."""
        from farm.config import load_settings

        path = self.home / "bench-settings.yaml"
        path.write_text(yaml.safe_dump({"state_dir": str(self.home)}))
        return load_settings(path)

    def runtime(self):
        from farm.runtime import FarmRuntime

        runtime = FarmRuntime.load(self.home)
        if runtime is None:
            raise BenchError(f"no farm.json under {self.home}: the farm is not up")
        return runtime

    def pool(self, model: str) -> dict:
        """The deployment file's denoiser pool for ``model`` (replicas, num_cpus)."""
        for pool in self.pools:
            if pool["model"] == model and pool.get("experts", ["transformer"]) == ["transformer"]:
                return {"replicas": pool.get("replicas", 1), "num_cpus": pool.get("num_cpus", 0.25)}
        return {"replicas": 1, "num_cpus": 0.25}  # the farm's defaults when the file names none

    def status(self) -> dict:
        """`farm status --json`: a CLI process of its own (seconds of CPU: call it outside timed windows)."""
        import json

        return json.loads(self.cli("status", "--json", timeout=120).stdout)

    def metric_sums(self, *names: str) -> dict[str, float]:
        """Each Prometheus series of ``names`` summed over its labels, from the farm's metrics endpoint."""
        url = self.runtime().metrics_url
        if not url:
            return {}
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
        except OSError:
            return {}
        sums = dict.fromkeys(names, 0.0)
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+(\S+)", line)
            if match and match.group(1) in sums:
                sums[match.group(1)] += float(match.group(2))
        return sums

    def cpu_seconds(self) -> dict[str, float]:
        """CPU-seconds (user + system) so far of every process this farm started, grouped by what it is
        (a replica's deployment, Ray's daemons, SeaweedFS, Redis): each inherits ``FARM_HOME`` from
        `farm up`. Take it before and after a run: the difference is where the run's CPU went."""
        import psutil

        groups: dict[str, float] = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if proc.pid == os.getpid() or proc.environ().get("FARM_HOME") != str(self.home):
                    continue
                times = proc.cpu_times()
                groups[_group(proc.info["cmdline"] or [])] = groups.get(_group(proc.info["cmdline"] or []), 0.0) \
                    + times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return groups

    # Jobs through the OpenAI SDK, as any client would send them ----------------------------------
    def create(self, *, model: str, prompt: str, size: str, seconds: int, steps: int, seed: int,
               priority: str | None = None):
        """One POST /v1/videos; returns the raw response (headers carry the poll hint)."""
        body = {"steps": steps, "seed": seed} | ({"priority": priority} if priority else {})
        return self.client.videos.with_raw_response.create(
            model=model, prompt=prompt, seconds=str(seconds), size=size, extra_body=body)

    def wait(self, video, poll_s: float, timeout_s: float = 1800):
        """Poll until the video leaves the queue; BenchError unless it completed."""
        deadline = time.monotonic() + timeout_s
        while video.status in ("queued", "in_progress"):
            if time.monotonic() > deadline:
                raise BenchError(f"farm job {video.id} still {video.status} after {timeout_s:.0f}s")
            time.sleep(poll_s)
            video = self.client.videos.retrieve(video.id)
        if video.status != "completed":
            raise BenchError(f"farm job {video.id} ended {video.status}: {video.error}")
        return video


def _group(cmdline: list[str]) -> str:
    """A process's kind for :meth:`Farm.cpu_seconds`: "Decoder" for ``ray::ServeReplica:videofarm:Decoder:1``,
    the executable's name otherwise (raylet, gcs_server, weed, redis-server, python for Ray's agents)."""
    title = " ".join(cmdline)
    if title.startswith("ray::"):
        head = title.split()[0].removeprefix("ray::")
        if head.startswith("ServeReplica:"):
            parts = head.split(":")  # ServeReplica:<app>:<deployment>[:<pool>...]:<method>
            return ":".join(p for p in parts[2:] if not p.isdigit() and "." not in p) or head
        return head.split(".")[0]
    name = Path(cmdline[0]).name if cmdline else "?"
    if name.startswith("python"):
        module = next((a for a in cmdline[1:] if a.endswith(".py") or "." in a and not a.startswith("-")), "")
        return f"python {Path(module).name}" if module else name
    return name


def run_main(main) -> None:
    """House style: a failure is one line on stderr and exit status 1, never a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        print(f"{Path(sys.argv[0]).name}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
