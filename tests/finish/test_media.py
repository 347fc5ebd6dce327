"""MP4 encoding/probing, thumbnail and spritesheet."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm.finish.media import (
    encode_mp4,
    probe_mp4,
    read_frames,
    top_level_boxes,
    write_spritesheet,
    write_thumbnail,
)
from farm.finish.watermark import WatermarkConfig, apply_watermark, watermark_box
from tests.finish import box_diff_per_frame, box_mask, synth_frames


@pytest.mark.parametrize(
    "count,height,width,fps",
    [(9, 64, 64, 16), (13, 96, 128, 24), (17, 128, 96, Fraction(30000, 1001))],
)
def test_encode_probe_roundtrip(tmp_path: Path, count: int, height: int, width: int, fps) -> None:
    frames = synth_frames(count=count, height=height, width=width)
    path = encode_mp4(frames, fps, tmp_path / "clip.mp4")

    info = probe_mp4(path)
    assert (info.frames, info.width, info.height) == (count, width, height)
    assert info.fps == Fraction(fps)
    assert info.codec == "h264"
    assert info.pix_fmt == "yuv420p"

    kinds = [kind for kind, _, _ in top_level_boxes(path)]
    assert "moov" in kinds and "mdat" in kinds
    assert kinds.index("moov") < kinds.index("mdat"), f"not faststart: {kinds}"


def test_decoded_pixels_match_input(tmp_path: Path) -> None:
    frames = synth_frames(count=9, height=96, width=128)
    decoded = read_frames(encode_mp4(frames, 24, tmp_path / "clip.mp4"))
    assert decoded.shape == frames.shape
    error = np.abs(decoded.astype(int) - frames.astype(int)).mean(axis=(1, 2, 3))
    # yuv420p + CRF 18 is lossy but close; a channel swap or frame shuffle is far off.
    assert (error < 6).all(), error
    swapped = np.abs(decoded[..., ::-1].astype(int) - frames.astype(int)).mean()
    assert swapped > 20


def test_encoding_is_deterministic(tmp_path: Path) -> None:
    frames = synth_frames(count=9, height=64, width=64)
    a = encode_mp4(frames, 24, tmp_path / "a.mp4").read_bytes()
    b = encode_mp4(frames, 24, tmp_path / "b.mp4").read_bytes()
    assert a == b


def test_watermark_survives_encoding(tmp_path: Path) -> None:
    height, width = 96, 128
    frames = synth_frames(count=13, height=height, width=width, seed=3)
    cfg = WatermarkConfig()
    box = watermark_box(height, width, cfg)
    plain = read_frames(encode_mp4(frames, 24, tmp_path / "plain.mp4"))
    marked = read_frames(encode_mp4(apply_watermark(frames, cfg), 24, tmp_path / "marked.mp4"))

    per_frame = box_diff_per_frame(plain, marked, box)
    assert (per_frame > 8).all(), f"watermark lost in encoding on some frame: {per_frame}"
    # Outside the box only codec noise differs, far below the watermark's effect.
    outside = ~box_mask(height, width, box)
    noise = np.abs(plain[:, outside].astype(int) - marked[:, outside].astype(int)).mean()
    assert noise < per_frame.min() / 4


@pytest.mark.parametrize("height,width", [(65, 64), (64, 63)])
def test_odd_size_is_rejected_by_name(tmp_path: Path, height: int, width: int) -> None:
    frames = np.zeros((9, height, width, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=f"{width}x{height}"):
        encode_mp4(frames, 24, tmp_path / "odd.mp4")
    assert not (tmp_path / "odd.mp4").exists()


@pytest.mark.parametrize("fps", [0, -24, float("inf"), float("nan")])
def test_bad_fps_is_rejected(tmp_path: Path, fps) -> None:
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(synth_frames(count=9, height=64, width=64), fps, tmp_path / "x.mp4")


def test_thumbnail_is_webp_middle_frame(tmp_path: Path) -> None:
    frames = synth_frames(count=13, height=96, width=128)
    frames[6, :, :, :] = (250, 20, 20)  # make the middle frame unmistakable
    path = write_thumbnail(frames, tmp_path / "thumb.webp")
    with Image.open(path) as image:
        assert image.format == "WEBP"
        assert image.size == (128, 96)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(pixels - frames[6]).mean() < 6
    assert np.abs(pixels - frames[0]).mean() > 40


def test_spritesheet_is_jpeg_grid_in_time_order(tmp_path: Path) -> None:
    count, height, width = 16, 96, 128
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    frames[..., 0] = (np.arange(count) * 16)[:, None, None]  # red encodes the frame index
    path = write_spritesheet(frames, tmp_path / "sprites.jpg", columns=4, tile_width=64)
    with Image.open(path) as image:
        assert image.format == "JPEG"
        tile_h = round(64 * height / width)
        assert image.size == (4 * 64, 4 * tile_h)
        sheet = np.asarray(image.convert("RGB")).astype(int)
    reds = [sheet[r * tile_h + 4:(r + 1) * tile_h - 4, c * 64 + 4:(c + 1) * 64 - 4, 0].mean()
            for r in range(4) for c in range(4)]
    np.testing.assert_allclose(reds, np.arange(count) * 16, atol=4)


def test_spritesheet_samples_evenly_when_long(tmp_path: Path) -> None:
    frames = synth_frames(count=17, height=64, width=64)
    path = write_spritesheet(frames, tmp_path / "s.jpg", columns=3, tile_width=32, max_tiles=6)
    with Image.open(path) as image:
        assert image.size == (3 * 32, 2 * 32)


def test_malformed_mp4_boxes_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x10\x00ftypisom" + b"\x00" * 8)  # claims 4096 bytes, has 16
    with pytest.raises(ValueError, match="malformed"):
        top_level_boxes(bad)
