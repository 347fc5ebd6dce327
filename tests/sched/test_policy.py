"""The pure scheduling policy: one test per rule, then properties over random event sequences.

No Ray, no clock: time is a float the test moves. The properties drive a small fleet through
random submits, finishes, cancels, replica arrivals and losses, and check after every
decision what the policy promises (farm/sched/policy.py, farm/sched/fair.py).
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.sched import Scheduler, SchedulerConfig, ShardRequest
from tests.figures import report

KEY = ("wan-tiny", "transformer", "256x256x9", 4)


def shard(job: str, tenant: str = "a", priority: str = "bulk", *, pool: str = "p", start: int = 0, end: int = 4,
          cost: float = 10.0, queued_at: float = 0.0, holder: str | None = None, key=KEY) -> ShardRequest:
    return ShardRequest(job, tenant, priority, pool, key, start, end, cost, queued_at, holder)


def jobs_of(assignments) -> list[list[str]]:
    return [[s.job_id for s in a.shards] for a in assignments]


# Interactive first ---------------------------------------------------------------------------
def test_interactive_takes_the_replica_at_the_shard_boundary():
    sched = Scheduler(SchedulerConfig(bulk_aging_s=None))
    sched.add_replica("r1", "p")
    sched.submit(shard("bulk-1"), now=0)
    assert jobs_of(sched.schedule(0)) == [["bulk-1"]]
    sched.submit(shard("chat-1", priority="interactive", queued_at=5), now=5)
    assert sched.schedule(5) == []  # no preemption mid-shard: r1 is busy
    # The bulk shard ends; its job's next shard is ready at the same moment, holding r1.
    sched.finished("r1")
    sched.submit(shard("bulk-1", start=4, end=8, holder="r1"), now=10)
    assert jobs_of(sched.schedule(10)) == [["chat-1"]]
    sched.finished("r1")
    decided = sched.schedule(20)
    assert jobs_of(decided) == [["bulk-1"]]  # resumes, from the state it kept
    assert decided[0].shards[0].start == 4 and decided[0].affinity


def test_bulk_runs_when_no_interactive_waits():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    sched.submit(shard("b"), now=0)
    assert jobs_of(sched.schedule(0)) == [["b"]]


# Fair share ------------------------------------------------------------------------------------
def test_weighted_fair_share_follows_weights():
    sched = Scheduler(SchedulerConfig(tenant_weights={"heavy": 3.0}))
    sched.add_replica("r1", "p")
    for i in range(200):
        sched.submit(shard(f"h{i}", "heavy"), now=0)
        sched.submit(shard(f"l{i}", "light"), now=0)
    served = {"heavy": 0, "light": 0}
    for step in range(100):
        (a,) = sched.schedule(step)
        served[a.shards[0].tenant] += 1
        sched.finished("r1")
    assert served == {"heavy": 75, "light": 25}


def test_costs_not_counts_are_shared():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    for i in range(100):
        sched.submit(shard(f"big{i}", "big", cost=30.0), now=0)
        sched.submit(shard(f"small{i}", "small", cost=10.0), now=0)
    cost = {"big": 0.0, "small": 0.0}
    for step in range(80):
        (a,) = sched.schedule(step)
        cost[a.shards[0].tenant] += a.shards[0].cost_s
        sched.finished("r1")
    assert abs(cost["big"] - cost["small"]) <= 30.0 + 10.0


def test_an_idle_tenant_banks_no_credit():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    for i in range(50):
        sched.submit(shard(f"a{i}", "a"), now=0)
    for step in range(40):
        sched.schedule(step)
        sched.finished("r1")
    for i in range(50):  # b arrives late: it shares from now on, it does not get 40 shards in a row
        sched.submit(shard(f"b{i}", "b", queued_at=40), now=40)
    tenants = []
    for step in range(40, 60):
        (a,) = sched.schedule(step)
        tenants.append(a.shards[0].tenant)
        sched.finished("r1")
    assert tenants.count("a") == tenants.count("b") == 10


def test_within_a_tenant_older_jobs_go_first():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    sched.submit(shard("new", queued_at=5), now=5)
    sched.submit(shard("old", start=4, end=8, queued_at=1), now=6)  # an older job's next shard
    assert jobs_of(sched.schedule(6)) == [["old"]]


# Aging -----------------------------------------------------------------------------------------
def _interactive_backlog(sched: Scheduler, n: int, now: float) -> None:
    for i in range(n):
        sched.submit(shard(f"i{now}-{i}", "api", "interactive", queued_at=now), now=now)


def test_aging_lets_one_bulk_shard_in_then_waits_again():
    sched = Scheduler(SchedulerConfig(bulk_aging_s=100.0))
    sched.add_replica("r1", "p")
    for i in range(5):
        sched.submit(shard(f"bulk{i}", "batch"), now=0)
    starts: list[tuple[float, str, bool]] = []
    for now in range(0, 400, 10):  # an interactive shard arrives every 10 s, each runs 10 s
        _interactive_backlog(sched, 1, now)
        for a in sched.schedule(now):
            starts.append((now, a.shards[0].priority, a.aged))
        sched.finished("r1")
    bulk_starts = [t for t, priority, _ in starts if priority == "bulk"]
    assert all(aged for _, priority, aged in starts if priority == "bulk")
    # The first bulk start waits for bulk_aging_s; then one per aging period, never two in a row.
    assert bulk_starts[0] > 100
    assert all(b - a > 100 for a, b in itertools.pairwise(bulk_starts))
    assert len(bulk_starts) >= 2
    priorities = [p for _, p, _ in starts]
    assert "bulk,bulk" not in ",".join(priorities)


def test_without_aging_bulk_waits_for_interactive_to_drain():
    sched = Scheduler(SchedulerConfig(bulk_aging_s=None))
    sched.add_replica("r1", "p")
    sched.submit(shard("bulk"), now=0)
    for now in range(0, 1000, 10):
        _interactive_backlog(sched, 1, now)
        assert [a.shards[0].priority for a in sched.schedule(now)] == ["interactive"]
        sched.finished("r1")
    assert jobs_of(sched.schedule(1000)) == [["bulk"]]


def test_aged_bulk_ranks_by_when_it_came_due():
    # Interactive work queued before the bulk aging came due runs first.
    sched = Scheduler(SchedulerConfig(bulk_aging_s=50.0))
    sched.add_replica("r1", "p")
    sched.submit(shard("bulk"), now=0)
    sched.submit(shard("early", "api", "interactive", queued_at=10), now=10)
    sched.submit(shard("late", "api", "interactive", queued_at=60), now=60)
    assert jobs_of(sched.schedule(60)) == [["early"]]  # 10 < 0 + 50
    sched.finished("r1")
    decided = sched.schedule(70)
    assert jobs_of(decided) == [["bulk"]] and decided[0].aged  # 0 + 50 < 60
    sched.finished("r1")
    assert jobs_of(sched.schedule(80)) == [["late"]]


# Affinity --------------------------------------------------------------------------------------
def test_affinity_sends_a_shard_to_the_replica_holding_its_state():
    sched = Scheduler()
    for r in ("r1", "r2", "r3"):
        sched.add_replica(r, "p")
    sched.submit(shard("j", holder="r2"), now=0)
    (a,) = sched.schedule(0)
    assert a.replica_id == "r2" and a.affinity


def test_affinity_never_beats_priority():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    sched.submit(shard("bulk", holder="r1"), now=0)
    sched.submit(shard("chat", "api", "interactive"), now=0)
    (a,) = sched.schedule(0)
    assert a.shards[0].job_id == "chat" and a.replica_id == "r1" and not a.affinity


def test_a_head_without_affinity_leaves_the_holder_free_for_its_shard():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    sched.add_replica("r2", "p")
    sched.submit(shard("first", "a"), now=0)
    sched.submit(shard("second", "b", holder="r1"), now=0)
    placed = {a.shards[0].job_id: a.replica_id for a in sched.schedule(0)}
    assert placed == {"first": "r2", "second": "r1"}


def test_a_holder_in_another_pool_is_ignored():
    sched = Scheduler()
    sched.add_replica("hi-1", "wan:transformer")
    sched.add_replica("lo-1", "wan:transformer_2")
    sched.submit(shard("j", pool="wan:transformer_2", holder="hi-1"), now=0)
    (a,) = sched.schedule(0)
    assert a.replica_id == "lo-1" and not a.affinity


# Batching --------------------------------------------------------------------------------------
def test_batches_take_compatible_shards_up_to_max_batch():
    sched = Scheduler(SchedulerConfig(max_batch=3))
    sched.add_replica("r1", "p")
    sched.add_replica("r2", "p")
    for i in range(5):
        sched.submit(shard(f"j{i}", f"t{i % 2}"), now=0)
    sched.submit(shard("other-shape", "t0", key=("wan-tiny", "transformer", "512x512x9", 4)), now=0)
    first = sched.schedule(0)
    assert sorted(len(a.shards) for a in first) == [2, 3]  # j0..j4; the other shape cannot join
    assert all(len({s.batch_key for s in a.shards}) == 1 for a in first)
    assert sched.schedule(0) == []
    sched.finished("r1")
    sched.finished("r2")
    assert jobs_of(sched.schedule(1)) == [["other-shape"]]


def test_bulk_does_not_ride_along_while_interactive_waits():
    sched = Scheduler(SchedulerConfig(max_batch=4))
    sched.add_replica("r1", "p")
    sched.submit(shard("chat", "api", "interactive"), now=0)
    sched.submit(shard("chat-other", "api", "interactive", key=("other",)), now=0)
    for i in range(3):
        sched.submit(shard(f"bulk{i}"), now=0)
    (a,) = sched.schedule(0)
    assert [s.job_id for s in a.shards] == ["chat"]


def test_batch_limits_per_pool_and_per_replica():
    sched = Scheduler(SchedulerConfig(max_batch=1, pool_max_batch={"small": 4}))
    sched.add_replica("s1", "small")
    sched.add_replica("b1", "big")
    sched.add_replica("b2", "big", max_batch=2)
    for i in range(6):
        sched.submit(shard(f"s{i}", pool="small"), now=0)
        sched.submit(shard(f"b{i}", pool="big"), now=0)
    sizes = {a.replica_id: len(a.shards) for a in sched.schedule(0)}
    assert sizes == {"s1": 4, "b1": 1, "b2": 2}


# Cancel, replica loss, queries -------------------------------------------------------------------
def test_cancel_drops_waiting_shards_only():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    sched.submit(shard("running"), now=0)
    sched.schedule(0)
    sched.submit(shard("a", start=0), now=1)
    sched.submit(shard("a", start=4, end=8), now=1)
    sched.submit(shard("b"), now=1)
    assert sched.queue_depth("p").bulk == 3
    assert sched.cancel("a") == 2
    assert sched.cancel("running") == 0
    assert sched.queue_depth("p").bulk == 1
    sched.finished("r1")
    assert jobs_of(sched.schedule(2)) == [["b"]]


def test_many_cancels_are_compacted_away():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    for i in range(5000):
        sched.submit(shard(f"j{i}", f"t{i % 3}"), now=0)
    for i in range(4990):
        sched.cancel(f"j{i}")
    queue = sched._pools["p"].queues["bulk"]
    assert sum(len(t.heap) for t in queue.tenants.values()) < 500
    assert [a.shards[0].job_id for a in sched.schedule(0)] == ["j4992"]  # t0 first among equal passes


def test_a_lost_replica_hands_back_what_it_ran():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    sched.add_replica("r2", "p")
    sched.submit(shard("j", holder="r1"), now=0)
    (a,) = sched.schedule(0)
    assert a.replica_id == "r1"
    handed_back = sched.remove_replica("r1")
    assert handed_back == a.shards
    sched.submit(handed_back[0], now=5)  # the caller resubmits from the last checkpoint
    (again,) = sched.schedule(5)
    assert again.replica_id == "r2" and again.shards == a.shards


def test_partial_finish_keeps_the_replica_busy():
    sched = Scheduler(SchedulerConfig(max_batch=2))
    sched.add_replica("r1", "p")
    sched.submit(shard("x"), now=0)
    sched.submit(shard("y"), now=0)
    (a,) = sched.schedule(0)
    assert len(a.shards) == 2
    sched.finished("r1", ["x"])
    sched.submit(shard("z"), now=1)
    assert sched.schedule(1) == []
    sched.finished("r1", ["y"])
    assert jobs_of(sched.schedule(2)) == [["z"]]


def test_queue_position_counts_what_runs_first():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    for i in range(3):
        sched.submit(shard(f"a{i}", "a"), now=0)
        sched.submit(shard(f"b{i}", "b"), now=0)
    sched.submit(shard("chat", "api", "interactive"), now=0)
    assert sched.queue_position("chat").shards_ahead == 0
    assert sched.queue_position("a0").shards_ahead == 1  # behind the interactive shard
    assert sched.queue_position("a2").shards_ahead == 1 + 2 + 2  # chat, a0 a1, b0 b1
    assert sched.queue_position("a2").cost_ahead_s == pytest.approx(50.0)
    assert sched.queue_position("nobody") is None
    order = [a.shards[0].job_id for _ in range(7) for a in _run_one(sched)]
    assert order.index("a2") == 5


def _run_one(sched: Scheduler):
    decided = sched.schedule(sched._now)
    sched.finished("r1")
    return decided


def test_queue_depth_by_priority():
    sched = Scheduler()
    sched.submit(shard("b"), now=0)
    sched.submit(shard("i", priority="interactive"), now=0)
    depth = sched.queue_depth("p")
    assert (depth.interactive, depth.bulk, depth.total) == (1, 1, 2)
    assert sched.queue_depth("unknown").total == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"priority": "urgent"}, "priority"),
        ({"cost": 0.0}, "cost_s"),
        ({"start": 4, "end": 4}, "start < end"),
        ({"key": ["unhashable"]}, "batch_key"),
    ],
)
def test_bad_shards_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        shard("j", **kwargs)


def test_misuse_is_refused_by_name():
    sched = Scheduler()
    sched.add_replica("r1", "p")
    with pytest.raises(ValueError, match="already registered"):
        sched.add_replica("r1", "p")
    with pytest.raises(ValueError, match="max_batch"):
        sched.add_replica("r2", "p", max_batch=0)
    with pytest.raises(ValueError, match="unknown replica"):
        sched.finished("nope")
    with pytest.raises(ValueError, match="queued_at"):
        sched.submit(shard("j", queued_at=10), now=5)
    sched.submit(shard("j"), now=5)
    with pytest.raises(ValueError, match="already waiting"):
        sched.submit(shard("j"), now=5)
    with pytest.raises(ValueError, match="backwards"):
        sched.schedule(1)
    with pytest.raises(ValueError, match="bulk_aging_s"):
        SchedulerConfig(bulk_aging_s=-1)
    with pytest.raises(ValueError, match="tenant_weights"):
        SchedulerConfig(tenant_weights={"t": 0})


# Decision cost -----------------------------------------------------------------------------------
def _ops_per_decision(waiting: int, decisions: int = 2000) -> float:
    """Heap operations per decision with ``waiting`` ready shards kept waiting throughout."""
    sched = Scheduler(SchedulerConfig(tenant_weights={f"t{i}": 1 + i % 4 for i in range(50)}))
    for r in range(8):
        sched.add_replica(f"r{r}", "p")
    rng = random.Random(7)
    jobs = itertools.count()
    for _ in range(waiting):
        sched.submit(shard(f"j{next(jobs)}", f"t{rng.randrange(50)}", cost=rng.uniform(5, 50)), now=0)
    busy = [a.replica_id for a in sched.schedule(0)]
    before = sched.stats
    for step in range(1, decisions + 1):
        sched.finished(busy[step % len(busy)])
        priority = "interactive" if step % 5 == 0 else "bulk"
        sched.submit(shard(f"j{next(jobs)}", f"t{rng.randrange(50)}", priority, cost=rng.uniform(5, 50),
                           queued_at=step), now=step)
        if step % 7 == 0:
            sched.cancel(f"j{rng.randrange(waiting)}")
        sched.schedule(step)
    after = sched.stats
    return (after.heap_ops - before.heap_ops) / (after.decisions - before.decisions)


def test_decision_cost_does_not_grow_with_the_queue():
    small, large = _ops_per_decision(1_000), _ops_per_decision(100_000)
    report(f"heap operations per decision: {small:.1f} with 1k ready shards, {large:.1f} with 100k")
    # Each heap operation is O(log n); their number per decision must not grow with n.
    assert large <= 1.5 * small + 1
    assert large < 20


# Properties over random event sequences ------------------------------------------------------------
POOLS = ("p0", "p1")
KEYS = (("m", "e", "a", 4), ("m", "e", "b", 4))
TENANTS = ("t0", "t1", "t2")

event = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 2), st.sampled_from(["interactive", "bulk"]), st.integers(0, 1),
              st.integers(0, 1), st.floats(1.0, 20.0), st.integers(1, 3)),
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("add"), st.integers(0, 1), st.integers(1, 3)),
    st.tuples(st.just("remove"), st.integers(0, 50)),
    st.tuples(st.just("tick"), st.floats(0.0, 12.0)),
)


class Fleet:
    """Drives a Scheduler like a dispatcher would and checks every decision it makes."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.sched = Scheduler(config)
        self.now = 0.0
        self.replicas: dict[str, tuple[str, int]] = {}  # id → (pool, max_batch)
        self.busy: dict[str, tuple] = {}
        self.next_replica = itertools.count()
        self.jobs: dict[str, dict] = {}
        self.next_job = itertools.count()
        self.submitted: set[tuple[str, int]] = set()  # (job, start) submissions still owed a start
        self.cancelled: set[str] = set()
        self.log: dict[str, list[str]] = {p: [] for p in POOLS}  # per pool: priority of each started shard
        self.pending_interactive: dict[tuple[str, int], tuple[str, int]] = {}  # → (pool, log length at submit)

    def add(self, pool: str, max_batch: int) -> None:
        rid = f"r{next(self.next_replica)}"
        self.sched.add_replica(rid, pool, max_batch=max_batch)
        self.replicas[rid] = (pool, max_batch)

    def submit_shard(self, job_id: str, holder: str | None) -> None:
        job = self.jobs[job_id]
        start = job["done"]
        s = ShardRequest(job_id, job["tenant"], job["priority"], job["pool"], job["key"], start, start + 1,
                         job["cost"], job["queued_at"], holder)
        self.sched.submit(s, self.now)
        self.submitted.add((job_id, start))
        if s.priority == "interactive":
            self.pending_interactive[(job_id, start)] = (s.pool, len(self.log[s.pool]))

    def apply(self, ev) -> None:
        kind = ev[0]
        if kind == "submit":
            _, t, priority, p, k, cost, n = ev
            job_id = f"j{next(self.next_job)}"
            self.jobs[job_id] = dict(tenant=TENANTS[t], priority=priority, pool=POOLS[p], key=KEYS[k], cost=cost,
                                     queued_at=self.now, shards=n, done=0)
            self.submit_shard(job_id, None)
        elif kind == "finish" and self.busy:
            rid = sorted(self.busy)[ev[1] % len(self.busy)]
            self.finish(rid)
        elif kind == "cancel" and self.jobs:
            job_id = sorted(self.jobs)[ev[1] % len(self.jobs)]
            self.sched.cancel(job_id)
            self.cancelled.add(job_id)
            self.submitted = {(j, s) for j, s in self.submitted if j != job_id}
            self.pending_interactive = {k: v for k, v in self.pending_interactive.items() if k[0] != job_id}
        elif kind == "add" and len(self.replicas) < 8:
            self.add(POOLS[ev[1]], ev[2])
        elif kind == "remove" and self.replicas:
            rid = sorted(self.replicas)[ev[1] % len(self.replicas)]
            handed_back = self.sched.remove_replica(rid)
            assert set(handed_back) == set(self.busy.pop(rid, ()))
            del self.replicas[rid]
            for s in handed_back:  # resubmitted from the checkpoint, keeping the job's place in line
                if s.job_id not in self.cancelled:
                    self.submit_shard(s.job_id, None)
        elif kind == "tick":
            self.now += ev[1]
        self.decide()

    def finish(self, rid: str) -> None:
        shards = self.busy.pop(rid)
        assert set(self.sched.finished(rid)) == set(shards)
        for s in shards:
            job = self.jobs[s.job_id]
            job["done"] = s.end
            if job["done"] < job["shards"] and s.job_id not in self.cancelled:
                self.submit_shard(s.job_id, rid)

    def decide(self) -> None:
        for a in self.sched.schedule(self.now):
            pool, max_batch = self.replicas[a.replica_id]
            assert a.replica_id not in self.busy, "a busy replica got more work"
            assert 1 <= len(a.shards) <= max_batch
            head = a.shards[0]
            assert all(s.pool == pool == a.pool and s.batch_key == head.batch_key for s in a.shards)
            if any(s.priority == "interactive" for s in a.shards):
                # Interactive bound: at most one bulk shard started in this pool between the
                # submission of an interactive shard and the assignment that starts it.
                for s in a.shards:
                    if s.priority == "interactive":
                        p, mark = self.pending_interactive.pop((s.job_id, s.start))
                        assert self.log[p][mark:].count("bulk") <= 1, "interactive waited behind two bulk shards"
            for s in a.shards:
                self.submitted.remove((s.job_id, s.start))
                self.log[pool].append(s.priority)
            self.busy[a.replica_id] = a.shards

    def drain(self) -> None:
        """Run to quiescence: every pool gets a replica, replicas finish until nothing waits."""
        for pool in POOLS:
            if not any(p == pool for p, _ in self.replicas.values()):
                self.add(pool, 1)
        self.decide()
        for _ in range(10_000):
            if not self.busy:
                break
            self.now += 1.0
            for rid in sorted(self.busy):
                self.finish(rid)
            self.decide()
        assert not self.busy
        assert not self.submitted, f"never scheduled: {sorted(self.submitted)[:5]}"
        assert all(self.sched.queue_depth(p).total == 0 for p in POOLS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event, min_size=5, max_size=200),
    aging=st.sampled_from([None, 0.0, 5.0, 30.0]),
    initial=st.lists(st.tuples(st.integers(0, 1), st.integers(1, 3)), min_size=0, max_size=4),
)
def test_random_fleets_keep_every_promise(events, aging, initial):
    fleet = Fleet(SchedulerConfig(bulk_aging_s=aging, tenant_weights={"t0": 1.0, "t1": 2.0, "t2": 0.5}))
    for pool, max_batch in initial:
        fleet.add(POOLS[pool], max_batch)
    for ev in events:
        fleet.apply(ev)
    fleet.drain()


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]), min_size=2, max_size=4),
    replicas=st.integers(1, 4),
    max_batch=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_fair_share_error_stays_bounded(weights, replicas, max_batch, seed):
    """While tenants all wait, served cost per weight between any two differs, over any window,
    by at most c_i/w_i + c_j/w_j + 2 * slack (slack = (max_batch - 1) * c_max / w_min)."""
    rng = random.Random(seed)
    tenants = [f"t{i}" for i in range(len(weights))]
    weight = dict(zip(tenants, weights))
    sched = Scheduler(SchedulerConfig(tenant_weights=weight, max_batch=max_batch, bulk_aging_s=None))
    for r in range(replicas):
        sched.add_replica(f"r{r}", "p")
    c_max = {t: 0.0 for t in tenants}
    for t in tenants:
        for i in range(60):
            cost = rng.uniform(1.0, 10.0)
            c_max[t] = max(c_max[t], cost)
            sched.submit(shard(f"{t}-{i}", t, cost=cost), now=0)
    slack = (max_batch - 1) * max(c_max.values()) / min(weights)
    served = dict.fromkeys(tenants, 0.0)
    pairs = list(itertools.combinations(tenants, 2))
    low = {pair: 0.0 for pair in pairs}  # min over a <= b of D(a), and max of D
    high = {pair: 0.0 for pair in pairs}
    busy: list[str] = []
    now = 0
    while all(sched._pools["p"].queues["bulk"].tenants.get(t) for t in tenants):
        for a in sched.schedule(now):
            busy.append(a.replica_id)
            for s in a.shards:
                served[s.tenant] += s.cost_s
            for i, j in pairs:
                d = served[i] / weight[i] - served[j] / weight[j]
                bound = c_max[i] / weight[i] + c_max[j] / weight[j] + 2 * slack + 1e-9
                assert d - low[(i, j)] <= bound and high[(i, j)] - d <= bound
                low[(i, j)] = min(low[(i, j)], d)
                high[(i, j)] = max(high[(i, j)], d)
        now += 1
        sched.finished(busy.pop(rng.randrange(len(busy))))
