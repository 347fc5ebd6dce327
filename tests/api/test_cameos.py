"""Cameos through the gateway: the SDK's create_character / get_character under uvicorn, consent
(refused with 403 and nothing created, asked, approved, revoked), renders routed through
image-to-video from the cameo's frame, the owner's view of every use, and removal on revocation
from the real S3 (SeaweedFS)."""

from __future__ import annotations

import io

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from farm.finish.media import encode_mp4
from farm.policy.index import RegistryCache
from farm.policy.mentions import mentions
from farm.policy.moderation import default_chain
from farm.policy.registry import PolicyStore
from farm.render.registry import REFERENCE_KEY_PARAM, ModelSpec
from farm.storage.s3 import ClipLayout
from tests.api.conftest import ADMIN_KEY, LiveServer, finish_job, new_tenant
from tests.api.test_gateway import error_of

I2V = ModelSpec(id="wan-tiny-i2v", family="wan-i2v", path="/models/wan-tiny-i2v", sizes=["128x128"], seconds=[1],
                default_steps=4, max_steps=50, max_sequence_length=512)
T2V = ModelSpec(id="wan-tiny", path="/models/wan-tiny", sizes=["128x128"], seconds=[1], default_steps=4)
MEDIA = {"video": b"\x00\x00\x00\x18ftypmp42 mp4 clip", "thumbnail": b"RIFF....WEBPthumb"}


def _video(tmp_path, colour=(200, 40, 40)) -> bytes:
    frames = np.zeros((8, 64, 96, 3), np.uint8)
    frames[...] = colour
    frames[:, 16:48, 32:64] = 255  # something to see in the frames
    return encode_mp4(frames, 8, tmp_path / "cameo.mp4").read_bytes()


def _key(headers: dict) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def registry(jobs) -> RegistryCache:
    return RegistryCache(PolicyStore(jobs.db), refresh_s=0)


@pytest.fixture
def app(make_auth_app, objects, registry, jobs):
    from farm.policy.cameos import CharacterStore

    return make_auth_app(objects=objects, models=[T2V, I2V], policy_registry=registry,
                         moderator=default_chain(registry, CharacterStore(jobs.db)))


def _create(client, headers, prompt, **body):
    return client.post("/v1/videos", json={"prompt": prompt} | body, headers=headers)


def _videos_of(jobs, owner=None) -> list:
    return jobs.list(owner=owner, limit=100)[0]


def test_consent_flow_with_the_sdk(app, jobs, objects, tmp_path):
    with TestClient(app) as admin:
        ada, bob = new_tenant(admin, "ada"), new_tenant(admin, "bob")
    with LiveServer(app) as url:
        a = openai.OpenAI(base_url=f"{url}/v1", api_key=_key(ada), max_retries=0)
        b = openai.OpenAI(base_url=f"{url}/v1", api_key=_key(bob), max_retries=0)
        made = a.videos.create_character(name="ada_k", video=("me.mp4", _video(tmp_path), "video/mp4"))
        assert made.id.startswith("char_") and made.name == "ada_k" and made.created_at > 0
        got = b.videos.get_character(made.id)  # visible to another account: they must know what to ask for
        assert (got.id, got.name, got.created_at) == (made.id, "ada_k", made.created_at)
        frames = [k for k in objects.list_keys(f"characters/{made.id}/") if k.endswith(".png")]
        assert len(frames) == 4 and f"characters/{made.id}/source" in objects.list_keys(f"characters/{made.id}/")

        # B's use is refused, by @name (Japanese around it) and by id, and nothing is created.
        by_id = {"prompt": "a walk", "extra_body": {"characters": [made.id]}}
        for kwargs in ({"prompt": "東京で@ada_kが歩く"}, by_id):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                b.videos.create(model="wan-tiny", **kwargs)
            assert refused.value.status_code == 403 and refused.value.code == "cameo_consent_required"
        assert _videos_of(jobs) == [] and objects.list_keys("videos/") == []

        with TestClient(app) as c:
            asked = c.post(f"/v1/videos/characters/{made.id}/requests", headers=bob)
            assert asked.status_code == 200 and asked.json()["status"] == "pending", asked.text
            bob_id = asked.json()["account_id"]
            assert error_of(_create(c, bob, "@ada_k waves"), 403)["code"] == "cameo_consent_required"
            answer = c.post(f"/v1/videos/characters/{made.id}/requests/{bob_id}", json={"decision": "approve"},
                            headers=ada)
            assert answer.status_code == 200 and answer.json()["status"] == "approved", answer.text
            assert c.get(f"/v1/videos/characters/{made.id}", headers=bob).json()["access"] == {
                "may_use": True, "request": "approved"}

        clip = b.videos.create(model="wan-tiny", prompt="東京で@ada_kが歩く")
        job = jobs.get(clip.id)
        # Rendered through the image-to-video model from the cameo's middle frame; `model` echoes the request.
        assert job.model == "wan-tiny-i2v" and clip.model == "wan-tiny"
        assert job.params[REFERENCE_KEY_PARAM] == f"characters/{made.id}/frame_2.png"
        assert job.params["characters"] == [made.id]

        with TestClient(app) as c:
            uses = c.get(f"/v1/videos/characters/{made.id}/videos", headers=ada).json()
            assert [v["id"] for v in uses["data"]] == [clip.id]
            assert c.get(f"/v1/videos/{clip.id}", headers=ada).status_code == 200  # B's draft, A's cameo
            assert c.get(f"/v1/videos/characters/{made.id}/videos", headers=bob).status_code == 404
            gone = c.delete(f"/v1/videos/{clip.id}", headers=ada)
            assert gone.status_code == 200 and jobs.get(clip.id) is None, gone.text

            revoked = c.post(f"/v1/videos/characters/{made.id}/revoke", json={}, headers=ada).json()
            assert revoked["revoked_accounts"] == [bob_id] and revoked["character"]["consent"] == "only_me"
        with pytest.raises(openai.PermissionDeniedError):
            b.videos.create(model="wan-tiny", prompt="@ada_k again")
        assert _videos_of(jobs) == []
        # A may still use her own cameo.
        assert a.videos.create(model="wan-tiny", prompt="@ada_k by herself").status == "queued"


