"""The tiny Wan VAE reconstructs images (farm.render.tiny_vae), so a test can tell clips apart by
what they were made from; the figures (reconstruction and first-frame PSNR) go to the summary."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from farm.render.engine import DenoiserStage
from farm.render.families import get_family
from farm.render.reference import fit_reference
from farm.render.registry import validate_request
from farm.render.tiny import TINY_VAE
from farm.render.tiny_vae import (
    pass_through_init,
    psnr,
    reconstructing_vae,
    reconstruction_psnr,
    synthetic_clips,
    synthetic_images,
)
from tests.figures import psnr as psnr_8bit, report
from tests.render.test_i2v import PROMPT, SEED, _first_frame_psnrs, reference_image

HELD_OUT = 1234  # the latent statistics use seed 0; these pictures are others


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return reconstructing_vae(TINY_VAE)


@pytest.mark.parametrize("size", [64, 128])
def test_held_out_pictures_come_back(vae, size):
    pictures = synthetic_images(16, size, HELD_OUT)
    scores = reconstruction_psnr(vae, pictures)
    kinds = ["gradient", "blobs", "checker", "square"]  # synthetic_images cycles through them in this order
    by_kind = {kind: statistics.median(scores[i::4]) for i, kind in enumerate(kinds)}
    report(f"tiny VAE {size}²: reconstruction PSNR median {statistics.median(scores):.1f} dB, worst "
           f"{min(scores):.1f} dB; by kind " + ", ".join(f"{k} {v:.1f}" for k, v in by_kind.items()))
    assert statistics.median(scores) >= 25.0, scores
    assert min(scores) >= 15.0, scores  # hard checkerboard edges not on the 8-pixel grid are the worst case
    # Different inputs give clearly different outputs: each decode is far closer to its own input.
    with torch.no_grad():
        out = vae.decode(vae.encode(pictures).latent_dist.mode()).sample
    for i in range(len(pictures)):
        assert psnr(out[i], pictures[i]) > psnr(out[i], pictures[(i + 1) % len(pictures)]) + 6.0, i


def test_moving_clips_come_back_frame_by_frame(vae):
    clips = synthetic_clips(4, 9, 64, HELD_OUT)  # 9 frames: the first alone, then two groups of four
    with torch.no_grad():
        out = vae.decode(vae.encode(clips).latent_dist.mode()).sample
    per_frame = [[psnr(out[c, :, t], clips[c, :, t]) for t in range(9)] for c in range(len(clips))]
    worst = min(min(frames) for frames in per_frame)
    report(f"tiny VAE clips 64², 9 frames: reconstruction PSNR median "
           f"{statistics.median(sum(per_frame, [])):.1f} dB, worst frame {worst:.1f} dB")
    assert statistics.median(sum(per_frame, [])) >= 20.0, per_frame
    assert min(frames[0] for frames in per_frame) >= 20.0, per_frame  # the first frame has its own latent
    # Four frames share one latent frame (their average), so a fast-moving checkerboard blurs to
    # ~13 dB (measured, 2 dB above the nearest other clip); each decoded clip is nearer its own clip
    # than any other.
    for c in range(len(clips)):
        others = [psnr(out[c], clips[o]) for o in range(len(clips)) if o != c]
        assert psnr(out[c], clips[c]) > max(others), (c, others)


def test_the_fit_is_deterministic_cached_and_leaves_the_callers_stream_alone():
    """Two builds from different seeds get bit-equal VAEs; the builder's random stream continues as
    if the VAE were random (its transformers do not move); the fit runs once per process and key."""
    from diffusers import AutoencoderKLWan

    from farm.render import tiny_vae

    vaes, after = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vaes.append(reconstructing_vae(TINY_VAE))
        after.append(torch.rand(3))
        torch.manual_seed(seed)
        AutoencoderKLWan(**TINY_VAE)
        assert torch.equal(after[-1], torch.rand(3))
    assert vaes[0].config.latents_std == vaes[1].config.latents_std
    for name, tensor in vaes[0].state_dict().items():
        assert torch.equal(tensor, vaes[1].state_dict()[name]), name
    assert list(tiny_vae._FITTED) == [tiny_vae.fit_key(TINY_VAE)]
    assert tiny_vae.fit_key(TINY_VAE) != tiny_vae.fit_key(TINY_VAE, tiny_vae.VaeFit(steps=61))
    with pytest.raises(ValueError, match="kind: 'stripes' is not known"):
        tiny_vae.synthetic_frame("stripes", torch.Generator(), 8)
    with pytest.raises(ValueError, match=r"base_dim: 3 with dim_mult \[1, 1, 1, 1\] leaves 1 channel\(s\) on the way; "
                                         r"passing RGB through needs 4"):
        pass_through_init(AutoencoderKLWan(**TINY_VAE | {"base_dim": 3, "dim_mult": [1, 1, 1, 1]}))


def test_the_fine_tune_improves_on_the_construction(vae):
    """The fitted weights reconstruct held-out pictures better than the constructed ones they start from."""
    from diffusers import AutoencoderKLWan

    constructed = AutoencoderKLWan(**TINY_VAE)
    pass_through_init(constructed)
    pictures = synthetic_images(16, 128, HELD_OUT)
    before = statistics.mean(reconstruction_psnr(constructed.eval(), pictures))
    after = statistics.mean(reconstruction_psnr(vae, pictures))
    report(f"tiny VAE 128²: mean reconstruction PSNR {before:.1f} dB constructed, {after:.1f} dB fitted")
    assert after > before, (before, after)  # measured: 31.8 → 32.5 dB (median on gradients 37.5 → 39.5)


def test_every_tiny_model_saves_the_same_reconstructing_vae(tiny_model_dir, tiny_model_2x_dir, tiny_i2v_dir):
    from diffusers import AutoencoderKLWan

    loaded = [AutoencoderKLWan.from_pretrained(d, subfolder="vae").eval() for d in
              (tiny_model_dir, tiny_model_2x_dir, tiny_i2v_dir)]
    assert not any(v.training for v in loaded)
    first = loaded[0]
    assert first.config.base_dim == TINY_VAE["base_dim"]
    assert first.config.latents_std[0] != 2.8184  # measured statistics, not Wan 2.1's defaults
    for other in loaded[1:]:
        assert other.config.latents_mean == first.config.latents_mean
        assert other.config.latents_std == first.config.latents_std
        probe = synthetic_images(2, 32, HELD_OUT)
        with torch.no_grad():
            assert torch.equal(first.decode(first.encode(probe).latent_dist.mode()).sample,
                               other.decode(other.encode(probe).latent_dist.mode()).sample)
    assert statistics.median(reconstruction_psnr(first, synthetic_images(8, 64, HELD_OUT))) >= 25.0


def test_i2v_condition_carries_the_image_and_first_frame_figures(tiny_i2v_spec):
    """The image-to-video condition's latents decode back to the reference image (and not to an
    unrelated one). The decoded first frames of clips from the tiny model's random transformer are
    printed beside it: they do not follow the image (measured; see test_i2v's first-frame test)."""
    family = get_family(tiny_i2v_spec.family)
    encoder = family.load_encoder(tiny_i2v_spec, device="cpu")
    decoder = family.load_decoder(tiny_i2v_spec, device="cpu")
    params = validate_request(tiny_i2v_spec, prompt=PROMPT, size="64x64", seconds=1, steps=8, seed=SEED)
    target = {k: np.asarray(fit_reference(reference_image(k, 160), params.width, params.height)) for k in "xy"}
    back = {}
    for kind in "xy":
        cond = encoder.encode_job(params, reference_image(kind, 160))
        back[kind] = decoder.decode(cond.condition[:, 4:])[0]  # mask channels off; the latents are normalized
    figures = {f"{a}~{b}": psnr_8bit(back[a], target[b]) for a in "xy" for b in "xy"}
    clip = _first_frame_psnrs(tiny_i2v_spec, encoder, DenoiserStage(tiny_i2v_spec, device="cpu"), decoder, params)
    report("tiny i2v 64²: condition decoded vs image " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
           + " dB; first frame of the clip (random transformer) " + ", ".join(f"{k} {v:.1f}" for k, v in clip.items())
           + " dB")
    assert figures["x~x"] >= 20.0 and figures["y~y"] >= 15.0, figures
    assert figures["x~x"] > figures["x~y"] + 3.0 and figures["y~y"] > figures["y~x"] + 3.0, figures
    assert figures["x~x"] > figures["y~x"] + 3.0, figures
