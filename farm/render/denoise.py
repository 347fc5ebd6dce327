"""The step-sharded denoising core.

diffusers' ``__call__`` cannot start mid-schedule, so the farm runs the Wan
denoising loop itself over explicit step ranges::

    state = prepare_state(...)                # latents, scheduler, conditioning
    state = denoise(experts, state, 0, 3)     # on one replica
    blob = state.to_bytes()                   # → object store / S3 checkpoint
    state = DenoiseState.from_bytes(blob)     # on another replica
    state = denoise(experts, state, 3, 8)

Everything a shard needs lives in :class:`DenoiseState`: the latents, the
scheduler's full dynamic state (UniPC is multistep and keeps past model outputs,
so re-running ``set_timesteps`` elsewhere would not be equivalent), the step
index, the conditioning, and the RNG state for stochastic schedulers. Shards are
pure functions of their input state, so re-running one after a crash is safe.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

STATE_FORMAT = 1
HIGH_NOISE_EXPERT = "transformer"
LOW_NOISE_EXPERT = "transformer_2"
_SCHEDULER_MODULE = "diffusers"


class NonFiniteLatents(RuntimeError):
    """A shard produced NaN or infinite latents: the model diverged (or its weights are broken).

    Raised instead of handing the state on, so bad latents are never checkpointed, resumed
    from, or decoded into a clip of noise.
    """


@dataclass(frozen=True)
class Conditioning:
    """Per-job constants every shard needs (the smallest form the loop accepts)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None  # None: no classifier-free guidance


@dataclass(frozen=True)
class ShardPlan:
    """One step range ``[start, end)`` and the expert that owns it."""

    start: int
    end: int
    expert: str


