"""S3 object storage: typed settings, a thin boto3 wrapper, and the layout of one clip.

Works against AWS and S3-compatible stores (SeaweedFS, MinIO, R2, Ceph RGW). Everything
that talks to the network raises :class:`StorageError` (or a subclass) that names the
bucket, the key and the store's error code, never a bare botocore exception.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUCKET_BAD_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_BAD_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


class StorageError(RuntimeError):
    """An object-store call failed; ``code`` is the store's error code when it sent one."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ObjectNotFound(StorageError):
    """The key does not exist in the bucket."""


class StorageUnavailable(StorageError):
    """The endpoint did not answer within the retry budget."""


def validate_bucket_name(name: str) -> str:
    """Return ``name`` if it follows the S3 general-purpose bucket naming rules, else raise."""
    problem = None
    if not _BUCKET_RE.match(name):
        problem = "3-63 characters of a-z, 0-9, '.', '-', starting and ending with a letter or digit"
    elif ".." in name:
        problem = "no two adjacent periods"
    elif name.startswith(_BUCKET_BAD_PREFIXES) or name.endswith(_BUCKET_BAD_SUFFIXES):
        problem = f"no reserved prefix {_BUCKET_BAD_PREFIXES} or suffix {_BUCKET_BAD_SUFFIXES}"
    else:
        try:
            ipaddress.IPv4Address(name)
            problem = "not formatted like an IP address"
        except ValueError:
            pass
    if problem:
        raise ValueError(f"invalid S3 bucket name {name!r}: must be {problem}")
    return name


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or len(key.encode()) > 1024:
        raise ValueError(f"invalid object key {key!r}: must be 1-1024 bytes and not start with '/'")
    return key


