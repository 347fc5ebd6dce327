"""Per-job conditioning: the constants every denoising shard of a job needs, one class per layout.

A family's encoder stage computes its conditioning once per job; the state carries it from shard
to shard, and a checkpoint may store it apart (written once per job). Each class is a frozen
dataclass whose fields are tensors (or None), so moving and serializing it is generic:

- :class:`Conditioning` — Wan text-to-video: the prompt (and negative prompt) embeddings.
- :class:`ImageConditioning` — Wan 2.1 image-to-video: those, plus the 20-channel condition
  (4 mask channels + 16 channels of VAE latents of the reference image followed by zero frames)
  that is concatenated to the latents at every step, and the image encoder's embeddings.
- :class:`FirstFrameConditioning` — Wan 2.2 TI2V image-to-video: the text embeddings and the reference
  image's own latents, which stand in for the clip's first latent frame at every step.
- :class:`VideoConditioning` — Wan video-to-video: the text embeddings and the source clip's latents.
- :class:`AudioVideoConditioning` — LTX-2: the text connectors' video and audio embeddings, their
  attention masks, the latent geometry that splits the state's packed latents into video and audio,
  the frame rate the positions are conditioned on, and the audio guidance scale.

Which family a conditioning belongs to is its class's ``family``; the serialized form names it
(``"family"``) for every class but the text-to-video one, whose bytes stay exactly what they were
before families existed, so older checkpoints load and older readers read new T2V ones.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch

CONDITIONING_FORMAT = 1
CONDITIONING_KIND = "conditioning"  # marks Conditioning.to_bytes payloads; state payloads have no "kind"
DEFAULT_FAMILY = "wan"
FAMILY_KEY = "family"  # written only when the family is not DEFAULT_FAMILY


def load_payload(data: bytes, what: str) -> dict:
    """torch.load with ``weights_only=True`` onto CPU: checkpoint bytes can never execute code."""
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated or foreign blob: name what was expected
        raise ValueError(f"{what}: the bytes are not a torch.save archive ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{what}: expected a dict payload, got {type(payload).__name__}")
    return payload


def save_payload(payload: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


_CLASSES: dict[str, type["Conditioning"]] = {}


@dataclass(frozen=True)
class Conditioning:
    """Wan text-to-video: the prompt embeddings, and the negative ones for classifier-free guidance."""

    family: ClassVar[str] = DEFAULT_FAMILY

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None  # None: no classifier-free guidance

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.family] = cls

    def to(self, device: str | torch.device) -> "Conditioning":
        """The same conditioning on ``device`` (tensors already there are reused, not copied)."""
        return replace(self, **{k: None if v is None else v.to(device) for k, v in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The fields by name, in declaration order (the prompt embeddings first)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def payload_fields(self) -> dict:
        """What a payload stores of this conditioning: its tensors, and its family unless the default."""
        tagged = {} if self.family == DEFAULT_FAMILY else {FAMILY_KEY: self.family}
        return tagged | self.tensors()

    @staticmethod
    def from_payload_fields(payload: dict, what: str) -> "Conditioning":
        """The conditioning stored in ``payload`` by :meth:`payload_fields`; ValueError for an unknown family."""
        family = payload.get(FAMILY_KEY, DEFAULT_FAMILY)
        cls = _CLASSES.get(family)
        if cls is None:
            raise ValueError(f"{what}: unknown conditioning family {family!r}; known: {', '.join(sorted(_CLASSES))}")
        missing = [f.name for f in fields(cls) if f.name not in payload]
        if missing:
            raise ValueError(f"{what}: the {family!r} conditioning lacks {', '.join(missing)}")
        return cls(**{f.name: payload[f.name] for f in fields(cls)})

    def to_bytes(self) -> bytes:
        """torch.save of the tensors; read back with :meth:`from_bytes`."""
        return save_payload({"format": CONDITIONING_FORMAT, "kind": CONDITIONING_KIND} | self.payload_fields())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Conditioning":
        """Load bytes written by any conditioning's :meth:`to_bytes`, on CPU, as the class they were
        written from; ValueError for anything else."""
        payload = load_payload(data, "conditioning")
        if payload.get("kind") != CONDITIONING_KIND:
            hint = " (these are DenoiseState bytes: use DenoiseState.from_bytes)" if "scheduler_class" in payload else ""
            raise ValueError(f"conditioning: the bytes do not hold a Conditioning{hint}")
        if payload.get("format") != CONDITIONING_FORMAT:
            raise ValueError(
                f"unsupported conditioning format {payload.get('format')!r}; expected {CONDITIONING_FORMAT}"
            )
        return Conditioning.from_payload_fields(payload, "conditioning")


_CLASSES[DEFAULT_FAMILY] = Conditioning


@dataclass(frozen=True)
class ImageConditioning(Conditioning):
    """Wan 2.1 image-to-video: the text embeddings, the image condition and the image embeddings.

    ``condition`` is ``(1, 4 + z_dim, latent_frames, h, w)``: a mask that is 1 on the frames the image
    pins (the first) and 0 elsewhere, folded to the VAE's temporal ratio, then the normalized VAE
    latents of the image followed by black frames — what ``WanImageToVideoPipeline.prepare_latents``
    builds. ``image_embeds`` is the image encoder's penultimate hidden state, None for a transformer
    without image cross-attention (Wan 2.2 A14B I2V).
    """

    family: ClassVar[str] = "wan-i2v"

    condition: torch.Tensor
    image_embeds: torch.Tensor | None = None


@dataclass(frozen=True)
class FirstFrameConditioning(Conditioning):
    """Wan 2.2 TI2V image-to-video (``WanImageToVideoPipeline`` with ``expand_timesteps``): the text
    embeddings and ``first_frame``, ``(1, z_dim, 1, h, w)``: the normalized VAE latents (the mode) of
    the reference image alone. Each step feeds the transformer these latents as the clip's first latent
    frame, at timestep 0, so the first frame is the image's by construction, whatever the weights.
    """

    family: ClassVar[str] = "wan-ti2v"

    first_frame: torch.Tensor


@dataclass(frozen=True)
class VideoConditioning(Conditioning):
    """Wan video-to-video (remix, edit, extend): the text embeddings and the source's clean latents.

    ``source_latents`` is ``(1, z_dim, latent_frames, h, w)``: the normalized VAE latents (the
    distribution's mode) of the source resampled to the clip's frames — what
    ``WanVideoToVideoPipeline.prepare_latents`` encodes before it noises them. The initial state is
    those latents noised to the strength's first timestep; the steps are text-to-video's, so no shard
    reads this field: it is kept so a conditioning read back from a checkpoint still says what the
    job derived from (one latent-sized tensor more per job).
    """

    family: ClassVar[str] = "wan-v2v"

    source_latents: torch.Tensor | None = None


@dataclass(frozen=True)
class AudioVideoConditioning(Conditioning):
    """LTX-2 (joint audio + video): what ``LTX2Pipeline`` computes before its loop, per job.

    ``prompt_embeds`` / ``negative_prompt_embeds`` are the text connectors' outputs for the video branch,
    ``(1, tokens, caption_channels)``, and ``audio_prompt_embeds`` / ``negative_audio_prompt_embeds`` the
    ones for the audio branch; ``attention_mask`` / ``negative_attention_mask`` their connector masks,
    ``(1, tokens)``. The connectors' outputs are kept rather than Gemma's stacked hidden states: they are
    what the loop takes, and much smaller. ``geometry`` is int64 ``[latent_frames, latent_height,
    latent_width, audio_frames, latent_mel_bins]``: the family packs the video and audio latents into the
    state's one ``latents`` tensor and splits them with it. ``frame_rate`` (float64, 0-d) is the fps the
    transformer's positions are conditioned on, ``audio_guidance_scale`` (float64, 0-d) the guidance of the
    audio latents (the video's is the state's ``guidance_scale``).
    """

    family: ClassVar[str] = "ltx2"

    audio_prompt_embeds: torch.Tensor
    negative_audio_prompt_embeds: torch.Tensor | None
    attention_mask: torch.Tensor
    negative_attention_mask: torch.Tensor | None
    geometry: torch.Tensor
    frame_rate: torch.Tensor
    audio_guidance_scale: torch.Tensor
