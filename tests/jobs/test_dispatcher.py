"""The dispatcher in one process: real tiny-model stages, the scheduling policy, faults injected on purpose.

A lost replica is retried from the state before the shard; a model that fails (NaN, out of
memory) gets ``shard_retries`` more tries and then fails its job with a clear code while other
jobs complete; a storage outage is waited out within its budget; a restarted dispatcher
resumes from the last acknowledged checkpoint; an interactive job overtakes a running bulk
job at its next shard boundary, and the bulk job still ends with the latents of an
uninterrupted run. The same faults are injected for real against `farm up` in
tests/serve/test_faults.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from farm.jobs.dispatcher import (
    Decoded,
    Dispatcher,
    Finished,
    Prepared,
    ShardOutcome,
    _error_code,
    params_of,
    shard_checkpoint_key,
)
from farm.jobs.estimates import estimate_in_flight, estimate_queued
from farm.jobs.retry import ReplicaLost, RetryPolicy, is_transient_storage_error
from farm.jobs.store import Priority
from farm.render.denoise import NonFiniteLatents, plan_shards, run_shards
from farm.render.faults import FaultInjection, injected, matching
from farm.storage.s3 import ObjectNotFound, StorageError, StorageUnavailable

STEPS, SHARD_STEPS = 6, 2
FAST = RetryPolicy(shard_retries=2, replica_retries=3, backoff_s=0.01, backoff_max_s=0.05, storage_retry_s=5.0)
POOL = "wan-tiny:transformer"
DECODE_S, FINISH_S = 0.5, 0.25  # what the fake decoder and finisher report


@pytest.fixture
def store(tmp_path):
    """SQLite only: the policy under test lives in the dispatcher, not the database (tests/jobs/test_store.py covers both)."""
    from farm.jobs.store import JobStore

    jobs = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    jobs.migrate()
    yield jobs
    jobs.close()


@pytest.fixture(scope="module")
def stages(tiny_spec):
    from farm.render.engine import DenoiserStage, TextEncoderStage

    return TextEncoderStage(tiny_spec, device="cpu"), DenoiserStage(tiny_spec, device="cpu")


class LocalStages:
    """StageClients in this process, replica ids and all, with faults to inject:

    ``lose[n]``: the n-th shard call (0-based) dies half-way, as a killed replica would;
    ``faults``: chaos faults applied to the model exactly as the Denoiser replica applies them;
    ``gates``: prompt, or (prompt, start step) → event a shard of that prompt waits for before it runs.

    Each completed call reports its wall time as a replica does (``reported``: (job, stage,
    seconds)); decode and finish report ``DECODE_S`` and ``FINISH_S``.
    ``ran`` records every shard as (prompt, start, end, replica), in the order they ran.
    """

    def __init__(self, spec, stages, *, lose=(), faults=(), denoisers=2, objects=None, gates=None,
                 storage=FAST) -> None:
        self.spec = spec
        self.encoder, self.denoiser = stages
        self.lose = set(lose)
        self.faults = [FaultInjection.model_validate(f) for f in faults]
        self.objects = objects
        self.storage = storage  # the replicas' own storage retries
        self.gates = gates or {}
        self.denoisers = [f"denoiser-{i}" for i in range(denoisers)]
        self.calls: Counter[str] = Counter()
        self.shard_calls = 0
        self.ran: list[tuple[str, int, int, str]] = []
        self.finished: dict[str, torch.Tensor] = {}
        self.reported: list[tuple[str, str, float]] = []
        self._model = asyncio.Lock()  # one model in this process: shards take turns, as on one replica
        self._writer = None

    def replicas(self):
        return {"encode": ["encoder-0"], POOL: self.denoisers, "decode": ["decoder-0"]}

    async def start(self, replica, job_id, model_id, params, resume_from):
        """What the Encoder replica does, with the same checkpoint code (farm/serve/checkpoints.py)."""
        from farm.render.denoise import layout_of
        from farm.render.engine import initial_state
        from farm.serve.checkpoints import read_checkpoint, write_conditioning

        state = None
        if resume_from and self.objects is not None:
            state = await asyncio.to_thread(read_checkpoint, self.objects, self.storage, job_id, resume_from)
        if state is None:
            cond = self.encoder.encode(params.prompt)
            state = initial_state(self.spec, params, cond)
            if self.objects is not None:
                await asyncio.to_thread(write_conditioning, self.objects, self.storage, job_id, cond)
        return Prepared(state, layout_of(state), state.step_index, replica)

    async def run_shard(self, replica, job_id, model_id, state, plan, *, checkpoint, prompt="", batch=None):
        call = self.shard_calls
        self.shard_calls += 1
        self.calls[prompt] += 1
        gate = self.gates.get((prompt, plan.start)) or self.gates.get(prompt)
        if gate is not None:
            await gate.wait()
        if call in self.lose:
            self.denoiser.run(state, plan.start, plan.start + 1)  # work done, then the process is gone
            raise ReplicaLost(f"replica died running steps {plan.start}-{plan.end}")
        async with self._model:
            self.ran.append((prompt, plan.start, plan.end, replica))
            started = time.perf_counter()
            with injected(self.denoiser.experts, matching(self.faults, prompt)):
                new_state = await asyncio.to_thread(self.denoiser.run, state, plan.start, plan.end)
            seconds = time.perf_counter() - started
        if checkpoint is not None and self.objects is not None:
            from farm.serve.checkpoints import CheckpointWriter

            self._writer = self._writer or CheckpointWriter(self.objects, self.storage)
            self._writer.start(checkpoint, new_state)
        self.reported.append((job_id, f"shard {plan.start}-{plan.end}", seconds))
        return ShardOutcome(new_state, replica, seconds, checkpoint if self.objects is not None else None, "cpu")

    async def checkpointed(self, replica, key):
        return self._writer is not None and await self._writer.done(key)

    async def decode(self, replica, job_id, model_id, state):
        self.reported.append((job_id, "decode", DECODE_S))
        return Decoded(state.latents, DECODE_S, "cpu")  # the tests compare latents: no VAE needed

    async def finish(self, job_id, model_id, params, frames):
        self.finished[job_id] = frames
        self.reported.append((job_id, "finish", FINISH_S))
        return Finished({"video": f"videos/{job_id}/video.mp4"}, FINISH_S)

    def shards_of(self, prompt):
        return [(start, end) for p, start, end, _ in self.ran if p == prompt]


class MemoryObjects:
    """The ObjectStore calls checkpoints make; ``outage`` calls fail as an unreachable S3 does."""

    def __init__(self, outage: int = 0) -> None:
        self.data: dict[str, bytes] = {}
        self.outage = outage
        self.refused = 0

    def _maybe_down(self, key):
        if self.refused < self.outage:
            self.refused += 1
            raise StorageUnavailable(f"put s3://bucket/{key}: endpoint did not answer")

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        self._maybe_down(key)
        self.data[key] = data

    def get_bytes(self, key):
        self._maybe_down(key)
        if key not in self.data:
            raise ObjectNotFound(f"{key} does not exist")
        return self.data[key]

    def delete(self, key):
        self._maybe_down(key)
        self.data.pop(key, None)

    def delete_prefix(self, prefix):
        for key in [k for k in self.data if k.startswith(prefix)]:
            del self.data[key]


def _reference(spec, stages, prompt, seed):
    """The fault-free render: one process, no shards."""
    from farm.render.engine import initial_state
    from farm.render.registry import validate_request

    encoder, denoiser = stages
    params = validate_request(spec, prompt=prompt, size="64x64", seconds=1, steps=STEPS, seed=seed)
    state = initial_state(spec, params, encoder.encode(prompt))
    return run_shards(denoiser.experts, state, plan_shards(state)).latents


def _submit(store, spec, prompt, seed):
    return store.create(model=spec.id, prompt=prompt, size="64x64", seconds=1, params={"steps": STEPS, "seed": seed}).id


async def _run_until_done(dispatcher, store, ids, timeout=120.0):
    runner = asyncio.create_task(dispatcher.run())
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [store.get(i) for i in ids]
            if all(j.terminal for j in jobs):
                return jobs
            await asyncio.sleep(0.05)
        raise AssertionError(f"jobs not done: {[(j.id, j.status, j.step_index) for j in jobs]}")
    finally:
        await dispatcher.stop()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def test_lost_replica_mid_shard_is_retried_from_the_state_before_it(store, tiny_spec, stages):
    objects = MemoryObjects()
    clients = LocalStages(tiny_spec, stages, lose={1}, objects=objects)  # the second shard's replica dies
    dispatcher = Dispatcher(store, clients, [tiny_spec], objects=objects, shard_steps=SHARD_STEPS, policy=FAST)
    job_id = _submit(store, tiny_spec, "a red fox runs through fresh snow", 7)

    [job] = asyncio.run(_run_until_done(dispatcher, store, [job_id]))

    assert job.status == "completed", job.error_message
    assert [(r.stage, r.reason) for r in dispatcher.retries] == [("shard 2-4", "replica_lost")]
    assert clients.shards_of("a red fox runs through fresh snow") == [(0, 2), (2, 4), (4, 6)]
    reference = _reference(tiny_spec, stages, "a red fox runs through fresh snow", 7)
    assert torch.equal(clients.finished[job_id], reference)
    assert objects.data == {}  # the checkpoint is dropped once the job is done


class RecordedMetrics:
    """FarmMetrics' shape, recording what the dispatcher reports: name → [(value, tags)]."""

    def __init__(self):
        self.recorded: dict[str, list] = {}

    def __getattr__(self, name):
        calls = self.recorded.setdefault(name, [])

        class Family:
            def inc(self, value=1.0, tags=None):
                calls.append((value, tags))

            set = observe = inc

        return Family()


