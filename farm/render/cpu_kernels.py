"""Faster CPU kernels for the Wan VAE: the same arithmetic through kernels PyTorch does not pick itself.

Profiled on the tiny VAE (one thread, a 256x256, 33-frame decode of 4.1 s), two ops took 93 % of
the time:

- ``aten::slow_conv3d_forward`` (63 %): for a batch of one, PyTorch's convolution heuristic sends a
  3x3x3 convolution over few channels (N*C*D*H <= 20480) to its native kernel instead of oneDNN; oneDNN
  runs the same convolution ~8x faster. A real Wan VAE (96+ channels) already gets oneDNN: its gain
  here is the tiny model's, and on CUDA nothing changes (the decoder applies this on CPU only).
- ``aten::linalg_vector_norm`` (30 %): ``F.normalize(x, dim=1)`` in ``WanRMS_norm`` reduces over the
  channel axis with a strided norm kernel; ``sqrt(sum(x * x))`` is the same L2 norm through the
  vectorised sum kernel, ~16x faster, at any width.

With both, that decode takes 0.75 s. The results are not bit-identical to the stock modules (oneDNN sums
in another order): pixels of a decoded clip differ by rounding (``bench/bench_throughput.py`` prints the
PSNR against stock). ``ModelSpec.vae_kernels: stock`` keeps diffusers' modules as they are.
"""

from __future__ import annotations

import types

import torch

_EPS = 1e-12  # F.normalize's default: x / max(||x||, eps)


def _onednn_conv(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # nn.ConvNd.forward calls _conv_forward; Wan's causal conv has already padded (its padding is 0).
    return torch.mkldnn_convolution(input.contiguous(), weight, bias, self.padding, self.stride, self.dilation,
                                    self.groups)


def _sum_of_squares_rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    dim = 1 if self.channel_first else -1
    return x / (x * x).sum(dim, keepdim=True).sqrt().clamp_min(_EPS) * self.scale * self.gamma + self.bias


def use_fast_cpu_kernels(vae: torch.nn.Module) -> int:
    """Rebind the convolutions and RMS norms of a float32 CPU Wan VAE in place; returns how many modules
    changed. Convolutions with a padding mode other than zeros keep their own path."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    changed = 0
    for module in vae.modules():
        if isinstance(module, WanRMS_norm):
            module.forward = types.MethodType(_sum_of_squares_rms_norm, module)
            changed += 1
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.padding_mode == "zeros" \
                and not isinstance(module.padding, str) \
                and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module._conv_forward = types.MethodType(_onednn_conv, module)
            changed += 1
    return changed
