"""The trust story on the real farm, with the unmodified ``openai`` SDK (issue 11's done-when):

account A creates a character; B's use of it is refused (403, nothing created); B asks, A approves;
B's clip renders through image-to-video from the cameo's frame and decodes; A sees it among the
clips that use her cameo and deletes it (its objects leave S3); A revokes and B's next use is refused.
A's draft is invisible to B until A shares it, and again after A stops. A clip past its lifetime
answers 404 ``video_expired`` and the farm's reaper removes its objects from S3; the record stays.
(The opt-out list in five spellings is test_policy_farm.py's.)
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import uuid

import httpx
import numpy as np
import openai
import pytest

from farm.finish.media import encode_mp4
from farm.storage.s3 import ClipLayout
from tests.serve.conftest import TRUST_LIFETIME_S
from tests.serve.farmkit import wait_for

pytestmark = pytest.mark.slow
SMALL = {"size": "64x64", "seconds": "1", "extra_body": {"steps": 2, "seed": 5}}


def _cameo_video(tmp_path) -> bytes:
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    frames[...] = (30, 120, 200)
    frames[:, 16:48, 16:48] = (250, 220, 40)  # a face-sized square to recognise
    return encode_mp4(frames, 8, tmp_path / "me.mp4").read_bytes()


def _decodes(mp4: bytes) -> int:
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return sum(1 for _ in container.decode(video=0))


def _raw(farm, key: str) -> httpx.Client:
    """Farm-extension routes the SDK has no method for, with the same API key."""
    return httpx.Client(base_url=f"{farm.url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    return error


def test_cameo_consent_sharing_and_expiry_on_the_farm(shared_farm, tmp_path):
    farm = shared_farm
    suffix = uuid.uuid4().hex[:6]
    a_key, b_key = farm.new_api_key(f"ada-{suffix}"), farm.new_api_key(f"bob-{suffix}")
    a, b = farm.client(a_key), farm.client(b_key)
    objects = farm.objects()
    with _raw(farm, a_key) as a_raw, _raw(farm, b_key) as b_raw:
        a_id, b_id = a_raw.get("/account").json()["id"], b_raw.get("/account").json()["id"]
        # A's clips live TRUST_LIFETIME_S (the shortest lifetime this farm's operator allows), from this clip on.
        with pytest.raises(urllib.error.HTTPError) as short:  # below expiry.min_lifetime_s
            farm.admin("POST", f"/v1/admin/accounts/{a_id}/lifetime", {"lifetime_s": TRUST_LIFETIME_S - 1})
        assert short.value.code == 400 and json.loads(short.value.read())["error"]["param"] == "lifetime_s"
        farm.admin("POST", f"/v1/admin/accounts/{a_id}/lifetime", {"lifetime_s": TRUST_LIFETIME_S})
        draft = a.videos.create_and_poll(model="wan-tiny", prompt="a quiet harbour at dawn", **SMALL)
        assert draft.status == "completed", draft.error

        # A draft is A's alone until shared; sharing lets B see and download it; unsharing hides it again.
        for path in (f"/videos/{draft.id}", f"/videos/{draft.id}/content"):
            assert _error(b_raw.get(path), 404)["param"] == "video_id"
        shared = a_raw.post(f"/videos/{draft.id}/shares", json={"account": b_id})
        assert shared.status_code == 200, shared.text
        assert b.videos.retrieve(draft.id).status == "completed"
        assert _decodes(b.videos.download_content(draft.id).read()) == 9
        assert draft.id not in [v.id for v in b.videos.list().data]  # shared with B, still A's
        assert a_raw.delete(f"/videos/{draft.id}/shares/{b_id}").status_code == 200
        assert _error(b_raw.get(f"/videos/{draft.id}/content"), 404)["param"] == "video_id"

        # A makes a character; B may see it exists, not use it.
        made = a.videos.create_character(name=f"ada_{suffix}", video=("me.mp4", _cameo_video(tmp_path), "video/mp4"))
        assert made.id.startswith("char_") and b.videos.get_character(made.id).name == f"ada_{suffix}"
        for kwargs in ({"prompt": f"@ada_{suffix} walks through Kyoto"},
                       {"prompt": "a walk", "extra_body": {"characters": [made.id], "steps": 2}}):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                b.videos.create(model="wan-tiny", size="64x64", seconds="1", **kwargs)
            assert refused.value.status_code == 403 and refused.value.code == "cameo_consent_required"
        assert b.videos.list().data == []  # nothing was created

        # B asks, A approves, B's clip renders from the cameo.
        asked = b_raw.post(f"/videos/characters/{made.id}/requests")
        assert asked.status_code == 200 and asked.json()["status"] == "pending", asked.text
        answer = a_raw.post(f"/videos/characters/{made.id}/requests/{b_id}", json={"decision": "approve"})
        assert answer.status_code == 200 and answer.json()["status"] == "approved", answer.text
        clip = b.videos.create_and_poll(model="wan-tiny", prompt=f"東京で@ada_{suffix}が歩く", **SMALL)
        assert clip.status == "completed", clip.error
        assert farm.store().get(clip.id).params["characters"] == [made.id]
        assert _decodes(b.videos.download_content(clip.id).read()) == 9
        prefix = ClipLayout(clip.id).prefix
        assert objects.list_keys(prefix)

        # A sees B's draft among her cameo's uses and deletes it: the record and its objects go.
        uses = a_raw.get(f"/videos/characters/{made.id}/videos").json()
        assert [v["id"] for v in uses["data"]] == [clip.id]
        assert a.videos.delete(clip.id).deleted
        assert _error(b_raw.get(f"/videos/{clip.id}"), 404)["param"] == "video_id"
        assert objects.list_keys(prefix) == []

        # A revokes: B's next use is refused and creates nothing.
        revoked = a_raw.post(f"/videos/characters/{made.id}/revoke", json={})
        assert revoked.status_code == 200 and revoked.json()["revoked_accounts"] == [b_id], revoked.text
        with pytest.raises(openai.PermissionDeniedError) as refused:
            b.videos.create(model="wan-tiny", prompt=f"@ada_{suffix} again", size="64x64", seconds="1")
        assert refused.value.code == "cameo_consent_required"
        assert b.videos.list().data == []

        # The draft's lifetime ends: content is 404 video_expired and the reaper empties its S3 prefix.
        expires_at = a.videos.retrieve(draft.id).expires_at
        assert expires_at is not None and abs(expires_at - draft.completed_at - TRUST_LIFETIME_S) <= 1
        # The API's times are whole seconds, the farm's are not: the expiry may fall up to 1 s after expires_at.
        time.sleep(max(0.0, expires_at - time.time()) + 1.5)
        assert _error(a_raw.get(f"/videos/{draft.id}/content"), 404)["code"] == "video_expired"
        wait_for(lambda: objects.list_keys(ClipLayout(draft.id).prefix) == [], 30, interval=0.5,
                 what="the reaper to remove the expired clip's objects")
        kept = a.videos.retrieve(draft.id)
        assert kept.id == draft.id  # the record stays
