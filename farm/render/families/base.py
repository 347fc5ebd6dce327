"""What a model family provides, so the step-sharded core, the pools and the finisher stay family-agnostic.

A family is the part of a diffusers pipeline that differs between model layouts:

1. **conditioning** — an encoder stage that turns a request (the prompt; for image-to-video also
   the reference image) into the job's :class:`~farm.render.conditioning.Conditioning`, once per job;
2. **the initial state** — schedule set and noise drawn from the seed (a :class:`DenoiseState`);
3. **one denoising step** — the transformer call(s) with classifier-free guidance for that layout,
   then ``scheduler.step``;
4. **decode** — a decoder stage from the final state to a :class:`DecodedClip`: uint8 frames, and
   for a family that makes sound (LTX-2) the waveform.

Everything else — cutting steps into shards (:func:`~farm.render.denoise.plan_shards`), running a
step range on whatever expert a replica holds (:func:`~farm.render.denoise.denoise`), moving states
between devices and processes, checkpoints, the pools and the finisher — knows nothing of the family.
The state names its family through its conditioning's class, so a denoiser finds the step to run
from the state it is handed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from farm.render.conditioning import Conditioning
    from farm.render.denoise import DenoiseState
    from farm.render.registry import ModelSpec, RenderParams


class JobEncoder(Protocol):
    """An encoder stage: one request → the job's conditioning, on CPU."""

    device: str

    def encode_job(self, params: "RenderParams", image: "Image.Image | None" = None) -> "Conditioning":
        """The conditioning for ``params`` (and the reference ``image`` where the family takes one);
        ValueError when an image is missing for a family that needs one, or given to one that takes none."""
        ...


class FrameDecoder(Protocol):
    """A decoder stage: final latents → uint8 RGB frames ``(F, H, W, 3)`` on CPU."""

    device: str

    def decode(self, latents: torch.Tensor) -> "np.ndarray": ...


@dataclass(frozen=True)
class DecodedClip:
    """What a decoder stage hands the finisher: the frames, and the audio where the model makes it.

    ``frames`` is uint8 RGB ``(F, H, W, 3)``; ``audio`` float32 ``(channels, samples)`` in [-1, 1] at
    ``sample_rate`` Hz, or None for a model without audio. The audio is as long as the vocoder made it;
    the finisher fits it to the video's duration.
    """

    frames: "np.ndarray"
    audio: "np.ndarray | None" = None
    sample_rate: int | None = None


@dataclass(frozen=True)
class StepContext:
    """Where the loop is, for one step: what a family's step needs besides the model and tensors."""

    index: int  # the step's index in the schedule
    timestep: torch.Tensor  # the scheduler's t for this step, on the model's device
    sigma: float
    num_steps: int
    guidance: float  # the guidance scale of the expert that runs this step

    def cache(self) -> dict:
        """The keyword arguments of diffusers' ``cache_context`` (for FirstBlockCache, MagCache, …)."""
        return {"step_index": self.index, "sigma": self.sigma, "num_inference_steps": self.num_steps}


class Family(ABC):
    """One model layout's encode, initial state, step and decode."""

    name: ClassVar[str]
    takes_image: ClassVar[bool] = False
    # Served models' families (``ModelSpec.family``) whose weights this family also runs on, besides its
    # own name: Wan video-to-video runs on a ``wan`` text-to-video model.
    runs_on: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def load_encoder(self, spec: "ModelSpec", device: str | None = None) -> JobEncoder:
        """The encoder stage for ``spec``, its weights loaded with ``from_pretrained`` on ``device``."""

    @abstractmethod
    def load_transformer(self, spec: "ModelSpec", subfolder: str, dtype: torch.dtype) -> torch.nn.Module:
        """One expert (``transformer`` or ``transformer_2``) in ``dtype``, on CPU, in eval mode."""

    @abstractmethod
    def load_decoder(self, spec: "ModelSpec", device: str | None = None) -> FrameDecoder:
        """The decoder stage for ``spec`` on ``device``."""

    def decode_clip(self, decoder: FrameDecoder, state: "DenoiseState") -> DecodedClip:
        """The final ``state`` decoded by this family's ``decoder``: the frames (Wan: no audio)."""
        return DecodedClip(decoder.decode(state.latents))

    @abstractmethod
    def initial_state(
        self, spec: "ModelSpec", params: "RenderParams", conditioning: "Conditioning", *, device: str = "cpu"
    ) -> "DenoiseState":
        """The job's state before step 0 on ``device``: schedule set, noise drawn from ``params.seed``."""

    @abstractmethod
    def predict(
        self, model: torch.nn.Module, latents: torch.Tensor, cond: "Conditioning", ctx: StepContext
    ) -> torch.Tensor:
        """The guided model output for one step: the transformer call(s) and classifier-free guidance."""

    def step(
        self,
        model: torch.nn.Module,
        scheduler,
        latents: torch.Tensor,
        cond: "Conditioning",
        ctx: StepContext,
        step_kwargs: dict,
    ) -> torch.Tensor:
        """One denoising step, x_t → x_{t-1}: :meth:`predict`, then ``scheduler.step``.

        The result keeps ``latents``' dtype: flow-match Euler returns the model's dtype, and casting
        back keeps one latent dtype across steps and shards (lossless: the next step upcasts anyway).
        """
        return self.after_step(advance(scheduler, self.predict(model, latents, cond, ctx), latents, ctx, step_kwargs),
                               cond)

    def after_step(self, latents: torch.Tensor, cond: "Conditioning") -> torch.Tensor:
        """The latents after ``scheduler.step``, as the family keeps them between steps (unchanged here;
        Wan TI2V pins the first frame to the image's latents)."""
        return latents

    def predict_batch(
        self,
        model: torch.nn.Module,
        latents: "list[torch.Tensor]",
        conds: "list[Conditioning]",
        ctxs: "list[StepContext]",
    ) -> "list[torch.Tensor]":
        """The guided model outputs of several jobs' steps on one model (each with its own latents,
        conditioning, timestep and guidance). This default runs :meth:`predict` per job; a family that
        can stack jobs into one forward pass overrides it, with the same results per job."""
        return [self.predict(model, lat, cond, ctx) for lat, cond, ctx in zip(latents, conds, ctxs)]


def advance(scheduler, noise_pred: torch.Tensor, latents: torch.Tensor, ctx: StepContext, step_kwargs: dict) -> torch.Tensor:
    """``scheduler.step`` from x_t to x_{t-1} with the guided prediction, in ``latents``' dtype."""
    return scheduler.step(noise_pred, ctx.timestep, latents, return_dict=False, **step_kwargs)[0].to(latents.dtype)
