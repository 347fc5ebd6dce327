"""One real `farm up` for every farm-level test that can share it (test_farm_up, test_faults,
test_load, test_rolling_update, test_scheduling).

Its settings are the union of what those tests need: long shards (a replica can be killed
mid-shard; an interactive job can overtake at a boundary), chaos faults for prompts that ask
for them, webhooks to loopback, both tiny models, and deployment-file fields beyond the
app's args (checked applied). At the end of the session `farm down` must leave no process.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.serve.farmkit import running_farm

SHARD_STEPS = 25  # long shards (~2.5 s at 256x256, 4 s) leave time to kill one mid-way
SHARD_RETRIES = 2
TRUST_LIFETIME_S = 20
# Prompts name the fault they ask for. The slow ones stretch shards (same frames, later) so tests
# that act mid-shard (kill a replica, cancel, roll the dispatcher) have seconds to act in, not a race.
CHAOS = [{"kind": "nan", "prompt_contains": "chaos-nan"}, {"kind": "oom", "prompt_contains": "chaos-oom"},
         {"kind": "slow", "prompt_contains": "chaos-slow", "delay_s": 0.15},
         {"kind": "slow", "prompt_contains": "chaos-crawl", "delay_s": 0.4}]
SETTINGS = {
    "render": {"shard_steps": SHARD_STEPS, "shard_retries": SHARD_RETRIES, "faults": CHAOS},
    # Webhook receivers in these tests listen on loopback: the operator allowlists it.
    "webhooks": {"allow_hosts": ["127.0.0.0/8"], "poll_s": 0.2},
    # The load test (test_load.py) overloads its tenant's queue: a small per-account cap, and a
    # per-key rate above what its one key sends. Two gateway replicas: every test's requests go
    # through either, their rate limits shared in the Redis `farm up` starts (test_queue_events.py).
    "serve": {"max_queued_per_account": 6, "rate_limit": "3000/minute", "gateway_replicas": 2},
    # test_trust_farm.py waits for a clip of a 20 s lifetime to expire (below the default floor of
    # 60 s, so it need not wait a minute) and for the reaper to remove it: it looks every second.
    "expiry": {"reaper_poll_s": 1.0, "min_lifetime_s": TRUST_LIFETIME_S},
}
# Serve config fields beyond the app's args: test_farm_up checks they reach the running farm.
DEPLOYMENT_EXTRAS = {
    "runtime_env": {"env_vars": {"VIDEOFARM_DEPLOYMENT_MARK": "applied"}},
    "deployments": [{"name": "Notifier", "num_replicas": 2}],
}


@pytest.fixture(scope="session")
def shared_farm(tmp_path_factory, tiny_model_dir, tiny_model_2x_dir, tiny_i2v_dir, tiny_ltx2_dir):
    import psutil

    # The same builds `farm up` makes.
    models = {"wan-tiny": tiny_model_dir, "wan-tiny-2x": tiny_model_2x_dir, "wan-tiny-i2v": tiny_i2v_dir,
              "ltx2-tiny": tiny_ltx2_dir}
    with running_farm(tmp_path_factory.mktemp("shared-farm"), settings=SETTINGS, extras=DEPLOYMENT_EXTRAS,
                      models=models) as farm:
        yield farm
        ours = farm.processes()
        # The check below can see every kind: Ray's daemons, its client server, replicas, SeaweedFS.
        assert any("ray.util.client.server" in line for line in ours.values()), ours
        assert any("gcs_server" in line for line in ours.values()) and any("weed" in line for line in ours.values())
        # Redis rewrites its process title over its environment, so it is found by its runtime file.
        redis_pid = json.loads((farm.home / "redis" / "redis.json").read_text())["pid"]
        ours[redis_pid] = "redis-server (farm up's, for the gateways' shared limits)"
        assert psutil.pid_exists(redis_pid)
        farm.down()
        time.sleep(1)
        left = []
        for pid, line in ours.items():
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(line)
            except psutil.NoSuchProcess:
                pass
        left += [line for pid, line in farm.processes().items() if pid not in ours]
        assert left == [], f"`farm down` left {len(left)} process(es): {left}"
