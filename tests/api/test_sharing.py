"""Drafts, shares and unlisted links through the gateway, and expiry: who may see what, and
nobody learns that a video exists without access (the same 404 as for an id that never existed)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from farm.jobs.expiry import Lifetimes
from farm.jobs.reaper import ClipReaper
from farm.jobs.store import JobStore
from tests.api.conftest import ADMIN_KEY, finish_job, new_tenant
from tests.api.test_gateway import error_of
from tests.clock import Clock

MEDIA = {"video": b"\x00\x00\x00\x18ftypmp42 a watermarked, signed mp4 " + bytes(range(256)),
         "thumbnail": b"RIFF....WEBPVP8 thumb", "spritesheet": b"\xff\xd8\xff sprites"}
VARIANTS = tuple(MEDIA)
GHOST = "video_" + "0" * 32
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _masked(error: dict, video_id: str) -> str:
    return json.dumps(error).replace(video_id, "<id>")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def clocked(db_url: str, jobs: JobStore, clock: Clock) -> Iterator[JobStore]:
    """The test's job store on a clock the test moves (``jobs`` migrated the database)."""
    store = JobStore(db_url, clock=clock)
    yield store
    store.close()


@pytest.fixture
def farm(make_auth_app, objects, clocked) -> TestClient:
    return TestClient(make_auth_app(objects=objects, store=clocked))


def _account_id(client: TestClient, headers: dict) -> str:
    return client.get("/v1/account", headers=headers).json()["id"]


def _completed(client: TestClient, store: JobStore, objects, headers: dict, tmp_path, prompt: str = "a fox") -> str:
    vid = client.post("/v1/videos", json={"prompt": prompt, "seed": 3}, headers=headers).json()["id"]
    finish_job(store, objects, vid, MEDIA, tmp_path)
    return vid


def _video_routes(client: TestClient) -> dict:
    """Every route that takes a video id, as (video id, headers) → response."""
    def content(variant):
        return lambda v, h: client.get(f"/v1/videos/{v}/content", params={"variant": variant}, headers=h)

    return {
        "retrieve": lambda v, h: client.get(f"/v1/videos/{v}", headers=h),
        **{f"content {variant}": content(variant) for variant in VARIANTS},
        "events": lambda v, h: client.get(f"/v1/videos/{v}/events", headers=h),
        "remix": lambda v, h: client.post(f"/v1/videos/{v}/remix", json={"prompt": "mine now"}, headers=h),
        "cancel": lambda v, h: client.post(f"/v1/videos/{v}/cancel", headers=h),
        "delete": lambda v, h: client.delete(f"/v1/videos/{v}", headers=h),
        "share": lambda v, h: client.post(f"/v1/videos/{v}/shares", json={"account": "cy"}, headers=h),
        "list shares": lambda v, h: client.get(f"/v1/videos/{v}/shares", headers=h),
        "unshare": lambda v, h: client.delete(f"/v1/videos/{v}/shares/bob", headers=h),
        "publish link": lambda v, h: client.post(f"/v1/videos/{v}/links", headers=h),
        "list links": lambda v, h: client.get(f"/v1/videos/{v}/links", headers=h),
        "revoke link": lambda v, h: client.delete(f"/v1/videos/{v}/links/vlink_x", headers=h),
        "list after": lambda v, h: client.get("/v1/videos", params={"after": v}, headers=h),
    }


READ_ONLY = ("retrieve", "content video", "content thumbnail", "content spritesheet", "events", "remix")
OWNER_ONLY = ("cancel", "delete", "share", "list shares", "unshare", "publish link", "list links", "revoke link")


def _hidden(routes: dict, names, vid: str, who: dict) -> None:
    for name in names:
        theirs, missing = error_of(routes[name](vid, who), 404), error_of(routes[name](GHOST, who), 404)
        assert _masked(theirs, vid) == _masked(missing, GHOST), name  # existence does not leak


