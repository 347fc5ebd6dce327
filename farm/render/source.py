"""Source clips of remixes, edits and extensions: an MP4's bytes → frames of the requested size.

Torch-free (PyAV, Pillow, numpy), so the encoder stage and the finisher read a source the same
way, and the gateway can probe an upload with :func:`probe_source` without decoding it all.

The rules:

- **Size**: each frame is fitted to ``width × height`` by the reference-image rule of
  :mod:`farm.render.reference` (cover, then center-crop, Lanczos).
- **Frame count**: the source is resampled to exactly the count asked for (the target's
  ``seconds × fps + 1``, a 4k+1 count for Wan) by picking frames evenly over the whole source,
  first and last included (frame ``round(i × (n − 1) / (count − 1))`` of ``n``). A longer source is
  thinned, a shorter one repeats frames; the source's own frame rate is not consulted.
- **Last frames** (extensions): :func:`last_frame` is the source's final decoded frame, fitted; the
  finisher stitches source and new part with :func:`stitch_extension`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from farm.render.reference import fit_reference

# An upload is decoded in full by the encoder; more frames than this are refused up front.
MAX_SOURCE_FRAMES = 2048


@dataclass(frozen=True)
class SourceInfo:
    """What the container of a source clip says, read without decoding its frames."""

    width: int
    height: int
    frames: int  # the stream's frame count, or an estimate from duration × rate when the header has none
    seconds: float


def _open(data: bytes, what: str):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # PyAV raises InvalidDataError, ValueError, … for foreign bytes
        raise ValueError(f"{what}: not a video container PyAV can open ({type(exc).__name__})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{what}: the file has no video stream")
    return container


def probe_source(data: bytes, what: str = "video") -> SourceInfo:
    """The source's size, frame count and duration from its headers; ValueError naming ``what``."""
    container = _open(data, what)
    with container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        seconds = 0.0
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1_000_000
        frames = stream.frames or (round(seconds * rate) if rate else 0)
        width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise ValueError(f"{what}: the video stream has no frame size")
    if frames <= 0:
        raise ValueError(f"{what}: the video stream says it has no frames")
    if rate and not seconds:
        seconds = frames / rate
    return SourceInfo(width=width, height=height, frames=frames, seconds=seconds)


def decode_frames(data: bytes, what: str = "video", max_frames: int = MAX_SOURCE_FRAMES) -> list[Image.Image]:
    """Every frame of the first video stream as RGB images; ValueError for a file with none, a
    corrupt one, or one with more than ``max_frames`` frames."""
    container = _open(data, what)
    frames: list[Image.Image] = []
    try:
        with container:
            for frame in container.decode(video=0):
                frames.append(frame.to_image())
                if len(frames) > max_frames:
                    raise ValueError(f"{what}: more than {max_frames} frames; allowed: at most {max_frames}")
    except ValueError:
        raise
    except Exception as exc:  # a truncated or corrupt stream
        raise ValueError(f"{what}: the video data is corrupt or truncated ({type(exc).__name__})") from None
    if not frames:
        raise ValueError(f"{what}: the video stream decoded to no frames")
    return frames


def resample_indices(available: int, count: int) -> list[int]:
    """Which of ``available`` frames make ``count`` frames evenly spread, first and last included."""
    if available < 1 or count < 1:
        raise ValueError(f"frame counts must be positive, got available={available}, count={count}")
    if count == 1:
        return [available - 1]
    return [round(i * (available - 1) / (count - 1)) for i in range(count)]


def source_clip(data: bytes, width: int, height: int, count: int, what: str = "video") -> list[Image.Image]:
    """The source resampled to ``count`` frames of ``width × height`` by the module's rules."""
    frames = decode_frames(data, what)
    return [fit_reference(frames[i], width, height) for i in resample_indices(len(frames), count)]


def last_frame(data: bytes, width: int, height: int, what: str = "video") -> Image.Image:
    """The source's final frame, fitted to ``width × height``."""
    return fit_reference(decode_frames(data, what)[-1], width, height)


def as_array(frames: list[Image.Image]) -> np.ndarray:
    """Frames as the finisher's ``(F, H, W, 3)`` uint8 array."""
    return np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])


def stitch_extension(data: bytes, frames: np.ndarray, count: int) -> np.ndarray:
    """An extension as one clip: the source resampled to ``count`` frames of the new frames' size, then
    ``frames`` without their first, which stands where the source's last frame is (the new part was
    rendered from it). ``count`` frames of source and ``F`` new frames give ``count + F − 1``."""
    height, width = int(frames.shape[1]), int(frames.shape[2])
    source = as_array(source_clip(data, width, height, count))
    return np.concatenate([source, frames[1:]], axis=0)
