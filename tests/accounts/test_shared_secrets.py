"""One admin key and one dev signing CA for every node of a farm, from its database (SQLite and
PostgreSQL): two state folders stand for two nodes."""

from __future__ import annotations

import threading

import pytest

from farm.accounts.admin import read_admin_key, resolve_admin_key
from farm.db import Database
from farm.secrets import SharedSecrets


@pytest.fixture
def shared(database_url: str):
    db = Database(database_url)
    db.migrate()
    yield SharedSecrets(db)
    db.close()


def test_every_node_gets_the_first_nodes_admin_key(shared, tmp_path, monkeypatch):
    monkeypatch.delenv("FARM_ADMIN_KEY", raising=False)
    nodes = [tmp_path / f"node-{i}" for i in range(4)]
    keys: list[str] = []
    threads = [threading.Thread(target=lambda n=n: keys.append(resolve_admin_key(n, None, shared))) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and keys[0].startswith("vf_admin_")
    assert {read_admin_key(n) for n in nodes} == {keys[0]}  # each node's copy, for its CLI
    assert oct((nodes[0] / "admin_key").stat().st_mode & 0o777) == "0o600"


def test_a_node_key_from_before_sharing_becomes_the_farms(shared, tmp_path, monkeypatch):
    monkeypatch.delenv("FARM_ADMIN_KEY", raising=False)
    old = tmp_path / "old-node"
    old.mkdir()
    (old / "admin_key").write_text("vf_admin_" + "o" * 40)
    assert resolve_admin_key(old, None, shared) == "vf_admin_" + "o" * 40
    assert resolve_admin_key(tmp_path / "new-node", None, shared) == "vf_admin_" + "o" * 40
    # A configured key still wins over the generated one.
    assert resolve_admin_key(tmp_path / "new-node", "vf_admin_" + "c" * 40, shared) == "vf_admin_" + "c" * 40


def test_replace_is_compare_and_set(shared):
    assert shared.get_or_create("thing", lambda: b"first") == b"first"
    assert shared.get_or_create("thing", lambda: b"second") == b"first"
    assert shared.replace("thing", b"first", b"renewed") == b"renewed"
    assert shared.replace("thing", b"first", b"stale writer") == b"renewed"  # lost the race: the winner stands


def test_clips_signed_on_any_node_verify_against_one_dev_ca(shared, tmp_path):
    from farm.finish.provenance import ensure_dev_credentials

    a = ensure_dev_credentials(tmp_path / "node-a" / "c2pa", shared)
    b = ensure_dev_credentials(tmp_path / "node-b" / "c2pa", shared)
    assert a.ca_cert.read_bytes() == b.ca_cert.read_bytes() and a.key.read_bytes() == b.key.read_bytes()
    assert oct(b.key.stat().st_mode & 0o777) == "0o600"
    # Without the shared store a node would have made its own CA.
    alone = ensure_dev_credentials(tmp_path / "node-c" / "c2pa")
    assert alone.ca_cert.read_bytes() != a.ca_cert.read_bytes()
    # A node that already had its own set before sharing takes the farm's.
    again = ensure_dev_credentials(tmp_path / "node-c" / "c2pa", shared)
    assert again.ca_cert.read_bytes() == a.ca_cert.read_bytes()
