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
from farm.finish.audio import AudioTrack
from farm.finish.chain import ClipMeta, FinishedClip, finish_clip
from farm.finish.provenance import ParentSource
from farm.jobs.retry import RetryPolicy
from farm.render.registry import DerivedFrom, ModelSpec, RenderParams
from farm.storage.s3 import ClipLayout, ObjectNotFound, ObjectStore, upload_clip

VARIANTS = ("video", "thumbnail", "spritesheet")


class SourceUnavailable(RuntimeError):
    """A derived job's source clip cannot be read (by the encoder, which renders from it, or at finish
    time, for its manifest); its job fails as ``source_unavailable``.

    The farm does not sign a remix, edit or extension without its parent ingredient: a manifest
    that silently lost its source would claim less than the clip is.
    """


def fetch_parent(
    objects: ObjectStore | None, derived: DerivedFrom, video_id: str, work_dir: Path, retry: RetryPolicy | None = None
) -> ParentSource:
    """Download a derived job's source MP4 (byte for byte, its manifest included) into ``work_dir``.

    Storage outages are retried by ``retry`` (when given) and then raised as they are (the job's
    code is ``storage_unavailable``); a missing object raises :class:`SourceUnavailable`.
    """
    if objects is None:
        raise SourceUnavailable(f"job {video_id}: derived from {derived.key!r}, but no object store to read it from")
    target = Path(work_dir) / "parent.mp4"
    try:
        if retry is None:
            objects.download_file(derived.key, target)
        else:
            retry.storage_call(f"job {video_id}: read source clip", objects.download_file, derived.key, target)
    except ObjectNotFound as exc:
        raise SourceUnavailable(
            f"job {video_id}: source clip {objects.uri(derived.key)} ({derived.action} of "
            f"{derived.video_id or 'an uploaded clip'}) is gone; a derived clip is not signed without its parent"
        ) from exc
    title = f"{derived.video_id}.mp4" if derived.video_id else derived.key.rsplit("/", 1)[-1]
    return ParentSource(path=target, action=derived.action, video_id=derived.video_id, title=title)


def finish_frames(
    settings: FarmSettings,
    spec: ModelSpec,
    params: RenderParams,
    frames: np.ndarray,
    video_id: str,
    work_dir: Path,
    objects: ObjectStore | None = None,
    retry: RetryPolicy | None = None,
    audio: AudioTrack | None = None,
) -> FinishedClip:
    """Watermark, MP4, thumbnail, spritesheet and C2PA signature into ``work_dir``.

    A job with ``params.derived_from`` needs ``objects``: its source clip is read from there
    and becomes the manifest's parentOf ingredient (see :func:`fetch_parent`). ``audio`` (the
    decoder's waveform) becomes the MP4's AAC track when ``params.audio`` asks for one, and is
    dropped otherwise; a job that asks for audio without a waveform is a ValueError.
    """
    if params.audio and audio is None:
        raise ValueError(f"job {video_id}: audio was asked for, but the decoder made none")
    parent = None
    if params.derived_from is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        parent = fetch_parent(objects, params.derived_from, video_id, Path(work_dir), retry)
    meta = ClipMeta(
        title=f"{spec.id}: {params.prompt[:80]}",
        model_id=spec.id,
        seed=params.seed,
        steps=params.steps,
        prompt=params.prompt,
        guidance_scale=spec.guidance_scale,
        job_id=video_id,
    )
    try:
        return finish_clip(frames, spec.fps, work_dir, meta, settings.watermark, settings.signer, settings.state_dir,
                           parent=parent, audio=audio if params.audio else None)
    finally:
        if parent is not None:
            parent.path.unlink(missing_ok=True)  # only its manifest travels on; the media stays in S3


def audio_of(decoded) -> AudioTrack | None:
    """A decoder's :class:`~farm.render.families.base.DecodedClip` waveform as an AudioTrack (None without one)."""
    if getattr(decoded, "audio", None) is None:
        return None
    return AudioTrack(np.asarray(decoded.audio, dtype=np.float32), int(decoded.sample_rate))


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
