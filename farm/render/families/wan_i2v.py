"""Wan 2.1 image-to-video: a reference image pins the first frame of the clip.

What ``WanImageToVideoPipeline`` does before its loop happens once per job in the encoder stage
(:class:`ImageEncoderStage`): the prompt embeddings (UMT5, as for text-to-video), the image
embeddings (CLIP vision, penultimate hidden state), and the 20-channel condition — a first-frame
mask plus the VAE latents of the image followed by black frames. Every step then concatenates the
condition to the latents (16 + 20 = 36 transformer input channels) and gives the transformer the
image embeddings for its image cross-attention; the scheduler, the noise and the decode are
text-to-video's.

The VAE encode runs in the encoder stage, not the decode pool: the condition is a per-job
constant every shard needs before step 0, so computing it where the job starts keeps the
denoisers holding only transformers and the decode pool doing only the final decode, with no extra
round trip through another pool at job start. The cost is a second copy of the VAE (float32, as
the decoder holds it) on each encoder replica.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from farm.render.conditioning import Conditioning, ImageConditioning
from farm.render.engine import ModelLayout, TextEncoderStage, encode_normalized, pick_device
from farm.render.families.wan import WanTextToVideo
from farm.render.reference import fit_reference

if TYPE_CHECKING:
    from PIL import Image

    from farm.render.registry import ModelSpec, RenderParams


class ImageEncoderStage:
    """Prompt + reference image → :class:`ImageConditioning`, as ``WanImageToVideoPipeline`` prepares it.

    UMT5 runs in the spec's dtype; the CLIP image encoder and the VAE run in float32 (as diffusers'
    Wan I2V examples load them), all on ``device``. The image embeddings come out in the spec's
    dtype and the condition in float32 (the latents' dtype), on CPU.
    """

    def __init__(self, spec: "ModelSpec", device: str | None = None) -> None:
        from diffusers import AutoencoderKLWan, DiffusionPipeline
        from diffusers.video_processor import VideoProcessor
        from transformers import CLIPImageProcessor, CLIPVisionModel

        self.spec = spec
        self.text = TextEncoderStage(spec, device=device)
        self.device = pick_device(device)
        self.dtype = self.text.dtype
        self.layout = ModelLayout.read(spec.path)
        index = DiffusionPipeline.load_config(spec.path)
        self.image_encoder = None
        self.image_processor = None
        if (index.get("image_encoder") or [None])[0] is not None:  # Wan 2.2 A14B I2V has none
            self.image_processor = CLIPImageProcessor.from_pretrained(spec.path, subfolder="image_processor")
            self.image_encoder = (
                CLIPVisionModel.from_pretrained(spec.path, subfolder="image_encoder", dtype=torch.float32)
                .to(self.device)
                .eval()
            )
        self.vae = AutoencoderKLWan.from_pretrained(spec.path, subfolder="vae", torch_dtype=torch.float32)
        self.vae = self.vae.to(self.device).eval()
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)

    def encode_job(self, params: "RenderParams", image: "Image.Image | None" = None) -> ImageConditioning:
        """The job's conditioning from its prompt and reference image (fitted to the requested size by
        :func:`farm.render.reference.fit_reference`); ValueError without an image."""
        if image is None:
            raise ValueError(f"input_reference: model {self.spec.id!r} renders from an image; send one")
        frame = fit_reference(image, params.width, params.height)
        text = self.text.encode(params.prompt)
        return ImageConditioning(
            text.prompt_embeds,
            text.negative_prompt_embeds,
            condition=self.condition(frame, params),
            image_embeds=self.embed_image(frame),
        )

    @torch.no_grad()
    def embed_image(self, frame: "Image.Image") -> torch.Tensor | None:
        """CLIP's penultimate hidden state for ``frame``, in the spec's dtype on CPU (None without an encoder)."""
        if self.image_encoder is None:
            return None
        inputs = self.image_processor(images=frame, return_tensors="pt").to(self.device)
        hidden = self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
        return hidden.to("cpu", self.dtype)

    @torch.no_grad()
    def condition(self, frame: "Image.Image", params: "RenderParams") -> torch.Tensor:
        """The first-frame mask and the normalized VAE latents of ``frame`` then black frames, float32 on CPU."""
        height, width = params.height, params.width
        num_frames = self.spec.num_frames(params.seconds)
        ratio = self.layout.scale_temporal

        # 1. The image as the first of num_frames frames, the rest zeros (mid-gray in [-1, 1]).
        pixels = self.video_processor.preprocess(frame, height=height, width=width).to(self.device, torch.float32)
        video = torch.cat([pixels.unsqueeze(2), pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        latents = encode_normalized(self.vae, video)  # the mode, not a sample: no randomness here

        # 2. The mask: 1 on the pixel frame the image pins, 0 elsewhere. The VAE folds the first frame
        #    alone and then groups of `ratio`, so the first frame's mask is repeated `ratio` times and
        #    the whole mask folded into `ratio` channels per latent frame.
        latent_h, latent_w = latents.shape[-2:]
        mask = torch.zeros(1, 1, num_frames, latent_h, latent_w, device=latents.device)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(ratio, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, -1, ratio, latent_h, latent_w).transpose(1, 2)
        return torch.cat([mask, latents], dim=1).to("cpu", torch.float32)


class WanImageToVideo(WanTextToVideo):
    """``WanImageToVideoPipeline``'s 2.1 layout: 36-channel transformer input, image cross-attention."""

    name: ClassVar[str] = "wan-i2v"
    takes_image: ClassVar[bool] = True

    def load_encoder(self, spec: "ModelSpec", device: str | None = None) -> ImageEncoderStage:
        return ImageEncoderStage(spec, device=device)

    def model_input(self, model: torch.nn.Module, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The latents with the image condition concatenated on the channels, in the model's dtype."""
        if not isinstance(cond, ImageConditioning):
            raise ValueError(f"family {self.name!r} needs an ImageConditioning, got {type(cond).__name__}")
        return torch.cat([latents, cond.condition.to(latents)], dim=1).to(model.dtype)

    def model_kwargs(self, model: torch.nn.Module, cond: Conditioning) -> dict:
        """The image embeddings for both guidance passes (the pipeline guides on the text only)."""
        if getattr(cond, "image_embeds", None) is None:
            return {}
        return {"encoder_hidden_states_image": cond.image_embeds.to(model.dtype)}
