"""Gateway fixtures: a real job store on SQLite, a real SeaweedFS for content and deletes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from farm.accounts.store import AccountStore
from farm.api.app import GatewayDeps, create_app
from farm.api.auth import GatewayAuth
from farm.webhooks.settings import WebhookSettings
from farm.webhooks.store import WebhookStore
from farm.jobs.store import JobStore
from farm.render.registry import ModelSpec
from farm.storage import ClipLayout, ObjectStore, upload_clip
from tests.storage.conftest import seaweed  # noqa: F401  (the session's real SeaweedFS server)

FINISHER = "test-finisher"


@pytest.fixture
def models() -> list[ModelSpec]:
    # Paths are never opened: the gateway reads only the limits.
    return [
        ModelSpec(id="wan-tiny", path="/models/wan-tiny", sizes=["128x128", "96x160"], seconds=[1, 2],
                  default_steps=4, max_steps=50),
        ModelSpec(id="wan-tiny-2x", path="/models/wan-tiny-2x", sizes=["128x128"], seconds=[2],
                  default_steps=6, max_steps=20),
    ]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"


@pytest.fixture
def jobs(db_url: str) -> Iterator[JobStore]:
    store = JobStore(db_url)
    store.migrate()
    yield store
    store.close()


ADMIN_KEY = "vf_admin_" + "k" * 40


@pytest.fixture
def accounts(jobs: JobStore, db_url: str) -> AccountStore:
    """Accounts in the same database as the jobs (migrated by ``jobs``)."""
    return AccountStore(db_url)


@pytest.fixture
def make_auth_app(make_app, accounts: AccountStore, db_url: str) -> Callable[..., FastAPI]:
    """``make_auth_app(rate_limit=..., **GatewayDeps overrides)``: the gateway with API keys required."""

    def make(rate_limit: str = "100000/minute", anonymous_rate_limit: str = "100000/minute", **overrides) -> FastAPI:
        # Webhook routes too, behind the same gate; a short timeout bounds DNS lookups of fuzzed hosts.
        hooks = {"webhooks": WebhookStore(db_url), "webhook_settings": WebhookSettings(timeout_s=1.0)}
        auth = GatewayAuth(accounts, ADMIN_KEY, rate_limit=rate_limit, anonymous_rate_limit=anonymous_rate_limit)
        return make_app(auth=auth, **(hooks | overrides))

    return make


def new_tenant(client: TestClient, name: str = "tenant") -> dict[str, str]:
    """Invite (admin key) → redeem → the new account's Authorization header."""
    invite = client.post("/v1/admin/invites", json={"note": name}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert invite.status_code == 200, invite.text
    redeemed = client.post("/v1/invites/redeem", json={"code": invite.json()["code"], "account_name": name})
    assert redeemed.status_code == 200, redeemed.text
    return {"Authorization": f"Bearer {redeemed.json()['api_key']['key']}"}


@pytest.fixture
def objects(seaweed) -> Iterator[ObjectStore]:  # noqa: F811
    """A fresh bucket on the real SeaweedFS server, emptied and removed afterwards."""
    store = ObjectStore(seaweed.settings(bucket=f"api-{uuid.uuid4().hex[:12]}"))
    store.ensure_bucket()
    yield store
    for key in store.list_keys():
        store.delete(key)
    store.client.delete_bucket(Bucket=store.bucket)


def _no_object_store() -> ObjectStore:
    raise RuntimeError("this test runs without an object store; use the s3 fixtures")


@pytest.fixture
def make_app(jobs: JobStore, models: list[ModelSpec]) -> Callable[..., FastAPI]:
    """``make_app(**GatewayDeps overrides)``; by default without S3 (content/delete need ``objects``)."""

    def make(**overrides) -> FastAPI:
        kwargs = {"store": jobs, "objects": _no_object_store, "models": models, "poll_after_ms": 250} | overrides
        return create_app(GatewayDeps(**kwargs))

    return make


@pytest.fixture
def client(make_app) -> Iterator[TestClient]:
    with TestClient(make_app()) as c:
        yield c


@pytest.fixture
def s3_client(make_app, objects: ObjectStore) -> Iterator[TestClient]:
    with TestClient(make_app(objects=objects)) as c:
        yield c


def finish_job(jobs: JobStore, objects: ObjectStore, video_id: str, media: dict[str, bytes], tmp: Path) -> None:
    """Do what the farm's finisher does: claim the job, upload its clip, mark it completed."""
    claimed = jobs.claim_next(FINISHER, lease_s=60)
    if claimed is None or claimed.id != video_id:
        raise RuntimeError(f"expected to claim {video_id}, claimed {claimed and claimed.id}")
    files = {}
    for variant, data in media.items():
        path = tmp / f"{video_id}-{variant}"
        path.write_bytes(data)
        files[variant] = path
    uris = upload_clip(objects, video_id, files, {"id": video_id})
    layout = ClipLayout(video_id)
    if not jobs.complete(video_id, FINISHER, {v: layout.key(v) for v in media}):
        raise RuntimeError(f"complete({video_id}) was refused")
    if set(uris) != set(media) | {"record"}:
        raise RuntimeError(f"upload_clip stored {sorted(uris)}")


class LiveServer:
    """The app under a real uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def auth_headers(accounts: AccountStore) -> dict[str, str]:
    """A tenant's ``Authorization`` header (invite redeemed in ``accounts``), for apps from ``make_auth_app``:
    the headers every fuzz/property request sends."""
    _, code = accounts.create_invite(note="fuzz")
    _, _, key = accounts.redeem(code, "fuzz")
    return {"Authorization": f"Bearer {key}"}


def mark_completed(jobs: JobStore, video_id: str) -> None:
    """Claim ``video_id`` and mark it completed in the store alone (no clip uploaded): enough for a
    route that only needs the source to be completed, such as a remix (it reads no bytes)."""
    claimed = jobs.claim_next(FINISHER, lease_s=60)
    if claimed is None or claimed.id != video_id:
        raise RuntimeError(f"expected to claim {video_id}, claimed {claimed and claimed.id}")
    if not jobs.complete(video_id, FINISHER, {"video": ClipLayout(video_id).key("video")}):
        raise RuntimeError(f"complete({video_id}) was refused")
