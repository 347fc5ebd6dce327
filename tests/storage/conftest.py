"""Fixtures that run a real SeaweedFS server (no mocks): one per test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from farm.storage import EmbeddedSeaweed, ObjectStore, SeaweedConfig


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedSeaweed]:
    """A real `weed server -s3` on free loopback ports, data in a temp dir."""
    server = EmbeddedSeaweed(SeaweedConfig(data_dir=tmp_path_factory.mktemp("seaweed")))
    server.start(timeout=60)
    yield server
    server.stop()


@pytest.fixture
def store(seaweed: EmbeddedSeaweed) -> Iterator[ObjectStore]:
    """An ObjectStore on a fresh bucket (deleted afterwards), 5 MiB multipart threshold."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    store = ObjectStore(seaweed.settings(bucket=bucket, multipart_threshold_mb=5, multipart_chunk_mb=5))
    store.ensure_bucket()
    yield store
    store.abort_open_multipart_uploads()
    for key in store.list_keys():
        store.delete(key)
    store.client.delete_bucket(Bucket=bucket)
