"""A clip's sound: the decoder's waveform fitted to the video's duration, and its AAC stream (PyAV).

The rule: the audio track lasts exactly as long as the video, ``frames / fps`` seconds, that is
``round(frames × sample_rate / fps)`` samples. A shorter waveform is **padded with silence at its
end** (LTX-2's vocoder output is a few tens of milliseconds shorter than its frames: the audio VAE's
causal decode), a longer one **trimmed at its end**. Nothing is resampled or stretched, so sound
stays where the model put it in time. The AAC encoder then codes whole frames of 1024 samples (the
last one padded by the encoder), so a decoder may report up to one audio frame more than the video.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

AAC_CODEC = "aac"  # FFmpeg's native AAC encoder: always built in, deterministic, takes planar float
AAC_BIT_RATE = 128_000
AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350})
_LAYOUTS = {1: "mono", 2: "stereo"}


@dataclass(frozen=True)
class AudioTrack:
    """Float32 samples ``(channels, samples)`` in [-1, 1] at ``sample_rate`` Hz, mono or stereo."""

    samples: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        samples = self.samples
        if not isinstance(samples, np.ndarray) or samples.ndim != 2 or samples.shape[0] not in _LAYOUTS:
            shape = getattr(samples, "shape", type(samples).__name__)
            raise ValueError(f"audio must be a (channels, samples) array with 1 or 2 channels, got shape {shape}")
        if samples.dtype != np.float32:
            raise ValueError(f"audio must be float32, got dtype {samples.dtype}")
        if not np.isfinite(samples).all():
            raise ValueError("audio has NaN or infinite samples")
        if self.sample_rate not in AAC_RATES:
            raise ValueError(f"audio sample_rate {self.sample_rate} is not an AAC rate; allowed: "
                             f"{', '.join(map(str, sorted(AAC_RATES)))}")

    @property
    def layout(self) -> str:
        return _LAYOUTS[self.samples.shape[0]]

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.sample_rate


def video_samples(frames: int, fps: Fraction, sample_rate: int) -> int:
    """How many samples last as long as ``frames`` frames at ``fps``: ``round(frames × rate / fps)``."""
    return int(round(Fraction(frames) * sample_rate / Fraction(fps)))


def fit_to_video(track: AudioTrack, frames: int, fps: Fraction) -> AudioTrack:
    """``track`` padded with silence or trimmed, at its end, to the video's duration (the module's rule);
    samples clipped to [-1, 1]."""
    want = video_samples(frames, fps, track.sample_rate)
    samples = np.clip(track.samples[:, :want], -1.0, 1.0)
    if samples.shape[1] < want:
        samples = np.pad(samples, ((0, 0), (0, want - samples.shape[1])))
    return AudioTrack(np.ascontiguousarray(samples, dtype=np.float32), track.sample_rate)


def add_aac_stream(container, track: AudioTrack):
    """Add an AAC stream for ``track`` to an open PyAV output container; returns the stream."""
    stream = container.add_stream(AAC_CODEC, rate=track.sample_rate)
    stream.codec_context.layout = track.layout
    stream.codec_context.format = "fltp"
    stream.codec_context.bit_rate = AAC_BIT_RATE
    stream.codec_context.time_base = Fraction(1, track.sample_rate)
    # One thread and bitexact, like the video: the same samples give the same bytes (and C2PA hash).
    stream.codec_context.options = {"threads": "1", "flags": "+bitexact"}
    return stream


def encode_aac(container, stream, track: AudioTrack) -> None:
    """Encode ``track`` into ``stream`` in the encoder's frame size (1024 samples), muxing each packet."""
    import av

    size = stream.codec_context.frame_size or 1024
    total = track.samples.shape[1]
    for start in range(0, total, size):
        chunk = np.ascontiguousarray(track.samples[:, start:start + size])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=track.layout)
        frame.sample_rate = track.sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, track.sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