class S3Settings(BaseModel):
    """How to reach one bucket of an S3-compatible store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. http://127.0.0.1:8333; None means AWS S3 itself."
    )
    region: str = Field("us-east-1", min_length=1, description="Region used to sign requests.")
    bucket: str = Field("videofarm", description="Bucket that holds the farm's objects.")
    access_key_id: str | None = Field(
        None, description="Access key; None uses boto3's default credential chain."
    )
    secret_access_key: SecretStr | None = Field(
        None, description="Secret key paired with access_key_id."
    )
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        "path", description="'path' works with every S3-compatible store; 'virtual' is AWS-style."
    )
    checksums: Literal["when_required", "when_supported"] = Field(
        "when_required",
        description="When boto3 computes/validates request checksums. boto3>=1.36 defaults to "
        "'when_supported', which some S3-compatible stores reject.",
    )
    max_attempts: int = Field(
        4, ge=1, le=20, description="Total attempts per call (first try included), standard retry mode."
    )
    multipart_threshold_mb: int = Field(
        16, ge=1, le=5 * 1024, description="Files at least this large (MiB) upload in parts."
    )
    multipart_chunk_mb: int = Field(
        16, ge=5, le=5 * 1024, description="Part size (MiB); S3 needs at least 5 MiB per part."
    )
    max_concurrency: int = Field(
        4, ge=1, le=64, description="Parts uploaded or downloaded in parallel per transfer."
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    read_timeout: float = Field(60.0, gt=0, description="Seconds to wait for a response.")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        return validate_bucket_name(value)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"endpoint_url {value!r} must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _key_pair(self) -> S3Settings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key must be set together or not at all")
        return self


@dataclass(frozen=True)
class ObjectInfo:
    """What ``head`` knows about one object."""

    key: str
    size: int
    etag: str
    content_type: str | None
    last_modified: datetime | None
    metadata: Mapping[str, str]

    @property
    def multipart_parts(self) -> int | None:
        """Part count encoded in a multipart ETag (``"<md5>-N"``); None for single-part objects."""
        _, sep, parts = self.etag.rpartition("-")
        return int(parts) if sep and parts.isdigit() else None


class ObjectStream:
    """An open GET: metadata is known before the first byte is read (useful for HTTP headers).

    Iterate for chunks; the body closes when exhausted or on ``close()``/context exit.
    """

    def __init__(self, key: str, response: dict[str, Any], chunk_size: int) -> None:
        self.key = key
        self.content_length: int = response["ContentLength"]
        self.content_type: str | None = response.get("ContentType")
        self.content_range: str | None = response.get("ContentRange")
        self.etag: str = response.get("ETag", "").strip('"')
        self._body = response["Body"]
        self._chunk_size = chunk_size

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body.iter_chunks(self._chunk_size)
        finally:
            self.close()

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> ObjectStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObjectStore:
    """One bucket of an S3-compatible store. Thread-safe: boto3 clients may be shared."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        secret = settings.secret_access_key
        config = BotoConfig(
            region_name=settings.region,
            s3={"addressing_style": settings.addressing_style},
            retries={"mode": "standard", "max_attempts": settings.max_attempts},
            request_checksum_calculation=settings.checksums,
            response_checksum_validation=settings.checksums,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            # A multipart transfer holds one connection per concurrent part.
            max_pool_connections=max(10, settings.max_concurrency * 2),
        )
        # A private session: boto3's module-level default session is not thread-safe.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=config,
        )
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold_mb * MiB,
            multipart_chunksize=settings.multipart_chunk_mb * MiB,
            max_concurrency=settings.max_concurrency,
            # The classic manager aborts the multipart upload when a part fails.
            preferred_transfer_client="classic",
        )

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{_check_key(key)}"

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore failures into StorageError subclasses that say what failed where."""
        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "")) or None
            if code in _NOT_FOUND_CODES:
                raise ObjectNotFound(f"{where} does not exist", code=code) from exc
            hint = " (call ensure_bucket() first)" if code == "NoSuchBucket" else ""
            message = error.get("Message") or str(exc)
            raise StorageError(f"{action} {where} failed: {code}: {message}{hint}", code=code) from exc
        except (BotoConnectionError, HTTPClientError) as exc:
            raise StorageUnavailable(
                f"{action} {where}: endpoint {self.settings.endpoint_url or 'AWS S3'} did not answer "
                f"after {self.settings.max_attempts} attempt(s): {exc}"
            ) from exc
        except S3UploadFailedError as exc:
            cause = exc.__cause__ or exc.__context__
            code = None
            if isinstance(cause, ClientError):
                code = str(cause.response.get("Error", {}).get("Code", "")) or None
            raise StorageError(f"{action} {where} failed: {exc}", code=code) from exc
        except BotoCoreError as exc:
            raise StorageError(f"{action} {where} failed: {exc}") from exc

    # -- bucket -------------------------------------------------------------------------

    def ensure_bucket(self) -> bool:
        """Create the bucket if it is missing; True when this call created it."""
        try:
            with self._errors("head"):
                self.client.head_bucket(Bucket=self.bucket)
            return False
        except ObjectNotFound:
            pass
        except StorageError as exc:
            if exc.code == "403":
                raise StorageError(
                    f"access to bucket {self.bucket!r} denied: wrong credentials, or the name "
                    "belongs to someone else",
                    code=exc.code,
                ) from exc
            raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.region != "us-east-1":
            # us-east-1 is the one region that rejects an explicit LocationConstraint.
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            with self._errors("create"):
                self.client.create_bucket(**kwargs)
        except StorageError as exc:
            if exc.code == "BucketAlreadyOwnedByYou":  # another process won the race
                return False
            raise
        logger.info("created bucket %s", self.bucket)
        return True

    # -- writes -------------------------------------------------------------------------

    def put_file(
        self, key: str, path: str | Path, content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Upload a local file (multipart above the threshold); returns its ``s3://`` URI."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"put_file({key!r}): {str(path)!r} is not a readable file")
        extra: dict[str, Any] = {
            "ContentType": content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        }
        if metadata:
            extra["Metadata"] = dict(metadata)
        with self._errors("upload", _check_key(key)):
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=self._transfer)
        return self.uri(key)

    def put_stream(self, key: str, fileobj: BinaryIO, content_type: str = "application/octet-stream") -> str:
        """Upload a readable binary file object from its current position, in parts above the
        multipart threshold (never read whole into memory); returns its ``s3://`` URI."""
        with self._errors("upload", _check_key(key)):
            self.client.upload_fileobj(fileobj, self.bucket, key, ExtraArgs={"ContentType": content_type},
                                       Config=self._transfer)
        return self.uri(key)

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Store ``data`` in one request; returns its ``s3://`` URI."""
        with self._errors("put", _check_key(key)):
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                Metadata=dict(metadata or {}),
            )
        return self.uri(key)

    def put_json(self, key: str, obj: Any) -> str:
        """Store ``obj`` as UTF-8 JSON; returns its ``s3://`` URI."""
        data = json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()
        return self.put_bytes(key, data, content_type="application/json")

    # -- reads --------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        """Metadata of ``key``, or None when it does not exist."""
        try:
            with self._errors("head", _check_key(key)):
                r = self.client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            return None
        return ObjectInfo(
            key=key, size=r["ContentLength"], etag=r.get("ETag", "").strip('"'),
            content_type=r.get("ContentType"), last_modified=r.get("LastModified"),
            metadata=r.get("Metadata", {}),
        )

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def get_bytes(self, key: str) -> bytes:
        """The whole object; raises ObjectNotFound when missing."""
        with self.stream(key) as body, self._errors("read", key):
            return b"".join(body)

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def stream(
        self, key: str, *, byte_range: tuple[int, int | None] | None = None, chunk_size: int = MiB,
    ) -> ObjectStream:
        """Open a GET (optionally of an inclusive ``(first, last)`` byte range) for streaming.

        The request is made now, so a missing key raises ObjectNotFound before any byte is sent on.
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": _check_key(key)}
        if byte_range is not None:
            first, last = byte_range
            if first < 0 or (last is not None and last < first):
                raise ValueError(f"invalid byte_range {byte_range!r}: need 0 <= first <= last")
            kwargs["Range"] = f"bytes={first}-{'' if last is None else last}"
        with self._errors("get", key):
            response = self.client.get_object(**kwargs)
        return ObjectStream(key, response, chunk_size)

    def presigned_get(self, key: str, expires_s: int = 300) -> str:
        """A URL that GETs ``key`` without credentials for ``expires_s`` seconds (SigV4 query
        signing: computed here, no request is made). A ``Range`` header may be sent with it."""
        with self._errors("presign", key):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": _check_key(key)}, ExpiresIn=expires_s)

    def download_file(self, key: str, path: str | Path) -> Path:
        """Download to ``path`` (parallel ranged GETs for large objects); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("download", _check_key(key)):
            # s3transfer writes to a temporary name and renames, so no half-written file remains.
            self.client.download_file(self.bucket, key, str(path), Config=self._transfer)
        return path

    # -- listing and deletion -----------------------------------------------------------

    def iter_keys(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[str]:
        """Keys under ``prefix`` (a plain string prefix), in the store's (lexicographic) order."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        with self._errors("list", prefix + "*"):
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"]

    def list_keys(self, prefix: str = "") -> list[str]:
        return list(self.iter_keys(prefix))

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error (S3 semantics)."""
        with self._errors("delete", _check_key(key)):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str, *, batch_size: int = 1000) -> int:
        """Delete every object whose key starts with ``prefix``; returns how many were deleted.

        ``prefix`` is a plain string prefix: ``"videos/a"`` also matches ``"videos/ab/..."``,
        so pass a trailing ``/`` to mean one folder.
        """
        if not prefix:
            raise ValueError(f"delete_prefix needs a non-empty prefix; refusing to empty bucket {self.bucket!r}")
        if not 1 <= batch_size <= 1000:
            raise ValueError(f"batch_size={batch_size} must be within 1..1000 (the S3 DeleteObjects limit)")
        deleted = 0
        previous: list[str] = []
        while True:
            # Re-list from the start each round rather than following a continuation token
            # across deletions, which some S3-compatible stores handle inconsistently.
            keys = []
            for key in self.iter_keys(prefix, page_size=batch_size):
                keys.append(key)
                if len(keys) == batch_size:
                    break
            if not keys:
                return deleted
            if keys == previous:
                raise StorageError(f"delete_prefix({prefix!r}): objects {keys[:3]} survived deletion")
            with self._errors("delete", prefix + "*"):
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"delete_prefix({prefix!r}): {len(errors)} object(s) not deleted, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')}: {first.get('Message')}",
                    code=first.get("Code"),
                )
            deleted += len(keys)
            previous = keys

    def list_open_multipart_uploads(self, prefix: str = "") -> list[dict[str, str]]:
        """Multipart uploads started but neither completed nor aborted: ``[{"key", "upload_id"}]``."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        uploads = []
        with self._errors("list uploads", prefix + "*"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Uploads", []):
                    uploads.append({"key": item["Key"], "upload_id": item["UploadId"]})
        return uploads

    def abort_open_multipart_uploads(self, prefix: str = "") -> int:
        """Abort leftovers (e.g. from a killed process); returns how many were aborted."""
        uploads = self.list_open_multipart_uploads(prefix)
        for upload in uploads:
            with self._errors("abort upload", upload["key"]):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["key"], UploadId=upload["upload_id"]
                )
        return len(uploads)


# -- the layout of one clip -------------------------------------------------------------

_VIDEO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


@dataclass(frozen=True)
class ClipLayout:
    """Where one clip's objects live: ``videos/{video_id}/<file>``.

    ``record.json`` is written last, so its presence marks a complete clip.
    """

    video_id: str
    VARIANTS: ClassVar[Mapping[str, tuple[str, str]]] = {
        "video": ("video.mp4", "video/mp4"),
        "thumbnail": ("thumbnail.webp", "image/webp"),
        "spritesheet": ("spritesheet.jpg", "image/jpeg"),
    }
    RECORD: ClassVar[str] = "record.json"
    # The request's reference image (image-to-video), by Pillow format name: stored by the gateway
    # before the job is queued, read by the encoder; deleted with the clip.
    REFERENCES: ClassVar[Mapping[str, tuple[str, str]]] = {
        "PNG": ("input_reference.png", "image/png"),
        "JPEG": ("input_reference.jpg", "image/jpeg"),
        "WEBP": ("input_reference.webp", "image/webp"),
    }

    def __post_init__(self) -> None:
        if not _VIDEO_ID_RE.match(self.video_id):
            raise ValueError(
                f"invalid video_id {self.video_id!r}: 1-128 characters of A-Z, a-z, 0-9, '_', '-'"
            )

    @property
    def prefix(self) -> str:
        return f"videos/{self.video_id}/"

    @property
    def record_key(self) -> str:
        return self.prefix + self.RECORD

    def key(self, variant: str) -> str:
        return self.prefix + self._variant(variant)[0]

    def reference(self, image_format: str) -> tuple[str, str]:
        """The key and content type of the job's reference image in ``image_format`` (PNG, JPEG, WEBP)."""
        try:
            name, content_type = self.REFERENCES[image_format]
        except KeyError:
            raise ValueError(f"unknown reference image format {image_format!r}; allowed: {sorted(self.REFERENCES)}") from None
        return self.prefix + name, content_type

    @property
    def source_key(self) -> str:
        """The uploaded source MP4 of an edit or extension: stored by the gateway before the job is
        queued, read by the encoder (and an extension's finisher); deleted with the clip."""
        return self.prefix + "source.mp4"

    def content_type(self, variant: str) -> str:
        return self._variant(variant)[1]

    def _variant(self, variant: str) -> tuple[str, str]:
        try:
            return self.VARIANTS[variant]
        except KeyError:
            raise ValueError(f"unknown clip variant {variant!r}; allowed: {sorted(self.VARIANTS)}") from None


