"""Interactive jobs overtaking a bulk backlog at shard boundaries, on a real farm, vs main's behaviour.

Two farms, one after the other in one run, each a real `farm up` (deployments/local.yaml, its pools as
written; render.shard_steps set, serve.rate_limit and queue caps raised):
  sharded  render.shard_steps = --shard-steps: a bulk job gives its replica up at every shard
           boundary when interactive work waits for that pool;
  main     render.shard_steps >= every job's steps: each job is one shard, so a bulk job keeps its
           replica until its render ends, as on main (no preemption at shard boundaries).

In each: --bulk jobs (extra_body priority "bulk") are created, and the bench waits until the
denoiser pool is saturated (its bulk encodes done, bulk shards waiting for every replica). Then the
--interactive jobs go in one at a time: each once the previous one has left the denoiser pool (all its
shards ran), after a random delay of up to one bulk call, so arrivals fall at random phases of the
bulk work (--burst: all together). A job's queue wait is from just before its create request to the
start of its first denoise shard, read from the dispatcher's `calls` history (its `status()`, polled
through a Serve handle, since the history keeps only the last 200 calls); the encode it includes
is broken out. Waits are printed in seconds and in units of one bulk shard's measured run on the
sharded farm (median of the bulk shard calls while interactive jobs were arriving), against the aim:
at most 1 shard + 10 %. Interactive jobs need not finish: `farm down` ends each farm with its backlog.

Usage: python bench/bench_preempt.py [--bulk 40 --interactive 5 --size 256x256 --seconds 4 --steps 16 --shard-steps 4]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _farmkit import APP_SETTINGS_NOTE, BenchError, Farm, log, pct, run_main  # noqa: E402

BULK_PROMPT = "timelapse of clouds over a mountain lake, soft light"
INTERACTIVE_PROMPT = "雪の降る森の中を赤いキツネが走る"
AIM_UNITS = 1.10


class Calls:
    """The dispatcher's recent stage calls, merged across polls (its history is a bounded deque)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.seen: dict[tuple, dict] = {}
        self.last: dict = {}

    def poll(self) -> dict:
        self.last = self.handle.status.remote().result(timeout_s=60)
        for call in self.last["calls"]:
            self.seen[(call["job_id"], call["stage"], call["started"])] = call
        return self.last

    def of(self, job_id: str, shards: bool = True) -> list[dict]:
        wanted = [c for c in self.seen.values() if c["job_id"] == job_id
                  and c["stage"].startswith("shard") == shards and (shards or c["stage"] == "encode")]
        return sorted(wanted, key=lambda c: c["started"])

    def bulk_shards(self, pool: str) -> list[dict]:
        return [c for c in self.seen.values() if c["priority"] == "bulk" and c["pool"] == pool
                and c["stage"].startswith("shard")]

    def until(self, what: str, done, timeout_s: float, every_s: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.poll()
            if done(status):
                return status
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout_s:.0f}s waiting for {what}")
            time.sleep(every_s)


@dataclass
class Arrival:
    video_id: str
    created: float  # epoch seconds just before the create request (the dispatcher stamps calls in epoch time)
    saturated: bool  # bulk shards were waiting for the pool when it arrived


@dataclass
class Outcome:
    label: str
    shard_steps: int
    replicas: int
    bulk_call_s: float  # median bulk denoise call while interactive jobs arrived
    bulk_call_steps: int
    waits_s: list[float]  # create → first shard start
    encode_s: list[float]  # create → encode end (HTTP create, claim, the encoder's queue and the encode)
    saturated: list[bool]
    finished: dict[str, int]  # interactive jobs by status at teardown


