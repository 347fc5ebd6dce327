"""Wan 2.2 TI2V image-to-video (``WanImageToVideoPipeline`` with ``expand_timesteps``) behind the family
interface: sharded equals unsharded equals the pipeline, batched equals alone, and the clip's first frame
follows the reference image, measured against an unrelated one (the image's latents are the first
latent frame, so this holds with the tiny model's random transformer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.render.conditioning import Conditioning, FirstFrameConditioning
from farm.render.denoise import denoise, denoise_batch, plan_shards, roundtrip, run_shards, split_roundtrip
from farm.render.engine import DenoiserStage, ModelLayout, initial_state, make_scheduler
from farm.render.families import get_family
from farm.render.reference import fit_reference
from farm.render.registry import validate_request
from tests.figures import psnr, report
from tests.render.test_i2v import PROMPT, SEED, STEPS, TOL, reference_image


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    from farm.render.tiny import build_tiny_wan_ti2v, tiny_ti2v_spec

    return tiny_ti2v_spec(build_tiny_wan_ti2v(tmp_path_factory.mktemp("models") / "wan-tiny-ti2v"))


@pytest.fixture(scope="module")
def stages(spec):
    family = get_family(spec.family)
    return family.load_encoder(spec, device="cpu"), DenoiserStage(spec, device="cpu"), family.load_decoder(spec)


def _params(spec, scheduler="unipc", size="64x64", seed=SEED):
    return validate_request(spec, prompt=PROMPT, size=size, seconds=1, steps=STEPS, seed=seed, scheduler=scheduler)


def _pipeline_latents(spec, params, image):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(spec.path)
    pipe.scheduler = make_scheduler(spec, params.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        image=fit_reference(image, params.width, params.height), prompt=PROMPT, negative_prompt=spec.negative_prompt,
        height=params.height, width=params.width, num_frames=spec.num_frames(params.seconds),
        num_inference_steps=STEPS, guidance_scale=spec.guidance_scale, max_sequence_length=spec.max_sequence_length,
        generator=torch.Generator().manual_seed(params.seed), output_type="latent",
    ).frames


def _diff(a, b) -> float:
    return float((a - b).abs().max())


def test_the_tiny_ti2v_model_is_the_expand_timesteps_layout(spec):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(spec.path)
    assert pipe.config.expand_timesteps is True and pipe.image_encoder is None and pipe.transformer_2 is None
    assert pipe.transformer.config.in_channels == 16 and pipe.transformer.config.image_dim is None
    assert ModelLayout.read(spec.path).latent_channels == 16
    assert spec.takes_image and spec.input_types == ("text", "image")


@pytest.mark.parametrize("scheduler", ["unipc", "flow-euler"])
def test_ti2v_shard_splits_match_each_other_and_diffusers(spec, stages, scheduler):
    encoder, denoiser, _ = stages
    params = _params(spec, scheduler)
    cond = encoder.encode_job(params, reference_image("x"))
    state0 = initial_state(spec, params, cond)

    whole = denoiser.run(state0, 0, STEPS)
    two = roundtrip(denoiser.run(denoiser.run(state0, 0, 3), 3, STEPS))
    ones = run_shards(denoiser.experts, state0, plan_shards(state0, 1), handoff=roundtrip)
    threes = run_shards(denoiser.experts, state0, plan_shards(state0, 3), handoff=split_roundtrip)
    reference = _pipeline_latents(spec, params, reference_image("x"))

    assert whole.latents.shape == reference.shape == (1, 16, 3, 8, 8)
    for sharded in (two, ones, threes):
        assert sharded.done and _diff(sharded.latents, whole.latents) <= TOL
    assert _diff(whole.latents, reference) <= TOL
    assert _diff(whole.latents[:, :, 1:], state0.latents[:, :, 1:]) > 0.1  # the loop moved the latents
    # The first latent frame is the image's, exactly, after every step.
    assert torch.equal(whole.latents[:, :, :1], cond.first_frame) and torch.equal(ones.latents[:, :, :1], cond.first_frame)
    worst = max(_diff(s.latents, reference) for s in (whole, two, ones, threes))
    report(f"wan-ti2v {scheduler}: max |sharded - WanImageToVideoPipeline(expand_timesteps)| = {worst:.2e} over 4 splits")


def test_ti2v_jobs_batched_equal_each_alone(spec, stages):
    encoder, denoiser, _ = stages
    states = [initial_state(spec, _params(spec, seed=SEED + n), encoder.encode_job(_params(spec), reference_image(k)))
              for n, k in enumerate("xyx")]
    batched = denoise_batch(denoiser.experts, [(s, 0, 4) for s in states])
    for state, got in zip(states, batched):
        assert _diff(got.latents, denoise(denoiser.experts, state, 0, 4).latents) <= TOL


def test_the_first_frame_follows_the_image(spec, stages):
    """The decoded first frame of a clip from image X is closer (PSNR) to X than to an unrelated Y, and
    closer to X than the first frame of a clip from Y is."""
    encoder, denoiser, decoder = stages
    params = _params(spec, size="128x96")
    first = {}
    for kind in "xy":
        cond = encoder.encode_job(params, reference_image(kind, 160))
        first[kind] = decoder.decode(denoiser.run(initial_state(spec, params, cond), 0, params.steps).latents)[0]
    x, y = (np.asarray(fit_reference(reference_image(k, 160), params.width, params.height)) for k in "xy")
    figures = {"clip_x~x": psnr(first["x"], x), "clip_x~y": psnr(first["x"], y), "clip_y~x": psnr(first["y"], x)}
    report("wan-ti2v first frame PSNR (dB): " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    assert figures["clip_x~x"] > figures["clip_x~y"] + 3.0, figures
    assert figures["clip_x~x"] > figures["clip_y~x"] + 3.0, figures


def test_ti2v_conditioning_crosses_every_boundary_and_needs_an_image(spec, stages):
    encoder, denoiser, _ = stages
    params = _params(spec)
    cond = encoder.encode_job(params, reference_image("y"))
    assert cond.first_frame.shape == (1, 16, 1, 8, 8) and cond.first_frame.dtype == torch.float32
    back = Conditioning.from_bytes(cond.to_bytes())
    assert type(back) is FirstFrameConditioning and back.family == "wan-ti2v"
    assert torch.equal(back.first_frame, cond.first_frame) and torch.equal(back.prompt_embeds, cond.prompt_embeds)
    state = roundtrip(denoiser.run(initial_state(spec, params, cond), 0, 2))
    assert state.family == "wan-ti2v" and torch.equal(state.conditioning.first_frame, cond.first_frame)
    with pytest.raises(ValueError, match="input_reference: model 'wan-tiny-ti2v' renders from an image"):
        encoder.encode_job(params)
