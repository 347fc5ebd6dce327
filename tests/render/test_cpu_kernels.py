"""The decoder's CPU kernels (farm.render.cpu_kernels) compute what diffusers' stock VAE modules compute."""

from __future__ import annotations

import torch

from farm.render.engine import DecoderStage, DenoiserStage, TextEncoderStage, initial_state
from farm.render.registry import validate_request


def _latents(spec):
    params = validate_request(spec, prompt="a lantern-lit street at dusk", size="64x64", seconds=1, steps=4, seed=7)
    state = initial_state(spec, params, TextEncoderStage(spec, device="cpu").encode(params.prompt))
    return DenoiserStage(spec, device="cpu").run(state, 0, params.steps).latents


def test_fast_kernels_decode_what_the_stock_vae_decodes(tiny_spec):
    stock = DecoderStage(tiny_spec.model_copy(update={"vae_kernels": "stock"}), device="cpu")
    fast = DecoderStage(tiny_spec, device="cpu")  # "fast" is the default on CPU
    # The fast decoder's norms and convolutions are rebound on the instance; the stock one's are not.
    rebound = lambda vae: sum("forward" in vars(m) or "_conv_forward" in vars(m) for m in vae.modules())
    assert rebound(stock.vae) == 0 and rebound(fast.vae) > 0

    latents = _latents(tiny_spec)
    cfg = stock.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.inference_mode():
        a = stock.vae.decode(latents * std + mean, return_dict=False)[0]
        b = fast.vae.decode(latents * std + mean, return_dict=False)[0]
    # The same arithmetic summed in another order: float32 rounding, far below one 8-bit level (2/255).
    assert float((a - b).abs().max()) < 1e-3
    frames_a, frames_b = stock.decode(latents), fast.decode(latents)
    assert frames_a.shape == frames_b.shape and int(abs(frames_a.astype(int) - frames_b.astype(int)).max()) <= 1
