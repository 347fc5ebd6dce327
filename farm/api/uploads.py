"""Checks for uploaded images (``input_reference``), before anything decodes them fully.

Order matters: the byte size is checked while reading (the body limit already capped it),
the format and the pixel count from the header alone (Pillow opens lazily), and only then
is the image decoded, so a decompression bomb (a small file claiming gigapixels) is
refused without allocating its pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from farm.api.errors import InvalidRequest, PayloadTooLarge

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,(.*)$", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class CheckedImage:
    format: str
    width: int
    height: int
    data: bytes


def check_image(data: bytes, limits: UploadLimits, param: str = "input_reference") -> CheckedImage:
    """The image if it is an allowed format within the limits; a 4xx naming ``param`` otherwise."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{param}: {len(data)} bytes is too large; allowed: at most {limits.max_bytes} bytes",
                              param=param)
    if not data:
        raise InvalidRequest(f"{param}: the file is empty", param=param)
    allowed = ", ".join(ALLOWED_FORMATS.values())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(f"{param}: the image has too many pixels; allowed: at most {limits.max_pixels}",
                             param=param, code="image_too_large") from None
    except Exception:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError… for foreign bytes
        raise InvalidRequest(f"{param}: not an image in an accepted format; allowed: {allowed}", param=param,
                             code="unsupported_image_format") from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise InvalidRequest(f"{param}: {width}x{height} is {width * height} pixels; allowed: at most "
                                 f"{limits.max_pixels}", param=param, code="image_too_large")
        try:
            image.load()  # a truncated or corrupt file fails here, within the pixel budget
        except Exception:
            raise InvalidRequest(f"{param}: the {image.format} data is corrupt or truncated", param=param,
                                 code="invalid_image") from None
        return CheckedImage(image.format or "", width, height, data)


def decode_data_url(url: str, limits: UploadLimits, param: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL (remote URLs are fetched by ``farm.api.image_refs``)."""
    match = _DATA_URL.match(url)
    if not match:
        raise InvalidRequest(f"{param}: not a base64 data URL of an image (data:image/png;base64,...)", param=param)
    encoded = match.group(2)
    if len(encoded) > (limits.max_bytes * 4) // 3 + 4:
        raise PayloadTooLarge(f"{param}: the image is too large; allowed: at most {limits.max_bytes} bytes",
                              param=param)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param}: the data URL is not valid base64", param=param) from None
