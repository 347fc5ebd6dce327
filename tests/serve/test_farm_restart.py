"""Jobs outlive the farm: `farm down` with jobs queued and running, `farm up`, every job completes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
JOBS, STEPS = 6, 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _farm(*args: str, env: dict) -> subprocess.CompletedProcess:
    farm = Path(sys.executable).parent / "farm"
    done = subprocess.run([str(farm), *args], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"farm {' '.join(args)}: {done.stderr[-3000:]}"
    return done


def test_queued_and_running_jobs_survive_down_and_up(tmp_path):
    import openai

    from farm.jobs.store import JobStore

    port = _free_port()
    env = {**os.environ, "FARM_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    _farm("up", "--port", str(port), env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        ids = [
            client.videos.create(model="wan-tiny", prompt=f"雪の森 {i}", seconds="4", size="128x128",
                                 extra_body={"steps": STEPS, "seed": i}).id
            for i in range(JOBS)
        ]
        store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # stop the farm while work is mid-flight
            jobs = [store.get(i) for i in ids]
            if any(j.status == "in_progress" and j.step_index > 0 for j in jobs):
                break
            time.sleep(0.2)
        _farm("down", env=env)

        before = {j.id: j for j in (store.get(i) for i in ids)}
        unfinished = [j for j in before.values() if j.status != "completed"]
        assert unfinished, "every job finished before the farm went down; the test proved nothing"
        assert all(j.status in ("queued", "completed") for j in before.values()), [j.status for j in before.values()]
        resumed = [j.id for j in unfinished if j.checkpoint_key and j.step_index > 0]

        _farm("up", "--port", str(port), env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            after = [store.get(i) for i in ids]
            if all(j.terminal for j in after):
                break
            time.sleep(0.5)
        completed = sum(j.status == "completed" for j in after)
        failed = [f"{j.id}:{j.error_code}" for j in after if j.status != "completed"]
        rows = len(store.list(limit=100)[0])
        print(f"submitted {JOBS}, completed {completed}, failed {len(failed)} ({failed}), "
              f"lost {JOBS - completed - len(failed)}, duplicated {rows - JOBS}; "
              f"{len(unfinished)} unfinished at down, {len(resumed)} resumed from a checkpoint")
        assert completed == JOBS and rows == JOBS
        for job_id in resumed:  # resumed jobs carried on from their step, not from zero
            assert store.get(job_id).step_index == STEPS
    finally:
        _farm("down", env=env)
