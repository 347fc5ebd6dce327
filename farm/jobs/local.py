"""One job, every stage, in this process: the skeleton the farm distributes.

``render_clip`` reads top to bottom like a diffusers pipeline: encode the prompt,
prepare the latents, run the denoising shards (serializing the state between
them, as a process boundary would), decode, finish, upload.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from farm.config import FarmSettings
from farm.jobs.publish import audio_of, clip_record, finish_frames, upload_finished
from farm.render.denoise import plan_shards, roundtrip
from farm.render.engine import DenoiserStage, configure_torch, initial_state
from farm.render.families import get_family
from farm.render.registry import ModelSpec, RenderParams
from farm.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

STAGES = ("load", "encode", "denoise", "decode", "finish", "upload")


class Progress:
    """Receives progress; the CLI draws bars from it, the farm will update the job store."""

    def stage(self, name: str) -> None:
        """A stage (one of ``STAGES``) begins."""

    def step(self, index: int, total: int) -> None:
        """Denoising step ``index`` (0-based) of ``total`` finished."""


@dataclass
class RenderResult:
    video_id: str
    uris: dict[str, str]
    local_video: Path
    record: dict
    timings: dict[str, float] = field(default_factory=dict)


def new_video_id() -> str:
    return f"video_{uuid.uuid4().hex}"


class _Timer:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable):
        self.progress.stage(name)
        started = time.perf_counter()
        result = fn()
        self.timings[name] = round(time.perf_counter() - started, 4)
        return result


def render_clip(
    settings: FarmSettings,
    spec: ModelSpec,
    params: RenderParams,
    store: ObjectStore,
    *,
    shard_steps: int | None = None,
    out: Path | None = None,
    progress: Progress | None = None,
    image=None,
) -> RenderResult:
    """Render, finish and upload one clip; returns its S3 URIs and a local copy's path.

    ``image`` (a Pillow image) is the reference of an image-to-video model; None for text-to-video."""
    configure_torch()
    progress = progress or Progress()
    timer = _Timer(progress)
    video_id = new_video_id()
    shard_steps = shard_steps or settings.render.shard_steps
    created = dt.datetime.now(dt.timezone.utc)

    # 0. Load each stage's weights through from_pretrained (a replica does this once); the model's
    #    family brings its encoder and decoder stages.
    family = get_family(spec.family)
    encoder, denoiser, decoder = timer.run(
        "load", lambda: (family.load_encoder(spec), DenoiserStage(spec), family.load_decoder(spec))
    )

    # 1. Request → conditioning (the prompt's embeddings; for image-to-video also the image's).
    conditioning = timer.run("encode", lambda: encoder.encode_job(params, image))

    # 2. Noise from the seed, schedule set; 3. the denoising shards, state serialized between them.
    def _denoise():
        state = initial_state(spec, params, conditioning, device=denoiser.device)
        plans = plan_shards(state, shard_steps)
        for plan in plans:
            state = denoiser.run(state, plan.start, plan.end, on_step=progress.step)
            if not state.done:
                state = roundtrip(state)
        return state, len(plans)

    state, shard_count = timer.run("denoise", _denoise)

    # 4. Latents → frames (and the waveform, for a model with audio).
    decoded = timer.run("decode", lambda: family.decode_clip(decoder, state))
    frames = decoded.frames

    # 5. Watermark, MP4 (with its AAC track when params.audio), thumbnail, spritesheet, C2PA.
    work = settings.state_dir / "renders" / video_id
    clip = timer.run("finish", lambda: finish_frames(settings, spec, params, frames, video_id, work, store,
                                                     audio=audio_of(decoded)))

    # 6. Upload: media first, the JSON record last (it marks the clip complete).
    record = clip_record(
        video_id, spec, params, int(frames.shape[0]), clip,
        created_at=created.isoformat(), shard_steps=shard_steps, shards=shard_count,
    )

    def _upload():
        record["timings_s"] = dict(timer.timings)
        return upload_finished(store, video_id, clip, record)

    uris = timer.run("upload", _upload)

    local_video = clip.video
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip.video, out)
        local_video = out
    log.info("rendered %s in %.2fs: %s", video_id, sum(timer.timings.values()), uris.get("video"))
    return RenderResult(video_id, uris, local_video, record, timer.timings)
