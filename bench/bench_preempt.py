"""Interactive jobs overtaking a bulk backlog at shard boundaries, on a real farm, vs main's behaviour.

Two farms, one after the other in one run, each a real `farm up` (deployments/local.yaml, its pools as
written; render.shard_steps set, render.drain_s 0, serve.rate_limit and queue caps raised):
  sharded  render.shard_steps = --shard-steps: a bulk job gives its replica up at every shard
           boundary when interactive work waits for that pool;
  main     render.shard_steps >= every job's steps: each job is one shard, so a bulk job keeps its
           replica until its render ends, as on main (no preemption at shard boundaries).

In each: --bulk jobs (extra_body priority "bulk") are created, and the bench waits until the
denoiser pool is saturated (bulk shards waiting for every replica, some already run). Then the
--interactive jobs go in one at a time: each once the previous one has left the denoiser pool (all its
shards ran), after a random delay of up to one bulk call, so arrivals fall at random phases of the
bulk work (--burst: all together); that bulk shards still wait is checked again before each create
and when the job's first shard runs, and printed. A job's queue wait is from just before its create request to the
start of its first denoise shard, read from the dispatcher's `calls` history (its `status()`, polled
through a Serve handle, since the history keeps only the last 200 calls); the encode it includes
is broken out. Waits are printed in seconds and in units of one bulk shard's measured run on the
sharded farm (median of the bulk shard calls while interactive jobs were arriving), against the aim:
at most 1 shard + 10 %. Interactive jobs need not finish: `farm down` ends each farm with its backlog.

Usage: python bench/bench_preempt.py [--bulk 40 --interactive 5 --size 256x256 --seconds 4 --steps 16 --shard-steps 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing
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

    def __init__(self, handle, pool: str) -> None:
        self.handle, self.pool = handle, pool
        self.seen: dict[tuple, dict] = {}
        self.last: dict = {}
        self.watched: list[Arrival] = []  # interactive jobs whose first shard is awaited

    def poll(self) -> dict:
        self.last = self.handle.status.remote().result(timeout_s=60)
        for call in self.last["calls"]:
            self.seen[(call["job_id"], call["stage"], call["started"])] = call
        # Was bulk work still queued when the job's first shard was seen running (or done)?
        running = {c["job_id"] for c in self.last.get("running", []) if c["stage"].startswith("shard")}
        for a in self.watched:
            if a.after is None and (a.video_id in running or self.of(a.video_id)):
                a.after = self.saturated()
        return self.last

    def saturated(self) -> bool:
        """Bulk shards wait for the pool: every replica is taken."""
        return self.last["waiting"][self.pool]["bulk"] > 0

    def of(self, job_id: str, shards: bool = True) -> list[dict]:
        wanted = [c for c in self.seen.values() if c["job_id"] == job_id
                  and c["stage"].startswith("shard") == shards and (shards or c["stage"] == "encode")]
        return sorted(wanted, key=lambda c: c["started"])

    def bulk_shards(self, pool: str) -> list[dict]:
        return [c for c in self.seen.values() if c["priority"] == "bulk" and c["pool"] == pool
                and c["stage"].startswith("shard")]

    def until(self, what: str, done, timeout_s: float, every_s: float = 0.5) -> dict:
        started = time.monotonic()
        said = started
        while True:
            status = self.poll()
            if done(status):
                return status
            now = time.monotonic()
            if now - started > timeout_s:
                raise BenchError(f"timed out after {timeout_s:.0f}s waiting for {what}; {self.describe()}")
            if now - said > 60:  # a stall should be visible while it lasts
                log(f"still waiting for {what} ({now - started:.0f}s): {self.describe()}")
                said = now
            time.sleep(every_s)

    def describe(self) -> str:
        s = self.last
        running = ", ".join(f"{c['job_id'][-6:]} {c['stage']} on {c['replica']}" for c in s.get("running", []))
        return (f"waiting {s.get('waiting')}, running [{running}], retries {len(s.get('retries', []))}, "
                f"jobs {s.get('counts')}")


@dataclass
class Arrival:
    video_id: str
    created: float  # epoch seconds just before the create request (the dispatcher stamps calls in epoch time)
    before: bool  # bulk shards were waiting for the pool just before its create
    after: bool | None = None  # … and still when its first shard was seen running

    @property
    def saturated(self) -> bool:
        return self.before and bool(self.after)


@dataclass
class Outcome:
    label: str
    shard_steps: int
    replicas: int
    bulk_call_s: float  # median bulk denoise call while interactive jobs arrived
    bulk_call_steps: int
    waits_s: list[float]  # create → first shard start, and its three parts:
    to_encoder_s: list[float]  # create → the encoder takes it (HTTP create, claim, the encoder's queue)
    encode_s: list[float]  # the encode call
    to_shard_s: list[float]  # encoded → first shard starts (the wait for a denoiser replica)
    saturated: list[bool]
    finished: dict[str, int]  # interactive jobs by status at teardown
    retries: list[str]  # the dispatcher's retried stage calls (its last 20): "<reason> <stage>"


def run_config(farm: Farm, args, label: str, shard_steps: int) -> Outcome:
    import ray
    from ray import serve

    runtime = farm.runtime()
    ray.init(address=runtime.ray_address, namespace="videofarm", log_to_driver=False)
    try:
        pool = f"{args.model}:transformer"
        calls = Calls(serve.get_deployment_handle("DispatcherDeployment", app_name=runtime.app_name), pool)
        status = calls.poll()
        if pool not in status["pools"]:
            raise BenchError(f"the farm has no denoiser pool {pool!r}; pools: {sorted(status['pools'])}")
        replicas = len(status["pools"][pool])
        job = dict(model=args.model, size=args.size, seconds=args.seconds)

        log(f"{label}: {args.bulk} bulk jobs")
        for i in range(args.bulk):
            farm.create(prompt=BULK_PROMPT, steps=args.steps, seed=i, priority="bulk", **job).parse()

        every_bulk_shard = args.bulk * math.ceil(args.steps / shard_steps)

        def filled(status: dict) -> bool:
            ran = len(calls.bulk_shards(pool))
            if ran >= every_bulk_shard:
                raise BenchError(f"{label}: the bulk backlog finished before the denoiser pool was seen saturated; "
                                 "raise --bulk or --steps")
            return calls.saturated() and ran >= replicas  # and a bulk call length to pick delays from

        calls.until("the denoiser pool to fill with bulk shards", filled, timeout_s=900)

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
            calls.poll()
            full = calls.saturated()
            created = time.time()
            video = farm.create(prompt=INTERACTIVE_PROMPT, steps=args.interactive_steps, seed=100 + k,
                                priority="interactive", **job).parse()
            arrivals.append(Arrival(video.id, created, full))
            calls.watched.append(arrivals[-1])
        calls.until("every interactive job's first shard", lambda s: all(
            calls.of(a.video_id) and calls.of(a.video_id, shards=False) for a in arrivals), timeout_s=900, every_s=0.25)
    finally:
        ray.shutdown()

    firsts = [calls.of(a.video_id)[0] for a in arrivals]
    encodes = [calls.of(a.video_id, shards=False)[0] for a in arrivals]
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
        to_encoder_s=[e["started"] - a.created for e, a in zip(encodes, arrivals)],
        encode_s=[e["seconds"] for e in encodes],
        to_shard_s=[f["started"] - e["started"] - e["seconds"] for f, e in zip(firsts, encodes)],
        saturated=[a.saturated for a in arrivals], finished=finished,
        retries=[f"{r['reason']} {r['stage']}" for r in calls.last.get("retries", [])],
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
        # One Ray token for both farms and the drivers: Ray reads it once, at its import. No
        # auto-started local Ray if a Serve handle's background thread outlives its cluster.
        env.use_ray_token(root)
        env.use_loopback_ray()
        os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
        outcomes: list[Outcome] = []
        configs = (("sharded", args.shard_steps), ("main", max(args.steps, args.interactive_steps)))
        # Each farm's driver is a process of its own: Serve's handles and routers are per-process
        # singletons that keep talking to the first cluster after ray.shutdown().
        for label, shard_steps in configs:
            if outcomes:  # the tiny models the first farm built: no second build
                shutil.copytree(root / configs[0][0] / "models", root / label / "models")
            try:
                with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
                    outcome, spec = child.submit(one_farm, args, root / label, label, shard_steps).result()
            except BaseException:
                Farm(root / label, {}, threads=args.threads).down()  # the child may have died before its own
                raise
            outcomes.append(outcome)
    report(args, spec, outcomes)


def one_farm(args, home: Path, label: str, shard_steps: int):
    """In a child process: one farm up, measured, down."""
    # drain_s 0: `farm down` hands the backlog back at once instead of running it to shard boundaries
    # (up to render.drain_s, 60 s): this farm is thrown away.
    overrides = {"serve": {"rate_limit": "1000000/minute", "max_queued": 10_000, "max_queued_per_account": 10_000,
                           "max_queued_bulk": 10_000}, "render": {"shard_steps": shard_steps, "drain_s": 0}}
    with Farm(home, overrides, threads=args.threads) as farm:
        return run_config(farm, args, label, shard_steps), farm.settings().model(args.model)


def report(args, spec, outcomes: list[Outcome]) -> None:
    sharded, main_ = outcomes
    unit = sharded.bulk_call_s
    order = "at once" if args.burst else "one at a time, each after the previous left the pool + up to 1 bulk call"
    print(f"job: {args.model} {args.size}, {spec.num_frames(args.seconds)} frames ({args.seconds} s at {spec.fps} "
          f"fps); {args.bulk} bulk jobs x {args.steps} steps, {args.interactive} interactive x "
          f"{args.interactive_steps} steps ({order})")
    print(f"farm: deployments/local.yaml, denoiser pool {args.model}:transformer {sharded.replicas} replicas; "
          f"{os.cpu_count()} cores, {args.threads} torch thread(s) per process; {APP_SETTINGS_NOTE}")
    print(f"unit: 1 bulk shard of {sharded.bulk_call_steps} steps on the sharded farm, measured median {unit:.2f} s")
    for o in outcomes:
        units = [w / unit for w in o.waits_s]
        what = "preempts at shard boundaries" if o is sharded else "a job keeps its replica until it ends"
        print(f"{o.label:<8} render.shard_steps {o.shard_steps} ({what}); bulk call ({o.bulk_call_steps} steps) median "
              f"{o.bulk_call_s:.2f} s = {o.bulk_call_s / unit:.2f} units")
        print(f"         interactive queue wait: p50 {pct(units, 0.5):.2f} units ({pct(o.waits_s, 0.5):.2f} s), "
              f"max {max(units):.2f} units ({max(o.waits_s):.2f} s); per job (units): "
              f"{', '.join(f'{u:.2f}' for u in units)}")
        print(f"         its parts, p50 / max s: create→encoder {pct(o.to_encoder_s, 0.5):.2f} / "
              f"{max(o.to_encoder_s):.2f}, "
              f"encode {pct(o.encode_s, 0.5):.2f} / {max(o.encode_s):.2f}, encoded→first shard (waiting for a "
              f"replica) {pct(o.to_shard_s, 0.5):.2f} / {max(o.to_shard_s):.2f} = "
              f"{pct(o.to_shard_s, 0.5) / unit:.2f} / {max(o.to_shard_s) / unit:.2f} units")
        busy = sum(o.saturated)
        print(f"         pool saturated with bulk (before its create and at its first shard) for {busy}/"
              f"{len(o.saturated)} interactive jobs"
              f"{'' if busy == len(o.saturated) else ' (backlog ran out: raise --bulk)'}; "
              f"interactive at teardown: {', '.join(f'{n} {s}' for s, n in sorted(o.finished.items()))}; "
              f"dispatcher retries: {'; '.join(o.retries) if o.retries else 'none'}")
    s_max, m_max = max(sharded.waits_s) / unit, max(main_.waits_s) / unit
    print(f"aim: queue wait <= {AIM_UNITS:.2f} units (1 shard + 10%): sharded max {s_max:.2f} "
          f"({'met' if s_max <= AIM_UNITS else 'missed'}), main max {m_max:.2f} "
          f"({'met' if m_max <= AIM_UNITS else 'missed'}); main/sharded wait: p50 "
          f"{pct(main_.waits_s, 0.5) / pct(sharded.waits_s, 0.5):.2f}x, max {m_max / s_max:.2f}x")


if __name__ == "__main__":
    run_main(main)
