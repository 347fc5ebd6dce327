"""Farm throughput vs a naive Ray Serve app doing the same clips, measured side by side in one run.

  farm      `farm up` with deployments/local.yaml (its pools, replicas and CPU reservations as
            written; only serve.rate_limit and the queue caps raised so the bench's polling is
            never refused), the embedded SeaweedFS it starts. N clips created at once with the
            openai SDK, each polled at the farm's openai-poll-after-ms hint until completed.
  baseline  what a user would write without the farm: a plain Serve app on a Ray of its own, one
            Serve deployment per replica (as many replicas, and the same num_cpus each, as the
            file's denoiser pool for the model), each loading
            `WanPipeline.from_pretrained(<the farm's own tiny model folder>)` once in __init__ and,
            per request, calling `pipe(prompt, ...)` to frames (denoise + VAE decode), then the
            farm's own finishing chain (`farm.jobs.publish.finish_frames`: watermark, H.264 MP4 with
            PyAV/libx264, thumbnail, spritesheet, C2PA signature: the same files per clip), then
            uploading them with boto3 to the farm's S3 store. A FastAPI ingress deployment spreads
            requests round-robin over the replicas; each replica renders one at a time and queues
            the rest in arrival order. Each client POSTs and waits for the answer.

Both get the same threads per process (OMP_NUM_THREADS = FARM_TORCH_THREADS = --threads) and Ray
workers at the same niceness. Each side is warmed up first (one clip per replica); with --repeats > 1
the runs alternate (farm, baseline, baseline, farm, …); both Rays stay up throughout, so each
side runs beside the other's idle processes. Printed: clips/minute of each, the ratio farm/baseline,
p50/p95 end-to-end latency (the farm's includes up to one poll interval), and the farm's per-stage
busy fractions: the dispatcher's busy_s (a replica held by a call) for each pool, and the
finisher's finish + upload seconds from its Prometheus metrics, each over wall time × replicas.

Usage: python bench/bench_baseline.py [--clips 16 --size 256x256 --seconds 4 --steps 8 --repeats 1]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _farmkit import APP_SETTINGS_NOTE, BenchError, Farm, free_port, log, pct, process_env, run_main  # noqa: E402

PROMPT = "夕焼けの海辺を走る犬、スローモーション"
FINISH_METRICS = ("ray_videofarm_finish_seconds_sum", "ray_videofarm_upload_seconds_sum",
                  "ray_videofarm_finish_seconds_count")


@dataclass
class Run:
    wall_s: float
    latencies: list[float]
    busy: dict[str, float] = field(default_factory=dict)  # stage → busy seconds in this run
    replicas: dict[str, int] = field(default_factory=dict)
    parts: list[dict] = field(default_factory=list)  # baseline: per-clip timings from the replica

    @property
    def per_minute(self) -> float:
        return 60.0 * len(self.latencies) / self.wall_s


# The farm ---------------------------------------------------------------------------------------
class FarmSide:
    """Clips through the farm's API; the per-stage busy seconds of each measured run."""

    def __init__(self, farm: Farm, args) -> None:
        self.farm, self.args = farm, args
        self.finished = 0  # clips the farm finished so far: what the finisher's metrics must count

    def finisher_metrics(self, timeout_s: float = 60) -> dict | None:
        """The finisher's metric sums once they count every clip so far (Ray exports replica
        metrics every few seconds); None if they do not catch up in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            sums = self.farm.metric_sums(*FINISH_METRICS)
            if not sums:
                return None  # no metrics endpoint
            if sums["ray_videofarm_finish_seconds_count"] >= self.finished:
                return sums
            if time.monotonic() > deadline:
                return None
            time.sleep(2)

    def run(self, seeds: list[int], measure: bool = True) -> Run:
        args, farm = self.args, self.farm
        if measure:  # `farm status` is a CLI process of its own: outside the timed window
            busy_before, finish_before = farm.status()["dispatcher"]["busy_s"], self.finisher_metrics()

        def one(seed: int) -> float:
            started = time.perf_counter()
            raw = farm.create(model=args.model, prompt=PROMPT, size=args.size, seconds=args.seconds,
                              steps=args.steps, seed=seed)
            # As the SDK's create_and_poll does: polling faster steals the CPU the farm renders with.
            farm.wait(raw.parse(), int(raw.headers.get("openai-poll-after-ms", "500")) / 1000)
            return time.perf_counter() - started

        started = time.perf_counter()
        with cf.ThreadPoolExecutor(len(seeds)) as pool:
            latencies = list(pool.map(one, seeds))
        run = Run(time.perf_counter() - started, latencies)
        self.finished += len(seeds)
        if not measure:
            return run
        status = farm.status()
        for pool, seconds in status["dispatcher"]["busy_s"].items():
            run.busy[pool] = seconds - busy_before.get(pool, 0.0)
            run.replicas[pool] = len(status["dispatcher"]["pools"].get(pool, [])) or 1
        finish_after = self.finisher_metrics()
        if finish_before is not None and finish_after is not None:
            run.busy["finisher"] = sum(finish_after[m] - finish_before[m] for m in FINISH_METRICS[:2])
            run.replicas["finisher"] = status["deployments"].get("Finisher", {}).get("replicas", {}).get("RUNNING", 1)
        return run


# The baseline -----------------------------------------------------------------------------------
def baseline_app(settings, model_id: str, s3: dict, replicas: int, num_cpus: float, threads: int):
    """The naive Serve app: N single-replica pipeline deployments behind a round-robin ingress."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    # Requests queue inside the replica, in arrival order, and render one at a time (like one GPU):
    # with max_ongoing_requests=1 they would wait in Serve's router instead, which retries with
    # backoff and leaves the replica idle between renders.
    @serve.deployment(max_ongoing_requests=10_000)
    class PipelineReplica:
        def __init__(self) -> None:
            import asyncio
            import boto3
            import torch
            from botocore.config import Config
            from diffusers import WanPipeline

            torch.set_num_threads(threads)
            self.turn = asyncio.Lock()  # FIFO: asyncio wakes waiters in the order they came
            self.spec = settings.model(model_id)
            self.pipe = WanPipeline.from_pretrained(self.spec.path, torch_dtype=torch.float32)  # once per replica
            self.pipe.set_progress_bar_config(disable=True)
            # boto3 >= 1.36 sends checksums S3-compatible stores may refuse unless told "when_required".
            self.s3 = boto3.session.Session().client(
                "s3", endpoint_url=s3["endpoint_url"], region_name=s3["region"],
                aws_access_key_id=s3["access_key_id"], aws_secret_access_key=s3["secret_access_key"],
                config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                              response_checksum_validation="when_required"))

        async def render(self, body: dict) -> dict:
            import asyncio

            async with self.turn:
                return await asyncio.to_thread(self._render, body)  # the replica's loop stays free

        def _render(self, body: dict) -> dict:
            import json
            import uuid

            import numpy as np
            import torch

            from farm.jobs.publish import finish_frames
            from farm.render.registry import validate_request

            spec = self.spec
            params = validate_request(spec, prompt=body["prompt"], size=body["size"], seconds=int(body["seconds"]),
                                      steps=int(body["steps"]), seed=int(body["seed"]))
            started = time.perf_counter()
            out = self.pipe(prompt=params.prompt, negative_prompt=spec.negative_prompt, height=params.height,
                            width=params.width, num_frames=spec.num_frames(params.seconds),
                            num_inference_steps=params.steps, guidance_scale=spec.guidance_scale,
                            generator=torch.Generator("cpu").manual_seed(params.seed),
                            max_sequence_length=spec.max_sequence_length, output_type="np")
            frames = (np.clip(out.frames[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
            rendered = time.perf_counter()
            video_id = f"baseline_{uuid.uuid4().hex}"
            prefix = f"baseline/{video_id}/"
            with tempfile.TemporaryDirectory(prefix="baseline-") as tmp:
                clip = finish_frames(settings, spec, params, frames, video_id, Path(tmp))
                finished = time.perf_counter()
                for path, kind in ((clip.thumbnail, "image/webp"), (clip.spritesheet, "image/jpeg"),
                                   (clip.video, "video/mp4")):
                    self.s3.upload_file(str(path), s3["bucket"], prefix + path.name, ExtraArgs={"ContentType": kind})
                self.s3.put_object(Bucket=s3["bucket"], Key=prefix + "record.json", ContentType="application/json",
                                   Body=json.dumps({"id": video_id, "prompt": params.prompt, "seed": params.seed,
                                                    "steps": params.steps, "frames": int(frames.shape[0])}).encode())
            return {"key": prefix + "video.mp4", "pipeline_s": rendered - started, "finish_s": finished - rendered,
                    "upload_s": time.perf_counter() - finished}

    @serve.deployment(max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, *members) -> None:
            self.members = members
            self.turn = 0

        @api.post("/render")
        async def render(self, body: dict) -> dict:
            member = self.members[self.turn % len(self.members)]
            self.turn += 1
            return await member.render.remote(body)

    members = [PipelineReplica.options(name=f"Pipeline:{i}", num_replicas=1,
                                       ray_actor_options={"num_cpus": num_cpus}).bind() for i in range(replicas)]
    return Ingress.bind(*members)


class Baseline:
    """The naive app on a Ray of its own (this process is its driver), on loopback ports."""

    def __init__(self, settings, model_id: str, replicas: int, num_cpus: float, threads: int) -> None:
        from farm import env
        from farm.finish.chain import resolve_signer
        from farm.storage.connect import store_settings

        self.temp_dir = tempfile.mkdtemp(prefix="vfb-", dir="/tmp")  # short: Ray's socket paths cap at ~107 bytes
        # Ray 2.60 authenticates with a token; keep this Ray's in its own folder (Ray would write
        # ~/.ray/auth_token). Set before ray's import; the farm CLI's environment was fixed earlier.
        env.use_ray_token(Path(self.temp_dir))
        import ray
        from ray import serve

        resolve_signer(settings.signer, settings.state_dir)  # dev C2PA credentials exist before replicas race
        s3 = store_settings(settings, start=False)
        creds = {"endpoint_url": s3.endpoint_url, "region": s3.region, "bucket": s3.bucket,
                 "access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key.get_secret_value()}
        self.replicas = replicas
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace="baseline",
                 object_store_memory=512 * 1024 * 1024, _temp_dir=self.temp_dir)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(baseline_app(settings, model_id, creds, replicas, num_cpus, threads), name="baseline",
                      route_prefix="/", blocking=False)
            self.url = f"http://127.0.0.1:{port}/render"
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float = 300) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            app = serve.status().applications.get("baseline")
            if app is not None and app.status.value == "RUNNING":
                return
            if app is not None and app.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise BenchError(f"baseline app failed to deploy: {app.message.strip().splitlines()[-1]}")
            time.sleep(0.5)
        raise BenchError(f"baseline app not running after {timeout_s:.0f}s")

    def close(self) -> None:
        import ray

        ray.shutdown()  # ends the Ray this process started: Serve, replicas, every worker
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def run(self, args, seeds: list[int]) -> Run:
        import httpx

        with httpx.Client(timeout=None) as http:
            def one(seed: int) -> tuple[float, dict]:
                started = time.perf_counter()
                reply = http.post(self.url, json={"prompt": PROMPT, "size": args.size, "seconds": args.seconds,
                                                  "steps": args.steps, "seed": seed})
                if reply.status_code != 200:
                    raise BenchError(f"baseline request failed: HTTP {reply.status_code} {reply.text[:300]}")
                return time.perf_counter() - started, reply.json()

            started = time.perf_counter()
            with cf.ThreadPoolExecutor(len(seeds)) as pool:
                results = list(pool.map(one, seeds))
            wall = time.perf_counter() - started
        return Run(wall, [r[0] for r in results], parts=[r[1] for r in results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16, help="clips submitted at once per run")
    parser.add_argument("--model", default="wan-tiny")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process, both sides")
    args = parser.parse_args()
    if args.clips < 1 or args.repeats < 1 or args.threads < 1:
        raise BenchError("--clips, --repeats and --threads must be at least 1")

    # Before ray is imported here: the same threads as the farm's workers, Ray on loopback only,
    # its workers at the niceness the farm gives its own (Ray's default would be nice 15), and
    # no local Ray started behind our back should a call outlive ray.shutdown().
    os.environ.update(process_env(args.threads))
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_worker_niceness="0", RAY_ENABLE_AUTO_CONNECT="0")
    overrides = {"serve": {"rate_limit": "1000000/minute", "max_queued": 10_000, "max_queued_per_account": 10_000}}
    farm_runs: list[Run] = []
    base_runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp, \
            Farm(Path(tmp) / "farm", overrides, threads=args.threads) as farm:
        from farm.render.registry import validate_request
        from farm.storage.connect import open_store

        settings = farm.settings()
        spec = settings.model(args.model)
        validate_request(spec, prompt=PROMPT, size=args.size, seconds=args.seconds, steps=args.steps, seed=0)
        pool = farm.pool(args.model)
        shard_steps = farm.app_settings.get("render", {}).get("shard_steps", settings.render.shard_steps)
        log("baseline app up")
        baseline = Baseline(settings, args.model, pool["replicas"], pool["num_cpus"], args.threads)
        try:
            log("warm-up: one clip per replica on each side")
            warm = list(range(pool["replicas"]))
            farm_side = FarmSide(farm, args)
            farm_side.run(warm, measure=False)  # first calls load kernels, C2PA keys, S3 connections
            baseline.run(args, warm)
            for repeat in range(args.repeats):
                seeds = list(range(1000 * (repeat + 1), 1000 * (repeat + 1) + args.clips))
                order = ("farm", "baseline") if repeat % 2 == 0 else ("baseline", "farm")
                for side in order:
                    log(f"repeat {repeat + 1}/{args.repeats}: {side}, {args.clips} clips")
                    if side == "farm":
                        farm_runs.append(farm_side.run(seeds))
                    else:
                        base_runs.append(baseline.run(args, seeds))
        finally:
            baseline.close()
        store = open_store(settings, start=False)
        missing = [p["key"] for r in base_runs for p in r.parts if not store.exists(p["key"])]
        if missing:
            raise BenchError(f"{len(missing)} baseline clip(s) not in S3, e.g. {missing[0]}")

    report(args, spec, pool, shard_steps, farm_runs, base_runs)


def report(args, spec, pool: dict, shard_steps: int, farm_runs: list[Run], base_runs: list[Run]) -> None:
    frames = spec.num_frames(args.seconds)
    farm_rate = statistics.median(r.per_minute for r in farm_runs)
    base_rate = statistics.median(r.per_minute for r in base_runs)
    print(f"job: {args.model} {args.size}, {frames} frames ({args.seconds} s at {spec.fps} fps), {args.steps} steps; "
          f"{args.clips} clips at once; {args.repeats} alternating repeat(s); {os.cpu_count()} cores, "
          f"{args.threads} torch thread(s) per process")
    print(f"farm:     deployments/local.yaml as written (render.shard_steps {shard_steps}, {spec.id} denoiser pool "
          f"{pool['replicas']} x {pool['num_cpus']} CPU); {APP_SETTINGS_NOTE}")
    print(f"baseline: {pool['replicas']} Serve deployments x {pool['num_cpus']} CPU, WanPipeline.__call__ + the "
          "farm's finish chain + boto3 upload per request, FastAPI ingress round-robin")
    for name, runs, rate in (("farm", farm_runs, farm_rate), ("baseline", base_runs, base_rate)):
        latencies = [x for r in runs for x in r.latencies]
        walls = ", ".join(f"{r.wall_s:.1f}" for r in runs)
        print(f"{name:<9} {rate:6.2f} clips/min (median of {len(runs)}; wall {walls} s); end-to-end latency "
              f"p50 {pct(latencies, 0.5):.1f} s, p95 {pct(latencies, 0.95):.1f} s")
    print(f"ratio farm/baseline: {farm_rate / base_rate:.3f}x clips/min")

    stages: dict[str, float] = {}
    for stage in farm_runs[0].busy:
        capacity = sum(r.wall_s * r.replicas.get(stage, 1) for r in farm_runs if stage in r.busy)
        stages[stage] = sum(r.busy.get(stage, 0.0) for r in farm_runs) / capacity
    if "finisher" not in stages:
        print("farm finisher: not measured (its metrics did not arrive within 60 s)")
    shown = ", ".join(f"{stage} {frac:.2f} ({farm_runs[0].replicas.get(stage, 1)}r)" for stage, frac in stages.items())
    bottleneck = max(stages, key=stages.get)
    print(f"farm busy fraction (busy s / (wall x replicas)): {shown}; busiest: {bottleneck}")
    parts = [p for r in base_runs for p in r.parts]
    mean = {k: statistics.fmean(p[k] for p in parts) for k in ("pipeline_s", "finish_s", "upload_s")}
    busy = sum(sum(p[k] for k in mean) for p in parts) / sum(r.wall_s * pool["replicas"] for r in base_runs)
    print(f"baseline per clip: pipe() (denoise + VAE decode) {mean['pipeline_s']:.2f} s, "
          f"finish {mean['finish_s']:.2f} s, "
          f"upload {mean['upload_s']:.2f} s; replica busy fraction {busy:.2f}")


if __name__ == "__main__":
    run_main(main)
