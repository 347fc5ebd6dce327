"""Image-to-video on a real `farm up`: the unmodified ``openai`` SDK sends ``input_reference`` as a
file; the gateway stores it in S3, the encoder replica reads it back, and the clip downloads and
decodes. The image reaches the render: the same seed and prompt with another image is another clip.

On the shared farm, which serves wan-tiny-i2v beside the text-to-video models.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from farm.render.tiny import TINY_I2V_MODEL_ID

pytestmark = pytest.mark.slow


def _png(kind: str) -> bytes:
    y, x = np.mgrid[0:80, 0:120] / 80.0
    if kind == "gradient":
        pixels = np.stack([x / 1.5, y, 0.5 + 0 * x], axis=-1)
    else:
        pixels = np.stack([(x * 8).astype(int) % 2, 1 - y, (y * 8).astype(int) % 2], axis=-1).astype(float)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _frames(mp4: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_a_clip_from_an_image_through_the_sdk(shared_farm):
    farm = shared_farm
    client = farm.client()
    clips = {}
    for kind in ("gradient", "checkers"):
        video = client.videos.create_and_poll(
            model=TINY_I2V_MODEL_ID, prompt="the scene comes alive", seconds="1", size="64x64",
            input_reference=(f"{kind}.png", _png(kind), "image/png"), extra_body={"steps": 4, "seed": 11},
        )
        assert video.status == "completed", video.error
        job = farm.store().get(video.id)
        assert job.params["input_reference_key"] == f"videos/{video.id}/input_reference.png"
        clips[kind] = _frames(client.videos.download_content(video.id).read())
    assert clips["gradient"].shape == (9, 64, 64, 3)
    # Same seed, prompt and size; only the image differs, so the clips must too.
    difference = np.abs(clips["gradient"].astype(int) - clips["checkers"].astype(int)).mean()
    assert difference > 0.5, difference

    # Without an image the image model refuses, naming the field; nothing is queued.
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        client.videos.create(model=TINY_I2V_MODEL_ID, prompt="no image", seconds="1", size="64x64")
    assert refused.value.body["param"] == "input_reference"
