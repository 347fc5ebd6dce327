"""The clip's AAC track: fitted to the video's duration (silence padded or trimmed at the end), muxed
by PyAV beside the H.264 video, and covered by the C2PA manifest like every other byte of the file."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from farm.finish.audio import AudioTrack, fit_to_video, video_samples
from farm.finish.chain import ClipMeta, finish_clip
from farm.finish.provenance import SignerConfig, ensure_dev_credentials, verify
from farm.finish.watermark import WatermarkConfig
from tests.finish import synth_frames

RATE = 16000
FPS = 8


def tone(seconds: float, rate: int = RATE, channels: int = 2) -> AudioTrack:
    t = np.arange(int(seconds * rate)) / rate
    waves = [0.5 * np.sin(2 * np.pi * (440 + 220 * c) * t) for c in range(channels)]
    return AudioTrack(np.stack(waves).astype(np.float32), rate)


def streams(path: Path) -> dict:
    """What a decoder finds: each stream's codec and duration in seconds, and the audio's decoded samples."""
    with av.open(str(path)) as container:
        found = {s.type: (s.codec_context.name, float(s.duration * s.time_base)) for s in container.streams
                 if s.type in ("video", "audio")}
        if container.streams.audio:
            audio = container.streams.audio[0]
            found["audio_layout"] = (audio.codec_context.channels, audio.codec_context.sample_rate)
            found["audio_samples"] = sum(frame.samples for frame in container.decode(audio=0))
    return found


def test_the_track_is_padded_with_silence_or_trimmed_at_its_end_to_the_video():
    assert video_samples(9, Fraction(FPS), RATE) == 18000  # 9 frames at 8 fps = 1.125 s
    short = tone(1.09)  # what the tiny LTX-2's vocoder makes for 9 frames: 35 ms short
    padded = fit_to_video(short, 9, Fraction(FPS))
    assert padded.samples.shape == (2, 18000)
    assert np.array_equal(padded.samples[:, :17440], short.samples) and not padded.samples[:, 17440:].any()
    long = tone(1.5)
    trimmed = fit_to_video(long, 9, Fraction(FPS))
    assert np.array_equal(trimmed.samples, long.samples[:, :18000])
    loud = AudioTrack(np.full((1, 100), 3.0, dtype=np.float32), RATE)
    assert float(fit_to_video(loud, 1, Fraction(160)).samples.max()) == 1.0  # clipped to [-1, 1]


@pytest.mark.parametrize("samples, rate, fragment", [
    (np.zeros((3, 10), dtype=np.float32), RATE, "1 or 2 channels"),
    (np.zeros(10, dtype=np.float32), RATE, "(channels, samples)"),
    (np.zeros((2, 10), dtype=np.int16), RATE, "float32"),
    (np.full((2, 10), np.nan, dtype=np.float32), RATE, "NaN"),
    (np.zeros((2, 10), dtype=np.float32), 12345, "not an AAC rate"),
])
def test_bad_tracks_are_refused_by_name(samples, rate, fragment):
    with pytest.raises(ValueError) as refused:
        AudioTrack(samples, rate)
    assert str(refused.value).startswith("audio") and fragment in str(refused.value)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, Path, str]:
    """(with audio, without audio, dev CA PEM): one finished clip each, signed with the dev CA."""
    root = tmp_path_factory.mktemp("audio")
    meta = ClipMeta(title="tiny: a fox barks", model_id="ltx2-tiny", seed=1, steps=4, prompt="a fox barks")
    frames = synth_frames(count=9, height=64, width=64)
    with_audio = finish_clip(frames, FPS, root / "a", meta, WatermarkConfig(), SignerConfig(), root / "state",
                             audio=tone(1.09))
    silent = finish_clip(frames, FPS, root / "b", meta, WatermarkConfig(), SignerConfig(), root / "state")
    return with_audio.video, silent.video, ensure_dev_credentials(root / "state" / "c2pa").ca_cert.read_text()


def test_a_clip_with_audio_has_an_aac_stream_as_long_as_the_video(clips):
    with_audio, silent, _ = clips
    found = streams(with_audio)
    assert found["video"][0] == "h264" and found["audio"][0] == "aac"
    assert found["audio_layout"] == (2, RATE)
    one_audio_frame = 1024 / RATE
    assert abs(found["audio"][1] - found["video"][1]) <= one_audio_frame
    assert found["video"][1] == pytest.approx(9 / FPS)
    assert abs(found["audio_samples"] - 18000) <= 1024  # the decoded samples too, within one AAC frame
    assert set(streams(silent)) == {"video"}  # no audio asked for: no audio stream at all


def test_the_manifest_covers_the_audio_track(clips, tmp_path):
    with_audio, _, ca = clips
    report = verify(with_audio, trust_anchors_pem=ca)
    assert report.state == "Trusted", report.failures
    # One bit of one AAC packet flipped: the manifest's hash over the file no longer matches.
    with av.open(str(with_audio)) as container:
        position = next(p.pos for p in container.demux(audio=0) if p.size > 8 and p.pos is not None and p.pos > 0)
    data = bytearray(with_audio.read_bytes())
    data[position + 4] ^= 0x01
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))
    assert verify(tampered, trust_anchors_pem=ca).state == "Invalid"
