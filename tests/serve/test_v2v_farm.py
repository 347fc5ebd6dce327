"""Remix, edit and extend on a real `farm up` with the unmodified ``openai`` SDK: the encoder replica
reads each source MP4 from S3 and renders video-to-video, and an extension's finisher stitches the
source in front of the new part, so its download is one clip of the stitched length.

On the shared farm: every derived clip runs on its text-to-video model wan-tiny (8 fps).
"""

from __future__ import annotations

import io

import numpy as np
import pytest


pytestmark = pytest.mark.slow


def _frames(mp4: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_remix_edit_and_extend_through_the_sdk(shared_farm):
    farm = shared_farm
    client = farm.client()
    store = farm.store()
    source = client.videos.create_and_poll(model="wan-tiny", prompt="a street by day", seconds="1",
                                           size="64x64", extra_body={"steps": 4, "seed": 5})
    assert source.status == "completed", source.error
    source_mp4 = client.videos.download_content(source.id).read()

    remix = client.videos.remix(source.id, prompt="the street at night", extra_body={"strength": 0.5})
    remix = client.videos.poll(remix.id)
    assert remix.status == "completed", remix.error
    assert remix.remixed_from_video_id == source.id
    assert store.get(remix.id).params["derived_from"]["key"] == f"videos/{source.id}/video.mp4"
    assert _frames(client.videos.download_content(remix.id).read()).shape == (9, 64, 64, 3)

    edit = client.videos.edit(prompt="snow falls", video=("street.mp4", io.BytesIO(source_mp4), "video/mp4"))
    edit = client.videos.poll(edit.id)
    assert edit.status == "completed", edit.error
    assert store.get(edit.id).params["derived_from"] == {
        "video_id": None, "key": f"videos/{edit.id}/source.mp4", "action": "edit"}

    ext = client.videos.extend(prompt="it drives on", seconds="1",  # type: ignore[arg-type]
                               video=("street.mp4", io.BytesIO(source_mp4), "video/mp4"))
    assert ext.seconds == "2"  # 1 s of source + 1 s new, as the object says from the start
    ext = client.videos.poll(ext.id)
    assert ext.status == "completed", ext.error
    stitched = _frames(client.videos.download_content(ext.id).read())
    assert stitched.shape == (17, 64, 64, 3)  # 9 source frames + 9 new − the new first = 2 × 8 + 1
    # The first part is the source (watermarked again, re-encoded): close to it, frame by frame.
    original = _frames(source_mp4)
    assert np.abs(stitched[:9].astype(int) - original.astype(int)).mean() < 8.0

    # A source that failed or is still queued is refused by status; nothing is created.
    import openai

    queued = client.videos.create(model="wan-tiny", prompt="later", seconds="1", size="64x64")
    with pytest.raises(openai.BadRequestError) as refused:
        client.videos.remix(queued.id, prompt="now")
    assert refused.value.body["code"] == "video_not_completed"