def test_replica_busy_seconds_are_exported_as_they_grow(store, tiny_spec, stages):
    metrics = RecordedMetrics()
    clients = LocalStages(tiny_spec, stages)
    dispatcher = Dispatcher(store, clients, [tiny_spec], shard_steps=SHARD_STEPS, policy=FAST, metrics=metrics)
    job_id = _submit(store, tiny_spec, "a kite over dunes", 2)

    async def run_and_report():
        [job] = await _run_until_done(dispatcher, store, [job_id])
        dispatcher._depth_at = float("-inf")  # report now, not a second after the last report
        await dispatcher._report_metrics()
        first = list(metrics.recorded["replica_busy"])
        dispatcher._depth_at = float("-inf")
        await dispatcher._report_metrics()
        return job, first

    job, first = asyncio.run(run_and_report())
    assert job.status == "completed", job.error_message
    exported: dict[tuple, float] = {}
    for value, tags in first:
        assert value > 0
        exported[(tags["pool"], tags["replica"])] = exported.get((tags["pool"], tags["replica"]), 0.0) + value
    busy = dispatcher.placement.replica_busy_s
    assert {replica for _, replica in exported} == set(busy) and len(busy) >= 3  # encoder, denoiser, decoder
    for (pool, replica), seconds in exported.items():
        assert seconds == pytest.approx(busy[replica]) and dispatcher.placement.pool_of(replica) == pool
    assert metrics.recorded["replica_busy"] == first  # nothing grew since: nothing more exported


