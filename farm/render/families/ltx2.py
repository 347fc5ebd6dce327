"""LTX-2: text-to-video with synchronized audio, the video and audio latents denoised together.

``LTX2Pipeline`` runs one transformer over two token streams — video latents and audio latents —
that attend to each other, with a flow-matching Euler scheduler for each (the same sigmas, shifted
by the video's sequence length). The farm's state has one ``latents`` tensor, so this family packs
both streams into it: ``(1, video_tokens × video_channels + audio_frames × audio_channels)``, the
pipeline's packed video tokens flattened, then its packed audio tokens flattened. The split point is
the conditioning's ``geometry``. Flow-match Euler's step is elementwise
(``x + (σ_next − σ) · v``) and both streams share one sigma schedule, so one ``scheduler.step`` on the
packed tensor is exactly the pipeline's two steps; checkpoints, the NaN check, device moves and
serialization stay those of every other family, whose bytes are unchanged.

The stages:

1. **encode** (:class:`LTX2EncoderStage`): Gemma 3's stacked hidden states for the prompt and the
   negative prompt (left padding, ``spec.max_sequence_length`` tokens), through the text connectors
   once for both (as the pipeline runs them) → :class:`AudioVideoConditioning`.
2. **initial state**: the pipeline's sigmas (``linspace(1, 1/N, N)``, shifted by ``mu`` from the
   video sequence length), video noise then audio noise from one CPU generator seeded with the job's
   seed, packed.
3. **step**: one batched transformer call (negative and positive halves, as the pipeline makes it),
   classifier-free guidance in x0 space for each stream with its own scale, the pipeline's guidance
   rescale (0.7), back to velocity. The pipeline's optional spatio-temporal guidance (STG) and
   modality-isolation guidance are not run: the farm's step matches the pipeline called with
   ``stg_scale=0, audio_stg_scale=0, modality_scale=1, audio_modality_scale=1``.
4. **decode** (:class:`LTX2DecoderStage`): the video VAE to frames; the audio VAE to a mel
   spectrogram and the vocoder to a stereo waveform.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from farm.render.conditioning import AudioVideoConditioning, Conditioning
from farm.render.engine import pick_device
from farm.render.families.base import DecodedClip, Family, StepContext

if TYPE_CHECKING:
    from PIL import Image

    from farm.render.denoise import DenoiseState
    from farm.render.registry import ModelSpec, RenderParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LTX2Pipeline's default guidance rescale for both streams (the phi of "Common Diffusion Noise
# Schedules and Sample Steps are Flawed", applied to the guided x0 prediction).
GUIDANCE_RESCALE = 0.7


class LatentGeometry:
    """The shapes that pack and split one job's video and audio latents, read from its conditioning."""

    def __init__(self, geometry: torch.Tensor, video_channels: int, audio_channels: int) -> None:
        self.frames, self.height, self.width, self.audio_frames, self.mel_bins = (int(v) for v in geometry.tolist())
        self.video_channels, self.audio_channels = video_channels, audio_channels
        self.video_tokens = self.frames * self.height * self.width
        self.video_size = self.video_tokens * video_channels

    def split(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed state latents → (video tokens ``(B, S_v, C_v)``, audio tokens ``(B, L, C_a)``)."""
        batch = latents.shape[0]
        video = latents[:, : self.video_size].reshape(batch, self.video_tokens, self.video_channels)
        audio = latents[:, self.video_size :].reshape(batch, self.audio_frames, self.audio_channels)
        return video, audio

    @staticmethod
    def pack(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)


def _audio_downsample() -> int:
    """The audio VAE's fixed time and mel compression (diffusers' module constant; it is not in the config)."""
    from diffusers.models.autoencoders.autoencoder_kl_ltx2_audio import LATENT_DOWNSAMPLE_FACTOR

    return LATENT_DOWNSAMPLE_FACTOR


def _video_ratios(vae_config: dict) -> tuple[int, int]:
    """(spatial, temporal) compression of the video VAE, as ``AutoencoderKLLTX2Video`` derives them."""
    scaled = sum(vae_config.get("spatio_temporal_scaling", (True, True, True, True)))
    spatial = vae_config.get("spatial_compression_ratio") or vae_config.get("patch_size", 4) * 2**scaled
    temporal = vae_config.get("temporal_compression_ratio") or vae_config.get("patch_size_t", 1) * 2**scaled
    return int(spatial), int(temporal)


def latent_geometry(spec: "ModelSpec", params: "RenderParams") -> torch.Tensor:
    """``[latent_frames, latent_height, latent_width, audio_frames, latent_mel_bins]`` for a request, as
    ``LTX2Pipeline.__call__`` computes them (audio frames: the clip's duration × audio latents per second)."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video

    spatial, temporal = _video_ratios(AutoencoderKLLTX2Video.load_config(spec.path, subfolder="vae"))
    audio = AutoencoderKLLTX2Audio.load_config(spec.path, subfolder="audio_vae")
    num_frames = spec.num_frames(params.seconds)
    down = _audio_downsample()
    per_second = audio["sample_rate"] / audio["mel_hop_length"] / float(down)
    audio_frames = round(num_frames / spec.fps * per_second)
    dims = [(num_frames - 1) // temporal + 1, params.height // spatial, params.width // spatial, audio_frames,
            audio["mel_bins"] // down]
    return torch.tensor(dims, dtype=torch.int64)


class LTX2EncoderStage:
    """Prompt → :class:`AudioVideoConditioning`: Gemma 3 and the text connectors on ``device``, in the
    spec's dtype; the conditioning comes back on CPU."""

    def __init__(self, spec: "ModelSpec", device: str | None = None) -> None:
        from diffusers.pipelines.ltx2 import LTX2TextConnectors
        from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

        self.spec = spec
        self.device = pick_device(device)
        self.dtype = _DTYPES[spec.dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path, subfolder="tokenizer")
        self.tokenizer.padding_side = "left"  # Gemma's prompts are left-padded, as the pipeline does
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.text_encoder = (
            Gemma3ForConditionalGeneration.from_pretrained(spec.path, subfolder="text_encoder", dtype=self.dtype)
            .to(self.device)
            .eval()
        )
        self.connectors = (
            LTX2TextConnectors.from_pretrained(spec.path, subfolder="connectors", torch_dtype=self.dtype)
            .to(self.device)
            .eval()
        )

    @property
    def guided(self) -> bool:
        """Whether the job runs classifier-free guidance: either stream's scale above 1, as the pipeline decides."""
        return self.spec.guidance_scale > 1.0 or _audio_guidance(self.spec) > 1.0

    @torch.no_grad()
    def hidden_states(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Gemma's hidden states of every layer, stacked and flattened to ``(1, tokens, hidden × (layers + 1))``,
        and the attention mask."""
        tokens = self.tokenizer(
            [prompt.strip()], padding="max_length", max_length=self.spec.max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return torch.stack(states, dim=-1).flatten(2, 3).to(self.dtype), mask

    @torch.no_grad()
    def encode_job(self, params: "RenderParams", image: "Image.Image | None" = None) -> AudioVideoConditioning:
        """The job's conditioning from its prompt; ValueError when an image is given (LTX-2 here is text-to-video)."""
        if image is not None:
            raise ValueError(f"input_reference: model {self.spec.id!r} renders from text only")
        embeds, mask = self.hidden_states(params.prompt)
        if self.guided:  # negative first, as the pipeline concatenates them
            negative, negative_mask = self.hidden_states(self.spec.negative_prompt)
            embeds, mask = torch.cat([negative, embeds]), torch.cat([negative_mask, mask])
        video, audio, connector_mask = self.connectors(embeds, mask, padding_side=self.tokenizer.padding_side)
        video, audio, connector_mask = video.to("cpu"), audio.to("cpu"), connector_mask.to("cpu")
        index = 1 if self.guided else 0
        return AudioVideoConditioning(
            prompt_embeds=video[index : index + 1],
            negative_prompt_embeds=video[:1] if self.guided else None,
            audio_prompt_embeds=audio[index : index + 1],
            negative_audio_prompt_embeds=audio[:1] if self.guided else None,
            attention_mask=connector_mask[index : index + 1],
            negative_attention_mask=connector_mask[:1] if self.guided else None,
            geometry=latent_geometry(self.spec, params),
            frame_rate=torch.tensor(float(self.spec.fps), dtype=torch.float64),
            audio_guidance_scale=torch.tensor(_audio_guidance(self.spec), dtype=torch.float64),
        )


def _audio_guidance(spec: "ModelSpec") -> float:
    return spec.guidance_scale if spec.audio_guidance_scale is None else spec.audio_guidance_scale


class LTX2DecoderStage:
    """Final packed latents → frames and a stereo waveform: the video VAE (in spatial tiles when the model
    asks for ``vae_tiling``), the audio VAE and the vocoder, float32 on ``device``."""

    def __init__(self, spec: "ModelSpec", device: str | None = None) -> None:
        from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
        from diffusers.pipelines.ltx2 import LTX2Vocoder
        from diffusers.video_processor import VideoProcessor

        self.spec = spec
        self.device = pick_device(device)
        self.dtype = torch.float32
        load = dict(torch_dtype=self.dtype)
        self.vae = AutoencoderKLLTX2Video.from_pretrained(spec.path, subfolder="vae", **load).to(self.device).eval()
        if spec.vae_tiling:
            self.vae.enable_tiling()
        self.audio_vae = AutoencoderKLLTX2Audio.from_pretrained(spec.path, subfolder="audio_vae", **load)
        self.audio_vae = self.audio_vae.to(self.device).eval()
        self.vocoder = LTX2Vocoder.from_pretrained(spec.path, subfolder="vocoder", **load).to(self.device).eval()
        config = LTX2VideoTransformer3DModel.load_config(spec.path, subfolder="transformer")
        self.video_channels, self.audio_channels = config["in_channels"], config["audio_in_channels"]
        self.processor = VideoProcessor(vae_scale_factor=_video_ratios(dict(self.vae.config))[0])

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.output_sampling_rate)

    @torch.no_grad()
    def decode_clip(self, latents: torch.Tensor, cond: AudioVideoConditioning) -> DecodedClip:
        """uint8 frames ``(F, H, W, 3)`` and float32 audio ``(channels, samples)`` on CPU."""
        shape = LatentGeometry(cond.geometry, self.video_channels, self.audio_channels)
        video, audio = shape.split(latents.to(self.device, self.dtype))

        # 1. Video: tokens → (B, C, F, H, W) (patch size 1), denormalized, decoded at timestep 0 where the
        #    VAE is timestep-conditioned (the pipeline's default decode_timestep = decode_noise_scale = 0).
        video = video.reshape(1, shape.frames, shape.height, shape.width, -1).permute(0, 4, 1, 2, 3)
        mean = self.vae.latents_mean.view(1, -1, 1, 1, 1).to(video)
        std = self.vae.latents_std.view(1, -1, 1, 1, 1).to(video)
        video = video * std / self.vae.config.scaling_factor + mean
        timestep = torch.zeros(1, device=self.device, dtype=self.dtype) if self.vae.config.timestep_conditioning else None
        pixels = self.vae.decode(video, timestep, return_dict=False)[0]
        frames = self.processor.postprocess_video(pixels, output_type="np")[0]
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)

        # 2. Audio: denormalized on the packed tokens, (B, L, C × M) → (B, C, L, M), mel → waveform.
        audio = audio * self.audio_vae.latents_std.to(audio) + self.audio_vae.latents_mean.to(audio)
        audio = audio.unflatten(2, (-1, shape.mel_bins)).transpose(1, 2)
        mel = self.audio_vae.decode(audio, return_dict=False)[0]
        waveform = self.vocoder(mel)[0].float().cpu().numpy()
        return DecodedClip(frames, np.ascontiguousarray(waveform, dtype=np.float32), self.sample_rate)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Refused: LTX-2's packed latents split only with their job's geometry (use :meth:`decode_clip`)."""
        raise ValueError("LTX-2 latents decode with their conditioning: use LTX2AudioVideo.decode_clip(decoder, state)")


class LTX2AudioVideo(Family):
    """``LTX2Pipeline``'s layout: one transformer, video and audio latents packed in one state tensor."""

    name: ClassVar[str] = "ltx2"

    def load_encoder(self, spec: "ModelSpec", device: str | None = None) -> LTX2EncoderStage:
        return LTX2EncoderStage(spec, device=device)

    def load_transformer(self, spec: "ModelSpec", subfolder: str, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import LTX2VideoTransformer3DModel

        return LTX2VideoTransformer3DModel.from_pretrained(spec.path, subfolder=subfolder, torch_dtype=dtype).eval()

    def load_decoder(self, spec: "ModelSpec", device: str | None = None) -> LTX2DecoderStage:
        return LTX2DecoderStage(spec, device=device)

    def decode_clip(self, decoder: LTX2DecoderStage, state: "DenoiseState") -> DecodedClip:
        return decoder.decode_clip(state.latents, _checked(state.conditioning))

    def initial_state(
        self, spec: "ModelSpec", params: "RenderParams", conditioning: Conditioning, *, device: str = "cpu"
    ) -> "DenoiseState":
        """The pipeline's shifted sigmas and its noise: the video's ``(1, C, F, H, W)`` then the audio's
        ``(1, C_a, L, M)`` from one generator seeded with ``params.seed``, each packed to tokens."""
        from diffusers import FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel
        from diffusers.utils.torch_utils import randn_tensor

        from farm.render.denoise import prepare_state

        cond = _checked(conditioning)
        config = LTX2VideoTransformer3DModel.load_config(spec.path, subfolder="transformer")
        channels, audio_channels = config["in_channels"], config["audio_in_channels"]
        shape = LatentGeometry(cond.geometry, channels, audio_channels)
        latent_audio_channels = audio_channels // shape.mel_bins

        def draw(generator: torch.Generator, on: torch.device) -> torch.Tensor:
            video = randn_tensor((1, channels, shape.frames, shape.height, shape.width), generator=generator,
                                 device=on, dtype=torch.float32)
            audio = randn_tensor((1, latent_audio_channels, shape.audio_frames, shape.mel_bins), generator=generator,
                                 device=on, dtype=torch.float32)
            # (B, C, F, H, W) → (B, F·H·W, C) and (B, C, L, M) → (B, L, C·M): the pipeline's packing (patch 1).
            return LatentGeometry.pack(video.flatten(2).transpose(1, 2), audio.transpose(1, 2).flatten(2, 3))

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(spec.path, subfolder="scheduler")
        if scheduler.config.get("stochastic_sampling"):
            # Its step draws noise of the packed shape, not the pipeline's two draws: refuse, never differ.
            raise ValueError(f"model {spec.id!r}: a stochastic_sampling scheduler is not supported for family 'ltx2'")
        sigmas = np.linspace(1.0, 1.0 / params.steps, params.steps)
        return prepare_state(
            scheduler,
            cond,
            latent_shape=(1, shape.video_size + shape.audio_frames * audio_channels),
            num_steps=params.steps,
            seed=params.seed,
            guidance_scale=spec.guidance_scale,
            device=device,
            schedule={"sigmas": sigmas, "mu": _shift(scheduler.config, shape.video_tokens)},
            draw=draw,
        )

    def predict(
        self, model: torch.nn.Module, latents: torch.Tensor, cond: Conditioning, ctx: StepContext
    ) -> torch.Tensor:
        """The guided velocity of both streams, packed like the latents."""
        cond = _checked(cond)
        shape = LatentGeometry(cond.geometry, model.config.in_channels, model.config.audio_in_channels)
        video, audio = shape.split(latents)
        guided = cond.negative_prompt_embeds is not None

        def doubled(tensor: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
            return torch.cat([negative, tensor]) if guided else tensor

        # 1. One call for the negative and positive halves, as the pipeline batches them.
        video_in = doubled(video, video).to(model.dtype)
        audio_in = doubled(audio, audio).to(model.dtype)
        mask = doubled(cond.attention_mask, cond.negative_attention_mask)
        timestep = ctx.timestep.expand(video_in.shape[0])
        with model.cache_context("cond_uncond", **ctx.cache()):
            v_video, v_audio = model(
                hidden_states=video_in,
                audio_hidden_states=audio_in,
                encoder_hidden_states=doubled(cond.prompt_embeds, cond.negative_prompt_embeds).to(model.dtype),
                audio_encoder_hidden_states=doubled(cond.audio_prompt_embeds, cond.negative_audio_prompt_embeds)
                .to(model.dtype),
                timestep=timestep,
                sigma=timestep,
                encoder_attention_mask=mask,
                audio_encoder_attention_mask=mask,
                num_frames=shape.frames,
                height=shape.height,
                width=shape.width,
                fps=float(cond.frame_rate),
                audio_num_frames=shape.audio_frames,
                use_cross_timestep=True,  # the pipeline's default (the forward's own is False)
                return_dict=False,
            )

        # 2. Guidance in x0 space (x0 = x − σ·v), each stream with its scale, then the pipeline's rescale
        #    (which it applies with or without guidance: rescaling x0 to its own std is the identity up to
        #    rounding, kept so the arithmetic is the pipeline's to the bit); back to velocity.
        sigma = ctx.sigma
        out = []
        for sample, velocity, scale in ((video, v_video, ctx.guidance), (audio, v_audio, float(cond.audio_guidance_scale))):
            velocity = velocity.float()
            if guided:
                v_uncond, v_cond = velocity.chunk(2)
                x0, x0_uncond = sample - v_cond * sigma, sample - v_uncond * sigma
                x0_guided = x0 + (scale - 1) * (x0 - x0_uncond)
            else:
                x0 = x0_guided = sample - velocity * sigma
            out.append((sample - _rescale(x0_guided, x0)) / sigma)
        return LatentGeometry.pack(*out)


def _rescale(guided: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """Guidance rescale: the guided prediction scaled to the conditional one's per-sample std, mixed by
    :data:`GUIDANCE_RESCALE` (what diffusers' ``rescale_noise_cfg`` does)."""
    dims = list(range(1, conditional.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return GUIDANCE_RESCALE * (guided * ratio) + (1 - GUIDANCE_RESCALE) * guided


def _shift(config, sequence_length: int) -> float:
    """The schedule shift ``mu`` for a video of ``sequence_length`` tokens: linear between the scheduler's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the pipeline computes it."""
    base_len, max_len = config.get("base_image_seq_len", 1024), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.95), config.get("max_shift", 2.05)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return sequence_length * slope + base_shift - slope * base_len


def _checked(cond: Conditioning) -> AudioVideoConditioning:
    if not isinstance(cond, AudioVideoConditioning):
        raise ValueError(f"family 'ltx2' needs an AudioVideoConditioning, got {type(cond).__name__}")
    return cond