def test_revocation_with_removal_deletes_the_clips_from_s3(app, jobs, objects, tmp_path):
    with TestClient(app) as c:
        ada, bob = new_tenant(c, "ada"), new_tenant(c, "bob")
        made = c.post("/v1/videos/characters", data={"name": "ada", "consent": "everyone"},
                      files={"video": ("me.mp4", _video(tmp_path), "video/mp4")}, headers=ada).json()
        created = _create(c, bob, "@ada dances", model="wan-tiny-i2v")
        assert created.status_code == 200, created.text
        clip = created.json()["id"]
        finish_job(jobs, objects, clip, MEDIA, tmp_path)
        queued = _create(c, bob, "@ada sings").json()["id"]
        own = _create(c, ada, "@ada sleeps").json()["id"]
        assert objects.list_keys(ClipLayout(clip).prefix)
        events = [e for e in jobs.events_since(0) if e.type == "video.cameo_used"]
        assert {(e.video_id, e.owner) for e in events} == {(clip, made["owner"]), (queued, made["owner"])}

        done = c.post(f"/v1/videos/characters/{made['id']}/revoke", json={"remove_clips": True}, headers=ada).json()
        assert sorted(done["deleted_video_ids"]) == sorted([clip, queued]) and done["cancelled_video_ids"] == []
        assert objects.list_keys(ClipLayout(clip).prefix) == []
        assert jobs.get(clip) is None and jobs.get(queued) is None and jobs.get(own) is not None
        assert error_of(_create(c, bob, "@ada again"), 403)["code"] == "cameo_consent_required"


