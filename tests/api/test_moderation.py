"""The moderation hook through the gateway: opt-out names and public figures refused at create, remix
and in batch lines with ``content_policy_violation``, creating nothing; the registry's routes and
who may call them; an operator's own moderator; the refusal metric."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from farm.api.batch_lines import BatchLineRules
from farm.api.uploads import UploadLimits
from farm.config import FarmSettings
from farm.jobs.batch_runner import BatchRunner
from farm.jobs.schedules import ScheduleStore
from farm.jobs.store import JobStore
from farm.policy.index import RegistryCache
from farm.policy.moderation import (
    Decision, ModerationChain, ModerationRequest, build_moderator, default_chain, load_moderator,
)
from farm.policy.registry import PolicyStore
from farm.policy.settings import PolicySettings
from farm.storage import ObjectStore
from tests.api.conftest import ADMIN_KEY, mark_completed, new_tenant
from tests.jobs.test_batch_runner import play_dispatcher, read_jsonl, request

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"model": "wan-tiny", "size": "128x128", "seconds": "1", "steps": 4}


class RecordingMetrics:
    def __init__(self) -> None:
        self.refused: list[tuple[str, str, str]] = []
        self.created = 0

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        pass

    def video_created(self, model: str, priority: str) -> None:
        self.created += 1

    def video_refused(self, rule: str, kind: str, path: str) -> None:
        self.refused.append((rule, kind, path))


class NoDogs:
    """An operator's classifier, loaded by import path in one test."""

    def check(self, request: ModerationRequest) -> Decision:
        if "dog" in request.prompt.lower():
            return Decision.refuse("no_dogs", "animal", "prompt: this farm renders no dogs; nothing was created")
        return Decision.allow()


class Broken:
    def check(self, request: ModerationRequest) -> Decision:
        raise RuntimeError("the classifier is down")


@pytest.fixture
def registry(jobs: JobStore, db_url: str) -> RegistryCache:
    return RegistryCache(PolicyStore(db_url), refresh_s=60.0)  # only this gateway's changes, at once


@pytest.fixture
def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest.fixture
def client(make_auth_app, registry: RegistryCache, metrics: RecordingMetrics) -> Iterator[TestClient]:
    app = make_auth_app(moderator=default_chain(registry), policy_registry=registry, metrics=metrics)
    with TestClient(app) as c:
        yield c


def register(client: TestClient, **entry) -> dict:
    made = client.post("/v1/admin/protected_names", json=entry, headers=ADMIN)
    assert made.status_code == 200, made.text
    return made.json()


def assert_refused(response, *, names: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "prompt",
                                                              "content_policy_violation")
    if names:
        assert names in error["message"]
    return error


def test_an_opt_out_name_is_refused_in_five_spellings_and_nothing_is_created(client, jobs, metrics) -> None:
    register(client, kind="character", name="ピカチュウ", holder="The Pokémon Company", aliases=["Pikachu"])
    alice = new_tenant(client, "alice")
    spellings = ["ピカチュウが森を走る", "ぴかちゅう が森を走る", "ﾋﾟｶﾁｭｳが走る", "a P I K A C H U plush toy",
                 "「ピカ・チュウ」のダンス", "ＰＩＫＡＣＨＵ at night"]
    for i, prompt in enumerate(spellings):
        reply = client.post("/v1/videos", json=BODY | {"prompt": prompt}, headers=alice | {"Idempotency-Key": f"k{i}"})
        error = assert_refused(reply, names="ピカチュウ")
        assert "rights-holder opt-out" in error["message"] and "The Pokémon Company" in error["message"]
    assert sum(jobs.counts_by_status().values()) == 0
    assert client.get("/v1/videos", headers=alice).json()["data"] == []
    assert metrics.refused == [("opt_out", "character", "create")] * len(spellings) and metrics.created == 0
    # No idempotency record either: the refused request's key is free for another body.
    ok = client.post("/v1/videos", json=BODY | {"prompt": "a red fox in the snow"},
                     headers=alice | {"Idempotency-Key": "k0"})
    assert ok.status_code == 200, ok.text
    assert sum(jobs.counts_by_status().values()) == 1


