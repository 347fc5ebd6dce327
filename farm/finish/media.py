"""Media files for a finished clip: H.264 MP4 (PyAV) with an optional AAC track, WebP thumbnail,
JPEG spritesheet.

Frames are (F, H, W, 3) uint8 RGB numpy arrays throughout; audio is :class:`farm.finish.audio.AudioTrack`.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from farm.finish.audio import AudioTrack, add_aac_stream, encode_aac, fit_to_video

logger = logging.getLogger(__name__)

# Formats the OpenAI videos API serves for the `thumbnail` and `spritesheet` variants.
THUMBNAIL_MIME = "image/webp"
SPRITESHEET_MIME = "image/jpeg"
VIDEO_MIME = "video/mp4"


@dataclass(frozen=True)
class VideoInfo:
    """What a decoder sees in an MP4 file."""

    frames: int
    width: int
    height: int
    fps: Fraction
    codec: str
    pix_fmt: str


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", type(frames).__name__)
        raise ValueError(f"frames must be a (F, H, W, 3) array, got shape {shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must be non-empty, got shape {frames.shape}")


def frame_rate(fps: float | int | Fraction) -> Fraction:
    """fps as an exact Fraction, validated."""
    # 1001 keeps NTSC rates such as 30000/1001 exact while rejecting float noise.
    try:
        rate = Fraction(fps).limit_denominator(1001)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ValueError(f"fps must be a finite number, got {fps!r}") from exc
    if rate <= 0 or rate > 1000:
        raise ValueError(f"fps must be in (0, 1000], got {fps!r}")
    return rate


def encode_mp4(
    frames: np.ndarray,
    fps: float | int | Fraction,
    path: Path,
    *,
    crf: int = 18,
    preset: str = "medium",
    audio: AudioTrack | None = None,
) -> Path:
    """Encode frames as H.264 (libx264, yuv420p) in an MP4 with ``moov`` first (faststart).

    With ``audio``, the file also carries an AAC stream of it, fitted to the video's duration first
    (padded with silence or trimmed at its end: :func:`farm.finish.audio.fit_to_video`).

    yuv420p halves the chroma resolution, so an odd width or height is rejected with a
    ValueError rather than silently padded or cropped: the caller owns the frame size.
    Output is bit-exact for the same input, library versions and settings.
    """
    _check_frames(frames)
    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(
            f"frame size {width}x{height} (WxH) is odd; H.264 yuv420p needs even width and "
            "height, so crop or pad the frames to even dimensions first"
        )
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    rate = frame_rate(fps)
    path = Path(path)

    # bitexact keeps library version strings and timestamps out of the file, so the
    # same frames always give the same bytes (and the same C2PA hash).
    container = av.open(
        str(path), mode="w", format="mp4",
        options={"movflags": "+faststart", "fflags": "+bitexact"},
    )
    try:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        # One x264 thread: slice/frame threading is deterministic in x264 too, but a
        # single thread makes that independent of the host's core count.
        stream.codec_context.options = {
            "crf": str(crf),
            "preset": preset,
            "threads": "1",
            "flags": "+bitexact",
        }
        sound = None
        if audio is not None:  # every stream is added before the first packet writes the header
            audio = fit_to_video(audio, count, rate)
            sound = add_aac_stream(container, audio)
        for index in range(count):
            # Converted to yuv420p here, not by the encoder: the encoder's own conversion gave
            # different bytes for the same frames now and then on a loaded machine (measured:
            # 6 distinct files in 120 encodes under load; 1 with this explicit reformat).
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = index
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if sound is not None:
            encode_aac(container, sound, audio)
    except BaseException:
        container.close()
        path.unlink(missing_ok=True)
        raise
    container.close()
    logger.debug("encoded %d frames %dx%d @ %s fps to %s (audio: %s)", count, width, height, rate, path,
                 "none" if audio is None else f"{audio.samples.shape[0]} ch @ {audio.sample_rate} Hz")
    return path


def probe_mp4(path: Path) -> VideoInfo:
    """Decode every frame of the first video stream and report what was found."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = 0
        pix_fmt = stream.codec_context.pix_fmt or ""
        for frame in container.decode(stream):
            count += 1
            pix_fmt = frame.format.name
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return VideoInfo(
            frames=count,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=Fraction(rate) if rate is not None else Fraction(0),
            codec=stream.codec_context.name,
            pix_fmt=pix_fmt,
        )


def read_frames(path: Path) -> np.ndarray:
    """Decode an MP4's first video stream to a (F, H, W, 3) uint8 RGB array."""
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not decoded:
        raise ValueError(f"{path} contains no decodable video frames")
    return np.stack(decoded)


def top_level_boxes(path: Path) -> list[tuple[str, int, int]]:
    """List the top-level ISO-BMFF boxes of an MP4 as (type, offset, size)."""
    boxes: list[tuple[str, int, int]] = []
    file_size = os.path.getsize(path)
    with open(path, "rb") as fh:
        offset = 0
        while offset + 8 <= file_size:
            fh.seek(offset)
            size, kind = struct.unpack(">I4s", fh.read(8))
            if size == 1:  # 64-bit "largesize" follows the type
                (size,) = struct.unpack(">Q", fh.read(8))
            elif size == 0:  # box runs to the end of the file
                size = file_size - offset
            if size < 8 or offset + size > file_size:
                raise ValueError(f"{path}: malformed MP4 box {kind!r} at offset {offset} size {size}")
            boxes.append((kind.decode("latin-1"), offset, size))
            offset += size
    return boxes


def _save_atomic(image: Image.Image, path: Path, **save_args: object) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, **save_args)
    os.replace(tmp, path)
    return path


def write_thumbnail(frames: np.ndarray, path: Path, *, quality: int = 85) -> Path:
    """Write the middle frame as a WebP image (the API's ``thumbnail`` variant)."""
    _check_frames(frames)
    middle = frames[frames.shape[0] // 2]
    return _save_atomic(Image.fromarray(middle), path, format="WEBP", quality=quality, method=4)


def write_spritesheet(
    frames: np.ndarray,
    path: Path,
    *,
    columns: int = 4,
    tile_width: int = 160,
    max_tiles: int = 16,
    quality: int = 85,
) -> Path:
    """Write a JPEG grid of evenly sampled frames (the API's ``spritesheet`` variant).

    Tiles are ``tile_width`` wide, keep the frame's aspect ratio and run left to right,
    top to bottom in time order; at most ``max_tiles`` frames are sampled.
    """
    _check_frames(frames)
    if columns < 1 or tile_width < 1 or max_tiles < 1:
        raise ValueError(
            f"columns, tile_width and max_tiles must be >= 1, got "
            f"columns={columns} tile_width={tile_width} max_tiles={max_tiles}"
        )
    count, height, width, _ = frames.shape
    tiles = min(count, max_tiles)
    indices = np.unique(np.round(np.linspace(0, count - 1, tiles)).astype(int))
    cols = min(columns, len(indices))
    rows = math.ceil(len(indices) / cols)
    tile_height = max(1, round(tile_width * height / width))

    sheet = Image.new("RGB", (cols * tile_width, rows * tile_height))
    for n, index in enumerate(indices):
        tile = Image.fromarray(frames[index]).resize((tile_width, tile_height), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((n % cols) * tile_width, (n // cols) * tile_height))
    return _save_atomic(sheet, path, format="JPEG", quality=quality)
