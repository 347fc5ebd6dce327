"""Faults injected for real against `farm up`; every job ends completed or failed with a code.

The session's shared farm (tests/serve/conftest.py) serves them (the faults follow each other,
never overlap):

1. a model that fails (NaN latents, a simulated out-of-memory, via ``render.faults``) fails its
   job with ``non_finite_latents`` / ``out_of_memory`` after its retries; other jobs complete;
2. SIGKILL of the denoiser replica running a shard: the shard is redone from the last
   checkpoint, and the video equals the fault-free render of the same seed, frame for frame;
3. the S3 server stopped for 20 s while jobs checkpoint and upload: they wait and complete,
   and no multipart upload is left open;
4. SIGKILL of the dispatcher's replica: Serve restarts it, it takes its jobs back, all complete;
5. `farm down` / `farm up` with jobs queued and running: all complete, resumed from checkpoints.

Each test prints ``submitted N, completed N, failed N (reasons), lost 0, duplicated 0``.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tests.figures import report
from tests.serve.conftest import SHARD_RETRIES, SHARD_STEPS
from tests.serve.farmkit import count_line, farm_cli, wait_for

pytestmark = pytest.mark.slow

SMALL = {"size": "64x64", "seconds": 1, "steps": 8}  # one shard
MEDIUM = {"size": "128x128", "seconds": 2, "steps": 40}  # two shards: 0-25, 25-40
LONG = {"size": "256x256", "seconds": 4, "steps": 50}  # two shards: 0-25, 25-50
TWO_SHARDS = {"size": "128x128", "seconds": 2, "steps": 50}  # 0-25, 25-50, and a smaller clip than LONG's
POOL = "Denoiser:wan-tiny:transformer"  # its replicas: deployments POOL:0 and POOL:1


@pytest.fixture
def farm(shared_farm):
    shared_farm.wait_idle()  # each fault lands on an idle farm: replicas busy only with this test's jobs
    return shared_farm


def _create(client, prompt: str, *, size: str, seconds: int, steps: int, seed: int = 0) -> str:
    return client.videos.create(model="wan-tiny", prompt=prompt, seconds=str(seconds), size=size,
                                extra_body={"steps": steps, "seed": seed}).id


def _settled(farm, ids: list[str], timeout: float) -> list:
    store = farm.store()

    def all_terminal():
        jobs = [store.get(i) for i in ids]
        return jobs if all(j is not None and j.terminal for j in jobs) else None

    return wait_for(all_terminal, timeout, interval=0.5, what=f"{len(ids)} jobs to end")


def _report(farm, ids: list[str], jobs: list) -> None:
    """Print and check the count line; rows are counted per tenant (each test has its own)."""
    owner = jobs[0].owner
    store = farm.store()
    rows = len(store.list(owner=owner, limit=1000)[0])
    keys = set(farm.objects().list_keys("videos/"))
    missing = tuple(j.id for j in jobs if j.status == "completed" and f"videos/{j.id}/video.mp4" not in keys)
    events = store.events_since(0, limit=100_000)
    line, lost, duplicated = count_line(len(ids), jobs, rows, events, missing)
    report(line)
    assert lost == 0 and duplicated == 0, line


def test_failing_model_fails_its_job_with_a_code_and_other_jobs_complete(farm):
    client = farm.client()
    nan = _create(client, "chaos-nan: a storm at sea", seed=1, **SMALL)
    oom = _create(client, "chaos-oom: a city of glass", seed=2, **SMALL)
    good = [_create(client, f"a calm lake at dawn {i}", seed=10 + i, **SMALL) for i in range(3)]
    ids = [nan, oom, *good]

    jobs = _settled(farm, ids, timeout=180)
    _report(farm, ids, jobs)

    by_id = {j.id: j for j in jobs}
    assert (by_id[nan].status, by_id[nan].error_code) == ("failed", "non_finite_latents"), by_id[nan].error_message
    assert (by_id[oom].status, by_id[oom].error_code) == ("failed", "out_of_memory"), by_id[oom].error_message
    assert all(by_id[i].status == "completed" for i in good)
    # The API tells the user why, in the OpenAI error shape.
    assert client.videos.retrieve(nan).error.code == "non_finite_latents"
    # Each failed after exactly its retry budget, on the real denoiser replicas.
    retries = farm.status()["dispatcher"]["retries"]
    for job_id, code in ((nan, "non_finite_latents"), (oom, "out_of_memory")):
        assert [r["reason"] for r in retries if r["job_id"] == job_id] == [code] * SHARD_RETRIES


def test_killed_denoiser_replica_resumes_from_the_checkpoint_with_the_same_video(farm, tmp_path):
    from farm.finish.media import read_frames

    client = farm.client()
    store = farm.store()
    prompt = "chaos-crawl: a red fox runs through fresh snow"  # crawling shards: time to find and kill one
    # The fault-free render and the victim side by side, one on each of the pool's two replicas
    # (a replica runs one shard at a time): the kill hits the victim's replica only.
    reference = _create(client, prompt, seed=42, **TWO_SHARDS)
    victim = _create(client, prompt, seed=42, **TWO_SHARDS)
    wait_for(lambda: store.get(victim).step_index >= SHARD_STEPS, 180, interval=0.1, what="the first shard")
    # The dispatcher says which replica runs the second shard (`farm status`: its running calls).
    second = f"shard {SHARD_STEPS}-50"
    running = wait_for(lambda: [c for c in farm.status()["dispatcher"]["running"]
                                if c["job_id"] == victim and c["stage"] == second], 60, interval=0.2,
                       what="the second shard to run")
    [pid] = farm.replica_pids(running[0]["replica"])
    os.kill(pid, signal.SIGKILL)
    killed_at_step = store.get(victim).step_index

    jobs = _settled(farm, [reference, victim], timeout=240)
    _report(farm, [reference, victim], jobs)

    assert all(j.status == "completed" for j in jobs), [(j.status, j.error_message) for j in jobs]
    assert killed_at_step == SHARD_STEPS  # killed during the second shard
    assert pid not in farm.replica_pids(POOL)
    retries = farm.status()["dispatcher"]["retries"]
    assert not [r for r in retries if r["job_id"] == reference]  # the reference really was fault-free
    retried = [r for r in retries if r["job_id"] == victim]
    assert retried and (retried[0]["stage"], retried[0]["reason"]) == (f"shard {SHARD_STEPS}-50", "replica_lost"), retried
    videos = {}
    for job_id in (reference, victim):
        path = tmp_path / f"{job_id}.mp4"
        client.videos.download_content(job_id, variant="video").write_to_file(path)
        videos[job_id] = read_frames(path)
    assert videos[victim].shape == videos[reference].shape
    assert np.array_equal(videos[victim], videos[reference])  # decoded frames, bit for bit


def test_storage_outage_is_waited_out_and_leaves_no_open_upload(farm):
    client = farm.client()
    store = farm.store()
    objects = farm.objects()
    endpoint = objects.settings.endpoint_url
    # Long jobs, and the stop sent as soon as one runs: `farm storage stop` takes seconds, and the
    # outage must catch checkpoint writes and uploads, not an idle farm.
    ids = [_create(client, f"rain on a tin roof {i}", seed=i, **LONG) for i in range(3)]
    wait_for(lambda: any(store.get(i).status == "in_progress" for i in ids), 180, interval=0.1, what="a job to start")

    farm_cli("storage", "stop", env=farm.env)
    time.sleep(10)
    during = [store.get(i) for i in ids]
    restarted = farm_cli("storage", "start", env=farm.env).stdout.strip().splitlines()[-1]

    jobs = _settled(farm, ids, timeout=300)
    _report(farm, ids, jobs)

    assert restarted == endpoint  # same port, same credentials: clients made before the outage work again
    assert not any(j.status == "failed" for j in during)  # the outage burned no job
    assert any(not j.terminal for j in during), "every job ended before the outage; it proved nothing"
    assert all(j.status == "completed" for j in jobs), [(j.status, j.error_code, j.error_message) for j in jobs]
    uploads = objects.client.list_multipart_uploads(Bucket=objects.bucket)
    assert uploads.get("Uploads", []) == []
    assert all(objects.exists(f"videos/{i}/video.mp4") for i in ids)
    assert not [k for k in objects.list_keys("checkpoints/") if k.split("/")[1] in ids]


def test_killed_dispatcher_is_restarted_and_every_job_completes(farm):
    client = farm.client()
    store = farm.store()
    ids = [_create(client, f"paper lanterns over a river {i}", seed=i, **MEDIUM) for i in range(3)]
    wait_for(lambda: any(store.get(i).checkpoint_key for i in ids), 180, interval=0.2, what="a checkpoint")
    [old] = farm.replica_pids("DispatcherDeployment")
    checkpointed = {i: store.get(i).step_index for i in ids if store.get(i).checkpoint_key}
    os.kill(old, signal.SIGKILL)

    new = wait_for(lambda: [p for p in farm.replica_pids("DispatcherDeployment") if p != old], 120,
                   what="Serve to restart the dispatcher")
    jobs = _settled(farm, ids, timeout=300)
    _report(farm, ids, jobs)

    assert all(j.status == "completed" for j in jobs), [(j.status, j.error_message) for j in jobs]
    assert old not in new
    resumed = {r["job_id"]: r["step"] for r in farm.status()["dispatcher"]["resumed"]}
    # Jobs checkpointed before the kill went on from their checkpoint, not from step 0.
    assert all(resumed.get(i, 0) >= step for i, step in checkpointed.items() if step < MEDIUM["steps"]), (resumed, checkpointed)
    assert any(i in resumed for i in checkpointed)


def test_jobs_queued_and_running_survive_farm_down_and_up(farm):
    client = farm.client()
    store = farm.store()
    # More jobs than the pool's two replicas, slowed: some run, some wait, when `farm down` drains the farm.
    ids = [_create(client, f"chaos-slow: 雪の森 {i}", seed=i, **MEDIUM) for i in range(3)]
    wait_for(lambda: any(store.get(i).status == "in_progress" and store.get(i).step_index > 0 for i in ids),
             180, interval=0.2, what="a job mid-flight")
    # The dispatcher claims more jobs than the pool has replicas (they wait in its scheduler, in
    # progress at step 0), so "some wait" reads from the steps, not from the status.
    at_down = sorted(store.get(i).step_index for i in ids)
    try:
        farm.down()
        before = {i: store.get(i) for i in ids}
    finally:
        farm.up()  # whatever the asserts below say, the shared farm goes on for the other tests
    unfinished = [j for j in before.values() if j.status != "completed"]
    assert at_down[0] == 0 and at_down[-1] > 0, at_down  # some ran, some waited
    assert unfinished, "every job finished before the farm went down; the test proved nothing"
    # `farm down` drained the farm: what it stopped went back to the queue, nothing was lost.
    assert all(j.status in ("queued", "completed") for j in before.values()), [j.status for j in before.values()]
    checkpointed = {j.id: j.step_index for j in unfinished if j.checkpoint_key and j.step_index > 0}

    jobs = _settled(farm, ids, timeout=300)
    _report(farm, ids, jobs)

    assert all(j.status == "completed" for j in jobs), [(j.status, j.error_message) for j in jobs]
    resumed = {r["job_id"]: r["step"] for r in farm.status()["dispatcher"]["resumed"]}
    # A job still denoising at `down` went on from its step; one already finishing redid only the last shard.
    assert all(resumed.get(i) == step for i, step in checkpointed.items() if step < MEDIUM["steps"]), (resumed, checkpointed)
    assert any(i in resumed for i in checkpointed), (resumed, checkpointed)
