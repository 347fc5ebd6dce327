"""Render stages, each loading only the weights it needs through ``from_pretrained``.

A text-encoder replica holds the tokenizer and UMT5; a denoiser replica holds one
or both experts; the decoder holds the VAE. These are the Wan stages; a model family
(:mod:`farm.render.families`) picks its encoder, transformer class, initial state and
decoder, and may bring stages of its own (Wan image-to-video's encoder also holds the
image encoder and the VAE). The same code loads a tiny local model
and ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` — only ``ModelSpec.path`` differs.

Each stage names its device and dtype (``stage.device``, ``stage.dtype``):

- ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``…, or None / ``"auto"`` for the current CUDA
  device when CUDA is available, else CPU (:func:`pick_device`). It is stored resolved,
  e.g. ``"cuda:0"``.
- ``dtype``: ``ModelSpec.dtype`` for the text encoder and the experts; the Wan VAE always
  runs in float32, as diffusers' Wan examples load it.
- What crosses a stage boundary is on CPU: the encoder's :class:`Conditioning` (in the
  spec's dtype), the denoiser's states (float32 latents) unless ``keep_on_device=True``,
  and the decoder's uint8 frames (numpy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from farm import env
from farm.render.denoise import (
    HIGH_NOISE_EXPERT,
    LOW_NOISE_EXPERT,
    Conditioning,
    DenoiseState,
    StepCallback,
    denoise,
)
from farm.render import accel
from farm.render.registry import ModelSpec, RenderParams, parse_size

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure_torch() -> None:
    """Set this process's torch threads: ``FARM_TORCH_THREADS`` when set (one per replica is far faster
    on a shared 2-core box), else the CPUs Ray reserved for this replica (``num_cpus``, at least one),
    so a replica given 8 CPUs on a cluster node computes on 8 threads and one given 0.1 on one. Outside
    Ray (the in-process CLI paths) torch's own default stays."""
    threads = env.torch_threads() or _ray_cpus()
    if threads:
        torch.set_num_threads(threads)


