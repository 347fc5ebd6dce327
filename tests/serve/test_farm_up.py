"""The farm as a user runs it: `farm up`, the unmodified openai SDK, metrics, status, `farm down`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FAMILIES = [
    "videofarm_jobs_created_total", "videofarm_jobs_completed_total", "videofarm_jobs_failed_total",
    "videofarm_queue_depth", "videofarm_queue_wait_seconds", "videofarm_step_seconds", "videofarm_shard_seconds",
    "videofarm_shard_handoff_seconds", "videofarm_job_seconds", "videofarm_finish_seconds",
    "videofarm_upload_seconds", "videofarm_upload_bytes_total", "videofarm_http_request_seconds",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _farm(*args: str, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    farm = Path(sys.executable).parent / "farm"
    return subprocess.run([str(farm), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def farm(shared_farm):
    """The session's shared `farm up` (tests/serve/conftest.py), as these tests read it."""
    return {"home": shared_farm.home, "env": shared_farm.env, "port": shared_farm.port,
            "metrics": shared_farm.metrics_url, "kit": shared_farm}


def _farm_processes(home: Path) -> dict[int, str]:
    from tests.serve.farmkit import Farm

    return Farm(home, 0, 0, Path(), {}).processes()


def test_the_farm_listens_on_loopback_only(farm):
    """Ray (GCS, raylet, agents, client server, workers, every replica), the metrics endpoint,
    the gateway and SeaweedFS: no listening socket outside 127.0.0.0/8 or ::1."""
    import ipaddress

    import psutil

    listening: list[tuple[str, str, int]] = []
    for pid, line in _farm_processes(farm["home"]).items():
        try:
            sockets = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(line[:80], s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN]
    assert len(listening) >= 10, listening  # gateway, GCS, raylet, metrics, client server, replicas, S3…
    ports = {port for _, _, port in listening}
    assert farm["port"] in ports and int(farm["metrics"].rsplit(":", 1)[1].split("/")[0]) in ports

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback

    exposed = [entry for entry in listening if not loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_farm_up_applies_the_whole_deployment_file(farm):
    """runtime_env and per-deployment options of the Serve config reach the running farm."""
    import psutil

    marked = []
    for pid, line in _farm_processes(farm["home"]).items():
        if line.startswith("ray::ServeReplica:videofarm:"):
            try:
                marked.append(psutil.Process(pid).environ().get("VIDEOFARM_DEPLOYMENT_MARK"))
            except psutil.NoSuchProcess:
                continue
    assert marked and set(marked) == {"applied"}, marked  # the app's runtime_env, in every replica
    done = _farm("status", "--json", env=farm["env"], timeout=120)
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["deployments"]["Notifier"]["replicas"] == {"RUNNING": 2}  # deployments: [{num_replicas: 2}]


@pytest.fixture(scope="module")
def api_key(farm):
    """As a newcomer gets one: the operator makes an invite, the newcomer redeems it with the CLI."""
    made = _farm("invite", "create", "--note", "sdk user", "-q", env=farm["env"], timeout=60)
    assert made.returncode == 0, made.stderr
    code = made.stdout.strip()
    assert code.startswith("vf_inv_")
    redeemed = _farm("redeem", code, "--name", "sdk-user", env=farm["env"], timeout=60)
    assert redeemed.returncode == 0, redeemed.stderr
    key = (farm["home"] / "api_key").read_text().strip()
    assert key.startswith("vf_sk_") and key in redeemed.stdout
    assert oct((farm["home"] / "api_key").stat().st_mode & 0o777) == "0o600"
    again = _farm("redeem", code, env=farm["env"], timeout=60)  # single use
    assert again.returncode == 2 and "not valid" in again.stderr
    whoami = _farm("whoami", env=farm["env"], timeout=60)
    assert whoami.returncode == 0 and "sdk-user" in whoami.stdout
    return key


@pytest.fixture
def client(farm, api_key):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{farm['port']}/v1", api_key=api_key, max_retries=0)


def test_no_key_no_entry(farm):
    import openai

    anonymous = openai.OpenAI(base_url=f"http://127.0.0.1:{farm['port']}/v1", api_key="vf_sk_made_up", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.videos.list()


def test_openai_sdk_end_to_end(farm, client):
    import openai

    from farm.finish.media import probe_mp4
    from farm.finish.provenance import ensure_dev_credentials, verify

    video = client.videos.create_and_poll(
        model="wan-tiny", prompt="夕焼けの海辺を走る犬、スローモーション", seconds="1", size="64x64",
        extra_body={"steps": 4, "seed": 11},
    )
    assert video.status == "completed" and video.progress == 100, video
    assert client.videos.retrieve(video.id).status == "completed"
    assert video.id in [v.id for v in client.videos.list(limit=10)]

    clip = farm["home"] / "sdk.mp4"
    clip.write_bytes(client.videos.download_content(video.id, variant="video").read())
    info = probe_mp4(clip)
    assert (info.frames, info.width, info.height) == (9, 64, 64)
    anchors = ensure_dev_credentials(farm["home"] / "c2pa").ca_cert.read_text()
    assert verify(clip, anchors).state == "Trusted"
    assert client.videos.download_content(video.id, variant="thumbnail").read()[8:12] == b"WEBP"
    assert client.videos.download_content(video.id, variant="spritesheet").read()[:3] == b"\xff\xd8\xff"

    assert client.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_status_shows_pools_replicas_and_queues(farm):
    done = _farm("status", "--json", env=farm["env"], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["app_status"] == "RUNNING"
    # Every replica of a scheduled pool is a deployment of its own.
    assert {"Denoiser:wan-tiny:transformer:0", "Denoiser:wan-tiny:transformer:1", "Encoder:0", "Decoder:0",
            "Denoiser:wan-tiny-2x:transformer:0", "Denoiser:wan-tiny-2x:transformer_2:0"} <= set(report["deployments"])
    assert report["deployments"]["Denoiser:wan-tiny:transformer:1"]["replicas"] == {"RUNNING": 1}
    assert report["dispatcher"]["pools"]["wan-tiny:transformer"] == [
        "Denoiser:wan-tiny:transformer:0", "Denoiser:wan-tiny:transformer:1"]
    assert set(report["dispatcher"]["queue_depths"]) == {"interactive", "bulk"}


def _scrape(url: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("ray_videofarm_") and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0].removeprefix("ray_")
                family = re.sub(r"_(bucket|count|sum)$", "", name)
                if name.endswith("_bucket"):
                    continue
                totals[family] = totals.get(family, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_one_scrape_endpoint_covers_every_stage(farm, client):
    from farm.jobs.store import JobStore

    # A two-expert job (both expert pools), and a job whose model left the registry: it fails.
    client.videos.create_and_poll(model="wan-tiny-2x", prompt="雪の森のキツネ", seconds="1", size="64x64",
                                  extra_body={"steps": 4, "seed": 3})
    store = JobStore(f"sqlite:///{farm['home'] / 'jobs.sqlite'}")
    orphan = store.create(model="retired-model", prompt="x", size="64x64", seconds=1, params={"steps": 2, "seed": 1})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = store.get(orphan.id)
        totals = _scrape(farm["metrics"])
        if job.status == "failed" and all(totals.get(f, 0) > 0 or f == "videofarm_queue_depth" for f in FAMILIES):
            break
        time.sleep(2)
    assert store.get(orphan.id).error_code == "model_unavailable"
    missing = [f for f in FAMILIES if f not in totals]
    assert not missing, f"families missing from {farm['metrics']}: {missing}"
    empty = [f for f in FAMILIES if totals[f] <= 0 and f != "videofarm_queue_depth"]
    assert not empty, f"families with no samples: {empty}"


def test_cancel_stops_at_a_shard_boundary_frees_the_replica_and_keeps_nothing(farm, client, api_key, monkeypatch):
    import httpx

    from farm.config import load_settings
    from farm.jobs.store import JobStore
    from farm.storage.connect import open_store

    store = JobStore(f"sqlite:///{farm['home'] / 'jobs.sqlite'}")
    from tests.serve.conftest import SHARD_STEPS

    steps = 2 * SHARD_STEPS  # two shards (the model allows at most 50 steps)
    video = client.videos.create(model="wan-tiny", prompt="chaos-slow: 長い夜の雨の街", seconds="4", size="128x128",
                                 extra_body={"steps": steps, "seed": 5})
    deadline = time.monotonic() + 180
    while store.get(video.id).step_index < 1:  # the first shard is running
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.1)
    reply = httpx.post(f"http://127.0.0.1:{farm['port']}/v1/videos/{video.id}/cancel",
                       headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    assert reply.status_code == 200 and reply.json()["cancel_requested"] is True
    asked_at = store.get(video.id).step_index
    while not store.get(video.id).terminal:
        assert time.monotonic() < deadline, "the cancelled job did not stop"
        time.sleep(0.1)
    job = store.get(video.id)
    assert (job.status, job.error_code) == ("cancelled", "cancelled")
    assert job.step_index <= asked_at + SHARD_STEPS  # at most the shard in flight ran after the ask
    seen = client.videos.retrieve(video.id)
    assert seen.status == "cancelled" and seen.error.code == "cancelled"
    # Nothing kept: no checkpoint, no clip objects.
    monkeypatch.setenv("FARM_HOME", str(farm["home"]))
    objects = open_store(load_settings(), start=False)
    left = [k for k in objects.list_keys() if video.id in k]
    assert left == [], left
    # The replicas are free again: a new job runs to completion.
    after = client.videos.create_and_poll(model="wan-tiny", prompt="晴れた朝", seconds="1", size="64x64",
                                          extra_body={"steps": 2, "seed": 1})
    assert after.status == "completed"


def test_webhook_tells_a_registered_endpoint_and_the_sdk_verifies_it(farm, client):
    """A tenant registers an endpoint with the SDK; the farm signs video.completed; the SDK's unwrap verifies."""
    import http.server
    import threading

    received: list[tuple[bytes, dict]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((body, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = client.webhooks.create(url=f"http://127.0.0.1:{server.server_port}/hooks",
                                          event_types=["video.completed", "video.failed"], name="renders")
        secret = endpoint.signing_secret
        assert secret.startswith("whsec_")
        video = client.videos.create_and_poll(model="wan-tiny", prompt="花火の夜", seconds="1", size="64x64",
                                              extra_body={"steps": 2, "seed": 9})
        assert video.status == "completed"
        deadline = time.monotonic() + 60
        while not any(video.id.encode() in body for body, _ in received):
            assert time.monotonic() < deadline, "no webhook arrived"
            time.sleep(0.2)
        body, headers = next((b, h) for b, h in received if video.id.encode() in b)
        event = client.webhooks.unwrap(body.decode(), headers, secret=secret)
        assert (event.type, event.data.id) == ("video.completed", video.id)
        assert headers["webhook-id"] == event.id
    finally:
        server.shutdown()
