"""Tests for farm.finish; shared synthetic-frame helpers live here."""

from __future__ import annotations

import numpy as np


def synth_frames(count: int = 13, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """Moving colour gradients plus mild noise: (count, height, width, 3) uint8 RGB."""
    rng = np.random.default_rng(seed)
    t = np.arange(count)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = 255 * x / max(1, width - 1) + 0 * t
    green = 255 * y / max(1, height - 1) + 0 * t
    blue = (128 + 100 * np.sin((x + y) / 9.0 + t / 2.0)) + 0 * t
    base = np.stack(np.broadcast_arrays(red, green, blue), axis=-1)
    noise = rng.normal(0.0, 4.0, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean (height, width) mask that is True inside box = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def box_diff_per_frame(a: np.ndarray, b: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mean absolute difference inside box, one value per frame."""
    x0, y0, x1, y1 = box
    diff = np.abs(a[:, y0:y1, x0:x1].astype(np.int16) - b[:, y0:y1, x0:x1].astype(np.int16))
    return diff.reshape(diff.shape[0], -1).mean(axis=1)
