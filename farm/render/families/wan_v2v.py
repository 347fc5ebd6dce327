"""Wan video-to-video: remixes, edits and extensions derived from a source clip's pixels.

The method is ``WanVideoToVideoPipeline``'s *latent init at a strength*: the source clip (resampled
to the clip's frames and size by :mod:`farm.render.source`) is VAE-encoded, noised to the timestep
where the last ``int(steps × strength)`` steps of the schedule begin, and denoised from there
under the new prompt. Low strength keeps the source's layout and colours; 1.0 keeps little more
than its noise level's share.

Why this rather than Wan VACE: it needs no extra weights and runs on the text-to-video model the
farm already serves (``WanVideoToVideoPipeline`` loads the same saved T2V model), so every Wan
model can remix, edit and extend, and the denoiser pools hold nothing new. VACE would need a
second, larger transformer with control layers in its own pool.

What happens where:

- the **encoder stage** (:class:`VideoEncoderStage`) reads the source MP4 the gateway named
  (``RenderParams.source_key``), decodes and fits it (or, for an extension, holds its last frame
  for the whole clip: ``source_frames="last"``), encodes the prompt, and VAE-encodes the frames —
  the VAE encode is a per-job constant, so it runs once where the job starts, as Wan I2V's does;
- the **initial state** (:meth:`WanVideoToVideo.initial_state`) sets the model's full schedule,
  draws the noise from the seed (as the pipeline does, from a CPU generator), noises the source
  latents to the strength's first timestep, and starts the state at that step: ``step_index`` is
  ``steps − int(steps × strength)`` of ``num_steps = steps``, and the scheduler's begin index is set
  there, so UniPC's multistep state sees exactly the pipeline's trimmed schedule;
- the **steps** are text-to-video's (the same core, shards and pools); the decode too.

Two-expert Wan 2.2 models run the trimmed schedule on whichever expert owns each step, as for
text-to-video; diffusers' V2V pipeline has no two-expert form, so only one expert is checked
against it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, ClassVar

import torch

from farm.render.conditioning import Conditioning, VideoConditioning
from farm.render.engine import ModelLayout, TextEncoderStage, encode_normalized, make_scheduler, pick_device
from farm.render.families.wan import WanTextToVideo
from farm.render.registry import VIDEO_FAMILIES, check_strength
from farm.render.source import last_frame, source_clip

if TYPE_CHECKING:
    from PIL import Image

    from farm.render.denoise import DenoiseState
    from farm.render.registry import ModelSpec, RenderParams


def trimmed_start(steps: int, strength: float) -> int:
    """The first step a video-to-video run takes: ``steps − int(steps × strength)`` (the pipeline's rule)."""
    return steps - min(int(steps * check_strength(strength, steps)), steps)


class VideoEncoderStage:
    """Prompt + source MP4 → :class:`VideoConditioning`, as ``WanVideoToVideoPipeline`` prepares them.

    UMT5 runs in the spec's dtype, the VAE in float32 (as the decoder holds it), both on ``device``;
    the source latents come out float32 on CPU. The cost is a copy of the VAE on each encoder replica.
    """

    def __init__(self, spec: "ModelSpec", device: str | None = None) -> None:
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor

        self.spec = spec
        self.text = TextEncoderStage(spec, device=device)
        self.device = pick_device(device)
        self.dtype = self.text.dtype
        self.vae = AutoencoderKLWan.from_pretrained(spec.path, subfolder="vae", torch_dtype=torch.float32)
        self.vae = self.vae.to(self.device).eval()
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)

    def source_frames(self, params: "RenderParams", source: bytes) -> list["Image.Image"]:
        """The frames that condition the render: the source resampled to the clip (``"clip"``), or its last
        frame held for the whole clip (``"last"``, extensions); ValueError for bytes that are not a video."""
        count = self.spec.num_frames(params.seconds)
        if params.source_frames == "last":
            return [last_frame(source, params.width, params.height)] * count
        return source_clip(source, params.width, params.height, count)

    def encode_job(self, params: "RenderParams", source: bytes | None = None) -> VideoConditioning:
        """The job's conditioning from its prompt and source clip; ValueError without a source or strength."""
        if source is None or params.strength is None:
            raise ValueError(f"video: a video-to-video job of model {self.spec.id!r} needs a source clip and a strength")
        frames = self.source_frames(params, source)
        text = self.text.encode(params.prompt)
        return VideoConditioning(text.prompt_embeds, text.negative_prompt_embeds,
                                 source_latents=self.encode_frames(frames, params.height, params.width))

    @torch.no_grad()
    def encode_frames(self, frames: list["Image.Image"], height: int, width: int) -> torch.Tensor:
        """The normalized VAE latents (the mode: no randomness) of ``frames``, float32 on CPU."""
        video = self.video_processor.preprocess_video(frames, height=height, width=width)
        return encode_normalized(self.vae, video.to(self.device, torch.float32)).to("cpu", torch.float32)


