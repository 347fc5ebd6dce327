"""Wan 2.2 TI2V image-to-video (the 5B model's layout): the reference image *is* the first latent frame.

``WanImageToVideoPipeline`` with ``expand_timesteps`` (Wan 2.2 TI2V-5B) conditions differently from the
2.1 layout (:mod:`farm.render.families.wan_i2v`): no image encoder and no extra input channels. The
encoder stage VAE-encodes the image alone (one latent frame); every step then feeds the transformer
the latents with their first frame replaced by the image's latents, and gives that frame's tokens
timestep 0 (every other token the step's t), so the model treats it as already clean. After the loop
the pipeline writes the image's latents into the first frame; this family does it after every step
(:meth:`WanFirstFrameImageToVideo.after_step`), so a state handed between shards, checkpointed or
decoded is always the pipeline's state. Writing it each step leaves every other element where the
pipeline's would be: the schedulers update elementwise and the transformer never sees the frame's
own latents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from farm.render.conditioning import Conditioning, FirstFrameConditioning
from farm.render.engine import encode_normalized
from farm.render.families.base import StepContext
from farm.render.families.wan import WanTextToVideo
from farm.render.families.wan_i2v import ImageEncoderStage
from farm.render.reference import fit_reference

if TYPE_CHECKING:
    from PIL import Image

    from farm.render.registry import ModelSpec, RenderParams


class FirstFrameEncoderStage(ImageEncoderStage):
    """Prompt + reference image → :class:`FirstFrameConditioning`: UMT5 as for text-to-video, and the
    VAE (float32) encoding the fitted image alone, normalized as the pipeline's ``prepare_latents``."""

    def encode_job(self, params: "RenderParams", image: "Image.Image | None" = None) -> FirstFrameConditioning:
        if image is None:
            raise ValueError(f"input_reference: model {self.spec.id!r} renders from an image; send one")
        frame = fit_reference(image, params.width, params.height)
        text = self.text.encode(params.prompt)
        return FirstFrameConditioning(text.prompt_embeds, text.negative_prompt_embeds,
                                      first_frame=self.first_frame(frame, params))

    @torch.no_grad()
    def first_frame(self, frame: "Image.Image", params: "RenderParams") -> torch.Tensor:
        """The normalized VAE latents (the mode: no randomness) of ``frame``, ``(1, z_dim, 1, h, w)`` float32 on CPU."""
        pixels = self.video_processor.preprocess(frame, height=params.height, width=params.width)
        pixels = pixels.to(self.device, torch.float32).unsqueeze(2)
        return encode_normalized(self.vae, pixels).to("cpu", torch.float32)


def _first_frame_of(cond: Conditioning) -> torch.Tensor:
    if not isinstance(cond, FirstFrameConditioning):
        raise ValueError(f"family 'wan-ti2v' needs a FirstFrameConditioning, got {type(cond).__name__}")
    return cond.first_frame


class WanFirstFrameImageToVideo(WanTextToVideo):
    """``WanImageToVideoPipeline``'s ``expand_timesteps`` layout (Wan 2.2 TI2V-5B): 16-channel input (the
    VAE's channels), the image's latents as the first frame, per-token timesteps."""

    name: ClassVar[str] = "wan-ti2v"
    takes_image: ClassVar[bool] = True

    def load_encoder(self, spec: "ModelSpec", device: str | None = None) -> FirstFrameEncoderStage:
        return FirstFrameEncoderStage(spec, device=device)

    def model_input(self, model: torch.nn.Module, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The latents with their first frame replaced by the image's, in the model's dtype (exactly the
        pipeline's ``(1 - mask) * condition + mask * latents`` with its 0/1 mask)."""
        first = _first_frame_of(cond).to(latents).expand(latents.shape[0], -1, -1, -1, -1)
        return torch.cat([first, latents[:, :, 1:]], dim=2).to(model.dtype)

    def model_timestep(self, model: torch.nn.Module, latents: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``(batch, tokens)``: 0 for the first frame's tokens, the step's t for the rest; one token per
        patch of the transformer's ``patch_size``, frames outermost, as it flattens them."""
        p_t, p_h, p_w = model.config.patch_size
        frames, height, width = latents.shape[2] // p_t, latents.shape[3] // p_h, latents.shape[4] // p_w
        # float32 like the pipeline's mask, so t (int64 for UniPC) becomes float32 as it does there.
        mask = torch.ones(frames, height, width, dtype=torch.float32, device=ctx.timestep.device)
        mask[0] = 0
        return (mask * ctx.timestep).flatten().unsqueeze(0).expand(latents.shape[0], -1)

    def after_step(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The first latent frame set to the image's, as the pipeline sets it after its loop."""
        pinned = latents.clone()
        pinned[:, :, :1] = _first_frame_of(cond).to(latents)
        return pinned
