"""The gateway alone at volume: one replica vs two, creates until the queue cap, 2,000 clients
polling vs streaming, in one run.

Rendering is paused: no dispatcher runs, so jobs stay queued and only the gateway is measured.
Each gateway replica is the farm's own app (``farm.api.app.create_app`` with API keys, the key
cache, the queue view and the event watcher) under uvicorn in a process of its own, as a Serve
replica runs it, over one SQLite job store; with two replicas the rate limits live in a real
Redis (Debian's redis-server, started as `farm up` starts it). Clients are aiohttp, in this
process, spread over the replicas (round robin) as Serve's proxy spreads requests; on a 2-core
machine they compete with the replicas for the cores, so figures are for this machine only.

Runs: 1 replica with no estimates (every poll hint the 500 ms fallback), 1 replica and 2
replicas with measured stage costs (queued jobs get completion estimates, so far-off ones are
told to poll rarely). Phases of each run:
  creates   64 concurrent clients create until the farm's queue cap (--cap) answers 429:
            admitted creates per second of wall time, and the 429s after it.
  polling   --clients clients each retrieve one queued video, wait what openai-poll-after-ms
            says, and again, for --seconds: retrieve p50/p99 and errors; replica CPU-seconds.
  streams   the same clients hold GET /v1/videos/{id}/events open instead for --seconds:
            replica CPU-seconds, against polling's (the events of a queued video that does not
            change are one per view refresh at most; the cost is the watcher's reads).

Usage: python bench/bench_gateway.py [--clients 2000] [--seconds 20] [--cap 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "vf_admin_bench_" + "k" * 32
SERVER = """
import sys, uvicorn
from farm.accounts.store import AccountStore
from farm.api.app import GatewayDeps, create_app
from farm.api.auth import GatewayAuth
from farm.api.queue_view import QueueView
from farm.jobs.estimates import QueueSnapshot
from farm.jobs.store import JobStore
from farm.render.tiny import tiny_spec
import time

from farm.jobs.estimates import ModelCosts

db, port, redis, measured = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[6] == "1"
store = JobStore(db)
# No dispatcher runs: nothing in flight. "measured": stage costs as a farm that has run jobs knows
# them (a 4-step job 6 s, 2 slots), so queued jobs get estimates and far-off ones a long poll hint.
COSTS = {"wan-tiny": ModelCosts(slots=2, encode_s=0.5, step_s=1.0, decode_s=1.0, finish_s=0.5)} if measured else {}

async def paused():
    return QueueSnapshot(time.time(), {}, COSTS)

auth = GatewayAuth(AccountStore(db), sys.argv[4], rate_limit="1000000/minute", limits_url=redis)
deps = GatewayDeps(store=store, objects=lambda: None, models=[tiny_spec("/models/wan-tiny")], auth=auth,
                   max_queued=int(sys.argv[5]), max_queued_per_account=None, poll_after_ms=500,
                   queue=QueueView(store, paused))
uvicorn.run(create_app(deps), host="127.0.0.1", port=port, log_level="error", backlog=4096, limit_concurrency=None)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replicas:
    def __init__(self, n: int, db: str, redis_url: str | None, cap: int, measured: bool) -> None:
        self.ports = [_port() for _ in range(n)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-c", SERVER, db, str(p), redis_url or "", ADMIN_KEY, str(cap),
                                        "1" if measured else "0"],
                                       env=env) for p in self.ports]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        deadline = time.monotonic() + 60
        for port in self.ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("a gateway replica did not start")
                    time.sleep(0.1)

    def cpu_s(self) -> float:
        total = 0.0
        for proc in self.procs:
            times = psutil.Process(proc.pid).cpu_times()
            total += times.user + times.system
        return total

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=15)


def _q(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else float("nan"))