@dataclass(frozen=True)
class DenoiseState:
    """Everything needed to run the next steps of one job, in any process."""

    latents: torch.Tensor
    scheduler_class: str
    scheduler_config: dict
    scheduler_state: dict
    step_index: int
    num_steps: int
    guidance_scale: float
    guidance_scale_2: float
    boundary_timestep: float | None
    conditioning: Conditioning
    generator_state: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler_state["timesteps"]

    # Serialization ---------------------------------------------------------
    # torch.save of plain containers and tensors, loaded with weights_only=True:
    # a checkpoint read back from S3 can never execute code, unlike a pickle.
    def to_bytes(self) -> bytes:
        payload = {
            "format": STATE_FORMAT,
            "latents": self.latents,
            "scheduler_class": self.scheduler_class,
            "scheduler_config": json.dumps(self.scheduler_config),
            "scheduler_state": self.scheduler_state,
            "step_index": self.step_index,
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "guidance_scale_2": self.guidance_scale_2,
            "boundary_timestep": self.boundary_timestep,
            "prompt_embeds": self.conditioning.prompt_embeds,
            "negative_prompt_embeds": self.conditioning.negative_prompt_embeds,
            "generator_state": self.generator_state,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DenoiseState":
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if payload.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported denoise state format {payload.get('format')!r}; expected {STATE_FORMAT}")
        return cls(
            latents=payload["latents"],
            scheduler_class=payload["scheduler_class"],
            scheduler_config=json.loads(payload["scheduler_config"]),
            scheduler_state=payload["scheduler_state"],
            step_index=payload["step_index"],
            num_steps=payload["num_steps"],
            guidance_scale=payload["guidance_scale"],
            guidance_scale_2=payload["guidance_scale_2"],
            boundary_timestep=payload["boundary_timestep"],
            conditioning=Conditioning(payload["prompt_embeds"], payload["negative_prompt_embeds"]),
            generator_state=payload["generator_state"],
        )


# Scheduler state -------------------------------------------------------------
def _export_scheduler(scheduler) -> tuple[str, dict, dict]:
    """Split a scheduler into (class name, config, dynamic state)."""
    state = {k: copy.deepcopy(v) for k, v in vars(scheduler).items() if k != "_internal_dict"}
    return type(scheduler).__name__, dict(scheduler.config), state


def _import_scheduler(class_name: str, config: dict, state: dict):
    cls = getattr(importlib.import_module(_SCHEDULER_MODULE), class_name, None)
    if cls is None or not hasattr(cls, "step"):
        raise ValueError(f"unknown scheduler class {class_name!r}")
    scheduler = cls.from_config(config)
    # A deep copy keeps the caller's state untouched: shards are re-runnable.
    vars(scheduler).update(copy.deepcopy(state))
    return scheduler


def prepare_state(
    scheduler,
    conditioning: Conditioning,
    *,
    latent_shape: tuple[int, ...],
    num_steps: int,
    seed: int,
    guidance_scale: float,
    guidance_scale_2: float | None = None,
    boundary_ratio: float | None = None,
    device: str | torch.device = "cpu",
) -> DenoiseState:
    """Set the schedule and draw the initial noise, exactly as ``WanPipeline`` does."""
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_steps, device=device)
    scheduler.set_begin_index(0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    latents = randn_tensor(latent_shape, generator=generator, device=torch.device(device), dtype=torch.float32)
    boundary = None
    if boundary_ratio is not None:
        boundary = float(boundary_ratio * scheduler.config.num_train_timesteps)
    class_name, config, state = _export_scheduler(scheduler)
    return DenoiseState(
        latents=latents,
        scheduler_class=class_name,
        scheduler_config=config,
        scheduler_state=state,
        step_index=0,
        num_steps=len(scheduler.timesteps),
        guidance_scale=float(guidance_scale),
        guidance_scale_2=float(guidance_scale if guidance_scale_2 is None else guidance_scale_2),
        boundary_timestep=boundary,
        conditioning=conditioning,
        # Stochastic schedulers draw noise in step(); carry the RNG on so shards replay it.
        generator_state=generator.get_state(),
    )


def expert_for_step(state: DenoiseState, index: int) -> str:
    """Which expert owns step ``index``: high-noise steps (t ≥ boundary) use ``transformer``."""
    if state.boundary_timestep is None:
        return HIGH_NOISE_EXPERT
    t = float(state.timesteps[index])
    return HIGH_NOISE_EXPERT if t >= state.boundary_timestep else LOW_NOISE_EXPERT


def plan_shards(state: DenoiseState, shard_steps: int | None = None) -> list[ShardPlan]:
    """Cut the remaining steps into ranges of at most ``shard_steps``, always cutting at the expert boundary."""
    if shard_steps is not None and shard_steps < 1:
        raise ValueError(f"shard_steps must be ≥ 1, got {shard_steps}")
    plans: list[ShardPlan] = []
    start = state.step_index
    while start < state.num_steps:
        expert = expert_for_step(state, start)
        end = start + 1
        limit = state.num_steps if shard_steps is None else min(state.num_steps, start + shard_steps)
        while end < limit and expert_for_step(state, end) == expert:
            end += 1
        plans.append(ShardPlan(start, end, expert))
        start = end
    return plans


StepCallback = Callable[[int, int], None]  # (step index just finished, total steps)


@torch.no_grad()
def denoise(
    experts: Mapping[str, torch.nn.Module],
    state: DenoiseState,
    start: int,
    end: int,
    *,
    on_step: StepCallback | None = None,
) -> DenoiseState:
    """Run steps ``[start, end)`` and return the new state; the input state is not changed.

    ``experts`` maps expert names to loaded transformers; a replica that holds only one
    expert may run only the steps that expert owns.
    """
    if start != state.step_index:
        raise ValueError(f"shard starts at step {start} but the state is at step {state.step_index}")
    if not start < end <= state.num_steps:
        raise ValueError(f"step range [{start}, {end}) is not within [{start}, {state.num_steps}]")

    scheduler = _import_scheduler(state.scheduler_class, state.scheduler_config, state.scheduler_state)
    step_kwargs = {}
    generator = None
    if state.generator_state is not None and "generator" in inspect.signature(scheduler.step).parameters:
        generator = torch.Generator(device="cpu")
        generator.set_state(state.generator_state)
        step_kwargs["generator"] = generator

    cond = state.conditioning
    latents = state.latents
    timesteps = scheduler.timesteps
    for i in range(start, end):
        t = timesteps[i]
        name = expert_for_step(state, i)
        model = experts.get(name)
        if model is None:
            raise ValueError(f"step {i} needs expert {name!r}, this replica holds {sorted(experts)}")
        guidance = state.guidance_scale if name == HIGH_NOISE_EXPERT else state.guidance_scale_2
        model_input = latents.to(model.dtype)
        timestep = t.expand(latents.shape[0])
        cache = {"step_index": i, "sigma": float(scheduler.sigmas[i]), "num_inference_steps": state.num_steps}

        # 1. Conditional prediction, then the unconditional one for classifier-free guidance.
        with model.cache_context("cond", **cache):
            noise_pred = model(
                hidden_states=model_input,
                timestep=timestep,
                encoder_hidden_states=cond.prompt_embeds.to(model.dtype),
                return_dict=False,
            )[0]
        if cond.negative_prompt_embeds is not None:
            with model.cache_context("uncond", **cache):
                noise_uncond = model(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=cond.negative_prompt_embeds.to(model.dtype),
                    return_dict=False,
                )[0]
            noise_pred = noise_uncond + guidance * (noise_pred - noise_uncond)

        # 2. x_t → x_{t-1}
        latents = scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]
        if on_step is not None:
            on_step(i, state.num_steps)

    if not bool(torch.isfinite(latents).all()):
        bad = int((~torch.isfinite(latents)).sum())
        raise NonFiniteLatents(
            f"steps [{start}, {end}) of {state.num_steps} left {bad} of {latents.numel()} latent values NaN or infinite"
        )
    _, _, scheduler_state = _export_scheduler(scheduler)
    return replace(
        state,
        latents=latents,
        scheduler_state=scheduler_state,
        step_index=end,
        generator_state=generator.get_state() if generator is not None else state.generator_state,
    )


def run_shards(
    experts: Mapping[str, torch.nn.Module],
    state: DenoiseState,
    plans: list[ShardPlan],
    *,
    handoff: Callable[[DenoiseState], DenoiseState] | None = None,
    on_step: StepCallback | None = None,
) -> DenoiseState:
    """Run shards in order in this process; ``handoff`` stands where a process boundary would be."""
    for plan in plans:
        state = denoise(experts, state, plan.start, plan.end, on_step=on_step)
        if handoff is not None and not state.done:
            state = handoff(state)
    return state


def roundtrip(state: DenoiseState) -> DenoiseState:
    """Serialize and deserialize: what crossing a process boundary does to a state."""
    return DenoiseState.from_bytes(state.to_bytes())