def run_config(farm: Farm, args, label: str, shard_steps: int) -> Outcome:
    import ray
    from ray import serve

    runtime = farm.runtime()
    ray.init(address=runtime.ray_address, namespace="videofarm", log_to_driver=False)
    try:
        calls = Calls(serve.get_deployment_handle("DispatcherDeployment", app_name=runtime.app_name))
        status = calls.poll()
        pool = f"{args.model}:transformer"
        if pool not in status["pools"]:
            raise BenchError(f"the farm has no denoiser pool {pool!r}; pools: {sorted(status['pools'])}")
        replicas = len(status["pools"][pool])
        job = dict(model=args.model, size=args.size, seconds=args.seconds)

        log(f"{label}: {args.bulk} bulk jobs")
        for i in range(args.bulk):
            farm.create(prompt=BULK_PROMPT, steps=args.steps, seed=i, priority="bulk", **job).parse()

        def saturated(status: dict) -> bool:
            return status["waiting"][pool]["bulk"] > 0

        calls.until("the denoiser pool to fill with bulk shards", lambda s: saturated(s)
                    and s["waiting"]["encode"]["bulk"] == 0 and len(calls.bulk_shards(pool)) >= replicas,
                    timeout_s=900)

        log(f"{label}: {args.interactive} interactive jobs{' at once' if args.burst else ', one at a time'}")
        rng = random.Random(args.seed)
        per_job = math.ceil(args.interactive_steps / shard_steps)
        arrivals: list[Arrival] = []
        for k in range(args.interactive):
            if arrivals and not args.burst:
                previous = arrivals[-1].video_id
                calls.until(f"interactive job {previous} to leave the denoiser pool",
                            lambda s, v=previous: len(calls.of(v)) >= per_job, timeout_s=900, every_s=0.25)
            if k == 0 or not args.burst:
                # A random phase of the bulk work: up to one bulk call (a shard; on main, a whole job).
                time.sleep(rng.uniform(0.0, statistics.median(c["seconds"] for c in calls.bulk_shards(pool))))
            full = saturated(calls.poll())
            created = time.time()
            video = farm.create(prompt=INTERACTIVE_PROMPT, steps=args.interactive_steps, seed=100 + k,
                                priority="interactive", **job).parse()
            arrivals.append(Arrival(video.id, created, full))
        calls.until("every interactive job's first shard",
                    lambda s: all(calls.of(a.video_id) for a in arrivals), timeout_s=900, every_s=0.25)
    finally:
        ray.shutdown()

    firsts = [calls.of(a.video_id)[0] for a in arrivals]
    encodes = [calls.of(a.video_id, shards=False) for a in arrivals]
    # The unit: bulk calls that ran while the interactive jobs came in (same load as the waits).
    window = (arrivals[0].created, max(f["started"] for f in firsts))
    during = [c for c in calls.bulk_shards(pool) if window[0] - c["seconds"] <= c["started"] <= window[1]]
    bulk = during if len(during) >= 3 else calls.bulk_shards(pool)
    finished: dict[str, int] = {}
    for a in arrivals:
        state = farm.client.videos.retrieve(a.video_id).status
        finished[state] = finished.get(state, 0) + 1
    return Outcome(
        label=label, shard_steps=shard_steps, replicas=replicas,
        bulk_call_s=statistics.median(c["seconds"] for c in bulk),
        bulk_call_steps=min(shard_steps, args.steps),
        waits_s=[f["started"] - a.created for f, a in zip(firsts, arrivals)],
        encode_s=[(e[0]["started"] + e[0]["seconds"] - a.created) if e else float("nan")
                  for e, a in zip(encodes, arrivals)],
        saturated=[a.saturated for a in arrivals], finished=finished,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk", type=int, default=40, help="bulk jobs saturating the farm")
    parser.add_argument("--interactive", type=int, default=5, help="interactive jobs measured")
    parser.add_argument("--model", default="wan-tiny")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="steps of each bulk job")
    parser.add_argument("--interactive-steps", type=int, help="steps of each interactive job (default: --steps)")
    parser.add_argument("--shard-steps", type=int, default=4, help="render.shard_steps of the sharded farm")
    parser.add_argument("--burst", action="store_true", help="submit the interactive jobs all at once")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival delays")
    args = parser.parse_args()
    args.interactive_steps = args.interactive_steps or args.steps
    if min(args.bulk, args.interactive, args.steps, args.interactive_steps, args.shard_steps, args.threads) < 1:
        raise BenchError("--bulk, --interactive, --steps, --interactive-steps, --shard-steps, --threads must be >= 1")
    if args.shard_steps >= args.steps:
        raise BenchError(f"--shard-steps {args.shard_steps} must be below --steps {args.steps}, or nothing is sharded")

    from farm import env

    with tempfile.TemporaryDirectory(prefix="bench-preempt-") as tmp:
        root = Path(tmp)
        # One Ray token for both farms and this driver: Ray reads it once, at its import.
        env.use_ray_token(root)
        env.use_loopback_ray()
        overrides = {"serve": {"rate_limit": "1000000/minute", "max_queued": 10_000,
                               "max_queued_per_account": 10_000, "max_queued_bulk": 10_000}}
        outcomes: list[Outcome] = []
        configs = (("sharded", args.shard_steps), ("main", max(args.steps, args.interactive_steps)))
        for label, shard_steps in configs:
            home = root / label
            if outcomes:  # the tiny models the first farm built: no second build
                shutil.copytree(root / configs[0][0] / "models", home / "models")
            with Farm(home, overrides | {"render": {"shard_steps": shard_steps}}, threads=args.threads) as farm:
                spec = farm.settings().model(args.model)
                outcomes.append(run_config(farm, args, label, shard_steps))
    report(args, spec, outcomes)


