"""The ``audio`` request field and capability: on by default where the model makes audio (LTX-2), off by
request, a 400 naming ``audio`` on a model without it; ``GET /v1/models`` says which models make audio;
the dispatcher's render parameters carry the choice to the render stages."""

from __future__ import annotations

import dataclasses
import json

import pytest

from farm.jobs.dispatcher import params_of
from farm.render.registry import ModelSpec
from farm.render.tiny import tiny_spec
from farm.render.tiny_ltx2 import tiny_ltx2_spec
from tests.api.test_gateway import error_of


@pytest.fixture
def models() -> list[ModelSpec]:  # overrides the gateway fixtures' models: a Wan model and an LTX-2 one
    return [tiny_spec("/models/wan-tiny"), tiny_ltx2_spec("/models/ltx2-tiny")]


def _create(client, **fields) -> dict:
    response = client.post("/v1/videos", json={"prompt": "a fox barks", "model": "ltx2-tiny", "size": "64x64",
                                               "seconds": 1} | fields)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_say_which_make_audio(client):
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["ltx2-tiny"]["audio"] is True and listed["wan-tiny"]["audio"] is False
    assert listed["ltx2-tiny"]["input_types"] == ["text"]  # LTX-2 here renders from text only
    assert client.get("/v1/models/ltx2-tiny").json()["audio"] is True


def test_audio_is_on_by_default_where_the_model_makes_it_and_off_by_request(client, jobs, models):
    wan, ltx2 = models
    on = jobs.get(_create(client)["id"])
    off = jobs.get(_create(client, audio=False)["id"])
    asked = jobs.get(_create(client, audio=True)["id"])
    assert (on.params["audio"], off.params["audio"], asked.params["audio"]) == (True, False, True)
    assert on.params["scheduler"] == "flow-euler"  # the model's only solver, the default when none is named
    assert (params_of(on, ltx2).audio, params_of(off, ltx2).audio, params_of(asked, ltx2).audio) == (True, False, True)
    # A Wan job records nothing about audio (its params are what they were before the field existed) …
    wan_job = jobs.get(_create(client, model="wan-tiny", size="128x128", audio=False)["id"])
    assert "audio" not in wan_job.params and wan_job.params["scheduler"] == "unipc"
    assert params_of(wan_job, wan).audio is False
    # … and a stored LTX-2 job without the param (written before it existed) renders with the model's audio.
    assert params_of(dataclasses.replace(on, params={"seed": 1}), ltx2).audio is True


def test_multipart_sends_audio_as_a_form_field(client, jobs):
    response = client.post("/v1/videos", data={"prompt": "a fox barks", "model": "ltx2-tiny", "size": "64x64",
                                               "seconds": "1", "audio": "false"})
    assert response.status_code == 200, response.text
    assert jobs.get(response.json()["id"]).params["audio"] is False
    # Only true/false: "0" (found by the schema fuzzer, which reads it as an integer) is refused by name.
    refused = client.post("/v1/videos", data={"prompt": "a fox barks", "model": "ltx2-tiny", "size": "64x64",
                                              "seconds": "1", "audio": "0"})
    assert error_of(refused, 400)["param"] == "audio"


@pytest.mark.parametrize("fields, fragment", [
    ({"model": "wan-tiny", "size": "128x128", "audio": True}, "audio: model 'wan-tiny' makes no audio track"),
    ({"audio": "loud"}, "audio"),
    ({"audio": [True]}, "audio"),
    ({"audio": 1}, "audio: must be true or false, got 1"),  # JSON Schema's boolean is not 0/1
    ({"scheduler": "unipc"}, "scheduler: 'unipc' is not supported by model 'ltx2-tiny'; allowed: flow-euler"),
    ({"size": "128x128", "seconds": 3}, "seconds"),
])
def test_bad_audio_requests_are_a_400_naming_the_field_and_create_nothing(client, jobs, fields, fragment):
    body = {"prompt": "a fox barks", "model": "ltx2-tiny", "size": "64x64", "seconds": 1} | fields
    err = error_of(client.post("/v1/videos", content=json.dumps(body), headers={"content-type": "application/json"}),
                   400)
    assert err["param"] == next(k for k in ("audio", "scheduler", "seconds") if k in fields)
    assert fragment in err["message"], err["message"]
    assert jobs.list(limit=10) == ([], False)
