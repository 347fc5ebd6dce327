"""Shares, unlisted links, clip lifetimes and the reaper, on SQLite and PostgreSQL (real S3 for the reaper)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from farm.accounts import keys
from farm.accounts.store import AccountStore
from farm.db import unix
from farm.jobs.expiry import LifetimeRule, Lifetimes, expired
from farm.jobs.job import Job
from farm.jobs.reaper import ClipReaper
from farm.jobs.sharing import LINK_PREFIX, SharingRefused, SharingStore
from farm.jobs.sharing_tables import LINKS, SHARES
from farm.jobs.store import JobStore
from farm.storage import ClipLayout, ObjectStore
from tests.clock import Clock
from tests.storage.conftest import seaweed  # noqa: F401  (the session's real SeaweedFS server)

DAY = 24 * 3600


def make(store: JobStore, owner: str, **overrides) -> Job:
    kwargs = dict(model="wan-tiny", prompt="a cat", size="128x128", seconds=2, params={"steps": 8}, owner=owner)
    return store.create(**(kwargs | overrides))


def account(accounts: AccountStore, name: str) -> str:
    _, code = accounts.create_invite(note=name)
    info, _, _ = accounts.redeem(code, name)
    return info.id


@pytest.fixture
def sharing(store: JobStore, clock: Clock) -> SharingStore:
    return SharingStore(store.db, clock=clock)


@pytest.fixture
def accounts(store: JobStore) -> AccountStore:
    return AccountStore(store.db)


def test_shares_by_id_or_name_set_visibility_and_unshare(store, sharing, accounts):
    ada, bob, cy = account(accounts, "ada"), account(accounts, "bob"), account(accounts, "cy")
    video = make(store, ada)
    assert video.visibility == "private" and sharing.readable(video.id, bob) is None
    share = sharing.share(video.id, ada, "bob")  # by name
    assert (share.account_id, share.account_name) == (bob, "bob")
    assert sharing.share(video.id, ada, bob).created_at == share.created_at  # by id: the same share, idempotent
    assert store.get(video.id).visibility == "shared"
    assert sharing.readable(video.id, bob).id == video.id and sharing.readable(video.id, cy) is None
    assert sharing.readable(video.id, ada).id == video.id
    assert [s.account_id for s in sharing.shares_of(video.id)] == [bob]
    # Only the owner manages shares: for anyone else the video does not exist.
    assert sharing.share(video.id, bob, "cy") is None and sharing.unshare(video.id, bob, "bob") is None
    assert sharing.unshare(video.id, ada, "cy") is False
    assert sharing.unshare(video.id, ada, bob) is True
    assert sharing.readable(video.id, bob) is None and store.get(video.id).visibility == "private"


@pytest.mark.parametrize(("ref", "code"), [("nobody", "account_not_found"), ("ada", "invalid_value"),
                                           ("", "invalid_value"), ("x" * 256, "invalid_value")])
def test_bad_shares_are_refused_and_change_nothing(store, sharing, accounts, ref, code):
    ada = account(accounts, "ada")
    video = make(store, ada)
    with pytest.raises(SharingRefused) as refused:
        sharing.share(video.id, ada, ref)
    assert refused.value.param == "account" and refused.value.code == code
    assert sharing.shares_of(video.id) == [] and store.get(video.id).visibility == "private"


def test_a_name_two_accounts_hold_must_be_given_as_an_id(store, sharing, accounts):
    ada, twin1, twin2 = account(accounts, "ada"), account(accounts, "twin"), account(accounts, "twin")
    video = make(store, ada)
    with pytest.raises(SharingRefused) as refused:
        sharing.share(video.id, ada, "twin")
    assert refused.value.code == "ambiguous_account"
    assert sharing.share(video.id, ada, twin2).account_id == twin2 and twin1 != twin2


def test_links_open_by_token_until_revoked_and_only_a_hash_is_stored(store, sharing, accounts):
    ada, bob = account(accounts, "ada"), account(accounts, "bob")
    video = make(store, ada)
    sharing.share(video.id, ada, bob)
    link, token = sharing.create_link(video.id, ada)
    assert token.startswith(LINK_PREFIX) and len(token) >= len(LINK_PREFIX) + 43  # 256 bits, url-safe base64
    assert link.hint == f"{LINK_PREFIX}…{token[-4:]}" and store.get(video.id).visibility == "unlisted"
    with store.db.engine.connect() as conn:
        stored = conn.execute(sa.select(LINKS.c.token_hash)).scalars().all()
    assert stored == [keys.digest(token)] and token not in str(stored)
    job, found = sharing.by_token(token)
    assert (job.id, found.id) == (video.id, link.id)
    for wrong in (token[:-1] + ("A" if token[-1] != "A" else "B"), LINK_PREFIX, "vf_sk_" + token, ""):
        assert sharing.by_token(wrong) is None
    assert sharing.create_link(video.id, bob) is None  # a shared-with account cannot publish
    assert sharing.revoke_link(video.id, bob, link.id) is None
    revoked = sharing.revoke_link(video.id, ada, link.id)
    assert revoked.revoked_at is not None and sharing.by_token(token) is None
    assert sharing.revoke_link(video.id, ada, link.id).revoked_at == revoked.revoked_at  # idempotent
    assert store.get(video.id).visibility == "shared"  # the share is still there
    assert [lk.to_api()["status"] for lk in sharing.links_of(video.id)] == ["revoked"]


def test_list_shared_with_pages_in_share_order(store, sharing, accounts, clock):
    ada, bob = account(accounts, "ada"), account(accounts, "bob")
    videos = [make(store, ada, prompt=f"p{i}") for i in range(5)]
    make(store, bob)  # bob's own video is not "shared with" bob
    for video in reversed(videos):  # shared newest-created first
        sharing.share(video.id, ada, bob)
        clock.advance(1)
    page, more = sharing.list_shared_with(bob, limit=2)
    assert [j.id for j in page] == [videos[0].id, videos[1].id] and more
    page2, more2 = sharing.list_shared_with(bob, after=page[-1].id, limit=10)
    assert [j.id for j in page2] == [v.id for v in videos[2:]] and not more2
    asc, _ = sharing.list_shared_with(bob, order="asc", limit=10)
    assert [j.id for j in asc] == [v.id for v in reversed(videos)]
    with pytest.raises(ValueError, match="after"):
        sharing.list_shared_with(ada, after=videos[0].id)  # not shared with ada (she owns it)
    assert sharing.list_shared_with(ada) == ([], False)


def test_deleting_a_video_removes_its_shares_and_links(store, sharing, accounts):
    ada, bob = account(accounts, "ada"), account(accounts, "bob")
    video, other = make(store, ada), make(store, ada)
    for v in (video, other):
        sharing.share(v.id, ada, bob)
    _, token = sharing.create_link(video.id, ada)
    assert store.delete(video.id, owner=ada) is not None
    with store.db.engine.connect() as conn:
        assert conn.execute(sa.select(SHARES.c.video_id)).scalars().all() == [other.id]
        assert conn.execute(sa.select(sa.func.count()).select_from(LINKS)).scalar() == 0
    assert sharing.by_token(token) is None and sharing.readable(video.id, bob) is None


# -- lifetimes ---------------------------------------------------------------------------------


def test_lifetime_is_account_override_then_tier_then_default(store, accounts):
    ada, bob, cy = account(accounts, "ada"), account(accounts, "bob"), account(accounts, "cy")
    lifetimes = Lifetimes(store.db, LifetimeRule(default_s=7 * DAY, tiers={"pro": 30 * DAY}))
    store.set_budget(bob, tier="pro", daily_seconds=None)
    store.set_budget(cy, tier="pro", daily_seconds=None)
    lifetimes.set_override(cy, 3600)
    assert [lifetimes.lifetime_of(a) for a in (ada, bob, cy, None)] == [7 * DAY, 30 * DAY, 3600, 7 * DAY]
    lifetimes.set_override(cy, None)
    assert lifetimes.lifetime_of(cy) == 30 * DAY
    for bad in (0, 59, -5, 10**12, 1.5, True):
        with pytest.raises(ValueError, match="lifetime_s"):
            lifetimes.set_override(ada, bad)
    assert lifetimes.settings_of(ada) == (None, None)


def test_the_operator_sets_the_shortest_lifetime(store, accounts):
    from pydantic import ValidationError

    from farm.jobs.expiry_settings import ExpirySettings

    ada = account(accounts, "ada")
    lifetimes = Lifetimes(store.db, ExpirySettings(min_lifetime_s=5, default_lifetime_s=3600).rule())
    lifetimes.set_override(ada, 5)
    assert lifetimes.lifetime_of(ada) == 5
    with pytest.raises(ValueError, match=r"allowed: 5\.\."):
        lifetimes.set_override(ada, 4)
    assert lifetimes.lifetime_of(ada) == 5  # the refused value changed nothing
    for too_short in ({"default_lifetime_s": 30}, {"tiers": {"free": 59}}):  # below the default floor of 60
        with pytest.raises(ValidationError, match="min_lifetime_s"):
            ExpirySettings(**too_short)


def test_the_lifetime_restarts_when_the_clip_completes(store, clock):
    clock.freeze()
    job = store.create(model="wan-tiny", prompt="a cat", size="128x128", seconds=2, params={}, expires_in_s=3600)
    assert job.expires_at - job.created_at == dt.timedelta(hours=1)
    clock.advance(5000)  # it waited in the queue longer than its lifetime
    claimed = store.claim_next("w", lease_s=60)
    assert store.complete(claimed.id, "w", {"video": ClipLayout(job.id).key("video")})
    done = store.get(job.id)
    assert done.expires_at == done.completed_at + dt.timedelta(hours=1)
    assert not expired(done, clock()) and expired(done, clock() + dt.timedelta(seconds=3600))


def test_content_expires_from_the_second_the_api_advertises():
    """The wire's expires_at is whole unix seconds (the fraction dropped); content is refused from
    that second on, not up to a second later at the stored microsecond (found on the farm: a client
    that waited until the advertised expires_at could still download the clip)."""
    at = dt.datetime(2026, 12, 3, 12, 0, 0, 700_000, tzinfo=dt.UTC)
    job = Job(id="video_x", model="wan-tiny", prompt="a cat", size="128x128", seconds=1, params={}, priority=0,
              created_at=at - dt.timedelta(hours=1), updated_at=at, status="completed", completed_at=at,
              expires_at=at)
    advertised = dt.datetime.fromtimestamp(unix(at), dt.UTC)
    assert not expired(job, advertised - dt.timedelta(microseconds=1))
    assert expired(job, advertised) and expired(job, at - dt.timedelta(seconds=0.4)) and expired(job, at)


# -- the reaper ------------------------------------------------------------------------------


@pytest.fixture
def objects(seaweed) -> Iterator[ObjectStore]:  # noqa: F811
    s3 = ObjectStore(seaweed.settings(bucket=f"reap-{uuid.uuid4().hex[:12]}"))
    s3.ensure_bucket()
    yield s3
    for key in s3.list_keys():
        s3.delete(key)
    s3.client.delete_bucket(Bucket=s3.bucket)


def completed(store: JobStore, objects: ObjectStore, owner: str, lifetime_s: float) -> Job:
    job = store.create(model="wan-tiny", prompt="a cat", size="128x128", seconds=2, params={}, owner=owner,
                       expires_in_s=lifetime_s)
    layout = ClipLayout(job.id)
    for variant in ("video", "thumbnail", "spritesheet"):
        objects.put_bytes(layout.key(variant), f"{variant} of {job.id}".encode())
    objects.put_bytes(layout.record_key, b"{}")
    objects.put_bytes(f"checkpoints/{job.id}/state.pt", b"state")  # one a failed cleanup left behind
    assert store.claim_next("w", lease_s=60).id == job.id
    assert store.complete(job.id, "w", {v: layout.key(v) for v in ("video", "thumbnail", "spritesheet")})
    return store.get(job.id)


def keys_of(objects: ObjectStore, video_id: str) -> list[str]:
    return [k for k in objects.list_keys() if video_id in k]


def test_reaper_removes_expired_clips_from_s3_keeps_records_and_is_idempotent(store, objects, clock):
    lifetimes = Lifetimes(store.db, clock=clock)
    old, young = completed(store, objects, "ada", 60), completed(store, objects, "ada", 3 * DAY)
    reaper = ClipReaper(lifetimes, objects, batch=10)
    assert reaper.turn().reaped == 0 and len(keys_of(objects, old.id)) == 5  # nothing is due yet
    clock.advance(120)
    first = reaper.turn()
    assert (first.reaped, first.objects, first.failed) == (1, 5, 0)
    assert keys_of(objects, old.id) == [] and len(keys_of(objects, young.id)) == 5
    record = store.get(old.id)
    assert record.status == "completed" and record.expired_at is not None and record.objects == {}
    assert expired(record, clock()) and not expired(store.get(young.id), clock())
    again = reaper.turn()
    assert (again.reaped, again.objects) == (0, 0) and store.get(old.id).expired_at == record.expired_at


def test_reaper_works_in_batches_and_survives_s3_errors(store, objects, seaweed, clock):  # noqa: F811
    lifetimes = Lifetimes(store.db, clock=clock)
    jobs = [completed(store, objects, "ada", 60) for _ in range(3)]
    clock.advance(120)
    # A real S3 error: the bucket does not exist. Nothing is marked; the next turn retries.
    missing = ObjectStore(seaweed.settings(bucket=f"gone-{uuid.uuid4().hex[:12]}"))
    broken = ClipReaper(lifetimes, missing, batch=10).turn()
    assert (broken.reaped, broken.failed) == (0, 3)
    assert all(store.get(j.id).expired_at is None for j in jobs) and len(lifetimes.due()) == 3
    reaper = ClipReaper(lifetimes, objects, batch=2)
    assert reaper.turn().reaped == 2 and reaper.turn().reaped == 1 and reaper.turn().reaped == 0
    assert all(keys_of(objects, j.id) == [] for j in jobs)


def test_reaper_stops_when_leadership_is_lost(store, objects, clock):
    lifetimes = Lifetimes(store.db, clock=clock)
    job = completed(store, objects, "ada", 60)
    clock.advance(120)
    assert ClipReaper(lifetimes, objects, leading=lambda: False).turn().reaped == 0
    assert len(keys_of(objects, job.id)) == 5


def test_tick_reaps_in_a_worker_thread_at_most_once_per_poll(store, objects, clock):
    import asyncio

    lifetimes = Lifetimes(store.db, clock=clock)
    first = completed(store, objects, "ada", 60)
    clock.advance(120)
    reaper = ClipReaper(lifetimes, lambda: objects, poll_s=3600)  # a factory: built in the turn's thread

    async def leader_loop() -> None:
        reaper.tick()
        await reaper.stop()
        completed(store, objects, "ada", 1)  # due too, but the next turn is an hour away
        clock.advance(5)
        reaper.tick()
        await reaper.stop()

    asyncio.run(leader_loop())
    assert store.get(first.id).expired_at is not None and len(lifetimes.due()) == 1


def test_expiry_settings_describe_every_field_and_name_only_budget_tiers(tmp_path):
    from pydantic import ValidationError

    from farm.config import FarmSettings, ServeSettings
    from farm.jobs.expiry_settings import ExpirySettings
    from farm.render.registry import ModelSpec

    assert all(field.description for field in ExpirySettings.model_fields.values())
    for name in ("link_rate_limit", "content_redirect", "content_redirect_s"):
        assert ServeSettings.model_fields[name].description, name
    models = [ModelSpec(id="wan-tiny", path="/m", sizes=["128x128"], seconds=[2], default_steps=4, max_steps=50)]
    settings = FarmSettings(state_dir=tmp_path, models=models, budgets={"tiers": {"pro": 3600}},
                            expiry={"default_lifetime_s": 86400, "tiers": {"pro": 30 * DAY}})
    assert settings.expiry.rule().lifetime_s("pro", None) == 30 * DAY
    assert settings.expiry.rule().lifetime_s("trial", None) == 86400
    with pytest.raises(ValidationError, match=r"expiry.tiers: \['gold'\]"):
        FarmSettings(state_dir=tmp_path, models=models, expiry={"tiers": {"gold": 3600}})
    for bad in ({"default_lifetime_s": 10}, {"reaper_batch": 0}, {"reaper_poll_s": 0}, {"ttl": 5}):
        with pytest.raises(ValidationError):
            ExpirySettings(**bad)
