"""The tiny Wan VAE, set to reconstruct images, so the tiny models' clips can follow their inputs.

A random-weight ``AutoencoderKLWan`` decodes every latent to about the same frame (11 dB against
any input), so no test could show that a clip follows an input image or derives from a source
clip. The tiny builders (:mod:`farm.render.tiny`) therefore use :func:`reconstructing_vae`:

1. weights set by construction (:func:`pass_through_init`): a near-linear autoencoder that keeps
   each 8×8 block's mean colour in latent channels 0-2 and repeats it back;
2. a short deterministic fine-tune of them (:class:`VaeFit`: Adam, 60 steps on generated 32²
   pictures, one CPU thread, fixed seeds; a few seconds), cached per process by a hash of its inputs;
3. latent statistics (``latents_mean`` / ``latents_std``) measured on generated pictures.

Nothing is downloaded. Why not a fit from random weights: measured on one core (base_dim 3-16),
a few hundred Adam steps (~40 s) stayed at about the mean frame (~12 dB held-out PSNR); the network
only starts to pass pictures through after far longer than a build can spend. The fine-tune from
the constructed weights gains little but real (held-out 128² mean 31.8 → 32.5 dB, most on smooth
gradients). Only low-frequency content comes back; :func:`reconstruction_psnr` measures it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

# Generated pictures: the fit's, the latent statistics' and the tests' -------------------------
_KINDS = ("gradient", "blobs", "checker", "square")


def _uniform(g: torch.Generator, *shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=g)


def synthetic_frame(kind: str, g: torch.Generator, size: int, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """One generated picture in [-1, 1], shape (3, size, size); ``shift`` moves its content (for clips)."""
    axis = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    xx, yy = xx - shift[0], yy - shift[1]
    if kind == "gradient":
        a, b, c = (_uniform(g, 3, 1, 1) for _ in range(3))
        return (a * xx + b * yy + c).clamp(-1, 1)
    if kind == "blobs":
        img = _uniform(g, 3, 1, 1, low=-0.5, high=0.5).expand(3, size, size)
        for _ in range(3):
            cx, cy, r = torch.rand(3, generator=g).tolist()
            weight = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.08 + 0.2 * r) ** 2))
            img = img * (1 - weight) + _uniform(g, 3, 1, 1) * weight
        return img
    if kind == "checker":
        # 2-6 cells across: hard edges, rarely on the 8-pixel latent grid (the hardest kind here).
        cells = 2 + int(torch.randint(0, 5, (1,), generator=g))
        on = ((xx * cells).floor() + (yy * cells).floor()).remainder(2)
        return _uniform(g, 3, 1, 1) * on + _uniform(g, 3, 1, 1) * (1 - on)
    if kind == "square":
        cx, cy, r = torch.rand(3, generator=g).tolist()
        inside = ((xx - cx).abs() < 0.12 + 0.15 * r) & ((yy - cy).abs() < 0.12 + 0.15 * r)
        return torch.where(inside, _uniform(g, 3, 1, 1), _uniform(g, 3, 1, 1))
    raise ValueError(f"kind: {kind!r} is not known; known: {', '.join(_KINDS)}")


def synthetic_images(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` pictures cycling through every kind, shape (count, 3, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([synthetic_frame(_KINDS[i % len(_KINDS)], g, size) for i in range(count)]).unsqueeze(2)


def synthetic_clips(count: int, frames: int, size: int, seed: int) -> torch.Tensor:
    """``count`` clips whose picture drifts up to 6% of its width a frame, shape (count, 3, frames, size, size)."""
    motion = torch.Generator().manual_seed(seed)
    clips = []
    for i in range(count):
        velocity = _uniform(motion, 2, low=-0.06, high=0.06).tolist()
        # The same picture every frame (its own generator, reseeded), only moved.
        shots = [synthetic_frame(_KINDS[i % len(_KINDS)], torch.Generator().manual_seed(seed * 7919 + i), size,
                                 (velocity[0] * t, velocity[1] * t)) for t in range(frames)]
        clips.append(torch.stack(shots, dim=1))
    return torch.stack(clips)


_SIGNAL = 3  # channels 0-2 carry RGB through the network
_LEVEL = 20.0  # channel 3 carries this constant, so the RMS norms before each head barely rescale RGB
_SMALL = 0.05  # RGB enters the heads' SiLU this small, where SiLU(x) ≈ x / 2


@torch.no_grad()
def pass_through_init(vae) -> None:
    """Set a fresh ``AutoencoderKLWan`` (in place) to a near-linear autoencoder of RGB.

    The encoder averages each 8×8 block of RGB into latent channels 0-2; the decoder repeats it
    back (nearest-neighbour, as its upsamplers do). Needs four channels on every layer of the way
    (RGB and the constant channel; the decoder's upsamplers halve theirs): ValueError else.
    Every residual branch and attention output starts at zero (an identity block); convolutions
    pass RGB on their latest time tap and centre (or 2×2-average) spatial taps, and the encoder's
    time halvings average three frames; a constant channel keeps the two output heads' RMS norms
    from rescaling RGB, and a small gain keeps their SiLU in its linear range.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResample, WanResidualBlock

    # The narrowest layer on the path: the full-resolution ones, and the decoder's upsamplers (they halve).
    narrowest = min([vae.config.base_dim * min(vae.config.dim_mult)]
                    + [m.resample[1].out_channels for m in vae.decoder.modules()
                       if isinstance(m, WanResample) and m.mode.startswith("up")])
    if narrowest < _SIGNAL + 1:
        raise ValueError(f"base_dim: {vae.config.base_dim} with dim_mult {list(vae.config.dim_mult)} leaves "
                         f"{narrowest} channel(s) on the way; passing RGB through needs {_SIGNAL + 1}")

    def zero(conv) -> None:
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()

    def pass_on(conv, channels: int, gain: float = 1.0, out_offsets=(0,)) -> None:
        """Channel c in → channel offset + c out, on the centre spatial tap and the latest time tap."""
        zero(conv)
        w = conv.weight
        centre = [k // 2 for k in w.shape[2:]]
        if w.dim() == 5:  # causal in time: the last tap is the current frame
            centre[0] = w.shape[2] - 1
        for offset in out_offsets:
            for c in range(channels):
                w[(offset + c, c, *centre)] = gain

    for module in vae.modules():
        if isinstance(module, WanResidualBlock):
            zero(module.conv2)
            if isinstance(module.conv_shortcut, torch.nn.Conv3d):
                pass_on(module.conv_shortcut, _SIGNAL + 1)
        elif isinstance(module, WanAttentionBlock):
            zero(module.proj)
        elif isinstance(module, WanResample) and module.mode != "none":
            conv = module.resample[1]
            if module.mode.startswith("down"):  # stride 2 after padding right/bottom: average the 2×2 block
                zero(conv)
                for c in range(_SIGNAL + 1):
                    conv.weight[c, c, :2, :2] = 0.25
            else:
                pass_on(conv, _SIGNAL + 1)
            if module.mode == "upsample3d":  # each latent frame becomes two, both repeating it
                pass_on(module.time_conv, _SIGNAL + 1, out_offsets=(0, module.dim))
            elif module.mode == "downsample3d":
                # Halve time by averaging three frames: measured, a moving picture then comes back
                # nearer in its worst frame than when one frame of the three is kept.
                zero(module.time_conv)
                for c in range(_SIGNAL + 1):
                    module.time_conv.weight[c, c, :, 0, 0] = 1.0 / 3

    for half in (vae.encoder, vae.decoder):
        pass_on(half.conv_in, _SIGNAL)
        half.conv_in.bias[_SIGNAL] = _LEVEL
        gamma = half.norm_out.gamma
        gamma.zero_()
        gamma[:_SIGNAL] = _SMALL * _LEVEL / half.norm_out.scale
        pass_on(half.conv_out, _SIGNAL, gain=2.0 / _SMALL)
    pass_on(vae.quant_conv, vae.quant_conv.in_channels)
    pass_on(vae.post_quant_conv, vae.post_quant_conv.in_channels)


def set_latent_statistics(vae, pictures: torch.Tensor) -> None:
    """Record the per-channel mean and spread of ``pictures``' latents as the VAE's ``latents_mean`` /
    ``latents_std``, so the pipelines' normalized latents are about unit scale (as with real Wan).
    Channels the pictures leave at zero get spread 1: they stay zero either way."""
    with torch.no_grad():
        latents = vae.encode(pictures).latent_dist.mode()
    per_channel = latents.transpose(0, 1).flatten(1)
    spread = per_channel.std(1)
    spread = torch.where(spread < 1e-3, torch.ones_like(spread), spread)
    vae.register_to_config(latents_mean=per_channel.mean(1).tolist(), latents_std=spread.tolist())


@dataclass(frozen=True)
class VaeFit:
    """The fine-tune after :func:`pass_through_init`: Adam on generated pictures, on CPU, one thread.
    Any change here is another fit (and another cache key)."""

    seed: int = 0
    steps: int = 60
    lr: float = 1e-4  # measured: 3e-4 gains less, 5e-4 with clips in the loss loses ~16 dB on gradients
    size: int = 32  # training pictures are size×size; the VAE is convolutional, so it decodes any size
    batch: int = 8
    pool: int = 96  # distinct pictures the batches are drawn from (seed + 5; the statistics use seed 0)


DEFAULT_FIT = VaeFit()
_FITTED: dict[str, dict[str, torch.Tensor]] = {}
_FITTED_LOCK = threading.Lock()


def fit_key(vae_config: dict, fit: VaeFit = DEFAULT_FIT) -> str:
    """A hash of everything the fitted weights depend on: the VAE config, the fit, torch and diffusers."""
    import diffusers

    blob = json.dumps({"vae": vae_config, "fit": asdict(fit), "torch": torch.__version__,
                       "diffusers": diffusers.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fit(vae_config: dict, fit: VaeFit) -> dict[str, torch.Tensor]:
    """Construct (:func:`pass_through_init`) and fine-tune a VAE from ``fit.seed``; its state dict.

    Deterministic: fixed seeds, one torch thread (the same sums in the same order), the caller's
    random stream and thread count left as they were. It trains, so it runs with gradients on."""
    from diffusers import AutoencoderKLWan

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fit.seed)
            vae = AutoencoderKLWan(**vae_config)
            pass_through_init(vae)
            pictures = synthetic_images(fit.pool, fit.size, fit.seed + 5)
            order = torch.Generator().manual_seed(fit.seed + 3)
            optimizer = torch.optim.Adam(vae.parameters(), lr=fit.lr)
            vae.train()
            for _ in range(fit.steps):
                batch = pictures[torch.randperm(fit.pool, generator=order)[: fit.batch]]
                out = vae.decode(vae.encode(batch).latent_dist.mode()).sample
                loss = torch.nn.functional.mse_loss(out, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            vae.eval()
    finally:
        torch.set_num_threads(threads)
    log.info("fitted the tiny VAE in %.1f s (%d steps)", time.perf_counter() - started, fit.steps)
    return {name: t.detach().clone() for name, t in vae.state_dict().items()}


def reconstructing_vae(vae_config: dict, fit: VaeFit = DEFAULT_FIT):
    """A new ``AutoencoderKLWan`` of ``vae_config`` (eval mode) that reconstructs images: the weights of
    :func:`_fit`, and latent statistics from 32 generated pictures at 32².

    The VAE is first drawn from the caller's random stream, as a random one would be, so a builder's
    later draws (its transformers) do not move; its weights are then replaced by the fitted ones,
    which depend on ``fit`` only. Fitted once per process per :func:`fit_key` (every tiny model
    shares the VAE config, so a test session or ``farm up`` pays one fit)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**vae_config)
    key = fit_key(vae_config, fit)
    with _FITTED_LOCK:
        if key not in _FITTED:
            _FITTED[key] = _fit(vae_config, fit)
        vae.load_state_dict(_FITTED[key])  # copies into vae's own tensors: the cached ones stay as fitted
    vae.eval()
    set_latent_statistics(vae, synthetic_images(32, 32, seed=0))
    return vae


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two pixel tensors in [-1, 1]."""
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def reconstruction_psnr(vae, frames: torch.Tensor) -> list[float]:
    """PSNR (dB) of each of ``frames`` (N, 3, T, H, W in [-1, 1]) against its encode → decode."""
    out = vae.decode(vae.encode(frames).latent_dist.mode()).sample
    return [psnr(o, f) for o, f in zip(out, frames)]
