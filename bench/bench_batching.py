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


def one_round(home: Path, max_batch: int, args, seeds: list[int]) -> tuple[float, list[float], dict]:
    """(wall seconds, latencies, batch sizes seen) of ``seeds`` through a farm whose pools batch up to ``max_batch``."""
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
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(len(seeds)) as pool:
            latencies = list(pool.map(one, seeds))
        wall = time.perf_counter() - started
        sizes = _batch_sizes(farm)
    return wall, latencies, sizes


def _pools() -> list[dict]:
    import yaml

    from _farmkit import DEFAULT_DEPLOYMENT

    config = yaml.safe_load(DEFAULT_DEPLOYMENT.read_text())
    return config["applications"][0]["args"]["settings"]["serve"]["pools"]


def _batch_sizes(farm: Farm) -> dict:
    """Sum and count of ``videofarm_batch_size`` over every pool, from the metrics endpoint (Ray exports
    replica metrics every few seconds: wait until they count the round's batches, at most 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        sums = farm.metric_sums("ray_videofarm_batch_size_sum", "ray_videofarm_batch_size_count")
        if sums.get("ray_videofarm_batch_size_count") or time.monotonic() > deadline:
            return sums
        time.sleep(2)


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
    runs: dict[int, list[tuple[float, list[float], dict]]] = {1: [], args.max_batch: []}
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
        rate[max_batch] = statistics.median(60 * args.clips / wall for wall, _, _ in rounds)
        latencies = [x for _, lat, _ in rounds for x in lat]
        sums = [s for _, _, s in rounds if s.get("ray_videofarm_batch_size_count")]
        mean = (statistics.fmean(s["ray_videofarm_batch_size_sum"] / s["ray_videofarm_batch_size_count"] for s in sums)
                if sums else float("nan"))
        print(f"max_batch {max_batch}: {rate[max_batch]:.2f} clips/min (walls "
              f"{', '.join(f'{w:.1f}' for w, _, _ in rounds)} s); latency p50 {pct(latencies, 0.5):.1f} s, "
              f"p95 {pct(latencies, 0.95):.1f} s; mean batch size per shard {mean:.2f}")
    print(f"batching on/off: {rate[args.max_batch] / rate[1]:.3f}x clips/min")


if __name__ == "__main__":
    run_main(main)
