"""The cameo store on SQLite and PostgreSQL: consent settings, requests and answers, revocation,
uses recorded in the job's insert transaction (or nothing at all), owners' read access."""

from __future__ import annotations

import pytest

from farm.jobs.sharing import SharingStore
from farm.policy.cameos import CAMEO_USED, CameoRefused, CharacterStore, new_character_id


@pytest.fixture
def cameos(store, clock) -> CharacterStore:
    return CharacterStore(store.db, clock=clock)


def _make(cameos: CharacterStore, owner="acct_a", name="ada", consent="approved"):
    cid = new_character_id()
    return cameos.create(character_id=cid, owner=owner, name=name, consent=consent,
                         video_key=f"characters/{cid}/source", frame_keys=[f"characters/{cid}/frame_{i}.png" for i in range(3)], width=96, height=64)


def _job(store, cameos, owner, characters, prompt="p"):
    ids = [c.id for c in characters]
    return store.create(model="wan-tiny-i2v", prompt=prompt, size="128x128", seconds=1, params={"seed": 1},
                        owner=owner, on_insert=lambda conn, job: cameos.admit(conn, job, ids))


def test_consent_settings_requests_and_revocation(store, cameos):
    ada = _make(cameos)
    assert ada.reference_key.endswith("frame_1.png")
    assert cameos.may_use(ada, "acct_a") and not cameos.may_use(ada, "acct_b")
    assert cameos.request(ada.id, "acct_b").status == "pending"
    assert not cameos.may_use(ada, "acct_b")
    assert cameos.answer(ada.id, "acct_b", "acct_b", approve=True) is None  # only the owner answers
    assert cameos.answer(ada.id, "acct_a", "acct_c", approve=True) is None  # acct_c never asked
    assert cameos.answer(ada.id, "acct_a", "acct_b", approve=True).status == "approved"
    assert cameos.may_use(ada, "acct_b")
    with pytest.raises(CameoRefused) as own:
        cameos.request(ada.id, "acct_a")
    assert own.value.param == "character_id"

    character, revoked = cameos.revoke(ada.id, "acct_a")
    assert revoked == ["acct_b"] and character.consent == "only_me" and character.revoked_at is not None
    assert cameos.grant_of(ada.id, "acct_b").status == "revoked" and not cameos.may_use(character, "acct_b")
    with pytest.raises(CameoRefused) as only_me:  # an approval would change nothing while only_me
        cameos.answer(ada.id, "acct_a", "acct_b", approve=True)
    assert only_me.value.status == 409
    assert cameos.request(ada.id, "acct_b").status == "pending"  # asked again after a revocation
    everyone = cameos.update(ada.id, "acct_a", consent="everyone")
    assert cameos.may_use(everyone, "acct_z") and cameos.may_use(everyone, None)


def test_names_are_unique_handles_and_resolve_from_prompts(cameos):
    ada = _make(cameos, name="Ada_K")
    with pytest.raises(CameoRefused) as taken:
        _make(cameos, owner="acct_b", name="ada_k")
    assert taken.value.status == 409 and taken.value.code == "character_name_taken"
    bob = _make(cameos, owner="acct_b", name="bob")
    assert [c.id for c in cameos.resolve("東京で@ada_kと@BOBが歩く、@ada_k")] == [ada.id, bob.id]
    assert [c.id for c in cameos.resolve("a walk", [bob.id, bob.id])] == [bob.id]
    with pytest.raises(CameoRefused) as unknown:
        cameos.resolve("@nobody")
    assert unknown.value.code == "character_not_found" and unknown.value.param == "prompt"
    with pytest.raises(CameoRefused) as unknown_id:
        cameos.resolve("x", ["char_missing"])
    assert unknown_id.value.param == "characters"
    with pytest.raises(CameoRefused):
        cameos.update(bob.id, "acct_b", name="ADA_K")
    assert cameos.update(bob.id, "acct_b", name="bobby").name == "bobby"


def test_uses_are_recorded_with_the_job_or_not_at_all(store, cameos):
    ada = _make(cameos, consent="approved")
    sharing = SharingStore(store.db)
    with pytest.raises(CameoRefused) as refused:
        _job(store, cameos, "acct_b", [ada])
    assert refused.value.status == 403 and refused.value.code == "cameo_consent_required"
    assert store.list(limit=10)[0] == [] and cameos.uses_of(ada.id)[0] == []  # the job rolled back with it

    cameos.request(ada.id, "acct_b")
    cameos.answer(ada.id, "acct_a", "acct_b", approve=True)
    theirs = _job(store, cameos, "acct_b", [ada])
    mine = _job(store, cameos, "acct_a", [ada])
    assert [j.id for j in cameos.uses_of(ada.id)[0]] == [mine.id, theirs.id]
    assert [j.id for j in cameos.others_clips(ada)] == [theirs.id]
    events = [e for e in store.events_since(0) if e.type == CAMEO_USED]
    assert [(e.video_id, e.owner) for e in events] == [(theirs.id, "acct_a")]  # not for her own clip

    # The cameo's owner reads and may delete the other account's draft; a third account may not.
    assert sharing.readable(theirs.id, "acct_a").id == theirs.id
    assert sharing.cameo_owner_may_delete(theirs.id, "acct_a")
    assert sharing.readable(theirs.id, "acct_c") is None and not sharing.cameo_owner_may_delete(theirs.id, "acct_c")
    store.delete(theirs.id)
    assert [j.id for j in cameos.uses_of(ada.id)[0]] == [mine.id]

    cameos.revoke(ada.id, "acct_a")
    with pytest.raises(CameoRefused):
        _job(store, cameos, "acct_b", [ada])
    assert cameos.delete(ada.id, "acct_b") is None
    assert cameos.delete(ada.id, "acct_a").id == ada.id
    assert cameos.get(ada.id) is None and cameos.uses_of(ada.id)[0] == []
    with pytest.raises(CameoRefused) as deleted:  # a cameo deleted since it was resolved
        _job(store, cameos, "acct_a", [ada])
    assert deleted.value.code == "character_not_found"


def test_list_owned_pages_newest_first(cameos, clock):
    made = []
    for i in range(3):
        made.append(_make(cameos, name=f"c{i}"))
        clock.advance(1)
    _make(cameos, owner="acct_b", name="other")
    page, more = cameos.list_owned("acct_a", limit=2)
    assert [c.id for c in page] == [made[2].id, made[1].id] and more
    page, more = cameos.list_owned("acct_a", after=page[-1].id, limit=2)
    assert [c.id for c in page] == [made[0].id] and not more
