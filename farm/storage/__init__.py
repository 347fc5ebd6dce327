"""Object storage: an S3 client for any S3-compatible store, and an embedded SeaweedFS."""

from farm.storage.s3 import (
    ClipLayout,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStream,
    S3Settings,
    StorageError,
    StorageUnavailable,
    delete_clip,
    upload_clip,
    validate_bucket_name,
)
from farm.storage.seaweed import (
    EmbeddedSeaweed,
    SeaweedConfig,
    SeaweedError,
    SeaweedPorts,
    SeaweedRuntime,
    weed_binary,
)

__all__ = [
    "ClipLayout",
    "EmbeddedSeaweed",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStream",
    "S3Settings",
    "SeaweedConfig",
    "SeaweedError",
    "SeaweedPorts",
    "SeaweedRuntime",
    "StorageError",
    "StorageUnavailable",
    "delete_clip",
    "upload_clip",
    "validate_bucket_name",
    "weed_binary",
]