def test_bad_cameo_requests_are_4xx_and_change_nothing(app, jobs, objects, tmp_path, make_auth_app):
    with TestClient(app) as c:
        ada = new_tenant(c, "ada")
        video = ("me.mp4", _video(tmp_path), "video/mp4")
        assert error_of(c.post("/v1/videos/characters", data={"name": "no spaces"}, files={"video": video},
                               headers=ada), 400)["param"] == "name"
        assert error_of(c.post("/v1/videos/characters", data={"name": "x"}, files={"video": ("a.mp4", b"nope")},
                               headers=ada), 400)["code"] == "unsupported_video_format"
        assert error_of(c.post("/v1/videos/characters", data={"name": "x", "consent": "maybe"},
                               files={"video": video}, headers=ada), 400)["param"] == "consent"
        assert c.post("/v1/videos/characters", data={"name": "Ada"}, files={"video": video},
                      headers=ada).status_code == 200
        taken = error_of(c.post("/v1/videos/characters", data={"name": "ada"}, files={"video": video}, headers=ada),
                         409)
        assert taken["code"] == "character_name_taken"
        assert len(c.get("/v1/videos/characters", headers=ada).json()["data"]) == 1
        assert len([k for k in objects.list_keys("characters/") if k.endswith("source")]) == 1
        unknown = error_of(_create(c, ada, "@nobody walks"), 400)
        assert unknown["code"] == "character_not_found" and unknown["param"] == "prompt"
        assert _create(c, ada, "mail bob@example.com a fox").status_code == 200  # no mention: an address
    # No image-to-video model served: a cameo cannot render, and says so.
    with TestClient(make_auth_app(objects=objects, models=[T2V])) as c:
        ada = new_tenant(c, "ada2")
        c.post("/v1/videos/characters", data={"name": "solo"}, files={"video": video}, headers=ada)
        assert error_of(_create(c, ada, "@solo"), 400)["code"] == "cameo_model_unavailable"


def test_a_public_figure_is_allowed_with_their_consenting_cameo(app, registry, jobs, tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(app) as c:
        star, fan = new_tenant(c, "star"), new_tenant(c, "fan")
        entry = c.post("/v1/admin/protected_names", json={"kind": "public_figure", "name": "Kiri Tanaka"},
                       headers=admin).json()
        made = c.post("/v1/videos/characters", data={"name": "kiri", "consent": "everyone"},
                      files={"video": ("k.mp4", _video(tmp_path), "video/mp4")}, headers=star).json()
        assert error_of(_create(c, fan, "Kiri Tanaka on stage"), 400)["code"] == "content_policy_violation"
        assert error_of(_create(c, fan, "Kiri Tanaka on stage with @kiri"), 400)["code"] == "content_policy_violation"
        linked = c.post(f"/v1/admin/characters/{made['id']}", json={"public_figure_id": entry["id"]}, headers=admin)
        assert linked.status_code == 200, linked.text
        assert _create(c, fan, "Kiri Tanaka on stage with @kiri").status_code == 200
        assert error_of(_create(c, fan, "Kiri Tanaka on stage"), 400)["code"] == "content_policy_violation"
        assert c.post(f"/v1/admin/characters/{made['id']}", json={"public_figure_id": entry["id"]},
                      headers=fan).status_code == 401


@pytest.mark.parametrize(("prompt", "names"), [
    ("東京で@alice_kが歩く", ["alice_k"]),
    ("「@Bob」と@bobが話す。", ["Bob"]),
    ("@a.b-c. は猫", ["a.b-c"]),
    ("mail bob@example.com", []),
    ("@@x and @-y", []),
    ("夜の渋谷、@ken_2026 がラーメンを食べる\n@mika", ["ken_2026", "mika"]),
])
def test_mentions(prompt, names):
    assert mentions(prompt) == names


def test_batch_lines_pass_the_cameo_rule(jobs, registry, models):
    from farm.api.uploads import UploadLimits
    from farm.api.video_requests import ContentPolicyViolation, check_create_body
    from farm.policy.cameos import CharacterStore, new_character_id

    cameos = CharacterStore(jobs.db)
    for name, consent in (("open", "everyone"), ("closed", "approved")):
        cid = new_character_id()
        cameos.create(character_id=cid, owner="acct_a", name=name, consent=consent, video_key=f"characters/{cid}/v",
                      frame_keys=[f"characters/{cid}/frame_0.png"], width=8, height=8)
    moderator = default_chain(registry, cameos)

    def line(prompt):
        return check_create_body({"prompt": prompt}, models, max_prompt_chars=100, upload_limits=UploadLimits(),
                                 moderator=moderator, owner="acct_b")

    assert line("a fox").prompt == "a fox"
    for prompt, status, code in (("@closed runs", 403, "cameo_consent_required"),
                                 ("@open runs", 400, "unsupported_parameter"),
                                 ("@ghost runs", 400, "character_not_found")):
        with pytest.raises(ContentPolicyViolation) as refused:
            line(prompt)
        assert (refused.value.status_code, refused.value.code) == (status, code), prompt


def test_cameo_used_is_a_webhook_event_type():
    from farm.webhooks.store import check_event_types

    assert check_event_types(["video.cameo_used"]) == ("video.cameo_used",)
