"""Each render optimisation's own contribution, in one process, measured side by side in one run.

Job: tiny Wan, 256x256, 33 frames (4 s at 8 fps), 8 steps (the issue's job), one torch thread.
Rows, each a ratio of two variants timed alternately (``--repeats`` times, medians compared):

  stage costs   CPU-seconds per clip of each stage (encode, 8 denoising steps, decode, finish) with
                stock and with the farm's decoder kernels, and the ideal clips/minute they allow on
                this machine's cores (cores / CPU-seconds per clip).
  batching      the denoising of N jobs (shards of ``render.shard_steps``) alone, one after another,
                vs batched in one forward per step (farm.render.denoise.denoise_batch); max |Δlatents|.
  decode        the VAE decode with diffusers' stock modules vs farm.render.cpu_kernels; PSNR of the
                frames against stock. And two clips decoded as one batch vs one after another.
  cache         FirstBlockCache at two thresholds vs none, over the farm's shards and over one shard of the
                whole job; the speed-up and the PSNR of the decoded frames against no cache.
  compile       torch.compile of the transformer blocks vs eager (``--compile``, as ``make bench`` runs it;
                off by default: the compile at replica start takes 15-35 s here); max |Δlatents|.

The farm-level rows (the farm against a naive Ray Serve app, batching on and off through the farm,
one job end to end) are bench_baseline.py and bench_farm.py.
Usage: python bench/bench_throughput.py [--repeats 3 --batch 2,4,8 --compile]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

SIZE, SECONDS, STEPS = "256x256", 4, 8
PROMPTS = ["夕焼けの海辺を走る犬、スローモーション", "a paper boat drifting down a rainy street",
           "雪の降る森を走る狐", "a lighthouse in a storm, cinematic"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def side_by_side(variants: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """Each variant once as warm-up, then ``repeats`` alternating rounds; median seconds and last output."""
    outputs = {name: fn() for name, fn in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            started = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - started)
    return {name: (statistics.median(times[name]), outputs[name]) for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", default="2,4,8", help="batch sizes for the batching row")
    parser.add_argument("--thresholds", default="0.1,0.3", type=lambda v: [float(t) for t in v.split(",")],
                        help="FirstBlockCache thresholds for the cache row")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile against eager")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard-steps", type=int, default=2, help="deployments/local.yaml's render.shard_steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from diffusers.utils import logging as dlog

    from farm.config import load_settings
    from farm.jobs.publish import finish_frames
    from farm.render.denoise import denoise, denoise_batch, plan_shards
    from farm.render.engine import DecoderStage, DenoiserStage, TextEncoderStage, initial_state
    from farm.render.registry import CacheSetting, validate_request
    from farm.render.tiny import build_tiny_wan, tiny_spec

    dlog.set_verbosity_error()
    settings = load_settings(None)
    shard_steps = args.shard_steps
    with tempfile.TemporaryDirectory() as tmp:
        spec = tiny_spec(build_tiny_wan(Path(tmp) / "wan-tiny"))
        encoder, denoiser = TextEncoderStage(spec, device="cpu"), DenoiserStage(spec, device="cpu")
        fast = DecoderStage(spec, device="cpu")
        stock = DecoderStage(spec.model_copy(update={"vae_kernels": "stock"}), device="cpu")

        def params(n: int):
            return validate_request(spec, prompt=PROMPTS[n % len(PROMPTS)], size=SIZE, seconds=SECONDS,
                                    steps=STEPS, seed=100 + n)

        def start(n: int):
            p = params(n)
            return initial_state(spec, p, encoder.encode(p.prompt))

        def render(state, stage=None, per_shard=shard_steps):
            """The job's steps shard by shard through a DenoiserStage, as a replica runs them (its cache
            setting applied per shard, under inference_mode)."""
            stage = stage or denoiser
            for plan in plan_shards(state, per_shard):
                state = stage.run(state, plan.start, plan.end)
            return state

        print(f"job: tiny wan {SIZE}, {spec.num_frames(SECONDS)} frames, {STEPS} steps, shards of {shard_steps}; "
              f"{args.repeats} alternating repeats; {os.cpu_count()} cores, {args.threads} torch thread(s)")

        # Stage costs and the ideal ----------------------------------------------------------------------
        state0 = start(0)
        t_encode, _ = timed(lambda: encoder.encode(PROMPTS[0]), args.repeats)
        t_denoise, final = timed(lambda: render(state0), args.repeats)
        decoded = side_by_side({"stock": lambda: stock.decode(final.latents),
                                "fast": lambda: fast.decode(final.latents)}, args.repeats)
        frames = decoded["fast"][1]
        with tempfile.TemporaryDirectory() as out:
            def finish():
                folder = Path(tempfile.mkdtemp(dir=out))
                return finish_frames(settings, spec, params(0), frames, f"video_{folder.name}", folder)

            t_finish, _ = timed(finish, args.repeats)
        cores = os.cpu_count() or 1
        for name in ("stock", "fast"):
            per_clip = t_encode + t_denoise + decoded[name][0] + t_finish
            print(f"stage costs, {name} decode: encode {t_encode:.3f} s, denoise {t_denoise:.2f} s, decode "
                  f"{decoded[name][0]:.2f} s, finish {t_finish:.2f} s = {per_clip:.2f} CPU-s per clip; ideal on "
                  f"{cores} cores: {60 * cores / per_clip:.1f} clips/min")
        print(f"decode kernels: fast/stock time {decoded['fast'][0] / decoded['stock'][0]:.3f}x "
              f"({decoded['stock'][0] / decoded['fast'][0]:.2f}x faster); PSNR vs stock "
              f"{psnr(decoded['fast'][1], decoded['stock'][1]):.1f} dB, max |Δpixel| "
              f"{int(np.abs(decoded['fast'][1].astype(int) - decoded['stock'][1].astype(int)).max())}")
        second = render(start(1))
        pair = side_by_side({"one by one": lambda: [fast.decode(final.latents), fast.decode(second.latents)],
                             "batched": lambda: fast.decode(torch.cat([final.latents, second.latents]))},
                            args.repeats)
        print(f"decode batching (2 clips, fast kernels): batched/one-by-one time "
              f"{pair['batched'][0] / pair['one by one'][0]:.3f}x")

        # Batching -----------------------------------------------------------------------------------------
        for size in [int(b) for b in args.batch.split(",")]:
            states = [start(n) for n in range(size)]
            with torch.inference_mode():
                runs = side_by_side({
                    "alone": lambda: [denoise(denoiser.experts, s, 0, shard_steps) for s in states],
                    "batched": lambda: denoise_batch(denoiser.experts, [(s, 0, shard_steps) for s in states]),
                }, args.repeats)
            diff = max(float((a.latents - b.latents).abs().max())
                       for a, b in zip(runs["alone"][1], runs["batched"][1]))
            print(f"batching {size} jobs (one shard of {shard_steps} steps each): alone {runs['alone'][0]:.2f} s, "
                  f"batched {runs['batched'][0]:.2f} s, speed-up {runs['alone'][0] / runs['batched'][0]:.2f}x; "
                  f"max |Δlatents| {diff:.1e}")

        # Cache ---------------------------------------------------------------------------------------------
        # The cache lives within a shard: over the farm's short shards each shard's first forward runs in full.
        for per_shard in sorted({shard_steps, STEPS}):
            def cached(threshold, per_shard=per_shard):
                state = state0 if threshold is None else replace(
                    state0, cache=CacheSetting(kind="first_block", threshold=threshold))
                return render(state, per_shard=per_shard)

            cache_runs = side_by_side({t: (lambda t=t: cached(t)) for t in (None, *args.thresholds)}, args.repeats)
            off_s, off_state = cache_runs[None]
            reference = fast.decode(off_state.latents)
            for threshold in args.thresholds:
                seconds, state = cache_runs[threshold]
                print(f"cache first_block {threshold} (shards of {per_shard}): denoise {seconds:.2f} s vs {off_s:.2f} s "
                      f"off, speed-up {off_s / seconds:.2f}x; PSNR of decoded frames vs no cache "
                      f"{psnr(fast.decode(state.latents), reference):.1f} dB")

        # Compile -------------------------------------------------------------------------------------------
        if args.compile:
            started = time.perf_counter()
            compiled = DenoiserStage(spec.model_copy(update={"compile": True}), device="cpu")
            warm = time.perf_counter() - started

            runs = side_by_side({"eager": lambda: render(state0), "compiled": lambda: render(state0, compiled)},
                                args.repeats)
            diff = float((runs["eager"][1].latents - runs["compiled"][1].latents).abs().max())
            print(f"compile: eager {runs['eager'][0]:.2f} s, compiled {runs['compiled'][0]:.2f} s, speed-up "
                  f"{runs['eager'][0] / runs['compiled'][0]:.2f}x (compile + warm-up at replica start {warm:.0f} s); "
                  f"max |Δlatents| {diff:.1e}")


if __name__ == "__main__":
    main()