def report(args, spec, outcomes: list[Outcome]) -> None:
    sharded, main_ = outcomes
    unit = sharded.bulk_call_s
    print(f"job: {args.model} {args.size}, {spec.num_frames(args.seconds)} frames ({args.seconds} s at {spec.fps} fps); "
          f"{args.bulk} bulk jobs x {args.steps} steps, {args.interactive} interactive x {args.interactive_steps} steps "
          f"({'at once' if args.burst else 'one at a time, each after the previous left the pool + up to 1 bulk call'}); "
          f"denoiser pool {args.model}:transformer {sharded.replicas} replicas; {os.cpu_count()} cores, "
          f"{args.threads} torch thread(s) per process; deployments/local.yaml, {APP_SETTINGS_NOTE}")
    print(f"unit: 1 bulk shard of {sharded.bulk_call_steps} steps on the sharded farm, measured median {unit:.2f} s")
    for o in outcomes:
        units = [w / unit for w in o.waits_s]
        what = "preempts at shard boundaries" if o is sharded else "a job keeps its replica until it ends"
        print(f"{o.label:<8} render.shard_steps {o.shard_steps} ({what}); bulk call ({o.bulk_call_steps} steps) median "
              f"{o.bulk_call_s:.2f} s = {o.bulk_call_s / unit:.2f} units")
        print(f"         interactive queue wait: p50 {pct(units, 0.5):.2f} units ({pct(o.waits_s, 0.5):.2f} s), "
              f"max {max(units):.2f} units ({max(o.waits_s):.2f} s); of it create→encoded p50 "
              f"{pct(o.encode_s, 0.5):.2f} s; per job (units): {', '.join(f'{u:.2f}' for u in units)}")
        busy = sum(o.saturated)
        print(f"         pool saturated with bulk at {busy}/{len(o.saturated)} arrivals"
              f"{'' if busy == len(o.saturated) else ' (backlog ran out: raise --bulk)'}; "
              f"interactive at teardown: {', '.join(f'{n} {s}' for s, n in sorted(o.finished.items()))}")
    s_max, m_max = max(sharded.waits_s) / unit, max(main_.waits_s) / unit
    print(f"aim: queue wait <= {AIM_UNITS:.2f} units (1 shard + 10%): sharded max {s_max:.2f} "
          f"({'met' if s_max <= AIM_UNITS else 'missed'}), main max {m_max:.2f} "
          f"({'met' if m_max <= AIM_UNITS else 'missed'}); sharded/main: p50 "
          f"{pct(sharded.waits_s, 0.5) / pct(main_.waits_s, 0.5):.2f}x, max {s_max / m_max:.2f}x")


if __name__ == "__main__":
    run_main(main)
