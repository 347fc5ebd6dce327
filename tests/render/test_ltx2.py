"""LTX-2 (joint audio + video) behind the family interface: sharded equals unsharded equals
``LTX2Pipeline``'s own call, for the video latents and the audio latents; the packed state survives
every process boundary; the decoder stage makes frames and a stereo waveform."""

from __future__ import annotations

import pytest
import torch

from farm.render.conditioning import AudioVideoConditioning, Conditioning
from farm.render.denoise import plan_shards, roundtrip, run_shards, split_roundtrip
from farm.render.engine import DenoiserStage, initial_state
from farm.render.families import get_family
from farm.render.families.ltx2 import LatentGeometry
from farm.render.registry import validate_request
from tests.figures import report

STEPS = 4
SEED = 2024
PROMPT = "a red fox barks in the snow — 雪の中で吠える赤いキツネ"
TOL = 1e-5


@pytest.fixture(scope="module")
def stages(tiny_ltx2_spec):
    family = get_family("ltx2")
    return (family.load_encoder(tiny_ltx2_spec, device="cpu"), DenoiserStage(tiny_ltx2_spec, device="cpu"),
            family.load_decoder(tiny_ltx2_spec, device="cpu"))


def _params(spec, seconds=1, size="64x64"):
    return validate_request(spec, prompt=PROMPT, size=size, seconds=seconds, steps=STEPS, seed=SEED)


def _pipeline_latents(spec, params):
    """``LTX2Pipeline`` called with the farm's settings; its final video latents ``(1, C, F, H, W)`` and
    audio latents ``(1, C, L, M)``, both denormalized as ``output_type="latent"`` returns them."""
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(spec.path)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=PROMPT, negative_prompt=spec.negative_prompt, height=params.height, width=params.width,
        num_frames=spec.num_frames(params.seconds), frame_rate=float(spec.fps), num_inference_steps=STEPS,
        guidance_scale=spec.guidance_scale, audio_guidance_scale=spec.audio_guidance_scale,
        # The farm's step runs classifier-free guidance only (farm.render.families.ltx2).
        stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0,
        max_sequence_length=spec.max_sequence_length, generator=torch.Generator().manual_seed(SEED),
        output_type="latent", return_dict=False,
    )


def _unpacked(spec, decoder, state):
    """The state's packed latents as the pipeline returns them: video and audio, unpacked and denormalized."""
    shape = LatentGeometry(state.conditioning.geometry, decoder.video_channels, decoder.audio_channels)
    video, audio = shape.split(state.latents)
    video = video.reshape(1, shape.frames, shape.height, shape.width, -1).permute(0, 4, 1, 2, 3)
    mean = decoder.vae.latents_mean.view(1, -1, 1, 1, 1)
    std = decoder.vae.latents_std.view(1, -1, 1, 1, 1)
    video = video * std / decoder.vae.config.scaling_factor + mean
    audio = audio * decoder.audio_vae.latents_std + decoder.audio_vae.latents_mean
    return video, audio.unflatten(2, (-1, shape.mel_bins)).transpose(1, 2)


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def test_tiny_ltx2_loads_with_from_pretrained(tiny_ltx2_dir, tiny_ltx2_spec):
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(tiny_ltx2_dir)
    assert type(pipe.text_encoder).__name__ == "Gemma3ForConditionalGeneration"
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    # The ties MODEL-NOTES lists: caption width, stacked layers, audio channels, vocoder upsampling.
    hidden = pipe.text_encoder.config.text_config.hidden_size
    assert pipe.transformer.config.caption_channels == hidden == pipe.connectors.config.caption_channels
    assert pipe.connectors.config.text_proj_in_factor == pipe.text_encoder.config.text_config.num_hidden_layers + 1
    audio = pipe.audio_vae.config
    assert pipe.transformer.config.audio_in_channels == audio.latent_channels * audio.mel_bins // 4
    upsampling = 1
    for factor in pipe.vocoder.config.upsample_factors:
        upsampling *= factor
    assert upsampling == audio.mel_hop_length * pipe.vocoder.config.output_sampling_rate // audio.sample_rate
    assert not pipe.transformer.training and not pipe.text_encoder.training
    assert tiny_ltx2_spec.audio and tiny_ltx2_spec.schedulers == ("flow-euler",)


def test_ltx2_shard_splits_match_each_other_and_diffusers(tiny_ltx2_spec, stages):
    encoder, denoiser, decoder = stages
    params = _params(tiny_ltx2_spec)
    cond = encoder.encode_job(params)
    state0 = initial_state(tiny_ltx2_spec, params, cond)

    whole = denoiser.run(state0, 0, STEPS)
    two = roundtrip(denoiser.run(denoiser.run(state0, 0, 1), 1, STEPS))
    ones = run_shards(denoiser.experts, state0, plan_shards(state0, 1), handoff=roundtrip)
    twos = run_shards(denoiser.experts, state0, plan_shards(state0, 2), handoff=split_roundtrip)
    ref_video, ref_audio = _pipeline_latents(tiny_ltx2_spec, params)

    assert ref_video.shape == (1, 8, 2, 2, 2) and ref_audio.shape == (1, 2, 28, 4)
    worst = 0.0
    for state in (whole, two, ones, twos):
        assert state.done
        video, audio = _unpacked(tiny_ltx2_spec, decoder, state)
        assert video.shape == ref_video.shape and audio.shape == ref_audio.shape
        worst = max(worst, _max_diff(video, ref_video), _max_diff(audio, ref_audio))
        assert _max_diff(video, ref_video) <= TOL and _max_diff(audio, ref_audio) <= TOL
    start_video, start_audio = _unpacked(tiny_ltx2_spec, decoder, state0)
    assert _max_diff(start_video, ref_video) > 0.1 and _max_diff(start_audio, ref_audio) > 0.1  # both moved
    report(f"ltx2: max |sharded - LTX2Pipeline| = {worst:.2e} (video and audio latents) over 4 splits")


