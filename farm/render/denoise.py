"""The step-sharded denoising core.

diffusers' ``__call__`` cannot start mid-schedule, so the farm runs the
denoising loop itself over explicit step ranges; each step is the model family's
(:mod:`farm.render.families`: the transformer call(s) with guidance, then
``scheduler.step``), found from the state's conditioning, so this module is the same
for every family::

    state = prepare_state(...)                # latents, scheduler, conditioning (on CPU)
    state = denoise(experts, state, 0, 3)     # on one replica; the result is on CPU
    blob = state.to_bytes()                   # → object store / S3 checkpoint
    state = DenoiseState.from_bytes(blob)     # on another replica
    state = denoise(experts, state, 3, 8)

Everything a shard needs lives in :class:`DenoiseState`: the latents, the
scheduler's full dynamic state (UniPC is multistep and keeps past model outputs,
so re-running ``set_timesteps`` elsewhere would not be equivalent), the step
index, the conditioning, and the RNG state for stochastic schedulers. Shards are
pure functions of their input state, so re-running one after a crash is safe.

A checkpoint may leave the conditioning out (``to_bytes(include_conditioning=False)``):
it is constant per job, so it can be written once (:meth:`Conditioning.to_bytes`) and
joined back on load (``DenoiseState.from_bytes(progress, conditioning=...)``).

Devices and dtypes: :func:`denoise` moves the latents, the conditioning and every
tensor of the scheduler's state (timesteps, sigmas, UniPC's ``model_outputs`` and
``last_sample``, …) to the experts' device at shard start, and returns a state on CPU
unless ``keep_on_device=True``. The model sees its input cast to its own dtype; the
latents keep the dtype they came in with (float32 from :func:`prepare_state`, as
``WanPipeline`` prepares them), so every shard hands on float32 latents whatever the
model's dtype. The RNG of stochastic schedulers is a CPU generator on every device.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from farm.render.conditioning import (  # noqa: F401  (Conditioning and its format are re-exported here)
    CONDITIONING_FORMAT,
    CONDITIONING_KIND,
    Conditioning,
    load_payload,
    save_payload,
)
from farm.render.plan import (  # noqa: F401  (ShardPlan and the expert names are re-exported here)
    HIGH_NOISE_EXPERT,
    LOW_NOISE_EXPERT,
    ShardPlan,
    StepLayout,
    expert_for_timestep,
)
from farm.render.plan import plan_shards as _plan_layout
from farm.render.registry import CacheSetting

STATE_FORMAT = 1
_SCHEDULER_MODULE = "diffusers"
_CPU = torch.device("cpu")


class NonFiniteLatents(RuntimeError):
    """A shard produced NaN or infinite latents: the model diverged (or its weights are broken).

    Raised instead of handing the state on, so bad latents are never checkpointed, resumed
    from, or decoded into a clip of noise.
    """


# Moving tensors -----------------------------------------------------------------
def _placed(value, device: torch.device, *, copy_tensors: bool):
    """``value`` with every tensor inside (lists, tuples, dicts) moved to ``device``.

    Containers are always rebuilt. ``copy_tensors=True`` also copies tensors already on
    ``device``, so the result shares no tensor with ``value``.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=copy_tensors)
    if isinstance(value, list):
        return [_placed(v, device, copy_tensors=copy_tensors) for v in value]
    if isinstance(value, tuple):
        return tuple(_placed(v, device, copy_tensors=copy_tensors) for v in value)
    if isinstance(value, dict):
        return {k: _placed(v, device, copy_tensors=copy_tensors) for k, v in value.items()}
    return copy.deepcopy(value) if copy_tensors else value