def test_a_public_figure_is_refused_without_naming_the_person(client, jobs, metrics) -> None:
    register(client, kind="public_figure", name="Taylor Swift", aliases=["テイラー・スウィフト"])
    alice = new_tenant(client, "alice")
    for prompt in ("taylor  swift singing on a stage", "テイラースウィフトが歌う"):
        error = assert_refused(client.post("/v1/videos", json=BODY | {"prompt": prompt}, headers=alice))
        assert "public figures" in error["message"] and "swift" not in error["message"].lower()
    assert sum(jobs.counts_by_status().values()) == 0
    assert metrics.refused == [("public_figure", "public_figure", "create")] * 2
    swift = client.post("/v1/videos", json=BODY | {"prompt": "a swift flies over a lake"}, headers=alice)
    assert swift.status_code == 200


def test_a_remix_prompt_is_moderated_too(client, jobs, metrics) -> None:
    alice = new_tenant(client, "alice")
    source = client.post("/v1/videos", json=BODY | {"prompt": "a lizard on a rock"}, headers=alice).json()
    mark_completed(jobs, source["id"])  # only a completed video is remixed
    register(client, kind="work", name="ゴジラ", holder="TOHO", aliases=["Godzilla"])
    assert_refused(client.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "make it GODZILLA"},
                               headers=alice), names="ゴジラ")
    assert sum(jobs.counts_by_status().values()) == 1
    assert metrics.refused == [("opt_out", "work", "remix")]
    # Deleting the entry lifts the refusal on this gateway at once.
    entry = client.get("/v1/admin/protected_names", headers=ADMIN).json()["data"][0]
    assert client.delete(f"/v1/admin/protected_names/{entry['id']}", headers=ADMIN).json()["deleted"] is True
    assert client.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "make it GODZILLA"},
                       headers=alice).status_code == 200


def test_registry_routes_are_the_operators_and_refuse_bad_input(client, registry) -> None:
    alice = new_tenant(client, "alice")
    entry = {"kind": "work", "name": "ゴジラ", "aliases": ["Godzilla"]}
    for headers in ({}, alice, {"Authorization": "Bearer vf_admin_wrong"}):
        assert client.post("/v1/admin/protected_names", json=entry, headers=headers).status_code == 401
        assert client.get("/v1/admin/protected_names", headers=headers).status_code == 401
    made = register(client, **entry)
    assert client.get(f"/v1/admin/protected_names/{made['id']}", headers=ADMIN).json() == made
    updated = client.post(f"/v1/admin/protected_names/{made['id']}", headers=ADMIN,
                          json={"aliases": ["Godzilla", "ごじら", "哥斯拉"]}).json()
    assert updated["aliases"] == ["Godzilla", "哥斯拉"]  # ごじら folds like the name
    version = registry.store.version()
    for body, param in [({"kind": "movie", "name": "x y"}, "kind"), ({"kind": "work", "name": "ok name",
                                                                      "aliases": ["fine", "ルイ"]}, "aliases[1]"),
                        ({"kind": "work", "name": "ok", "color": "red"}, "color")]:
        reply = client.post("/v1/admin/protected_names", json=body, headers=ADMIN)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert client.post(f"/v1/admin/protected_names/{made['id']}", headers=ADMIN,
                       json={"aliases": ["!"]}).json()["error"]["param"] == "aliases[0]"
    assert registry.store.version() == version and len(client.get("/v1/admin/protected_names", headers=ADMIN)
                                                        .json()["data"]) == 1
    assert client.get("/v1/admin/protected_names/pn_nope", headers=ADMIN).status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/admin/protected_names/{protected_name_id}", "/v1/protected_names",
            "/v1/admin/rights_holders"} <= set(paths)
    assert client.delete(f"/v1/admin/protected_names/{made['id']}", headers=ADMIN).status_code == 200
    assert client.delete(f"/v1/admin/protected_names/{made['id']}", headers=ADMIN).status_code == 404


