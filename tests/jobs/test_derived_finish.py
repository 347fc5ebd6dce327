"""A derived job's finish: derived_from from the job row to the Finisher, the source read from real
S3 (SeaweedFS) into the manifest's parentOf ingredient, and a missing source failing the job."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydantic import ValidationError
from ray.exceptions import RayTaskError

from farm.config import FarmSettings, embedded_models
from farm.finish import verify_chain
from farm.jobs.dispatcher import _error_code, params_of
from farm.jobs.job import Job
from farm.jobs.publish import SourceUnavailable, clip_record, finish_frames, upload_finished
from farm.jobs.retry import RetryPolicy
from farm.metrics import FarmMetrics
from farm.render.families.base import DecodedClip
from farm.render.registry import DerivedFrom
from farm.storage.s3 import ClipLayout
from tests.finish import synth_frames
from tests.storage.conftest import seaweed, store  # noqa: F401  (the session's real SeaweedFS server)

SIZE = "128x96"


def _settings(tmp_path: Path) -> FarmSettings:
    return FarmSettings(state_dir=tmp_path / "state", models=embedded_models(tmp_path / "state"),
                        render={"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "storage_retry_s": 2})


def _job(job_id: str, params: dict) -> Job:
    now = dt.datetime.now(dt.timezone.utc)
    return Job(id=job_id, model="wan-tiny", prompt="the fox again, in rain", size=SIZE, seconds=1,
               params={"steps": 2, "seed": 3} | params, priority=0, created_at=now, updated_at=now)


def _frames(seed: int):
    return synth_frames(count=9, height=96, width=128, seed=seed)


def _publish_original(settings: FarmSettings, objects, tmp_path: Path, video_id: str) -> str:
    """A farm clip as the finisher publishes it; returns its video key."""
    spec = settings.model("wan-tiny")
    params = params_of(_job(video_id, {}), spec)
    clip = finish_frames(settings, spec, params, _frames(1), video_id, tmp_path / video_id)
    upload_finished(objects, video_id, clip, clip_record(video_id, spec, params, 9, clip))
    return ClipLayout(video_id).key("video")


def test_params_of_carries_derived_from(tmp_path: Path) -> None:
    spec = _settings(tmp_path).model("wan-tiny")
    derived = {"video_id": "video_src", "key": "videos/video_src/video.mp4", "action": "extend"}
    assert params_of(_job("video_new", {"derived_from": derived}), spec).derived_from == DerivedFrom(**derived)
    assert params_of(_job("video_plain", {}), spec).derived_from is None
    with pytest.raises(ValidationError, match="action"):
        params_of(_job("video_bad", {"derived_from": derived | {"action": "crop"}}), spec)


def test_the_finisher_reads_the_source_from_s3_into_the_ingredient(
    tmp_path: Path, store, monkeypatch  # noqa: F811
) -> None:
    """The Finisher deployment's own finish (its replica state set directly, the frames handed over
    without Ray's object store): the signed clip in S3 chains Trusted to the source it read."""
    from farm.serve import deployments
    from farm.serve.deployments import Finisher

    settings = _settings(tmp_path)
    key = _publish_original(settings, store, tmp_path, "video_src")
    finisher = object.__new__(Finisher.func_or_class)
    finisher.settings, finisher.store, finisher.metrics = settings, store, FarmMetrics()
    monkeypatch.setattr(deployments, "_get", lambda frames: frames)
    spec = settings.model("wan-tiny")
    params = params_of(_job("video_remix", {"derived_from": {"video_id": "video_src", "key": key, "action": "remix"}}),
                       spec)

    finished = finisher.finish("video_remix", "wan-tiny", params, DecodedClip(_frames(2)))  # what the Decoder boxes

    signed = store.download_file(finished.objects["video"], tmp_path / "remix.mp4")
    ca_pem = (settings.state_dir / "c2pa" / "dev-root-ca.pem").read_text()
    report = verify_chain(signed, ca_pem)
    assert [(link.state, link.title) for link in report.links] == [
        ("Trusted", report.links[0].title), ("Trusted", "video_src.mp4")
    ], report.lines()
    assert report.links[1].actions == ("c2pa.created",)
    record = store.get_json(ClipLayout("video_remix").record_key)
    assert record["parameters"]["derived_from"] == {"video_id": "video_src", "key": key, "action": "remix"}


def test_an_uploaded_source_key_is_read_the_same_way(tmp_path: Path, store) -> None:  # noqa: F811
    settings = _settings(tmp_path)
    key = _publish_original(settings, store, tmp_path, "video_other")
    upload_key = ClipLayout("video_edit").prefix + "source.mp4"
    store.put_bytes(upload_key, store.get_bytes(key))
    spec = settings.model("wan-tiny")
    params = params_of(_job("video_edit", {"derived_from": {"video_id": None, "key": upload_key, "action": "edit"}}),
                       spec)
    clip = finish_frames(settings, spec, params, _frames(4), "video_edit", tmp_path / "edit", store)
    report = verify_chain(clip.video, (settings.state_dir / "c2pa" / "dev-root-ca.pem").read_text())
    assert report.state == "Trusted" and report.links[1].title == "source.mp4"
    # The source's bytes are not left beside the finished clip.
    assert sorted(p.name for p in (tmp_path / "edit").iterdir()) == ["spritesheet.jpg", "thumbnail.webp", "video.mp4"]


def test_a_missing_source_fails_the_job_as_source_unavailable(tmp_path: Path, store) -> None:  # noqa: F811
    settings = _settings(tmp_path)
    spec = settings.model("wan-tiny")
    derived = {"video_id": "video_gone", "key": "videos/video_gone/video.mp4", "action": "extend"}
    params = params_of(_job("video_ext", {"derived_from": derived}), spec)
    retry = RetryPolicy.from_settings(settings.render)
    out = tmp_path / "ext"

    with pytest.raises(SourceUnavailable, match=r"videos/video_gone/video.mp4.*extend of video_gone.*not signed"):
        finish_frames(settings, spec, params, _frames(5), "video_ext", out, store, retry)
    assert not (out / "video.mp4").exists()
    # Without an object store to read it from, the same refusal.
    with pytest.raises(SourceUnavailable, match="no object store"):
        finish_frames(settings, spec, params, _frames(5), "video_ext", out)

    # The dispatcher's code for it, also through Ray's re-raise of a replica's exception.
    wrapped = RayTaskError("finish", "Traceback ...", SourceUnavailable("gone")).as_instanceof_cause()
    assert _error_code(wrapped) == _error_code(SourceUnavailable("gone")) == "source_unavailable"
