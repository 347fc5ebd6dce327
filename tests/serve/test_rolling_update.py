"""A rolling update mid-run: `farm deploy` of the running farm's own deployment file with one
changed field, the dispatcher's actor options, so Serve replaces the dispatcher's replica while
jobs denoise. The old dispatcher lets its jobs run to their next shard boundary, hands them back
and the leadership over; the new one resumes them from those checkpoints. Each job completes,
none loses an attempt, no stage call is retried, and none resumes from before where it was.

(A changed *setting* replaces every replica, the pools' too; that passes as well, but takes
minutes here, so the suite runs this one.)"""

from __future__ import annotations

import pytest
import yaml

from tests.serve.farmkit import farm_cli, wait_for

pytestmark = pytest.mark.slow

CLIP = {"size": "128x128", "seconds": "2"}


def test_rolling_update_mid_run_loses_and_reattempts_nothing(shared_farm, tmp_path):
    farm = shared_farm
    farm.wait_idle()
    client = farm.client()
    store = farm.store()
    # Slowed shards (tests/serve/conftest.py), three jobs on two replicas: the third waits for a
    # replica, so the jobs outlast the update (the drained jobs pause until the new dispatcher leads).
    ids = [client.videos.create(model="wan-tiny", prompt=f"chaos-slow: a lighthouse in a storm {i}", **CLIP,
                                extra_body={"steps": 50, "seed": i}).id for i in range(3)]
    wait_for(lambda: any(store.get(i).step_index > 0 for i in ids), 180, interval=0.2, what="a job mid-flight")

    # The same file with one changed field: the dispatcher's CPU share, which Serve applies by
    # starting a new replica and stopping the old one.
    config = yaml.safe_load(farm.deployment.read_text())
    config["applications"][0]["deployments"].append(
        {"name": "DispatcherDeployment", "ray_actor_options": {"num_cpus": 0.11}})
    changed = tmp_path / "deployment.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    before = {i: store.get(i) for i in ids}
    [old] = farm.replica_pids("DispatcherDeployment")
    farm_cli("deploy", "--deployment", str(changed), env=farm.env, timeout=600)
    during = {i: store.get(i) for i in ids}
    assert old not in farm.replica_pids("DispatcherDeployment")  # it really was replaced

    jobs = wait_for(lambda: (lambda js: js if all(j.terminal for j in js) else None)([store.get(i) for i in ids]),
                    300, interval=0.5, what="the jobs to end")
    assert [j.status for j in jobs] == ["completed"] * 3, [(j.status, j.error_message) for j in jobs]
    assert any(not j.terminal for j in during.values()), "every job ended during the update; it proved nothing"
    # No attempt spent: the old dispatcher handed its jobs back voluntarily, the new one resumed them.
    assert all(j.attempts == before[j.id].attempts for j in jobs), [(j.attempts, before[j.id].attempts) for j in jobs]
    status = farm.status()
    assert status["app_status"] == "RUNNING"
    assert not [r for r in status["dispatcher"]["retries"] if r["job_id"] in ids], status["dispatcher"]["retries"]
    # The new dispatcher resumed each job handed over to it from where the old one stopped, not
    # earlier. (A job in its last shard at the update ran to the end on the old one: no boundary left.)
    resumed = {r["job_id"]: r["step"] for r in status["dispatcher"]["resumed"] if r["job_id"] in ids}
    handed_over = [i for i in ids if during[i].status != "completed"]
    assert all(resumed.get(i, 0) >= before[i].step_index for i in handed_over), (resumed, before, during)