def test_a_draft_is_invisible_until_shared_and_again_after_unsharing(farm, clocked, objects, tmp_path):
    client = farm
    ada, bob, cy = new_tenant(client, "ada"), new_tenant(client, "bob"), new_tenant(client, "cy")
    vid = _completed(client, clocked, objects, ada, tmp_path)
    routes = _video_routes(client)
    assert client.get(f"/v1/videos/{vid}", headers=ada).json()["visibility"] == "private"
    _hidden(routes, READ_ONLY + OWNER_ONLY, vid, bob)
    assert client.get("/v1/videos", params={"shared": "true"}, headers=bob).json()["data"] == []

    share = client.post(f"/v1/videos/{vid}/shares", json={"account": "bob"}, headers=ada)
    assert share.status_code == 200, share.text
    assert share.json()["account_id"] == _account_id(client, bob) and share.json()["account_name"] == "bob"
    assert client.get(f"/v1/videos/{vid}", headers=ada).json()["visibility"] == "shared"
    # B reads, downloads (the same bytes), follows and remixes; C still sees nothing.
    seen = client.get(f"/v1/videos/{vid}", headers=bob)
    assert seen.status_code == 200 and seen.json()["id"] == vid and seen.json()["visibility"] == "shared"
    for variant in VARIANTS:
        assert routes[f"content {variant}"](vid, bob).content == MEDIA[variant]
    assert "video.completed" in routes["events"](vid, bob).text
    remix = routes["remix"](vid, bob).json()
    assert remix["remixed_from_video_id"] == vid and remix["visibility"] == "private"
    assert client.get(f"/v1/videos/{remix['id']}", headers=ada).status_code == 404  # the remix is B's draft
    _hidden(routes, READ_ONLY, vid, cy)
    # B cannot manage it: delete, cancel, shares and links are the owner's (404: as if it did not exist).
    _hidden(routes, OWNER_ONLY, vid, bob)
    # Listing: B's own list is unchanged (the SDK's list); the shared list has it.
    assert [v["id"] for v in client.get("/v1/videos", headers=bob).json()["data"]] == [remix["id"]]
    shared = client.get("/v1/videos", params={"shared": "true"}, headers=bob).json()
    assert [v["id"] for v in shared["data"]] == [vid] and shared["has_more"] is False
    assert [s["account_name"] for s in client.get(f"/v1/videos/{vid}/shares", headers=ada).json()["data"]] == ["bob"]

    gone = client.delete(f"/v1/videos/{vid}/shares/bob", headers=ada)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    _hidden(routes, READ_ONLY + OWNER_ONLY, vid, bob)
    assert client.get("/v1/videos", params={"shared": "true"}, headers=bob).json()["data"] == []
    assert error_of(client.delete(f"/v1/videos/{vid}/shares/bob", headers=ada), 404)["param"] == "account"
    # Nothing of A's changed through any of it.
    assert client.get(f"/v1/videos/{vid}", headers=ada).json()["status"] == "completed"
    assert client.get(f"/v1/videos/{vid}/content", headers=ada).content == MEDIA["video"]


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"account": "nobody"}, "account", "account_not_found"),
    ({"account": "ada"}, "account", "invalid_value"),
    ({"account": ""}, "account", None),
    ({}, "account", None),
    ({"account": "bob", "extra": 1}, "extra", None),
])
def test_bad_shares_are_400s_naming_the_field(farm, clocked, body, param, code):
    ada, _ = new_tenant(farm, "ada"), new_tenant(farm, "bob")
    vid = farm.post("/v1/videos", json={"prompt": "a fox"}, headers=ada).json()["id"]
    error = error_of(farm.post(f"/v1/videos/{vid}/shares", json=body, headers=ada), 400)
    assert error["param"] == param and (code is None or error["code"] == code)
    assert farm.get(f"/v1/videos/{vid}/shares", headers=ada).json()["data"] == []
    assert farm.get(f"/v1/videos/{vid}", headers=ada).json()["visibility"] == "private"