def test_replicas_lost_beyond_the_budget_fail_the_job(store, tiny_spec, stages):
    clients = LocalStages(tiny_spec, stages, lose=range(100))
    dispatcher = Dispatcher(store, clients, [tiny_spec], shard_steps=SHARD_STEPS, policy=FAST)
    job_id = _submit(store, tiny_spec, "neon city in the rain", 1)

    [job] = asyncio.run(_run_until_done(dispatcher, store, [job_id]))

    assert (job.status, job.error_code) == ("failed", "replica_lost")
    assert clients.shard_calls == 1 + FAST.replica_retries


@pytest.mark.parametrize(("kind", "code"), [("nan", "non_finite_latents"), ("oom", "out_of_memory")])
def test_failing_model_fails_its_job_after_its_retries_and_others_complete(store, tiny_spec, stages, kind, code):
    clients = LocalStages(tiny_spec, stages, faults=[{"kind": kind, "prompt_contains": "chaos"}])
    dispatcher = Dispatcher(store, clients, [tiny_spec], shard_steps=SHARD_STEPS, policy=FAST)
    bad = _submit(store, tiny_spec, f"chaos {kind}: a storm", 3)
    good = [_submit(store, tiny_spec, f"calm sea {i}", i) for i in range(2)]

    jobs = {j.id: j for j in asyncio.run(_run_until_done(dispatcher, store, [bad, *good]))}

    assert (jobs[bad].status, jobs[bad].error_code) == ("failed", code)
    assert clients.calls[f"chaos {kind}: a storm"] == 1 + FAST.shard_retries  # the first shard, 3 tries
    assert [r.reason for r in dispatcher.retries] == [code] * FAST.shard_retries
    assert all(jobs[i].status == "completed" for i in good)


