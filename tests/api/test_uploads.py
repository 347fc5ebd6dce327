"""Uploaded images are checked (size, format, pixel count) before anything decodes them."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from farm.api.errors import APIError
from farm.api.uploads import UploadLimits, check_image
from tests.api.test_gateway import error_of


def _image(fmt: str, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, fmt)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``x``height``: a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


LIMITS = UploadLimits(max_bytes=64 * 1024, max_pixels=256 * 256)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_pass(fmt):
    checked = check_image(_image(fmt), LIMITS)
    assert (checked.format, checked.width, checked.height) == (fmt, 16, 16)


@pytest.mark.parametrize(("data", "status", "code"), [
    (_image("GIF"), 400, "unsupported_image_format"),
    (_image("BMP"), 400, "unsupported_image_format"),
    (b"%PDF-1.7 not an image", 400, "unsupported_image_format"),
    (_png_claiming(100_000, 100_000), 400, "image_too_large"),   # 10 gigapixels in ~100 bytes
    (_png_claiming(300, 300), 400, "image_too_large"),           # over this farm's 256x256 budget
    (_image("PNG", (64, 64))[:60], 400, "invalid_image"),         # truncated
    (b"\x00" * (64 * 1024 + 1), 413, "payload_too_large"),
    (b"", 400, "invalid_value"),
])
def test_bad_uploads_are_refused_naming_the_field(data, status, code):
    with pytest.raises(APIError) as caught:
        check_image(data, LIMITS)
    assert (caught.value.status_code, caught.value.code, caught.value.param) == (status, code, "input_reference")


def test_gateway_checks_uploads_and_data_urls(make_app, jobs):
    from fastapi.testclient import TestClient

    client = TestClient(make_app(upload_limits=LIMITS))
    bomb = ("bomb.png", _png_claiming(50_000, 50_000), "image/png")
    err = error_of(client.post("/v1/videos", data={"prompt": "a"}, files={"input_reference": bomb}), 400)
    assert err["code"] == "image_too_large" and err["param"] == "input_reference"
    gif = base64.b64encode(_image("GIF")).decode()
    body = {"prompt": "a", "input_reference": {"image_url": f"data:image/gif;base64,{gif}"}}
    assert error_of(client.post("/v1/videos", json=body), 400)["code"] == "unsupported_image_format"
    body = {"prompt": "a", "input_reference": {"image_url": "data:image/png;base64,@@@"}}
    assert "not valid base64" in error_of(client.post("/v1/videos", json=body), 400)["message"]
    assert jobs.list(limit=10)[0] == []
