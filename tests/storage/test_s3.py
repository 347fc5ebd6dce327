"""ObjectStore against a real SeaweedFS server: no mocks, no moto."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError, ConnectionClosedError
from pydantic import ValidationError

from farm.storage import (
    ClipLayout,
    EmbeddedSeaweed,
    ObjectNotFound,
    ObjectStore,
    S3Settings,
    StorageError,
    StorageUnavailable,
    delete_clip,
    upload_clip,
)

MiB = 1024 * 1024


# -- settings (no server needed) ----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["ab", "UPPER", "has_underscore", "-dash-first", "a..b", "192.168.1.1", "xn--punycode", "x" * 64]
)
def test_bad_bucket_names_are_rejected_by_name(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid S3 bucket name"):
        S3Settings(bucket=name)


def test_settings_are_strict_and_hide_the_secret() -> None:
    settings = S3Settings(endpoint_url="http://127.0.0.1:1", access_key_id="AK", secret_access_key="s3cr3t")
    assert "s3cr3t" not in repr(settings)
    assert settings.addressing_style == "path" and settings.checksums == "when_required"
    with pytest.raises(ValidationError, match="extra"):
        S3Settings(bukket="videofarm")
    with pytest.raises(ValidationError, match="set together"):
        S3Settings(access_key_id="AK")
    with pytest.raises(ValidationError, match="http"):
        S3Settings(endpoint_url="127.0.0.1:8333")
    with pytest.raises(ValidationError):
        S3Settings(multipart_chunk_mb=4)  # S3 parts are at least 5 MiB
    assert all(field.description for field in S3Settings.model_fields.values())


def test_clip_layout_keys_and_validation() -> None:
    layout = ClipLayout("video_abc-123")
    assert layout.prefix == "videos/video_abc-123/"
    assert layout.key("video") == "videos/video_abc-123/video.mp4"
    assert layout.key("thumbnail").endswith("thumbnail.webp")
    assert layout.key("spritesheet").endswith("spritesheet.jpg")
    assert layout.content_type("video") == "video/mp4"
    assert layout.record_key == "videos/video_abc-123/record.json"
    with pytest.raises(ValueError, match="unknown clip variant 'gif'"):
        layout.key("gif")
    for bad in ["", "../etc", "a/b", "x" * 200]:
        with pytest.raises(ValueError, match="invalid video_id"):
            ClipLayout(bad)


# -- against the server -------------------------------------------------------------------


def test_ensure_bucket_is_idempotent(seaweed: EmbeddedSeaweed) -> None:
    bucket = f"ensure-{uuid.uuid4().hex[:10]}"
    store = ObjectStore(seaweed.settings(bucket=bucket))
    try:
        assert store.ensure_bucket() is True
        assert store.ensure_bucket() is False
        assert ObjectStore(seaweed.settings(bucket=bucket)).ensure_bucket() is False
        store.client.head_bucket(Bucket=bucket)
    finally:
        store.client.delete_bucket(Bucket=bucket)


def test_missing_bucket_error_says_what_to_do(seaweed: EmbeddedSeaweed) -> None:
    store = ObjectStore(seaweed.settings(bucket=f"nobucket-{uuid.uuid4().hex[:8]}"))
    with pytest.raises(StorageError, match="NoSuchBucket.*ensure_bucket"):
        store.put_bytes("a", b"x")


def test_put_get_head_delete_roundtrip(store: ObjectStore) -> None:
    uri = store.put_bytes("a/b.bin", b"hello", content_type="text/plain", metadata={"seed": "42"})
    assert uri == f"s3://{store.bucket}/a/b.bin"
    assert store.get_bytes("a/b.bin") == b"hello"
    info = store.head("a/b.bin")
    assert info is not None
    assert (info.size, info.content_type, info.metadata) == (5, "text/plain", {"seed": "42"})
    assert info.etag == "5d41402abc4b2a76b9719d911017c592"  # md5("hello"): single-part
    assert info.multipart_parts is None

    store.put_json("a/rec.json", {"id": "v1", "ünï": [1, 2]})
    assert store.get_json("a/rec.json") == {"id": "v1", "ünï": [1, 2]}
    assert store.head("a/rec.json").content_type == "application/json"
    assert store.list_keys("a/") == ["a/b.bin", "a/rec.json"]

    store.delete("a/b.bin")
    assert store.head("a/b.bin") is None
    assert not store.exists("a/b.bin")
    with pytest.raises(ObjectNotFound, match="a/b.bin"):
        store.get_bytes("a/b.bin")
    store.delete("a/b.bin")  # deleting a missing key is fine
    with pytest.raises(ValueError, match="invalid object key"):
        store.put_bytes("/leading-slash", b"")


def test_stream_and_ranges(store: ObjectStore) -> None:
    data = os.urandom(3 * MiB + 17)
    store.put_bytes("s/blob", data, content_type="video/mp4")
    with store.stream("s/blob", chunk_size=MiB) as stream:
        assert stream.content_length == len(data) and stream.content_type == "video/mp4"
        chunks = list(stream)
    assert b"".join(chunks) == data and len(chunks) == 4
    part = store.stream("s/blob", byte_range=(10, 19))
    assert part.content_length == 10 and part.content_range == f"bytes 10-19/{len(data)}"
    assert b"".join(part) == data[10:20]
    assert b"".join(store.stream("s/blob", byte_range=(len(data) - 5, None))) == data[-5:]
    with pytest.raises(ObjectNotFound):
        store.stream("s/missing")  # fails before any byte is streamed
    with pytest.raises(ValueError, match="byte_range"):
        store.stream("s/blob", byte_range=(5, 1))


def test_large_file_goes_multipart_and_leaves_no_open_upload(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big.mp4"
    src.write_bytes(os.urandom(12 * MiB))  # 5 MiB parts -> 3 parts
    store.put_file("m/big.mp4", src)
    info = store.head("m/big.mp4")
    assert info.size == 12 * MiB and info.content_type == "video/mp4"
    assert info.etag.endswith("-3") and info.multipart_parts == 3
    assert store.list_open_multipart_uploads("m/") == []
    dst = store.download_file("m/big.mp4", tmp_path / "out" / "copy.mp4")
    assert dst.read_bytes() == src.read_bytes()

    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    store.put_file("m/small.bin", small)
    assert store.head("m/small.bin").multipart_parts is None


def test_failed_multipart_upload_is_aborted(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB))

    def fail_third_part(params: dict, **_: object) -> None:
        if params.get("PartNumber") == 3:
            raise ConnectionClosedError(endpoint_url="injected: connection lost during part 3")

    store.client.meta.events.register("before-parameter-build.s3.UploadPart", fail_third_part)
    try:
        with pytest.raises(StorageUnavailable, match="part 3"):
            store.put_file("f/big.bin", src)
    finally:
        store.client.meta.events.unregister("before-parameter-build.s3.UploadPart", fail_third_part)
    assert store.list_open_multipart_uploads() == []  # s3transfer aborted it
    assert store.head("f/big.bin") is None

    # A leftover from a killed process can be found and cleaned up.
    upload = store.client.create_multipart_upload(Bucket=store.bucket, Key="f/orphan")
    assert store.list_open_multipart_uploads("f/") == [{"key": "f/orphan", "upload_id": upload["UploadId"]}]
    assert store.abort_open_multipart_uploads("f/") == 1
    assert store.list_open_multipart_uploads() == []


def test_checksums_when_supported_also_work_on_seaweedfs(
    seaweed: EmbeddedSeaweed, store: ObjectStore, tmp_path: Path
) -> None:
    crc = ObjectStore(seaweed.settings(bucket=store.bucket, checksums="when_supported",
                                       multipart_threshold_mb=5, multipart_chunk_mb=5))
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * MiB))
    crc.put_file("c/big.bin", src)
    crc.put_bytes("c/small", b"abc")
    assert crc.get_bytes("c/small") == b"abc"
    assert crc.get_bytes("c/big.bin") == src.read_bytes()
    assert crc.delete_prefix("c/") == 2


def test_delete_prefix_batches_and_respects_the_prefix(store: ObjectStore) -> None:
    for i in range(10):
        store.put_bytes(f"videos/a/{i:02d}", b"x")
    store.put_bytes("videos/ab/keep", b"x")
    store.put_bytes("other/keep", b"x")
    assert store.delete_prefix("videos/a/", batch_size=3) == 10
    assert store.list_keys() == ["other/keep", "videos/ab/keep"]
    assert store.delete_prefix("videos/a/") == 0
    with pytest.raises(ValueError, match="non-empty prefix"):
        store.delete_prefix("")
    with pytest.raises(ValueError, match="batch_size=0"):
        store.delete_prefix("x", batch_size=0)


def test_upload_clip_writes_media_then_record(store: ObjectStore, tmp_path: Path) -> None:
    files = {}
    for variant, name in [("video", "v.mp4"), ("thumbnail", "t.webp"), ("spritesheet", "s.jpg")]:
        files[variant] = tmp_path / name
        files[variant].write_bytes(os.urandom(1000))
    order: list[str] = []

    def record_key(params: dict, **_: object) -> None:
        order.append(params["Key"])

    store.client.meta.events.register("before-parameter-build.s3.PutObject", record_key)
    try:
        uris = upload_clip(store, "video_123", files, {"id": "video_123", "status": "completed"})
    finally:
        store.client.meta.events.unregister("before-parameter-build.s3.PutObject", record_key)

    layout = ClipLayout("video_123")
    assert uris == {
        "video": store.uri(layout.key("video")),
        "thumbnail": store.uri(layout.key("thumbnail")),
        "spritesheet": store.uri(layout.key("spritesheet")),
        "record": store.uri(layout.record_key),
    }
    assert order[-1] == layout.record_key and len(order) == 4  # the record marks completion
    assert store.list_keys(layout.prefix) == sorted(
        layout.prefix + f for f in ["video.mp4", "thumbnail.webp", "spritesheet.jpg", "record.json"]
    )
    for variant in ("video", "thumbnail", "spritesheet"):
        info = store.head(layout.key(variant))
        assert info.content_type == layout.content_type(variant)
        assert store.get_bytes(layout.key(variant)) == files[variant].read_bytes()
    assert json.loads(store.get_bytes(layout.record_key)) == {"id": "video_123", "status": "completed"}

    # Bad input changes nothing.
    with pytest.raises(ValueError, match="does not exist"):
        upload_clip(store, "video_456", {"video": files["video"], "thumbnail": tmp_path / "nope"}, {})
    with pytest.raises(ValueError, match="unknown clip variant"):
        upload_clip(store, "video_456", {"video": files["video"], "poster": files["video"]}, {})
    with pytest.raises(ValueError, match="'video' entry"):
        upload_clip(store, "video_456", {"thumbnail": files["thumbnail"]}, {})
    assert store.list_keys("videos/video_456/") == []

    assert delete_clip(store, "video_123") == 4
    assert store.list_keys("videos/") == []


def test_anonymous_requests_are_refused(seaweed: EmbeddedSeaweed, store: ObjectStore) -> None:
    store.put_bytes("private", b"secret")
    anonymous = boto3.session.Session().client(
        "s3", endpoint_url=seaweed.runtime.endpoint_url, region_name="us-east-1",
        config=BotoConfig(signature_version=UNSIGNED, s3={"addressing_style": "path"}),
    )
    calls = [
        lambda: anonymous.list_buckets(),
        lambda: anonymous.list_objects_v2(Bucket=store.bucket),
        lambda: anonymous.get_object(Bucket=store.bucket, Key="private"),
        lambda: anonymous.put_object(Bucket=store.bucket, Key="intruder", Body=b"x"),
    ]
    for call in calls:
        with pytest.raises(ClientError) as caught:
            call()
        assert caught.value.response["Error"]["Code"] == "AccessDenied"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert store.head("intruder") is None


def test_wrong_secret_is_refused(seaweed: EmbeddedSeaweed, store: ObjectStore) -> None:
    store.put_bytes("private", b"secret")
    wrong = ObjectStore(seaweed.settings(bucket=store.bucket, secret_access_key="not-the-secret"))
    with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
        wrong.get_bytes("private")
    with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
        wrong.put_bytes("intruder", b"x")
    with pytest.raises(StorageError, match="denied"):
        wrong.ensure_bucket()
    unknown = ObjectStore(seaweed.settings(bucket=store.bucket, access_key_id="NOBODY"))
    with pytest.raises(StorageError, match="InvalidAccessKeyId"):
        unknown.list_keys()
    assert store.head("intruder") is None
