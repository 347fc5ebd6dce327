"""Visible watermark: present on every frame, only inside its box, configurable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from farm.finish.watermark import WatermarkConfig, apply_watermark, watermark_box
from tests.finish import box_diff_per_frame, box_mask, synth_frames

SIZES = [(64, 64), (96, 128), (128, 96)]
CORNERS = ["top-left", "top-right", "bottom-left", "bottom-right"]
# Mean absolute difference (0-255 scale) inside the box that counts as "visibly marked".
VISIBLE = 8.0


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("corner", CORNERS)
def test_watermark_marks_every_frame_inside_box_only(height: int, width: int, corner: str) -> None:
    frames = synth_frames(count=11, height=height, width=width, seed=height + width)
    cfg = WatermarkConfig(corner=corner)
    marked = apply_watermark(frames, cfg)
    x0, y0, x1, y1 = box = watermark_box(height, width, cfg)

    assert marked.shape == frames.shape and marked.dtype == np.uint8
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    # The box hugs the two edges of the requested corner (within the margin).
    near = round(cfg.margin * min(height, width)) + 1
    assert (x0 <= near) if corner.endswith("left") else (x1 >= width - near)
    assert (y0 <= near) if corner.startswith("top") else (y1 >= height - near)
    assert y1 - y0 <= height / 2

    per_frame = box_diff_per_frame(frames, marked, box)
    assert per_frame.shape == (11,)
    assert (per_frame > VISIBLE).all(), f"watermark too faint on some frame: {per_frame}"

    outside = ~box_mask(height, width, box)
    np.testing.assert_array_equal(marked[:, outside], frames[:, outside])


def test_input_frames_are_not_modified() -> None:
    frames = synth_frames(count=9, height=64, width=64)
    before = frames.copy()
    apply_watermark(frames, WatermarkConfig())
    np.testing.assert_array_equal(frames, before)


@pytest.mark.parametrize("value", [0, 255])
def test_visible_on_black_and_on_white(value: int) -> None:
    frames = np.full((9, 96, 128, 3), value, dtype=np.uint8)
    cfg = WatermarkConfig()
    per_frame = box_diff_per_frame(frames, apply_watermark(frames, cfg), watermark_box(96, 128, cfg))
    assert (per_frame > VISIBLE).all(), per_frame


def test_tiny_frames_keep_a_legible_minimum_height() -> None:
    cfg = WatermarkConfig()  # scale 0.08 of 64 px would be ~5 px: unreadable
    _, y0, _, y1 = watermark_box(64, 64, cfg)
    assert y1 - y0 >= 8
    # On a large frame the height follows scale, not the minimum.
    _, y0, _, y1 = watermark_box(720, 1280, cfg)
    assert 0.5 * cfg.scale * 720 <= y1 - y0 <= 2 * cfg.scale * 720


def test_opacity_controls_strength() -> None:
    frames = np.full((9, 64, 64, 3), 128, dtype=np.uint8)
    faint, strong = WatermarkConfig(opacity=0.2), WatermarkConfig(opacity=1.0)
    box = watermark_box(64, 64, faint)
    assert box == watermark_box(64, 64, strong)
    d_faint = box_diff_per_frame(frames, apply_watermark(frames, faint), box)
    d_strong = box_diff_per_frame(frames, apply_watermark(frames, strong), box)
    assert (d_strong > 2 * d_faint).all()
    assert (d_faint > 0).all()


def test_non_ascii_text_does_not_crash() -> None:
    frames = synth_frames(count=9, height=64, width=96)
    cfg = WatermarkConfig(text="Über-Vidéo ✓ 日本語 🎬", corner="top-left")
    marked = apply_watermark(frames, cfg)
    assert (box_diff_per_frame(frames, marked, watermark_box(64, 96, cfg)) > VISIBLE).all()


def _red_disc_logo(path: Path) -> Path:
    logo = Image.new("RGBA", (80, 40), (0, 0, 0, 0))
    ImageDraw.Draw(logo).ellipse((0, 0, 79, 39), fill=(255, 0, 0, 255))
    logo.save(path)
    return path


def test_logo_watermark(tmp_path: Path) -> None:
    height, width = 96, 128
    frames = np.full((9, height, width, 3), 40, dtype=np.uint8)
    cfg = WatermarkConfig(logo_path=_red_disc_logo(tmp_path / "logo.png"), corner="top-right", opacity=1.0)
    marked = apply_watermark(frames, cfg)
    x0, y0, x1, y1 = box = watermark_box(height, width, cfg)

    # The logo keeps its 2:1 aspect and is placed top-right.
    assert abs((x1 - x0) - 2 * (y1 - y0)) <= 2
    assert x1 > width * 0.9 and y0 < height * 0.1
    # Red, not text-white: red rises, green does not.
    region = marked[:, y0:y1, x0:x1].astype(int)
    assert (region[..., 0].reshape(9, -1).mean(axis=1) > 100).all()
    assert region[..., 1].max() <= 40
    outside = ~box_mask(height, width, box)
    np.testing.assert_array_equal(marked[:, outside], frames[:, outside])


def test_missing_logo_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match="nope.png"):
        apply_watermark(synth_frames(count=9, height=64, width=64), WatermarkConfig(logo_path=missing))


@pytest.mark.parametrize(
    "bad",
    [
        {"opacity": 0},
        {"opacity": 1.5},
        {"opacity": -0.1},
        {"corner": "center"},
        {"scale": 0},
        {"margin": -0.1},
        {"colour": "red"},  # unknown field: extra="forbid"
    ],
)
def test_bad_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        WatermarkConfig(**bad)


def test_every_field_is_described() -> None:
    for name, info in WatermarkConfig.model_fields.items():
        assert info.description, f"WatermarkConfig.{name} has no description"


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((9, 64, 64, 3), dtype=np.float32),
        np.zeros((64, 64, 3), dtype=np.uint8),
        np.zeros((9, 64, 64, 4), dtype=np.uint8),
        np.zeros((0, 64, 64, 3), dtype=np.uint8),
    ],
)
def test_bad_frames_are_rejected(frames: np.ndarray) -> None:
    with pytest.raises(ValueError):
        apply_watermark(frames, WatermarkConfig())
