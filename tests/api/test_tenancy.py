"""Nobody in where they don't belong: tenant B gets "not found" for everything of tenant A's,
worded exactly as for an id that never existed; and Idempotency-Key under real concurrency."""

from __future__ import annotations

import json
import threading

import httpx
from fastapi.testclient import TestClient

from tests.api.conftest import LiveServer, finish_job, new_tenant
from tests.api.test_gateway import error_of

MEDIA = {"video": b"\x00\x00\x00\x18ftypmp42 fake mp4", "thumbnail": b"RIFF....WEBP", "spritesheet": b"\xff\xd8\xff"}


def _masked(error: dict, video_id: str) -> str:
    return json.dumps(error).replace(video_id, "<id>")


def test_tenant_b_cannot_touch_tenant_a_videos(make_auth_app, objects, jobs, tmp_path):
    client = TestClient(make_auth_app(objects=objects))
    ada, bob = new_tenant(client, "ada"), new_tenant(client, "bob")
    video = client.post("/v1/videos", json={"prompt": "a fox", "seed": 3}, headers=ada).json()
    vid = video["id"]
    finish_job(jobs, objects, vid, MEDIA, tmp_path)
    ghost = "video_" + "0" * 32

    attempts = {
        "retrieve": lambda v, h: client.get(f"/v1/videos/{v}", headers=h),
        "download": lambda v, h: client.get(f"/v1/videos/{v}/content", headers=h),
        "thumbnail": lambda v, h: client.get(f"/v1/videos/{v}/content", params={"variant": "thumbnail"}, headers=h),
        "delete": lambda v, h: client.delete(f"/v1/videos/{v}", headers=h),
        "remix": lambda v, h: client.post(f"/v1/videos/{v}/remix", json={"prompt": "mine now"}, headers=h),
        "cancel": lambda v, h: client.post(f"/v1/videos/{v}/cancel", headers=h),
        "events": lambda v, h: client.get(f"/v1/videos/{v}/events", headers=h),
        "list after": lambda v, h: client.get("/v1/videos", params={"after": v}, headers=h),
        "shared list after": lambda v, h: client.get("/v1/videos", params={"after": v, "shared": "true"}, headers=h),
        "spritesheet": lambda v, h: client.get(f"/v1/videos/{v}/content", params={"variant": "spritesheet"},
                                               headers=h),
        "share": lambda v, h: client.post(f"/v1/videos/{v}/shares", json={"account": "bob"}, headers=h),
        "list shares": lambda v, h: client.get(f"/v1/videos/{v}/shares", headers=h),
        "unshare": lambda v, h: client.delete(f"/v1/videos/{v}/shares/bob", headers=h),
        "publish link": lambda v, h: client.post(f"/v1/videos/{v}/links", headers=h),
        "list links": lambda v, h: client.get(f"/v1/videos/{v}/links", headers=h),
        "revoke link": lambda v, h: client.delete(f"/v1/videos/{v}/links/vlink_x", headers=h),
    }
    for name, call in attempts.items():
        theirs, missing = error_of(call(vid, bob), 404), error_of(call(ghost, bob), 404)
        # The same answer as for an id that does not exist: existence does not leak.
        assert _masked(theirs, vid) == _masked(missing, ghost), name
    assert client.get("/v1/videos", headers=bob).json()["data"] == []

    # Nothing of A's changed: the row, its objects, no share or link, and no remix job for B.
    assert client.get(f"/v1/videos/{vid}", headers=ada).json()["visibility"] == "private"
    assert client.get(f"/v1/videos/{vid}/shares", headers=ada).json()["data"] == []
    assert client.get(f"/v1/videos/{vid}", headers=ada).json()["status"] == "completed"
    assert client.get(f"/v1/videos/{vid}/content", headers=ada).content == MEDIA["video"]
    assert [j.id for j in jobs.list(limit=10)[0]] == [vid]
    # A can do all of it.
    remix = client.post(f"/v1/videos/{vid}/remix", json={"prompt": "the fox at night"}, headers=ada).json()
    assert remix["remixed_from_video_id"] == vid and remix["seed"] == 3 and remix["size"] == video["size"]
    assert client.delete(f"/v1/videos/{vid}", headers=ada).json()["deleted"] is True
    assert not any(k.startswith(f"videos/{vid}/") for k in objects.list_keys())


