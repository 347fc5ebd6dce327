"""Usage on the real farm: a completed video carries the replica-seconds of both expert pools,
the decode and the finish, and the same seconds appear on the farm's metrics endpoint as
``ray_videofarm_accelerator_seconds_total{tenant,pool,device}``."""

from __future__ import annotations

import urllib.request

import pytest

from tests.serve.farmkit import wait_for

pytestmark = pytest.mark.slow


def _accelerator_seconds(url: str, tenant: str) -> dict[str, float]:
    """Seconds per pool for ``tenant``, from the Prometheus text at ``url``."""
    found: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("ray_videofarm_accelerator_seconds_total{") and f'tenant="{tenant}"' in line:
                labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(","))
                pool = labels["pool"].strip('"')
                found[pool] = found.get(pool, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def test_a_completed_video_carries_its_usage_and_the_metric_counts_it(shared_farm):
    farm = shared_farm
    client = farm.client()
    video = client.videos.create_and_poll(model="wan-tiny-2x", prompt="a lighthouse in fog", seconds="1",
                                          size="128x128", extra_body={"steps": 4, "seed": 5})
    assert video.status == "completed", video.error
    usage = video.to_dict()["usage"]
    seconds = {line["pool"]: line["seconds"] for line in usage["by_pool"]}
    denoise = {pool for pool in seconds if pool.startswith("wan-tiny-2x:")}
    assert denoise == {"wan-tiny-2x:transformer", "wan-tiny-2x:transformer_2"}, usage
    assert set(seconds) == denoise | {"decode", "finish"}
    assert all(s > 0 for s in seconds.values()), usage
    assert {line["device"] for line in usage["by_pool"]} == {"cpu"}
    assert usage["accelerator_seconds"] == pytest.approx(sum(seconds.values()), abs=1e-5)

    tenant = farm.store().get(video.id).owner
    # Ray's metrics agent exports every few seconds; this tenant's account is new, so its series is this job's.
    scraped = wait_for(lambda: (lambda s: s if set(s) == set(seconds) else None)(
        _accelerator_seconds(farm.metrics_url, tenant)), 90, interval=1.0, what="the usage metric")
    assert scraped == pytest.approx(seconds, rel=1e-3, abs=1e-3)
