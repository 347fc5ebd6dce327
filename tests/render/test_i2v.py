"""Wan 2.1 image-to-video behind the family interface: sharded equals unsharded equals
``WanImageToVideoPipeline``, and the conditioning survives every process boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from farm.render.conditioning import Conditioning, ImageConditioning
from farm.render.denoise import DenoiseState, plan_shards, roundtrip, run_shards, split_roundtrip
from farm.render.engine import DenoiserStage, ModelLayout, TextEncoderStage, initial_state, make_scheduler
from farm.render.families import get_family
from farm.render.reference import fit_reference
from farm.render.registry import ModelSpec, validate_request
from tests.figures import psnr, report

STEPS = 8
SEED = 4321
PROMPT = "a red fox turns its head — 雪の中の赤いキツネ"
TOL = 1e-5


def reference_image(kind: str, size: int = 96) -> Image.Image:
    """Two unrelated test pictures: a smooth colour gradient ("x") and a hard checkerboard ("y")."""
    y, x = np.mgrid[0:size, 0:size] / size
    if kind == "x":
        pixels = np.stack([x, y, 0.5 + 0 * x], axis=-1)
    else:
        pixels = np.stack([(x * 8).astype(int) % 2, 1 - y, (y * 8).astype(int) % 2], axis=-1).astype(float)
    return Image.fromarray((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def stages(tiny_i2v_spec):
    family = get_family(tiny_i2v_spec.family)
    return family.load_encoder(tiny_i2v_spec, device="cpu"), DenoiserStage(tiny_i2v_spec, device="cpu")


def _params(spec, scheduler="unipc", size="64x64"):
    return validate_request(spec, prompt=PROMPT, size=size, seconds=1, steps=STEPS, seed=SEED, scheduler=scheduler)


def _reference_latents(spec, params, image):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(spec.path)
    pipe.scheduler = make_scheduler(spec, params.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        image=fit_reference(image, params.width, params.height),  # the same fitted frame the encoder sees
        prompt=PROMPT,
        negative_prompt=spec.negative_prompt,
        height=params.height,
        width=params.width,
        num_frames=spec.num_frames(params.seconds),
        num_inference_steps=STEPS,
        guidance_scale=spec.guidance_scale,
        max_sequence_length=spec.max_sequence_length,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def test_tiny_i2v_model_loads_with_from_pretrained(tiny_i2v_dir, tiny_i2v_spec):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_i2v_dir)
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModel"
    assert pipe.image_processor is not None
    assert pipe.transformer.config.in_channels == 36 and pipe.transformer.config.image_dim == 32
    assert not pipe.transformer.training and not pipe.image_encoder.training
    layout = ModelLayout.read(str(tiny_i2v_dir))
    assert layout.latent_channels == 16  # the VAE's, not the transformer's 36
    assert tiny_i2v_spec.takes_image and tiny_i2v_spec.family == "wan-i2v"


@pytest.mark.parametrize("scheduler", ["unipc", "flow-euler"])
def test_i2v_shard_splits_match_each_other_and_diffusers(tiny_i2v_spec, stages, scheduler):
    encoder, denoiser = stages
    params = _params(tiny_i2v_spec, scheduler)
    cond = encoder.encode_job(params, reference_image("x"))
    state0 = initial_state(tiny_i2v_spec, params, cond)

    whole = denoiser.run(state0, 0, STEPS)
    two = roundtrip(denoiser.run(denoiser.run(state0, 0, 3), 3, STEPS))
    ones = run_shards(denoiser.experts, state0, plan_shards(state0, 1), handoff=roundtrip)
    threes = run_shards(denoiser.experts, state0, plan_shards(state0, 3), handoff=split_roundtrip)
    reference = _reference_latents(tiny_i2v_spec, params, reference_image("x"))

    assert whole.latents.shape == reference.shape == (1, 16, 3, 8, 8)
    for sharded in (two, ones, threes):
        assert sharded.done and _max_diff(sharded.latents, whole.latents) <= TOL
    assert _max_diff(whole.latents, reference) <= TOL
    assert _max_diff(whole.latents, state0.latents) > 0.1  # the loop moved the latents
    worst = max(_max_diff(s.latents, reference) for s in (whole, two, ones, threes))
    report(f"wan-i2v {scheduler}: max |sharded - WanImageToVideoPipeline| = {worst:.2e} over 4 splits")


def test_the_image_conditions_the_run(tiny_i2v_spec, stages):
    """Another image gives another clip from the same seed and prompt: the condition reaches the model."""
    encoder, denoiser = stages
    params = _params(tiny_i2v_spec)
    x, y = (encoder.encode_job(params, reference_image(k)) for k in "xy")
    assert _max_diff(x.condition, y.condition) > 0 and _max_diff(x.image_embeds, y.image_embeds) > 0
    assert torch.equal(x.prompt_embeds, y.prompt_embeds)
    latents = [denoiser.run(initial_state(tiny_i2v_spec, params, c), 0, STEPS).latents for c in (x, y)]
    assert _max_diff(*latents) > 1e-2


def test_condition_layout(tiny_i2v_spec, stages):
    encoder, _ = stages
    params = _params(tiny_i2v_spec, size="128x96")
    cond = encoder.encode_job(params, reference_image("x", 200))
    assert cond.condition.shape == (1, 20, 3, 96 // 8, 128 // 8)  # 4 mask + 16 latent channels, 9 frames → 3
    assert cond.condition.dtype == torch.float32 and cond.condition.device == torch.device("cpu")
    mask = cond.condition[:, :4]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)  # only the first frame is pinned
    assert cond.image_embeds.shape == (1, 17, 32)  # CLIP's 16 patches + class token, penultimate layer


def test_image_conditioning_crosses_every_boundary(tiny_i2v_spec, stages):
    encoder, denoiser = stages
    params = _params(tiny_i2v_spec)
    cond = encoder.encode_job(params, reference_image("y"))
    back = Conditioning.from_bytes(cond.to_bytes())
    assert type(back) is ImageConditioning and back.family == "wan-i2v"
    for name, tensor in cond.tensors().items():
        assert torch.equal(getattr(back, name), tensor), name

    state = denoiser.run(initial_state(tiny_i2v_spec, params, cond), 0, 3)
    assert state.family == "wan-i2v"
    whole = DenoiseState.from_bytes(state.to_bytes())
    assert type(whole.conditioning) is ImageConditioning
    assert torch.equal(whole.conditioning.condition, cond.condition)
    with pytest.raises(ValueError, match="without the conditioning"):
        DenoiseState.from_bytes(state.to_bytes(include_conditioning=False))


def test_wrong_inputs_are_refused_by_name(tiny_spec, tiny_i2v_spec, stages):
    encoder, _ = stages
    params = _params(tiny_i2v_spec)
    with pytest.raises(ValueError, match="input_reference: model 'wan-tiny-i2v' renders from an image"):
        encoder.encode_job(params, None)
    t2v_params = validate_request(tiny_spec, prompt=PROMPT, size="64x64", seconds=1, steps=STEPS, seed=SEED)
    text_only = TextEncoderStage(tiny_spec, device="cpu")
    with pytest.raises(ValueError, match="input_reference: model 'wan-tiny' renders from text only"):
        text_only.encode_job(t2v_params, reference_image("x"))
    with pytest.raises(ValueError, match="family 'wan-i2v', but the conditioning is 'wan''s"):
        initial_state(tiny_i2v_spec, params, text_only.encode(PROMPT))
    with pytest.raises(ValueError, match="family: 'ltx' is not known"):
        get_family("ltx")
    with pytest.raises(ValueError, match="needs 512"):
        ModelSpec.model_validate({**tiny_i2v_spec.model_dump(), "max_sequence_length": 64})


def _first_frame_psnrs(spec, encoder, denoiser, decoder, params) -> dict[str, float]:
    first = {}
    for kind in "xy":
        state = denoiser.run(initial_state(spec, params, encoder.encode_job(params, reference_image(kind, 160))), 0,
                             params.steps)
        first[kind] = decoder.decode(state.latents)[0]
    x, y = (np.asarray(fit_reference(reference_image(k, 160), params.width, params.height)) for k in "xy")
    return {"clip_x~x": psnr(first["x"], x), "clip_x~y": psnr(first["x"], y), "clip_y~x": psnr(first["y"], x)}


def test_first_frame_follows_the_image_with_trained_weights():
    """The decoded first frame of a clip from image X is closer (PSNR) to X than to an unrelated Y, and
    closer to X than a clip from Y is. Needs trained weights (FARM_TEST_I2V_MODEL): the tiny model's VAE
    reconstructs images (tests/render/test_tiny_vae.py), but its random transformer does not keep the
    image: measured at 64², clip_x~x 9.0 dB, clip_x~y 5.7 dB, clip_y~x 9.3 dB (X is not followed)."""
    from farm import env

    path = env.i2v_test_model()
    if path is None:
        pytest.skip("set FARM_TEST_I2V_MODEL to a saved Wan 2.1 I2V pipeline with trained weights")
    spec = ModelSpec(id="wan-i2v-real", family="wan-i2v", path=path, fps=16, sizes=["832x480", "480x832"],
                     seconds=[1], default_steps=30, guidance_scale=5.0, max_sequence_length=512)
    family = get_family(spec.family)
    params = validate_request(spec, prompt="a photo", size="832x480", seconds=1, steps=30, seed=SEED)
    figures = _first_frame_psnrs(spec, family.load_encoder(spec), DenoiserStage(spec), family.load_decoder(spec),
                                 params)
    assert figures["clip_x~x"] > figures["clip_x~y"] + 3.0, figures
    assert figures["clip_x~x"] > figures["clip_y~x"] + 3.0, figures


def test_tiny_models_are_built_by_id(tmp_path):
    from farm.render.tiny import build_tiny_by_id, is_tiny_id

    assert is_tiny_id("wan-tiny-i2v") and is_tiny_id("wan-tiny-2x") and not is_tiny_id("wan2.1-i2v-14b")
    with pytest.raises(ValueError, match="'wan2.1-i2v-14b' is not a tiny model; tiny ones: wan-tiny, wan-tiny-2x"):
        build_tiny_by_id("wan2.1-i2v-14b", tmp_path / "x")
    index = build_tiny_by_id("wan-tiny-i2v", tmp_path / "i2v") / "model_index.json"
    assert "WanImageToVideoPipeline" in index.read_text()


def test_stored_reference_bytes_open_or_fail_by_name():
    import io

    from farm.render.reference import open_reference

    buffer = io.BytesIO()
    reference_image("x").save(buffer, "WEBP")
    assert open_reference(buffer.getvalue()).size == (96, 96)
    buffer = io.BytesIO()
    reference_image("x").save(buffer, "GIF")
    with pytest.raises(ValueError, match="input_reference: the stored bytes are not a PNG/JPEG/WEBP image"):
        open_reference(buffer.getvalue())


def test_conditioning_bytes_of_an_unknown_family_are_refused_by_name():
    from farm.render.conditioning import CONDITIONING_FORMAT, CONDITIONING_KIND, save_payload

    data = save_payload({"format": CONDITIONING_FORMAT, "kind": CONDITIONING_KIND, "family": "hunyuan",
                         "prompt_embeds": torch.zeros(1, 4, 32), "negative_prompt_embeds": None})
    with pytest.raises(ValueError, match="unknown conditioning family 'hunyuan'; known: ltx2, wan, wan-i2v"):
        Conditioning.from_bytes(data)
    data = save_payload({"format": CONDITIONING_FORMAT, "kind": CONDITIONING_KIND, "family": "wan-i2v",
                         "prompt_embeds": torch.zeros(1, 4, 32), "negative_prompt_embeds": None})
    with pytest.raises(ValueError, match="the 'wan-i2v' conditioning lacks condition, image_embeds"):
        Conditioning.from_bytes(data)
