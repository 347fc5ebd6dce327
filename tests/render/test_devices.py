"""The device contract on CPU: what each stage hands on, where its tensors are, and in which dtype."""

from __future__ import annotations

import pytest
import torch

from farm.render.denoise import (
    DenoiseState,
    plan_shards,
    prepare_state,
    roundtrip,
    run_shards,
    split_roundtrip,
)
from farm.render.engine import (
    DecoderStage,
    DenoiserStage,
    TextEncoderStage,
    initial_state,
    make_scheduler,
    pick_device,
)
from farm.render.registry import ModelSpec, validate_request

STEPS = 8
SEED = 99
PROMPT = "a robot paints a portrait"
BF16_TOL = 2e-2  # bfloat16 keeps 8 bits of mantissa: ~4e-3 relative per rounding
CPU = torch.device("cpu")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _devices(state: DenoiseState) -> set[torch.device]:
    """Every device a state's tensors are on (the CPU generator state excluded)."""
    parts = [state.latents, state.scheduler_state, state.conditioning.prompt_embeds,
             state.conditioning.negative_prompt_embeds]
    return {t.device for t in _tensors(parts)}


def _params(spec, scheduler="unipc"):
    return validate_request(spec, prompt=PROMPT, size="64x64", seconds=1, steps=STEPS, seed=SEED, scheduler=scheduler)


def _with_dtype(spec: ModelSpec, dtype: str) -> ModelSpec:
    return ModelSpec.model_validate({**spec.model_dump(), "dtype": dtype})


@pytest.fixture(scope="module")
def cpu_stages(tiny_spec):
    return TextEncoderStage(tiny_spec, device="cpu"), DenoiserStage(tiny_spec, device="cpu")


@pytest.fixture(scope="module")
def bf16_stages(tiny_spec):
    spec = _with_dtype(tiny_spec, "bfloat16")
    return spec, TextEncoderStage(spec, device="cpu"), DenoiserStage(spec, device="cpu")


# Device names --------------------------------------------------------------------
def test_pick_device_resolves_names():
    auto = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert pick_device() == pick_device("auto") == pick_device(None) == auto
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        pick_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(tiny_spec):
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda:1")
    with pytest.raises(ValueError, match="CUDA is not available"):
        DenoiserStage(tiny_spec, device="cuda")


def test_stages_name_their_device_and_dtype(tiny_spec, cpu_stages):
    encoder, denoiser = cpu_stages
    decoder = DecoderStage(tiny_spec, device="cpu")
    assert (encoder.device, denoiser.device, decoder.device) == ("cpu", "cpu", "cpu")
    assert encoder.dtype == denoiser.dtype == decoder.dtype == torch.float32
    assert denoiser.attention == "native"
    assert all(m.device == CPU for m in denoiser.experts.values())


# What crosses a boundary -------------------------------------------------------------
def test_encoder_returns_conditioning_on_cpu(cpu_stages):
    encoder, _ = cpu_stages
    cond = encoder.encode(PROMPT)
    assert cond.prompt_embeds.device == CPU and cond.negative_prompt_embeds.device == CPU
    assert cond.prompt_embeds.dtype == torch.float32


def test_states_come_back_on_cpu_and_keep_on_device_keeps_them_on_the_stage(tiny_spec, cpu_stages):
    encoder, denoiser = cpu_stages
    state0 = initial_state(tiny_spec, _params(tiny_spec), encoder.encode(PROMPT))
    assert _devices(state0) == {CPU}

    handed_on = denoiser.run(state0, 0, 3)
    kept = denoiser.run(state0, 0, 3, keep_on_device=True)
    assert _devices(handed_on) == {CPU}
    assert _devices(kept) == {torch.device(denoiser.device)}
    assert kept.generator_state.device == CPU  # a CPU generator's state on every device

    # A kept state runs its next shard on the same replica as if it had travelled.
    whole = denoiser.run(state0, 0, STEPS)
    chained = denoiser.run(kept, 3, STEPS)
    assert float((chained.latents - whole.latents).abs().max()) == 0.0
    assert _devices(chained) == {CPU}


def test_a_shard_never_changes_its_input(tiny_spec, cpu_stages):
    encoder, denoiser = cpu_stages
    state = denoiser.run(initial_state(tiny_spec, _params(tiny_spec), encoder.encode(PROMPT)), 0, 3)
    before = [t.clone() for t in _tensors([state.latents, state.scheduler_state])]
    history = list(state.scheduler_state["model_outputs"])
    first = denoiser.run(state, 3, 6)
    again = denoiser.run(state, 3, 6, keep_on_device=True)  # a retried shard
    after = list(_tensors([state.latents, state.scheduler_state]))
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(a is b for a, b in zip(state.scheduler_state["model_outputs"], history, strict=True))
    assert state.step_index == 3
    assert torch.equal(first.latents, again.latents)


