"""Cache acceleration per shard (farm.render.accel): off is exact, on skips and stays close, no leak."""

from __future__ import annotations

from dataclasses import replace

import torch

from farm.render.denoise import denoise
from farm.render.engine import DenoiserStage, TextEncoderStage, initial_state
from farm.render.registry import CacheSetting, validate_request

FIRST_BLOCK = CacheSetting(kind="first_block", threshold=0.1)


def _state(spec, seed):
    params = validate_request(spec, prompt="a cat", size="64x64", seconds=1, steps=8, seed=seed)
    return initial_state(spec, params, TextEncoderStage(spec, device="cpu").encode(params.prompt))


def test_off_exact_on_skips_and_no_leak(tiny_spec):
    stage = DenoiserStage(tiny_spec, device="cpu")
    a, b = _state(tiny_spec, 1), _state(tiny_spec, 2)
    plain = denoise(stage.experts, a, 0, 8).latents
    assert torch.equal(stage.run(a, 0, 8).latents, plain)  # default off: today's latents exactly
    stats = []
    cached = stage.run(replace(a, cache=FIRST_BLOCK), 0, 8, on_cache=stats.append).latents
    assert 0 < stats[0].hits < stats[0].lookups == 16
    assert 0 < float((cached - plain).abs().max()) < 0.1
    assert not stage.experts["transformer"].is_cache_enabled
    b_first = stage.run(replace(b, cache=FIRST_BLOCK), 0, 8).latents
    stage.run(replace(a, cache=FIRST_BLOCK), 0, 8)
    assert torch.equal(stage.run(replace(b, cache=FIRST_BLOCK), 0, 8).latents, b_first)  # no leak between jobs


def test_compiled_blocks_equal_eager_at_every_size_after_one_warm_up(tiny_spec):
    """ModelSpec.compile: one dynamic-shape compile at replica start serves the other sizes without a
    recompile (so no request pays it), within float32 reordering of eager."""
    from torch._dynamo.utils import counters

    eager = DenoiserStage(tiny_spec, device="cpu")
    compiled = DenoiserStage(tiny_spec.model_copy(update={"compile": True}), device="cpu")  # compiles and warms
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    for size, seconds in (("128x128", 1), ("96x128", 2)):
        params = validate_request(tiny_spec, prompt="a cat", size=size, seconds=seconds, steps=2, seed=3)
        state = initial_state(tiny_spec, params, TextEncoderStage(tiny_spec, device="cpu").encode(params.prompt))
        diff = (compiled.run(state, 0, 2).latents - eager.run(state, 0, 2).latents).abs().max()
        assert float(diff) < 1e-4
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph for the new sizes
