"""Frames → a finished, signed clip → S3: the last two stages, shared by every runner.

The in-process render and the farm's Finisher deployment both call these, so a clip
is marked, signed and laid out in S3 the same way whichever path made it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from farm import __version__
from farm.config import FarmSettings
from farm.finish.chain import ClipMeta, FinishedClip, finish_clip
from farm.render.registry import ModelSpec, RenderParams
from farm.storage.s3 import ClipLayout, ObjectStore, upload_clip

VARIANTS = ("video", "thumbnail", "spritesheet")


def finish_frames(
    settings: FarmSettings, spec: ModelSpec, params: RenderParams, frames: np.ndarray, video_id: str, work_dir: Path
) -> FinishedClip:
    """Watermark, MP4, thumbnail, spritesheet and C2PA signature into ``work_dir``."""
    meta = ClipMeta(
        title=f"{spec.id}: {params.prompt[:80]}",
        model_id=spec.id,
        seed=params.seed,
        steps=params.steps,
        prompt=params.prompt,
        guidance_scale=spec.guidance_scale,
        job_id=video_id,
    )
    return finish_clip(frames, spec.fps, work_dir, meta, settings.watermark, settings.signer, settings.state_dir)


def clip_record(video_id: str, spec: ModelSpec, params: RenderParams, num_frames: int, clip: FinishedClip, **extra) -> dict:
    """The JSON record stored beside the media: what was asked, with what, and what came out."""
    return {
        "id": video_id,
        "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "prompt": params.prompt,
        "model": spec.id,
        "model_path": spec.path,
        "parameters": params.model_dump(),
        "seed": params.seed,
        "fps": spec.fps,
        "num_frames": num_frames,
        "generator": {"name": "videofarm", "version": __version__},
        "bytes": {"video": clip.video_bytes, "thumbnail": clip.thumbnail_bytes, "spritesheet": clip.spritesheet_bytes},
        **extra,
    }


def upload_finished(store: ObjectStore, video_id: str, clip: FinishedClip, record: dict) -> dict[str, str]:
    """Media first, the record last (its presence marks a complete clip); returns variant → URI."""
    files = {"video": clip.video, "thumbnail": clip.thumbnail, "spritesheet": clip.spritesheet}
    return upload_clip(store, video_id, files, record)


def clip_keys(video_id: str) -> dict[str, str]:
    """Variant → S3 key, as the job store records a completed clip's objects."""
    layout = ClipLayout(video_id)
    return {variant: layout.key(variant) for variant in VARIANTS}
