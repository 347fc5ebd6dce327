"""The device contract on CUDA: sharded equals unsharded with SDPA and xformers; states travel on CPU.

Deselected from ``make test`` (pyproject's ``-m 'not gpu'``); ``make test-gpu`` runs them, skipped
without CUDA (the build machines have none).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from farm.render.denoise import DenoiseState, plan_shards, roundtrip, split_roundtrip
from farm.render.engine import DecoderStage, DenoiserStage, TextEncoderStage, initial_state
from farm.render.registry import ModelSpec, validate_request

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STEPS = 8
SEED = 2024
PROMPT = "timelapse of clouds over a mountain lake"
CPU = torch.device("cpu")
# Same device, same kernels, same order: shards should agree to rounding; bf16 rounds coarsely.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
ATTENTION = [
    "native",  # torch SDPA
    pytest.param(
        "xformers",
        marks=pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed"),
    ),
]


def _tensor_devices(state: DenoiseState) -> set[torch.device]:
    found: set[torch.device] = set()

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            found.add(value.device)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk([state.latents, state.scheduler_state, state.conditioning.prompt_embeds,
          state.conditioning.negative_prompt_embeds])
    return found


def _spec(spec: ModelSpec, dtype: str) -> ModelSpec:
    return ModelSpec.model_validate({**spec.model_dump(), "dtype": dtype})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("scheduler", ["unipc", "flow-euler"])
def test_sharded_equals_unsharded_on_cuda(tiny_spec, dtype, attention, scheduler):
    spec = _spec(tiny_spec, dtype)
    encoder = TextEncoderStage(spec, device="cuda")
    denoiser = DenoiserStage(spec, device="cuda", attention=attention)
    assert encoder.device.startswith("cuda:") and denoiser.device == encoder.device
    assert denoiser.attention == attention
    cuda = torch.device(denoiser.device)

    cond = encoder.encode(PROMPT)
    assert cond.prompt_embeds.device == CPU and cond.prompt_embeds.dtype == denoiser.dtype
    params = validate_request(spec, prompt=PROMPT, size="64x64", seconds=1, steps=STEPS, seed=SEED,
                              scheduler=scheduler)
    state0 = initial_state(spec, params, cond)

    whole = denoiser.run(state0, 0, STEPS)
    assert _tensor_devices(whole) == {CPU} and whole.latents.dtype == torch.float32

    # Shards that travel (through bytes, whole or split) and shards that stay on the replica.
    travelled, kept = state0, state0
    plans = plan_shards(state0, 3)
    for n, plan in enumerate(plans):
        handoff = roundtrip if n % 2 else split_roundtrip
        travelled = denoiser.run(travelled, plan.start, plan.end)
        assert _tensor_devices(travelled) == {CPU}
        travelled = handoff(travelled) if not travelled.done else travelled
        last = n == len(plans) - 1
        kept = denoiser.run(kept, plan.start, plan.end, keep_on_device=not last)
        assert _tensor_devices(kept) == ({CPU} if last else {cuda})
        assert kept.generator_state.device == CPU

    tol = TOLERANCE[dtype]
    assert float((travelled.latents - whole.latents).abs().max()) <= tol
    assert float((kept.latents - whole.latents).abs().max()) <= tol
    assert float((whole.latents - state0.latents).abs().max()) > 0.1
    assert state0.step_index == 0 and _tensor_devices(state0) == {CPU}


def test_cuda_run_is_close_to_the_cpu_run(tiny_spec):
    """Same job on both devices: not bit-equal (different kernels), but the same clip."""
    encoder = TextEncoderStage(tiny_spec, device="cpu")
    params = validate_request(tiny_spec, prompt=PROMPT, size="64x64", seconds=1, steps=STEPS, seed=SEED)
    state0 = initial_state(tiny_spec, params, encoder.encode(PROMPT))
    on_cpu = DenoiserStage(tiny_spec, device="cpu").run(state0, 0, STEPS)
    on_cuda = DenoiserStage(tiny_spec, device="cuda", attention="native").run(state0, 0, STEPS)
    scale = float(on_cpu.latents.abs().max())
    assert float((on_cuda.latents - on_cpu.latents).abs().max()) <= 1e-2 * scale


def test_decoder_on_cuda_returns_cpu_frames(tiny_spec):
    import numpy as np

    decoder = DecoderStage(tiny_spec, device="cuda")
    assert decoder.vae.device.type == "cuda" and decoder.vae.dtype == torch.float32
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    frames = decoder.decode(latents)
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert frames.shape == (tiny_spec.num_frames(1), 64, 64, 3)