# The state ------------------------------------------------------------------------
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
    generator_state: torch.Tensor | None = None  # a CPU generator's state, whatever the device
    # The job's own cache acceleration (farm.render.accel); None: the model's default. Not read here:
    # the denoiser stage applies it around each shard.
    cache: CacheSetting | None = None

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def family(self) -> str:
        """The model family whose step runs this state: its conditioning's family."""
        return self.conditioning.family

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler_state["timesteps"]

    def to(self, device: str | torch.device) -> "DenoiseState":
        """The same state with latents, conditioning and scheduler tensors on ``device``.

        ``generator_state`` stays on CPU: it seeds a CPU generator on every device.
        """
        device = torch.device(device)
        return replace(
            self,
            latents=self.latents.to(device),
            scheduler_state=_placed(self.scheduler_state, device, copy_tensors=False),
            conditioning=self.conditioning.to(device),
        )

    # Serialization ---------------------------------------------------------
    # torch.save of plain containers and tensors, loaded with weights_only=True:
    # a checkpoint read back from S3 can never execute code, unlike a pickle.
    def to_bytes(self, include_conditioning: bool = True) -> bytes:
        """The state as bytes (format ``STATE_FORMAT`` = 1).

        With ``include_conditioning=True`` (the default) the payload is exactly the one
        format 1 has always had, so older readers load it. With ``False`` the embeddings are
        left out and the payload carries ``"conditioning_included": False``; loading it
        needs the job's conditioning (``from_bytes(data, conditioning=...)``).
        """
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
        }
        if include_conditioning:
            # T2V: exactly prompt_embeds, negative_prompt_embeds; other families add their tag and tensors.
            payload.update(self.conditioning.payload_fields())
        else:
            payload["conditioning_included"] = False
        payload["generator_state"] = self.generator_state
        if self.cache is not None:  # absent otherwise: the payload stays the one format 1 has always had
            payload["cache"] = self.cache.model_dump()
        return save_payload(payload)

    @classmethod
    def from_bytes(cls, data: bytes, conditioning: Conditioning | None = None) -> "DenoiseState":
        """Load a state written by :meth:`to_bytes`; every tensor lands on CPU.

        ``conditioning`` is required for bytes written with ``include_conditioning=False``
        (ValueError without it). When given, it is the state's conditioning even if the
        bytes carry one too.
        """
        payload = load_payload(data, "denoise state")
        if payload.get("kind") == CONDITIONING_KIND:
            raise ValueError("denoise state: the bytes hold a Conditioning (use Conditioning.from_bytes)")
        if payload.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported denoise state format {payload.get('format')!r}; expected {STATE_FORMAT}")
        if conditioning is None:
            if not payload.get("conditioning_included", True):
                raise ValueError(
                    "denoise state: these bytes were written without the conditioning "
                    "(to_bytes(include_conditioning=False)); pass conditioning=Conditioning.from_bytes(...) "
                    "with the same job's conditioning"
                )
            conditioning = Conditioning.from_payload_fields(payload, "denoise state")
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
            conditioning=conditioning,
            generator_state=payload["generator_state"],
            cache=CacheSetting.model_validate(payload["cache"]) if payload.get("cache") is not None else None,
        )


# Scheduler state -------------------------------------------------------------
def _export_scheduler(scheduler, device: torch.device = _CPU) -> tuple[str, dict, dict]:
    """Split a scheduler into (class name, config, dynamic state copied onto ``device``)."""
    state = {k: v for k, v in vars(scheduler).items() if k != "_internal_dict"}
    return type(scheduler).__name__, dict(scheduler.config), _placed(state, device, copy_tensors=True)