def test_an_unlisted_link_works_without_a_key_until_revoked(farm, clocked, objects, tmp_path):
    client = farm
    ada, bob = new_tenant(client, "ada"), new_tenant(client, "bob")
    vid = _completed(client, clocked, objects, ada, tmp_path)
    made = client.post(f"/v1/videos/{vid}/links", headers=ada)
    assert made.status_code == 200, made.text
    link, token = made.json(), made.json()["token"]
    assert link["url"].endswith(f"/v1/shared/{token}") and link["status"] == "active"
    listed = client.get(f"/v1/videos/{vid}/links", headers=ada).json()["data"]
    assert [x["id"] for x in listed] == [link["id"]] and token not in json.dumps(listed)  # shown once

    anonymous = TestClient(client.app)  # no Authorization header at all
    seen = anonymous.get(f"/v1/shared/{token}")
    assert seen.status_code == 200, seen.text
    assert seen.json()["id"] == vid and seen.json()["visibility"] == "unlisted" and seen.json()["usage"] is None
    for variant in VARIANTS:  # the same bytes whatever the path
        by_link = anonymous.get(f"/v1/shared/{token}/content", params={"variant": variant})
        by_owner = client.get(f"/v1/videos/{vid}/content", params={"variant": variant}, headers=ada)
        assert by_link.status_code == 200 and by_link.content == by_owner.content == MEDIA[variant]
        assert by_link.headers["content-type"] == by_owner.headers["content-type"]
    ranged = anonymous.get(f"/v1/shared/{token}/content", headers={"Range": "bytes=10-29"})
    assert ranged.status_code == 206 and ranged.content == MEDIA["video"][10:30]
    assert ranged.headers["content-range"] == f"bytes 10-29/{len(MEDIA['video'])}"
    # A link is not a share: B's key does not open the video by id.
    assert client.get(f"/v1/videos/{vid}", headers=bob).status_code == 404

    wrong = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for bad in (wrong, "vf_share_x", "nothing"):
        for path in (f"/v1/shared/{bad}", f"/v1/shared/{bad}/content"):
            assert error_of(anonymous.get(path), 404)["code"] == "link_not_found"
    assert error_of(client.delete(f"/v1/videos/{vid}/links/{link['id']}", headers=bob), 404)["param"] == "video_id"
    revoked = client.delete(f"/v1/videos/{vid}/links/{link['id']}", headers=ada)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    for path in (f"/v1/shared/{token}", f"/v1/shared/{token}/content"):
        assert _masked(error_of(anonymous.get(path), 404), token) == _masked(error_of(anonymous.get(
            f"/v1/shared/{wrong}" + path.removeprefix(f"/v1/shared/{token}")), 404), wrong)
    assert client.get(f"/v1/videos/{vid}", headers=ada).json()["visibility"] == "private"


def test_deleting_a_video_ends_its_links_and_shares(farm, clocked, objects, tmp_path):
    ada, bob = new_tenant(farm, "ada"), new_tenant(farm, "bob")
    vid = _completed(farm, clocked, objects, ada, tmp_path)
    token = farm.post(f"/v1/videos/{vid}/links", headers=ada).json()["token"]
    assert farm.post(f"/v1/videos/{vid}/shares", json={"account": "bob"}, headers=ada).status_code == 200
    assert farm.delete(f"/v1/videos/{vid}", headers=ada).json()["deleted"] is True
    assert TestClient(farm.app).get(f"/v1/shared/{token}").status_code == 404
    assert farm.get("/v1/videos", params={"shared": "true"}, headers=bob).json()["data"] == []
    assert not any(k.startswith(f"videos/{vid}/") for k in objects.list_keys())


def test_expired_content_is_404_video_expired_and_the_reaper_empties_s3(farm, clocked, objects, clock, tmp_path):
    client = farm
    ada = new_tenant(client, "ada")
    old = _completed(client, clocked, objects, ada, tmp_path, "old")
    token = client.post(f"/v1/videos/{old}/links", headers=ada).json()["token"]
    clock.advance(7 * 24 * 3600 + 1)  # past the default lifetime, counted from completion
    young = _completed(client, clocked, objects, ada, tmp_path, "young")
    anonymous = TestClient(client.app)
    for variant in VARIANTS:
        for response in (client.get(f"/v1/videos/{old}/content", params={"variant": variant}, headers=ada),
                         anonymous.get(f"/v1/shared/{token}/content", params={"variant": variant})):
            error = error_of(response, 404)
            assert error["code"] == "video_expired" and error["param"] == "video_id", error
    video = client.get(f"/v1/videos/{old}", headers=ada).json()
    assert video["status"] == "completed" and video["expired"] is True and video["expires_at"] <= clock().timestamp()
    assert client.get(f"/v1/videos/{young}", headers=ada).json()["expired"] is False
    assert client.get(f"/v1/videos/{young}/content", headers=ada).content == MEDIA["video"]

    assert any(k.startswith(f"videos/{old}/") for k in objects.list_keys())
    turn = ClipReaper(Lifetimes(clocked.db, clock=clock), objects).turn()
    assert turn.reaped == 1 and turn.objects == len(MEDIA) + 1  # the variants and the record
    assert objects.list_keys(f"videos/{old}/") == []
    assert len(objects.list_keys(f"videos/{young}/")) == len(MEDIA) + 1
    after = client.get(f"/v1/videos/{old}", headers=ada).json()  # the record stays
    assert after["status"] == "completed" and after["expired"] is True
    assert error_of(client.get(f"/v1/videos/{old}/content", headers=ada), 404)["code"] == "video_expired"