def test_a_rights_holder_manages_only_its_own_entries(client, jobs) -> None:
    toho, sanrio, plain = new_tenant(client, "toho"), new_tenant(client, "sanrio"), new_tenant(client, "plain")
    ids = {name: client.get("/v1/account", headers=h).json()["id"] for name, h in
           (("toho", toho), ("sanrio", sanrio))}
    # Not a rights holder: 403 on its routes, whatever the body.
    refused = client.post("/v1/protected_names", json={"kind": "work", "name": "ゴジラ"}, headers=plain)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert client.get("/v1/protected_names", headers=plain).status_code == 403
    assert client.get("/v1/protected_names").status_code == 401
    for name, holder in (("toho", "TOHO"), ("sanrio", "Sanrio")):
        granted = client.post("/v1/admin/rights_holders", json={"account_id": ids[name], "holder": holder},
                              headers=ADMIN)
        assert granted.status_code == 200 and granted.json()["holder"] == holder
    assert client.post("/v1/admin/rights_holders", json={"account_id": "acct_nope", "holder": "x"},
                       headers=ADMIN).status_code == 404
    godzilla = client.post("/v1/protected_names", json={"kind": "work", "name": "ゴジラ", "aliases": ["Godzilla"]},
                           headers=toho).json()
    assert (godzilla["holder"], godzilla["account_id"]) == ("TOHO", ids["toho"])
    kitty = client.post("/v1/protected_names", json={"kind": "character", "name": "ハローキティ"}, headers=sanrio).json()
    # A rights holder cannot register public figures, nor pick its holder name.
    assert client.post("/v1/protected_names", json={"kind": "public_figure", "name": "Taylor Swift"},
                       headers=toho).json()["error"]["param"] == "kind"
    assert client.post("/v1/protected_names", json={"kind": "work", "name": "x y", "holder": "Me"},
                       headers=toho).json()["error"]["param"] == "holder"
    assert [e["id"] for e in client.get("/v1/protected_names", headers=toho).json()["data"]] == [godzilla["id"]]
    for method, extra in (("GET", {}), ("POST", {"json": {"aliases": ["Kitty-chan"]}}), ("DELETE", {})):
        assert client.request(method, f"/v1/protected_names/{kitty['id']}", headers=toho, **extra).status_code == 404
    assert client.get(f"/v1/protected_names/{kitty['id']}", headers=sanrio).json()["aliases"] == []
    # What a rights holder registers is enforced at once; the operator sees every entry.
    assert_refused(client.post("/v1/videos", json=BODY | {"prompt": "ﾊﾛｰ･ｷﾃｨのケーキ"}, headers=plain))
    assert_refused(client.post("/v1/videos", json=BODY | {"prompt": "ゴ・ジ・ラの逆襲"}, headers=plain))
    assert {e["id"] for e in client.get("/v1/admin/protected_names", headers=ADMIN).json()["data"]} == {
        godzilla["id"], kitty["id"]}
    assert client.delete(f"/v1/protected_names/{godzilla['id']}", headers=toho).json()["deleted"] is True
    assert client.post("/v1/videos", json=BODY | {"prompt": "Godzilla"}, headers=plain).status_code == 200
    # Without the role, the entries stay (the operator's now) and the account can no longer manage them.
    assert client.delete(f"/v1/admin/rights_holders/{ids['sanrio']}", headers=ADMIN).status_code == 200
    assert client.get("/v1/protected_names", headers=sanrio).status_code == 403
    assert client.get(f"/v1/admin/protected_names/{kitty['id']}", headers=ADMIN).json()["account_id"] is None
    assert_refused(client.post("/v1/videos", json=BODY | {"prompt": "はろーきてぃ"}, headers=plain))


