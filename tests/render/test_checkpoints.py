"""Checkpoints: a state's progress and its job's conditioning, together or apart."""

from __future__ import annotations

import io
import json

import pytest
import torch

from farm.render.denoise import STATE_FORMAT, Conditioning, DenoiseState, roundtrip, split_roundtrip
from farm.render.engine import DenoiserStage, TextEncoderStage, initial_state
from farm.render.registry import validate_request

STEPS = 8


@pytest.fixture(scope="module")
def stages(tiny_spec):
    return TextEncoderStage(tiny_spec, device="cpu"), DenoiserStage(tiny_spec, device="cpu")


def _state0(spec, encoder, scheduler="unipc"):
    params = validate_request(spec, prompt="a red fox in snow", size="64x64", seconds=1, steps=STEPS, seed=7,
                              scheduler=scheduler)
    return initial_state(spec, params, encoder.encode(params.prompt))


def _legacy_bytes(state: DenoiseState) -> bytes:
    """Format 1 exactly as it was written before conditioning could be left out."""
    payload = {
        "format": 1,
        "latents": state.latents,
        "scheduler_class": state.scheduler_class,
        "scheduler_config": json.dumps(state.scheduler_config),
        "scheduler_state": state.scheduler_state,
        "step_index": state.step_index,
        "num_steps": state.num_steps,
        "guidance_scale": state.guidance_scale,
        "guidance_scale_2": state.guidance_scale_2,
        "boundary_timestep": state.boundary_timestep,
        "prompt_embeds": state.conditioning.prompt_embeds,
        "negative_prompt_embeds": state.conditioning.negative_prompt_embeds,
        "generator_state": state.generator_state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def test_default_bytes_are_the_format_1_bytes(tiny_spec, stages):
    encoder, denoiser = stages
    state = denoiser.run(_state0(tiny_spec, encoder), 0, 3)
    assert STATE_FORMAT == 1
    assert state.to_bytes() == _legacy_bytes(state)
    back = DenoiseState.from_bytes(_legacy_bytes(state))  # a checkpoint written by the old code
    assert back.step_index == 3 and torch.equal(back.latents, state.latents)


@pytest.mark.parametrize("scheduler", ["unipc", "flow-euler"])
def test_split_checkpoint_continues_exactly_like_the_whole_one(tiny_spec, stages, scheduler):
    encoder, denoiser = stages
    state = denoiser.run(_state0(tiny_spec, encoder, scheduler), 0, 3)

    progress, cond = state.to_bytes(include_conditioning=False), state.conditioning.to_bytes()
    joined = DenoiseState.from_bytes(progress, conditioning=Conditioning.from_bytes(cond))
    assert len(progress) < len(state.to_bytes())  # the embeddings really were left out

    direct = denoiser.run(state, 3, STEPS)
    via_whole = denoiser.run(roundtrip(state), 3, STEPS)
    via_split = denoiser.run(joined, 3, STEPS)
    assert float((via_split.latents - via_whole.latents).abs().max()) == 0.0
    assert float((via_split.latents - direct.latents).abs().max()) == 0.0
    assert float((denoiser.run(split_roundtrip(state), 3, STEPS).latents - direct.latents).abs().max()) == 0.0


def test_progress_bytes_need_the_conditioning(tiny_spec, stages):
    encoder, _ = stages
    state = _state0(tiny_spec, encoder)
    with pytest.raises(ValueError, match="without the conditioning"):
        DenoiseState.from_bytes(state.to_bytes(include_conditioning=False))


def test_a_given_conditioning_is_the_one_used(tiny_spec, stages):
    encoder, _ = stages
    state = _state0(tiny_spec, encoder)
    other = encoder.encode("a different prompt")
    back = DenoiseState.from_bytes(state.to_bytes(), conditioning=other)
    assert back.conditioning is other


def test_conditioning_roundtrip_keeps_dtype_and_a_missing_negative(tiny_spec, stages):
    encoder, _ = stages
    cond = encoder.encode("桜の花びら")
    back = Conditioning.from_bytes(cond.to_bytes())
    assert torch.equal(back.prompt_embeds, cond.prompt_embeds)
    assert torch.equal(back.negative_prompt_embeds, cond.negative_prompt_embeds)
    assert back.prompt_embeds.dtype == cond.prompt_embeds.dtype
    no_cfg = Conditioning(torch.randn(1, 4, 32, dtype=torch.bfloat16), None)
    back = Conditioning.from_bytes(no_cfg.to_bytes())
    assert back.negative_prompt_embeds is None and back.prompt_embeds.dtype == torch.bfloat16


def test_mixed_up_or_broken_bytes_are_refused_clearly(tiny_spec, stages):
    encoder, _ = stages
    state = _state0(tiny_spec, encoder)
    with pytest.raises(ValueError, match="use DenoiseState.from_bytes"):
        Conditioning.from_bytes(state.to_bytes())
    with pytest.raises(ValueError, match="use Conditioning.from_bytes"):
        DenoiseState.from_bytes(state.conditioning.to_bytes())
    with pytest.raises(ValueError, match="not a torch.save archive"):
        DenoiseState.from_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a torch.save archive"):
        Conditioning.from_bytes(state.to_bytes()[:100])
    buffer = io.BytesIO()
    torch.save({"format": 99, "latents": state.latents}, buffer)
    with pytest.raises(ValueError, match="unsupported denoise state format 99"):
        DenoiseState.from_bytes(buffer.getvalue())
