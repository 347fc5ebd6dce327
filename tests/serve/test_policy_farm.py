"""The content policy on the real farm (two gateway replicas, the unmodified ``openai`` SDK): an
opt-out name registered through one gateway is refused in five spellings by every gateway within
``policy.refresh_s``, creating nothing; a public figure is refused; the refusals are counted on the
metrics endpoint as ``ray_videofarm_policy_refusals_total{rule,kind,path}``."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest

from tests.serve.farmkit import wait_for

pytestmark = pytest.mark.slow
SPELLINGS = ["ピカチュウが雪の森を走る", "ぴかちゅう が走る", "ﾋﾟｶﾁｭｳ", "a P.I.K.A.C.H.U plush toy", "「ピカ・チュウ」"]


def _refusals(url: str) -> dict[tuple[str, str], float]:
    found: dict[tuple[str, str], float] = {}
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("ray_videofarm_policy_refusals_total{") and 'path="create"' in line:
                labels = dict(p.split("=", 1) for p in line[line.index("{") + 1:line.index("}")].split(","))
                key = (labels["rule"].strip('"'), labels["kind"].strip('"'))
                found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def test_opt_out_and_public_figures_on_the_farm(shared_farm):
    farm = shared_farm
    pikachu = farm.admin("POST", "/v1/admin/protected_names", {
        "kind": "character", "name": "ピカチュウ", "holder": "The Pokémon Company", "aliases": ["Pikachu"]})
    figure = farm.admin("POST", "/v1/admin/protected_names", {"kind": "public_figure", "name": "Taylor Swift"})
    client = farm.client()
    time.sleep(farm.settings().policy.refresh_s + 0.5)  # the other gateway replica's bound
    try:
        for prompt in SPELLINGS * 2:  # twice: the requests reach both gateway replicas
            with pytest.raises(openai.BadRequestError) as refused:
                client.videos.create(model="wan-tiny", prompt=prompt, seconds="1", size="128x128")
            error = refused.value.body
            assert (error["code"], error["param"], error["type"]) == ("content_policy_violation", "prompt",
                                                                      "invalid_request_error"), error
        with pytest.raises(openai.BadRequestError) as refused:
            client.videos.create(model="wan-tiny", prompt="taylor swift on stage", seconds="1", size="128x128")
        assert "public figures" in refused.value.body["message"]
        assert client.videos.list().data == []  # nothing was created
    finally:
        farm.admin("DELETE", f"/v1/admin/protected_names/{pikachu['id']}")
        farm.admin("DELETE", f"/v1/admin/protected_names/{figure['id']}")
    # Ray's metrics agent exports every few seconds; both replicas' counts add up.
    counted = wait_for(lambda: (lambda c: c if c.get(("opt_out", "character"), 0) >= 2 * len(SPELLINGS)
                                and c.get(("public_figure", "public_figure"), 0) >= 1 else None)(
        _refusals(farm.metrics_url)), 90, interval=1.0, what="the refusal metric")
    assert counted[("opt_out", "character")] == 2 * len(SPELLINGS)
