"""Step-level batching: several jobs' steps in one forward pass give each job what it gets alone."""

from __future__ import annotations

import pytest
import torch

from farm.render.denoise import HIGH_NOISE_EXPERT, NonFiniteLatents, denoise, denoise_batch, layout_of
from farm.render.engine import DenoiserStage, TextEncoderStage, initial_state
from farm.render.registry import validate_request

TOL = 1e-5
PROMPTS = ["a cat walks down an old Kyoto alley", "夜の東京、雨に濡れた交差点", "a red kite over the sea",
           "波打ち際を走る犬"]


def _state(spec, encoder, n: int, scheduler: str, steps: int = 6):
    params = validate_request(spec, prompt=PROMPTS[n % len(PROMPTS)], size="64x64", seconds=1, steps=steps,
                              seed=100 + n, scheduler=scheduler)
    return initial_state(spec, params, encoder.encode(params.prompt))


def _diff(a, b) -> float:
    return float((a.latents - b.latents).abs().max())


@pytest.fixture(scope="module")
def one_expert(tiny_spec):
    return tiny_spec, TextEncoderStage(tiny_spec, device="cpu"), DenoiserStage(tiny_spec, device="cpu")


@pytest.fixture(scope="module")
def two_experts(tiny_spec_2x):
    # One replica holding both experts: a round may run a high-noise group and a low-noise group.
    return tiny_spec_2x, TextEncoderStage(tiny_spec_2x, device="cpu"), DenoiserStage(tiny_spec_2x, device="cpu")


@pytest.mark.parametrize("scheduler", ["unipc", "flow-euler"])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_a_batch_gives_each_job_its_latents_alone(one_expert, scheduler, size):
    spec, encoder, stage = one_expert
    states = [_state(spec, encoder, n, scheduler) for n in range(size)]
    batched = denoise_batch(stage.experts, [(s, 0, 4) for s in states])
    for state, got in zip(states, batched):
        alone = denoise(stage.experts, state, 0, 4)
        assert _diff(got, alone) <= TOL
        assert got.step_index == 4
        # The scheduler's multistep history is the job's own: the next shard continues alike.
        assert _diff(denoise(stage.experts, got, 4, 6), denoise(stage.experts, alone, 4, 6)) <= TOL


@pytest.mark.parametrize("scheduler", ["unipc", "flow-euler"])
def test_two_expert_jobs_at_different_steps_batch_per_expert(two_experts, scheduler):
    spec, encoder, stage = two_experts
    a = _state(spec, encoder, 0, scheduler, steps=8)
    b = _state(spec, encoder, 1, scheduler, steps=8)
    c = _state(spec, encoder, 2, scheduler, steps=6)
    b = denoise(stage.experts, b, 0, 3)  # b starts mid-schedule, c has fewer steps
    shards = [(a, 0, 8), (b, 3, 8), (c, 0, 6)]
    batched = denoise_batch(stage.experts, shards)
    experts_used = {name for state, start, end in shards for name in layout_of(state).experts[start:end]}
    assert len(experts_used) == 2  # the batch really crossed the expert boundary
    for (state, start, end), got in zip(shards, batched):
        assert _diff(got, denoise(stage.experts, state, start, end)) <= TOL


def test_image_to_video_jobs_batch_with_their_image_inputs(tiny_i2v_spec):
    from PIL import Image

    from farm.render.families import get_family

    family = get_family(tiny_i2v_spec.family)
    encoder = family.load_encoder(tiny_i2v_spec, device="cpu")
    stage = DenoiserStage(tiny_i2v_spec, device="cpu")
    states = []
    for n, colour in enumerate([(200, 40, 40), (30, 160, 220)]):
        params = validate_request(tiny_i2v_spec, prompt=PROMPTS[n], size="64x64", seconds=1, steps=4, seed=7 + n)
        cond = encoder.encode_job(params, Image.new("RGB", (64, 64), colour))
        states.append(initial_state(tiny_i2v_spec, params, cond))
    batched = denoise_batch(stage.experts, [(s, 0, 4) for s in states])
    for state, got in zip(states, batched):
        assert _diff(got, denoise(stage.experts, state, 0, 4)) <= TOL


def test_one_jobs_failure_is_its_own(one_expert):
    spec, encoder, stage = one_expert
    good, bad_range, diverged = (_state(spec, encoder, n, "unipc") for n in range(3))
    diverged = diverged.__class__(**{**diverged.__dict__, "latents": torch.full_like(diverged.latents, float("nan"))})
    out = denoise_batch(stage.experts, [(good, 0, 2), (bad_range, 3, 5), (diverged, 0, 2)])
    assert _diff(out[0], denoise(stage.experts, good, 0, 2)) <= TOL
    assert isinstance(out[1], ValueError) and "state is at step 0" in str(out[1])
    assert isinstance(out[2], NonFiniteLatents)
    assert HIGH_NOISE_EXPERT in stage.experts
