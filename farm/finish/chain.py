"""The finishing chain: decoded frames in, watermarked and C2PA-signed files out.

Order matters for invariant 3 (every clip is marked): the watermark goes into the
pixels first, so the MP4, thumbnail and spritesheet all carry it; the MP4 is signed
only after its last byte is written; final names appear only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from farm.finish.audio import AudioTrack
from farm.finish.media import encode_mp4, frame_rate, write_spritesheet, write_thumbnail
from farm.finish.provenance import ParentSource, ProvenanceInfo, SignerConfig, ensure_dev_credentials, sign_mp4
from farm.finish.watermark import WatermarkConfig, apply_watermark

logger = logging.getLogger(__name__)

VIDEO_NAME, THUMBNAIL_NAME, SPRITESHEET_NAME = "video.mp4", "thumbnail.webp", "spritesheet.jpg"


class ClipMeta(BaseModel):
    """What is known about how a clip was generated; feeds its C2PA manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(min_length=1, description="Title written into the manifest.")
    model_id: str = Field(min_length=1, description="Id of the model that rendered the clip.")
    seed: int | None = Field(default=None, description="Random seed of the generation.")
    steps: int | None = Field(default=None, ge=1, description="Number of denoising steps.")
    prompt: str | None = Field(
        default=None,
        description="The prompt. Only its SHA-256 goes into the manifest: prompts can be private "
        "and the manifest travels with the public file.",
    )
    guidance_scale: float | None = Field(default=None, description="Classifier-free guidance scale.")
    job_id: str | None = Field(default=None, description="Farm job id, for tracing a file back to its job.")
    parameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Any further generation parameters to record."
    )

    def provenance(self, *, width: int, height: int, frames: int, fps: Fraction) -> ProvenanceInfo:
        """The manifest content for this clip; the prompt is reduced to its hash."""
        params: dict[str, str | int | float | bool] = {
            "width": width, "height": height, "num_frames": frames, "fps": float(fps),
        }
        if self.guidance_scale is not None:
            params["guidance_scale"] = self.guidance_scale
        if self.job_id is not None:
            params["job_id"] = self.job_id
        params.update(self.parameters)
        digest = hashlib.sha256(self.prompt.encode("utf-8")).hexdigest() if self.prompt is not None else None
        return ProvenanceInfo(
            title=self.title, model_id=self.model_id, seed=self.seed, steps=self.steps,
            prompt_sha256=digest, parameters=params,
        )


@dataclass(frozen=True)
class FinishedClip:
    """The files of a finished clip and their sizes in bytes."""

    video: Path
    thumbnail: Path
    spritesheet: Path
    video_bytes: int
    thumbnail_bytes: int
    spritesheet_bytes: int


def resolve_signer(signer: SignerConfig, state_dir: Path) -> SignerConfig:
    """Fill in generated dev credentials when ``signer`` names no certificate and key."""
    if signer.has_credentials:
        return signer
    if signer.algorithm != "es256":
        raise ValueError(
            f"dev credentials are EC P-256 and sign with es256, but algorithm={signer.algorithm!r}; "
            "set cert_chain_path and key_path for other algorithms"
        )
    creds = ensure_dev_credentials(Path(state_dir) / "c2pa")
    logger.debug("signing with dev credentials from %s", creds.chain.parent)
    return creds.signer_config(tsa_url=signer.tsa_url)


def finish_clip(
    frames: np.ndarray,
    fps: float | Fraction,
    out_dir: Path,
    meta: ClipMeta,
    watermark: WatermarkConfig,
    signer: SignerConfig,
    state_dir: Path,
    parent: ParentSource | None = None,
    audio: AudioTrack | None = None,
) -> FinishedClip:
    """Watermark, encode, thumbnail, spritesheet and sign one clip into ``out_dir``.

    With ``audio``, the MP4 carries it as an AAC track as long as the video (see
    :mod:`farm.finish.audio` for the pad/trim rule); the manifest is signed over the whole file,
    both tracks included, and records the track's channels and sample rate.

    Writes ``video.mp4``, ``thumbnail.webp`` and ``spritesheet.jpg``. Work happens in a
    hidden temporary folder inside ``out_dir`` (same filesystem, so renames are atomic);
    ``video.mp4`` is moved into place last, so its presence means the clip is complete.
    With ``parent`` (a remix, edit or extension), the source clip is the manifest's
    ``parentOf`` ingredient.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Resolve credentials first: a signing misconfiguration should fail before any work.
    signing = resolve_signer(signer, state_dir)
    # With dev credentials the farm knows its own root, so a parent's recorded validation says
    # whether it is Trusted; an operator's root is the verifier's to give (`farm verify`).
    anchors = None
    if parent is not None and not signer.has_credentials:
        anchors = ensure_dev_credentials(Path(state_dir) / "c2pa").ca_cert.read_text()

    # 1. Visible watermark, burned into the pixels every other output is made from.
    marked = apply_watermark(frames, watermark)
    count, height, width, _ = marked.shape

    work = Path(tempfile.mkdtemp(prefix=".finish-", dir=out_dir))
    try:
        # 2. H.264 MP4 (and its AAC track), completely written and closed before anything hashes it.
        unsigned = encode_mp4(marked, fps, work / "unsigned.mp4", audio=audio)

        # 3. Still images for the API's thumbnail and spritesheet variants.
        thumbnail = write_thumbnail(marked, work / THUMBNAIL_NAME)
        spritesheet = write_spritesheet(marked, work / SPRITESHEET_NAME)

        # 4. C2PA manifest over the finished media bytes.
        info = meta.provenance(
            width=width, height=height, frames=count, fps=frame_rate(fps)
        )
        if audio is not None:
            info = info.model_copy(update={"parameters": info.parameters | {
                "audio_channels": int(audio.samples.shape[0]), "audio_sample_rate": audio.sample_rate}})
        signed = sign_mp4(unsigned, work / VIDEO_NAME, info, signing, parent=parent, trust_anchors_pem=anchors)

        # 5. Publish: images first, the video last as the "complete" marker.
        final = FinishedClip(
            video=out_dir / VIDEO_NAME,
            thumbnail=out_dir / THUMBNAIL_NAME,
            spritesheet=out_dir / SPRITESHEET_NAME,
            video_bytes=signed.stat().st_size,
            thumbnail_bytes=thumbnail.stat().st_size,
            spritesheet_bytes=spritesheet.stat().st_size,
        )
        os.replace(thumbnail, final.thumbnail)
        os.replace(spritesheet, final.spritesheet)
        os.replace(signed, final.video)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "finished clip %s: %d frames %dx%d, %d bytes", final.video, count, width, height, final.video_bytes
    )
    return final
