"""``vae_tiling``: the decoder runs diffusers' tiled decode; frames within one tile are untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.render.engine import DecoderStage
from farm.render.tiny import tiny_spec
from tests.figures import psnr


@pytest.fixture(scope="module")
def decoders(tiny_model_dir):
    spec = tiny_spec(tiny_model_dir)
    return DecoderStage(spec), DecoderStage(spec.model_copy(update={"vae_tiling": True}))


def test_tiled_decode_is_diffusers_tiling_and_equal_within_one_tile(decoders):
    plain, tiled = decoders
    assert not plain.vae.use_tiling and tiled.vae.use_tiling
    z_dim = plain.vae.config.z_dim
    torch.manual_seed(0)
    small = torch.randn(1, z_dim, 2, 16, 16)  # 128x128 pixels: inside one 256-pixel tile
    assert np.array_equal(plain.decode(small), tiled.decode(small))

    large = torch.randn(1, z_dim, 2, 48, 40)  # 384x320 pixels: several tiles, blended where they overlap
    a, b = plain.decode(large), tiled.decode(large)
    assert a.shape == b.shape == (5, 384, 320, 3)
    db = psnr(a, b)
    print(f"tiled vs untiled decode at 384x320: PSNR {db:.1f} dB")
    assert not np.array_equal(a, b) and db > 40
