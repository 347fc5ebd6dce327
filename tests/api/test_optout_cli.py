"""`farm optout …` against a real gateway (uvicorn): the operator registers, lists and removes names and
grants the rights-holder role; a rights holder manages its own entries with its key."""

from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from farm.cli_accounts import AccountCliError
from farm.cli_policy import add_commands, run
from farm.policy.index import RegistryCache
from farm.policy.moderation import default_chain
from farm.policy.registry import PolicyStore
from tests.api.conftest import ADMIN_KEY, LiveServer, new_tenant


def farm(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="farm")
    add_commands(parser.add_subparsers(dest="command", required=True), func=None)
    return parser.parse_args(argv)


def test_optout_commands(make_auth_app, jobs, db_url, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FARM_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.delenv("VIDEOFARM_API_KEY", raising=False)
    registry = RegistryCache(PolicyStore(db_url), refresh_s=0)
    app = make_auth_app(moderator=default_chain(registry), policy_registry=registry)
    with LiveServer(app) as url, TestClient(app) as client:
        def cli(*argv: str) -> str:
            assert run(farm(list(argv)), url, tmp_path) == 0
            return capsys.readouterr().out

        out = cli("optout", "add", "--kind", "character", "--name", "ピカチュウ", "--alias", "Pikachu",
                  "--holder", "The Pokémon Company")
        pikachu = out.split()[1]
        assert out.startswith("added:   pn_") and "aliases: Pikachu" in out
        cli("optout", "add", "--kind", "public_figure", "--name", "Taylor Swift")
        assert len(cli("optout", "list").splitlines()) == 2
        assert cli("optout", "list", "--kind", "public_figure").count("Taylor Swift") == 1
        tenant = new_tenant(client, "toho")
        key = tenant["Authorization"].removeprefix("Bearer ")
        account = client.get("/v1/account", headers=tenant).json()["id"]
        with pytest.raises(AccountCliError, match="not a rights holder"):
            cli("optout", "list", "--api-key", key)
        assert "rights holder 'TOHO'" in cli("optout", "grant", account, "--holder", "TOHO")
        godzilla = cli("optout", "add", "--kind", "work", "--name", "ゴジラ", "--alias", "Godzilla",
                       "--api-key", key).split()[1]
        assert cli("optout", "list", "--api-key", key).split()[0] == godzilla  # its own entries only
        with pytest.raises(AccountCliError, match="not found"):
            cli("optout", "remove", pikachu, "--api-key", key)
        with pytest.raises(AccountCliError, match="aliases\\[0\\]"):
            cli("optout", "add", "--kind", "work", "--name", "Mothra", "--alias", "!")
        refused = client.post("/v1/videos", json={"prompt": "godzilla vs pikachu"}, headers=tenant)
        assert refused.json()["error"]["code"] == "content_policy_violation"
        assert cli("optout", "remove", pikachu) == f"removed: {pikachu}\n"
        assert "revoked" in cli("optout", "revoke", account)
        assert len(cli("optout", "list").splitlines()) == 2  # ゴジラ stays, now the operator's