def test_a_render_error_that_clears_on_retry_does_not_fail_the_job(store, tiny_spec, stages):
    class FlakyOnce(LocalStages):
        async def run_shard(self, replica, job_id, model_id, state, plan, *, checkpoint, prompt="", batch=None):
            if self.shard_calls == 2:
                self.shard_calls += 1
                raise torch.OutOfMemoryError("CUDA out of memory (once)")
            return await super().run_shard(replica, job_id, model_id, state, plan, checkpoint=checkpoint, prompt=prompt)

    clients = FlakyOnce(tiny_spec, stages)
    dispatcher = Dispatcher(store, clients, [tiny_spec], shard_steps=SHARD_STEPS, policy=FAST)
    job_id = _submit(store, tiny_spec, "夕焼けの海辺を走る犬", 5)

    [job] = asyncio.run(_run_until_done(dispatcher, store, [job_id]))

    assert job.status == "completed"
    assert torch.equal(clients.finished[job_id], _reference(tiny_spec, stages, "夕焼けの海辺を走る犬", 5))


def test_storage_outage_is_waited_out_without_using_the_retry_budgets(store, tiny_spec, stages):
    objects = MemoryObjects(outage=4)  # four checkpoint writes refused in a row
    policy = RetryPolicy(shard_retries=0, replica_retries=0, backoff_s=0.01, backoff_max_s=0.05, storage_retry_s=10.0)
    clients = LocalStages(tiny_spec, stages, objects=objects, storage=policy)
    dispatcher = Dispatcher(store, clients, [tiny_spec], objects=objects, shard_steps=SHARD_STEPS, policy=policy)
    job_id = _submit(store, tiny_spec, "桜の花びらが舞う京都の路地を歩く猫", 9)

    [job] = asyncio.run(_run_until_done(dispatcher, store, [job_id]))

    assert job.status == "completed", job.error_message
    assert objects.refused == 4 and not dispatcher.retries


def test_storage_outage_longer_than_its_budget_fails_the_job_in_bounded_time(store, tiny_spec, stages):
    objects = MemoryObjects(outage=10**6)
    policy = RetryPolicy(backoff_s=0.05, backoff_max_s=0.2, storage_retry_s=1.0)
    clients = LocalStages(tiny_spec, stages, objects=objects, storage=policy)
    dispatcher = Dispatcher(store, clients, [tiny_spec], objects=objects, shard_steps=SHARD_STEPS, policy=policy)
    job_id = _submit(store, tiny_spec, "a lighthouse at night", 2)

    started = time.monotonic()
    [job] = asyncio.run(_run_until_done(dispatcher, store, [job_id]))

    assert (job.status, job.error_code) == ("failed", "storage_unavailable")
    assert time.monotonic() - started < 15
    assert objects.refused > 2  # it did retry


