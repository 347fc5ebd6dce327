"""Step-level batching on vs off through the farm: N clips at once, measured in one run.

Two settings of deployments/local.yaml's denoiser pools: ``max_batch`` 1 (each shard alone, the file's
default) and ``max_batch`` B (the scheduler hands up to B compatible shards to one replica as one batch,
run as one forward per step). A farm cannot switch it while up, so each round brings a farm up with one
setting (the same FARM_HOME: models built once), runs the clips and brings it down; rounds alternate
(off, on, on, off, …) so machine noise hits both alike; medians are compared. That a batched job's
latents equal its unbatched ones (≤ 1e-5) is tests/render/test_batching.py's; the mean batch size the
replicas ran comes from the farm's ``videofarm_batch_size`` metric.

Job: tiny Wan, 256x256, 33 frames, 8 steps, shards of 2 (deployments/local.yaml).
Usage: python bench/bench_batching.py [--clips 8 --max-batch 4 --repeats 1]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _farmkit import APP_SETTINGS_NOTE, BenchError, Farm, log, pct, process_env, run_main  # noqa: E402

PROMPT = "雨上がりの渋谷、水たまりに映るネオン"


def one_round(home: Path, max_batch: int, args, seeds: list[int]) -> tuple:
    """(wall seconds, latencies, shards per batch size, CPU-seconds per process group) of ``seeds`` through a
    farm whose pools batch up to ``max_batch``."""
    pools = [dict(p, max_batch=max_batch) for p in _pools()]
    overrides = {"serve": {"rate_limit": "1000000/minute", "max_queued": 10_000, "max_queued_per_account": 10_000,
                           "pools": pools}}
    with Farm(home, overrides, threads=args.threads) as farm:
        def one(seed: int) -> float:
            started = time.perf_counter()
            raw = farm.create(model="wan-tiny", prompt=PROMPT, size=args.size, seconds=args.seconds,
                              steps=args.steps, seed=seed)
            farm.wait(raw.parse(), int(raw.headers.get("openai-poll-after-ms", "500")) / 1000)
            return time.perf_counter() - started

        with cf.ThreadPoolExecutor(2) as pool:  # warm-up: one clip per replica
            list(pool.map(one, [1, 2]))
        cpu_before, sizes_before = farm.cpu_seconds(), _batch_sizes(farm)
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(len(seeds)) as pool:
            latencies = list(pool.map(one, seeds))
        wall = time.perf_counter() - started
        cpu = {k: v - cpu_before.get(k, 0.0) for k, v in farm.cpu_seconds().items()}
        sizes = _batch_sizes(farm, sizes_before)
    return wall, latencies, sizes, cpu


def _pools() -> list[dict]:
    import yaml

    from _farmkit import DEFAULT_DEPLOYMENT

    config = yaml.safe_load(DEFAULT_DEPLOYMENT.read_text())
    return config["applications"][0]["args"]["settings"]["serve"]["pools"]


def _batch_sizes(farm: Farm, before: dict[int, float] | None = None, wait_s: float = 30) -> dict[int, float]:
    """Shards run per batch size (the ``videofarm_batch_size`` histogram's buckets, every pool), minus
    ``before``; Ray exports replica metrics every few seconds, so it waits for new counts (at most ``wait_s``)."""
    import re
    import urllib.request

    deadline = time.monotonic() + (wait_s if before is not None else 0)
    while True:
        cumulative: dict[float, float] = {}
        with urllib.request.urlopen(farm.runtime().metrics_url, timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                match = re.match(r'^ray_videofarm_batch_size_bucket\{.*le="([^"]+)".*\}\s+(\S+)', line)
                if match and match.group(1) != "+Inf":
                    le = float(match.group(1))
                    cumulative[le] = cumulative.get(le, 0.0) + float(match.group(2))
        counts, below = {}, 0.0
        for le in sorted(cumulative):  # boundaries are whole sizes: bucket le=N holds the batches of N
            counts[int(le)], below = cumulative[le] - below, cumulative[le]
        if before is None:
            return counts
        counts = {size: n - before.get(size, 0.0) for size, n in counts.items()}
        if sum(counts.values()) > 0 or time.monotonic() > deadline:
            return counts
        time.sleep(2)


def _shown(shards: dict[int, float]) -> str:
    return "{" + ", ".join(f"{size}: {n:.0f}" for size, n in sorted(shards.items()) if n) + "}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of each setting, alternating")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.clips < 1 or args.max_batch < 2 or args.repeats < 1:
        raise BenchError("--clips and --repeats must be at least 1, --max-batch at least 2")
    os.environ.update(process_env(args.threads))
    runs: dict[int, list[tuple]] = {1: [], args.max_batch: []}
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        home = Path(tmp) / "farm"
        order = []
        for repeat in range(args.repeats):
            order += [1, args.max_batch] if repeat % 2 == 0 else [args.max_batch, 1]
        for i, max_batch in enumerate(order):
            seeds = list(range(1000, 1000 + args.clips))  # the same seeds in every round
            log(f"round {i + 1}/{len(order)}: max_batch {max_batch}, {args.clips} clips")
            runs[max_batch].append(one_round(home, max_batch, args, seeds))

    print(f"job: wan-tiny {args.size}, {args.seconds} s, {args.steps} steps; {args.clips} clips at once; "
          f"{args.repeats} alternating round(s) per setting; {os.cpu_count()} cores; {APP_SETTINGS_NOTE}")
    rate = {}
    for max_batch, rounds in runs.items():
        rate[max_batch] = statistics.median(60 * args.clips / wall for wall, _, _, _ in rounds)
        latencies = [x for _, lat, _, _ in rounds for x in lat]
        shards = {size: sum(r[2].get(size, 0.0) for r in rounds) for size in rounds[0][2]}
        total = sum(shards.values())
        mean = sum(size * n for size, n in shards.items()) / total if total else float("nan")
        print(f"max_batch {max_batch}: {rate[max_batch]:.2f} clips/min (walls "
              f"{', '.join(f'{r[0]:.1f}' for r in rounds)} s); latency p50 {pct(latencies, 0.5):.1f} s, "
              f"p95 {pct(latencies, 0.95):.1f} s; shards per batch size {_shown(shards)}, mean {mean:.2f}")
        cpu: dict[str, float] = {}
        for r in rounds:
            for group, seconds in r[3].items():
                cpu[group] = cpu.get(group, 0.0) + seconds / (args.clips * len(rounds))
        top = sorted(cpu.items(), key=lambda kv: -kv[1])
        print(f"  farm CPU-s per clip {sum(cpu.values()):.2f}: " + ", ".join(f"{g} {s:.2f}" for g, s in top[:12]))
    print(f"batching on/off: {rate[args.max_batch] / rate[1]:.3f}x clips/min")


if __name__ == "__main__":
    run_main(main)
