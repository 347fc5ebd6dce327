"""Synchronized audio on a real `farm up`: the unmodified ``openai`` SDK renders a clip on the tiny
LTX-2 (video and audio latents denoised together on its pool, decoded by the decoder replica, muxed
as AAC by the finisher). The download carries both streams, as long as each other, and its C2PA
manifest is Trusted over the whole file. Audio is on by default there, off by request; a Wan model
says it makes none and refuses a request for it.

On the shared farm, which serves ltx2-tiny beside the Wan models.
"""

from __future__ import annotations

import io

import numpy as np
import openai
import pytest

from farm.finish.provenance import verify
from farm.render.tiny import TINY_LTX2_MODEL_ID

pytestmark = pytest.mark.slow


def _streams(mp4: bytes) -> dict:
    """Each stream's codec and duration (s), the video's frame count and the audio's decoded samples."""
    import av

    with av.open(io.BytesIO(mp4)) as container:
        found = {s.type: (s.codec_context.name, float(s.duration * s.time_base)) for s in container.streams
                 if s.type in ("video", "audio")}
        found["frames"] = sum(1 for _ in container.decode(video=0))
    if "audio" in found:
        with av.open(io.BytesIO(mp4)) as container:
            stream = container.streams.audio[0]
            found["layout"] = (stream.codec_context.channels, stream.codec_context.sample_rate)
            samples = [frame.to_ndarray() for frame in container.decode(audio=0)]
            found["samples"] = np.concatenate(samples, axis=1)
    return found


def test_a_clip_with_audio_through_the_sdk(shared_farm, tmp_path):
    farm = shared_farm
    client = farm.client()
    served = client.models.retrieve(TINY_LTX2_MODEL_ID)
    assert served.audio is True and served.input_types == ["text"]
    assert client.models.retrieve("wan-tiny").audio is False

    video = client.videos.create_and_poll(model=TINY_LTX2_MODEL_ID, prompt="a fox barks in the snow", seconds="1",
                                          size="64x64", extra_body={"seed": 5})
    assert video.status == "completed", video.error
    assert farm.store().get(video.id).params["audio"] is True  # on by default: the model makes audio
    mp4 = client.videos.download_content(video.id).read()
    found = _streams(mp4)
    fps = farm.settings().model(TINY_LTX2_MODEL_ID).fps
    assert found["video"][0] == "h264" and found["audio"][0] == "aac"
    assert found["frames"] == 9 and found["video"][1] == pytest.approx(9 / fps)
    channels, rate = found["layout"]
    # As long as the video: fitted to frames/fps, then coded in whole AAC frames of 1024 samples.
    assert abs(found["audio"][1] - found["video"][1]) <= 1024 / rate
    assert abs(found["samples"].shape[1] - round(9 * rate / fps)) <= 1024
    assert np.abs(found["samples"]).max() > 0  # the vocoder's sound, not only padding
    path = tmp_path / "with-audio.mp4"
    path.write_bytes(mp4)
    report = verify(path, trust_anchors_pem=(farm.home / "c2pa" / "dev-root-ca.pem").read_text())
    assert report.state == "Trusted", report.failures

    # Off by request: the same model, no audio stream at all.
    silent = client.videos.create_and_poll(model=TINY_LTX2_MODEL_ID, prompt="a fox barks in the snow", seconds="1",
                                           size="64x64", extra_body={"seed": 5, "audio": False})
    assert silent.status == "completed", silent.error
    quiet = _streams(client.videos.download_content(silent.id).read())
    assert "audio" not in quiet and quiet["frames"] == 9

    # A model without audio refuses a request for it, naming the field; nothing is queued.
    before = [v.id for v in client.videos.list(limit=5)]
    with pytest.raises(openai.BadRequestError) as refused:
        client.videos.create(model="wan-tiny", prompt="a fox barks", seconds="1", size="64x64",
                             extra_body={"audio": True})
    assert refused.value.body["param"] == "audio" and "makes no audio" in refused.value.body["message"]
    assert [v.id for v in client.videos.list(limit=5)] == before