def test_restarted_dispatcher_resumes_from_the_checkpoint(store, tiny_spec, stages):
    objects = MemoryObjects()
    prompt = "a paper boat on a river"
    job_id = _submit(store, tiny_spec, prompt, 11)

    async def first_run():
        never = asyncio.Event()  # the third shard waits forever: the dispatcher dies there, mid-job
        clients = LocalStages(tiny_spec, stages, objects=objects, gates={(prompt, 2 * SHARD_STEPS): never})
        dispatcher = Dispatcher(store, clients, [tiny_spec], objects=objects, shard_steps=SHARD_STEPS,
                                worker="dispatcher", policy=FAST)
        runner = asyncio.create_task(dispatcher.run())
        # Two shards done and the second one's checkpoint acknowledged.
        while store.get(job_id).checkpoint_key != shard_checkpoint_key(job_id, 2 * SHARD_STEPS):
            await asyncio.sleep(0.01)
        tasks = [runner, *(f.task for f in dispatcher._flights.values())]
        for task in tasks:  # no requeue: as if the process were killed
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(first_run())
    held = store.get(job_id)
    assert (held.status, held.checkpoint_key) == ("in_progress", shard_checkpoint_key(job_id, 4))
    assert held.lease_owner.startswith("dispatcher:")  # role:instance
    # One checkpoint per job: the first shard's was deleted once the second one's was recorded.
    assert sorted(objects.data) == [f"checkpoints/{job_id}/conditioning.pt", shard_checkpoint_key(job_id, 4)]

    clients = LocalStages(tiny_spec, stages, objects=objects)
    dispatcher = Dispatcher(store, clients, [tiny_spec], objects=objects, shard_steps=SHARD_STEPS,
                            worker="dispatcher", policy=FAST)
    [job] = asyncio.run(_run_until_done(dispatcher, store, [job_id]))

    assert job.status == "completed"
    assert clients.shards_of(prompt) == [(4, 6)]  # only what was left
    assert dispatcher.status()["resumed"] == [{"job_id": job_id, "step": 4}]
    assert torch.equal(clients.finished[job_id], _reference(tiny_spec, stages, prompt, 11))
    assert objects.data == {}


def test_a_graceful_stop_drains_to_the_shard_boundary_and_the_next_dispatcher_redoes_nothing(
        store, tiny_spec, stages):
    """`stop(drain_s)` mid-shard: the shard ends, its checkpoint is recorded, the job goes back to the
    queue without spending an attempt, and the next dispatcher runs only the shards left."""
    objects = MemoryObjects()
    prompt = "a lantern festival at night"
    job_id = _submit(store, tiny_spec, prompt, 13)
    release = asyncio.Event()

    async def first_run():
        clients = LocalStages(tiny_spec, stages, objects=objects, gates={(prompt, SHARD_STEPS): release})
        dispatcher = Dispatcher(store, clients, [tiny_spec], objects=objects, shard_steps=SHARD_STEPS,
                                worker="dispatcher", policy=FAST, leader_lease_s=1.2)
        runner = asyncio.create_task(dispatcher.run())
        while clients.calls[prompt] < 2:  # the second shard is running (held at its gate)
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(dispatcher.stop(drain_s=30))
        await asyncio.sleep(2.0)  # longer than the leader lease
        assert not stopping.done()  # it waits for the shard in flight
        # ... and still leads: a standby must not take the draining jobs back as lost.
        assert store.leader_of("dispatcher").holder == dispatcher.worker
        release.set()
        await stopping
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return clients

    first = asyncio.run(first_run())
    held = store.get(job_id)
    assert first.shards_of(prompt) == [(0, 2), (2, 4)]  # no third shard was started
    assert (held.status, held.attempts, held.checkpoint_key) == ("queued", 0, shard_checkpoint_key(job_id, 4))

    clients = LocalStages(tiny_spec, stages, objects=objects)
    dispatcher = Dispatcher(store, clients, [tiny_spec], objects=objects, shard_steps=SHARD_STEPS,
                            worker="dispatcher", policy=FAST)
    [job] = asyncio.run(_run_until_done(dispatcher, store, [job_id]))
    assert job.status == "completed" and job.attempts == 1
    assert clients.shards_of(prompt) == [(4, 6)]
    assert torch.equal(clients.finished[job_id], _reference(tiny_spec, stages, prompt, 13))


