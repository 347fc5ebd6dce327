"""Sharded core vs diffusers' own WanPipeline.__call__, measured side by side in one run.

Same tiny job for all three: prompt encoding + denoising to latents (no decode).
  bare      WanPipeline(..., output_type="latent")
  1 shard   the farm's core, one step range
  4 shards  the farm's core, four ranges, state serialized + deserialized between them

Runs alternate (bare, 1, 4, bare, 1, 4, …) so machine noise hits all alike; the
medians are compared. Usage: python bench/bench_shards.py [--size 256x256 --seconds 4 --steps 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from farm.render.denoise import plan_shards, roundtrip, run_shards
from farm.render.engine import DenoiserStage, TextEncoderStage, initial_state
from farm.render.registry import validate_request
from farm.render.tiny import build_tiny_wan, tiny_spec

PROMPT = "夕焼けの海辺を走る犬、スローモーション"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import WanPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        spec = tiny_spec(build_tiny_wan(Path(tmp) / "wan-tiny"))
        params = validate_request(spec, prompt=PROMPT, size=args.size, seconds=args.seconds, steps=args.steps, seed=7)
        pipe = WanPipeline.from_pretrained(spec.path)
        pipe.set_progress_bar_config(disable=True)
        encoder, denoiser = TextEncoderStage(spec, device="cpu"), DenoiserStage(spec, device="cpu")

        def bare():
            return pipe(
                PROMPT, negative_prompt=spec.negative_prompt, height=params.height, width=params.width,
                num_frames=spec.num_frames(params.seconds), num_inference_steps=params.steps,
                guidance_scale=spec.guidance_scale, max_sequence_length=spec.max_sequence_length,
                generator=torch.Generator().manual_seed(params.seed), output_type="latent",
            ).frames

        def sharded(shards: int):
            def run():
                state = initial_state(spec, params, encoder.encode(params.prompt))
                per_shard = -(-params.steps // shards)
                return run_shards(denoiser.experts, state, plan_shards(state, per_shard), handoff=roundtrip).latents
            return run

        runs = {"bare": bare, "1 shard": sharded(1), "4 shards": sharded(4)}
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and a correctness check
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)

    print(f"job: tiny wan, {args.size}, {spec.num_frames(args.seconds)} frames, {args.steps} steps, "
          f"{args.repeats} alternating repeats, {args.threads} torch thread(s)")
    base = statistics.median(times["bare"])
    for name in runs:
        median = statistics.median(times[name])
        diff = float((outputs[name] - outputs["bare"]).abs().max())
        print(f"{name:>9}: median {median * 1000:8.1f} ms  ratio {median / base:5.3f}x  max|Δlatents| {diff:.1e}")


if __name__ == "__main__":
    main()
