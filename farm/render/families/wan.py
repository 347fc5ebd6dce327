"""Wan text-to-video (2.1, and 2.2 A14B with two experts): the family the farm served first.

Its stages are the ones in :mod:`farm.render.engine` (UMT5 text encoder, Wan VAE decoder); its
step is ``WanPipeline.__call__``'s loop body: the conditional prediction, the unconditional one
when guidance is on, the guided mix, then ``scheduler.step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from farm.render.conditioning import Conditioning
from farm.render.engine import DecoderStage, ModelLayout, TextEncoderStage, make_scheduler
from farm.render.families.base import Family, StepContext

if TYPE_CHECKING:
    from farm.render.denoise import DenoiseState
    from farm.render.registry import ModelSpec, RenderParams


class WanTextToVideo(Family):
    """``WanPipeline``'s layout: 16-channel latents, text cross-attention only."""

    name: ClassVar[str] = "wan"

    def load_encoder(self, spec: "ModelSpec", device: str | None = None) -> TextEncoderStage:
        return TextEncoderStage(spec, device=device)

    def load_transformer(self, spec: "ModelSpec", subfolder: str, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(spec.path, subfolder=subfolder, torch_dtype=dtype).eval()

    def load_decoder(self, spec: "ModelSpec", device: str | None = None) -> DecoderStage:
        return DecoderStage(spec, device=device)

    def initial_state(
        self, spec: "ModelSpec", params: "RenderParams", conditioning: Conditioning, *, device: str = "cpu"
    ) -> "DenoiseState":
        """Float32 noise of the VAE's latent shape from a CPU generator seeded with ``params.seed``,
        as ``WanPipeline`` and ``WanImageToVideoPipeline`` both draw it."""
        from farm.render.denoise import prepare_state

        layout = ModelLayout.read(spec.path)
        return prepare_state(
            make_scheduler(spec, params.scheduler),
            conditioning,
            latent_shape=layout.latent_shape(params, spec.num_frames(params.seconds)),
            num_steps=params.steps,
            seed=params.seed,
            guidance_scale=spec.guidance_scale,
            guidance_scale_2=spec.guidance_scale_2,
            boundary_ratio=layout.boundary_ratio,
            device=device,
        )

    def model_input(self, model: torch.nn.Module, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """What the transformer's ``hidden_states`` are: the latents themselves, in the model's dtype."""
        return latents.to(model.dtype)

    def model_kwargs(self, model: torch.nn.Module, cond: Conditioning) -> dict:
        """Keyword arguments both guidance passes share beyond the text (none for text-to-video)."""
        return {}

    def model_timestep(self, model: torch.nn.Module, latents: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The transformer's ``timestep``: the step's t for each batch row."""
        return ctx.timestep.expand(latents.shape[0])

    def predict(
        self, model: torch.nn.Module, latents: torch.Tensor, cond: Conditioning, ctx: StepContext
    ) -> torch.Tensor:
        model_input = self.model_input(model, latents, cond)
        timestep = self.model_timestep(model, latents, ctx)
        shared = self.model_kwargs(model, cond)
        cache = ctx.cache()

        # Conditional prediction, then the unconditional one for classifier-free guidance.
        with model.cache_context("cond", **cache):
            noise_pred = model(
                hidden_states=model_input,
                timestep=timestep,
                encoder_hidden_states=cond.prompt_embeds.to(model.dtype),
                return_dict=False,
                **shared,
            )[0]
        if cond.negative_prompt_embeds is not None:
            with model.cache_context("uncond", **cache):
                noise_uncond = model(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=cond.negative_prompt_embeds.to(model.dtype),
                    return_dict=False,
                    **shared,
                )[0]
            noise_pred = noise_uncond + ctx.guidance * (noise_pred - noise_uncond)
        return noise_pred

    def predict_batch(
        self,
        model: torch.nn.Module,
        latents: list[torch.Tensor],
        conds: list[Conditioning],
        ctxs: list[StepContext],
    ) -> list[torch.Tensor]:
        """Several jobs' steps in one forward pass: every job's conditional row, then the unconditional
        row of each job that guides, stacked on the batch axis, each row with its own timestep.

        Each job's output is its rows of the batched output, guided with its own scale: the same
        arithmetic as :meth:`predict` (rows of a batch never mix in the transformer), so equal to it
        up to the float rounding of larger matrix products. Jobs whose extra inputs differ in kind
        (one has image embeddings, another not) run one by one.
        """
        shared = [self.model_kwargs(model, cond) for cond in conds]
        if len(latents) < 2 or any(kw.keys() != shared[0].keys() for kw in shared):
            return super().predict_batch(model, latents, conds, ctxs)
        inputs = [self.model_input(model, lat, cond) for lat, cond in zip(latents, conds)]
        guided = [i for i, cond in enumerate(conds) if cond.negative_prompt_embeds is not None]
        rows = list(range(len(latents))) + guided  # conditional rows first, then unconditional ones
        texts = [cond.prompt_embeds for cond in conds] + [conds[i].negative_prompt_embeds for i in guided]
        out = model(
            hidden_states=torch.cat([inputs[i] for i in rows]),
            timestep=torch.cat([self.model_timestep(model, latents[i], ctxs[i]) for i in rows]),
            encoder_hidden_states=torch.cat(texts).to(model.dtype),
            return_dict=False,
            **{key: torch.cat([shared[i][key] for i in rows]) for key in shared[0]},
        )[0]
        parts = list(out.split([inputs[i].shape[0] for i in rows]))
        preds = parts[: len(latents)]
        for uncond, i in zip(parts[len(latents):], guided):
            preds[i] = uncond + ctxs[i].guidance * (preds[i] - uncond)
        return preds
