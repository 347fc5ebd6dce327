"""The reference-image rule: cover, then center-crop, to exactly the requested size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from farm.render.reference import cover_crop_box, fit_reference


@pytest.mark.parametrize(
    ("src", "dst", "box"),
    [
        ((1920, 1080), (128, 128), (420.0, 0.0, 1500.0, 1080.0)),  # wide → keep the central square
        ((1920, 1080), (128, 96), (240.0, 0.0, 1680.0, 1080.0)),  # 4:3 of a 16:9 frame
        ((1080, 1920), (128, 128), (0.0, 420.0, 1080.0, 1500.0)),  # tall → trim top and bottom
        ((64, 64), (128, 96), (0.0, 8.0, 64.0, 56.0)),  # smaller than asked: cropped, then scaled up
        ((200, 100), (400, 200), (0.0, 0.0, 200.0, 100.0)),  # same shape: nothing cut
    ],
)
def test_cover_crop_box(src, dst, box):
    got = cover_crop_box(*src, *dst)
    assert got == pytest.approx(box)
    left, top, right, bottom = got
    assert (right - left) * dst[1] == pytest.approx((bottom - top) * dst[0])  # the requested aspect ratio


def test_bad_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="width must be positive, got 0"):
        cover_crop_box(10, 10, 0, 10)


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue, with a green bar across the central third of the width."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    pixels[:, width // 3 : 2 * width // 3, 1] = 255
    return Image.fromarray(pixels)


def test_fit_keeps_the_centre_and_never_stretches():
    fitted = np.asarray(fit_reference(_halves(300, 100), 64, 64))  # keeps x in [100, 200): all green-bar
    assert fitted.shape == (64, 64, 3) and fitted.dtype == np.uint8
    assert fitted[:, 4:-4, 1].min() > 200  # the central third survives, filling the frame
    assert fitted[:, :28, 0].mean() > 200 and fitted[:, -28:, 2].mean() > 200  # red left, blue right
    tall = fit_reference(_halves(100, 300), 96, 128)
    assert tall.size == (96, 128) and tall.mode == "RGB"


def test_fit_applies_exif_orientation_and_flattens_transparency():
    # Stored 40×20, EXIF says "rotate 90°": shown 20×40, so a 20×40 request needs no crop at all.
    stored = _halves(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    shown = fit_reference(Image.open(io.BytesIO(buffer.getvalue())), 20, 40)
    assert shown.size == (20, 40)
    rows = np.asarray(shown).mean(axis=1)  # rotated clockwise: red on top, blue at the bottom
    assert rows[:10, 0].mean() > 150 and rows[-10:, 2].mean() > 150, rows

    clear = Image.new("RGBA", (32, 32), (255, 255, 255, 0))  # fully transparent white
    assert np.asarray(fit_reference(clear, 16, 16)).max() == 0  # flattened onto black
