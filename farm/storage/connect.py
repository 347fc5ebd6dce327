"""From settings to a ready object store: start the embedded server when that is the mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from farm.storage.s3 import ObjectStore
from farm.storage.seaweed import EmbeddedSeaweed, SeaweedConfig

if TYPE_CHECKING:
    from farm.config import FarmSettings


def embedded_server(settings: "FarmSettings") -> EmbeddedSeaweed:
    """The embedded SeaweedFS server for this state folder (not started)."""
    return EmbeddedSeaweed(SeaweedConfig(data_dir=settings.seaweed_dir, bucket=settings.storage.bucket))


def running_embedded(settings: "FarmSettings") -> EmbeddedSeaweed | None:
    """The embedded server if one is serving this state folder, else None."""
    if EmbeddedSeaweed.find_running(settings.seaweed_dir) is None:
        return None
    return embedded_server(settings)


def store_settings(settings: "FarmSettings", *, start: bool = True):
    """S3 connection settings: the external store's, or the embedded server's (started if needed)."""
    storage = settings.storage
    if storage.mode == "external":
        return storage.s3.model_copy(update={"bucket": storage.bucket})
    server = embedded_server(settings)
    if start:
        server.start()
    return server.settings()


def open_store(settings: "FarmSettings", *, start: bool = True) -> ObjectStore:
    """A client for the configured store with its bucket present."""
    store = ObjectStore(store_settings(settings, start=start))
    store.ensure_bucket()
    return store
