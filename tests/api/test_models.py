"""``GET /v1/models`` and OpenAI's tier names, through the unmodified ``openai`` SDK (real uvicorn, SQLite).

The models are the embedded ones (``tiny_spec``) with their built-in tiers (``embedded_aliases``):
what a fresh ``farm up`` serves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient

from farm.accounts.store import AccountStore
from farm.api.app import GatewayDeps
from farm.api.batch_lines import BatchLineRules
from farm.config import embedded_aliases
from farm.jobs.store import JobStore
from farm.render.registry import ModelSpec
from farm.render.tiers import ModelAlias
from farm.render.tiny import tiny_spec
from tests.api.conftest import LiveServer, mark_completed

REFUSING = [a.model_copy(update={"mapping": "refuse"}) for a in embedded_aliases()]


@pytest.fixture
def models() -> list[ModelSpec]:  # overrides the gateway fixtures' models: the embedded ones
    return [tiny_spec("/models/wan-tiny", experts=1), tiny_spec("/models/wan-tiny-2x", experts=2)]


@pytest.fixture
def base_url(make_auth_app) -> Iterator[str]:
    with LiveServer(make_auth_app(aliases=embedded_aliases())) as url:
        yield url


def tenant(accounts: AccountStore, base_url: str, name: str = "porter") -> openai.OpenAI:
    _, code = accounts.create_invite(note=name)
    _, _, key = accounts.redeem(code, name)
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def test_the_sdk_lists_and_retrieves_models_and_aliases(base_url, accounts) -> None:
    client = tenant(accounts, base_url)
    listed = list(client.models.list())
    assert [m.id for m in listed] == ["wan-tiny", "wan-tiny-2x", "sora-2", "sora-2-pro"]
    assert all(isinstance(m, openai.types.Model) and m.object == "model" and m.owned_by == "videofarm"
               and m.created > 0 for m in listed)
    standard, pro = client.models.retrieve("sora-2"), client.models.retrieve("sora-2-pro")
    # Farm extensions: the SDK keeps them as extra fields.
    assert (standard.alias_of, standard.mapping, standard.sizes, standard.seconds, standard.default_steps) == (
        "wan-tiny", "map", ["96x128", "128x96", "128x128"], ["4", "2"], 8)
    assert (pro.alias_of, pro.default_steps, pro.max_steps) == ("wan-tiny-2x", 16, 50)
    assert "256x256" in pro.sizes and "256x256" not in standard.sizes  # the pro tier's larger size
    served = client.models.retrieve("wan-tiny")
    assert (served.alias_of, served.mapping, served.sizes, served.seconds) == (
        None, None, ["64x64", "128x128", "256x256", "128x96", "96x128"], ["1", "2", "3", "4"])
    # Truthful: the Wan models make no audio (LTX-2 does: test_audio_requests.py); they also take a source video.
    assert all(m.audio is False and m.input_types == ["text", "video"] for m in listed)
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("sora-3")
    assert missing.value.body["code"] == "model_not_found" and "sora-2-pro" in missing.value.body["message"]
    anonymous = openai.OpenAI(base_url=f"{base_url}/v1", api_key="vf_sk_" + "0" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_openai_defaults_map_to_the_tier_and_say_so(base_url, accounts, jobs: JobStore) -> None:
    client = tenant(accounts, base_url)
    video = client.videos.create(model="sora-2", prompt="a red fox in the snow", size="720x1280", seconds="4")
    assert (video.model, video.size, video.seconds) == ("sora-2", "96x128", "4")
    assert (video.served_model, video.mapped_from) == ("wan-tiny", {"size": "720x1280", "seconds": None})
    job = jobs.get(video.id)
    assert (job.model, job.size, job.seconds, job.params["steps"]) == ("wan-tiny", "96x128", 4, 8)

    wide = client.videos.create(model="sora-2-pro", prompt="a red fox in the snow", size="1792x1024", seconds="12")
    assert (wide.model, wide.served_model, wide.size, wide.seconds) == ("sora-2-pro", "wan-tiny-2x", "128x96", "4")
    assert wide.mapped_from == {"size": "1792x1024", "seconds": "12"}
    assert jobs.get(wide.id).params["steps"] == 16  # the pro tier's steps
    assert client.videos.retrieve(wide.id).mapped_from == wide.mapped_from  # kept with the job

    # Omitted size and seconds: the tier's first (portrait, 4 s, like OpenAI's defaults); nothing mapped.
    plain = client.videos.create(model="sora-2", prompt="a red fox in the snow")
    assert (plain.size, plain.seconds, plain.mapped_from) == ("96x128", "4", None)
    # A size the tier serves is taken as is; a model id never maps and echoes itself.
    direct = client.videos.create(model="wan-tiny", prompt="a red fox", size="128x128", seconds="2")
    assert (direct.model, direct.served_model, direct.mapped_from) == ("wan-tiny", "wan-tiny", None)


def test_values_a_tier_does_not_map_are_refused_and_create_nothing(base_url, accounts, jobs: JobStore) -> None:
    client = tenant(accounts, base_url)
    cases = [
        ({"model": "sora-2", "size": "256x256"}, "size", "allowed: 96x128, 128x96, 128x128"),  # not OpenAI's: no map
        ({"model": "sora-2", "seconds": "3"}, "seconds", "allowed: 4, 2"),
        ({"model": "wan-tiny", "size": "720x1280"}, "size", "model 'wan-tiny'"),  # a model id never maps
        ({"model": "sora-2", "extra_body": {"steps": 51}}, "steps", "allowed: 1..50"),
        ({"model": "sora-9"}, "model", "available: wan-tiny, wan-tiny-2x, sora-2, sora-2-pro"),
    ]
    for extra, param, needle in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.videos.create(prompt="a fox", **extra)
        error = refused.value.body
        assert error["param"] == param and needle in error["message"], (extra, error)
        assert error["code"] == ("model_not_found" if param == "model" else "invalid_value")
    assert jobs.list(limit=10)[0] == []


def test_a_refusing_tier_lists_what_it_allows(make_auth_app, auth_headers, jobs: JobStore) -> None:
    with TestClient(make_auth_app(aliases=REFUSING)) as http:
        for body, param, needle in [
            ({"size": "720x1280", "seconds": "4"}, "size", "allowed: 96x128, 128x96, 128x128"),
            ({"size": "96x128", "seconds": "8"}, "seconds", "allowed: 4, 2"),
        ]:
            reply = http.post("/v1/videos", json={"model": "sora-2", "prompt": "a fox"} | body, headers=auth_headers)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
            assert needle in reply.json()["error"]["message"] and "model 'sora-2'" in reply.json()["error"]["message"]
        # What the tier serves passes, as is.
        ok = http.post("/v1/videos", json={"model": "sora-2", "prompt": "a fox", "size": "128x96", "seconds": "2"},
                       headers=auth_headers)
        assert ok.status_code == 200 and ok.json()["mapped_from"] is None, ok.text
    assert len(jobs.list(limit=10)[0]) == 1


def test_multipart_and_remix_and_idempotency_under_an_alias(make_auth_app, auth_headers, jobs: JobStore) -> None:
    with TestClient(make_auth_app(aliases=embedded_aliases())) as http:
        # multipart/form-data, as the SDK sends a create: parts without a filename are plain fields.
        form = {"model": "sora-2-pro", "prompt": "a fox", "size": "1024x1792", "seconds": "8"}

        def post(fields: dict, key: str):
            return http.post("/v1/videos", files={k: (None, v) for k, v in fields.items()},
                             headers=auth_headers | {"Idempotency-Key": key})

        first = post(form, "k1")
        assert first.request.headers["content-type"].startswith("multipart/form-data")
        assert first.status_code == 200, first.text
        video = first.json()
        assert (video["model"], video["size"], video["seconds"], video["mapped_from"]) == (
            "sora-2-pro", "96x128", "4", {"size": "1024x1792", "seconds": "8"})
        assert post(form, "k1").json()["id"] == video["id"]
        other = post(form | {"size": "720x1280"}, "k1")
        assert other.status_code == 409, other.text  # same rendering, another request: not the same
        mark_completed(jobs, video["id"])  # only a completed video is remixed
        remix = http.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "a wolf"}, headers=auth_headers)
        assert remix.status_code == 200, remix.text
        remixed = remix.json()
        assert (remixed["model"], remixed["served_model"], remixed["size"], remixed["seconds"]) == (
            "sora-2-pro", "wan-tiny-2x", "96x128", "4")
        assert remixed["remixed_from_video_id"] == video["id"] and remixed["mapped_from"] is None
        assert jobs.get(remixed["id"]).params["steps"] == 16
        schema = http.get("/openapi.json").json()["components"]["schemas"]["CreateVideoRequest"]["properties"]
        assert {"sora-2", "sora-2-pro"} <= set(schema["model"]["anyOf"][0]["enum"])
        assert "720x1280" in schema["size"]["anyOf"][0]["enum"]


def test_a_batch_line_with_an_alias_is_checked_and_mapped_as_a_request_is(models) -> None:
    rules = BatchLineRules(models, aliases=embedded_aliases())
    line = {"custom_id": "c1", "method": "POST", "url": "/v1/videos",
            "body": {"model": "sora-2", "prompt": "a fox", "size": "720x1280", "seconds": "4", "priority": "bulk"}}
    verdict = rules.check(json.dumps(line).encode())
    assert verdict.error is None, verdict.error
    video = verdict.video
    assert (video.model, video.size, video.seconds, video.params["steps"]) == ("wan-tiny", "96x128", 4, 8)
    assert (video.params["requested_model"], video.params["mapped_from"]) == ("sora-2", {"size": "720x1280"})

    strict = BatchLineRules(models, aliases=REFUSING).check(json.dumps(line).encode())
    error = strict.error["body"]["error"]
    assert strict.video is None and error["param"] == "body.size" and "allowed: 96x128" in error["message"]


def test_a_batch_line_alias_reaches_the_job_and_its_video_object(jobs: JobStore, models) -> None:
    rules = BatchLineRules(models, aliases=embedded_aliases())
    line = {"custom_id": "c2", "method": "POST", "url": "/v1/videos",
            "body": {"model": "sora-2-pro", "prompt": "a fox", "size": "1280x720"}}
    video = rules.check(json.dumps(line).encode()).video
    job = jobs.create(model=video.model, prompt=video.prompt, size=video.size, seconds=video.seconds,
                      params=video.params, priority=1)
    shown = rules.video(job)  # what the batch's output line carries
    assert (shown["model"], shown["served_model"], shown["size"], shown["mapped_from"]) == (
        "sora-2-pro", "wan-tiny-2x", "128x96", {"size": "1280x720", "seconds": None})


def test_the_gateway_refuses_an_alias_of_an_unknown_model(jobs: JobStore, models) -> None:
    with pytest.raises(ValueError, match="'sora-2' maps to model 'wan-huge', which is not in models"):
        GatewayDeps(store=jobs, objects=lambda: None, models=models,
                    aliases=[ModelAlias(id="sora-2", model="wan-huge")])
    with pytest.raises(ValueError, match="'sora-2' maps to model 'wan-huge'"):
        BatchLineRules(models, aliases=[ModelAlias(id="sora-2", model="wan-huge")])
