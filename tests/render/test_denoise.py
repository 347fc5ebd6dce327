"""Sharded equals unsharded: the farm's denoising core against diffusers' own WanPipeline."""

from __future__ import annotations

import pytest
import torch

from farm.render.denoise import (
    HIGH_NOISE_EXPERT,
    LOW_NOISE_EXPERT,
    DenoiseState,
    ShardPlan,
    expert_for_step,
    plan_shards,
    roundtrip,
    run_shards,
)
from farm.render.engine import DenoiserStage, TextEncoderStage, initial_state, make_scheduler
from farm.render.registry import validate_request

STEPS = 8
SEED = 1234
PROMPT = "桜の花びらが舞う京都の路地を歩く猫 — a cat in Kyoto"
TOL = 1e-5


def _params(spec, scheduler):
    return validate_request(spec, prompt=PROMPT, size="64x64", seconds=1, steps=STEPS, seed=SEED, scheduler=scheduler)


def _reference_latents(spec, scheduler_kind):
    """The same job through diffusers' own pipeline."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(spec.path)
    pipe.scheduler = make_scheduler(spec, scheduler_kind)
    pipe.set_progress_bar_config(disable=True)
    extra = {"guidance_scale_2": spec.guidance_scale_2} if spec.guidance_scale_2 is not None else {}
    out = pipe(
        PROMPT,
        negative_prompt=spec.negative_prompt,
        height=64,
        width=64,
        num_frames=spec.num_frames(1),
        num_inference_steps=STEPS,
        guidance_scale=spec.guidance_scale,
        max_sequence_length=spec.max_sequence_length,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
        **extra,
    )
    return out.frames


def _start(spec, scheduler_kind):
    params = _params(spec, scheduler_kind)
    cond = TextEncoderStage(spec, device="cpu").encode(params.prompt)
    return initial_state(spec, params, cond)


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("scheduler_kind", ["unipc", "flow-euler"])
def test_shard_splits_match_each_other_and_diffusers(tiny_spec, scheduler_kind):
    denoiser = DenoiserStage(tiny_spec, device="cpu")
    state0 = _start(tiny_spec, scheduler_kind)

    whole = denoiser.run(state0, 0, STEPS)
    two = denoiser.run(denoiser.run(state0, 0, 3), 3, STEPS)
    eight = run_shards(denoiser.experts, state0, plan_shards(state0, 1), handoff=roundtrip)
    reference = _reference_latents(tiny_spec, scheduler_kind)

    assert whole.done and two.done and eight.done
    assert whole.latents.shape == reference.shape
    assert _max_diff(whole.latents, two.latents) <= TOL
    assert _max_diff(whole.latents, eight.latents) <= TOL
    assert _max_diff(whole.latents, reference) <= TOL
    # The run moved the latents: a no-op loop would also "match" itself.
    assert _max_diff(whole.latents, state0.latents) > 0.1


def test_shards_do_not_mutate_their_input(tiny_spec):
    denoiser = DenoiserStage(tiny_spec, device="cpu")
    state0 = _start(tiny_spec, "unipc")
    first = denoiser.run(state0, 0, 3)
    again = denoiser.run(state0, 0, 3)  # a retried shard
    assert state0.step_index == 0
    assert torch.equal(first.latents, again.latents)


def test_state_roundtrip_is_lossless_and_safe(tiny_spec):
    denoiser = DenoiserStage(tiny_spec, device="cpu")
    state = denoiser.run(_start(tiny_spec, "unipc"), 0, 3)
    back = DenoiseState.from_bytes(state.to_bytes())
    assert back.step_index == 3 and back.num_steps == STEPS
    assert torch.equal(back.latents, state.latents)
    # UniPC's multistep history survives the trip.
    assert len(back.scheduler_state["model_outputs"]) == len(state.scheduler_state["model_outputs"])
    assert torch.equal(back.conditioning.prompt_embeds, state.conditioning.prompt_embeds)


def test_out_of_order_shard_is_refused(tiny_spec):
    denoiser = DenoiserStage(tiny_spec, device="cpu")
    state0 = _start(tiny_spec, "unipc")
    with pytest.raises(ValueError, match="state is at step 0"):
        denoiser.run(state0, 3, 5)
    with pytest.raises(ValueError, match="not within"):
        denoiser.run(state0, 0, STEPS + 1)


def test_two_expert_shards_cut_at_boundary_and_match_diffusers(tiny_spec_2x):
    high = DenoiserStage(tiny_spec_2x, experts=(HIGH_NOISE_EXPERT,), device="cpu")
    low = DenoiserStage(tiny_spec_2x, experts=(LOW_NOISE_EXPERT,), device="cpu")
    state = _start(tiny_spec_2x, "unipc")

    plans = plan_shards(state)  # no step cap: the natural cut is the boundary
    owners = [expert_for_step(state, i) for i in range(STEPS)]
    assert HIGH_NOISE_EXPERT in owners and LOW_NOISE_EXPERT in owners
    assert [p.expert for p in plans] == [HIGH_NOISE_EXPERT, LOW_NOISE_EXPERT]
    boundary = owners.index(LOW_NOISE_EXPERT)
    assert plans[0] == ShardPlan(0, boundary, HIGH_NOISE_EXPERT)

    # Each pool holds one expert; it refuses steps it does not own.
    with pytest.raises(ValueError, match="needs expert"):
        low.run(state, 0, 1)
    for plan in plans:
        stage = high if plan.expert == HIGH_NOISE_EXPERT else low
        state = roundtrip(stage.run(state, plan.start, plan.end))

    reference = _reference_latents(tiny_spec_2x, "unipc")
    assert _max_diff(state.latents, reference) <= TOL

    # Capped shards never straddle the boundary either.
    capped = plan_shards(_start(tiny_spec_2x, "unipc"), 3)
    assert all(len({expert_for_step(state, i) for i in range(p.start, p.end)}) == 1 for p in capped)
    assert max(p.end - p.start for p in capped) <= 3