def test_the_audio_guidance_scale_reaches_the_audio_latents(tiny_ltx2_spec, stages):
    encoder, denoiser, decoder = stages
    params = _params(tiny_ltx2_spec)
    other = tiny_ltx2_spec.model_copy(update={"audio_guidance_scale": 1.5})
    a = denoiser.run(initial_state(tiny_ltx2_spec, params, encoder.encode_job(params)), 0, STEPS)
    cond = encoder.encode_job(params)
    b = denoiser.run(initial_state(other, params, AudioVideoConditioning(
        **{**vars(cond), "audio_guidance_scale": torch.tensor(1.5, dtype=torch.float64)})), 0, STEPS)
    video_a, audio_a = _unpacked(tiny_ltx2_spec, decoder, a)
    video_b, audio_b = _unpacked(tiny_ltx2_spec, decoder, b)
    assert _max_diff(audio_a, audio_b) > 1e-3  # its own scale guides the audio …
    assert _max_diff(video_a, video_b) > 0  # … and, through cross-attention, the video a little


def test_conditioning_round_trips_and_names_its_family(tiny_ltx2_spec, stages):
    encoder, _, _ = stages
    cond = encoder.encode_job(_params(tiny_ltx2_spec, seconds=2, size="128x96"))
    back = Conditioning.from_bytes(cond.to_bytes())
    assert isinstance(back, AudioVideoConditioning) and back.family == "ltx2"
    # 17 frames at 8 fps = 2.125 s → 3 latent frames, 96/32 × 128/32, round(2.125 × 25) = 53 audio frames.
    assert back.geometry.tolist() == [3, 3, 4, 53, 4]
    for name in ("prompt_embeds", "audio_prompt_embeds", "attention_mask", "negative_prompt_embeds"):
        assert torch.equal(getattr(back, name), getattr(cond, name))


def test_decoder_makes_frames_and_a_stereo_waveform(tiny_ltx2_spec, stages):
    encoder, denoiser, decoder = stages
    params = _params(tiny_ltx2_spec)
    state = denoiser.run(initial_state(tiny_ltx2_spec, params, encoder.encode_job(params)), 0, STEPS)
    clip = get_family("ltx2").decode_clip(decoder, state)
    assert clip.frames.shape == (9, 64, 64, 3) and clip.frames.dtype.name == "uint8"
    assert clip.sample_rate == 16000 and clip.audio.shape[0] == 2 and clip.audio.dtype.name == "float32"
    seconds = clip.audio.shape[1] / clip.sample_rate
    assert abs(seconds - 9 / 8) < 0.05  # about the video's 1.125 s (the causal audio decode is shorter)
    assert float(abs(clip.audio).max()) <= 1.0
    with pytest.raises(ValueError, match="LTX-2 latents decode with their conditioning"):
        decoder.decode(state.latents)


def test_wrong_inputs_are_refused_by_name(tiny_ltx2_spec, tiny_spec, stages):
    encoder, denoiser, _ = stages
    params = _params(tiny_ltx2_spec)
    with pytest.raises(ValueError, match="input_reference: model 'ltx2-tiny' renders from text only"):
        encoder.encode_job(params, image=object())
    wan_cond = Conditioning(torch.zeros(1, 4, 32), None)
    with pytest.raises(ValueError, match="model 'ltx2-tiny' is family 'ltx2', but the conditioning is 'wan'"):
        initial_state(tiny_ltx2_spec, params, wan_cond)
    with pytest.raises(ValueError, match="scheduler: 'unipc' is not supported by model 'ltx2-tiny'; allowed: flow-euler"):
        validate_request(tiny_ltx2_spec, prompt="x", size="64x64", seconds=1, steps=2, seed=0, scheduler="unipc")
    with pytest.raises(ValueError, match="audio: model 'wan-tiny' makes no audio track"):
        validate_request(tiny_spec, prompt="x", size="64x64", seconds=1, steps=2, seed=0, audio=True)
    assert validate_request(tiny_ltx2_spec, prompt="x", size="64x64", seconds=1, steps=2, seed=0).audio is True
    assert validate_request(tiny_ltx2_spec, prompt="x", size="64x64", seconds=1, steps=2, seed=0,
                            audio=False).audio is False
    assert validate_request(tiny_spec, prompt="x", size="64x64", seconds=1, steps=2, seed=0).audio is False


def test_ltx2_specs_keep_the_vae_shapes():
    from farm.render.registry import ModelSpec

    with pytest.raises(ValueError, match="size '48x64': family 'ltx2' needs width and height multiples of 32"):
        ModelSpec(id="x", path="/x", family="ltx2", fps=8, sizes=["48x64"], seconds=[1])
    with pytest.raises(ValueError, match="seconds=1 at fps=12: family 'ltx2' needs seconds\\*fps to be a multiple of 8"):
        ModelSpec(id="x", path="/x", family="ltx2", fps=12, sizes=["64x64"], seconds=[1])
    with pytest.raises(ValueError, match="audio_guidance_scale: family 'wan' makes no audio"):
        ModelSpec(id="x", path="/x", fps=8, sizes=["64x64"], seconds=[1], audio_guidance_scale=3.0)
    with pytest.raises(ValueError, match="compile: not supported for family 'ltx2'"):
        ModelSpec(id="x", path="/x", family="ltx2", fps=8, sizes=["64x64"], seconds=[1], compile=True)