def test_interactive_overtakes_a_running_bulk_job_at_its_next_shard_boundary(store, tiny_spec, stages):
    """One denoiser replica. A bulk job's first shard is running when an interactive job arrives:
    the replica goes to every interactive shard next, the bulk job waits with its state, resumes
    from exactly there, and ends with the latents of an uninterrupted run."""
    bulk_prompt, interactive_prompt = "a slow bulk render of waves", "an urgent interactive fox"
    release = asyncio.Event()
    clients = LocalStages(tiny_spec, stages, denoisers=1, gates={(bulk_prompt, 0): release})
    dispatcher = Dispatcher(store, clients, [tiny_spec], shard_steps=SHARD_STEPS, policy=FAST, poll_s=0.05)
    bulk = store.create(model=tiny_spec.id, prompt=bulk_prompt, size="64x64", seconds=1,
                        params={"steps": STEPS, "seed": 3}, priority=Priority.BULK).id

    async def scenario():
        runner = asyncio.create_task(dispatcher.run())
        try:
            while clients.calls[bulk_prompt] == 0:  # the bulk job holds the replica, in its first shard
                await asyncio.sleep(0.01)
            interactive = _submit(store, tiny_spec, interactive_prompt, 4)
            dispatcher.wake()
            while dispatcher.placement.depths()[POOL]["interactive"] == 0:  # its first shard waits
                await asyncio.sleep(0.01)
            release.set()  # the bulk shard ends: a shard boundary
            while not all(store.get(i).terminal for i in (bulk, interactive)):
                await asyncio.sleep(0.02)
            return interactive
        finally:
            await dispatcher.stop()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    interactive = asyncio.run(scenario())
    order = [(prompt, start) for prompt, start, _end, _replica in clients.ran]
    assert order == [(bulk_prompt, 0), (interactive_prompt, 0), (interactive_prompt, 2), (interactive_prompt, 4),
                     (bulk_prompt, 2), (bulk_prompt, 4)]
    assert store.get(bulk).status == store.get(interactive).status == "completed"
    assert torch.equal(clients.finished[bulk], _reference(tiny_spec, stages, bulk_prompt, 3))
    assert torch.equal(clients.finished[interactive], _reference(tiny_spec, stages, interactive_prompt, 4))


