"""Visible watermark burned into every frame of a clip.

The overlay (text or a logo) is rendered once per frame size as an RGBA image and
alpha-composited into each frame with Pillow. Only the pixels inside
:func:`watermark_box` change; everything outside is left bit-for-bit intact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]

# Below this font size the default font stops being readable at all; when even this
# does not fit, the rendered overlay is scaled down instead of the font.
_SMALLEST_FONT_PX = 6
# A watermark may not cover more than this fraction of the frame height, so tiny
# frames keep most of their picture.
_MAX_HEIGHT_FRACTION = 0.5


class WatermarkConfig(BaseModel):
    """How the visible watermark looks and where it sits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(
        default="AI-generated · videofarm",
        min_length=1,
        description="Text burned into every frame (ignored when logo_path is set).",
    )
    logo_path: Path | None = Field(
        default=None,
        description="PNG with an alpha channel used instead of the text when set.",
    )
    corner: Corner = Field(
        default="bottom-right", description="Frame corner the watermark is anchored to."
    )
    opacity: float = Field(
        default=0.7, gt=0.0, le=1.0, description="Overall opacity of the watermark, 0 < x <= 1."
    )
    scale: float = Field(
        default=0.08,
        gt=0.0,
        le=0.5,
        description="Watermark (text line or logo) height as a fraction of the frame height.",
    )
    min_height_px: int = Field(
        default=10,
        ge=_SMALLEST_FONT_PX,
        le=256,
        description="Smallest line/logo height in pixels, so the mark stays legible on tiny frames.",
    )
    margin: float = Field(
        default=0.03,
        ge=0.0,
        le=0.25,
        description="Gap between the watermark and the frame edges, as a fraction of min(H, W).",
    )


def _wrap(text: str, font: ImageFont.FreeTypeFont, stroke: int, max_width: int) -> list[str]:
    """Greedy word wrap so narrow frames get several short lines instead of a cut-off one."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [text]:
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) + 2 * stroke > max_width:
                lines.append(current)
                current = word
            else:
                current = candidate
        lines.append(current)
    return [line for line in lines if line] or [text.strip() or text]


def _render_text(text: str, line_px: int, max_w: int, max_h: int, align_right: bool) -> Image.Image:
    """Render light text with a dark outline, wrapped and shrunk to fit max_w x max_h."""
    size = line_px
    while True:
        font = ImageFont.load_default(size=size)
        stroke = max(1, round(size / 10))
        lines = _wrap(text, font, stroke, max_w)
        ascent, descent = font.getmetrics()
        line_h = ascent + descent + 2 * stroke
        widths = [int(np.ceil(font.getlength(line))) + 2 * stroke for line in lines]
        block_w, block_h = max(widths), line_h * len(lines)
        if (block_w <= max_w and block_h <= max_h) or size <= _SMALLEST_FONT_PX:
            break
        size -= 1

    image = Image.new("RGBA", (block_w, block_h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for i, (line, width) in enumerate(zip(lines, widths)):
        x = block_w - width + stroke if align_right else stroke
        # White fill with a black stroke is visible on both dark and bright pictures.
        draw.text(
            (x, i * line_h + stroke),
            line,
            font=font,
            fill=(255, 255, 255, 255),
            stroke_width=stroke,
            stroke_fill=(0, 0, 0, 255),
            anchor="la",
        )
    return image


def _render_logo(path: Path, target_h: int) -> Image.Image:
    """Load the logo as RGBA scaled to target_h pixels high, keeping its aspect ratio."""
    try:
        with Image.open(path) as src:
            logo = src.convert("RGBA")
    except (OSError, ValueError) as exc:
        raise ValueError(f"watermark logo_path={str(path)!r} is not a readable image: {exc}") from exc
    width = max(1, round(logo.width * target_h / logo.height))
    return logo.resize((width, target_h), Image.Resampling.LANCZOS)


def render_overlay(height: int, width: int, cfg: WatermarkConfig) -> tuple[Image.Image, int, int]:
    """Render the watermark for a height x width frame.

    Returns the RGBA overlay (opacity already applied) and its top-left (x, y) in the frame.
    """
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got height={height} width={width}")
    margin = round(cfg.margin * min(height, width))
    max_w = max(1, width - 2 * margin)
    max_h = max(1, min(height - 2 * margin, round(_MAX_HEIGHT_FRACTION * height)))
    line_px = min(max(cfg.min_height_px, round(cfg.scale * height)), max_h)
    right = cfg.corner.endswith("right")

    if cfg.logo_path is not None:
        overlay = _render_logo(cfg.logo_path, line_px)
    else:
        overlay = _render_text(cfg.text, line_px, max_w, max_h, align_right=right)

    # Trim fully transparent borders so the box is exactly where pixels change.
    bbox = overlay.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError(f"watermark renders fully transparent for config {cfg!r}")
    overlay = overlay.crop(bbox)

    # Last resort for frames too small for even the smallest font: shrink the pixels.
    fit = min(1.0, max_w / overlay.width, max_h / overlay.height)
    if fit < 1.0:
        logger.debug("watermark scaled by %.2f to fit a %dx%d frame", fit, width, height)
        overlay = overlay.resize(
            (max(1, int(overlay.width * fit)), max(1, int(overlay.height * fit))),
            Image.Resampling.LANCZOS,
        )

    if cfg.opacity < 1.0:
        alpha = np.asarray(overlay.getchannel("A"), dtype=np.float32) * cfg.opacity
        overlay.putalpha(Image.fromarray(np.round(alpha).astype(np.uint8)))

    x = width - margin - overlay.width if right else margin
    y = margin if cfg.corner.startswith("top") else height - margin - overlay.height
    return overlay, max(0, x), max(0, y)


def watermark_box(height: int, width: int, cfg: WatermarkConfig) -> tuple[int, int, int, int]:
    """The (x0, y0, x1, y1) region, exclusive of x1/y1, that the watermark occupies."""
    overlay, x, y = render_overlay(height, width, cfg)
    return x, y, x + overlay.width, y + overlay.height


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", type(frames).__name__)
        raise ValueError(f"frames must be a (F, H, W, 3) array, got shape {shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
    if frames.shape[0] < 1:
        raise ValueError("frames is empty: need at least one frame")


def apply_watermark(frames: np.ndarray, cfg: WatermarkConfig) -> np.ndarray:
    """Return a copy of ``frames`` (F, H, W, 3) uint8 RGB with the watermark on every frame."""
    _check_frames(frames)
    _, height, width, _ = frames.shape
    overlay, x, y = render_overlay(height, width, cfg)
    x1, y1 = x + overlay.width, y + overlay.height

    out = frames.copy()
    for i in range(out.shape[0]):
        # Composite only the box: cheaper, and the rest of the frame stays untouched.
        region = Image.fromarray(out[i, y:y1, x:x1]).convert("RGBA")
        region.alpha_composite(overlay)
        out[i, y:y1, x:x1] = np.asarray(region.convert("RGB"))
    return out