def _import_scheduler(class_name: str, config: dict, state: dict, device: torch.device = _CPU):
    """A live scheduler from exported parts, its tensors copied onto ``device``."""
    cls = getattr(importlib.import_module(_SCHEDULER_MODULE), class_name, None)
    if cls is None or not hasattr(cls, "step"):
        raise ValueError(f"unknown scheduler class {class_name!r}")
    scheduler = cls.from_config(config)
    # A copy keeps the caller's state untouched: shards are re-runnable.
    vars(scheduler).update(_placed(state, device, copy_tensors=True))
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
    schedule: dict | None = None,
    draw: Callable[[torch.Generator, torch.device], torch.Tensor] | None = None,
) -> DenoiseState:
    """Set the schedule and draw the initial float32 noise from a CPU generator seeded with ``seed``,
    as ``WanPipeline`` does when given such a generator.

    The latents and the schedule are placed on ``device`` (CPU by default: states travel on CPU).
    A family whose pipeline sets its schedule otherwise passes ``schedule``, the keyword arguments of
    ``set_timesteps`` instead of ``num_steps`` (LTX-2: its shifted ``sigmas`` and ``mu``); one whose
    initial latents are more than one normal draw passes ``draw`` (generator, device → latents), which
    replaces the draw of ``latent_shape`` (LTX-2: the video noise, then the audio noise, packed).
    """
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = copy.deepcopy(scheduler)
    if schedule is None:
        scheduler.set_timesteps(num_steps, device=device)
    else:
        scheduler.set_timesteps(device=device, **schedule)
    scheduler.set_begin_index(0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if draw is None:
        latents = randn_tensor(latent_shape, generator=generator, device=torch.device(device), dtype=torch.float32)
    else:
        latents = draw(generator, torch.device(device))
    boundary = None
    if boundary_ratio is not None:
        boundary = float(boundary_ratio * scheduler.config.num_train_timesteps)
    class_name, config, state = _export_scheduler(scheduler, torch.device(device))
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


# Planning ------------------------------------------------------------------------
def layout_of(state: DenoiseState) -> StepLayout:
    """The state's whole schedule as plain data: which expert owns each step."""
    timesteps = state.timesteps.detach().to(_CPU).tolist()
    experts = tuple(expert_for_timestep(float(t), state.boundary_timestep) for t in timesteps)
    return StepLayout(num_steps=state.num_steps, experts=experts)


def expert_for_step(state: DenoiseState, index: int) -> str:
    """Which expert owns step ``index``: high-noise steps (t ≥ boundary) use ``transformer``."""
    return expert_for_timestep(float(state.timesteps[index]), state.boundary_timestep)


def plan_shards(state: DenoiseState, shard_steps: int | None = None) -> list[ShardPlan]:
    """Cut the remaining steps into ranges of at most ``shard_steps``, always cutting at the expert boundary.

    The same as :func:`farm.render.plan.plan_shards` on ``layout_of(state)`` from ``state.step_index``.
    """
    return _plan_layout(layout_of(state), state.step_index, shard_steps)


# The loop ------------------------------------------------------------------------
StepCallback = Callable[[int, int], None]  # (step index just finished, total steps)


def _module_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return _CPU


class _ShardRun:
    """One job's step range in progress on one device: its live scheduler, RNG, latents and conditioning.

    Opening it checks the range and the experts and moves the state to the experts' device;
    :meth:`close` checks the latents and hands the state on. :func:`denoise` runs one, and
    :func:`denoise_batch` several in lockstep.
    """

    def __init__(self, experts: Mapping[str, torch.nn.Module], state: DenoiseState, start: int, end: int) -> None:
        if start != state.step_index:
            raise ValueError(f"shard starts at step {start} but the state is at step {state.step_index}")
        if not start < end <= state.num_steps:
            raise ValueError(f"step range [{start}, {end}) is not within [{start}, {state.num_steps}]")

        # 0. The family's step, which expert runs each step, and the one device they share.
        from farm.render.families import get_family  # the families import this module

        self.state, self.start, self.end = state, start, end
        self.family = get_family(state.family)
        self.layout = layout_of(state)
        for i in range(start, end):
            if self.layout.experts[i] not in experts:
                raise ValueError(f"step {i} needs expert {self.layout.experts[i]!r}, this replica holds {sorted(experts)}")
        devices = {_module_device(experts[name]) for name in self.layout.experts[start:end]}
        if len(devices) != 1:
            raise ValueError(f"steps [{start}, {end}) use experts on different devices: {sorted(map(str, devices))}")
        self.device = devices.pop()

        # 1. Everything the loop touches goes to the model's device; the RNG stays a CPU generator.
        self.sigmas = state.scheduler_state["sigmas"].detach().to(_CPU).tolist()  # host copies: no sync per step
        self.scheduler = _import_scheduler(state.scheduler_class, state.scheduler_config, state.scheduler_state,
                                           self.device)
        self.step_kwargs: dict = {}
        self.generator = None
        if state.generator_state is not None and "generator" in inspect.signature(self.scheduler.step).parameters:
            self.generator = torch.Generator(device="cpu")
            self.generator.set_state(state.generator_state)
            self.step_kwargs["generator"] = self.generator
        self.cond = state.conditioning.to(self.device)
        self.latents = state.latents.to(self.device)

    def expert(self, i: int) -> str:
        return self.layout.experts[i]

    def context(self, i: int):
        """Step ``i``'s :class:`~farm.render.families.StepContext` (its timestep, sigma and guidance)."""
        from farm.render.families import StepContext

        name = self.layout.experts[i]
        guidance = self.state.guidance_scale if name == HIGH_NOISE_EXPERT else self.state.guidance_scale_2
        return StepContext(index=i, timestep=self.scheduler.timesteps[i], sigma=self.sigmas[i],
                           num_steps=self.state.num_steps, guidance=guidance)

    def close(self, keep_on_device: bool) -> DenoiseState:
        """The state after the range: on CPU, or on this device with ``keep_on_device=True``.
        NonFiniteLatents when the latents went NaN or infinite."""
        latents = self.latents
        if not bool(torch.isfinite(latents).all()):
            bad = int((~torch.isfinite(latents)).sum())
            raise NonFiniteLatents(f"steps [{self.start}, {self.end}) of {self.state.num_steps} left {bad} of "
                                   f"{latents.numel()} latent values NaN or infinite")
        out = self.device if keep_on_device else _CPU
        _, _, scheduler_state = _export_scheduler(self.scheduler, out)
        return replace(
            self.state,
            latents=latents.to(out),
            scheduler_state=scheduler_state,
            step_index=self.end,
            conditioning=self.cond if keep_on_device else self.state.conditioning.to(out),
            generator_state=self.generator.get_state() if self.generator is not None else self.state.generator_state,
        )


@torch.no_grad()
def denoise(
    experts: Mapping[str, torch.nn.Module],
    state: DenoiseState,
    start: int,
    end: int,
    *,
    on_step: StepCallback | None = None,
    keep_on_device: bool = False,
) -> DenoiseState:
    """Run steps ``[start, end)`` and return the new state; the input state is not changed.

    ``experts`` maps expert names to loaded transformers; a replica that holds only one
    expert may run only the steps that expert owns (ValueError before any step runs).
    The experts a shard uses must share one device (ValueError otherwise); the state's
    latents, conditioning and scheduler tensors are moved there at shard start, and the
    timestep each model sees is on it too. The returned state is on CPU, or on that device
    with ``keep_on_device=True``; its latents have the input latents' dtype.
    """
    run = _ShardRun(experts, state, start, end)
    for i in range(start, end):
        # The family's step: its transformer call(s) with classifier-free guidance, then
        # x_t → x_{t-1}; the latents keep their dtype.
        run.latents = run.family.step(experts[run.expert(i)], run.scheduler, run.latents, run.cond, run.context(i),
                                      run.step_kwargs)
        if on_step is not None:
            on_step(i, state.num_steps)
    return run.close(keep_on_device)


@torch.no_grad()
def denoise_batch(
    experts: Mapping[str, torch.nn.Module],
    shards: "list[tuple[DenoiseState, int, int]]",
    *,
    keep_on_device: bool = False,
) -> "list[DenoiseState | Exception]":
    """Run several jobs' step ranges ``(state, start, end)`` together: step-level batching.

    The ranges advance in lockstep, one step of each job per round; in a round, the jobs whose
    step uses the same expert (and family) share one forward pass
    (:meth:`~farm.render.families.Family.predict_batch`), and each then takes its own
    ``scheduler.step`` with its own timestep, guidance, multistep history and RNG. So jobs at
    different steps, of different lengths or schedulers batch together; a job whose range is
    shorter simply stops early. Each job's result equals :func:`denoise` on it alone up to the
    float rounding of the larger matrix products.

    Returns one entry per shard, in order: its new state, or the exception that shard alone
    raised (its ValueError on a bad range, NonFiniteLatents) — one job's failure is not the
    others'. An error of the shared forward pass itself (out of memory) raises.
    """
    from farm.render.families.base import advance  # the families import this module

    results: list = [None] * len(shards)
    runs: dict[int, _ShardRun] = {}
    for n, (state, start, end) in enumerate(shards):
        try:
            runs[n] = _ShardRun(experts, state, start, end)
        except ValueError as exc:
            results[n] = exc
    rounds = max((run.end - run.start for run in runs.values()), default=0)
    for k in range(rounds):
        groups: dict[tuple[str, str], list[int]] = {}
        for n, run in runs.items():
            if run.start + k < run.end:
                groups.setdefault((run.expert(run.start + k), run.family.name), []).append(n)
        for (name, _), members in groups.items():
            model = experts[name]
            batch = [runs[n] for n in members]
            ctxs = [run.context(run.start + k) for run in batch]
            if len(batch) == 1 or _caching(model):  # a cache hook decides for the whole batch: never share it
                preds = [run.family.predict(model, run.latents, run.cond, ctx) for run, ctx in zip(batch, ctxs)]
            else:
                preds = batch[0].family.predict_batch(model, [r.latents for r in batch], [r.cond for r in batch], ctxs)
            for run, pred, ctx in zip(batch, preds, ctxs):
                run.latents = run.family.after_step(advance(run.scheduler, pred, run.latents, ctx, run.step_kwargs),
                                                    run.cond)
    for n, run in runs.items():
        try:
            results[n] = run.close(keep_on_device)
        except NonFiniteLatents as exc:
            results[n] = exc
    return results


def _caching(model: torch.nn.Module) -> bool:
    """Whether a diffusers cache hook (FirstBlockCache, MagCache, …) is on for ``model``."""
    return bool(getattr(model, "is_cache_enabled", False))


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


def split_roundtrip(state: DenoiseState) -> DenoiseState:
    """Serialize the progress and the conditioning apart and join them again on load."""
    progress, conditioning = state.to_bytes(include_conditioning=False), state.conditioning.to_bytes()
    return DenoiseState.from_bytes(progress, conditioning=Conditioning.from_bytes(conditioning))
