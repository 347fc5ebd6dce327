"""Shards scheduled on the real farm: an interactive job overtakes running bulk jobs at a shard
boundary, and a bulk job that gave its replica up ends with the same video as an uninterrupted
render of the same seed (decoded frames, bit for bit: the same latents)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serve.conftest import SHARD_STEPS
from tests.serve.farmkit import wait_for

pytestmark = pytest.mark.slow

BULK = {"size": "128x128", "seconds": "2"}
BULK_STEPS = 2 * SHARD_STEPS  # two shards (the model allows 50 steps)
POOL = "Denoiser:wan-tiny:transformer"


def _frames(client, video_id, path):
    from farm.finish.media import read_frames

    client.videos.download_content(video_id, variant="video").write_to_file(path)
    return read_frames(path)


def test_interactive_overtakes_running_bulk_jobs_at_a_shard_boundary(shared_farm, tmp_path):
    farm = shared_farm
    farm.wait_idle()  # both replicas must be free for this test's two bulk jobs
    client = farm.client()
    store = farm.store()
    prompt = "chaos-slow: a bulk render of waves on a shore"  # slowed shards: the boundary is not a race

    solo = client.videos.create_and_poll(model="wan-tiny", prompt=prompt, **BULK,
                                         extra_body={"seed": 21, "steps": BULK_STEPS})
    assert solo.status == "completed"

    bulk = [client.videos.create(model="wan-tiny", prompt=p, **BULK, extra_body={"seed": s, "steps": BULK_STEPS,
                                                                                     "priority": "bulk"}).id
            for p, s in ((prompt, 21), ("chaos-slow: bulk clouds over hills", 22))]
    # Both replicas of the pool busy with bulk shards (each job in its first shard).
    wait_for(lambda: sum(farm.replica_pids(POOL).values()) == 2 and all(store.get(b).step_index == 0 for b in bulk),
             120, interval=0.05, what="both replicas running bulk shards")
    urgent = client.videos.create(model="wan-tiny", prompt="an urgent interactive fox", seconds="1", size="64x64",
                                  extra_body={"steps": 8, "seed": 3}).id

    jobs = wait_for(lambda: (lambda js: js if all(j.terminal for j in js) else None)([store.get(i) for i in [*bulk, urgent]]),
                    300, interval=0.5, what="the three jobs to end")
    assert [j.status for j in jobs] == ["completed"] * 3, [(j.status, j.error_message) for j in jobs]

    calls = farm.status()["dispatcher"]["calls"]
    shards = [c for c in calls if c["stage"].startswith("shard") and c["pool"] == "wan-tiny:transformer"]
    [mine] = [c for c in shards if c["job_id"] == urgent]
    # Some bulk job had a shard end before the interactive shard began and its next shard begin after it:
    # it waited at the boundary, its state held, while the interactive job took its turn.
    yielded = []
    for job_id in bulk:
        own = sorted((c for c in shards if c["job_id"] == job_id), key=lambda c: c["started"])
        for before, after in zip(own, own[1:]):
            if before["started"] + before["seconds"] <= mine["started"] + 0.05 and after["started"] >= mine["started"]:
                yielded.append(job_id)
    assert yielded, shards
    # The interactive job waited at most one bulk shard: its shard started within about one shard's length.
    longest = max(c["seconds"] for c in shards if c["job_id"] in bulk)
    created = store.get(urgent).created_at.timestamp()
    assert mine["started"] - created <= longest * 1.5 + 2.0, (mine, created, longest)
    done = {j.id: j.completed_at for j in jobs}
    assert done[urgent] < max(done[b] for b in bulk)

    # The bulk job that shared its replica: same frames as the uninterrupted render of its seed.
    assert np.array_equal(_frames(client, bulk[0], tmp_path / "bulk.mp4"), _frames(client, solo.id, tmp_path / "solo.mp4"))