def test_the_dispatcher_imports_no_torch():
    code = ("import sys; import farm.jobs.dispatcher, farm.jobs.placement, farm.sched; "
            "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')); "
            "assert not leaked, leaked[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_error_codes_match_through_rays_wrapping():
    from ray.exceptions import RayTaskError

    def wrapped(exc):
        return RayTaskError("run_shard", "Traceback ...", exc).as_instanceof_cause()

    assert _error_code(wrapped(NonFiniteLatents("steps [0, 2) left NaN"))) == "non_finite_latents"
    assert _error_code(wrapped(torch.OutOfMemoryError("CUDA out of memory"))) == "out_of_memory"
    assert _error_code(wrapped(StorageUnavailable("endpoint did not answer"))) == "storage_unavailable"
    assert _error_code(ReplicaLost("gone")) == "replica_lost"
    assert _error_code(ValueError("bad")) == "render_error"


def test_only_transient_storage_errors_are_retried():
    assert is_transient_storage_error(StorageUnavailable("down"))
    assert is_transient_storage_error(StorageError("busy", code="SlowDown"))
    assert not is_transient_storage_error(StorageError("denied", code="AccessDenied"))
    assert not is_transient_storage_error(ObjectNotFound("gone", code="NoSuchKey"))
    try:
        from botocore.exceptions import EndpointConnectionError

        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        except EndpointConnectionError as inner:
            raise StorageError("upload failed") from inner  # what boto3's transfer manager hands back
    except StorageError as outer:
        assert is_transient_storage_error(outer)


def test_storage_errors_are_counted_once_each_for_the_metric():
    """RetryPolicy's hook (the videofarm_storage_errors_total counter): every transient error, the one
    that exhausts the budget included; answers that will not change are not counted."""
    seen = []
    policy = RetryPolicy(backoff_s=0.001, backoff_max_s=0.001, storage_retry_s=0.3,
                         on_storage_error=lambda: seen.append(1))
    answers = iter([StorageUnavailable("down"), StorageError("busy", code="SlowDown")])

    def flaky():
        error = next(answers, None)
        if error is not None:
            raise error
        return "ok"

    assert policy.storage_call("write x", flaky) == "ok" and len(seen) == 2
    seen.clear()
    with pytest.raises(StorageUnavailable):
        policy.storage_call("write x", lambda: (_ for _ in ()).throw(StorageUnavailable("still down")))
    assert len(seen) >= 2  # every try until the 0.3 s budget ran out, the last one included
    seen.clear()
    with pytest.raises(ObjectNotFound):
        policy.storage_call("read x", lambda: (_ for _ in ()).throw(ObjectNotFound("gone", code="NoSuchKey")))
    assert seen == []


def test_serve_stages_turn_a_dead_replica_into_replica_lost():
    from ray.exceptions import ActorDiedError, RayTaskError

    from farm.serve.deployments import ServeStages

    async def fails(exc):
        raise exc

    stages = ServeStages({}, None)

    async def call(exc):
        return await stages._call("denoiser", fails(exc))

    with pytest.raises(ReplicaLost):
        asyncio.run(call(ActorDiedError()))
    render_error = RayTaskError("run_shard", "tb", NonFiniteLatents("NaN")).as_instanceof_cause()
    with pytest.raises(NonFiniteLatents):  # a model error stays what it is
        asyncio.run(call(render_error))


def test_params_carry_the_prompt_the_faults_match(store, tiny_spec):
    job = store.get(_submit(store, tiny_spec, "x chaos-nan y", 1))
    faults = [FaultInjection(kind="nan", prompt_contains="chaos-nan"), FaultInjection(kind="oom", prompt_contains="zzz")]
    assert [f.kind for f in matching(faults, params_of(job, tiny_spec).prompt)] == ["nan"]


def test_a_slow_fault_delays_every_forward_pass_and_changes_no_number(tiny_spec, stages):
    from farm.render.engine import initial_state
    from farm.render.registry import validate_request

    encoder, denoiser = stages
    params = validate_request(tiny_spec, prompt="chaos-slow: a heron", size="64x64", seconds=1, steps=2, seed=5)
    state = initial_state(tiny_spec, params, encoder.encode(params.prompt))
    calls = []
    counter = next(iter(denoiser.experts.values())).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        started = time.perf_counter()
        with injected(denoiser.experts, [FaultInjection(kind="slow", prompt_contains="chaos-slow", delay_s=0.1)]):
            slow = run_shards(denoiser.experts, state, plan_shards(state)).latents
        took = time.perf_counter() - started
    finally:
        counter.remove()
    assert took >= 0.1 * len(calls) and calls
    assert torch.equal(slow, run_shards(denoiser.experts, state, plan_shards(state)).latents)


def test_finisher_upload_waits_out_an_outage_and_aborts_what_it_left_open(tmp_path):
    from farm.config import FarmSettings
    from farm.finish.chain import FinishedClip
    from farm.render.tiny import tiny_spec as make_spec
    from farm.serve.deployments import Finisher

    class FlakyStore:
        """Refuses the first ``outage`` calls; a refused part upload leaves its multipart upload open."""

        def __init__(self, outage: int) -> None:
            self.outage, self.objects, self.open_uploads = outage, {}, set()

        def _call(self, key, upload=True):
            if self.outage > 0:
                self.outage -= 1
                if upload:
                    self.open_uploads.add(key)
                raise StorageUnavailable(f"upload s3://bucket/{key}: endpoint did not answer")

        def put_file(self, key, path, content_type=None, metadata=None):
            self._call(key)
            self.objects[key] = path.read_bytes()

        def put_json(self, key, obj):
            self._call(key)
            self.objects[key] = obj

        def abort_open_multipart_uploads(self, prefix=""):
            self._call(prefix, upload=False)  # fails too while the store is down
            aborted = [k for k in self.open_uploads if k.startswith(prefix)]
            self.open_uploads -= set(aborted)
            return len(aborted)

    files = {}
    for name in ("video.mp4", "thumbnail.webp", "spritesheet.jpg"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    clip = FinishedClip(files["video.mp4"], files["thumbnail.webp"], files["spritesheet.jpg"], 9, 14, 15)
    settings = FarmSettings(state_dir=tmp_path, models=[make_spec(tmp_path / "m")],
                            render={"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "storage_retry_s": 10})
    finisher = object.__new__(Finisher.func_or_class)  # the replica's upload path, without loading a VAE
    # The upload fails, so does its abort; the next try succeeds, then the leftover is aborted.
    finisher.settings, finisher.store = settings, FlakyStore(outage=2)

    finisher._upload("job-1", clip, {"id": "job-1"})

    assert sorted(finisher.store.objects) == [
        "videos/job-1/record.json", "videos/job-1/spritesheet.jpg", "videos/job-1/thumbnail.webp", "videos/job-1/video.mp4"
    ]
    assert finisher.store.open_uploads == set()


def test_the_snapshot_gives_queue_positions_and_measured_costs(store, tiny_spec, stages):
    """One denoiser replica, its first job held mid-shard: the jobs behind it wait in the pool in
    order (positions 0 and 1), nothing is estimated before every stage was measured, and once jobs
    have run, each model's costs and a running job's remaining work are measured figures."""
    prompts = ["the held job", "second in line", "third in line"]
    release = asyncio.Event()
    clients = LocalStages(tiny_spec, stages, denoisers=1, gates={(prompts[0], 0): release})
    dispatcher = Dispatcher(store, clients, [tiny_spec], shard_steps=SHARD_STEPS, policy=FAST, poll_s=0.05)

    async def scenario():
        runner = asyncio.create_task(dispatcher.run())
        try:
            ids = [_submit(store, tiny_spec, prompts[0], 1)]
            while clients.calls[prompts[0]] == 0:
                await asyncio.sleep(0.01)
            ids += [_submit(store, tiny_spec, p, 2 + i) for i, p in enumerate(prompts[1:])]
            dispatcher.wake()
            while dispatcher.placement.depths()[POOL]["interactive"] < 2:
                await asyncio.sleep(0.01)
            waiting = dispatcher.snapshot()
            release.set()
            while not all(store.get(i).terminal for i in ids):
                await asyncio.sleep(0.02)
            # The store marks a job completed before the dispatcher forgets its flight: wait for that.
            deadline = time.monotonic() + 10
            while dispatcher.snapshot().jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return ids, waiting, dispatcher.snapshot()
        finally:
            await dispatcher.stop()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    ids, waiting, after = asyncio.run(scenario())
    held, second, third = (waiting.jobs[i] for i in ids)
    assert (held.started, held.ahead) == (True, None)
    assert (second.started, second.ahead, third.started, third.ahead) == (False, 0, False, 1)
    assert [estimate_in_flight(waiting, i).queue_position for i in ids] == [None, 0, 1]
    assert held.remaining_s is None and waiting.models[tiny_spec.id].job_s(STEPS) is None  # no step measured yet

    costs = after.models[tiny_spec.id]
    assert after.jobs == {} and costs.slots == 1 and costs.backlog_s == 0
    assert all(c is not None and c > 0 for c in (costs.encode_s, costs.step_s, costs.decode_s, costs.finish_s))
    # A job still in the store: behind two queued jobs of its model, it completes after three runs on one slot.
    queued = estimate_queued(after, tiny_spec.id, "interactive", STEPS, rank=2)
    assert queued.queue_position == 2
    assert queued.completion_at == pytest.approx(after.at + 3 * costs.job_s(STEPS))