def upload_clip(
    store: ObjectStore, video_id: str, files: Mapping[str, str | Path], record: Mapping[str, Any],
) -> dict[str, str]:
    """Upload a finished clip's media, then its JSON record; returns ``{variant: uri}``.

    ``files`` maps variants (``video`` required, ``thumbnail``/``spritesheet`` optional) to
    local paths. The record goes last, so a reader that finds ``record.json`` finds every
    media object too. The result also holds the record's URI under ``"record"``.
    """
    layout = ClipLayout(video_id)
    if "video" not in files:
        raise ValueError(f"upload_clip({video_id!r}): files needs a 'video' entry, got {sorted(files)}")
    for variant, path in files.items():
        layout.key(variant)  # rejects unknown variants before anything is uploaded
        if not Path(path).is_file():
            raise ValueError(f"upload_clip({video_id!r}): {variant} file {str(path)!r} does not exist")
    uris = {
        variant: store.put_file(layout.key(variant), path, layout.content_type(variant))
        for variant, path in files.items()
    }
    uris["record"] = store.put_json(layout.record_key, dict(record))
    return uris


def checkpoint_prefix(video_id: str) -> str:
    """Where a job's denoise checkpoints live while it renders (``…/state.pt``)."""
    return f"checkpoints/{video_id}/"


def delete_clip(store: ObjectStore, video_id: str) -> int:
    """Delete every object of one clip, and any checkpoint it left; returns how many were deleted."""
    return store.delete_prefix(ClipLayout(video_id).prefix) + store.delete_prefix(checkpoint_prefix(video_id))