def test_missing_expert_is_refused_before_any_step(tiny_spec_2x):
    from farm.render.denoise import HIGH_NOISE_EXPERT, denoise

    low = DenoiserStage(tiny_spec_2x, experts=("transformer_2",), device="cpu")
    encoder = TextEncoderStage(tiny_spec_2x, device="cpu")
    state = initial_state(tiny_spec_2x, _params(tiny_spec_2x), encoder.encode(PROMPT))
    calls = []
    with pytest.raises(ValueError, match=f"step 0 needs expert '{HIGH_NOISE_EXPERT}'"):
        denoise(low.experts, state, 0, STEPS, on_step=lambda i, n: calls.append(i))
    assert calls == []


def test_stochastic_scheduler_replays_its_cpu_rng_across_shards(tiny_spec, cpu_stages):
    from diffusers import FlowMatchEulerDiscreteScheduler

    encoder, denoiser = cpu_stages
    cond = encoder.encode(PROMPT)
    shape = denoiser.layout.latent_shape(_params(tiny_spec), tiny_spec.num_frames(1))

    def start(stochastic: bool) -> DenoiseState:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
        return prepare_state(scheduler, cond, latent_shape=shape, num_steps=STEPS, seed=SEED,
                             guidance_scale=tiny_spec.guidance_scale)

    state0 = start(True)
    whole = denoiser.run(state0, 0, STEPS)
    sharded = run_shards(denoiser.experts, state0, plan_shards(state0, 3), handoff=split_roundtrip)
    assert float((sharded.latents - whole.latents).abs().max()) == 0.0
    assert not torch.equal(whole.generator_state, state0.generator_state)  # noise was drawn
    deterministic = denoiser.run(start(False), 0, STEPS)
    assert float((deterministic.latents - whole.latents).abs().max()) > 1e-3


# bfloat16 -------------------------------------------------------------------------
def test_bfloat16_spec_loads_bfloat16_weights_and_conditioning(bf16_stages):
    _, encoder, denoiser = bf16_stages
    assert encoder.text_encoder.dtype == torch.bfloat16 == encoder.dtype
    assert all(m.dtype == torch.bfloat16 for m in denoiser.experts.values()) and denoiser.dtype == torch.bfloat16
    cond = encoder.encode(PROMPT)
    assert cond.prompt_embeds.dtype == torch.bfloat16 and cond.prompt_embeds.device == CPU


@pytest.mark.parametrize("scheduler", ["unipc", "flow-euler"])
def test_bfloat16_shards_match_unsharded_with_float32_latents(bf16_stages, scheduler):
    spec, encoder, denoiser = bf16_stages
    state0 = initial_state(spec, _params(spec, scheduler), encoder.encode(PROMPT))
    assert state0.latents.dtype == torch.float32

    whole = denoiser.run(state0, 0, STEPS)
    state, dtypes = state0, []
    for plan in plan_shards(state0, 3):
        state = roundtrip(denoiser.run(state, plan.start, plan.end))
        dtypes.append(state.latents.dtype)
    # float32 latents across shards, whatever the model's dtype (flow-match Euler alone would
    # hand back bfloat16): the same values WanPipeline holds, in WanPipeline's latent dtype.
    assert dtypes == [torch.float32] * len(dtypes) and whole.latents.dtype == torch.float32
    assert float((state.latents - whole.latents).abs().max()) <= BF16_TOL
    assert float((whole.latents - state0.latents).abs().max()) > 0.1


def test_bfloat16_matches_diffusers_pipeline_in_bfloat16(bf16_stages):
    from diffusers import WanPipeline

    spec, encoder, denoiser = bf16_stages
    state0 = initial_state(spec, _params(spec), encoder.encode(PROMPT))
    ours = run_shards(denoiser.experts, state0, plan_shards(state0, 3), handoff=roundtrip)

    pipe = WanPipeline.from_pretrained(spec.path, dtype=torch.bfloat16)
    pipe.scheduler = make_scheduler(spec, "unipc")
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPT, negative_prompt=spec.negative_prompt, height=64, width=64, num_frames=spec.num_frames(1),
        num_inference_steps=STEPS, guidance_scale=spec.guidance_scale, max_sequence_length=spec.max_sequence_length,
        generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).frames
    assert reference.dtype == ours.latents.dtype == torch.float32
    assert float((reference - ours.latents).abs().max()) <= BF16_TOL


def test_decoder_takes_latents_of_any_dtype_and_returns_cpu_frames(tiny_spec, cpu_stages):
    import numpy as np

    encoder, denoiser = cpu_stages
    state = denoiser.run(initial_state(tiny_spec, _params(tiny_spec), encoder.encode(PROMPT)), 0, STEPS)
    decoder = DecoderStage(_with_dtype(tiny_spec, "bfloat16"), device="cpu")
    assert decoder.dtype == torch.float32 and decoder.vae.dtype == torch.float32
    frames = decoder.decode(state.latents.to(torch.bfloat16))
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert frames.shape == (tiny_spec.num_frames(1), 64, 64, 3)
