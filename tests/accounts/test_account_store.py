"""The account store on both backends: single-use invites under concurrency, key lifecycle."""

from __future__ import annotations

import threading

import pytest

from farm.accounts import keys
from farm.accounts.store import AccountStore, InviteRefused
from farm.db import Database


@pytest.fixture
def accounts(database_url: str) -> AccountStore:
    db = Database(database_url)
    db.migrate()
    return AccountStore(db)


def test_concurrent_redeems_of_one_invite_open_one_account(accounts: AccountStore) -> None:
    _, code = accounts.create_invite("race")
    outcomes: list[str] = []
    start = threading.Barrier(6)

    def redeem() -> None:
        start.wait()
        try:
            accounts.redeem(code, "racer")
            outcomes.append("ok")
        except InviteRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=redeem) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["refused"] * 5
    assert len(accounts.list_accounts()) == 1


def test_key_lifecycle(accounts: AccountStore) -> None:
    _, code = accounts.create_invite()
    account, first, secret = accounts.redeem(code, "ada")
    assert accounts.authenticate(secret) == accounts.authenticate(secret)
    assert accounts.authenticate(secret).account_id == account.id
    second, other = accounts.create_key(account.id, "ci")
    assert [k.name for k in accounts.list_keys(account.id)] == ["default", "ci"]
    assert accounts.revoke_key(account.id, second.id).revoked_at is not None
    assert accounts.authenticate(other) is None and accounts.authenticate(secret) is not None
    assert accounts.revoke_key("acct_someone_else", first.id) is None  # scoped to the owner
    assert accounts.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert first.hint == keys.hint(secret) and secret not in repr(accounts.list_keys(account.id))


def test_invite_ttl_is_bounded(accounts: AccountStore) -> None:
    for ttl in (0, 59, 10**9):
        with pytest.raises(ValueError, match="expires_in"):
            accounts.create_invite(ttl_s=ttl)
