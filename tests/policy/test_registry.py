"""The protected-name registry on SQLite and PostgreSQL: entries, rights-holder scoping, the version
counter and the cache that reads it."""

from __future__ import annotations

import pytest

from farm.accounts.store import AccountStore
from farm.db import Database
from farm.policy.index import RegistryCache
from farm.policy.normalize import FoldedText
from farm.policy.registry import MAX_ALIASES, NotRightsHolder, PolicyStore, RegistryError, UnknownAccount


@pytest.fixture
def db(database_url: str):
    database = Database(database_url)
    database.migrate()
    yield database
    database.close()


@pytest.fixture
def policy(db: Database) -> PolicyStore:
    return PolicyStore(db)


def account(db: Database, name: str) -> str:
    accounts = AccountStore(db)
    _, code = accounts.create_invite(note=name)
    made, _, _ = accounts.redeem(code, name)
    return made.id


def test_entries_round_trip_and_every_write_moves_the_version(policy: PolicyStore) -> None:
    start = policy.version()
    made = policy.create(kind="character", name="ピカチュウ", holder="The Pokémon Company",
                         aliases=["Pikachu", "ぴかちゅう", "ＰＩＫＡＣＨＵ", "皮卡丘"])
    # Spellings that fold like the name or an earlier alias are not kept twice.
    assert made.aliases == ("Pikachu", "皮卡丘")
    assert policy.get(made.id) == made and policy.version() == start + 1
    figure = policy.create(kind="public_figure", name="Taylor Swift", aliases=["テイラー・スウィフト"])
    entries, more = policy.list()
    assert [e.id for e in entries] == [made.id, figure.id] and not more
    assert [e.id for e in policy.list(kind="public_figure")[0]] == [figure.id]
    page, more = policy.list(limit=1)
    assert [e.id for e in page] == [made.id] and more
    assert [e.id for e in policy.list(after=made.id)[0]] == [figure.id]
    updated = policy.update(made.id, aliases=["Pikachu", "ピカチュー"])
    assert updated.aliases == ("Pikachu", "ピカチュー") and policy.get(made.id).aliases == updated.aliases
    assert policy.version() == start + 3
    assert policy.delete(made.id) and not policy.delete(made.id) and policy.get(made.id) is None
    assert policy.version() == start + 4
    version, everything = policy.all_entries()
    assert version == start + 4 and [e.id for e in everything] == [figure.id]


@pytest.mark.parametrize(("fields", "param"), [
    ({"kind": "movie", "name": "Godzilla"}, "kind"),
    ({"kind": "work", "name": "   "}, "name"),
    ({"kind": "work", "name": "・Ａ・"}, "name"),
    ({"kind": "work", "name": "Godzilla", "aliases": ["ゴジラ", "ルイ"]}, "aliases[1]"),
    ({"kind": "work", "name": "Godzilla", "aliases": ["x" * 201]}, "aliases[0]"),
    ({"kind": "work", "name": "Godzilla", "aliases": [f"alias {i}" for i in range(MAX_ALIASES + 1)]}, "aliases"),
])
def test_bad_entries_are_refused_naming_the_field_and_change_nothing(policy: PolicyStore, fields, param) -> None:
    start = policy.version()
    with pytest.raises(RegistryError) as refused:
        policy.create(**fields)
    assert str(refused.value).startswith(f"{param}:")
    assert policy.list() == ([], False) and policy.version() == start


def test_a_rights_holder_manages_only_its_own_entries(db: Database, policy: PolicyStore) -> None:
    toho, other = account(db, "toho"), account(db, "other")
    with pytest.raises(NotRightsHolder):
        policy.create(kind="work", name="ゴジラ", account_id=toho)  # not a rights holder yet
    with pytest.raises(UnknownAccount):
        policy.grant_holder("acct_nobody", "Nobody")
    policy.grant_holder(toho, "TOHO")
    policy.grant_holder(other, "Other Studio")
    mine = policy.create(kind="work", name="ゴジラ", aliases=["Godzilla"], holder="ignored", account_id=toho)
    assert mine.holder == "TOHO" and mine.account_id == toho
    theirs = policy.create(kind="character", name="Hello Kitty", account_id=other)
    operators = policy.create(kind="work", name="名探偵コナン")
    with pytest.raises(RegistryError, match="^kind:"):
        policy.create(kind="public_figure", name="Taylor Swift", account_id=toho)
    assert [e.id for e in policy.list(account_id=toho)[0]] == [mine.id]
    for foreign in (theirs.id, operators.id):
        assert policy.get(foreign, account_id=toho) is None
        assert policy.update(foreign, aliases=["x y z"], account_id=toho) is None
        assert not policy.delete(foreign, account_id=toho)
    assert policy.get(theirs.id).aliases == () and policy.get(operators.id) is not None
    with pytest.raises(RegistryError, match="^holder:"):
        policy.update(mine.id, holder="Someone else", account_id=toho)
    assert policy.update(mine.id, aliases=["Godzilla", "哥斯拉"], account_id=toho).aliases == ("Godzilla", "哥斯拉")
    # Renaming the holder renames its entries; revoking the role leaves them in force, the operator's.
    policy.grant_holder(toho, "TOHO CO., LTD.")
    assert policy.get(mine.id).holder == "TOHO CO., LTD."
    assert [g.account_id for g in policy.list_holders()] == [toho, other]
    assert policy.revoke_holder(toho) and not policy.revoke_holder(toho)
    assert policy.holder_of(toho) is None and policy.get(mine.id).account_id is None
    assert policy.get(mine.id, account_id=toho) is None


def test_the_cache_reads_the_version_at_most_once_per_refresh(policy: PolicyStore) -> None:
    now = [0.0]
    cache = RegistryCache(policy, refresh_s=2.0, clock=lambda: now[0])
    godzilla = FoldedText.of("a Godzilla movie")
    assert cache.index().find(godzilla, ("work",)) is None and cache.loads == 1
    entry = policy.create(kind="work", name="ゴジラ", aliases=["Godzilla"])
    now[0] = 1.9
    assert cache.index().find(godzilla, ("work",)) is None  # within the bound: the old registry
    now[0] = 2.0
    assert cache.index().find(godzilla, ("work",)).entry.id == entry.id and cache.loads == 2
    for _ in range(5):  # nothing changed: version reads, no reload
        now[0] += 2.0
        cache.index()
    assert cache.loads == 2
    policy.delete(entry.id)
    cache.invalidate()  # this process made the change: no waiting
    assert cache.index().find(godzilla, ("work",)) is None and cache.loads == 3