async def _tenant(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.post(f"{url}/v1/admin/invites", json={"note": "bench"}, headers=admin) as reply:
        code = (await reply.json())["code"]
    async with http.post(f"{url}/v1/invites/redeem", json={"code": code, "account_name": "bench"}) as reply:
        return {"Authorization": f"Bearer {(await reply.json())['api_key']['key']}"}


async def creates(http, urls, headers, workers=64) -> tuple[float, int, list[str]]:
    admitted: list[str] = []
    refused = 0
    full = asyncio.Event()

    async def worker(i: int) -> None:
        nonlocal refused
        n = 0
        while not full.is_set():
            url = urls[(i + n) % len(urls)]
            n += 1
            async with http.post(f"{url}/v1/videos", json={"prompt": f"a lantern {i}-{n}", "size": "128x128"},
                                 headers=headers) as reply:
                body = await reply.json()
                if reply.status == 200:
                    admitted.append(body["id"])
                elif reply.status == 429:
                    refused += 1
                    full.set()
                else:
                    raise RuntimeError(f"create answered {reply.status}: {body}")

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    return len(admitted) / (time.perf_counter() - start), refused, admitted


async def polling(http, urls, headers, ids, clients, seconds) -> tuple[list[float], collections.Counter]:
    """Each client polls one video, waiting what openai-poll-after-ms says; returns latencies and
    the errors by kind."""
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        url, video = urls[i % len(urls)], ids[i % len(ids)]  # one replica per client, as behind a proxy
        await asyncio.sleep(i * 0.5 / clients)  # arrivals spread over one poll interval
        while time.monotonic() < stop:
            sent, wait_ms = time.perf_counter(), 500
            try:
                async with http.get(f"{url}/v1/videos/{video}", headers=headers) as reply:
                    await reply.read()
                    if reply.status == 200:
                        wait_ms = int(reply.headers.get("openai-poll-after-ms", "500"))
                    else:
                        errors[f"http {reply.status}"] += 1
            except (aiohttp.ClientError, OSError) as exc:
                errors[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - sent)
            await asyncio.sleep(wait_ms / 1000)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, errors


async def streams(http, urls, headers, ids, clients, seconds) -> tuple[int, collections.Counter]:
    opened = 0
    errors: collections.Counter = collections.Counter()

    async def client(i: int) -> None:
        nonlocal opened
        url, video = urls[i % len(urls)], ids[i % len(ids)]
        try:
            async with http.get(f"{url}/v1/videos/{video}/events", headers=headers,
                                timeout=aiohttp.ClientTimeout(total=seconds + 30)) as reply:
                if reply.status != 200:
                    errors[f"http {reply.status}"] += 1
                    return
                opened += 1
                with contextlib_suppress():
                    async with asyncio.timeout(seconds):
                        async for _line in reply.content:
                            pass
        except (aiohttp.ClientError, OSError) as exc:
            errors[type(exc).__name__] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return opened, errors


class contextlib_suppress:  # TimeoutError ends a stream's measured window, nothing else
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is TimeoutError


async def run(n: int, args, work: Path, redis_url: str | None, measured: bool) -> dict:
    db = f"sqlite:///{work / f'jobs-{n}-{measured}.sqlite'}"
    from farm.jobs.store import JobStore

    JobStore(db).migrate()
    replicas = Replicas(n, db, redis_url, args.cap, measured)
    try:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            headers = await _tenant(http, replicas.urls[0])
            rate, refused, ids = await creates(http, replicas.urls, headers)
            cpu = replicas.cpu_s()
            lat, errs = await polling(http, replicas.urls, headers, ids, args.clients, args.seconds)
            poll_cpu = replicas.cpu_s() - cpu
            cpu = replicas.cpu_s()
            opened, stream_errs = await streams(http, replicas.urls, headers, ids, args.clients, args.seconds)
            stream_cpu = replicas.cpu_s() - cpu
    finally:
        replicas.stop()
    return {"replicas": n, "hint": "estimate" if measured else "fallback", "create_rate": rate, "admitted": len(ids), "refused": refused,
            "requests": len(lat), "p50_ms": _q(lat, 50) * 1000, "p99_ms": _q(lat, 99) * 1000, "errors": errs,
            "poll_cpu": poll_cpu, "streams": opened, "stream_errors": stream_errs, "stream_cpu": stream_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cap", type=int, default=2000, help="the farm's interactive queue cap")
    args = parser.parse_args()
    from farm.redis_server import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        work = Path(tmp)
        redis = EmbeddedRedis(work / "redis")
        try:
            url = redis.start()
            rows = [asyncio.run(run(1, args, work, None, False)), asyncio.run(run(1, args, work, None, True)),
                    asyncio.run(run(2, args, work, url, True))]
        finally:
            redis.stop()
    print(f"gateway alone, rendering paused: {args.clients} clients, {args.seconds:.0f} s per phase, "
          f"queue cap {args.cap}, {os.cpu_count()} cores shared with the clients")
    print(f"{'replicas':>8} {'poll hint':>9} {'creates/s':>10} {'admitted':>9} {'429s':>5} {'retrieves':>10} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'poll cpu-s':>11} {'streams':>8} {'stream cpu-s':>13} "
          f"{'stream/poll':>12}")
    for r in rows:
        errors = sum(r["errors"].values()) + sum(r["stream_errors"].values())
        print(f"{r['replicas']:>8} {r['hint']:>9} {r['create_rate']:>10.1f} {r['admitted']:>9} {r['refused']:>5} "
              f"{r['requests']:>10} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {errors:>7} {r['poll_cpu']:>11.1f} "
              f"{r['streams']:>8} {r['stream_cpu']:>13.1f} {r['stream_cpu'] / max(r['poll_cpu'], 1e-9):>11.2f}x")
        if errors:
            print(f"         errors: polling {dict(r['errors'])}, streams {dict(r['stream_errors'])}")
    fallback, one, two = rows
    print(f"estimate-derived poll hints vs the fixed fallback (1 replica): retrieves "
          f"{one['requests'] / fallback['requests']:.2f}x, p99 {one['p99_ms'] / fallback['p99_ms']:.2f}x")
    print(f"two replicas vs one (estimate hints): creates/s {two['create_rate'] / one['create_rate']:.2f}x, "
          f"retrieves {two['requests'] / one['requests']:.2f}x, retrieve p99 {two['p99_ms'] / one['p99_ms']:.2f}x")


if __name__ == "__main__":
    main()