def test_the_operator_sets_an_accounts_lifetime(farm, clocked):
    client = farm
    ada, bob = new_tenant(client, "ada"), new_tenant(client, "bob")
    ada_id = _account_id(client, ada)
    path = f"/v1/admin/accounts/{ada_id}/lifetime"
    assert client.get(path, headers=ADMIN).json() == {
        "object": "account.lifetime", "account_id": ada_id, "tier": None, "lifetime_s_override": None,
        "lifetime_s": 7 * 24 * 3600}
    assert client.post(path, json={"lifetime_s": 3600}, headers=ada).status_code == 401  # a tenant key
    for bad in (30, -1, "soon", 10**12):
        assert error_of(client.post(path, json={"lifetime_s": bad}, headers=ADMIN), 400)["param"] == "lifetime_s"
    assert error_of(client.post("/v1/admin/accounts/acct_nobody/lifetime", json={"lifetime_s": 3600},
                                headers=ADMIN), 404)["param"] == "account_id"
    set_ = client.post(path, json={"lifetime_s": 3600}, headers=ADMIN)
    assert set_.status_code == 200 and set_.json()["lifetime_s"] == 3600
    mine = client.post("/v1/videos", json={"prompt": "short-lived"}, headers=ada).json()
    theirs = client.post("/v1/videos", json={"prompt": "default"}, headers=bob).json()
    assert mine["expires_at"] - mine["created_at"] in (3600, 3601)  # whole seconds of microsecond times
    assert theirs["expires_at"] - theirs["created_at"] in (7 * 24 * 3600, 7 * 24 * 3600 + 1)
    assert client.post(path, json={"lifetime_s": None}, headers=ADMIN).json()["lifetime_s"] == 7 * 24 * 3600


def test_sharing_routes_are_in_the_openapi_schema_with_summaries(farm):
    paths = farm.get("/openapi.json").json()["paths"]
    for path, method in [("/v1/videos/{video_id}/shares", "post"), ("/v1/videos/{video_id}/shares/{account}", "delete"),
                         ("/v1/videos/{video_id}/links", "post"), ("/v1/videos/{video_id}/links/{link_id}", "delete"),
                         ("/v1/shared/{token}", "get"), ("/v1/shared/{token}/content", "get"),
                         ("/v1/admin/accounts/{account_id}/lifetime", "post")]:
        assert paths[path][method]["summary"], path
    assert "security" not in paths["/v1/shared/{token}"]["get"]  # no key needed
    assert paths["/v1/videos/{video_id}/links"]["post"]["security"] == [{"bearer": []}]


def test_content_redirect_sends_a_presigned_url_of_the_same_bytes(make_auth_app, objects, clocked, clock, tmp_path):
    import httpx

    client = TestClient(make_auth_app(objects=objects, store=clocked, content_redirect_s=30),
                        follow_redirects=False)
    ada = new_tenant(client, "ada")
    vid = _completed(client, clocked, objects, ada, tmp_path)
    token = client.post(f"/v1/videos/{vid}/links", headers=ada).json()["token"]
    for response in (client.get(f"/v1/videos/{vid}/content", headers=ada),
                     TestClient(client.app, follow_redirects=False).get(f"/v1/shared/{token}/content")):
        assert response.status_code == 307 and "Signature=" in response.headers["location"]
        url = response.headers["location"]
        assert httpx.get(url).content == MEDIA["video"]  # straight from the real S3, no key
        ranged = httpx.get(url, headers={"Range": "bytes=4-11"})
        assert ranged.status_code == 206 and ranged.content == MEDIA["video"][4:12]
    thumb = client.get(f"/v1/videos/{vid}/content", params={"variant": "thumbnail"}, headers=ada)
    assert httpx.get(thumb.headers["location"]).content == MEDIA["thumbnail"]
    objects.delete(f"videos/{vid}/spritesheet.jpg")  # a variant that is not stored: a 404 in the OpenAI shape
    missing = client.get(f"/v1/videos/{vid}/content", params={"variant": "spritesheet"}, headers=ada)
    assert error_of(missing, 404)["param"] == "variant"
    clock.advance(8 * 24 * 3600)  # expiry is checked before any URL is made
    assert error_of(client.get(f"/v1/videos/{vid}/content", headers=ada), 404)["code"] == "video_expired"