def test_idempotency_key_under_concurrent_requests(make_auth_app, jobs):
    app = make_auth_app()
    with LiveServer(app) as url:
        with httpx.Client(base_url=url) as setup:
            invite = setup.post("/v1/admin/invites", json={}, headers={"Authorization": f"Bearer {_admin()}"}).json()
            key = setup.post("/v1/invites/redeem", json={"code": invite["code"]}).json()["api_key"]["key"]
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "order-42"}
        body = {"prompt": "a red fox", "seed": 7}
        start, results = threading.Barrier(12), []

        def create() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                start.wait()
                results.append(c.post("/v1/videos", json=body, headers=headers))

        threads = [threading.Thread(target=create) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 12, [r.text for r in results if r.status_code != 200]
        assert len({r.json()["id"] for r in results}) == 1
        assert len(jobs.list(limit=100)[0]) == 1
        # Same key, another body: 409, and still one job.
        with httpx.Client(base_url=url) as c:
            other = c.post("/v1/videos", json={**body, "prompt": "a blue fox"}, headers=headers)
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
        assert len(jobs.list(limit=100)[0]) == 1


def _admin() -> str:
    from tests.api.conftest import ADMIN_KEY

    return ADMIN_KEY


def test_idempotent_retry_without_a_seed_replays(make_auth_app, jobs):
    """The SDK's own retry: same key, same body, no seed; the random seed must not make it 'different'."""
    client = TestClient(make_auth_app())
    ada, bob = new_tenant(client, "ada"), new_tenant(client, "bob")
    body = {"prompt": "a quiet lake at dawn"}
    first = client.post("/v1/videos", json=body, headers={**ada, "Idempotency-Key": "retry-1"}).json()
    again = client.post("/v1/videos", json=body, headers={**ada, "Idempotency-Key": "retry-1"}).json()
    assert again["id"] == first["id"] and again["seed"] == first["seed"]
    changed = client.post("/v1/videos", json={**body, "steps": 3}, headers={**ada, "Idempotency-Key": "retry-1"})
    assert error_of(changed, 409)["code"] == "idempotency_key_reused" and "steps" in changed.json()["error"]["message"]
    # Keys are per account: B's request with the same key is B's own job.
    theirs = client.post("/v1/videos", json=body, headers={**bob, "Idempotency-Key": "retry-1"}).json()
    assert theirs["id"] != first["id"]
    assert len(jobs.list(limit=10)[0]) == 2


def test_cancel_or_delete_of_a_requeued_job_removes_its_checkpoint(make_auth_app, objects, jobs):
    client = TestClient(make_auth_app(objects=objects))
    ada = new_tenant(client)
    ids = [client.post("/v1/videos", json={"prompt": f"p{i}"}, headers=ada).json()["id"] for i in range(2)]
    assert [jobs.claim_next("w", lease_s=60).id for _ in ids] == ids
    for vid in ids:  # each ran a shard, checkpointed, and went back to the queue (a farm restart)
        key = f"checkpoints/{vid}/state.pt"
        objects.put_bytes(key, b"state")
        assert jobs.record_progress(vid, "w", step_index=2, num_steps=8, progress=20, checkpoint_key=key)
        assert jobs.requeue(vid, "w", "restart")
    cancelled = client.post(f"/v1/videos/{ids[0]}/cancel", headers=ada).json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    assert client.delete(f"/v1/videos/{ids[1]}", headers=ada).json()["deleted"] is True
    assert [k for k in objects.list_keys() if k.startswith("checkpoints/")] == []
