"""A 1,000-GPU render farm, simulated: the farm's own scheduling policy at a scale these machines cannot run.

A discrete-event simulation (a heap of timed events, a simulated clock) that drives the
same :class:`farm.sched.Scheduler` the dispatcher uses — imported, not copied. Pools:

  wan2.2-a14b:transformer     Wan 2.2 T2V-A14B high-noise expert, steps [0, 26) of 40
  wan2.2-a14b:transformer_2   Wan 2.2 T2V-A14B low-noise expert,  steps [26, 40)
  wan2.1-1.3b:transformer     Wan 2.1 T2V-1.3B, 50 steps cut in shards of 10

Workload: a Poisson stream of interactive clips sized to use about 30 % of the fleet, plus a
backlog of 100,000 bulk clips from 50 tenants with unequal weights, all queued at t = 0 (so
the policy holds ~100k ready shards from the first decision). Each shard's real run time is
its estimate times a uniform ±5 % draw. The farm starts mid-stream, not from a standstill:
each replica's first shard is a uniformly random part done (otherwise all 1,000 GPUs would
free in lockstep waves for hours), and 5 % of the bulk Wan 2.2 clips are past their
high-noise steps, waiting in the low-noise pool (resumed from their checkpoints). The
simulation stops at ``--horizon``; the backlog is far from drained by then, which is what
lets fairness be measured with every tenant waiting. Figures are measured over the window
from ``--warmup`` to the horizon.

Printed: GPU busy fraction, policy cost per decision (real time of ``schedule()`` calls,
``time.perf_counter``, and CPU time, since this machine is shared), interactive queue wait
in shard lengths (the pool's estimated shard run time), and Jain's fairness index over bulk
tenants' served GPU time per weight. Not modelled: state handoff and dispatch latency between
shards, replica failures, batching (max_batch 1), so the busy fraction is an upper bound.

Usage: python bench/fleet_sim.py [--seed 1] [--horizon 4h] [--warmup 30m] [--gpus 1000] [--interactive-load 0.3]
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass

from farm.sched import Scheduler, SchedulerConfig, ShardRequest

# Per-step times (seconds, one GPU, batch 1) — approximate published figures, not measurements of ours.
#
# Wan 2.2 T2V-A14B, 1280x720, 81 frames, 40 steps on one H100: about 1041 s per clip, the figure of
#   the Wan2.2 README's "Computational Efficiency on Different GPUs" table as quoted in
#   github.com/Wan-Video/Wan2.2 issue #39 (whose reporter measured ~1600 s on an H100 with
#   FlashAttention 2 and model offloading; the PromptTea README, github.com/rakib91221/PromptTea,
#   lists ~28 min for the same clip on one H100). 1041 s / 40 steps ≈ 26 s per step; the total
#   includes text encoding and VAE decode, so the true per-step time is a little lower.
A14B_STEP_S = 26.0
# Wan 2.1 T2V-1.3B, 832x480, 81 frames, 50 steps: the Wan2.1 README says "about 4 minutes on an
#   RTX 4090" without optimizations (≈ 4.8 s per step, with offloading). We found no primary H100/H200
#   figure; 2 s per step is our estimate for an H100-class GPU (about 2.4x a 4090), not a measurement.
SMALL_STEP_S = 2.0

A14B_STEPS, A14B_SHIFT, A14B_BOUNDARY_RATIO = 40, 12.0, 0.875  # Wan2.2 t2v_A14B config: sample_shift 12, boundary 0.875
SMALL_STEPS, SMALL_SHARD_STEPS = 50, 10
HIGH, LOW, SMALL = "wan2.2-a14b:transformer", "wan2.2-a14b:transformer_2", "wan2.1-1.3b:transformer"
A14B_SHARE = 0.5  # of clips, bulk and interactive alike; the rest are Wan 2.1 1.3B clips
A14B_HEAD_START = 0.05  # of bulk Wan 2.2 clips already past the expert boundary at t = 0
LOW_POOL_CUT = 0.02  # the low-noise pool's GPUs below its share of the demand
BULK_CLIPS, BULK_TENANTS, API_TENANTS = 100_000, 50, 20
BULK_WEIGHTS = (1.0, 2.0, 3.0, 5.0, 8.0)  # tenant i has weight BULK_WEIGHTS[i % 5]
AGING_S = 600.0
DONE, ARRIVAL = 0, 1  # event kinds; a replica that frees at t is seen before an arrival at t


def high_noise_steps(steps: int, shift: float, boundary_ratio: float, train_steps: int = 1000) -> int:
    """Steps whose timestep is at or above the expert boundary, on the flow-matching UniPC
    schedule (diffusers' ``use_flow_sigmas`` with ``flow_shift``); 26 of 40 for Wan 2.2 T2V-A14B,
    the same count diffusers' UniPCMultistepScheduler gives."""
    lin = [1.0 - (1.0 + (1.0 / train_steps - 1.0) * k / steps) for k in range(steps + 1)]
    sigmas = [shift * s / (1.0 + (shift - 1.0) * s) for s in lin][::-1][:-1]
    return sum(s * train_steps >= boundary_ratio * train_steps for s in sigmas)


@dataclass(frozen=True)
class Step:
    """One shard of a clip's plan: which pool runs which steps, and its estimated time."""

    pool: str
    start: int
    end: int
    cost_s: float
    key: tuple


def clip_plans() -> dict[str, tuple[Step, ...]]:
    split = high_noise_steps(A14B_STEPS, A14B_SHIFT, A14B_BOUNDARY_RATIO)
    a14b = (
        Step(HIGH, 0, split, split * A14B_STEP_S, ("wan2.2-a14b", "transformer", "1280x720x81", split)),
        Step(LOW, split, A14B_STEPS, (A14B_STEPS - split) * A14B_STEP_S,
             ("wan2.2-a14b", "transformer_2", "1280x720x81", A14B_STEPS - split)),
    )
    small = tuple(
        Step(SMALL, s, s + SMALL_SHARD_STEPS, SMALL_SHARD_STEPS * SMALL_STEP_S,
             ("wan2.1-1.3b", "transformer", "832x480x81", SMALL_SHARD_STEPS))
        for s in range(0, SMALL_STEPS, SMALL_SHARD_STEPS)
    )
    return {"a14b": a14b, "small": small}


def plan_fleet(gpus: int, plans: dict[str, tuple[Step, ...]]) -> dict[str, int]:
    """GPUs per pool in proportion to the GPU time a clip of the mix needs there. The low-noise
    pool only receives what the high-noise pool finishes, so it gets LOW_POOL_CUT less than its
    share (a standing backlog keeps it busy instead of starved); the rest goes to the 1.3B pool."""
    demand: dict[str, float] = defaultdict(float)
    for model, share in (("a14b", A14B_SHARE), ("small", 1 - A14B_SHARE)):
        for step in plans[model]:
            demand[step.pool] += share * step.cost_s
    total = sum(demand.values())
    sizes = {pool: round(gpus * d / total) for pool, d in demand.items()}
    cut = max(1, round(sizes[LOW] * LOW_POOL_CUT))
    sizes[LOW] -= cut
    sizes[SMALL] += gpus - sum(sizes.values())
    return sizes


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 4h, 30m or 900s, got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else float("nan")


@dataclass
class Job:
    job_id: str
    tenant: str
    priority: str
    plan: tuple[Step, ...]
    queued_at: float
    next: int = 0


class FleetSim:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.plans = clip_plans()
        self.sizes = plan_fleet(args.gpus, self.plans)
        self.bulk_weight = {f"bulk-{i:02d}": BULK_WEIGHTS[i % len(BULK_WEIGHTS)] for i in range(BULK_TENANTS)}
        self.sched = Scheduler(SchedulerConfig(tenant_weights=self.bulk_weight, bulk_aging_s=AGING_S))
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.jobs: dict[str, Job] = {}
        self.ready_at: dict[tuple[str, int], float] = {}
        self.window = (args.warmup, args.horizon)
        # Measurements.
        self.busy_s: dict[str, float] = defaultdict(float)
        self.served: dict[tuple[str, str], float] = defaultdict(float)  # (pool, bulk tenant) → GPU s in window
        self.waiting: dict[tuple[str, str], int] = defaultdict(int)  # (pool, bulk tenant) → waiting shards
        self.starved: set[tuple[str, str]] = set()  # (pool, tenant) whose queue ran dry inside the window
        self.waits: dict[str, list[float]] = defaultdict(list)  # pool → interactive waits (s), in window
        self.decision_s: list[float] = []  # wall time (perf_counter) per decision
        self.decision_cpu_s: list[float] = []  # this thread's CPU time per decision
        self.call_s: list[float] = []
        self.first_fill = True
        self.window_open = False
        self.empty_calls = 0
        self.aged = self.affine = self.decisions = 0
        self.latency: list[float] = []
        self.completed = defaultdict(int)
        self.peak_ready = 0
        self.load = os.getloadavg()
        mean_clip = A14B_SHARE * sum(s.cost_s for s in self.plans["a14b"]) + (1 - A14B_SHARE) * sum(
            s.cost_s for s in self.plans["small"])
        self.arrival_rate = args.interactive_load * args.gpus / mean_clip  # clips per second

    # Events -----------------------------------------------------------------------------------
    def push(self, at: float, kind: int, data: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, data))

    def run(self) -> None:
        for pool, n in self.sizes.items():
            for i in range(n):
                self.sched.add_replica(f"{pool}/{i:04d}", pool)
        self.queue_backlog()
        self.peak_ready = sum(self.sched.queue_depth(p).total for p in self.sched.pools())
        self.push(self.rng.expovariate(self.arrival_rate), ARRIVAL, None)
        self.decide(0.0)
        self.first_fill = False
        horizon = self.args.horizon
        while self.events and self.events[0][0] <= horizon:
            now, kind, _, data = heapq.heappop(self.events)
            if kind == DONE:
                self.finish(data, now)
            else:
                self.arrive(now)
            self.decide(now)

    def queue_backlog(self) -> None:
        weights = list(self.bulk_weight.values())
        clips = [int(BULK_CLIPS * w / sum(weights)) for w in weights]
        clips[0] += BULK_CLIPS - sum(clips)
        for tenant, n in zip(self.bulk_weight, clips):
            for i in range(n):
                model = "a14b" if self.rng.random() < A14B_SHARE else "small"
                job = Job(f"{tenant}/{i:06d}", tenant, "bulk", self.plans[model], 0.0)
                if model == "a14b" and self.rng.random() < A14B_HEAD_START:
                    job.next = 1  # its high-noise steps ran before t = 0; it resumes from the checkpoint
                self.start_job(job, 0.0)

    def arrive(self, now: float) -> None:
        model = "a14b" if self.rng.random() < A14B_SHARE else "small"
        tenant = f"api-{self.rng.randrange(API_TENANTS):02d}"
        self.start_job(Job(f"{tenant}/{self.seq:08d}", tenant, "interactive", self.plans[model], now), now)
        self.push(now + self.rng.expovariate(self.arrival_rate), ARRIVAL, None)

    def start_job(self, job: Job, now: float) -> None:
        self.jobs[job.job_id] = job
        self.submit(job, now, holder=None)

    def submit(self, job: Job, now: float, holder: str | None) -> None:
        step = job.plan[job.next]
        self.sched.submit(ShardRequest(job.job_id, job.tenant, job.priority, step.pool, step.key, step.start,
                                       step.end, step.cost_s, job.queued_at, holder), now)
        self.ready_at[(job.job_id, step.start)] = now
        if job.priority == "bulk":
            self.waiting[(step.pool, job.tenant)] += 1

    def finish(self, replica: str, now: float) -> None:
        for shard in self.sched.finished(replica):
            job = self.jobs[shard.job_id]
            job.next += 1
            if job.next < len(job.plan):
                self.submit(job, now, holder=replica)  # the next pool's replica may be another: a state handoff
            else:
                del self.jobs[job.job_id]
                self.completed[job.priority] += 1
                if job.priority == "interactive" and now >= self.window[0]:
                    self.latency.append(now - job.queued_at)

    # Decisions -----------------------------------------------------------------------------------
    def decide(self, now: float) -> None:
        began, began_cpu = time.perf_counter(), time.thread_time()
        decided = self.sched.schedule(now)
        spent, spent_cpu = time.perf_counter() - began, time.thread_time() - began_cpu
        lo, hi = self.window
        if not self.window_open and now >= lo:
            self.window_open = True  # a queue already dry when the window opens counts too
            self.starved |= {(p, t) for p in self.sizes for t in self.bulk_weight if self.waiting[(p, t)] <= 0}
        if not decided:
            self.empty_calls += 1
            return
        self.call_s.append(spent)
        self.decision_s.extend([spent / len(decided)] * len(decided))
        self.decision_cpu_s.extend([spent_cpu / len(decided)] * len(decided))
        for a in decided:
            self.decisions += 1
            self.aged += a.aged
            self.affine += a.affinity
            run_s = sum(s.cost_s * self.rng.uniform(0.95, 1.05) for s in a.shards)  # compute-bound: batch ≈ sum
            if self.first_fill:
                run_s *= self.rng.random()  # mid-stream start: this much of the shard is left
            end = now + run_s
            overlap = max(0.0, min(end, hi) - max(now, lo))
            self.busy_s[a.pool] += overlap
            for s in a.shards:
                waited = now - self.ready_at.pop((s.job_id, s.start))
                if s.priority == "interactive":
                    if now >= lo:
                        self.waits[a.pool].append(waited)
                else:
                    key = (a.pool, s.tenant)
                    self.served[key] += overlap * s.cost_s / sum(x.cost_s for x in a.shards)
                    self.waiting[key] -= 1
                    if self.waiting[key] == 0 and lo <= now <= hi:
                        self.starved.add(key)
            self.push(end, DONE, a.replica_id)

    # Report ----------------------------------------------------------------------------------------
    def report(self, wall_s: float) -> None:
        lo, hi = self.window
        span = hi - lo
        shard_len = {step.pool: step.cost_s for plan in self.plans.values() for step in plan}
        gpus = sum(self.sizes.values())
        busy = sum(self.busy_s.values()) / (gpus * span)
        waits_in_shards = [w / shard_len[p] for p, ws in self.waits.items() for w in ws]
        all_waits = [w for ws in self.waits.values() for w in ws]
        tenants = list(self.bulk_weight)
        per_weight = [sum(self.served[(p, t)] for p in self.sizes) / self.bulk_weight[t] for t in tenants]
        backlogged = not any(t in {k[1] for k in self.starved} for t in tenants)
        p50_us, p99_us = percentile(self.decision_s, 50) * 1e6, percentile(self.decision_s, 99) * 1e6
        cpu50_us, cpu99_us = percentile(self.decision_cpu_s, 50) * 1e6, percentile(self.decision_cpu_s, 99) * 1e6

        print(f"videofarm fleet simulation — policy farm.sched.Scheduler, seed {self.args.seed}")
        print(f"simulated horizon {hi / 3600:.2f} h of farm time; measured window {lo / 3600:.2f} h – {hi / 3600:.2f} h; "
              f"{gpus} GPUs; wall time {wall_s:.1f} s")
        print(f"workload: {BULK_CLIPS:,} bulk clips from {BULK_TENANTS} tenants (weights {'/'.join(f'{w:g}' for w in BULK_WEIGHTS)}), "
              f"interactive Poisson {self.arrival_rate * 3600:.0f} clips/h from {API_TENANTS} tenants "
              f"(~{self.args.interactive_load:.0%} of GPU time); {A14B_SHARE:.0%} of clips Wan 2.2 A14B 720p, the rest Wan 2.1 1.3B 480p")
        print(f"ready shards at the first decision: {self.peak_ready:,}; bulk aging {AGING_S:.0f} s; max_batch 1; "
              f"load average at start {self.load[0]:.1f} on {os.cpu_count()} CPUs (wall-clock costs include time others took)")
        print()
        print(f"{'pool':<28}{'GPUs':>6}{'shard':>9}{'busy':>9}{'int. share':>13}{'int. wait p99':>15}")
        for pool, n in self.sizes.items():
            ws = self.waits.get(pool, [])
            share = self._interactive_share(pool)
            print(f"{pool:<28}{n:>6}{shard_len[pool]:>8.0f}s{self.busy_s[pool] / (n * span):>9.1%}{share:>13.1%}"
                  f"{percentile(ws, 99):>14.2f}s")
        print()
        rows = [
            ("GPU busy fraction (window)", f"{busy:.1%}", ">= 95%", busy >= 0.95),
            ("policy cost per decision, p50 / p99 (wall clock)", f"{p50_us:.0f} / {p99_us:.0f} µs", "p99 <= 1 ms",
             p99_us <= 1000),
            ("policy cost per decision, p50 / p99 (CPU time)", f"{cpu50_us:.0f} / {cpu99_us:.0f} µs", "p99 <= 1 ms",
             cpu99_us <= 1000),
            ("interactive queue wait, p50 / p99 (shard lengths)",
             f"{percentile(waits_in_shards, 50):.3f} / {percentile(waits_in_shards, 99):.3f}", "p99 <= 1",
             percentile(waits_in_shards, 99) <= 1),
            ("Jain fairness, bulk served GPU time / weight", f"{jain(per_weight):.4f}", ">= 0.95", jain(per_weight) >= 0.95),
        ]
        print(f"{'figure':<52}{'value':>22}{'aim':>14}{'':>4}")
        for name, value, aim, ok in rows:
            print(f"{name:<52}{value:>22}{aim:>14}{'ok' if ok else 'MISS':>6}")
        print()
        print(f"interactive queue wait p50 / p99: {percentile(all_waits, 50):.2f} s / {percentile(all_waits, 99):.2f} s "
              f"over {len(all_waits):,} interactive shards; clip latency p50 / p99: "
              f"{percentile(self.latency, 50):.0f} s / {percentile(self.latency, 99):.0f} s")
        print(f"schedule() calls with decisions: {len(self.call_s):,} (p99 {percentile(self.call_s, 99) * 1e6:.0f} µs per call), "
              f"without: {self.empty_calls:,}; decisions {self.decisions:,}; aged bulk starts {self.aged:,}; "
              f"affinity {self.affine / max(self.decisions, 1):.1%} of heads")
        dry = ", ".join(f"{p}: {sum(k[0] == p for k in self.starved)}" for p in self.sizes)
        print(f"clips completed: {self.completed['interactive']:,} interactive, {self.completed['bulk']:,} bulk; "
              f"every bulk tenant waiting in every pool throughout the window: {'yes' if backlogged else 'NO'}"
              + ("" if backlogged else f" (tenants whose queue ran dry — {dry})"))
        per_pool = [jain([self.served[(p, t)] / self.bulk_weight[t] for t in tenants]) for p in self.sizes]
        print("Jain per pool: " + ", ".join(f"{p} {j:.4f}" for p, j in zip(self.sizes, per_pool))
              + f"; served per weight, min / max over tenants: {min(per_weight) / max(per_weight):.4f}")

    def _interactive_share(self, pool: str) -> float:
        """Interactive GPU time started in the window, as a share of the pool's capacity (estimates)."""
        lo, hi = self.window
        ws = self.waits.get(pool, [])
        cost = next(step.cost_s for plan in self.plans.values() for step in plan if step.pool == pool)
        return len(ws) * cost / (self.sizes[pool] * (hi - lo))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="random seed for arrivals, model mix and run-time noise")
    parser.add_argument("--horizon", type=parse_duration, default=parse_duration("4h"),
                        help="simulated farm time to run (e.g. 4h, 90m); the backlog is not drained")
    parser.add_argument("--warmup", type=parse_duration, default=parse_duration("30m"),
                        help="simulated time before the measured window starts (the low-noise pool fills meanwhile)")
    parser.add_argument("--gpus", type=int, default=1000, help="GPUs in the fleet, split across the three pools")
    parser.add_argument("--interactive-load", type=float, default=0.30,
                        help="interactive GPU time as a share of the fleet (above 1 the interactive queue grows)")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.horizon:
        parser.error(f"--warmup ({args.warmup:.0f} s) must be shorter than --horizon ({args.horizon:.0f} s)")
    sim = FleetSim(args)
    began = time.perf_counter()
    sim.run()
    sim.report(time.perf_counter() - began)


if __name__ == "__main__":
    main()
