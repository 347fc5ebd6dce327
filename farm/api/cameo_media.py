"""A cameo's source video, checked and cut into reference frames, on the gateway.

PyAV (already the farm's MP4 library, and torch-free) opens the upload from memory. Checks come
before any decoding work that grows with the input: the byte size (the body limit already capped
it), then a video stream, its pixel count and its duration from the container header; decoding
then stops after ``max_decoded_frames`` frames, so a file that lies about its duration costs a
bounded amount of work. A first pass counts the frames, a second keeps ``frames`` of them, evenly
spaced over the clip (the middle of each of ``frames`` equal spans), each scaled to at most ``frame_max_side`` pixels on its longer
side and encoded as PNG — what the image-to-video encoder reads (``farm.render.reference``).
Callers run it in the thread pool: decoding blocks.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from farm.api.errors import InvalidRequest, PayloadTooLarge


@dataclass(frozen=True)
class CameoLimits:
    """What a cameo's source video may be, and what is kept of it."""

    max_bytes: int = 64 * 1024 * 1024
    max_seconds: float = 60.0
    max_pixels: int = 1920 * 1080
    max_decoded_frames: int = 3600
    frames: int = 4
    frame_max_side: int = 512


@dataclass(frozen=True)
class CameoVideo:
    """A checked source video: its reference frames (PNG bytes) and what to store it as."""

    frames: tuple[bytes, ...]
    width: int  # of the frames as kept
    height: int
    seconds: float
    content_type: str


_CONTENT_TYPES = {"mp4": "video/mp4", "mov": "video/quicktime", "webm": "video/webm", "matroska": "video/x-matroska"}


def read_cameo_video(data: bytes, limits: CameoLimits, param: str = "video") -> CameoVideo:
    """The upload's reference frames if it is a video within ``limits``; a 4xx naming ``param`` otherwise."""
    import av  # here, not at import: the gateway loads PyAV only when a cameo is made

    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{param}: {len(data)} bytes is too large; allowed: at most {limits.max_bytes} bytes",
                              param=param)
    if not data:
        raise InvalidRequest(f"{param}: the file is empty", param=param)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:  # PyAV raises InvalidDataError and kin for foreign bytes
        raise InvalidRequest(f"{param}: not a video file PyAV can read (MP4, MOV, WebM, MKV)", param=param,
                             code="unsupported_video_format") from None
    with container:
        streams = container.streams.video
        if not streams:
            raise InvalidRequest(f"{param}: the file has no video stream", param=param, code="unsupported_video_format")
        stream = streams[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_pixels:
            raise InvalidRequest(f"{param}: {width}x{height} is {width * height} pixels a frame; allowed: at most "
                                 f"{limits.max_pixels}", param=param, code="video_too_large")
        seconds = _duration(container, stream)
        if seconds is not None and seconds > limits.max_seconds:
            raise InvalidRequest(f"{param}: the video is {seconds:.1f} s long; allowed: at most "
                                 f"{limits.max_seconds:g} s", param=param, code="video_too_long")
        count = _decode(container, stream, limits, param, keep=())[0]
        fmt = container.format.name.split(",")
    if count == 0:
        raise InvalidRequest(f"{param}: the video has no frames", param=param, code="invalid_video")
    # A second pass keeps only the chosen frames: holding every decoded frame would cost memory
    # in proportion to the upload.
    chosen = _spread(count, limits.frames)
    with av.open(io.BytesIO(data), mode="r") as container:
        kept_frames = _decode(container, container.streams.video[0], limits, param, keep=chosen)[1]
    kept = tuple(_png(frame.to_image(), limits.frame_max_side) for frame in kept_frames)
    first = _size_of(kept[0])
    content_type = next((t for f, t in _CONTENT_TYPES.items() if f in fmt), "application/octet-stream")
    return CameoVideo(kept, first[0], first[1], seconds if seconds is not None else 0.0, content_type)


def _decode(container, stream, limits: CameoLimits, param: str, keep) -> tuple[int, list]:
    """Decode up to ``limits.max_decoded_frames`` frames: how many there are, and those at ``keep``."""
    kept, count = [], 0
    try:
        for count, frame in enumerate(container.decode(stream), start=1):
            if count > limits.max_decoded_frames:
                raise InvalidRequest(f"{param}: more than {limits.max_decoded_frames} frames; allowed: at most "
                                     f"{limits.max_seconds:g} s of video", param=param, code="video_too_long")
            if count - 1 in keep:
                kept.append(frame)
    except InvalidRequest:
        raise
    except Exception:
        raise InvalidRequest(f"{param}: the video data is corrupt or truncated", param=param,
                             code="invalid_video") from None
    return count, kept


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return None


def _spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indexes of ``count`` frames, the middle of each of ``wanted`` equal spans (each once)."""
    return sorted({min(count - 1, int((i + 0.5) * count / wanted)) for i in range(max(1, wanted))})


def _png(image, max_side: int) -> bytes:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _size_of(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.size