def test_an_operator_moderator_plugs_in_by_import_path(make_auth_app, registry, jobs) -> None:
    settings = PolicySettings(moderators=["tests.api.test_moderation:NoDogs"])
    metrics = RecordingMetrics()
    with TestClient(make_auth_app(moderator=build_moderator(settings, registry), metrics=metrics)) as client:
        alice = new_tenant(client, "alice")
        reply = client.post("/v1/videos", json=BODY | {"prompt": "a Dog on a skateboard"}, headers=alice)
        assert_refused(reply)
        assert reply.json()["error"]["message"].startswith("prompt: this farm renders no dogs")
        assert client.post("/v1/videos", json=BODY | {"prompt": "a cat"}, headers=alice).status_code == 200
    assert metrics.refused == [("no_dogs", "animal", "create")]
    with pytest.raises(ValueError, match="import path"):
        PolicySettings(moderators=["tests.api.test_moderation.NoDogs"])
    with pytest.raises(ValueError, match="cannot import"):
        load_moderator("tests.api.test_moderation:Nothing")
    with pytest.raises(ValueError, match="no check"):
        load_moderator("tests.api.test_moderation:RecordingMetrics")
    assert "policy" in FarmSettings.model_fields and FarmSettings.model_fields["policy"].description


def test_a_failing_moderator_is_a_503_not_a_refusal_and_creates_nothing(make_auth_app, registry, jobs) -> None:
    with TestClient(make_auth_app(moderator=ModerationChain([Broken()]))) as client:
        reply = client.post("/v1/videos", json=BODY | {"prompt": "a cat"}, headers=new_tenant(client, "alice"))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "service_unavailable"
    assert sum(jobs.counts_by_status().values()) == 0


def test_a_batch_line_refused_lands_in_the_error_file(make_auth_app, registry, jobs, objects: ObjectStore,
                                                      db_url, models) -> None:
    schedules = ScheduleStore(db_url)
    refusals: list[tuple[str, str]] = []
    rules = BatchLineRules(models, upload_limits=UploadLimits(), moderator=default_chain(registry),
                           on_refused=lambda rule, kind: refusals.append((rule, kind)))
    runner = BatchRunner(schedules.batches, schedules, jobs, objects, rules, max_queued_per_batch=4)
    app = make_auth_app(objects=objects, batches=schedules.batches, schedules=schedules, policy_registry=registry,
                        moderator=default_chain(registry), batch_settings=FarmSettings.model_fields["batches"]
                        .default_factory())
    lines = [request("ok-1"), request("mouse", prompt="ミッキー・マウスが踊る"), request("ok-2"),
             request("figure", prompt="Taylor Swift waves")]
    with TestClient(app) as client:
        register(client, kind="character", name="ミッキーマウス", holder="Disney", aliases=["Mickey Mouse"])
        register(client, kind="public_figure", name="Taylor Swift")
        alice = new_tenant(client, "alice")
        data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        uploaded = client.post("/v1/files", headers=alice, data={"purpose": "batch"},
                               files={"file": ("prompts.jsonl", data, "application/jsonl")}).json()
        batch = client.post("/v1/batches", headers=alice, json={"input_file_id": uploaded["id"],
                                                                 "endpoint": "/v1/videos",
                                                                 "completion_window": "24h"}).json()
        for _ in range(10):
            runner.turn()
            play_dispatcher(jobs)
            batch = client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
            if batch["status"] == "completed":
                break
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    errors = {e["custom_id"]: e["response"] for e in read_jsonl(objects, schedules, batch["error_file_id"])}
    assert set(errors) == {"mouse", "figure"}
    for response in errors.values():
        assert response["status_code"] == 400
        error = response["body"]["error"]
        assert (error["code"], error["param"], error["type"]) == ("content_policy_violation", "body.prompt",
                                                                  "invalid_request_error")
    assert "ミッキーマウス" in errors["mouse"]["body"]["error"]["message"]
    assert refusals == [("opt_out", "character"), ("public_figure", "public_figure")]
    assert sum(jobs.counts_by_status().values()) == 2  # the two allowed lines only