class WanVideoToVideo(WanTextToVideo):
    """``WanVideoToVideoPipeline``'s layout: text-to-video's transformer and steps, a noised source as the start."""

    name: ClassVar[str] = "wan-v2v"
    # The served models' families this one runs on: the same saved T2V model loads as V2V.
    runs_on: ClassVar[frozenset[str]] = VIDEO_FAMILIES

    def load_encoder(self, spec: "ModelSpec", device: str | None = None) -> VideoEncoderStage:
        return VideoEncoderStage(spec, device=device)

    def initial_state(
        self, spec: "ModelSpec", params: "RenderParams", conditioning: Conditioning, *, device: str = "cpu"
    ) -> "DenoiseState":
        """The source latents noised to the strength's first timestep, the state at that step.

        ValueError for a conditioning without source latents, or one whose latents do not have the
        clip's latent shape.
        """
        from diffusers.utils.torch_utils import randn_tensor

        from farm.render.denoise import DenoiseState, _export_scheduler

        source = getattr(conditioning, "source_latents", None)
        if source is None or params.strength is None:
            raise ValueError(f"family {self.name!r} needs a VideoConditioning with source latents and a strength")
        layout = ModelLayout.read(spec.path)
        shape = layout.latent_shape(params, spec.num_frames(params.seconds))
        if tuple(source.shape) != tuple(shape):
            raise ValueError(f"source latents have shape {tuple(source.shape)}, the clip needs {tuple(shape)}")
        start = trimmed_start(params.steps, params.strength)
        target = torch.device(device)

        # 1. The model's full schedule (UniPC's order and final-step rules depend on its length).
        scheduler = copy.deepcopy(make_scheduler(spec, params.scheduler))
        scheduler.set_timesteps(params.steps, device=target)
        first = scheduler.timesteps[start * scheduler.order:][:1]

        # 2. Noise from the seed, then the source noised to the first timestep that runs.
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        noise = randn_tensor(shape, generator=generator, device=target, dtype=torch.float32)
        source = source.to(target, torch.float32)
        if hasattr(scheduler, "add_noise"):
            latents = scheduler.add_noise(source, noise, first)
        else:  # flow-match Euler
            latents = scheduler.scale_noise(source, first, noise)

        # 3. The state starts at that step; the scheduler begins there (what the pipeline's first
        #    step finds by looking its timestep up).
        scheduler.set_begin_index(start)
        boundary = None
        if layout.boundary_ratio is not None:
            boundary = float(layout.boundary_ratio * scheduler.config.num_train_timesteps)
        class_name, config, state = _export_scheduler(scheduler, target)
        return DenoiseState(
            latents=latents,
            scheduler_class=class_name,
            scheduler_config=config,
            scheduler_state=state,
            step_index=start,
            num_steps=len(scheduler.timesteps),
            guidance_scale=float(spec.guidance_scale),
            guidance_scale_2=float(spec.guidance_scale if spec.guidance_scale_2 is None else spec.guidance_scale_2),
            boundary_timestep=boundary,
            conditioning=conditioning,
            generator_state=generator.get_state(),
        )