def _ray_cpus() -> int | None:
    """Whole CPUs Ray assigned to the current actor (at least 1), or None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - no Ray, or not in a worker: keep torch's default
        return None
    return None if assigned is None else max(1, int(assigned))


def pick_device(device: str | None = None) -> str:
    """Resolve a stage's device name: None or "auto" is the current CUDA device when CUDA is
    available, else "cpu"; a bare "cuda" becomes "cuda:N" for the current device.

    ValueError for a name torch does not parse, or a CUDA device this process cannot see.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device; use cpu, cuda, cuda:N or auto") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asks for CUDA, but CUDA is not available in this process")
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} does not exist; this process sees {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    return str(parsed)


def pick_attention_backend(device: str) -> str:
    """xformers on CUDA when installed (the ``gpu`` extra), torch SDPA ('native') otherwise."""
    if device.startswith("cuda"):
        try:
            import xformers  # noqa: F401
        except ImportError:
            return "native"
        return "xformers"
    return "native"


@dataclass(frozen=True)
class ModelLayout:
    """What a saved pipeline contains, read from its ``model_index.json``."""

    experts: tuple[str, ...]
    boundary_ratio: float | None
    latent_channels: int
    scale_spatial: int
    scale_temporal: int

    @classmethod
    def read(cls, path: str) -> "ModelLayout":
        from diffusers import AutoencoderKLWan, DiffusionPipeline, WanTransformer3DModel

        index = DiffusionPipeline.load_config(path)
        experts = tuple(
            name for name in (HIGH_NOISE_EXPERT, LOW_NOISE_EXPERT) if (index.get(name) or [None])[0] is not None
        )
        if not experts:
            raise ValueError(f"model at {path!r} has no transformer")
        transformer = WanTransformer3DModel.load_config(path, subfolder=experts[0])
        vae = AutoencoderKLWan.load_config(path, subfolder="vae")
        return cls(
            experts=experts,
            boundary_ratio=index.get("boundary_ratio"),
            # The denoised latents have the VAE's channels; an image-to-video transformer takes more
            # (latents + condition), a text-to-video one exactly these.
            latent_channels=vae.get("z_dim", transformer["out_channels"]),
            scale_spatial=vae.get("scale_factor_spatial", 8),
            scale_temporal=vae.get("scale_factor_temporal", 4),
        )

    def latent_shape(self, params: RenderParams, num_frames: int) -> tuple[int, ...]:
        return (
            1,
            self.latent_channels,
            (num_frames - 1) // self.scale_temporal + 1,
            params.height // self.scale_spatial,
            params.width // self.scale_spatial,
        )


def make_scheduler(spec: ModelSpec, kind: str):
    """The model's own scheduler ('unipc' for Wan) or flow-matching Euler with the same shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler.from_pretrained(spec.path, subfolder="scheduler")
    if kind == "flow-euler":
        own = UniPCMultistepScheduler.load_config(spec.path, subfolder="scheduler")
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=own.get("num_train_timesteps", 1000), shift=own.get("flow_shift", 1.0)
        )
    raise ValueError(f"scheduler: {kind!r} is not known; allowed: unipc, flow-euler")


class TextEncoderStage:
    """Prompt → embeddings (UMT5), the same way ``WanPipeline.encode_prompt`` does it.

    UMT5 runs on ``device`` in the spec's dtype; :meth:`encode` returns the embeddings on CPU.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.spec = spec
        self.device = pick_device(device)
        self.dtype = _DTYPES[spec.dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path, subfolder="tokenizer")
        self.text_encoder = (
            UMT5EncoderModel.from_pretrained(spec.path, subfolder="text_encoder", dtype=self.dtype)
            .to(self.device)
            .eval()
        )

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        length = self.spec.max_sequence_length
        tokens = self.tokenizer(
            [prompt_clean(text)],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        # Zero the padding positions, as the reference pipeline does.
        seq_len = int(mask.gt(0).sum())
        out = torch.zeros_like(hidden)
        out[:, :seq_len] = hidden[:, :seq_len]
        return out.to("cpu", self.dtype)

    def encode(self, prompt: str) -> Conditioning:
        """The job's conditioning, on CPU in the spec's dtype (no negative embeddings when guidance ≤ 1)."""
        # Guidance ≤ 1 means no unconditional pass, as in diffusers.
        uses_cfg = self.spec.guidance_scale > 1.0
        negative = self._embed(self.spec.negative_prompt) if uses_cfg else None
        return Conditioning(self._embed(prompt), negative)

    def encode_job(self, params: RenderParams, image=None) -> Conditioning:
        """The text-to-video family's encoder stage: :meth:`encode` of the prompt; ValueError for an image."""
        if image is not None:
            raise ValueError(f"input_reference: model {self.spec.id!r} renders from text only and takes no image")
        return self.encode(params.prompt)


class DenoiserStage:
    """Holds one or both experts resident on ``device`` in the spec's dtype and runs step ranges on them.

    ``attention`` names a diffusers attention backend ("native" is torch SDPA, "xformers", …);
    None picks one with :func:`pick_attention_backend`.
    """

    def __init__(
        self,
        spec: ModelSpec,
        experts: tuple[str, ...] | None = None,
        device: str | None = None,
        *,
        attention: str | None = None,
    ) -> None:
        from farm.render.families import get_family

        self.spec = spec
        self.device = pick_device(device)
        self.dtype = _DTYPES[spec.dtype]
        self.layout = ModelLayout.read(spec.path)
        wanted = experts or self.layout.experts
        missing = set(wanted) - set(self.layout.experts)
        if missing:
            raise ValueError(f"model {spec.id!r} has no expert(s) {sorted(missing)}; it has {list(self.layout.experts)}")
        self.attention = attention or pick_attention_backend(self.device)
        self.experts: dict[str, torch.nn.Module] = {}
        for name in wanted:
            model = get_family(spec.family).load_transformer(spec, name, self.dtype).to(self.device).eval()
            if self.attention != "native":
                model.set_attention_backend(self.attention)
            self.experts[name] = model
        # Compiled and warmed here (spec.compile), at the model's first size and duration, so no request pays it.
        width, height = parse_size(spec.sizes[0])
        warm_shape = self.layout.latent_shape(
            RenderParams(prompt="warm-up", width=width, height=height, seconds=spec.seconds[0], steps=1, seed=0),
            spec.num_frames(spec.seconds[0]),
        )
        accel.prepare_experts(spec, self.experts, warm_shape)
        log.info(
            "denoiser for %s holds %s on %s in %s (attention: %s)",
            spec.id, list(self.experts), self.device, spec.dtype, self.attention,
        )

    def run(
        self,
        state: DenoiseState,
        start: int,
        end: int,
        on_step: StepCallback | None = None,
        *,
        keep_on_device: bool = False,
        on_cache: Callable[[accel.CacheStats], None] | None = None,
    ) -> DenoiseState:
        """Steps ``[start, end)`` of ``state`` (on any device) on this stage's device.

        The returned state is on CPU, or stays on this device with ``keep_on_device=True``
        (for a next shard on the same replica); see :func:`~farm.render.denoise.denoise`.
        The shard runs with the job's cache setting (``state.cache``), else the model's
        (``spec.cache``), its hooks fresh for this shard (:func:`farm.render.accel.cache_for`);
        ``on_cache`` gets the shard's cache counts. The forwards run under ``torch.inference_mode``
        (no autograd anywhere in a shard).
        """
        setting = accel.resolve(self.spec.cache, state.cache)
        with torch.inference_mode(), accel.cache_for(self.experts, setting) as stats:
            out = denoise(self.experts, state, start, end, on_step=on_step, keep_on_device=keep_on_device)
        if on_cache is not None:
            on_cache(stats)
        return out

    def run_batch(self, shards: list[tuple[DenoiseState, int, int]]) -> list:
        """Several jobs' step ranges in one batched loop (:func:`~farm.render.denoise.denoise_batch`):
        one entry per shard, its new state on CPU or the exception it alone raised.

        Only for jobs without cache acceleration (a cache hook decides for a whole batch, so a cached
        job is never batched: the dispatcher gives it a batch key of its own); ValueError otherwise.
        """
        from farm.render.denoise import denoise_batch

        if any(accel.resolve(self.spec.cache, state.cache).kind != "off" for state, _, _ in shards):
            raise ValueError("a job with cache acceleration cannot share a batched forward")
        with torch.inference_mode():
            return denoise_batch(self.experts, shards)


class DecoderStage:
    """Latents → uint8 RGB frames ``(F, H, W, 3)`` with the Wan VAE, run in float32 on ``device`` (on CPU
    with the faster kernels of farm.render.cpu_kernels unless the model asks for ``vae_kernels: stock``;
    in spatial tiles when it asks for ``vae_tiling``)."""

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor

        self.spec = spec
        self.device = pick_device(device)
        self.dtype = torch.float32  # the Wan VAE's precision, whatever spec.dtype says
        self.vae = AutoencoderKLWan.from_pretrained(spec.path, subfolder="vae", torch_dtype=self.dtype)
        self.vae = self.vae.to(self.device).eval()
        if self.device == "cpu" and spec.vae_kernels == "fast":
            from farm.render.cpu_kernels import use_fast_cpu_kernels

            use_fast_cpu_kernels(self.vae)
        if spec.vae_tiling:
            self.vae.enable_tiling()
        self.processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents from any device → frames as a numpy array on CPU."""
        cfg = self.vae.config
        latents = latents.to(self.device, self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        frames = self.processor.postprocess_video(video, output_type="np")[0]  # (F, H, W, C) in [0, 1]
        return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_normalized(vae, video: torch.Tensor) -> torch.Tensor:
    """A Wan VAE's normalized latents of ``video`` (``(B, 3, F, H, W)`` in [-1, 1], on the VAE's device):
    the distribution's mode (no randomness), shifted and scaled by ``latents_mean`` / ``latents_std`` as
    the Wan pipelines' ``prepare_latents`` do."""
    cfg = vae.config
    latents = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents)
    return (latents - mean) * inv_std


def initial_state(
    spec: ModelSpec, params: RenderParams, conditioning: Conditioning, *, device: str = "cpu"
) -> DenoiseState:
    """The job's state before step 0: schedule set, float32 noise drawn from the seed, on ``device``
    (CPU by default, where states travel; any denoiser moves it to its own device).

    The conditioning's family prepares it (the model's own, or one that runs on the model's weights,
    such as video-to-video on a text-to-video model); ValueError when it is another family's.
    """
    from farm.render.families import get_family

    family = get_family(conditioning.family)
    if conditioning.family != spec.family and spec.family not in family.runs_on:
        raise ValueError(
            f"model {spec.id!r} is family {spec.family!r}, but the conditioning is {conditioning.family!r}'s"
        )
    state = family.initial_state(spec, params, conditioning, device=device)
    # The request's cache setting rides on the state to every shard (and into checkpoints).
    return state if params.cache is None else replace(state, cache=params.cache)
