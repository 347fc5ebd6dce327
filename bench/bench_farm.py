"""The farm vs the same work in one process, measured side by side in one run.

  1. One job end to end: through `farm up` (HTTP create → poll until completed) vs the
     skeleton's core in-process (encode → shards → decode → finish → upload, weights
     already loaded). Ratio and absolute overhead.
  2. 16 jobs submitted at once: farm throughput vs a sequential in-process loop, the farm against
     the ideal (cores / CPU-seconds per clip of that loop: every core busy with nothing but the
     clips' own work), and p50/p95 latency of the create requests.

Job: tiny Wan, 256x256, 33 frames (4 s at 8 fps), 8 steps, shards of 2 steps.
Usage: python bench/bench_farm.py [--repeats 3 --jobs 16]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SIZE, SECONDS, STEPS, SHARD_STEPS = "256x256", 4, 8, 2
PROMPT = "東京の夜の街、ネオンと雨の反射、シネマティック"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _farm(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([str(Path(sys.executable).parent / "farm"), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"farm {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


class InProcess:
    """The skeleton's core with every stage loaded once, as a replica would hold them."""

    def __init__(self, settings) -> None:
        from farm.render.engine import DecoderStage, DenoiserStage, TextEncoderStage
        from farm.storage.connect import open_store

        self.settings = settings
        self.spec = settings.model("wan-tiny")
        self.encoder, self.denoiser, self.decoder = (
            TextEncoderStage(self.spec), DenoiserStage(self.spec), DecoderStage(self.spec)
        )
        self.store = open_store(settings, start=False)

    def run(self, seed: int) -> None:
        from farm.jobs.local import new_video_id
        from farm.jobs.publish import clip_record, finish_frames, upload_finished
        from farm.render.denoise import plan_shards, roundtrip, run_shards
        from farm.render.engine import initial_state
        from farm.render.registry import validate_request

        params = validate_request(self.spec, prompt=PROMPT, size=SIZE, seconds=SECONDS, steps=STEPS, seed=seed)
        state = initial_state(self.spec, params, self.encoder.encode(params.prompt))
        state = run_shards(self.denoiser.experts, state, plan_shards(state, SHARD_STEPS), handoff=roundtrip)
        frames = self.decoder.decode(state.latents)
        video_id = new_video_id()
        with tempfile.TemporaryDirectory() as tmp:
            clip = finish_frames(self.settings, self.spec, params, frames, video_id, Path(tmp))
            upload_finished(self.store, video_id, clip, clip_record(video_id, self.spec, params, len(frames), clip))


def _farm_job(client, seed: int, poll_s: float | None = None) -> tuple[float, float]:
    """(create latency, end-to-end seconds) of one job through the farm.

    ``poll_s`` None follows the farm's ``openai-poll-after-ms`` hint, as the SDK's
    ``create_and_poll`` does; polling much faster steals the CPU the farm renders with.
    """
    started = time.perf_counter()
    raw = client.videos.with_raw_response.create(model="wan-tiny", prompt=PROMPT, seconds=str(SECONDS), size=SIZE,
                                                 extra_body={"steps": STEPS, "seed": seed})
    created = time.perf_counter()
    video = raw.parse()
    if poll_s is None:
        poll_s = int(raw.headers.get("openai-poll-after-ms", "500")) / 1000
    while video.status in ("queued", "in_progress"):
        time.sleep(poll_s)
        video = client.videos.retrieve(video.id)
    if video.status != "completed":
        raise SystemExit(f"farm job {video.id} ended {video.status}: {video.error}")
    return created - started, time.perf_counter() - started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=16)
    args = parser.parse_args()

    import openai
    import torch

    from farm import env as farm_env
    from farm.config import load_settings

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-farm-") as home:
        home = Path(home)
        port = _free_port()
        env = {**os.environ, "FARM_HOME": str(home), "OMP_NUM_THREADS": "1"}
        deployment = yaml.safe_load(Path("deployments/local.yaml").read_text())
        app_settings = deployment["applications"][0]["args"]["settings"]
        app_settings["render"]["shard_steps"] = SHARD_STEPS
        app_settings["serve"]["max_queued"] = 1000
        app_settings["serve"]["max_queued_per_account"] = 1000
        app_settings["serve"]["rate_limit"] = "1000000/minute"  # the single-job run polls every 50 ms
        (home / "bench.yaml").write_text(yaml.safe_dump(deployment))
        _farm("up", "--port", str(port), "--deployment", str(home / "bench.yaml"), env=env)
        try:
            os.environ["FARM_HOME"] = str(home)
            settings = load_settings()
            farm_env.use_ray_token(settings.state_dir)
            local = InProcess(settings)
            code = _farm("invite", "create", "-q", env=env).stdout.strip()
            _farm("redeem", code, "--name", "bench", env=env)
            key = (home / "api_key").read_text().strip()
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
            local.run(0), _farm_job(client, 0)  # warm both paths

            # 1. One job end to end, alternating.
            farm_times, local_times = [], []
            for i in range(args.repeats):
                farm_times.append(_farm_job(client, 100 + i, poll_s=0.05)[1])  # one client: poll tightly
                started = time.perf_counter()
                local.run(100 + i)
                local_times.append(time.perf_counter() - started)
            farm_med, local_med = statistics.median(farm_times), statistics.median(local_times)

            # 2. N jobs at once through the farm vs a sequential in-process loop.
            started = time.perf_counter()
            with cf.ThreadPoolExecutor(args.jobs) as pool:
                results = list(pool.map(lambda s: _farm_job(client, s), range(1000, 1000 + args.jobs)))
            farm_wall = time.perf_counter() - started
            creates = [r[0] for r in results]
            started, cpu_started = time.perf_counter(), time.process_time()
            for seed in range(2000, 2000 + args.jobs):
                local.run(seed)
            local_wall = time.perf_counter() - started
            cpu_per_clip = (time.process_time() - cpu_started) / args.jobs
        finally:
            _farm("down", env=env)

    print(f"job: tiny wan {SIZE}, {SECONDS * 8 + 1} frames, {STEPS} steps, shards of {SHARD_STEPS}; "
          f"{args.repeats} alternating repeats; {os.cpu_count()} cores")
    print(f"1 job end to end: farm median {farm_med * 1000:.0f} ms, in-process median {local_med * 1000:.0f} ms, "
          f"ratio {farm_med / local_med:.3f}x, overhead {(farm_med - local_med) * 1000:+.0f} ms")
    print(f"{args.jobs} jobs at once: farm {farm_wall:.1f} s ({args.jobs / farm_wall:.3f} jobs/s), "
          f"sequential in-process {local_wall:.1f} s ({args.jobs / local_wall:.3f} jobs/s), "
          f"throughput ratio {local_wall / farm_wall:.3f}x")
    cores = os.cpu_count() or 1
    ideal, farm_rate = 60 * cores / cpu_per_clip, 60 * args.jobs / farm_wall
    print(f"farm vs ideal: {farm_rate:.2f} clips/min against {ideal:.2f} (= {cores} cores / {cpu_per_clip:.2f} "
          f"CPU-s per clip in-process), ratio {farm_rate / ideal:.3f}")
    print(f"create latency over {args.jobs} concurrent creates: p50 {_pct(creates, 0.5) * 1000:.0f} ms, "
          f"p95 {_pct(creates, 0.95) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