def test_a_create_reads_no_registry_rows_within_the_refresh_bound(make_auth_app, jobs, db_url) -> None:
    store = PolicyStore(db_url)
    reads = {"version": 0}
    version = store.version

    def counted() -> int:
        reads["version"] += 1
        return version()

    store.version = counted  # type: ignore[method-assign]
    registry = RegistryCache(store, refresh_s=60.0)
    with TestClient(make_auth_app(moderator=default_chain(registry), policy_registry=registry)) as client:
        alice = new_tenant(client, "alice")
        for i in range(10):
            made = client.post("/v1/videos", json=BODY | {"prompt": f"a fox, take {i}"}, headers=alice)
            assert made.status_code == 200
        assert (reads["version"], registry.loads) == (1, 1)  # the first create loaded it; the rest read nothing
        register(client, kind="work", name="ゴジラ")  # through this gateway: enforced on its next create
        assert_refused(client.post("/v1/videos", json=BODY | {"prompt": "ゴジラ"}, headers=alice))
        assert (reads["version"], registry.loads) == (2, 2)


def test_schemathesis_on_the_registry_routes_finds_no_server_error(make_auth_app, registry, accounts) -> None:
    from tests.api.test_fuzz import assert_clean, fuzz

    app = make_auth_app(moderator=default_chain(registry), policy_registry=registry)
    tally = fuzz(app, ADMIN, max_examples=15, path_regex=r"^/v1/admin/(protected_names|rights_holders)")
    assert_clean(tally)
    assert ("POST /v1/admin/protected_names", 200) in {(label, status) for (_, label, status) in tally.statuses}
    _, code = accounts.create_invite(note="holder")
    holder, _, key = accounts.redeem(code, "holder")
    registry.store.grant_holder(holder.id, "Holder Inc.")
    tally = fuzz(app, {"Authorization": f"Bearer {key}"}, max_examples=15, path_regex=r"^/v1/protected_names")
    assert_clean(tally)
    assert ("POST /v1/protected_names", 200) in {(label, status) for (_, label, status) in tally.statuses}


def test_the_sdk_hears_the_refusal_from_a_second_gateway_within_the_bound(make_auth_app, accounts, db_url) -> None:
    """Two gateways on one database (two replicas): a name registered through one is enforced by the
    other within its ``refresh_s``, as the unmodified ``openai`` SDK sees it."""
    import time

    import openai

    from tests.api.conftest import LiveServer

    first = RegistryCache(PolicyStore(db_url), refresh_s=0.5)
    second = RegistryCache(PolicyStore(db_url), refresh_s=0.5)
    _, code = accounts.create_invite(note="sdk")
    _, _, key = accounts.redeem(code, "sdk")
    with TestClient(make_auth_app(moderator=default_chain(first), policy_registry=first)) as one, \
            LiveServer(make_auth_app(moderator=default_chain(second), policy_registry=second)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        assert client.videos.create(model="wan-tiny", prompt="Pikachu", seconds="1", size="128x128").id
        register(one, kind="character", name="ピカチュウ", aliases=["Pikachu"])
        time.sleep(0.6)
        with pytest.raises(openai.BadRequestError) as refused:
            client.videos.create(model="wan-tiny", prompt="ﾋﾟｶﾁｭｳ", seconds="1", size="128x128")
    assert refused.value.status_code == 400
    assert (refused.value.code, refused.value.param, refused.value.type) == (
        "content_policy_violation", "prompt", "invalid_request_error")
    assert refused.value.body["code"] == "content_policy_violation" and "ピカチュウ" in refused.value.body["message"]
