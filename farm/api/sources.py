"""Source clips of edits and extensions sent as uploads: checked cheaply, kept in the object store.

The gateway never decodes a whole clip. An uploaded ``video`` is checked from its container's
headers with PyAV (already a dependency of the package; no torch): at most the upload byte limit,
an MP4 (ISO BMFF) container with a video stream, at most ``upload_limits.max_pixels`` per frame and
:data:`farm.render.source.MAX_SOURCE_FRAMES` frames. What the headers cannot show (a stream that is
corrupt further in) fails the job in the encoder stage with an error naming ``video``.

A checked upload is stored as sent under the new job's prefix (``videos/<id>/source.mp4``,
:attr:`farm.storage.s3.ClipLayout.source_key`) before the job is queued, like an
``input_reference`` image (:mod:`farm.api.references`), and deleted again when no new job owns it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from farm.api.errors import InvalidRequest, PayloadTooLarge
from farm.api.references import put_unowned
from farm.api.uploads import UploadLimits
from farm.render.source import MAX_SOURCE_FRAMES, probe_source
from farm.storage.s3 import ClipLayout, ObjectStore


SOURCE_SHA256_PARAM = "source_sha256"  # in the job's params and its request fingerprint
_MP4_DEMUXER = "mp4"  # PyAV names the ISO BMFF demuxer "mov,mp4,m4a,3gp,3g2,mj2"


@dataclass(frozen=True)
class CheckedSource:
    """An uploaded source clip that passed the header checks."""

    data: bytes
    width: int
    height: int
    frames: int
    seconds: float

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def whole_seconds(self) -> int:
        """Its duration in whole seconds (at least 1): what an extension stitches in front."""
        return max(1, round(self.seconds))


def check_source(data: bytes, limits: UploadLimits, param: str = "video") -> CheckedSource:
    """The upload if it looks like an MP4 clip within the limits; a 4xx naming ``param`` otherwise."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{param}: {len(data)} bytes is too large; allowed: at most {limits.max_bytes} bytes",
                              param=param)
    if not data:
        raise InvalidRequest(f"{param}: the file is empty", param=param)
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            demuxer = container.format.name
    except Exception:
        raise InvalidRequest(f"{param}: not a video file; allowed: an MP4 (video/mp4) with a video stream",
                             param=param, code="unsupported_video_format") from None
    if _MP4_DEMUXER not in demuxer.split(","):
        raise InvalidRequest(f"{param}: a {demuxer!r} container; allowed: MP4 (video/mp4)", param=param,
                             code="unsupported_video_format")
    try:
        info = probe_source(data, param)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param, code="invalid_video") from None
    if info.width * info.height > limits.max_pixels:
        raise InvalidRequest(f"{param}: {info.width}x{info.height} is {info.width * info.height} pixels a frame; "
                             f"allowed: at most {limits.max_pixels}", param=param, code="video_too_large")
    if info.frames > MAX_SOURCE_FRAMES:
        raise InvalidRequest(f"{param}: {info.frames} frames; allowed: at most {MAX_SOURCE_FRAMES}", param=param,
                             code="video_too_large")
    return CheckedSource(data, info.width, info.height, info.frames, info.seconds)


def store_source(objects: ObjectStore, video_id: str, source: CheckedSource) -> str:
    """Put the checked clip under ``video_id``'s prefix; its key. 503 when the store does not answer."""
    return put_unowned(objects, ClipLayout(video_id).source_key, source.data, "video/mp4", "video")
